//! Seconds per GRPO optimizer step and peak memory of twin-ml's trainer core, on the checkpoint
//! and batch `bench/train_step_reference.py --save` wrote: per micro-batch of `--micro`
//! sequences, `QwenVl::backward_response_loss` (forward with gradients, the response
//! positions' log-probabilities in vocabulary chunks, the actor loss — dual-clip policy loss plus
//! 0.01 × low_var_kl, token-mean — scaled by 1 / micro-batches, backward), then AdamW with
//! clipping at 1.0 at learning rate 1e-6: the step the reference times for PyTorch. With
//! `--checkpointing on`, activation checkpointing (each decoder layer and vision block
//! recomputed in the backward pass, the head's backward chunk by chunk).
//!
//! ```text
//! .venv/bin/python server/twin-ml/bench/train_step_reference.py --save DIR
//! cargo run --release -p twin-ml --example bench_train_step -- --model DIR
//!     [--checkpointing on|off] [--steps 2] [--warmup 1] [--micro 4] [--threads 2]
//!     [--chunk-rows 1024]
//! ```
//! `deploy/bench-train.sh` runs both sides in one go. Peak memory is the process's resident
//! high-water mark (VmHWM), so each configuration runs in a process of its own. Prints a human
//! line per step and one `RESULT {json}` line.

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
    ActorLossConfig, ActorLossInputs, AdamW, AdamWConfig, PolicyLossInputs,
    accumulate_micro_batches, actor_loss,
};

const LR: f64 = 1e-6;

struct Args {
    model: PathBuf,
    checkpointing: bool,
    steps: usize,
    warmup: usize,
    micro: usize,
    threads: i32,
    chunk_rows: i64,
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
    };
    let raw: Vec<String> = std::env::args().skip(1).collect();
    for pair in raw.chunks(2) {
        let value = pair
            .get(1)
            .with_context(|| format!("{} needs a value", pair[0]))?;
        match pair[0].as_str() {
            "--model" => args.model = PathBuf::from(value),
            "--checkpointing" => {
                args.checkpointing = match value.as_str() {
                    "on" => true,
                    "off" => false,
                    other => bail!("--checkpointing {other}: on or off"),
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

fn load_batch(dir: &Path, model: &QwenVl) -> anyhow::Result<Batch> {
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
    let mut batch = Batch {
        prompts: Vec::new(),
        responses: Vec::new(),
        advantages: get("advantages")?,
        old_log_prob: get("old_log_prob")?,
        ref_log_prob: get("ref_log_prob")?,
    };
    let mut start = 0;
    for i in 0..ids.size()[0] {
        let thw = Vec::<i64>::try_from(grids.get(i))?;
        let grid = Grid {
            t: thw[0],
            h: thw[1],
            w: thw[2],
        };
        let input_ids = Vec::<i64>::try_from(ids.get(i))?;
        let patch = config.vision.patch_size as usize;
        let image = PreparedImage {
            patches: Vec::<f32>::try_from(pixels.narrow(0, start, grid.patches()).flatten(0, -1))?,
            grid,
            resized: (grid.h as usize * patch, grid.w as usize * patch),
        };
        start += grid.patches();
        let merge = config.vision.spatial_merge_size;
        let positions = prompt_positions(&input_ids, &[grid], config.image_token_id, merge)
            .map_err(|m| anyhow::anyhow!("{}: sequence {i}: {m}", path.display()))?;
        batch.prompts.push(PreparedPrompt {
            input_ids,
            images: vec![image],
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    tch::set_num_threads(args.threads);
    let mut model = QwenVl::load_as(&args.model, Device::Cpu, Kind::Float)?;
    let batch = load_batch(&args.model, &model)?;
    model.set_trainable(true);
    let mut optimizer = AdamW::new(model.trainable_parameters(), AdamWConfig::default())?;
    let sequences: Vec<TrainSequence<'_>> = batch
        .prompts
        .iter()
        .zip(&batch.responses)
        .map(|(prompt, response)| TrainSequence { prompt, response })
        .collect();
    let options = TrainForwardOptions {
        logit_chunk_rows: args.chunk_rows,
        entropy: false,
        activation_checkpointing: args.checkpointing,
        ..TrainForwardOptions::default()
    };
    let setup = peak_rss_mib()?;
    println!(
        "model {} ({} parameters), threads {}, {} sequences x ({} prompt + {} response) tokens, \
         micro-batches of {}, checkpointing {}",
        args.model.display(),
        model.parameter_counts().total(),
        tch::get_num_threads(),
        sequences.len(),
        batch.prompts[0].len(),
        batch.responses[0].len(),
        args.micro,
        args.checkpointing
    );
    let (mut times, mut first) = (Vec::new(), None);
    for step in 0..args.warmup + args.steps {
        let t = Instant::now();
        optimizer.zero_grad();
        let model = &model;
        let losses = accumulate_micro_batches(sequences.len(), args.micro, |rows, scale| {
            model.backward_response_loss(&sequences[rows.clone()], &options, scale, |out| {
                micro_loss(&batch, &rows, out)
            })
        })?;
        let outcome = optimizer.step(LR)?;
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
    println!(
        "RESULT {}",
        serde_json::json!({
            "impl": "twin-ml",
            "checkpointing": args.checkpointing,
            "threads": tch::get_num_threads(),
            "batch": sequences.len(),
            "micro": args.micro,
            "step_s_median": median(times.clone()),
            "step_s_all": times,
            "peak_rss_mib": peak_rss_mib()?,
            "setup_rss_mib": setup,
            "first_step": {"micro_losses": losses, "grad_norm": grad_norm},
        })
    );
    Ok(())
}
