#!/usr/bin/env bash
# Holds the server's OpenAPI document (`/v1/openapi.json`) to the third-party tools a Python
# user would point at it, against a live server: a private copy of twin-server with
# `--no-executor` on a fresh data dir and a loopback port of its own (no tokens: auth is off).
#   1. openapi-spec-validator accepts the document;
#   2. openapi-python-client 0.29.1 generates a client from it without a single warning;
#   3. tests/api-tools/client_roundtrip.py, with that client, submits a job and reads it back,
#      plays an executor through the protocol and pages through /v1/events;
#   4. schemathesis 4.32.5 fuzzes every operation but the endless SSE stream with the checks
#      not_a_server_error, status_code_conformance, content_type_conformance and
#      response_schema_conformance (hooks: tests/api-tools/hooks.py).
# Needs: target/debug/twin-server (cargo build --bins), python3 and PyPI for
# deploy/setup-api-tools.sh. TWIN_BIN_DIR overrides the binary's directory;
# TWIN_API_CHECK_EXAMPLES (default 50) and TWIN_API_CHECK_SEED (default 1) bound and pick the
# fuzzing. On failure the server's log and the work directory are kept and named.
set -euo pipefail
cd "$(dirname "$0")/.."
./deploy/setup-api-tools.sh
venv=$(cd "${TWIN_API_TOOLS_VENV:-.venv/api-tools}" && pwd)
# openapi-python-client formats what it generates with the ruff it finds on PATH.
export PATH="$venv/bin:$PATH"
server_bin=${TWIN_BIN_DIR:-target/debug}/twin-server
examples=${TWIN_API_CHECK_EXAMPLES:-50}
seed=${TWIN_API_CHECK_SEED:-1}
tools="$PWD/tests/api-tools"

[ -x "$server_bin" ] || { echo "api-check: no $server_bin; run cargo build --bins first" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/twin-api-check.XXXXXX")
server_pid=
finish() {
    local status=$?
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    if [ "$status" -eq 0 ]; then
        rm -rf "$work"
    else
        echo "api-check: FAILED; server log (tail):" >&2
        tail -n 30 "$work/server.log" >&2 || true
        echo "api-check: everything is kept in $work" >&2
    fi
}
trap finish EXIT

# A copy: the shared target directory may be rebuilt under a running server.
cp "$server_bin" "$work/twin-server"
env -u TWIN_CONFIG -u TWIN_LISTEN -u TWIN_DATA_DIR \
    "$work/twin-server" serve --no-executor --data-dir "$work/data" --listen 127.0.0.1:0 \
    >"$work/server.out" 2>"$work/server.log" &
server_pid=$!
url=
for _ in $(seq 300); do
    url=$(sed -n 's/^twin-server listening on //p' "$work/server.out")
    [ -n "$url" ] && break
    kill -0 "$server_pid" 2>/dev/null || { echo "api-check: the server exited" >&2; exit 1; }
    sleep 0.1
done
[ -n "$url" ] || { echo "api-check: the server did not say where it listens" >&2; exit 1; }
echo "api-check: server at $url"

"$venv/bin/python" - "$url/v1/openapi.json" "$work/openapi.json" <<'EOF'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=10) as r, open(sys.argv[2], "wb") as f:
    f.write(r.read())
EOF

echo "api-check: openapi-spec-validator"
openapi-spec-validator "$work/openapi.json"

echo "api-check: openapi-python-client"
openapi-python-client generate --path "$work/openapi.json" --output-path "$work/client/twin_api" \
    --meta none --config "$tools/client-config.yaml" --fail-on-warning >"$work/generate.log" 2>&1 \
    || { cat "$work/generate.log" >&2; exit 1; }
# The generator's exit status covers warnings it counts; a schema it dropped is named in the log.
if grep -Eq 'WARNING|Unable to|will not be generated|will be omitted' "$work/generate.log"; then
    cat "$work/generate.log" >&2
    echo "api-check: openapi-python-client left something out" >&2
    exit 1
fi

echo "api-check: generated client round trip"
PYTHONPATH="$work/client" "$venv/bin/python" "$tools/client_roundtrip.py" "$url"

echo "api-check: schemathesis ($examples examples per operation, seed $seed)"
# Run from the work directory: schemathesis and hypothesis keep state in the current one.
(cd "$work" && PYTHONPATH="$tools" SCHEMATHESIS_HOOKS=hooks st run "$url/v1/openapi.json" \
    --url "$url" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
    --max-examples "$examples" --seed "$seed" --generation-database :memory: \
    --exclude-path /v1/events/stream --request-timeout 10 --no-color)
echo "api-check: ok"
