#!/usr/bin/env bash
# The SDK conformance check: builds the Python and JavaScript templates from source (pinned
# componentize-py / componentize-js), then runs them and the Rust catalogue's binary-match through
# `twin modules run` on the shared vectors. All three must match the CPython 3.11 oracle, and the
# templates must import no functions at all (only the type-only `twin:plugin/types` instance).
# Needs: target/debug/twin (cargo build --bins), deploy/build-modules.sh run, python3, node/npm.
set -euo pipefail
cd "$(dirname "$0")/.."
twin=${TWIN_BIN_DIR:-target/debug}/twin
conf=wasm-sdk/conformance
out=target/sdk-out
mkdir -p "$out"

python3 "$conf/oracle.py" expect "$conf/binary-match.jsonl" | cmp -s - "$conf/binary-match.expected.jsonl" \
  || { echo "conformance: binary-match.expected.jsonl is stale (oracle.py expect)" >&2; exit 1; }

wasm-sdk/python/template/build.sh "$out/python-binary-match.wasm"
wasm-sdk/js/template/build.sh "$out/js-binary-match.wasm"

check_imports() { # FILE ALLOW_WASI
  "$twin" modules inspect "$1" | python3 -c '
import json, sys
allow_wasi = sys.argv[1] == "1"
imports = json.load(sys.stdin)["imports"]
bad = [i for i in imports if i != "twin:plugin/types@0.1.0" and not (allow_wasi and i.startswith("wasi:"))]
if bad:
    sys.exit(f"conformance: unexpected imports {bad}")
' "$2"
}

status=0
for entry in "rust:target/wasm32-wasip2/guest/binary_match.wasm:1" \
             "python:$out/python-binary-match.wasm:0" \
             "js:$out/js-binary-match.wasm:0"; do
  IFS=: read -r lang wasm allow_wasi <<<"$entry"
  check_imports "$wasm" "$allow_wasi"
  "$twin" modules run "$wasm" --input "$conf/binary-match.jsonl" >"$out/$lang.jsonl"
  if python3 "$conf/oracle.py" check "$conf/binary-match.expected.jsonl" "$out/$lang.jsonl"; then
    echo "conformance: $lang ok"
  else
    echo "conformance: $lang differs from the oracle" >&2
    status=1
  fi
done
exit $status
