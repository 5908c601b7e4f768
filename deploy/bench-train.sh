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
# DEVICE (cpu | cuda) and DTYPE (auto | f32 | bf16: bf16 compute with f32 master weights, the
# recipe's mixed precision; auto is bf16 on cuda, f32 on the cpu) are passed to both sides,
# PRESET (small | 3b) to the reference's --save, with SAVE_ARGS for its batch shape (3b's default:
# 8 sequences of 2 images, 600 prompt + 128 response tokens), MICRO to all three. On a GPU, at the
# Qwen2.5-VL-3B shape (a ~7.5 GB bf16 checkpoint; without checkpointing the activations would
# hardly fit beside ~70 GiB of weights, gradients and optimizer state, so CHECKPOINTING=on runs
# that setting alone):
#
#   PYTHON=python3 DEVICE=cuda PRESET=3b CHECKPOINTING=on deploy/bench-train.sh
#
# Each side then also reports training tokens/s (sequences x (prompt + response tokens) / step
# seconds) and peak GPU memory (NVML and the driver's free memory, both sides alike; PyTorch's
# allocator peak on its side). This script builds ours, so it needs a Rust toolchain there;
# deploy/gpu-check.sh runs prebuilt binaries instead.
#
# Needs deploy/setup-ml.sh's .venv and, for verl's own loss code, deploy/setup-verl.sh's verl (the
# reference falls back to an inline copy of the same formulas without it). Builds the example in
# release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-1}
steps=${STEPS:-2}
warmup=${WARMUP:-1}
threads=${THREADS:-2}
device=${DEVICE:-cpu}
dtype=${DTYPE:-auto}
preset=${PRESET:-small}
micro=${MICRO:-4}
read -r -a ckpts <<<"${CHECKPOINTING:-off on}"
read -r -a save_args <<<"${SAVE_ARGS:-}"
python=${PYTHON:-.venv/bin/python}
work=${WORKDIR:-$(mktemp -d)}
[ -n "${WORKDIR:-}" ] || trap 'rm -rf "$work"' EXIT
rm -f "$work/results.jsonl"

cargo build --quiet --release -p twin-ml --example bench_train_step
bin=$(cargo metadata --format-version 1 --no-deps | "$python" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/examples/bench_train_step

[ -f "$work/model/batch.safetensors" ] || "$python" server/twin-ml/bench/train_step_reference.py \
    --save "$work/model" --preset "$preset" --device "$device" --micro "$micro" "${save_args[@]}" \
    2>"$work/save.err" || { cat "$work/save.err"; exit 1; }
knobs=(--device "$device" --dtype "$dtype" --micro "$micro")
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') ($(nproc) CPUs), threads $threads, $rounds round(s) x ($warmup warm-up + $steps timed) steps, $preset $dtype on $device, load average $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq 1 "$rounds"); do
    for ckpt in "${ckpts[@]}"; do
        "$python" server/twin-ml/bench/train_step_reference.py --model "$work/model" --checkpointing "$ckpt" \
            --steps "$steps" --warmup "$warmup" --threads "$threads" "${knobs[@]}" 2>"$work/reference.err" \
            | sed -n 's/^RESULT //p' | tee -a "$work/results.jsonl" \
            | sed "s/^/round $round transformers, checkpointing $ckpt: /" || { cat "$work/reference.err"; exit 1; }
        "$bin" --model "$work/model" --checkpointing "$ckpt" --steps "$steps" --warmup "$warmup" \
            --threads "$threads" "${knobs[@]}" | tee "$work/ours.log" | grep -v '^RESULT' | sed "s/^/round $round twin-ml, checkpointing $ckpt: /"
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
for ckpt in sorted({r["checkpointing"] for r in rows}):
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
for r in rows:
    gpu = (f", GPU peak {r['gpu_process_peak_mib']:.0f} MiB (NVML)" if r.get("gpu_process_peak_mib") is not None
           else "")
    print(f"{r['impl']:>8} {r['device']} {r['dtype']}, checkpointing {'on' if r['checkpointing'] else 'off'}: "
          f"{r['tokens_per_step']} tokens/step, {r['tokens_per_s']:.1f} training tokens/s{gpu}")
PY
