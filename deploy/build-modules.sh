#!/usr/bin/env bash
# Builds every Rust Wasm component in the repository (the catalogue in reward-modules/ and
# filters/, and the test modules in tests/modules/) for wasm32-wasip2 with the `guest` profile.
# Output: target/wasm32-wasip2/guest/<crate_name>.wasm (e.g. binary_match.wasm).
#
# The crates are plain libraries in the workspace (so they build and unit-test natively); the
# component comes from asking rustc for a cdylib for the Wasm target only.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 \
  || rustup target add wasm32-wasip2
for manifest in reward-modules/*/Cargo.toml filters/*/Cargo.toml tests/modules/*/Cargo.toml; do
  package=$(sed -n 's/^name = "\(.*\)"/\1/p' "$manifest" | head -1)
  cargo rustc --quiet --locked --profile guest --target wasm32-wasip2 -p "$package" --crate-type cdylib
done
ls -1 target/wasm32-wasip2/guest/*.wasm
