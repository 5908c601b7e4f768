#!/usr/bin/env bash
# CLIP image path, twin-ml (tch) against transformers, same weights, same input batch, same
# 640x480 images and the same torch thread count on both sides: ViT-B/32 in f32 on the CPU unless
# told otherwise. Each round runs the reference (server/twin-ml/bench/clip_reference.py) and then
# ours (server/twin-ml/examples/bench_clip.rs), one after the other; the summary gives the medians
# over the rounds and the ratios ours / transformers (throughput: above 1.0 means we are faster).
#
#   deploy/bench-clip.sh                      # 3 rounds, 2 threads, batch 8, b32, f32, CPU
#   ROUNDS=5 THREADS=4 BATCH=16 deploy/bench-clip.sh
#   PYTHON=python3 DEVICE=cuda ARCH=l14 BATCH=512 REPS=10 deploy/bench-clip.sh   # on a GPU, bf16
#
# DEVICE (cpu | cuda), DTYPE (auto | f32 | bf16; auto is bf16 on cuda, f32 on the cpu) and ARCH
# (b32 | l14, ViT-L/14) are passed to both sides. On a GPU each side times the forward on a batch
# already on the device in the dtype, between CUDA synchronisations, and reports peak GPU memory
# (NVML and the driver's free memory, both sides alike; PyTorch's allocator peak on its side); the
# preprocessing rows stay CPU work. This script builds ours, so it needs a Rust toolchain there;
# deploy/gpu-check.sh runs prebuilt binaries instead, the forward alone at batch 512
# (--forward-only, as the two programs' headers show).
#
# Needs deploy/setup-ml.sh's .venv (PYTHON overrides it, e.g. a GPU machine's python3). Builds
# the example in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-3}
threads=${THREADS:-2}
batch=${BATCH:-8}
reps=${REPS:-7}
device=${DEVICE:-cpu}
dtype=${DTYPE:-auto}
arch=${ARCH:-b32}
python=${PYTHON:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cargo build --quiet --release -p twin-ml --example bench_clip
bin=$(cargo metadata --format-version 1 --no-deps | "$python" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/examples/bench_clip

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') ($(nproc) CPUs), threads $threads, batch $batch, $reps reps, $rounds rounds, $arch $dtype on $device"
knobs=(--device "$device" --dtype "$dtype" --arch "$arch")
for round in $(seq 1 "$rounds"); do
    "$python" server/twin-ml/bench/clip_reference.py --workdir "$work" --threads "$threads" --batch "$batch" --reps "$reps" \
        "${knobs[@]}" >"$work/reference.log" 2>&1 || { cat "$work/reference.log"; exit 1; }
    grep '^RESULT ' "$work/reference.log" | sed 's/^RESULT //' >>"$work/reference.jsonl"
    "$bin" --workdir "$work" --threads "$threads" --batch "$batch" --reps "$reps" "${knobs[@]}" | tee "$work/ours.log" | grep -E '^(parity|forward|preprocess)' | sed "s/^/round $round ours: /"
    grep '^RESULT ' "$work/ours.log" | sed 's/^RESULT //' >>"$work/ours.jsonl"
done

"$python" - "$work/reference.jsonl" "$work/ours.jsonl" <<'EOF'
import json, statistics, sys
ref = [json.loads(l) for l in open(sys.argv[1])]
ours = [json.loads(l) for l in open(sys.argv[2])]
def med(rows, key): return statistics.median(r[key] for r in rows)
print(f"\n{'':28}{'transformers':>14}{'twin-ml':>12}{'ours/theirs':>13}")
# Ours has two forward paths: image_features (what callers use: the last layer computes the
# class token only) and vision_forward (every output, the like-for-like comparison).
for label, ref_key, our_key in [("forward ms, image_features", "forward_ms_median", "forward_ms_median"),
                                ("forward ms, full forward", "forward_ms_median", "full_forward_ms_median")]:
    r, o = med(ref, ref_key), med(ours, our_key)
    print(f"{label:28}{r:>14.1f}{o:>12.1f}{r / o:>12.2f}x")
r, o = med(ref, "preprocess_images_per_s"), med(ours, "preprocess_images_per_s")
print(f"{'preprocess images/s':28}{r:>14.1f}{o:>12.1f}{o / r:>12.2f}x")
print("(ratios are throughput ratios ours/transformers: above 1.0 means twin-ml is faster)")
for i, (r, o) in enumerate(zip(ref, ours), 1):
    print(f"round {i}: forward {r['forward_ms_median']:.1f} ms vs {o['forward_ms_median']:.1f} "
          f"({r['forward_ms_median'] / o['forward_ms_median']:.2f}x) / full {o['full_forward_ms_median']:.1f} "
          f"({r['forward_ms_median'] / o['full_forward_ms_median']:.2f}x), preprocess "
          f"{r['preprocess_images_per_s']:.1f} vs {o['preprocess_images_per_s']:.1f} images/s "
          f"({o['preprocess_images_per_s'] / r['preprocess_images_per_s']:.2f}x), parity {o.get('parity')}")
print(f"torch {ref[0]['torch']}, transformers {ref[0]['transformers']}, threads {ref[0]['threads']} / {ours[0]['threads']}")
print(f"{ref[0]['arch']} {ref[0]['dtype']} on {ref[0]['device_name']}; parity is max |diff| of the embeddings, raw and L2-normalised")
if ref[0]["device"] == "cuda":
    print(f"peak GPU memory of the process (NVML, MiB): transformers {med(ref, 'gpu_process_peak_mib') if ref[0].get('gpu_process_peak_mib') is not None else 'n/a'}, "
          f"twin-ml {med(ours, 'gpu_process_peak_mib') if ours[0].get('gpu_process_peak_mib') is not None else 'n/a'}; "
          f"torch.cuda.max_memory_allocated {med(ref, 'peak_gpu_allocated_mib'):.0f}")
EOF
