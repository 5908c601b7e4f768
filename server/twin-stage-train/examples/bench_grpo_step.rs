//! Seconds per GRPO step of twin's trainer, by phase, on the checkpoint and prompts
//! `server/twin-ml/bench/grpo_step_reference.py --save` wrote: `Trainer::step` as the train
//! stage runs it (rollouts by the engine, the TWIN reward, the frozen reference's
//! log-probabilities, the update: dual-clip PPO + 0.01 × k3 KL, token-mean per micro-batch,
//! clipping at 1.0, AdamW), so its phases compare with the reference's `model.generate` +
//! PyTorch step on the same weights, prompts and thread count.
//!
//! ```text
//! .venv/bin/python server/twin-ml/bench/grpo_step_reference.py --save DIR
//! cargo run --release -p twin-stage-train --example bench_grpo_step -- --model DIR
//!     [--steps 2] [--warmup 1] [--group 4] [--new-tokens 32] [--micro 8] [--threads 2]
//!     [--lr 1e-6] [--seed 0]
//! ```
//! `deploy/bench-grpo.sh` runs both sides in one go. Prints a human line per step and one
//! `RESULT {json}` line with the per-phase seconds of every timed step and their medians.

use std::collections::BTreeMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{Value, json};
use twin_core::train::{TrainObjective, TrainStepMetrics};
use twin_ml::qwen::{QwenAssets, QwenVl};
use twin_ml::tch::{self, Device, Kind};
use twin_ml::train::{ActorLossConfig, AdamWConfig};
use twin_stage::StageError;
use twin_stage_train::data::{Example, training_message};
use twin_stage_train::trainer::{Response, Reward, TrainSettings, Trainer};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

struct Args {
    model: PathBuf,
    steps: usize,
    warmup: usize,
    group: usize,
    new_tokens: usize,
    micro: usize,
    threads: i32,
    lr: f64,
    seed: u64,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        model: PathBuf::new(),
        steps: 2,
        warmup: 1,
        group: 4,
        new_tokens: 32,
        micro: 8,
        threads: 2,
        lr: 1e-6,
        seed: 0,
    };
    let raw: Vec<String> = std::env::args().skip(1).collect();
    for pair in raw.chunks(2) {
        let value = pair
            .get(1)
            .ok_or_else(|| format!("{} needs a value", pair[0]))?;
        let bad = |e: &dyn std::fmt::Display| format!("{} {value}: {e}", pair[0]);
        match pair[0].as_str() {
            "--model" => args.model = PathBuf::from(value),
            "--steps" => args.steps = value.parse().map_err(|e| bad(&e))?,
            "--warmup" => args.warmup = value.parse().map_err(|e| bad(&e))?,
            "--group" => args.group = value.parse().map_err(|e| bad(&e))?,
            "--new-tokens" => args.new_tokens = value.parse().map_err(|e| bad(&e))?,
            "--micro" => args.micro = value.parse().map_err(|e| bad(&e))?,
            "--threads" => args.threads = value.parse().map_err(|e| bad(&e))?,
            "--lr" => args.lr = value.parse().map_err(|e| bad(&e))?,
            "--seed" => args.seed = value.parse().map_err(|e| bad(&e))?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if args.model.as_os_str().is_empty() {
        return Err(
            "--model DIR is required (written by bench/grpo_step_reference.py --save)".into(),
        );
    }
    if args.steps == 0 || args.group < 2 {
        return Err("--steps must be at least 1 and --group at least 2".into());
    }
    Ok(args)
}

/// The prompts of `prompts.json`: the training record's user turn over each pair of images,
/// prepared by the checkpoint's own processor, as the train stage prepares a dataset's rows.
fn load_examples(dir: &Path, assets: &QwenAssets) -> Result<Vec<Example>> {
    let path = dir.join("prompts.json");
    let spec: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let question = spec["question"]
        .as_str()
        .ok_or_else(|| format!("{}: no question", path.display()))?;
    let mut examples = Vec::new();
    for p in spec["prompts"]
        .as_array()
        .ok_or_else(|| format!("{}: no prompts", path.display()))?
    {
        let mut images = Vec::new();
        for file in p["images"].as_array().into_iter().flatten() {
            let name = file.as_str().ok_or("an image path is not a string")?;
            images.push((name, image::open(dir.join(name))?));
        }
        let named: Vec<(&str, &image::DynamicImage)> =
            images.iter().map(|(n, i)| (*n, i)).collect();
        let prompt = assets.processor.prepare(
            &assets.tokenizer,
            &[training_message(images.len(), question)],
            &named,
            true,
        )?;
        examples.push(Example {
            id: p["id"].as_str().unwrap_or_default().to_owned(),
            question: question.to_owned(),
            answer: p["answer"].as_str().unwrap_or_default().to_owned(),
            prompt,
        });
    }
    Ok(examples)
}

/// The recipe's GRPO settings with the benchmark's sizes; the whole model trains, as in the
/// reference.
fn settings(args: &Args, prompts: usize) -> TrainSettings {
    TrainSettings {
        objective: TrainObjective::Grpo,
        group_size: args.group,
        micro_batch: args.micro,
        learning_rate: args.lr,
        actor: ActorLossConfig::default(),
        adamw: AdamWConfig::default(),
        temperature: 1.0,
        top_p: 1.0,
        max_response_tokens: args.new_tokens,
        max_prompt_tokens: 8192,
        train_vision: true,
        seed: args.seed,
        // Every rollout of the step decoded together, as the reference's one `generate` call.
        engine_rows: prompts * args.group,
        activation_checkpointing: false,
    }
}

/// The TWIN reward, natively (the catalogue's `binary-match` is the same Rust source).
fn twin_reward(responses: &[Response<'_>]) -> std::result::Result<Vec<Reward>, StageError> {
    Ok(responses
        .iter()
        .map(|r| Reward {
            score: twin_rules::binary_match(r.completion, &r.example.answer),
            components: BTreeMap::new(),
        })
        .collect())
}

fn never() -> std::result::Result<(), StageError> {
    Ok(())
}

/// The middle value, or the mean of the two middle ones (Python's `statistics.median`, which the
/// reference and the summary use).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

const PHASES: [&str; 5] = ["rollout_s", "reward_s", "logprob_s", "update_s", "step_s"];

fn phases(m: &TrainStepMetrics, step_s: f64) -> [f64; 5] {
    [
        m.rollout_seconds,
        m.reward_seconds,
        m.logprob_seconds,
        m.update_seconds,
        step_s,
    ]
}

fn main() -> Result<()> {
    let args = parse_args()?;
    tch::set_num_threads(args.threads);
    // f32 on the CPU, as the train stage computes there; the reference is a second copy.
    let model = QwenVl::load_as(&args.model, Device::Cpu, Kind::Float)?;
    let reference = QwenVl::load_as(&args.model, Device::Cpu, Kind::Float)?;
    let assets = QwenAssets::load(&args.model, model.config())?;
    let examples = load_examples(&args.model, &assets)?;
    let parameters = model.parameter_counts().total();
    let prompt_tokens = examples.first().map_or(0, |e| e.prompt.len());
    let mut trainer = Trainer::new(
        model,
        Some(reference),
        assets,
        settings(&args, examples.len()),
    )?;
    println!(
        "model {} ({parameters} parameters), threads {}, {} prompts of {prompt_tokens} tokens x \
         group {}, {} new tokens, micro-batches of {}",
        args.model.display(),
        tch::get_num_threads(),
        examples.len(),
        args.group,
        args.new_tokens,
        args.micro
    );
    let batch: Vec<&Example> = examples.iter().collect();
    let mut reward = twin_reward;
    let mut timed: Vec<Vec<f64>> = vec![Vec::new(); PHASES.len()];
    let mut steps = Vec::new();
    for step in 1..=(args.warmup + args.steps) as u64 {
        let started = Instant::now();
        let report = trainer.step(step, &batch, &mut reward, &never)?;
        let step_s = started.elapsed().as_secs_f64();
        let m = &report.metrics;
        let values = phases(m, step_s);
        let tokens: usize = report.rollouts.iter().map(|r| r.tokens).sum();
        let what = if step as usize <= args.warmup {
            "warm-up"
        } else {
            "timed"
        };
        println!(
            "step {step} ({what}): {}; {tokens} response tokens, reward {:.3}",
            PHASES
                .iter()
                .zip(values)
                .map(|(p, v)| format!("{p} {v:.3}"))
                .collect::<Vec<_>>()
                .join(", "),
            m.reward_mean
        );
        if step as usize > args.warmup {
            for (all, v) in timed.iter_mut().zip(values) {
                all.push(v);
            }
            steps.push(json!({
                "reward_mean": m.reward_mean,
                "response_tokens": tokens,
                "grad_norm": m.grad_norm,
                "kl": m.kl,
                "entropy": m.entropy,
                "tokens_per_second": m.tokens_per_second,
                "logprob_gap": m.logprob_gap,
            }));
        }
    }
    let medians: serde_json::Map<String, Value> = PHASES
        .iter()
        .zip(&timed)
        .map(|(p, v)| ((*p).to_owned(), json!(median(v.clone()))))
        .collect();
    let all: serde_json::Map<String, Value> = PHASES
        .iter()
        .zip(&timed)
        .map(|(p, v)| ((*p).to_owned(), json!(v)))
        .collect();
    println!(
        "RESULT {}",
        json!({
            "impl": "twin",
            "threads": tch::get_num_threads(),
            "prompts": examples.len(),
            "group": args.group,
            "prompt_tokens": prompt_tokens,
            "new_tokens": args.new_tokens,
            "micro": args.micro,
            "median": medians,
            "all": all,
            "steps": steps,
        })
    );
    Ok(())
}
