#!/usr/bin/env bash
# Build this JavaScript reward module into a WebAssembly component.
#
#   ./build.sh OUTPUT.wasm
#
# Installs (once, with `npm ci`) the pinned componentize-js from
# package.json/package-lock.json into a build directory outside the source
# tree, then runs
#   componentize-js reward.js --wit WIT --world-name reward \
#     --disable stdio random clocks http fetch-event --out OUTPUT.wasm
# Disabling every feature makes a "pure" component: no WASI imports at all.
#
# Environment (all optional):
#   TWIN_WIT            WIT file or directory          (default: ./wit if present, else
#                                                       ../../wit/plugin.wit)
#   TWIN_JS_PACKAGE     dir with package.json + lock   (default: . if it has one, else ..)
#   TWIN_SDK_BUILD_DIR  where node_modules lives       (default: <repo>/target/wasm-sdk/js
#                                                       inside the twin repo, else ./target/twin-build)
#   TWIN_JS_ENTRY       the module's entry file        (default: ./reward.js)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:?usage: build.sh OUTPUT.wasm}"

if [[ -n "${TWIN_WIT:-}" ]]; then
  wit="$TWIN_WIT"
elif [[ -e "$here/wit" ]]; then
  wit="$here/wit"          # a copy of the template outside the repo
else
  wit="$here/../../wit/plugin.wit"
fi
if [[ -n "${TWIN_JS_PACKAGE:-}" ]]; then
  pkg="$TWIN_JS_PACKAGE"
elif [[ -f "$here/package-lock.json" ]]; then
  pkg="$here"
else
  pkg="$here/.."
fi
if [[ -f "$here/../../../Cargo.toml" && -d "$here/../../wit" ]]; then
  default_build="$here/../../../target/wasm-sdk/js"
else
  default_build="$here/target/twin-build"
fi
build="$(realpath -m "${TWIN_SDK_BUILD_DIR:-$default_build}")"
entry="${TWIN_JS_ENTRY:-$here/reward.js}"

[[ -e "$wit" ]] || { echo "build.sh: WIT not found at $wit (set TWIN_WIT)" >&2; exit 1; }
[[ -f "$pkg/package.json" && -f "$pkg/package-lock.json" ]] ||
  { echo "build.sh: package.json + package-lock.json not found in $pkg (set TWIN_JS_PACKAGE)" >&2; exit 1; }

# (Re)install when the lock file changes.
mkdir -p "$build"
if [[ ! -x "$build/node_modules/.bin/componentize-js" ]] || ! cmp -s "$pkg/package-lock.json" "$build/package-lock.json"; then
  echo "build.sh: npm ci in $build" >&2
  cp "$pkg/package.json" "$pkg/package-lock.json" "$build/"
  (cd "$build" && npm ci --no-audit --no-fund --loglevel=error)
fi

mkdir -p "$(dirname "$out")"
"$build/node_modules/.bin/componentize-js" "$entry" \
  --wit "$wit" --world-name reward \
  --disable stdio random clocks http fetch-event \
  --out "$out" >&2
echo "build.sh: wrote $out ($(wc -c <"$out") bytes)" >&2
