#!/usr/bin/env bash
# Seconds per GRPO step by phase (rollout, reward, reference log-probs, update, whole step), twin's
# trainer (`Trainer::step`, server/twin-stage-train/examples/bench_grpo_step.rs) against PyTorch +
# transformers (`model.generate` + the same step in torch, server/twin-ml/bench/grpo_step_reference.py)
# on the same random Qwen2.5-VL checkpoint (the rollout benchmark's small shape unless PRESET=tiny),
# the same TWIN pair prompts over the same images, the same group, response length, micro-batch and
# thread count. The reference saves the checkpoint and prompts once; each round then runs the
# reference and ours one after the other, each in a process of its own, alternating which goes
# first, so slow spells of a shared machine fall on both. The summary gives per-phase medians over
# every timed step of every round and the ratio ours / PyTorch (below 1.0: we are faster).
#
#   deploy/bench-grpo.sh                              # 3 rounds, 1 warm-up + 2 timed steps each
#   ROUNDS=3 STEPS=2 THREADS=2 PROMPTS=4 GROUP=4 NEW_TOKENS=32 MICRO=8 IMAGE_SIDE=224 deploy/bench-grpo.sh
#
# Needs deploy/setup-ml.sh's .venv. Builds the example in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-3}
steps=${STEPS:-2}
warmup=${WARMUP:-1}
threads=${THREADS:-2}
prompts=${PROMPTS:-4}
group=${GROUP:-4}
new_tokens=${NEW_TOKENS:-32}
micro=${MICRO:-8}
image_side=${IMAGE_SIDE:-224}
preset=${PRESET:-small}
python=${PYTHON:-.venv/bin/python}
work=${WORKDIR:-$(mktemp -d)}
[ -n "${WORKDIR:-}" ] || trap 'rm -rf "$work"' EXIT
mkdir -p "$work"
rm -f "$work/results.jsonl"

cargo build --quiet --release -p twin-stage-train --example bench_grpo_step
bin=$(cargo metadata --format-version 1 --no-deps | "$python" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/examples/bench_grpo_step

[ -f "$work/model/prompts.json" ] || "$python" server/twin-ml/bench/grpo_step_reference.py --save "$work/model" \
    --preset "$preset" --prompts "$prompts" --image-side "$image_side" 2>"$work/save.err" || { cat "$work/save.err"; exit 1; }
common=(--model "$work/model" --steps "$steps" --warmup "$warmup" --group "$group" --new-tokens "$new_tokens"
    --micro "$micro" --threads "$threads")
echo "command: ROUNDS=$rounds STEPS=$steps WARMUP=$warmup THREADS=$threads PROMPTS=$prompts GROUP=$group NEW_TOKENS=$new_tokens MICRO=$micro IMAGE_SIDE=$image_side PRESET=$preset deploy/bench-grpo.sh"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') ($(nproc) CPUs), threads $threads, $rounds round(s) x ($warmup warm-up + $steps timed) steps, load average $(cut -d' ' -f1-3 /proc/loadavg)"

reference() {
    "$python" server/twin-ml/bench/grpo_step_reference.py "${common[@]}" 2>"$work/reference.err" \
        | tee -a "$work/results.jsonl" | sed "s/^/round $1 pytorch: /" || { cat "$work/reference.err"; exit 1; }
}
ours() {
    "$bin" "${common[@]}" | tee "$work/ours.log" | grep -v '^RESULT' | sed "s/^/round $1 twin: /"
    grep '^RESULT ' "$work/ours.log" | sed 's/^RESULT //' >>"$work/results.jsonl"
}
for round in $(seq 1 "$rounds"); do
    if [ $((round % 2)) -eq 1 ]; then reference "$round"; ours "$round"; else ours "$round"; reference "$round"; fi
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

"$python" - "$work/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
names = {"rollout_s": "rollout", "reward_s": "reward", "logprob_s": "log-probs (reference)",
         "update_s": "update", "step_s": "whole step"}
first = rows[0]
print(f"\n{first['prompts']} prompts x group {first['group']}, {first['prompt_tokens']} prompt tokens, "
      f"at most {first['new_tokens']} new tokens, micro-batches of {first['micro']}, {first['threads']} threads")
tokens = {impl: statistics.median(s["response_tokens"] for r in rows if r["impl"] == impl for s in r["steps"])
          for impl in ("pytorch", "twin")}
print(f"response tokens per step (median): pytorch {tokens['pytorch']:.0f}, twin {tokens['twin']:.0f}")
print(f"\n{'seconds per step':<24}{'pytorch':>10}{'twin':>10}{'twin/pytorch':>14}   per round (twin/pytorch)")
for key, name in names.items():
    med = {impl: statistics.median(x for r in rows if r["impl"] == impl for x in r["all"][key])
           for impl in ("pytorch", "twin")}
    per_round = [o["median"][key] / t["median"][key]
                 for t, o in zip([r for r in rows if r["impl"] == "pytorch"], [r for r in rows if r["impl"] == "twin"])]
    ratio = med["twin"] / med["pytorch"]
    print(f"{name:<24}{med['pytorch']:>10.3f}{med['twin']:>10.3f}{ratio:>14.2f}   "
          + ", ".join(f"{x:.2f}" for x in per_round))
PY
