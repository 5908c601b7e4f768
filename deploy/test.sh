#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it: formatting, lints, then every test.
# Slow or GPU-only suites are opt-in through environment variables (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests start the real binaries, and the plugin tests load the Wasm components:
# build both first.
cargo build --workspace --bins --locked
./deploy/build-modules.sh
cargo test --workspace --locked
# The SDKs in three languages against the shared vectors (builds the Python and JS templates).
./deploy/conformance.sh
