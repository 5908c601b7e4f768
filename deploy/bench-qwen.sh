#!/usr/bin/env bash
# Qwen2.5-VL rollout throughput, twin-ml's engine against transformers' `generate`, on the same
# random checkpoint (the benchmark's small shape unless PRESET=3b), the same TWIN pair prompts
# (two 448x448 images + the pair question), exactly NEW_TOKENS sampled tokens per rollout, the
# same device and thread count. The reference (server/twin-ml/bench/qwen_reference.py) saves the
# checkpoint and prompts once; each round then runs the reference and ours
# (server/twin-ml/examples/bench_qwen.rs) one after the other, and the summary gives medians
# over the rounds and the ratio ours / transformers (above 1.0: we are faster).
#
#   deploy/bench-qwen.sh                                   # CPU, batches 8 and 32, 1 round
#   ROUNDS=3 BATCHES="8 32" NEW_TOKENS=128 THREADS=2 deploy/bench-qwen.sh
#   DEVICE=cuda DTYPE=bf16 PRESET=3b deploy/bench-qwen.sh  # on a GPU machine
#
# Needs deploy/setup-ml.sh's .venv. Builds the example in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-1}
batches=${BATCHES:-8 32}
new_tokens=${NEW_TOKENS:-128}
threads=${THREADS:-2}
repeats=${REPEATS:-1}
device=${DEVICE:-cpu}
dtype=${DTYPE:-f32}
preset=${PRESET:-small}
python=${PYTHON:-.venv/bin/python}
work=${WORKDIR:-$(mktemp -d)}
[ -n "${WORKDIR:-}" ] || trap 'rm -rf "$work"' EXIT
rm -f "$work/reference.jsonl" "$work/ours.jsonl"

cargo build --quiet --release -p twin-ml --example bench_qwen
bin=$(cargo metadata --format-version 1 --no-deps | "$python" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/examples/bench_qwen

[ -f "$work/model/requests.json" ] || "$python" server/twin-ml/bench/qwen_reference.py \
    --preset "$preset" --save "$work/model" --save-only --new-tokens "$new_tokens" --device "$device" >&2
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') ($(nproc) CPUs), device $device, threads $threads, batches $batches, $new_tokens new tokens, $rounds round(s) x $repeats repeat(s)"
for round in $(seq 1 "$rounds"); do
    # shellcheck disable=SC2086
    "$python" server/twin-ml/bench/qwen_reference.py --model "$work/model" --batch $batches \
        --new-tokens "$new_tokens" --repeats "$repeats" --threads "$threads" --device "$device" \
        --dtype "$dtype" 2>"$work/reference.err" | tee -a "$work/reference.jsonl" | sed "s/^/round $round transformers: /" \
        || { cat "$work/reference.err"; exit 1; }
    # shellcheck disable=SC2086
    "$bin" --model "$work/model" --batch $batches --new-tokens "$new_tokens" --repeats "$repeats" \
        --threads "$threads" --device "$device" | tee "$work/ours.log" | grep -v '^RESULT' | sed "s/^/round $round twin-ml: /"
    grep '^RESULT ' "$work/ours.log" | sed 's/^RESULT //' >>"$work/ours.jsonl"
done

"$python" - "$work/reference.jsonl" "$work/ours.jsonl" <<'PY'
import json, statistics, sys
ref = [json.loads(l) for l in open(sys.argv[1]) if '"result"' in l]
ours = [json.loads(l) for l in open(sys.argv[2])]
print(f"\n{'batch':>6}{'transformers tok/s':>20}{'twin-ml tok/s':>16}{'ours/theirs':>13}")
for b in sorted({r["batch"] for r in ours}):
    t = statistics.median(r["rollout_tokens_per_s"] for r in ref if r["batch"] == b)
    o = statistics.median(r["rollout_tokens_per_s"] for r in ours if r["batch"] == b)
    print(f"{b:>6}{t:>20.1f}{o:>16.1f}{o / t:>13.2f}")
PY
