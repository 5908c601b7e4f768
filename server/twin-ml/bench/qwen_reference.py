#!/usr/bin/env python3
"""transformers' side of the Qwen2.5-VL rollout benchmark: how fast `generate` samples TWIN-shaped
rollouts, so the Rust implementation (server/twin-ml/src/qwen/) has a number to beat.

The model is a seeded random Qwen2_5_VLForConditionalGeneration: `--preset small` (the default;
text hidden 512, 8 layers, 8 heads / 2 kv heads, MLP 1376; vision hidden 256, depth 4, full
attention in block 3, 4 heads; vocabulary 151,936, tied embeddings) or `--preset 3b`, the shape of
Qwen/Qwen2.5-VL-3B-Instruct (hidden 2048, 36 layers, 16 / 2 heads, MLP 11008; vision 1280 wide,
32 deep, full attention in 7, 15, 23, 31; tied), meant for a GPU. `--save DIR` writes the
checkpoint (save_pretrained), the byte-level BPE tokenizer the parity fixtures use
(tests/fixtures/qwen_fixtures.py, special tokens at Qwen's ids), chat_template.jinja, a
Qwen2VLImageProcessorPil preprocessor_config.json, the request images and requests.json, so the
Rust benchmark loads the very same checkpoint and prompts; `--model DIR` benchmarks a directory
written that way instead of building a model.

Each request is a rollout of the TWIN pair task: one user message with two procedurally drawn
448x448 RGB images (kept at 448x448 by the preprocessor: 16x16 merged tokens, 256 tokens each)
and the TWIN pair question, rendered with the chat template and the generation prompt. Per
`--batch` size (requests left-padded into one batch; they are the same length here) it times,
each after `--warmup` untimed runs and over `--repeats` timed ones (medians reported):

- preprocess: the processor on the batch (chat template, image preprocessing, tokenization);
- prefill: one forward over the padded batch with the KV cache on, the vision tower included and
  only the last position's logits computed, as generate's first step does;
- generate: `generate(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)` for exactly
  `--new-tokens` tokens (min_new_tokens = max_new_tokens, so eos cannot end a rollout early);
  rollout tokens/s = batch x new tokens / generate seconds.

Prints a header line and then one line per batch size, each a JSON object, on stdout; progress
goes to stderr. Example (CPU, quick check):

    .venv/bin/python server/twin-ml/bench/qwen_reference.py --batch 8 --repeats 1 --new-tokens 8 --threads 2
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers
from PIL import Image
from transformers import (
    AutoTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

# The tokenizer, chat template, prompt texts and picture generator are the parity fixtures' own, so
# the benchmark's checkpoint and the fixtures agree on every id.
sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests" / "fixtures"))
import qwen_fixtures as qf  # noqa: E402

IMAGE_SIDE = 448
# 448 x 448 = 200,704 pixels = 28 * 28 * 256: the largest max_pixels that keeps the image as it is
# is exactly this, and min_pixels stays Qwen's 56 * 56.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 256
# Distinct image pairs; request i uses pair i % DISTINCT_PAIRS (content does not change the cost).
DISTINCT_PAIRS = 8

PRESETS = {
    "small": {
        "text": dict(
            hidden_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=1376,
            # head_dim 64: the rope sections (temporal, height, width) cover its 32 frequencies.
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
        ),
        "vision": dict(
            hidden_size=256,
            depth=4,
            fullatt_block_indexes=[3],
            num_heads=4,
            intermediate_size=684,
            out_hidden_size=512,
        ),
    },
    "3b": {
        "text": dict(
            hidden_size=2048,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            intermediate_size=11008,
            max_position_embeddings=128000,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        ),
        "vision": dict(
            hidden_size=1280,
            depth=32,
            fullatt_block_indexes=[7, 15, 23, 31],
            num_heads=16,
            intermediate_size=3420,
            out_hidden_size=2048,
            tokens_per_second=2,
        ),
    },
}
COMMON_TEXT = dict(vocab_size=qf.VOCAB_SIZE, rms_norm_eps=1e-6, max_position_embeddings=32768, hidden_act="silu")
COMMON_VISION = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, hidden_act="silu")
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def log(message):
    print(message, file=sys.stderr, flush=True)


def preset_config(name):
    preset = PRESETS[name]
    return Qwen2_5_VLConfig(
        text_config={**COMMON_TEXT, **preset["text"]},
        vision_config={**COMMON_VISION, **preset["vision"]},
        image_token_id=qf.IMAGE_TOKEN_ID,
        video_token_id=qf.VIDEO_TOKEN_ID,
        vision_start_token_id=qf.VISION_START_TOKEN_ID,
        vision_end_token_id=qf.VISION_END_TOKEN_ID,
        tie_word_embeddings=True,
    )


def build_model(args, device, dtype):
    """A seeded random model. The small preset is built on the CPU in f32 (what --save writes, on
    any machine); the 3B one directly on the target device in the target dtype, since 3.8 B
    parameters initialised on the CPU in f32 would take minutes and 15 GB."""
    torch.manual_seed(args.seed)
    config = preset_config(args.preset)
    if args.preset == "small":
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation=args.attn, dtype=torch.float32)
    else:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation=args.attn, dtype=dtype)
    return model.eval()


def pair_images(seed):
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(qf.product_picture(rng, IMAGE_SIDE, IMAGE_SIDE), "RGB")
        for _ in range(2 * DISTINCT_PAIRS)
    ]


def request_messages(image_paths):
    return [qf.image_message(image_paths, qf.PAIR_QUESTION)]


def save_bundle(out, model, tok, images, args):
    """Everything the Rust benchmark needs to run the same model on the same prompts."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    qf.save_tokenizer(out, tok)
    qf.image_processor(MIN_PIXELS, MAX_PIXELS).save_pretrained(out)
    (out / "images").mkdir(exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = f"images/pair{i // 2}_{'ab'[i % 2]}.png"
        img.save(out / path, format="PNG")
        paths.append(path)
    requests = {
        "preset": args.preset,
        "seed": args.seed,
        "distinct_pairs": DISTINCT_PAIRS,
        "request_i_uses_pair": "i % distinct_pairs",
        "pairs": [request_messages(paths[2 * p : 2 * p + 2]) for p in range(DISTINCT_PAIRS)],
        "add_generation_prompt": True,
        "padding_side": "left",
        "sampling": {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0},
        "new_tokens": args.new_tokens,
    }
    (out / "requests.json").write_text(json.dumps(requests, indent=2) + "\n")
    log(f"saved the checkpoint, tokenizer, preprocessor, images and requests.json to {out}")


def load_bundle(directory, args):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(directory, attn_implementation=args.attn).eval()
    tok = AutoTokenizer.from_pretrained(directory)
    images = sorted((directory / "images").glob("pair*_*.png"))
    if len(images) != 2 * DISTINCT_PAIRS:
        raise SystemExit(f"{directory}/images: expected {2 * DISTINCT_PAIRS} pair*_*.png, found {len(images)}")
    return model, tok, [Image.open(p).convert("RGB") for p in images]


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--save", type=Path, metavar="DIR", help="write the checkpoint, tokenizer, images and requests here")
    p.add_argument("--save-only", action="store_true", help="with --save: write the bundle and stop")
    p.add_argument("--model", type=Path, metavar="DIR", help="benchmark a directory written by --save instead")
    p.add_argument("--batch", type=int, nargs="+", default=[8, 32], help="batch sizes (requests per generate call)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention implementation")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per batch size first (at least 1)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens sampled per rollout")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.warmup < 1 or args.repeats < 1:
        p.error("--warmup and --repeats must be at least 1")
    if args.model and args.save:
        p.error("--model and --save exclude each other")
    if args.save_only and not args.save:
        p.error("--save-only needs --save")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]

    if args.model:
        model, tok, images = load_bundle(args.model, args)
    else:
        model = build_model(args, device, dtype)
        tok = qf.qwen_tokenizer()
        images = pair_images(args.seed + 1)
        if args.save:
            save_bundle(args.save, model, tok, images, args)
            if args.save_only:
                return
    model = model.to(device=device, dtype=dtype)

    # The fixtures' processor: Qwen2_5_VLProcessor's code without the video part (no torchvision).
    image_processor = (
        Qwen2VLImageProcessorPil.from_pretrained(args.model) if args.model else qf.image_processor(MIN_PIXELS, MAX_PIXELS)
    )
    assert image_processor.backend == "pil"
    processor = qf.ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok, chat_template=qf.CHAT_TEMPLATE)
    processor.tokenizer.padding_side = "left"
    # The messages name their images; the processor gets the decoded images directly.
    prompt = processor.apply_chat_template(
        request_messages(["pair_a.png", "pair_b.png"]), add_generation_prompt=True, tokenize=False
    )

    def make_batch(batch):
        pictures = [images[2 * (i % DISTINCT_PAIRS) + k] for i in range(batch) for k in range(2)]
        return processor(text=[prompt] * batch, images=pictures, padding=True, return_tensors="pt")

    probe = make_batch(1)
    prompt_tokens = probe["input_ids"].shape[1]
    image_tokens = int((probe["input_ids"] == qf.IMAGE_TOKEN_ID).sum())
    assert image_tokens == 2 * (IMAGE_SIDE // 28) ** 2, image_tokens
    text_cfg, vision_cfg = model.config.text_config, model.config.vision_config
    header = {
        "kind": "header",
        "side": "transformers",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "dtype": args.dtype,
        "attention": args.attn,
        "threads": torch.get_num_threads(),
        "preset": "model dir " + str(args.model) if args.model else args.preset,
        "seed": None if args.model else args.seed,
        "parameters": sum(t.numel() for t in model.parameters()),
        "config": {
            "text": {
                k: getattr(text_cfg, k)
                for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size")
            },
            "vision": {
                k: getattr(vision_cfg, k)
                for k in ("hidden_size", "depth", "num_heads", "intermediate_size", "out_hidden_size", "window_size")
            }
            | {"fullatt_block_indexes": list(vision_cfg.fullatt_block_indexes)},
            "tie_word_embeddings": model.config.tie_word_embeddings,
        },
        "request": {
            "images": 2,
            "image_size": [IMAGE_SIDE, IMAGE_SIDE],
            "prompt_tokens": prompt_tokens,
            "image_tokens": image_tokens,
            "text_tokens": prompt_tokens - image_tokens,
            "new_tokens": args.new_tokens,
            "sampling": {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0},
        },
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    print(json.dumps(header), flush=True)

    for batch in args.batch:
        pre_times, prefill_times, generate_times = [], [], []
        for run in range(args.warmup + args.repeats):
            pre_s, inputs = timed(lambda: make_batch(batch), torch.device("cpu"))
            inputs = inputs.to(device)
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)

            def prefill():
                with torch.inference_mode():
                    model.model.rope_deltas = None
                    return model(**inputs, use_cache=True, logits_to_keep=1)

            def rollout():
                with torch.inference_mode():
                    model.model.rope_deltas = None
                    return model.generate(
                        **inputs,
                        do_sample=True,
                        temperature=1.0,
                        top_p=1.0,
                        top_k=0,
                        max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens,
                        pad_token_id=tok.pad_token_id,
                    )

            prefill_s, _ = timed(prefill, device)
            generate_s, sequences = timed(rollout, device)
            assert sequences.shape == (batch, inputs["input_ids"].shape[1] + args.new_tokens), sequences.shape
            what = "warm-up" if run < args.warmup else "timed"
            log(f"batch {batch} {what} run: preprocess {pre_s:.3f} s, prefill {prefill_s:.3f} s, generate {generate_s:.3f} s")
            if run >= args.warmup:
                pre_times.append(pre_s)
                prefill_times.append(prefill_s)
                generate_times.append(generate_s)
        generate_median = statistics.median(generate_times)
        result = {
            "kind": "result",
            "batch": batch,
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "new_tokens": args.new_tokens,
            "preprocess_s_median": statistics.median(pre_times),
            "prefill_s_median": statistics.median(prefill_times),
            "generate_s_median": generate_median,
            "rollout_tokens_per_s": batch * args.new_tokens / generate_median,
            "prefill_s_all": prefill_times,
            "generate_s_all": generate_times,
        }
        if device.type == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
