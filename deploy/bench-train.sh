#!/usr/bin/env bash
# Seconds per GRPO optimizer step (forward + backward over two micro-batches, clipping, AdamW) and
# peak resident memory, twin-ml's trainer core against PyTorch + transformers + verl's loss, with
# and without activation checkpointing, on the same random checkpoint (the rollout benchmark's
# small Qwen2.5-VL shape, 151,936-token vocabulary), the same batch (8 sequences of one 448x448
# image + text, 300 prompt tokens, 64 response tokens) and the same thread count. The reference
# (server/twin-ml/bench/train_step_reference.py) saves the checkpoint and batch once; each round
# then runs, per checkpointing setting, the reference and ours
# (server/twin-ml/examples/bench_train_step.rs) one after the other, each configuration in a
# process of its own (peak memory is the process's VmHWM). The summary gives medians over the
# rounds, the ratio transformers / twin-ml (above 1.0: we are faster), and both sides' first-step
# gradient norm (the same step on the same weights: they must agree).
#
#   deploy/bench-train.sh                        # 1 round, 1 warm-up + 2 timed steps each
#   ROUNDS=3 STEPS=3 THREADS=2 deploy/bench-train.sh
#
# Needs deploy/setup-ml.sh's .venv and deploy/setup-verl.sh's verl. Builds the example in release
# mode.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-1}
steps=${STEPS:-2}
warmup=${WARMUP:-1}
threads=${THREADS:-2}
python=${PYTHON:-.venv/bin/python}
work=${WORKDIR:-$(mktemp -d)}
[ -n "${WORKDIR:-}" ] || trap 'rm -rf "$work"' EXIT
rm -f "$work/results.jsonl"

cargo build --quiet --release -p twin-ml --example bench_train_step
bin=$(cargo metadata --format-version 1 --no-deps | "$python" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/examples/bench_train_step

[ -f "$work/model/batch.safetensors" ] || "$python" server/twin-ml/bench/train_step_reference.py \
    --save "$work/model" 2>"$work/save.err" || { cat "$work/save.err"; exit 1; }
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') ($(nproc) CPUs), threads $threads, $rounds round(s) x ($warmup warm-up + $steps timed) steps, load average $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq 1 "$rounds"); do
    for ckpt in off on; do
        "$python" server/twin-ml/bench/train_step_reference.py --model "$work/model" --checkpointing "$ckpt" \
            --steps "$steps" --warmup "$warmup" --threads "$threads" 2>"$work/reference.err" \
            | tee -a "$work/results.jsonl" | sed "s/^/round $round transformers, checkpointing $ckpt: /" \
            || { cat "$work/reference.err"; exit 1; }
        "$bin" --model "$work/model" --checkpointing "$ckpt" --steps "$steps" --warmup "$warmup" \
            --threads "$threads" | tee "$work/ours.log" | grep -v '^RESULT' | sed "s/^/round $round twin-ml, checkpointing $ckpt: /"
        grep '^RESULT ' "$work/ours.log" | sed 's/^RESULT //' >>"$work/results.jsonl"
    done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

"$python" - "$work/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
def pick(impl, ckpt):
    return [r for r in rows if r["impl"] == impl and r["checkpointing"] == ckpt]
print(f"\n{'checkpointing':<14}{'transformers s/step':>20}{'twin-ml s/step':>16}{'theirs/ours':>13}"
      f"{'transformers peak MiB':>23}{'twin-ml peak MiB':>18}{'grad norm (theirs, ours)':>34}")
for ckpt in (False, True):
    t, o = pick("pytorch", ckpt), pick("twin-ml", ckpt)
    ts = statistics.median(x for r in t for x in r["step_s_all"])
    os_ = statistics.median(x for r in o for x in r["step_s_all"])
    tm = statistics.median(r["peak_rss_mib"] for r in t)
    om = statistics.median(r["peak_rss_mib"] for r in o)
    norms = f'{t[0]["first_step"]["grad_norm"]:.7g}, {o[0]["first_step"]["grad_norm"]:.7g}'
    print(f"{'on' if ckpt else 'off':<14}{ts:>20.2f}{os_:>16.2f}{ts / os_:>13.2f}{tm:>23.0f}{om:>18.0f}{norms:>34}")
setup = (statistics.median(r["setup_rss_mib"] for r in rows if r["impl"] == "pytorch"),
         statistics.median(r["setup_rss_mib"] for r in rows if r["impl"] == "twin-ml"))
print(f"resident after loading, before the first step (MiB): transformers {setup[0]:.0f}, twin-ml {setup[1]:.0f}")
PY
