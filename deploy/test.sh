#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it: formatting, lints, then every test.
# Slow or GPU-only suites are opt-in through environment variables (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
# libtorch (PyPI's torch 2.11.0 wheel) and the reference implementations, in ./.venv.
./deploy/setup-ml.sh
# verl, the reference the GRPO core's fixtures are written with, in .venv/verl.
./deploy/setup-verl.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests start the real binaries, and the plugin tests load the Wasm components:
# build both first.
cargo build --workspace --bins --locked
./deploy/build-modules.sh
cargo test --workspace --locked
# Parity against transformers on fixtures exported afresh (the committed ones ran above).
fixtures="$PWD/target/parity-fixtures"
rm -rf "$fixtures"
.venv/bin/python tests/fixtures/make_parity_fixtures.py "$fixtures"
TWIN_PARITY_FIXTURES=$fixtures cargo test -p twin-ml --locked --test parity
# The GRPO trainer's core against verl 0.9.1 (installed into .venv/verl by setup-ml.sh) and
# PyTorch's AdamW, on fixtures written afresh (the committed ones ran above).
grpo_fixtures="$PWD/target/grpo-fixtures"
rm -rf "$grpo_fixtures"
.venv/bin/python tests/fixtures/verl_reference.py "$grpo_fixtures"
TWIN_GRPO_FIXTURES=$grpo_fixtures cargo test -p twin-ml --locked --test grpo
# One whole training step (forward with gradients, GRPO and SFT losses, AdamW) against
# transformers, verl and PyTorch, on fixtures written afresh (the committed ones ran above).
train_fixtures="$PWD/target/train-step-fixtures"
rm -rf "$train_fixtures"
.venv/bin/python tests/fixtures/train_step_reference.py "$train_fixtures"
TWIN_TRAIN_FIXTURES=$train_fixtures cargo test -p twin-ml --locked --test train_step
# The SDKs in three languages against the shared vectors (builds the Python and JS templates).
./deploy/conformance.sh
