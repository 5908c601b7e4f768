#!/usr/bin/env bash
# Build this Python reward module into a WebAssembly component.
#
#   ./build.sh OUTPUT.wasm
#
# Creates (once) a virtualenv with the pinned componentize-py in a build
# directory outside the source tree, then runs
#   componentize-py -d WIT -w reward componentize --stub-wasi app -o OUTPUT.wasm
# --stub-wasi replaces every WASI import with a trapping stub, so the
# component imports nothing and twin can run it with no capabilities.
#
# Environment (all optional):
#   TWIN_WIT              WIT file or directory   (default: ./wit if present, else
#                                                  ../../wit/plugin.wit)
#   TWIN_PY_REQUIREMENTS  pip requirements file   (default: ./requirements.txt if present,
#                                                  else ../requirements.txt)
#   TWIN_SDK_BUILD_DIR    where the venv lives    (default: <repo>/target/wasm-sdk/python
#                                                  inside the twin repo, else ./target/twin-build)
#   TWIN_PY_APP           Python module to build  (default: app)
#   PYTHON                interpreter for the venv (default: python3)
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
if [[ -n "${TWIN_PY_REQUIREMENTS:-}" ]]; then
  req="$TWIN_PY_REQUIREMENTS"
elif [[ -f "$here/requirements.txt" ]]; then
  req="$here/requirements.txt"
else
  req="$here/../requirements.txt"
fi
if [[ -f "$here/../../../Cargo.toml" && -d "$here/../../wit" ]]; then
  default_build="$here/../../../target/wasm-sdk/python"
else
  default_build="$here/target/twin-build"
fi
build="$(realpath -m "${TWIN_SDK_BUILD_DIR:-$default_build}")"
app="${TWIN_PY_APP:-app}"
python="${PYTHON:-python3}"

[[ -e "$wit" ]] || { echo "build.sh: WIT not found at $wit (set TWIN_WIT)" >&2; exit 1; }
[[ -f "$req" ]] || { echo "build.sh: requirements not found at $req (set TWIN_PY_REQUIREMENTS)" >&2; exit 1; }

# (Re)create the venv when the pinned requirements change.
venv="$build/venv"
stamp="$venv/.twin-requirements"
if [[ ! -x "$venv/bin/componentize-py" ]] || ! cmp -s "$req" "$stamp"; then
  echo "build.sh: installing $(grep -v '^#' "$req" | tr '\n' ' ')into $venv" >&2
  rm -rf "$venv"
  mkdir -p "$build"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --disable-pip-version-check --no-input --quiet -r "$req"
  cp "$req" "$stamp"
fi

# componentize-py writes __pycache__ next to the sources it imports, so build
# from a staged copy and keep the source tree clean.
stage="$build/src"
rm -rf "$stage"
mkdir -p "$stage"
tar -C "$here" --exclude=./target --exclude=./wit --exclude='*.wasm' --exclude='__pycache__' -cf - . |
  tar -C "$stage" -xf -

mkdir -p "$(dirname "$out")"
"$venv/bin/componentize-py" --quiet -d "$wit" -w reward \
  componentize --stub-wasi -p "$stage" "$app" -o "$out"
echo "build.sh: wrote $out ($(wc -c <"$out") bytes)" >&2
