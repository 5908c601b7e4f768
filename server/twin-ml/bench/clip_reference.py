#!/usr/bin/env python3
"""transformers' side of the CLIP benchmark (deploy/bench-clip.sh runs both sides).

Builds a random ViT-B/32 CLIPVisionModelWithProjection (seeded), saves it with its processor to
WORKDIR/model, together with the benchmark's input batch, 640x480 test images and the reference
outputs for them (WORKDIR/reference.safetensors), so the Rust side (examples/bench_clip.rs) runs
the same weights on the same input and checks it gets the same answer. Then times, on the CPU in
f32 with the given torch thread count:

- forward: CLIPVisionModelWithProjection(pixel_values) on one [batch, 3, 224, 224] tensor, median
  of --reps runs after --warmup runs, under torch.inference_mode();
- preprocessing: the slow (PIL) CLIPImageProcessorPil on the decoded 640x480 images, all of them
  per call (one batch, return_tensors="pt"), --preprocess-rounds calls, images/s.

Prints one line `RESULT {json}`.
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


def test_images(rng, count):
    """Photo-like 640x480 RGB images: smooth colour fields, noise and edges."""
    y, x = np.mgrid[0:480, 0:640].astype(np.float32)
    images = []
    for _ in range(count):
        chans = [127 + 100 * np.sin(rng.uniform(0.005, 0.05) * x + rng.uniform(0.005, 0.05) * y + rng.uniform(0, 6)) for _ in range(3)]
        img = np.stack(chans, -1) + rng.normal(0, 12, size=(480, 640, 3))
        images.append(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB"))
    return images


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--images", type=int, default=8, help="distinct 640x480 test images")
    p.add_argument("--preprocess-rounds", type=int, default=8, help="passes over the test images")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_dir = args.workdir / "model"
    config = CLIPVisionConfig()  # transformers' defaults are ViT-B/32: 768 wide, 12 layers, 224 / 32
    model = CLIPVisionModelWithProjection(config).eval()
    processor = CLIPImageProcessorPil()  # shortest edge 224, crop 224, bicubic
    if not (model_dir / "model.safetensors").exists():
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
    else:
        model = CLIPVisionModelWithProjection.from_pretrained(model_dir).eval()

    g = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(args.batch, 3, config.image_size, config.image_size, generator=g)
    images = test_images(np.random.default_rng(2), args.images)
    image_dir = args.workdir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        img.save(image_dir / f"{i:02}.png")

    with torch.inference_mode():
        embeds = model(pixel_values=pixel_values).image_embeds
        for _ in range(args.warmup):
            model(pixel_values=pixel_values)
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            model(pixel_values=pixel_values)
            times.append(time.perf_counter() - start)

    decoded = [Image.open(image_dir / f"{i:02}.png") for i in range(args.images)]
    for img in decoded:
        img.load()
    reference_pixels = processor(images=decoded, return_tensors="pt")["pixel_values"]
    processor(images=decoded[:2], return_tensors="pt")  # warm-up
    start = time.perf_counter()
    for _ in range(args.preprocess_rounds):
        processor(images=decoded, return_tensors="pt")
    preprocess_s = time.perf_counter() - start
    n_pre = args.preprocess_rounds * args.images

    safetensors.torch.save_file(
        {"pixel_values": pixel_values, "image_embeds": embeds, "image_pixel_values": reference_pixels.contiguous()},
        args.workdir / "reference.safetensors",
    )
    median = statistics.median(times)
    result = {
        "side": "transformers",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "reps": args.reps,
        "forward_ms_median": median * 1e3,
        "forward_ms_all": [t * 1e3 for t in times],
        "forward_images_per_s": args.batch / median,
        "preprocess_images_per_s": n_pre / preprocess_s,
        "preprocess_images": n_pre,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
