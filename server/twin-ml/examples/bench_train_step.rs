//! Seconds per GRPO optimizer step, training tokens/s and peak memory of twin-ml's trainer
//! core, on the checkpoint and batch `bench/train_step_reference.py --save` wrote: per
//! micro-batch of `--micro` sequences, `QwenVl::backward_response_loss` (forward with gradients,
//! the response positions' log-probabilities in vocabulary chunks, the actor loss — dual-clip
//! policy loss plus 0.01 × low_var_kl, token-mean — scaled by 1 / micro-batches, backward), then
//! AdamW with clipping at 1.0 at learning rate 1e-6: the step the reference times for PyTorch.
//! With `--checkpointing on`, activation checkpointing (each decoder layer and vision block
//! recomputed in the backward pass, the head's backward chunk by chunk); with
//! `--train-vision off`, a frozen vision tower.
//!
//! `--device cpu` (the default) or `cuda`. `--dtype f32` (the default on the CPU) computes and
//! updates in f32; `--dtype bf16` (the default on CUDA: `auto` is the device's compute kind) is
//! the trainer's mixed precision (`train::MasterWeights`, as twin-stage-train's trainer sets it
//! up on a GPU): the model computes in bf16 and AdamW updates f32 master weights. On CUDA each
//! step's clock stops after `tch::Cuda::synchronize`.
//! Training tokens/s = sequences × (prompt + response tokens) / median step seconds.
//!
//! ```text
//! .venv/bin/python server/twin-ml/bench/train_step_reference.py --save DIR
//! cargo run --release -p twin-ml --example bench_train_step -- --model DIR
//!     [--checkpointing on|off] [--steps 2] [--warmup 1] [--micro 4] [--threads 2]
//!     [--chunk-rows 1024] [--device cpu|cuda] [--dtype auto|f32|bf16] [--train-vision on|off]
//! ```
//! `deploy/bench-train.sh` runs both sides in one go. Peak memory is the process's resident
//! high-water mark (VmHWM), so each configuration runs in a process of its own; on CUDA also the
//! GPU's, from NVML and the driver's free memory (`examples/common/gpu_memory.rs`: tch cannot
//! read libtorch's allocator statistics). Prints a human line per step and one `RESULT {json}`
//! line.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use twin_ml::qwen::rope::prompt_positions;
use twin_ml::qwen::{
    Grid, PreparedImage, PreparedPrompt, QwenVl, ResponseLogProbs, TrainForwardOptions,
    TrainSequence,
};
use twin_ml::tch::{self, Device, Kind, Tensor};
use twin_ml::train::{
    ActorLossConfig, ActorLossInputs, AdamW, AdamWConfig, MasterWeights, PolicyLossInputs,
    StepOutcome, accumulate_micro_batches, actor_loss,
};

#[path = "common/gpu_memory.rs"]
mod gpu_memory;

const LR: f64 = 1e-6;

struct Args {
    model: PathBuf,
    checkpointing: bool,
    steps: usize,
    warmup: usize,
    micro: usize,
    threads: i32,
    chunk_rows: i64,
    cuda: bool,
    /// `None`: the device's compute kind (bf16 on CUDA, f32 on the CPU).
    kind: Option<Kind>,
    train_vision: bool,
}

fn on_off(flag: &str, value: &str) -> anyhow::Result<bool> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        other => bail!("{flag} {other}: on or off"),
    }
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        model: PathBuf::new(),
        checkpointing: false,
        steps: 2,
        warmup: 1,
        micro: 4,
        threads: 2,
        chunk_rows: TrainForwardOptions::default().logit_chunk_rows,
        cuda: false,
        kind: None,
        train_vision: true,
    };
    let raw: Vec<String> = std::env::args().skip(1).collect();
    for pair in raw.chunks(2) {
        let value = pair
            .get(1)
            .with_context(|| format!("{} needs a value", pair[0]))?;
        match pair[0].as_str() {
            "--model" => args.model = PathBuf::from(value),
            "--checkpointing" => args.checkpointing = on_off("--checkpointing", value)?,
            "--train-vision" => args.train_vision = on_off("--train-vision", value)?,
            "--device" => {
                args.cuda = match value.as_str() {
                    "cpu" => false,
                    "cuda" => true,
                    other => bail!("--device {other}: cpu or cuda"),
                }
            }
            "--dtype" => {
                args.kind = match value.as_str() {
                    "f32" => Some(Kind::Float),
                    "bf16" => Some(Kind::BFloat16),
                    "auto" => None,
                    other => bail!("--dtype {other}: f32, bf16 or auto"),
                }
            }
            "--steps" => args.steps = value.parse().context("--steps")?,
            "--warmup" => args.warmup = value.parse().context("--warmup")?,
            "--micro" => args.micro = value.parse().context("--micro")?,
            "--threads" => args.threads = value.parse().context("--threads")?,
            "--chunk-rows" => args.chunk_rows = value.parse().context("--chunk-rows")?,
            other => bail!("unknown argument {other}"),
        }
    }
    if args.model.as_os_str().is_empty() {
        bail!("--model DIR is required (written by bench/train_step_reference.py --save)");
    }
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    Ok(args)
}

/// The batch the reference wrote: prompts (one per sequence), responses, advantages and the
/// old and reference log-probabilities.
struct Batch {
    prompts: Vec<PreparedPrompt>,
    responses: Vec<Vec<i64>>,
    advantages: Tensor,
    old_log_prob: Tensor,
    ref_log_prob: Tensor,
}

fn load_batch(dir: &Path, model: &QwenVl, device: Device) -> anyhow::Result<Batch> {
    let path = dir.join("batch.safetensors");
    let tensors: std::collections::HashMap<String, Tensor> =
        twin_ml::weights::read_safetensors(&path)?
            .into_iter()
            .collect();
    let get = |name: &str| {
        tensors
            .get(name)
            .map(Tensor::shallow_clone)
            .with_context(|| format!("{}: no tensor {name}", path.display()))
    };
    let (ids, pixels, grids) = (get("input_ids")?, get("pixel_values")?, get("grid_thw")?);
    let responses = get("responses")?;
    let config = model.config();
    let sequences = ids.size()[0];
    // grid_thw and pixel_values hold each sequence's images in turn, the same count each.
    let per_sequence = grids.size()[0] / sequences.max(1);
    if per_sequence * sequences != grids.size()[0] || per_sequence == 0 {
        bail!(
            "{}: {} images for {sequences} sequences",
            path.display(),
            grids.size()[0]
        );
    }
    // The loss's inputs live where the model's log-probabilities are computed.
    let mut batch = Batch {
        prompts: Vec::new(),
        responses: Vec::new(),
        advantages: get("advantages")?.to_device(device),
        old_log_prob: get("old_log_prob")?.to_device(device),
        ref_log_prob: get("ref_log_prob")?.to_device(device),
    };
    let patch = config.vision.patch_size as usize;
    let merge = config.vision.spatial_merge_size;
    let mut start = 0;
    for i in 0..sequences {
        let mut images = Vec::new();
        for j in 0..per_sequence {
            let thw = Vec::<i64>::try_from(grids.get(i * per_sequence + j))?;
            let grid = Grid {
                t: thw[0],
                h: thw[1],
                w: thw[2],
            };
            images.push(PreparedImage {
                patches: Vec::<f32>::try_from(
                    pixels.narrow(0, start, grid.patches()).flatten(0, -1),
                )?,
                grid,
                resized: (grid.h as usize * patch, grid.w as usize * patch),
            });
            start += grid.patches();
        }
        let input_ids = Vec::<i64>::try_from(ids.get(i))?;
        let image_grids: Vec<Grid> = images.iter().map(|image| image.grid).collect();
        let positions = prompt_positions(&input_ids, &image_grids, config.image_token_id, merge)
            .map_err(|m| anyhow::anyhow!("{}: sequence {i}: {m}", path.display()))?;
        batch.prompts.push(PreparedPrompt {
            input_ids,
            images,
            positions,
            text: String::new(),
        });
        batch
            .responses
            .push(Vec::<i64>::try_from(responses.get(i))?);
    }
    Ok(batch)
}

/// The actor loss of micro-batch `rows` from its log-probabilities.
fn micro_loss(
    batch: &Batch,
    rows: &std::ops::Range<usize>,
    out: &ResponseLogProbs,
) -> Result<(Tensor, f64), twin_ml::MlError> {
    let (start, n) = (rows.start as i64, rows.len() as i64);
    let advantages = batch.advantages.narrow(0, start, n).unsqueeze(1) * &out.response_mask;
    let old = batch.old_log_prob.narrow(0, start, n);
    let reference = batch.ref_log_prob.narrow(0, start, n);
    let inputs = ActorLossInputs {
        policy: PolicyLossInputs {
            old_log_prob: &old,
            log_prob: &out.log_prob,
            advantages: &advantages,
            response_mask: &out.response_mask,
        },
        ref_log_prob: Some(&reference),
        entropy: None,
    };
    let loss = actor_loss(inputs, &ActorLossConfig::default())?;
    let value = loss.loss.double_value(&[]);
    Ok((loss.loss, value))
}

/// The process's resident high-water mark in MiB.
fn peak_rss_mib() -> anyhow::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("/proc/self/status has no VmHWM")?;
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .context("VmHWM's value")?
        .parse()?;
    Ok(kib / 1024.0)
}

/// The median as Python's `statistics.median` takes it (the mean of the middle two of an even
/// count), so both sides summarise the same way.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Waits until the work queued on `device` is done, so a clock read after it times finished
/// work (CUDA kernels run asynchronously).
fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// The optimizer and, for a model computing below f32, the f32 master weights it updates
/// (as twin-stage-train's trainer sets them up).
struct Optimizer {
    adamw: AdamW,
    masters: Option<MasterWeights>,
}

impl Optimizer {
    fn new(model: &QwenVl) -> anyhow::Result<Optimizer> {
        Ok(if model.kind() == Kind::Float {
            Optimizer {
                adamw: AdamW::new(model.trainable_parameters(), AdamWConfig::default())?,
                masters: None,
            }
        } else {
            let masters = MasterWeights::new(model.trainable_parameters())?;
            Optimizer {
                adamw: AdamW::new(masters.masters(), AdamWConfig::default())?,
                masters: Some(masters),
            }
        })
    }

    fn zero_grad(&mut self) {
        match &mut self.masters {
            Some(masters) => masters.zero_grad(),
            None => self.adamw.zero_grad(),
        }
    }

    fn step(&mut self, lr: f64) -> anyhow::Result<StepOutcome> {
        Ok(match &self.masters {
            Some(masters) => masters.step(&mut self.adamw, lr)?,
            None => self.adamw.step(lr)?,
        })
    }
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    // Before anything touches CUDA, so the sampler's baseline is other processes' memory only.
    let sampler = args.cuda.then(gpu_memory::GpuMemory::start);
    tch::set_num_threads(args.threads);
    let device = if args.cuda {
        twin_ml::device::select(twin_ml::DeviceRequest::Cuda)?
    } else {
        Device::Cpu
    };
    let kind = args
        .kind
        .unwrap_or_else(|| twin_ml::device::compute_kind(device));
    let mut model = QwenVl::load_as(&args.model, device, kind)?;
    let batch = load_batch(&args.model, &model, device)?;
    model.set_trainable(args.train_vision);
    let mut optimizer = Optimizer::new(&model)?;
    let sequences: Vec<TrainSequence<'_>> = batch
        .prompts
        .iter()
        .zip(&batch.responses)
        .map(|(prompt, response)| TrainSequence { prompt, response })
        .collect();
    let options = TrainForwardOptions {
        train_vision: args.train_vision,
        logit_chunk_rows: args.chunk_rows,
        entropy: false,
        activation_checkpointing: args.checkpointing,
        ..TrainForwardOptions::default()
    };
    let setup = peak_rss_mib()?;
    let (prompt_tokens, response_tokens) = (batch.prompts[0].len(), batch.responses[0].len());
    let trainable: i64 = model
        .trainable_parameters()
        .iter()
        .map(|(_, t)| t.numel() as i64)
        .sum();
    let dtype = if kind == Kind::BFloat16 {
        "bf16"
    } else {
        "f32"
    };
    println!(
        "model {} ({} parameters, {trainable} trainable), {}, {dtype}{}, threads {}, {} sequences x \
         ({prompt_tokens} prompt + {response_tokens} response) tokens, micro-batches of {}, \
         checkpointing {}",
        args.model.display(),
        model.parameter_counts().total(),
        twin_ml::device::describe(),
        if optimizer.masters.is_some() {
            " compute with f32 master weights"
        } else {
            ""
        },
        tch::get_num_threads(),
        sequences.len(),
        args.micro,
        args.checkpointing
    );
    let (mut times, mut first) = (Vec::new(), None);
    for step in 0..args.warmup + args.steps {
        synchronize(device);
        let t = Instant::now();
        optimizer.zero_grad();
        let model = &model;
        let losses = accumulate_micro_batches(sequences.len(), args.micro, |rows, scale| {
            model.backward_response_loss(&sequences[rows.clone()], &options, scale, |out| {
                micro_loss(&batch, &rows, out)
            })
        })?;
        let outcome = optimizer.step(LR)?;
        synchronize(device);
        let seconds = t.elapsed().as_secs_f64();
        println!(
            "step {step}: {seconds:.2} s, losses {losses:?}, grad norm {:.6}",
            outcome.grad_norm
        );
        first.get_or_insert((losses, outcome.grad_norm));
        if step >= args.warmup {
            times.push(seconds);
        }
    }
    let (losses, grad_norm) = first.context("at least one step ran")?;
    let step_s = median(times.clone());
    let tokens = sequences.len() * (prompt_tokens + response_tokens);
    let mut result = serde_json::json!({
        "impl": "twin-ml",
        "device": if args.cuda { "cuda" } else { "cpu" },
        "dtype": dtype,
        "checkpointing": args.checkpointing,
        "train_vision": args.train_vision,
        "threads": tch::get_num_threads(),
        "parameters": model.parameter_counts().total(),
        "trainable_parameters": trainable,
        "batch": sequences.len(),
        "images_per_prompt": batch.prompts[0].images.len(),
        "prompt_tokens": prompt_tokens,
        "response_tokens": response_tokens,
        "micro": args.micro,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens as f64 / step_s,
        "step_s_median": step_s,
        "step_s_all": times,
        "peak_rss_mib": peak_rss_mib()?,
        "setup_rss_mib": setup,
        "first_step": {"micro_losses": losses, "grad_norm": grad_norm},
    });
    if let (Some(fields), Some(object)) = (
        gpu_memory::fields(sampler).as_object(),
        result.as_object_mut(),
    ) {
        object.extend(fields.clone());
    }
    println!("RESULT {result}");
    Ok(())
}
