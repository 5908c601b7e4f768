#!/usr/bin/env bash
# A miniature reproduction of the TWIN recipe on the CPU, end to end through the server: sample
# images → ingest → mine hard negatives (a tiny random CLIP) → review (accept them all) → two
# datasets from the same images and split, one with the mined hard negatives, one with random
# negatives only → a tiny random Qwen2.5-VL, SFT warm start on each (the answer format) → GRPO
# from each warm start with the binary reward → eval of all four models on one eval split →
# a table, and the GRPO runs' curves.
#
# The models are random and tiny (width 32, byte-level tokenizer) and the images generated, so the
# numbers say whether the pipeline runs and what it records, not what the recipe achieves.
#
# Usage: deploy/reproduce.sh [--quick] [RUN_DIR]
#   full (default, < 30 min on 2 cores): writes docs/reproduction/results.md and the curves there
#   --quick (< 3 min on 2 cores; CI): fewer steps and questions, same pipeline; writes to RUN_DIR
#   RUN_DIR (default target/reproduce-full or -quick, inside the ignored target/) is wiped first.
# Exit status: 0 when every job succeeded (whatever the numbers), 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=full
if [ "${1:-}" = --quick ]; then
    mode=quick
    shift
fi
run=${1:-target/reproduce-$mode}
started=$(date +%s)
./deploy/setup-ml.sh
cargo build --workspace --bins --locked --quiet
./deploy/build-modules.sh >/dev/null
bin=target/debug
guest=target/wasm32-wasip2/guest
rm -rf "$run" && mkdir -p "$run/jobs"
data="$run/data"
if [ $mode = full ]; then out=docs/reproduction; else out=$run; fi
mkdir -p "$out"

# The knobs of each mode. Full: SFT until the format is learnt (the loss per token falls towards
# ln 2 / 20.5 ≈ 0.034, the entropy of a yes/no choice spread over the 20.5-token answer: about
# 0.045 after 48 steps at batch 16 and 5e-3 on these ~600-token prompts; at 1e-2 it gets there in
# 30 steps but jumps about, and one run lost the format at its last step), then GRPO with the
# binary reward, the recipe's KL weight (0.01, the default) and learning rate 2e-3. At this scale
# GRPO finds nothing in the images to reward and drifts: text after the answer costs no reward, so
# the stop token wanders, and a run whose answers no longer fit in max_response_tokens earns
# nothing and stays there (in our tries one run of the two did, at 2e-3 with and without the KL
# term and at 1e-3 with it).
sft_learning_rate=0.005
if [ $mode = full ]; then
    sft_batch=16 sft_steps=48 sft_validate_every=8 grpo_batch=8 grpo_group=4 grpo_steps=24
    grpo_validate_every=6 validation_limit=48 eval_limit=56
else
    sft_batch=8 sft_steps=4 sft_validate_every=0 grpo_batch=4 grpo_group=2 grpo_steps=2
    grpo_validate_every=0 validation_limit=8 eval_limit=8
fi
max_tokens=24

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
elapsed() { echo $(($(date +%s) - started)); }
# `json EXPR`: evaluates EXPR over the JSON document on stdin (bound to `d`) and prints it.
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
# `wait_job ID LABEL`: waits for a job and keeps its final state in $run/jobs/LABEL.json; a job that
# does not succeed stops the run (`twin jobs wait` has printed its failure code and error).
wait_job() {
    if ! "$bin/twin" --json jobs wait "$1" >"$run/jobs/$2.json"; then
        echo "reproduce: job $1 ($2) did not succeed; its state: $run/jobs/$2.json, the server's log: $run/server.log" >&2
        exit 1
    fi
}
# `submit ARGS…`: runs `twin --json ARGS…` (a submission) and prints the new job's id.
submit() { "$bin/twin" --json "$@" | json 'd["id"]'; }
# `evaluate MODEL`: submits MODEL's eval on pairs-hard's eval split; prints the job's id.
evaluate() {
    submit eval run --model "$1" --built pairs-hard --max-new-tokens $max_tokens --limit $eval_limit --experiment reproduce
}
declare -A job # run or eval name (sft-hard, eval-grpo-hard, …) → job id
# `quiet CMD…`: runs CMD, showing its output only if it fails.
quiet() { "$@" >"$run/quiet.log" 2>&1 || { cat "$run/quiet.log" >&2; return 1; }; }

step "mode $mode: generate a sample image set (6 categories x 4 instances x 4 views, 112 px)"
"$bin/twin" sample-data "$run/images" --size 112

step "start twin-server (it starts its executor child) on $data"
RUST_LOG=${RUST_LOG:-warn} "$bin/twin-server" serve --data-dir "$data" --listen 127.0.0.1:0 >"$run/server.out" 2>"$run/server.log" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q 'listening on' "$run/server.out" 2>/dev/null && break; sleep 0.1; done
url=$(sed -n 's/^twin-server listening on //p' "$run/server.out")
[ -n "$url" ] || { cat "$run/server.log"; echo "server did not start" >&2; exit 1; }
export TWIN_SERVER=$url
echo "server at $url (log: $run/server.log)"

step "ingest, register the modules and a tiny random CLIP"
"$bin/twin" experiments create reproduce --description "miniature TWIN reproduction ($mode)" >/dev/null
cat >"$run/ingest.toml" <<SPEC
experiment = "reproduce"
[spec]
kind = "ingest"
dataset = "sample"
[spec.source]
dir = "images"
SPEC
wait_job "$(submit submit "$run/ingest.toml")" ingest
for module in binary_match:binary-match distinct_instance:distinct fgvqa_pair:fgvqa-pair fgvqa_multi:fgvqa-multi; do
    quiet "$bin/twin" modules add "$guest/${module%%:*}.wasm" --name "${module#*:}"
done
quiet "$bin/twin-executor" model init-clip "$run/clip" --preset tiny --seed 0
quiet "$bin/twin" models add "$run/clip" --name clip-tiny

step "mine hard negatives (3 neighbours per image from other instances of its category), accept them all"
cat >"$run/mine.toml" <<SPEC
experiment = "reproduce"
[spec]
kind = "mine"
dataset = "sample"
model = "clip-tiny"
k = 3
[[spec.filters]]
module = "distinct"
SPEC
mine=$(submit submit "$run/mine.toml")
wait_job "$mine" mine
json '"%d images, %d candidate pairs, %d kept by the distinct-instance filter" % (d["result"]["images"], d["result"]["pairs"], d["result"]["kept"])' <"$run/jobs/mine.json"
"$bin/twin" review accept "$mine" --by-filter distinct
echo

step "build pairs-hard (the accepted hard negatives) and pairs-random (random negatives only): same seed, same split"
for negatives in hard random; do
    cat >"$run/build-$negatives.toml" <<SPEC
experiment = "reproduce"
[spec]
kind = "build-dataset"
name = "pairs-$negatives"
dataset = "sample"
mines = ["$mine"]
[spec.options]
seed = 7
eval_fraction = 0.25
negatives = "$negatives"
balance = "downsample"
multi_questions = { eval = 8 }
SPEC
    wait_job "$(submit submit "$run/build-$negatives.toml")" "build-$negatives"
    json '"pairs-'$negatives': train %d pairs (%d hard, %d random negatives), eval %d pairs + %d multi" % tuple(d["result"]["counts"].get(k, 0) for k in ("train.pair", "train.pair.hard", "train.pair.random", "eval.pair", "eval.multi"))' <"$run/jobs/build-$negatives.json"
done

step "a tiny random Qwen2.5-VL (width 32, byte-level tokenizer), registered as qwen-tiny"
quiet "$bin/twin-executor" model init-qwen "$run/qwen" --preset tiny --seed 1
quiet "$bin/twin" models add "$run/qwen" --name qwen-tiny

# `train_spec NAME FIELDS`: writes $run/NAME.json, the fields shared by every run plus FIELDS.
train_spec() {
    cat >"$run/$1.json" <<SPEC
{"epochs": 1000, "max_response_tokens": $max_tokens, "validation_limit": $validation_limit, "save_every": 1000000, "register_as": "$1", $2}
SPEC
}
summary='"%s: %d steps in %.0f s, validation reward %.3f -> %.3f (pair accuracy %.1f%% -> %.1f%%)" % (sys.argv[1], d["result"]["steps"], d["result"]["wall_seconds"], d["result"]["initial_validation"]["reward_mean"], d["result"]["final_validation"]["reward_mean"], 100 * d["result"]["initial_validation"]["pair_accuracy"], 100 * d["result"]["final_validation"]["pair_accuracy"])'
# `report NAME`: prints a train job's summary and keeps its curves and last validation's answers.
report() {
    python3 -c "import json,sys; d=json.load(open(sys.argv[2])); print($summary)" "$1" "$run/jobs/$1.json"
    "$bin/twin" --json train curves "$(json 'd["id"]' <"$run/jobs/$1.json")" >"$run/jobs/$1.curves.json"
    "$bin/twin" blobs get "$(json 'd["result"]["final_validation"]["samples"]' <"$run/jobs/$1.json")" -o - >"$run/jobs/$1.validation.jsonl"
}

step "SFT warm start on each dataset: $sft_steps steps of $sft_batch prompts, learning rate $sft_learning_rate"
for negatives in hard random; do
    train_spec "sft-$negatives" "\"objective\": \"sft\", \"dataset\": \"pairs-$negatives\", \"model\": \"qwen-tiny\",
 \"batch_prompts\": $sft_batch, \"group_size\": 1, \"micro_batch\": $sft_batch, \"learning_rate\": $sft_learning_rate,
 \"max_steps\": $sft_steps, \"validate_every\": $sft_validate_every, \"seed\": 1"
    job[sft-$negatives]=$(submit train submit "$run/sft-$negatives.json" --experiment reproduce)
done
for negatives in hard random; do
    wait_job "${job[sft-$negatives]}" "sft-$negatives"
    report "sft-$negatives"
done

step "GRPO from each warm start: $grpo_steps steps of $grpo_batch prompts x $grpo_group samples, binary reward, learning rate 2e-3, KL 0.01"
for negatives in hard random; do
    train_spec "grpo-$negatives" "\"objective\": \"grpo\", \"dataset\": \"pairs-$negatives\", \"model\": \"sft-$negatives\",
 \"batch_prompts\": $grpo_batch, \"group_size\": $grpo_group, \"micro_batch\": $((grpo_batch * grpo_group)),
 \"learning_rate\": 0.002, \"temperature\": 1.0, \"max_steps\": $grpo_steps, \"validate_every\": $grpo_validate_every, \"seed\": 2"
    job[grpo-$negatives]=$(submit train submit "$run/grpo-$negatives.json" --experiment reproduce)
done
# The warm starts' evals queue behind the GRPO runs.
for model in sft-hard sft-random; do
    job[eval-$model]=$(evaluate $model)
done
for negatives in hard random; do
    wait_job "${job[grpo-$negatives]}" "grpo-$negatives"
    report "grpo-$negatives"
    "$bin/twin" train curves "${job[grpo-$negatives]}" --out "$out/grpo-$negatives.png" >/dev/null
    # Committed charts go in as 64-colour palettes (a sixth of the size), where Pillow is at hand.
    if [ $mode = full ] && .venv/bin/python -c 'import PIL' 2>/dev/null; then
        .venv/bin/python -c 'import sys; from PIL import Image; Image.open(sys.argv[1]).quantize(64, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(sys.argv[1], optimize=True)' "$out/grpo-$negatives.png"
    fi
done

step "eval: every model answers pairs-hard's eval split (the FGVQA prompt and scorers)"
for model in grpo-hard grpo-random; do
    job[eval-$model]=$(evaluate $model)
done
for model in sft-hard sft-random grpo-hard grpo-random; do
    wait_job "${job[eval-$model]}" "eval-$model"
    "$bin/twin" --json eval samples "${job[eval-$model]}" --limit 100000 >"$run/jobs/eval-$model.samples.jsonl"
done
"$bin/twin" eval compare "${job[eval-sft-hard]}" "${job[eval-grpo-hard]}" "${job[eval-sft-random]}" "${job[eval-grpo-random]}"

step "results"
took=$(elapsed)
python3 - "$run" "$mode" "$took" "$out/results.md" <<'PY'
import json, os, platform, re, subprocess, sys

run, mode, took, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
load = lambda name: json.load(open(f"{run}/jobs/{name}.json"))

def samples(model):
    return [json.loads(l) for l in open(f"{run}/jobs/eval-{model}.samples.jsonl") if l.strip()]

def pct(v):
    return "-" if v is None else f"{100 * v:.1f}%"

def validation(name):
    r = load(name)["result"]
    return r["initial_validation"], r["final_validation"]

rows = []
for negatives in ("hard", "random"):
    for stage in ("sft", "grpo"):
        model = f"{stage}-{negatives}"
        e = load(f"eval-{model}")["result"]
        m = next(iter(e["subsets"].values()))
        pairs = [s for s in samples(model) if s["question_type"] == "pair"]
        answered = [s for s in pairs if s["parsed_answer"] in ("yes", "no")]
        yes = sum(s["parsed_answer"] == "yes" for s in pairs)
        first, last = validation(model)
        rows.append([
            negatives,
            "baseline (SFT)" if stage == "sft" else "+GRPO",
            pct(m["pairwise_total"]),
            pct(m["multiple_choice_total"]),
            pct(m["overall_total"]),
            f"{len(answered)}/{len(pairs)}",
            f"{yes}/{len(pairs)}",
            f"{first['reward_mean']:.3f} → {last['reward_mean']:.3f}",
        ])

header = ["negatives", "model", "pair acc.", "multi acc.", "overall",
          "yes/no answers", "said yes", "validation reward (run's first → last)"]
lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
lines += ["| " + " | ".join(r) + " |" for r in rows]
table = "\n".join(lines)

e = load("eval-sft-hard")["result"]
m = next(iter(e["subsets"].values()))
def twin_answer(completion):
    """The last <answer>…</answer>, lower-cased and stripped (near enough the reward's reading)."""
    found = re.findall(r"<answer>(.*?)</answer>", completion, re.S)
    return found[-1].strip().lower() if found else None

def train_line(name):
    r = load(name)["result"]
    c = json.load(open(f"{run}/jobs/{name}.curves.json"))["steps"]
    loss = [s["metrics"]["policy_loss"] for s in c]
    reward = [s["metrics"]["reward_mean"] for s in c]
    spec = load(name)["submission"]["spec"]
    shape = f"{spec['batch_prompts']} prompts" + (
        f" × {spec['group_size']} samples, KL weight {spec['kl_coef']}" if name.startswith("grpo") else "")
    parts = [f"`{name}` (on pairs-{name.split('-')[1]}, from `{spec['model']}`): {r['steps']} steps of "
             f"{shape}, learning rate {spec['learning_rate']}, {r['wall_seconds']:.0f} s"]
    if name.startswith("sft"):
        parts.append(f"loss {loss[0]:.3f} → {loss[-1]:.4f} a token")
    else:
        parts.append(f"rollout reward {reward[0]:.3f} → {reward[-1]:.3f}, "
                     f"groups all equal in the last step {100 * c[-1]['metrics']['all_equal_fraction']:.0f}%")
    answers = [json.loads(l) for l in open(f"{run}/jobs/{name}.validation.jsonl") if l.strip()]
    said = lambda word: sum(twin_answer(a["completion"]) == word for a in answers)
    parts.append(f"last validation: {said('yes')} yes, {said('no')} no, "
                 f"{len(answers) - said('yes') - said('no')} other of {len(answers)}")
    return "; ".join(parts)

def completions(model):
    counts = {}
    for s in samples(model):
        if s["question_type"] == "pair":
            counts[s["completion"]] = counts.get(s["completion"], 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:2]
    # In code spans: a completion like "</ans" would read as HTML in Markdown.
    return ", ".join("`%s` ×%d" % (json.dumps(c).replace("`", "\\u0060"), n) for c, n in top)

cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
loadavg = open("/proc/loadavg").read().split()[:3]
text = f"""# Miniature TWIN reproduction ({mode})

`deploy/reproduce.sh{' --quick' if mode == 'quick' else ''}` (working tree at commit {commit}): {took} s wall on
{os.cpu_count()} cores ({cpu}), load average at the end {' '.join(loadavg)}.

Every model answers the same {m['pair_count']} pair and {m['multi_count']} multi questions (pairs-hard's
eval split, the FGVQA prompt and scorers, greedy, {e['questions']} questions). "validation reward" is
the train job's own validation (its dataset's eval split, the training prompt, the binary reward),
before its first step and after its last.

{table}

{chr(10).join('- ' + train_line(n) for n in ('sft-hard', 'sft-random', 'grpo-hard', 'grpo-random'))}

The commonest completions to the eval's pair questions:

{chr(10).join(f'- `{n}`: ' + completions(n) for n in ('sft-hard', 'sft-random', 'grpo-hard', 'grpo-random'))}
"""
open(out, "w").write(text)
print(text)
PY

step "stop the server (SIGTERM) and audit its log offline"
kill -TERM $server && wait $server || true
trap - EXIT
"$bin/twin" replay --data-dir "$data" --verify | sed -n 1,4p
echo "reproduce ($mode) took $(elapsed) s; table: $out/results.md; curves: $out/grpo-hard.png, $out/grpo-random.png"
