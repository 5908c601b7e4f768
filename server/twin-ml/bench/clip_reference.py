#!/usr/bin/env python3
r"""transformers' side of the CLIP benchmark (deploy/bench-clip.sh runs both sides).

Builds a random CLIPVisionModelWithProjection (seeded, in f32 on the CPU): `--arch b32` (the
default, ViT-B/32: hidden 768, 12 layers, 12 heads, MLP 3072, patch 32, projection 512) or
`--arch l14` (ViT-L/14: hidden 1024, 24 layers, 16 heads, MLP 4096, patch 14, projection 768),
224-pixel images. It saves it with its processor to WORKDIR/model (once; a model of another arch
there is replaced), together with the benchmark's input batch, 640x480 test images and the
reference outputs for them (WORKDIR/reference.safetensors), so the Rust side
(examples/bench_clip.rs) runs the same weights on the same input and checks it gets the same
answer. Then times, on `--device` (cpu, the default, or cuda) in `--dtype` (f32 or bf16, the
f32 weights cast once; the default, auto, is bf16 on cuda and f32 on the cpu) with the given
torch thread count:

- forward: CLIPVisionModelWithProjection(pixel_values) on one [batch, 3, 224, 224] tensor already
  on the device in the dtype, median of --reps runs after --warmup runs, under
  torch.inference_mode(), with torch.cuda.synchronize() before the clock starts and before it
  stops on CUDA; images/s = batch / median seconds;
- preprocessing (not with --forward-only): the slow (PIL) CLIPImageProcessorPil on the decoded
  640x480 images, all of them per call (one batch, return_tensors="pt"), --preprocess-rounds
  calls, images/s.

image_embeds of the batch, computed in the dtype on the device, are saved (as f32) for the Rust
side's parity check. On CUDA the RESULT also has peak GPU memory (bench/gpu_memory.py: NVML's
sampled process peak and the device memory in use at the end, measured as ours are, and
torch.cuda.max_memory_allocated / max_memory_reserved).

Prints one line `RESULT {json}`. GPU example (ViT-L/14, batch 512, bf16, forward only):

    python3 server/twin-ml/bench/clip_reference.py --workdir W --device cuda --dtype bf16 \
        --arch l14 --batch 512 --forward-only --reps 10 --warmup 3
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import transformers
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

import gpu_memory

# transformers' CLIPVisionConfig defaults are ViT-B/32 (768 wide, 12 layers, 224 / 32, projection
# 512); ViT-L/14 is openai/clip-vit-large-patch14's image tower.
ARCHS = {
    "b32": {},
    "l14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                patch_size=14, projection_dim=768),
}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def test_images(rng, count):
    """Photo-like 640x480 RGB images: smooth colour fields, noise and edges."""
    y, x = np.mgrid[0:480, 0:640].astype(np.float32)
    images = []
    for _ in range(count):
        chans = [127 + 100 * np.sin(rng.uniform(0.005, 0.05) * x + rng.uniform(0.005, 0.05) * y + rng.uniform(0, 6)) for _ in range(3)]
        img = np.stack(chans, -1) + rng.normal(0, 12, size=(480, 640, 3))
        images.append(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB"))
    return images


def saved_matches(model_dir, config):
    """Whether model_dir holds a model of this shape (a workdir reused for another arch does not)."""
    if not (model_dir / "model.safetensors").exists():
        return False
    saved = json.loads((model_dir / "config.json").read_text())
    keys = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
            "image_size", "projection_dim"]
    return all(saved.get(k) == getattr(config, k) for k in keys)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--images", type=int, default=8, help="distinct 640x480 test images")
    p.add_argument("--preprocess-rounds", type=int, default=8, help="passes over the test images")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                   help="auto: bf16 on cuda, f32 on the cpu (what twin-ml's ClipModel::load picks)")
    p.add_argument("--arch", choices=sorted(ARCHS), default="b32")
    p.add_argument("--forward-only", action="store_true",
                   help="time the forward pass only: no test images, no preprocessing")
    args = p.parse_args()
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device == "cuda" else "f32"

    sampler = gpu_memory.start(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model_dir = args.workdir / "model"
    config = CLIPVisionConfig(**ARCHS[args.arch])
    processor = CLIPImageProcessorPil()  # shortest edge 224, crop 224, bicubic
    if not saved_matches(model_dir, config):
        model = CLIPVisionModelWithProjection(config)
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
    else:
        model = CLIPVisionModelWithProjection.from_pretrained(model_dir)
    model = model.to(device=device, dtype=dtype).eval()

    g = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(args.batch, 3, config.image_size, config.image_size, generator=g)
    # The forward is timed on pixels already on the device in the model's dtype.
    model_pixels = pixel_values.to(device=device, dtype=dtype)

    with torch.inference_mode():
        embeds = model(pixel_values=model_pixels).image_embeds.float().cpu()
        for _ in range(args.warmup):
            model(pixel_values=model_pixels)
        times = []
        for _ in range(args.reps):
            synchronize(device)
            start = time.perf_counter()
            model(pixel_values=model_pixels)
            synchronize(device)
            times.append(time.perf_counter() - start)

    saved = {"pixel_values": pixel_values, "image_embeds": embeds}
    preprocess = {}
    if not args.forward_only:
        images = test_images(np.random.default_rng(2), args.images)
        image_dir = args.workdir / "images"
        image_dir.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            img.save(image_dir / f"{i:02}.png")
        decoded = [Image.open(image_dir / f"{i:02}.png") for i in range(args.images)]
        for img in decoded:
            img.load()
        saved["image_pixel_values"] = processor(images=decoded, return_tensors="pt")["pixel_values"].contiguous()
        processor(images=decoded[:2], return_tensors="pt")  # warm-up
        start = time.perf_counter()
        for _ in range(args.preprocess_rounds):
            processor(images=decoded, return_tensors="pt")
        preprocess_s = time.perf_counter() - start
        n_pre = args.preprocess_rounds * args.images
        preprocess = {"preprocess_images_per_s": n_pre / preprocess_s, "preprocess_images": n_pre}

    safetensors.torch.save_file(saved, args.workdir / "reference.safetensors")
    median = statistics.median(times)
    result = {
        "side": "transformers",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "arch": args.arch,
        "attn_implementation": model.config._attn_implementation,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "reps": args.reps,
        "forward_ms_median": median * 1e3,
        "forward_ms_all": [t * 1e3 for t in times],
        "forward_images_per_s": args.batch / median,
        "images_per_s": args.batch / median,
        **preprocess,
        **gpu_memory.fields(sampler),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
