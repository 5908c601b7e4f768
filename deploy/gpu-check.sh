#!/usr/bin/env bash
# Every GPU check and figure in one run (ARCHITECTURE.md, "On the GPU"): parity on CUDA, the
# CUDA-graph equality test, Qwen2.5-VL rollouts at the 3B shape against transformers with and
# without CUDA graphs, CLIP at batch 512, and a GRPO step at the 3B shape, in that order of
# priority, each under a time cap, all within a deadline (6 minutes by default).
#
#   deploy/gpu-check.sh build              # here, no GPU needed: release binaries, stripped,
#                                          # into gpu-bin/ (at most 64 MiB in all)
#   deploy/gpu-check.sh run OUT            # on the GPU machine, from the repository root
#   deploy/gpu-check.sh run OUT --cpu-smoke  # here: every part at toy sizes on the CPU, which
#                                          # checks the plumbing before GPU time is spent on it
#   deploy/gpu-check.sh summary OUT        # OUT/summary.md again from OUT/results.jsonl
#
# gpu-bin/ is git-ignored: copy it to the GPU machine beside the checkout (or name it where a
# remote-run tool takes extra paths), then `deploy/gpu-check.sh run OUT` there, in one call. With
# WORK_DIR set, a second call on the same machine can finish what the deadline cut, reusing the
# fixtures and the 3B checkpoint: `PARTS="clip train" WORK_DIR=… deploy/gpu-check.sh run OUT`.
#
# The GPU machine runs the binaries against its own libtorch (python3's torch, the same 2.11 the
# project links), makes fixtures and reference runs with its own transformers through the
# in-repository scripts, and needs nothing else. Results are appended to OUT/results.jsonl the
# moment each is measured (one JSON object per line: part, status, what was measured), so a run
# cut short still reports what it finished; OUT/log.txt has every part's output and
# OUT/summary.md the tables BENCHMARKS.md takes. Environment: PYTHON (python3; .venv/bin/python
# with --cpu-smoke), DEADLINE_S (360), BIN_DIR (gpu-bin), PARTS (a subset of "env parity graphs
# rollouts clip train"), WORK_DIR (kept, so a second run on the same machine reuses fixtures and
# checkpoints; a fresh temporary directory, removed at the end, by default), TRAIN_ARGS (added to
# both sides of the training step, e.g. "--train-vision off" where the 3B step does not fit).
set -uo pipefail
cd "$(dirname "$0")/.."
script="$PWD/deploy/gpu-check.sh"
bin_dir=${BIN_DIR:-$PWD/gpu-bin}
# Carried to the GPU machine beside the repository (the device tool's limit is 64 MiB in all).
max_carry_mib=56

die() {
    echo "gpu-check: $*" >&2
    exit 2
}

# --- build: here --------------------------------------------------------------------------------
build() {
    local examples=(bench_qwen bench_clip bench_train_step gpu_parity)
    local args=()
    for e in "${examples[@]}"; do args+=(--example "$e"); done
    cargo build --release --locked -p twin-ml "${args[@]}" || die "building the examples failed"
    # The rollout engine's tests, with the CUDA-graph equality test that skips without a GPU.
    local qwen_test
    qwen_test=$(cargo test --release --locked -p twin-ml --test qwen --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "qwen" and m.get("executable"):
        print(m["executable"])') || die "building the qwen tests failed"
    [ -n "$qwen_test" ] || die "no qwen test executable was built"
    local target
    target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
    rm -rf "$bin_dir"
    mkdir -p "$bin_dir"
    for e in "${examples[@]}"; do
        strip -o "$bin_dir/$e" "$target/release/examples/$e"
    done
    strip -o "$bin_dir/qwen_tests" "$qwen_test"
    local mib
    mib=$(du -sm "$bin_dir" | cut -f1)
    echo "gpu-check: $(ls "$bin_dir" | wc -l) binaries in $bin_dir, $mib MiB"
    ((mib <= max_carry_mib)) || die "$bin_dir is $mib MiB, over the $max_carry_mib MiB the GPU machine takes"
    git rev-parse HEAD >"$bin_dir/COMMIT"
}

# --- run: the GPU machine (or the CPU, --cpu-smoke) ---------------------------------------------
# Appends one JSON object to results.jsonl: part, status, then the key/value pairs given (values
# are JSON already).
record() {
    local part=$1 status=$2
    shift 2
    local fields=""
    while (($#)); do
        fields+=", \"$1\": $2"
        shift 2
    done
    echo "{\"part\": \"$part\", \"status\": \"$status\"$fields}" >>"$out/results.jsonl"
}

# Runs a program, tees its output into the log, and records each result line it prints at once,
# tagged with the part and side: `RESULT {json}`, or qwen_reference.py's `{"kind": "result", …}`
# (deploy/bench-qwen.sh reads that form).
measure() {
    local part=$1 side=$2
    shift 2
    echo "+ $*" >>"$out/log.txt"
    set -o pipefail
    "$@" 2>&1 | tee -a "$out/log.txt" | while IFS= read -r line; do
        case $line in
        RESULT\ *) record "$part" measured side "\"$side\"" result "${line#RESULT }" ;;
        '{"kind": "result"'*) record "$part" measured side "\"$side\"" result "$line" ;;
        esac
    done
}

json_string() {
    python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"
}

part_env() {
    local name smi="" bw=null
    if command -v nvidia-smi >/dev/null; then
        smi=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)
    fi
    name=${smi%%,*}
    # Peak memory bandwidth by model (NVIDIA's data sheets), for the decode roofline.
    case $name in
    *H200*) bw=4.8 ;;
    *H100*NVL*) bw=3.9 ;;
    *H100*PCIe*) bw=2.0 ;;
    *H100*) bw=3.35 ;;
    esac
    echo "$bw" >"$work/peak_bandwidth"
    local torch
    torch=$("$python" -c 'import torch, transformers, platform; print(torch.__version__, transformers.__version__, platform.python_version())')
    record env ok device "$(json_string "${smi:-cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')}")" \
        peak_bandwidth_tb_s "$bw" torch_transformers_python "$(json_string "$torch")" \
        commit "$(json_string "$(cat "$bin_dir/COMMIT" 2>/dev/null || echo unknown)")"
}

part_parity() {
    local device=cuda
    ((smoke)) && device=cpu
    # The committed CLIP fixtures, the Qwen ones made afresh (f32, on the CPU as in CI), and
    # every fixture again in bf16 on this device by transformers.
    "$python" tests/fixtures/make_parity_fixtures.py --only qwen "$work/parity-f32" >>"$out/log.txt" 2>&1 ||
        return 1
    "$python" tests/fixtures/make_parity_fixtures.py --device "$device" --dtype bfloat16 "$work/parity-bf16" \
        >>"$out/log.txt" 2>&1 || return 1
    measure parity twin-ml "$bin_dir/gpu_parity" --device "$device" \
        --fixtures tests/fixtures/parity --fixtures "$work/parity-f32" \
        --bf16-fixtures "$work/parity-bf16" --out "$work/parity.json"
    local rc=$?
    [ -f "$work/parity.json" ] && record parity report report \
        "$(python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))))' "$work/parity.json")"
    return $rc
}

part_graphs() {
    # The engine's CUDA-graph test: graph replays equal the fixed-shape step bit for bit (f32
    # and bf16), and equal eager decoding in f32 up to near ties. Skips itself without CUDA.
    measure graphs test "$bin_dir/qwen_tests" --exact on_a_gpu_cuda_graphs_replay_the_fixed_shape_step_exactly \
        --nocapture --test-threads 1
}

part_rollouts() {
    local preset=3b device=cuda dtype=bf16 batches=(8 32) tokens=128 repeats=1
    if ((smoke)); then
        preset=small device=cpu dtype=f32 batches=(2 4) tokens=4 repeats=1
    fi
    local bw
    bw=$(cat "$work/peak_bandwidth")
    # transformers builds the random model on the device, saves it for our side, then times
    # `generate` on it in the same process (one build, no reload).
    measure rollouts transformers "$python" server/twin-ml/bench/qwen_reference.py --preset "$preset" \
        --save "$work/qwen" --device "$device" --dtype "$dtype" --batch "${batches[@]}" \
        --new-tokens "$tokens" --repeats 1 --warmup 1 || return 1
    local extra=()
    [ "$bw" != null ] && extra=(--peak-bandwidth "$bw")
    measure rollouts twin-ml "$bin_dir/bench_qwen" --model "$work/qwen" --device "$device" \
        --batch "${batches[@]}" --group 5 --new-tokens "$tokens" --repeats "$repeats" --warmup 1 \
        --decode eager graphs "${extra[@]}"
}

part_clip() {
    local device=cuda dtype=bf16 batch=512 reps=3
    if ((smoke)); then
        device=cpu dtype=f32 batch=2 reps=1
    fi
    local arch
    for arch in b32 l14; do
        mkdir -p "$work/clip-$arch"
        measure clip transformers "$python" server/twin-ml/bench/clip_reference.py --workdir "$work/clip-$arch" \
            --arch "$arch" --device "$device" --dtype "$dtype" --batch "$batch" --reps "$reps" \
            --warmup 1 --forward-only || return 1
        measure clip twin-ml "$bin_dir/bench_clip" --workdir "$work/clip-$arch" --arch "$arch" \
            --device "$device" --dtype "$dtype" --batch "$batch" --reps "$reps" --warmup 1 \
            --forward-only || return 1
    done
}

part_train() {
    local preset=3b device=cuda steps=2
    ((smoke)) && preset=small device=cpu steps=1
    # The rollouts part's checkpoint has the same shape: link it rather than build another.
    local reuse=()
    [ -f "$work/qwen/config.json" ] && reuse=(--weights-from "$work/qwen")
    "$python" server/twin-ml/bench/train_step_reference.py --preset "$preset" --device "$device" \
        --save "$work/train" "${reuse[@]}" >>"$out/log.txt" 2>&1 || return 1
    local extra
    read -r -a extra <<<"${TRAIN_ARGS:-}"
    measure train transformers "$python" server/twin-ml/bench/train_step_reference.py --model "$work/train" \
        --device "$device" --checkpointing on --steps "$steps" --warmup 1 "${extra[@]}" || return 1
    measure train twin-ml "$bin_dir/bench_train_step" --model "$work/train" --device "$device" \
        --checkpointing on --steps "$steps" --warmup 1 "${extra[@]}"
}

# Runs one part under `timeout` in a child of this script, recording how it ended.
run_part() {
    local part=$1 cap=$2 min=$3
    if [[ " $parts " != *" $part "* ]]; then
        return
    fi
    # The CPU is far slower than the GPU at the same parts, even at toy sizes.
    ((smoke)) && cap=$((cap * 4)) min=$((min * 4))
    local left=$((deadline - $(date +%s) - 15))
    ((cap > left)) && cap=$left
    if ((cap < min)); then
        record "$part" skipped reason "\"$left s left before the deadline, the part needs $min s\""
        return
    fi
    echo "=== $part (cap $cap s) ===" | tee -a "$out/log.txt"
    local started rc
    started=$(date +%s)
    timeout --kill-after=10 "$cap" "$script" part "$part" "$out" "$work" "$smoke"
    rc=$?
    local status=ok
    ((rc == 124 || rc == 137)) && status=timeout
    ((rc != 0 && rc != 124 && rc != 137)) && status=failed
    record "$part" "$status" seconds "$(($(date +%s) - started))" cap "$cap" exit_code "$rc"
    echo "=== $part: $status in $(($(date +%s) - started)) s ===" | tee -a "$out/log.txt"
}

run() {
    out=${1:?usage: gpu-check.sh run OUT [--cpu-smoke]}
    smoke=0
    [ "${2:-}" = --cpu-smoke ] && smoke=1
    mkdir -p "$out"
    out=$(cd "$out" && pwd)
    [ -x "$bin_dir/bench_qwen" ] || die "no binaries in $bin_dir: run 'deploy/gpu-check.sh build' first"
    rm -f "$out/results.jsonl" "$out/log.txt" "$out/summary.md"
    # WORK_DIR keeps fixtures and checkpoints for a second run on the same (warm) machine, e.g.
    # PARTS="train" after a first run ran out of time.
    work=${WORK_DIR:-}
    if [ -n "$work" ]; then
        mkdir -p "$work"
    else
        work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
    fi
    parts=${PARTS:-env parity graphs rollouts clip train}
    [[ " $parts " == *" env "* ]] || parts="env $parts"
    python=${PYTHON:-python3}
    ((smoke)) && python=${PYTHON:-.venv/bin/python}
    deadline=$(($(date +%s) + ${DEADLINE_S:-360}))
    export python out work smoke bin_dir parts
    if ((!smoke)); then
        # The machine's own libtorch; libtorch_cuda is loaded by name at start-up (device.rs),
        # which TWIN_LOAD_CUDA allows even where /proc has no NVIDIA driver entry (gVisor).
        local tl
        tl=$("$python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')/lib
        export LD_LIBRARY_PATH="$tl${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" TWIN_LOAD_CUDA=1
    fi
    export PYTHONUNBUFFERED=1
    # name, cap (s), least useful time (s): in priority order.
    run_part env 15 5
    run_part parity 60 20
    run_part graphs 30 10
    run_part rollouts 150 60
    run_part clip 75 20
    run_part train 150 60
    record synthesis skipped reason '"DreamBooth synthesis is not built yet"'
    summary "$out"
    [ -n "${WORK_DIR:-}" ] || rm -rf "$work"
}

# --- summary ------------------------------------------------------------------------------------
summary() {
    local dir=${1:?usage: gpu-check.sh summary OUT}
    python3 - "$dir/results.jsonl" >"$dir/summary.md" <<'PY'
import json, sys
from statistics import median

rows = []
for line in open(sys.argv[1]):
    try:
        rows.append(json.loads(line))
    except ValueError:
        rows.append({"part": "?", "status": "unparsed line", "line": line[:200]})
env = next((r for r in rows if r["part"] == "env" and "device" in r), {})
print(f"device: {env.get('device', '?')}; torch/transformers/python {env.get('torch_transformers_python', '?')}; "
      f"commit {env.get('commit', '?')}\n")
print("| part | status | seconds |\n| --- | --- | --- |")
for r in rows:
    if "seconds" in r or r["status"] == "skipped":
        print(f"| {r['part']} | {r['status']} | {r.get('seconds', r.get('reason', ''))} |")
measured = [r for r in rows if r["status"] == "measured"]

def of(part, side):
    return [r["result"] for r in measured if r["part"] == part and r["side"] == side]

ref, ours = of("rollouts", "transformers"), of("rollouts", "twin-ml")
if ref or ours:
    print("\n**Rollouts** (tokens/s, batch counted in sequences)\n")
    print("| batch | transformers | twin-ml decode | path | ms/step | TB/s (% of peak) | twin-ml tokens/s | ours/theirs |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for o in ours:
        t = [r["rollout_tokens_per_s"] for r in ref if r.get("batch") == o["batch"]]
        theirs = median(t) if t else None
        peak = o.get("peak_tb_per_s")
        share = f" ({100 * o['achieved_tb_per_s'] / peak:.0f}%)" if peak else ""
        ratio = f"{o['rollout_tokens_per_s'] / theirs:.1f}x" if theirs else "?"
        print(f"| {o['batch']} | {theirs and round(theirs, 1)} | {o['decode']} | {o['decode_path']} | "
              f"{o['decode_step_ms']:.2f} | {o['achieved_tb_per_s']:.2f}{share} | "
              f"{o['rollout_tokens_per_s']:.1f} | {ratio} |")
for part in ("clip", "train"):
    ref, ours = of(part, "transformers"), of(part, "twin-ml")
    if ref or ours:
        print(f"\n**{part}**\n")
        for side, results in (("transformers", ref), ("twin-ml", ours)):
            for r in results:
                print(f"- {side}: `{json.dumps(r, sort_keys=True)}`")
for part in ("parity", "graphs"):
    lines = [r for r in rows if r["part"] == part and r["status"] in ("report", "measured")]
    for r in lines:
        print(f"\n**{part}**: `{json.dumps(r.get('report', r.get('result')))[:2000]}`")
PY
    cat "$dir/summary.md"
}

case ${1:-} in
build) build ;;
run) shift && run "$@" ;;
summary) shift && summary "$@" ;;
part)
    # Internal: one part, in a child process so that `timeout` can end it with everything it
    # started.
    part=$2 out=$3 work=$4 smoke=$5
    "part_$part"
    ;;
*) die "usage: gpu-check.sh build | run OUT [--cpu-smoke] | summary OUT" ;;
esac
