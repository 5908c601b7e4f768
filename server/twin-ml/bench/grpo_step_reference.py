#!/usr/bin/env python3
"""PyTorch + transformers' side of the GRPO step benchmark: seconds per phase of one whole GRPO
step of the TWIN recipe (rollouts, reward, reference log-probabilities, update), so twin's trainer
(`twin_stage_train::trainer::Trainer::step`, timed by
server/twin-stage-train/examples/bench_grpo_step.rs) has numbers to compare with.

`--save DIR` writes the benchmark's checkpoint: a seeded random Qwen2_5_VLForConditionalGeneration
(`--preset small`, the rollout benchmark's shape from bench/qwen_reference.py: text hidden 512,
8 layers, 8 / 2 heads, MLP 1376; vision hidden 256, depth 4; 151,936-token tied vocabulary; or
`--preset tiny` for a quick check), the parity fixtures' byte-level BPE tokenizer and chat
template (tests/fixtures/qwen_fixtures.py, Qwen's special tokens at their ids), a
Qwen2VLImageProcessorPil config that keeps `--image-side`-square images as they are, and
`--prompts` TWIN pair questions over procedurally drawn product pictures (prompts.json + PNGs),
labels alternating yes / no. Both sides load that directory, so they run the same weights on the
same prompts.

`--model DIR` then times `--warmup` + `--steps` GRPO steps. Each step, as twin's trainer and
verl's recipe run it:
1. rollout: `model.generate` on the prompts (the chat is the training record's user turn, image,
   "\\n", image, "\\n\\n" + question, with no system message, so the template adds its default one),
   `do_sample`, temperature 1, top_p 1, top_k off, `--new-tokens` at most, `--group` samples per
   prompt (`num_return_sequences`), stopping at <|im_end|> or <|endoftext|>;
2. reward: responses decoded without special tokens, scored by the TWIN rule (the last
   `<answer>...</answer>`, normalised, equals the label);
3. GRPO advantages: (score - group mean) / (group std with Bessel's correction + 1e-6);
4. per micro-batch of `--micro` sequences: the frozen reference copy's response log-probabilities
   without gradients (phase "log-probs"), then the policy's with gradients, verl's dual-clip PPO
   loss (clip 0.2 / 0.2, dual clip 3) token-mean over the micro-batch with the on-policy old
   log-probabilities (the trained ones detached: ratio 1) plus 0.01 x k3 (low_var_kl) to the
   reference, token-mean, back-propagated scaled by 1 / micro-batches (phase "update", with the
   next step);
5. clip_grad_norm_(1.0) and torch.optim.AdamW (lr `--lr`, betas 0.9 / 0.999, eps 1e-8, weight
   decay 0.01).
The whole model trains (vision tower included); the policy's per-token entropy is computed
without gradients for the step's metrics, as the trainer does. The vocabulary is projected on the
response positions only (`logits_to_keep`).

Prints one JSON object on stdout (per-phase seconds of every timed step and their medians);
progress goes to stderr. Example:

    .venv/bin/python server/twin-ml/bench/grpo_step_reference.py --save /tmp/bg
    .venv/bin/python server/twin-ml/bench/grpo_step_reference.py --model /tmp/bg --threads 2
"""

import argparse
import copy
import json
import re
import statistics
import string
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
import qwen_reference as qr  # noqa: E402

qf = qr.qf
PHASES = ("rollout_s", "reward_s", "logprob_s", "update_s", "step_s")
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
KL_COEF = 0.01
CLIP_LOW, CLIP_HIGH, CLIP_DUAL = 0.2, 0.2, 3.0


def log(message):
    print(message, file=sys.stderr, flush=True)


def tiny_config():
    """A model small enough that a step takes well under a second: for checking the script."""
    return Qwen2_5_VLConfig(
        text_config={**qr.COMMON_TEXT, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "intermediate_size": 128,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}},
        vision_config={**qr.COMMON_VISION, "hidden_size": 32, "depth": 2, "fullatt_block_indexes": [1],
                       "num_heads": 2, "intermediate_size": 64, "out_hidden_size": 64},
        image_token_id=qf.IMAGE_TOKEN_ID,
        video_token_id=qf.VIDEO_TOKEN_ID,
        vision_start_token_id=qf.VISION_START_TOKEN_ID,
        vision_end_token_id=qf.VISION_END_TOKEN_ID,
        tie_word_embeddings=True,
    )


def save(args):
    out = Path(args.save)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    config = tiny_config() if args.preset == "tiny" else qr.preset_config(args.preset)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.save_pretrained(out)
    qf.save_tokenizer(out, qf.qwen_tokenizer())
    # max_pixels = the image's own area keeps it at its size (a multiple of 28 on each side).
    qf.image_processor(56 * 56, args.image_side**2).save_pretrained(out)
    (out / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(args.seed + 1)
    prompts = []
    for i in range(args.prompts):
        paths = []
        for side in "ab":
            path = f"images/p{i}_{side}.png"
            Image.fromarray(qf.product_picture(rng, args.image_side, args.image_side), "RGB").save(out / path)
            paths.append(path)
        prompts.append({"id": f"p{i}", "images": paths, "answer": "yes" if i % 2 == 0 else "no"})
    (out / "prompts.json").write_text(json.dumps({
        "made_by": "server/twin-ml/bench/grpo_step_reference.py --save",
        "preset": args.preset,
        "image_side": args.image_side,
        "question": qf.PAIR_QUESTION,
        "prompts": prompts,
    }, indent=2) + "\n")
    log(f"saved {out}: {sum(p.numel() for p in model.parameters())} parameters, {args.prompts} prompts "
        f"over {args.image_side}x{args.image_side} image pairs")


def training_message(question):
    """The training record's user turn as verl splits "<image>\\n<image>\\n\\n{question}"."""
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\n"}, {"type": "image"},
                                        {"type": "text", "text": "\n\n" + question}]}


def binary_match(completion, ground_truth):
    """The TWIN reward (training/reward.py; wasm-sdk/conformance/oracle.py has the same lines)."""
    found = re.findall(r"<answer>\s*(.*?)\s*</answer>", completion, re.IGNORECASE | re.DOTALL)
    prediction = found[-1].strip() if found else None

    def normalise(s):
        if s is None:
            return None
        s = "".join(ch for ch in s.strip().lower() if ch not in string.punctuation).strip()
        return s or None

    p, t = normalise(prediction), normalise(ground_truth)
    return 1.0 if p is not None and t is not None and p == t else 0.0


def token_mean(values, mask):
    return (values * mask).sum() / mask.sum().clamp(min=1)


def policy_loss(old_log_prob, log_prob, advantages, mask):
    """verl's compute_policy_loss_vanilla: PPO clip with the dual clip for negative advantages."""
    ratio = torch.exp((log_prob - old_log_prob).clamp(-20.0, 20.0))
    clipped = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - CLIP_LOW, 1 + CLIP_HIGH))
    dual = torch.minimum(-advantages * CLIP_DUAL, clipped)
    return token_mean(torch.where(advantages < 0, dual, clipped), mask)


def low_var_kl(log_prob, ref_log_prob):
    """verl's k3 estimator ("low_var_kl"), clamped as verl clamps it."""
    kl = (ref_log_prob - log_prob).clamp(-20.0, 20.0)
    return (torch.exp(kl) - kl - 1).clamp(-10.0, 10.0)


def entropy_from_logits(logits):
    p = logits.softmax(-1)
    return logits.logsumexp(-1) - (p * logits).sum(-1)


class Prompts:
    """The processor's inputs for every prompt, and per-row views of them for micro-batches."""

    def __init__(self, directory, tok):
        spec = json.loads((directory / "prompts.json").read_text())
        self.answers = [p["answer"] for p in spec["prompts"]]
        # AutoProcessor cannot be built in this environment (transformers' only Qwen2-VL video
        # processor needs torchvision), so the checkpoint's processor is assembled from its parts:
        # Qwen2_5_VLProcessor's own code without the video processor (see qwen_fixtures.py).
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(directory)
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        self.processor = qf.ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok,
                                                         chat_template=template)
        self.processor.tokenizer.padding_side = "left"
        text = self.processor.apply_chat_template([training_message(spec["question"])], add_generation_prompt=True,
                                                  tokenize=False)
        images = [Image.open(directory / path).convert("RGB") for p in spec["prompts"] for path in p["images"]]
        self.inputs = self.processor(text=[text] * len(self.answers), images=images, padding=True, return_tensors="pt")
        grids = self.inputs["image_grid_thw"]
        per_image = grids.prod(1).tolist()
        starts = np.cumsum([0] + per_image)
        # Prompt i's two images, as patch rows of pixel_values and rows of image_grid_thw.
        self.pixels = [self.inputs["pixel_values"][starts[2 * i]:starts[2 * i + 2]] for i in range(len(self.answers))]
        self.grids = [grids[2 * i:2 * i + 2] for i in range(len(self.answers))]

    def __len__(self):
        return len(self.answers)


def response_log_probs(model, prompts, rows, group, prompt_ids, prompt_mask, responses, mask, entropy):
    """log p(response | prompt) `[rows, R]` (and the entropy without gradients), the vocabulary
    projected on the response positions only; tokens after a row's first stop are neither
    attended to nor scored."""
    ids = torch.cat([prompt_ids[rows], responses[rows, :-1]], dim=1)
    attention = torch.cat([prompt_mask[rows], mask[rows, :-1].long()], dim=1)
    owners = [r // group for r in range(rows.start, rows.stop)]
    model.model.rope_deltas = None
    out = model(
        input_ids=ids,
        attention_mask=attention,
        pixel_values=torch.cat([prompts.pixels[o] for o in owners]),
        image_grid_thw=torch.cat([prompts.grids[o] for o in owners]),
        mm_token_type_ids=(ids == qf.IMAGE_TOKEN_ID).int(),
        use_cache=False,
        logits_to_keep=responses.shape[1],
    )
    logits = out.logits.float()
    log_prob = logits.log_softmax(-1).gather(2, responses[rows].unsqueeze(2)).squeeze(2)
    ent = None
    if entropy:
        with torch.no_grad():
            ent = entropy_from_logits(logits.detach())
    return log_prob, ent


def grpo_step(step, model, reference, opt, prompts, tok, args):
    times = {}
    stops = torch.tensor([tok.convert_tokens_to_ids(t) for t in STOP_TOKENS])
    started = time.perf_counter()
    torch.manual_seed(args.seed * 1_000_003 + step)
    t = time.perf_counter()
    with torch.no_grad():
        model.model.rope_deltas = None
        sequences = model.generate(
            **prompts.inputs,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=args.new_tokens,
            num_return_sequences=args.group,
            eos_token_id=stops.tolist(),
            pad_token_id=tok.pad_token_id,
        )
    times["rollout_s"] = time.perf_counter() - t
    prompt_len = prompts.inputs["input_ids"].shape[1]
    # generate's rows are prompt 0's samples, then prompt 1's, ...: the trainer's group order.
    prompt_ids = prompts.inputs["input_ids"].repeat_interleave(args.group, dim=0)
    prompt_mask = prompts.inputs["attention_mask"].repeat_interleave(args.group, dim=0)
    responses = sequences[:, prompt_len:]
    is_stop = torch.isin(responses, stops).int()
    mask = ((is_stop.cumsum(1) - is_stop) == 0).float()  # through the first stop token
    lengths = mask.sum(1).long().tolist()

    t = time.perf_counter()
    texts = tok.batch_decode([responses[i, :n].tolist() for i, n in enumerate(lengths)], skip_special_tokens=True)
    scores = torch.tensor([binary_match(text, prompts.answers[i // args.group]) for i, text in enumerate(texts)])
    times["reward_s"] = time.perf_counter() - t

    grouped = scores.view(-1, args.group)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)).view(-1)

    update_started = time.perf_counter()
    logprob_s = 0.0
    opt.zero_grad()
    batch = responses.shape[0]
    starts = range(0, batch, args.micro)
    kl_sum, entropy_sum = 0.0, 0.0
    for start in starts:
        rows = slice(start, min(start + args.micro, batch))
        t = time.perf_counter()
        with torch.no_grad():
            ref_log_prob, _ = response_log_probs(reference, prompts, rows, args.group, prompt_ids, prompt_mask,
                                                 responses, mask, entropy=False)
        logprob_s += time.perf_counter() - t
        log_prob, entropy = response_log_probs(model, prompts, rows, args.group, prompt_ids, prompt_mask,
                                               responses, mask, entropy=True)
        m = mask[rows]
        adv = advantages[rows].unsqueeze(1) * m
        pg = policy_loss(log_prob.detach(), log_prob, adv, m)
        kl = token_mean(low_var_kl(log_prob, ref_log_prob), m)
        loss = pg + KL_COEF * kl
        (loss / len(starts)).backward()
        kl_sum += kl.item()
        entropy_sum += (entropy * m).sum().item()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    opt.step()
    end = time.perf_counter()
    times["logprob_s"] = logprob_s
    times["update_s"] = end - update_started - logprob_s
    times["step_s"] = end - started
    tokens = int(mask.sum())
    metrics = {"reward_mean": scores.mean().item(), "response_tokens": tokens, "grad_norm": norm.item(),
               "kl": kl_sum / len(starts), "entropy": entropy_sum / max(tokens, 1),
               "tokens_per_second": tokens / times["step_s"]}
    return times, metrics


def run(args):
    torch.set_num_threads(args.threads)
    directory = Path(args.model)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(directory, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    model.eval()  # no dropout anywhere in Qwen2.5-VL; eval only keeps generate quiet about it
    reference = copy.deepcopy(model).requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(directory)
    prompts = Prompts(directory, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    log(f"{directory}: {sum(p.numel() for p in model.parameters())} parameters, {len(prompts)} prompts of "
        f"{prompts.inputs['input_ids'].shape[1]} tokens x group {args.group}, {args.new_tokens} new tokens, "
        f"micro-batches of {args.micro}, {torch.get_num_threads()} threads")
    timed = {p: [] for p in PHASES}
    steps = []
    for step in range(1, args.warmup + args.steps + 1):
        times, metrics = grpo_step(step, model, reference, opt, prompts, tok, args)
        what = "warm-up" if step <= args.warmup else "timed"
        log(f"step {step} ({what}): " + ", ".join(f"{k} {v:.3f}" for k, v in times.items())
            + f"; {metrics['response_tokens']} response tokens, reward {metrics['reward_mean']:.3f}")
        if step > args.warmup:
            for p in PHASES:
                timed[p].append(times[p])
            steps.append(metrics)
    print(json.dumps({
        "impl": "pytorch",
        "threads": torch.get_num_threads(),
        "prompts": len(prompts),
        "group": args.group,
        "prompt_tokens": int(prompts.inputs["input_ids"].shape[1]),
        "new_tokens": args.new_tokens,
        "micro": args.micro,
        "median": {p: statistics.median(v) for p, v in timed.items()},
        "all": timed,
        "steps": steps,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save", help="write the checkpoint, images and prompts.json here, then stop")
    p.add_argument("--preset", choices=["small", "tiny"], default="small")
    p.add_argument("--image-side", type=int, default=224, help="square images, a multiple of 28")
    p.add_argument("--prompts", type=int, default=4, help="prompts (pair questions) to write")
    p.add_argument("--model", help="time GRPO steps on a directory --save wrote")
    p.add_argument("--group", type=int, default=4, help="samples per prompt (GRPO group)")
    p.add_argument("--new-tokens", type=int, default=32, help="longest response")
    p.add_argument("--micro", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.save:
        if args.image_side % 28:
            p.error("--image-side must be a multiple of 28")
        save(args)
    elif args.model:
        if args.group < 2:
            p.error("--group must be at least 2 (a GRPO group's std needs two samples)")
        run(args)
    else:
        p.error("--save DIR or --model DIR")


if __name__ == "__main__":
    main()
