#!/usr/bin/env bash
# The main job on an embedded default: a server with its embedded executor on a fresh data dir,
# a small generated image set ingested, then the offline audit of the log.
# Usage: deploy/demo.sh [DEMO_DIR]   (default .twin-demo; wiped at the start of each run)
set -euo pipefail
cd "$(dirname "$0")/.."
demo=${1:-.twin-demo}
./deploy/setup-ml.sh
cargo build --workspace --bins --locked --quiet
bin=target/debug
rm -rf "$demo" && mkdir -p "$demo"
data="$demo/data"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "generate a sample image set (6 categories x 4 instances x 4 views, plus 1 corrupt file)"
"$bin/twin" sample-data "$demo/images" --corrupt 1 --contact-sheet "$demo/contact-sheet.png"

step "start twin-server (it starts its executor child) on $data"
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

step "mine hard negatives: a random-weight CLIP ViT-B/32 (no download), HNSW, two filter modules"
"$bin/twin-executor" model init-clip "$demo/clip" --preset b32 --seed 0
# Registered by content: the job pins its hash and the executor fetches it into its model store,
# as an executor on another machine would.
"$bin/twin" models add "$demo/clip" --name clip-b32
"$bin/twin" modules add target/wasm32-wasip2/guest/distinct_instance.wasm --name distinct
"$bin/twin" modules add target/wasm32-wasip2/guest/similarity_band.wasm --name band
cat >"$demo/mine.toml" <<SPEC
experiment = "demo"

[spec]
kind = "mine"
dataset = "sample"
model = "clip-b32"
k = 5
search = "hnsw"

[[spec.filters]]
module = "distinct"

[[spec.filters]]
module = "band"
mode = "advise"
params = { min = 0.0, max = 0.999 }
SPEC
mine=$("$bin/twin" --json submit "$demo/mine.toml" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
"$bin/twin" jobs wait "$mine"
"$bin/twin" --json jobs show "$mine" | python3 -c 'import json,sys; r=json.load(sys.stdin)["result"]; print("%d images embedded on %s; %d pairs, %d kept by the filters; HNSW recall@5 against exact search: %.3f" % (r["images"], r["device"], r["pairs"], r["kept"], r["recall_at_k"]))'

step "review: the first pending candidates, accept two, reject one, then accept the rest the band filter kept"
"$bin/twin" review ls "$mine" --limit 3
read -r a b c < <("$bin/twin" --json review ls "$mine" --limit 3 | python3 -c 'import json,sys; print(*[c["id"] for c in json.load(sys.stdin)["candidates"]])')
"$bin/twin" review accept "$mine" "$a" "$b"
"$bin/twin" review reject "$mine" "$c" --note "looks like the same product"
"$bin/twin" review accept "$mine" --by-filter band

step "build a dataset from the accepted hard negatives and export it"
cat >"$demo/build.toml" <<SPEC
experiment = "demo"

[spec]
kind = "build-dataset"
name = "pairs"
dataset = "sample"
mines = ["$mine"]

[spec.options]
seed = 7
eval_fraction = 0.25
balance = "downsample"
multi_questions = { train = 8, eval = 4 }
SPEC
build=$("$bin/twin" --json submit "$demo/build.toml" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
"$bin/twin" jobs wait "$build"
# An eval split with only one answer would score "always yes" at 100%: the demo refuses it.
"$bin/twin" --json jobs show "$build" | python3 -c '
import json, sys
c = json.load(sys.stdin)["result"]["counts"]
for split in ("train", "eval"):
    print("%s split: %d pair questions (%d yes, %d no), %d multi questions"
          % (split, c[split + ".pair"], c[split + ".pair.yes"], c[split + ".pair.no"], c[split + ".multi"]))
if c["eval.pair.yes"] == 0 or c["eval.pair.yes"] != c["eval.pair.no"]:
    sys.exit("the eval split is not balanced")
'
"$bin/twin" dataset ls
"$bin/twin" dataset export pairs --out "$demo/export"
ls "$demo/export"
head -c 700 "$demo/export/train.jsonl"; echo

step "jobs and the event stream"
"$bin/twin" jobs ls
"$bin/twin" events tail

step "stop the server (SIGTERM) and audit its log offline"
kill -TERM $server && wait $server || true
trap - EXIT
"$bin/twin" replay --data-dir "$data" --verify
manifest=$("$bin/twin" replay --data-dir "$data" --json | python3 -c 'import json,sys; print(next(iter(json.load(sys.stdin)["datasets"].values()))["manifest"])')

step "lineage of the dataset manifest $manifest"
"$bin/twin" lineage "$manifest" --data-dir "$data"

step "lineage of the mine job: the CLIP checkpoint it used, by name, hash and files"
"$bin/twin" lineage "$mine" --data-dir "$data"
echo
echo "done: the data dir is $data; replay it again any time with: $bin/twin replay --data-dir $data --verify"
