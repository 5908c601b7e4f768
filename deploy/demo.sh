#!/usr/bin/env bash
# The main job on an embedded default: a server with its embedded executor on a fresh data dir,
# a small generated image set ingested, then the offline audit of the log.
# Usage: deploy/demo.sh [DEMO_DIR]   (default .twin-demo; wiped at the start of each run)
set -euo pipefail
cd "$(dirname "$0")/.."
demo=${1:-.twin-demo}
cargo build --workspace --bins --locked --quiet
bin=target/debug
rm -rf "$demo" && mkdir -p "$demo"
data="$demo/data"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "generate a sample image set (3 categories x 4 instances x 3 views, plus 1 corrupt file)"
"$bin/twin" sample-data "$demo/images" --corrupt 1

step "start twin-server (embedded executor) on $data"
RUST_LOG=${RUST_LOG:-warn} "$bin/twin-server" serve --data-dir "$data" --listen 127.0.0.1:0 >"$demo/server.out" 2>"$demo/server.log" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q 'listening on' "$demo/server.out" 2>/dev/null && break; sleep 0.1; done
url=$(sed -n 's/^twin-server listening on //p' "$demo/server.out")
[ -n "$url" ] || { cat "$demo/server.log"; echo "server did not start" >&2; exit 1; }
export TWIN_SERVER=$url
echo "server at $url (log: $demo/server.log)"

step "create an experiment and submit an ingest job, waiting for it"
"$bin/twin" experiments create demo --description "README demo"
cat >"$demo/ingest.toml" <<SPEC
experiment = "demo"

[spec]
kind = "ingest"
dataset = "sample"

[spec.source]
dir = "images"
SPEC
"$bin/twin" submit "$demo/ingest.toml" --idempotency-key demo-ingest --wait

step "register the TWIN reward (a Wasm component) and re-score a few rollouts with it"
./deploy/build-modules.sh >/dev/null
"$bin/twin" modules add target/wasm32-wasip2/guest/binary_match.wasm --name binary-match
cat >"$demo/rollouts.jsonl" <<'JSONL'
{"completion": "Same stitching and logo. <answer>yes</answer>", "ground_truth": "yes", "question_type": "pair"}
{"completion": "The handle differs. <answer>No.</answer>", "ground_truth": "no", "question_type": "pair"}
{"completion": "Looks alike. <answer>yes</answer>", "ground_truth": "no", "question_type": "pair"}
{"completion": "I cannot tell.", "ground_truth": "yes", "question_type": "pair"}
JSONL
"$bin/twin" modules run target/wasm32-wasip2/guest/binary_match.wasm --input "$demo/rollouts.jsonl"
"$bin/twin" score --rollouts "$demo/rollouts.jsonl" --module binary-match --experiment demo --wait

step "jobs, datasets and the event stream"
"$bin/twin" jobs ls
"$bin/twin" datasets
"$bin/twin" events tail

step "stop the server (SIGTERM) and audit its log offline"
kill -TERM $server && wait $server || true
trap - EXIT
"$bin/twin" replay --data-dir "$data" --verify
manifest=$("$bin/twin" replay --data-dir "$data" --json | python3 -c 'import json,sys; print(next(iter(json.load(sys.stdin)["datasets"].values()))["manifest"])')

step "lineage of the dataset manifest $manifest"
"$bin/twin" lineage "$manifest" --data-dir "$data"
echo
echo "done: the data dir is $data; replay it again any time with: $bin/twin replay --data-dir $data --verify"
