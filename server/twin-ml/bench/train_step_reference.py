#!/usr/bin/env python3
"""PyTorch's side of the GRPO training-step benchmark: how long one optimizer step of the recipe
takes with transformers + verl's loss + torch.optim.AdamW, and how much memory it peaks at, so
twin-ml's step (server/twin-ml/examples/bench_train_step.rs) has numbers to compare with.

`--save DIR` builds the benchmark's seeded random Qwen2_5_VLForConditionalGeneration in the
rollout benchmark's small shape (bench/qwen_reference.py's `--preset small`: text hidden 512,
8 layers, 8 / 2 heads, MLP 1376; vision hidden 256, depth 4; vocabulary 151,936, tied), saves it
(save_pretrained) and writes `batch.safetensors`: `--batch` sequences, each one 448x448 image
(1,024 patches of random pixel values, 256 merged tokens) between vision-start and vision-end
tokens and random text tokens around it (`--prompt-tokens` in all), then `--response-tokens`
random response tokens (no stop token, so every one is scored). Sequences come in GRPO groups of
`--group` per prompt with random 0/1 rewards; their advantages (verl's
compute_grpo_outcome_advantage) and the on-policy old and reference log-probabilities (a forward
pass without gradients) are stored with them. Token ids and pixels are written directly: no
tokenizer or image processor is involved, and the Rust side reads the very same tensors.

`--model DIR` then times `--steps` optimizer steps (after `--warmup` untimed ones) as verl's
actor runs them: zero_grad; per micro-batch of `--micro` sequences, a forward pass with the
vocabulary projection on the response positions only (`logits_to_keep`), f32 log-softmax, verl's
vanilla dual-clip policy loss plus 0.01 x low_var_kl, token-mean, scaled by 1 / micro-batches and
back-propagated; clip_grad_norm_(1.0); AdamW at 1e-6 (β 0.9/0.999, ε 1e-8, decay 0.01).
`--checkpointing on` calls `gradient_checkpointing_enable()` first (every decoder layer and vision
block recomputed in the backward pass). Peak memory is the process's resident high-water mark
(VmHWM from /proc/self/status), so each configuration runs in a process of its own.

Prints one JSON object on stdout; progress goes to stderr. Example:

    .venv/bin/python server/twin-ml/bench/train_step_reference.py --save /tmp/bt
    .venv/bin/python server/twin-ml/bench/train_step_reference.py --model /tmp/bt --checkpointing on
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / ".venv" / "verl"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.dont_write_bytecode = True

import torch  # noqa: E402
import transformers  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: E402

import qwen_reference as qr  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402

GRID = (1, 32, 32)  # a 448x448 image in 14-pixel patches
PATCH_DIM = 3 * 2 * 14 * 14
IMAGE_TOKENS = GRID[0] * GRID[1] * GRID[2] // 4
TEXT_IDS = 151_000  # plain text tokens are drawn below this, clear of Qwen's special tokens
KL_COEF = 0.01
LR = 1e-6


def log(message):
    print(message, file=sys.stderr, flush=True)


def memory_mib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def policy_config():
    return OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2,
                             "clip_ratio_c": 3.0, "global_batch_info": {}})


def forward_log_probs(model, batch, rows):
    """log p(response | prompt) `[rows, R]` with the head on the response positions only."""
    responses = batch["responses"][rows]
    ids = torch.cat([batch["input_ids"][rows], responses[:, :-1]], dim=1)
    n = ids.shape[0]
    pixels = batch["pixel_values"].view(-1, GRID[1] * GRID[2], PATCH_DIM)[rows].reshape(-1, PATCH_DIM)
    out = model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=pixels,
        image_grid_thw=batch["grid_thw"][rows],
        mm_token_type_ids=(ids == qr.qf.IMAGE_TOKEN_ID).int(),
        use_cache=False,
        logits_to_keep=responses.shape[1],
    )
    logits = out.logits.float()
    assert logits.shape[:2] == (n, responses.shape[1])
    return logits.log_softmax(-1).gather(2, responses.unsqueeze(2)).squeeze(2)


def save(args):
    torch.manual_seed(args.seed)
    config = qr.preset_config("small")
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                            dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    text = args.prompt_tokens - IMAGE_TOKENS - 2
    if text < 2:
        raise SystemExit(f"--prompt-tokens must leave room for the image's {IMAGE_TOKENS + 2} tokens")
    before = text // 2
    prompts = len(range(0, args.batch, args.group))
    ids, pixels = [], []
    for _ in range(prompts):
        words = torch.randint(0, TEXT_IDS, (text,), generator=g)
        ids.append(torch.cat([
            words[:before],
            torch.tensor([qr.qf.VISION_START_TOKEN_ID] + [qr.qf.IMAGE_TOKEN_ID] * IMAGE_TOKENS
                         + [qr.qf.VISION_END_TOKEN_ID]),
            words[before:],
        ]))
        pixels.append(torch.randn(GRID[1] * GRID[2], PATCH_DIM, generator=g))
    index = torch.arange(args.batch) // args.group
    batch = {
        "input_ids": torch.stack([ids[i] for i in index]),
        "pixel_values": torch.cat([pixels[i] for i in index]),
        "grid_thw": torch.tensor([GRID] * args.batch, dtype=torch.int64),
        "responses": torch.randint(0, TEXT_IDS, (args.batch, args.response_tokens), generator=g),
    }
    scores = torch.randint(0, 2, (args.batch,), generator=g).float()
    mask = torch.ones(args.batch, args.response_tokens)
    token_scores = torch.zeros(args.batch, args.response_tokens)
    token_scores[:, -1] = scores
    adv, _ = core_algos.compute_grpo_outcome_advantage(token_level_rewards=token_scores,
                                                       response_mask=mask, index=index.numpy())
    batch["advantages"] = adv[:, 0].contiguous()
    log(f"on-policy log-probabilities of {args.batch} sequences")
    with torch.no_grad():
        current = torch.cat([forward_log_probs(model, batch, slice(i, i + args.micro))
                             for i in range(0, args.batch, args.micro)])
    batch["old_log_prob"] = current
    batch["ref_log_prob"] = current.clone()
    out = Path(args.save)
    model.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in batch.items()}, str(out / "batch.safetensors"))
    log(f"saved {out}: {sum(p.numel() for p in model.parameters())} parameters, "
        f"{args.batch} x ({args.prompt_tokens} prompt + {args.response_tokens} response) tokens")


def optimizer_step(model, opt, batch, micro):
    """One step as verl's actor runs it; returns the micro-batch losses and the gradient norm."""
    opt.zero_grad()
    b = batch["responses"].shape[0]
    starts = range(0, b, micro)
    losses = []
    for start in starts:
        rows = slice(start, start + micro)
        logp = forward_log_probs(model, batch, rows)
        mask = torch.ones_like(logp)
        adv = batch["advantages"][rows].unsqueeze(1) * mask
        pg, _ = core_algos.compute_policy_loss_vanilla(batch["old_log_prob"][rows], logp, adv, mask,
                                                       loss_agg_mode="token-mean", config=policy_config())
        kld = core_algos.kl_penalty(logprob=logp, ref_logprob=batch["ref_log_prob"][rows],
                                    kl_penalty="low_var_kl")
        loss = pg + KL_COEF * core_algos.agg_loss(loss_mat=kld, loss_mask=mask, loss_agg_mode="token-mean")
        (loss / len(starts)).backward()
        losses.append(loss.item())
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    opt.step()
    return losses, norm.item()


def run(args):
    torch.set_num_threads(args.threads)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    batch = load_file(str(Path(args.model) / "batch.safetensors"))
    model.train()
    if args.checkpointing == "on":
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    setup = memory_mib("VmHWM")
    times, first = [], None
    for step in range(args.warmup + args.steps):
        t = time.perf_counter()
        losses, norm = optimizer_step(model, opt, batch, args.micro)
        seconds = time.perf_counter() - t
        first = first or {"micro_losses": losses, "grad_norm": norm}
        log(f"step {step}: {seconds:.2f} s, losses {losses}, grad norm {norm:.6g}")
        if step >= args.warmup:
            times.append(seconds)
    print(json.dumps({
        "impl": "pytorch",
        "checkpointing": args.checkpointing == "on",
        "threads": torch.get_num_threads(),
        "batch": int(batch["responses"].shape[0]),
        "prompt_tokens": int(batch["input_ids"].shape[1]),
        "response_tokens": int(batch["responses"].shape[1]),
        "micro": args.micro,
        "step_s_median": statistics.median(times),
        "step_s_all": times,
        "peak_rss_mib": memory_mib("VmHWM"),
        "setup_rss_mib": setup,
        "first_step": first,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save", help="write the checkpoint and batch.safetensors here, then stop")
    p.add_argument("--model", help="time steps on a directory --save wrote")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--group", type=int, default=4, help="sequences per prompt (GRPO group)")
    p.add_argument("--prompt-tokens", type=int, default=300)
    p.add_argument("--response-tokens", type=int, default=64)
    p.add_argument("--micro", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--checkpointing", choices=["on", "off"], default="off")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.save:
        save(args)
    elif args.model:
        run(args)
    else:
        p.error("--save DIR or --model DIR")


if __name__ == "__main__":
    main()
