#!/usr/bin/env python3
r"""PyTorch's side of the GRPO training-step benchmark: how long one optimizer step of the recipe
takes with transformers + verl's loss + torch.optim.AdamW, and how much memory it peaks at, so
twin-ml's step (server/twin-ml/examples/bench_train_step.rs) has numbers to compare with.

`--save DIR` builds the benchmark's seeded random Qwen2_5_VLForConditionalGeneration in
bench/qwen_reference.py's `--preset` (the rollout benchmark's shapes, so the two benches agree):
`small`, the default (text hidden 512, 8 layers, 8 / 2 heads, MLP 1376; vision hidden 256, depth 4;
vocabulary 151,936, tied), built in f32 on the CPU and saved in f32; or `3b`, the shape of
Qwen2.5-VL-3B-Instruct (text hidden 2048, 36 layers, 16 / 2 heads, MLP 11008; vision 1280 wide, 32
deep, full attention in blocks 7, 15, 23, 31, 16 heads, MLP 3420, out hidden 2048; tied), built
directly on `--device cuda` in bf16 and saved in bf16 (~7.5 GB; 3.8 B parameters in f32 on the CPU
would take minutes and 15 GB). It writes `batch.safetensors`: `--batch` sequences (8), each with
`--images` 448x448 images (1,024 patches of random pixel values, 256 merged tokens, each) between
vision-start and vision-end tokens and random text tokens around them (`--prompt-tokens` in all),
then `--response-tokens` random response tokens (no stop token, so every one is scored); by default
1 image, 300 + 64 tokens for small, and for 3b a TWIN pair rollout's 2 images, 600 + 128 tokens.
Sequences come in GRPO groups of `--group` per prompt with random 0/1 rewards; their advantages
(verl's compute_grpo_outcome_advantage) and the on-policy old and reference log-probabilities (a
forward pass without gradients on `--device`, in the checkpoint's dtype) are stored with them.
Token ids and pixels are written directly: no tokenizer or image processor is involved, and the
Rust side reads the very same tensors.

`--model DIR` then times `--steps` optimizer steps (after `--warmup` untimed ones) on `--device`
as verl's actor runs them: zero_grad; per micro-batch of `--micro` sequences, a forward pass
with the vocabulary projection on the response positions only (`logits_to_keep`), f32
log-softmax, verl's vanilla dual-clip policy loss plus 0.01 x low_var_kl, token-mean, scaled by
1 / micro-batches and back-propagated; clip_grad_norm_(1.0); AdamW at 1e-6 (β 0.9/0.999, ε 1e-8,
decay 0.01; fused on CUDA, which needs no parameter-sized temporaries). `--checkpointing on`
calls `gradient_checkpointing_enable()` first (every decoder layer and vision block recomputed
in the backward pass); `--train-vision off` freezes the vision tower.

The loss's code is verl's core_algos where it imports (deploy/setup-verl.sh's .venv/verl, or on
PYTHONPATH), else an inline transcription of the same formulas, operation for operation (a GPU
machine may have only torch and transformers); `--loss verl|inline` forces one, and the RESULT
names the one used (`loss_impl`). Both give the same numbers (checked on the CPU).

`--dtype f32` (the default on the CPU) computes and updates in f32. `--dtype bf16` (the default on
CUDA, as twin-ml picks bf16 compute there) is the recipe's mixed precision, mirrored from twin-ml's
trainer (server/twin-ml/src/train/precision.rs): the model's weights are bf16 and the forward and
backward run in them; AdamW updates f32 master copies of the trainable weights, from the bf16
gradients cast to f32 (each bf16 gradient freed as its f32 copy is made), clipped on the f32
masters; then the model's weights become the masters rounded to bf16. (verl's FSDP keeps f32
parameters and computes in bf16 the same way.)

Peak memory: the process's resident high-water mark (VmHWM from /proc/self/status), so each
configuration runs in a process of its own; on CUDA also the GPU's (bench/gpu_memory.py: NVML's
sampled process peak and the device memory in use at the end, measured as the Rust side measures
them, and torch.cuda.max_memory_allocated / max_memory_reserved). Training tokens/s = batch x
(prompt + response tokens) / median step seconds.

Prints one line `RESULT {json}` on stdout; progress goes to stderr. Examples:

    .venv/bin/python server/twin-ml/bench/train_step_reference.py --save /tmp/bt
    .venv/bin/python server/twin-ml/bench/train_step_reference.py --model /tmp/bt --checkpointing on

and on a GPU, at the 3B shape (8 sequences of two images, 600 prompt + 128 response tokens):

    python3 server/twin-ml/bench/train_step_reference.py --save W --preset 3b --device cuda \
        --images 2 --prompt-tokens 600 --response-tokens 128 --batch 8
    python3 server/twin-ml/bench/train_step_reference.py --model W --device cuda --dtype bf16 \
        --checkpointing on --micro 4 --steps 2 --warmup 1
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
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: E402

import gpu_memory  # noqa: E402
import qwen_reference as qr  # noqa: E402

GRID = (1, 32, 32)  # a 448x448 image in 14-pixel patches
PATCH_DIM = 3 * 2 * 14 * 14
PATCHES = GRID[0] * GRID[1] * GRID[2]
IMAGE_TOKENS = PATCHES // 4
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
SAVE_DEFAULTS = {
    "small": {"images": 1, "prompt_tokens": 300, "response_tokens": 64},
    "3b": {"images": 2, "prompt_tokens": 600, "response_tokens": 128},
}
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


class VerlLoss:
    """The recipe's mathematics from verl 0.9.1's core_algos (deploy/setup-verl.sh installs it)."""

    name = "verl"

    def __init__(self):
        from omegaconf import OmegaConf
        from verl.trainer.ppo import core_algos

        self.core = core_algos
        self.config = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2,
                                        "clip_ratio_c": 3.0, "global_batch_info": {}})

    def advantages(self, token_scores, mask, index):
        adv, _ = self.core.compute_grpo_outcome_advantage(token_level_rewards=token_scores, response_mask=mask,
                                                          index=index.numpy())
        return adv[:, 0]

    def actor_loss(self, old, logp, adv, mask, ref):
        pg, _ = self.core.compute_policy_loss_vanilla(old, logp, adv, mask, loss_agg_mode="token-mean",
                                                      config=self.config)
        kld = self.core.kl_penalty(logprob=logp, ref_logprob=ref, kl_penalty="low_var_kl")
        return pg + KL_COEF * self.core.agg_loss(loss_mat=kld, loss_mask=mask, loss_agg_mode="token-mean")


class InlineLoss:
    """The same formulas written out here, operation for operation, for machines without verl
    (a GPU box with only torch and transformers); checked against VerlLoss where both exist."""

    name = "inline"

    @staticmethod
    def advantages(token_scores, mask, index):
        # GRPO outcome advantages: (score - group mean) / (group std + 1e-6), unbiased std; a
        # group of one has mean 0 and std 1.
        scores = token_scores.sum(-1)
        out = scores.clone()
        for group in index.unique():
            rows = index == group
            member = scores[rows]
            mean, std = (member.mean(), member.std()) if len(member) > 1 else (torch.tensor(0.0), torch.tensor(1.0))
            out[rows] = (member - mean) / (std + 1e-6)
        return out

    @staticmethod
    def token_mean(loss_mat, mask):
        return (torch.where(mask.bool(), loss_mat, 0.0) * mask).sum() / mask.sum()

    @classmethod
    def actor_loss(cls, old, logp, adv, mask, ref):
        # Dual-clip PPO (ε 0.2 both sides, c = 3) plus 0.01 x k3 ("low_var_kl"), token-mean.
        ratio = torch.exp(torch.clamp(logp - old, min=-20.0, max=20.0))
        unclipped = -adv * ratio
        clipped = torch.maximum(unclipped, -adv * torch.clamp(ratio, 1 - 0.2, 1 + 0.2))
        dual = torch.min(-adv * 3.0, clipped)
        pg = cls.token_mean(torch.where(adv < 0, dual, clipped), mask)
        kl = torch.clamp(ref - logp, min=-20, max=20)
        kld = torch.clamp((torch.exp(kl) - kl - 1).contiguous(), min=-10, max=10)
        return pg + KL_COEF * cls.token_mean(kld, mask)


def loss_impl(choice):
    """verl's when importable (or asked for), the inline transcription otherwise."""
    if choice == "inline":
        return InlineLoss()
    try:
        return VerlLoss()
    except ImportError as e:
        if choice == "verl":
            raise
        log(f"verl is not importable ({e}): the loss is the inline transcription")
        return InlineLoss()


def forward_log_probs(model, batch, rows):
    """log p(response | prompt) `[rows, R]` with the head on the response positions only."""
    responses = batch["responses"][rows]
    ids = torch.cat([batch["input_ids"][rows], responses[:, :-1]], dim=1)
    n = ids.shape[0]
    # Per sequence its images' rows of pixel_values and grid_thw, in order.
    per = batch["grid_thw"].shape[0] // batch["input_ids"].shape[0]
    pixels = batch["pixel_values"].view(-1, per * PATCHES, PATCH_DIM)[rows].reshape(-1, PATCH_DIM)
    out = model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=pixels.to(model.dtype),
        image_grid_thw=batch["grid_thw"].view(-1, per, 3)[rows].reshape(-1, 3),
        mm_token_type_ids=(ids == qr.qf.IMAGE_TOKEN_ID).int(),
        use_cache=False,
        logits_to_keep=responses.shape[1],
    )
    logits = out.logits.float()
    assert logits.shape[:2] == (n, responses.shape[1])
    return logits.log_softmax(-1).gather(2, responses.unsqueeze(2)).squeeze(2)


def image_span():
    return [qr.qf.VISION_START_TOKEN_ID] + [qr.qf.IMAGE_TOKEN_ID] * IMAGE_TOKENS + [qr.qf.VISION_END_TOKEN_ID]


def save(args):
    torch.manual_seed(args.seed)
    config = qr.preset_config(args.preset)
    device = torch.device(args.device)
    if args.weights_from:
        # The rollout benchmark's checkpoint of the same preset (deploy/gpu-check.sh): building
        # and saving another 3B model would cost the GPU run a minute.
        dtype = torch.float32 if args.preset == "small" else torch.bfloat16
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            args.weights_from, attn_implementation="sdpa", dtype=dtype).to(device).eval()
        if model.config.text_config.hidden_size != config.text_config.hidden_size or \
                model.config.text_config.num_hidden_layers != config.text_config.num_hidden_layers:
            raise SystemExit(f"--weights-from {args.weights_from} is not the {args.preset} shape")
    elif args.preset == "small":
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                                dtype=torch.float32).to(device).eval()
    else:
        if device.type != "cuda":
            raise SystemExit("--preset 3b is built on a GPU: pass --device cuda")
        with device:
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                                    dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    text = args.prompt_tokens - args.images * (IMAGE_TOKENS + 2)
    if text < 2:
        raise SystemExit(f"--prompt-tokens must leave room for the images' {args.images * (IMAGE_TOKENS + 2)} tokens")
    # The images split the text evenly (one image: half the words before it, half after).
    cuts = [text * k // (args.images + 1) for k in range(args.images + 2)]
    prompts = len(range(0, args.batch, args.group))
    ids, pixels = [], []
    for _ in range(prompts):
        words = torch.randint(0, TEXT_IDS, (text,), generator=g)
        parts = [words[cuts[0]:cuts[1]]]
        for k in range(1, args.images + 1):
            parts += [torch.tensor(image_span()), words[cuts[k]:cuts[k + 1]]]
        ids.append(torch.cat(parts))
        pixels.append(torch.cat([torch.randn(PATCHES, PATCH_DIM, generator=g) for _ in range(args.images)]))
    index = torch.arange(args.batch) // args.group
    batch = {
        "input_ids": torch.stack([ids[i] for i in index]),
        "pixel_values": torch.cat([pixels[i] for i in index]),
        "grid_thw": torch.tensor([GRID] * (args.batch * args.images), dtype=torch.int64),
        "responses": torch.randint(0, TEXT_IDS, (args.batch, args.response_tokens), generator=g),
    }
    scores = torch.randint(0, 2, (args.batch,), generator=g).float()
    mask = torch.ones(args.batch, args.response_tokens)
    token_scores = torch.zeros(args.batch, args.response_tokens)
    token_scores[:, -1] = scores
    batch["advantages"] = loss_impl(args.loss).advantages(token_scores, mask, index).contiguous()
    log(f"on-policy log-probabilities of {args.batch} sequences on {device}, {model.dtype}")
    on_device = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad():
        current = torch.cat([forward_log_probs(model, on_device, slice(i, i + args.micro))
                             for i in range(0, args.batch, args.micro)]).cpu()
    batch["old_log_prob"] = current
    batch["ref_log_prob"] = current.clone()
    out = Path(args.save)
    if args.weights_from:
        # Links to the checkpoint's files rather than a second copy of several GB.
        out.mkdir(parents=True, exist_ok=True)
        for source in Path(args.weights_from).resolve().iterdir():
            if source.suffix in (".safetensors", ".json") and source.name != "batch.safetensors":
                link = out / source.name
                link.unlink(missing_ok=True)
                link.symlink_to(source)
    else:
        model.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in batch.items()}, str(out / "batch.safetensors"))
    log(f"saved {out}: {args.preset}, {sum(p.numel() for p in model.parameters())} parameters in "
        f"{model.dtype}, {args.batch} x ({args.prompt_tokens} prompt + {args.response_tokens} response) "
        f"tokens, {args.images} image(s) per prompt")


class MasterWeights:
    """f32 masters of the bf16 model's trainable weights, as twin-ml's train/precision.rs keeps
    them: the optimizer updates the masters, the model computes with them rounded to bf16."""

    def __init__(self, params):
        self.params = params
        self.masters = [p.detach().float().clone() for p in params]

    def gradients_to_masters(self):
        # One tensor at a time, freeing each bf16 gradient as its f32 copy is made, so the two
        # sets never coexist in full.
        for p, m in zip(self.params, self.masters):
            m.grad = p.grad.float()
            p.grad = None

    @torch.no_grad()
    def masters_to_model(self):
        for p, m in zip(self.params, self.masters):
            p.copy_(m)


def optimizer_step(model, opt, batch, micro, masters, loss_fn):
    """One step as verl's actor runs it; returns the micro-batch losses and the gradient norm."""
    opt.zero_grad()
    model.zero_grad()
    b = batch["responses"].shape[0]
    starts = range(0, b, micro)
    losses = []
    for start in starts:
        rows = slice(start, start + micro)
        logp = forward_log_probs(model, batch, rows)
        mask = torch.ones_like(logp)
        adv = batch["advantages"][rows].unsqueeze(1) * mask
        loss = loss_fn.actor_loss(batch["old_log_prob"][rows], logp, adv, mask, batch["ref_log_prob"][rows])
        (loss / len(starts)).backward()
        losses.append(loss.item())
    if masters is None:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        opt.step()
    else:
        masters.gradients_to_masters()
        norm = torch.nn.utils.clip_grad_norm_(masters.masters, max_norm=1.0)
        opt.step()
        masters.masters_to_model()
    return losses, norm.item()


def run(args):
    sampler = gpu_memory.start(args.device)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.model, dtype=dtype,
                                                               attn_implementation="sdpa").to(device)
    batch = load_file(str(Path(args.model) / "batch.safetensors"), device=str(device))
    model.train()
    if args.train_vision == "off":
        model.model.visual.requires_grad_(False)
    if args.checkpointing == "on":
        model.gradient_checkpointing_enable()
    trainable = [p for p in model.parameters() if p.requires_grad]
    masters = MasterWeights(trainable) if dtype != torch.float32 else None
    # Fused on CUDA: one kernel per parameter group and no parameter-sized temporaries (the
    # default foreach implementation materialises several, which a 3B model cannot spare).
    opt = torch.optim.AdamW(trainable if masters is None else masters.masters, lr=LR, betas=(0.9, 0.999),
                            eps=1e-8, weight_decay=0.01, **({"fused": True} if device.type == "cuda" else {}))
    loss_fn = loss_impl(args.loss)
    setup = memory_mib("VmHWM")
    times, first = [], None
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        losses, norm = optimizer_step(model, opt, batch, args.micro, masters, loss_fn)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t
        first = first or {"micro_losses": losses, "grad_norm": norm}
        log(f"step {step}: {seconds:.2f} s, losses {losses}, grad norm {norm:.6g}")
        if step >= args.warmup:
            times.append(seconds)
    b, prompt, response = (int(batch["responses"].shape[0]), int(batch["input_ids"].shape[1]),
                           int(batch["responses"].shape[1]))
    step_s = statistics.median(times)
    print("RESULT " + json.dumps({
        "impl": "pytorch",
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "checkpointing": args.checkpointing == "on",
        "train_vision": args.train_vision == "on",
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "batch": b,
        "images_per_prompt": int(batch["grid_thw"].shape[0]) // b,
        "prompt_tokens": prompt,
        "response_tokens": response,
        "micro": args.micro,
        "loss_impl": loss_fn.name,
        "tokens_per_step": b * (prompt + response),
        "tokens_per_s": b * (prompt + response) / step_s,
        "step_s_median": step_s,
        "step_s_all": times,
        "peak_rss_mib": memory_mib("VmHWM"),
        "setup_rss_mib": setup,
        **gpu_memory.fields(sampler),
        "first_step": first,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save", help="write the checkpoint and batch.safetensors here, then stop")
    p.add_argument("--model", help="time steps on a directory --save wrote")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--group", type=int, default=4, help="sequences per prompt (GRPO group)")
    p.add_argument("--prompt-tokens", type=int, help="--save: 300 (small), 600 (3b)")
    p.add_argument("--response-tokens", type=int, help="--save: 64 (small), 128 (3b)")
    p.add_argument("--micro", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--checkpointing", choices=["on", "off"], default="off")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                   help="--model: f32, or bf16 compute with f32 master weights (auto: bf16 on cuda, f32 on the cpu)")
    p.add_argument("--train-vision", choices=["on", "off"], default="on",
                   help="--model: off freezes the vision tower")
    p.add_argument("--preset", choices=sorted(qr.PRESETS), default="small", help="--save: the model's shape")
    p.add_argument("--weights-from", help="--save: link this checkpoint of the preset's shape (qwen_reference.py --save) "
                   "instead of building and saving a new random model")
    p.add_argument("--loss", choices=["auto", "verl", "inline"], default="auto",
                   help="the loss's code: verl's core_algos (auto: when importable) or the inline copy")
    p.add_argument("--images", type=int, help="--save: 448x448 images per prompt, 1 (small), 2 (3b)")
    args = p.parse_args()
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device == "cuda" else "f32"
    # The 3B batch is a TWIN pair rollout's: two 448x448 images and the question, then the answer.
    for name, value in SAVE_DEFAULTS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.save:
        save(args)
    elif args.model:
        run(args)
    else:
        p.error("--save DIR or --model DIR")


if __name__ == "__main__":
    main()
