#!/usr/bin/env bash
# Fuzzes the code that reads untrusted bytes (ARCHITECTURE.md, "Fuzzing"): the log's record
# decoder, the job spec parser, modules' output checks and the safetensors header reader. Each
# target starts from its committed corpus (fuzz/corpus/<target>/) and runs TWIN_FUZZ_SECONDS
# (default 30) seconds; a crash fails the script, its input left in fuzz/artifacts/<target>/.
# cargo-fuzz needs a nightly toolchain: where rustup has none the script skips (it never
# downloads one); cargo-fuzz itself is installed at a pinned version when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${TWIN_FUZZ_SECONDS:-30}
if ! [[ $seconds =~ ^[0-9]+$ ]] || ((seconds < 1)); then
    echo "fuzz: TWIN_FUZZ_SECONDS must be a whole number of seconds, got '$seconds'" >&2
    exit 2
fi
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "fuzz: skipped: no nightly toolchain in 'rustup toolchain list' (cargo-fuzz needs one;" \
        "this script does not download it)"
    exit 0
fi
cargo_fuzz_version=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -qx "cargo-fuzz $cargo_fuzz_version"; then
    cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked
fi

targets=(record job_spec module_output safetensors_header)
# One build of every target (address sanitizer, debug assertions and overflow checks on).
cargo +nightly fuzz build --fuzz-dir fuzz
# New inputs go to a scratch directory named first, so the committed corpus stays as it is.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# Targets run side by side, one per core (libFuzzer uses one): CI's two cores fuzz two at once.
run_target() {
    local target=$1 started rc=0
    started=$(date +%s)
    mkdir -p "$scratch/$target"
    # -timeout: an input that takes 10 s is a hang, reported as a crash; libFuzzer's memory
    # limit (2 GB, also per allocation) turns a huge allocation into one too.
    cargo +nightly fuzz run --fuzz-dir fuzz "$target" "$scratch/$target" "fuzz/corpus/$target" \
        -- -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$scratch/$target.log" 2>&1 || rc=$?
    echo "$rc $(($(date +%s) - started))" >"$scratch/$target.status"
}
parallel=$(nproc)
for target in "${targets[@]}"; do
    while (($(jobs -rp | wc -l) >= parallel)); do
        wait -n || true
    done
    run_target "$target" &
done
wait
crashed=()
for target in "${targets[@]}"; do
    read -r rc took <"$scratch/$target.status"
    if ((rc == 0)); then
        runs=$(grep -E '^stat::number_of_executed_units' "$scratch/$target.log" | awk '{print $2}')
        echo "fuzz: $target: no crash in $took s ($runs runs)"
    else
        # What went wrong (a panic's message, a sanitizer's report) sits above a long backtrace.
        grep -E -A 2 "panicked at|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)" \
            "$scratch/$target.log" | head -n 12 || true
        tail -n 25 "$scratch/$target.log"
        artifact=$(ls -t "fuzz/artifacts/$target"/* 2>/dev/null | head -n 1 || true)
        echo "fuzz: $target CRASHED; input: ${artifact:-(none written: see the log above)}" >&2
        echo "fuzz: reproduce with: cargo +nightly fuzz run --fuzz-dir fuzz $target $artifact" >&2
        crashed+=("$target")
    fi
done
if ((${#crashed[@]})); then
    echo "fuzz: crashes in: ${crashed[*]}" >&2
    exit 1
fi
