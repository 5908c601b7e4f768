//! Rollout throughput of the Qwen2.5-VL engine on TWIN-shaped requests: each request is the
//! pair task (two 448×448 images and the pair question) sampled at temperature 1 for exactly
//! `--new-tokens` tokens (no stop token, as the reference forces `min_new_tokens`). Per batch
//! size it reports the median over `--repeats` timed runs (after `--warmup`) of the whole
//! `generate` call and its phases (vision, prefill, decode), and rollout tokens/s =
//! batch × new tokens / generate seconds — the figure `bench/qwen_reference.py` reports for
//! transformers' `generate` on the same checkpoint and prompts.
//!
//! ```text
//! .venv/bin/python server/twin-ml/bench/qwen_reference.py --save DIR --save-only
//! cargo run --release -p twin-ml --example bench_qwen -- --model DIR [--batch 8 32]
//!     [--new-tokens 128] [--repeats 3] [--warmup 1] [--threads 2] [--device cpu|cuda]
//! ```
//! `deploy/bench-qwen.sh` runs both sides in one go. Prints a human line per batch size and
//! one `RESULT {json}` line each.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use serde_json::Value;
use twin_ml::qwen::{
    EngineOptions, GenerationRequest, Message, Part, QwenAssets, QwenVl, SamplingParams, generate,
};
use twin_ml::tch;

struct Args {
    model: PathBuf,
    batches: Vec<usize>,
    new_tokens: usize,
    repeats: usize,
    warmup: usize,
    threads: Option<i32>,
    device: twin_ml::DeviceRequest,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        model: PathBuf::new(),
        batches: vec![8, 32],
        new_tokens: 128,
        repeats: 3,
        warmup: 1,
        threads: None,
        device: twin_ml::DeviceRequest::Cpu,
    };
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let value = |i: usize| -> anyhow::Result<&String> {
        raw.get(i + 1)
            .with_context(|| format!("{} needs a value", raw[i]))
    };
    while i < raw.len() {
        match raw[i].as_str() {
            "--model" => args.model = PathBuf::from(value(i)?),
            "--batch" => {
                args.batches.clear();
                while let Some(v) = raw.get(i + 1).filter(|v| !v.starts_with("--")) {
                    args.batches.push(v.parse().context("--batch")?);
                    i += 1;
                }
                i -= 1;
            }
            "--new-tokens" => args.new_tokens = value(i)?.parse()?,
            "--repeats" => args.repeats = value(i)?.parse()?,
            "--warmup" => args.warmup = value(i)?.parse()?,
            "--threads" => args.threads = Some(value(i)?.parse()?),
            "--device" => {
                args.device = match value(i)?.as_str() {
                    "cpu" => twin_ml::DeviceRequest::Cpu,
                    "cuda" => twin_ml::DeviceRequest::Cuda,
                    "auto" => twin_ml::DeviceRequest::Auto,
                    other => bail!("--device {other}: cpu, cuda or auto"),
                }
            }
            other => bail!("unknown argument {other}"),
        }
        i += 2;
    }
    if args.model.as_os_str().is_empty() {
        bail!("--model DIR is required (a bundle written by bench/qwen_reference.py --save)");
    }
    Ok(args)
}

/// The pairs' chats from `requests.json`, with their image files.
fn load_pairs(dir: &std::path::Path) -> anyhow::Result<Vec<(Vec<Message>, Vec<PathBuf>)>> {
    let text = std::fs::read_to_string(dir.join("requests.json")).context("requests.json")?;
    let requests: Value = serde_json::from_str(&text)?;
    let mut pairs = Vec::new();
    for chat in requests["pairs"]
        .as_array()
        .context("requests.json: pairs")?
    {
        let mut messages = Vec::new();
        let mut files = Vec::new();
        for m in chat.as_array().context("a pair is a list of messages")? {
            let mut content = Vec::new();
            for part in m["content"].as_array().context("content parts")? {
                match part["type"].as_str() {
                    Some("image") => {
                        files.push(dir.join(part["image"].as_str().context("image path")?));
                        content.push(Part::Image);
                    }
                    Some("text") => content.push(Part::Text {
                        text: part["text"].as_str().unwrap_or_default().to_owned(),
                    }),
                    other => bail!("unknown part type {other:?}"),
                }
            }
            messages.push(Message {
                role: m["role"].as_str().unwrap_or("user").to_owned(),
                content,
            });
        }
        pairs.push((messages, files));
    }
    Ok(pairs)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    if let Some(t) = args.threads {
        tch::set_num_threads(t);
    }
    let device = twin_ml::device::select(args.device)?;
    let model = QwenVl::load(&args.model, device)?;
    let assets = QwenAssets::load(&args.model, model.config())?;
    let pairs = load_pairs(&args.model)?;
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 1.0,
        top_k: 0,
        max_new_tokens: args.new_tokens,
        stop_token_ids: Vec::new(),
        seed: 0,
    };
    println!(
        "model {} ({} parameters, {:?} on {:?}), threads {}, {} new tokens",
        args.model.display(),
        model.parameter_counts().total(),
        model.kind(),
        device,
        tch::get_num_threads(),
        args.new_tokens
    );
    for &batch in &args.batches {
        let t0 = Instant::now();
        let images: Vec<Vec<(String, image::DynamicImage)>> = pairs
            .iter()
            .map(|(_, files)| {
                files
                    .iter()
                    .map(|f| Ok((f.display().to_string(), image::open(f)?)))
                    .collect::<anyhow::Result<Vec<_>>>()
            })
            .collect::<anyhow::Result<_>>()?;
        let prompts = (0..batch)
            .map(|i| {
                let p = i % pairs.len();
                let named: Vec<(&str, &image::DynamicImage)> =
                    images[p].iter().map(|(n, img)| (n.as_str(), img)).collect();
                assets
                    .processor
                    .prepare(&assets.tokenizer, &pairs[p].0, &named, true)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let preprocess = t0.elapsed().as_secs_f64();
        let requests: Vec<GenerationRequest<'_>> = prompts
            .iter()
            .map(|p| GenerationRequest {
                prompt: p,
                samples: 1,
                params: &params,
            })
            .collect();
        let options = EngineOptions {
            max_batch_rows: batch,
            ..EngineOptions::default()
        };
        let (mut total, mut vision, mut prefill, mut decode) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for run in 0..args.warmup + args.repeats {
            let t = Instant::now();
            let (out, stats) = generate(&model, &requests, &options)?;
            let seconds = t.elapsed().as_secs_f64();
            let tokens: usize = out.iter().map(|c| c[0].tokens.len()).sum();
            if tokens != batch * args.new_tokens {
                bail!(
                    "generated {tokens} tokens, expected {}",
                    batch * args.new_tokens
                );
            }
            if run >= args.warmup {
                total.push(seconds);
                vision.push(stats.vision_seconds);
                prefill.push(stats.prefill_seconds);
                decode.push(stats.decode_seconds);
            }
        }
        let generate_s = median(total.clone());
        let tokens_per_s = (batch * args.new_tokens) as f64 / generate_s;
        let decode_s = median(decode.clone());
        println!(
            "batch {batch:>3}: {} prompt tokens each, generate {generate_s:.3} s (vision {:.3}, \
             prefill {:.3}, decode {decode_s:.3}), {tokens_per_s:.1} rollout tokens/s, \
             {:.1} ms per decode step",
            prompts[0].len(),
            median(vision.clone()),
            median(prefill.clone()),
            decode_s * 1000.0 / args.new_tokens as f64
        );
        println!(
            "RESULT {}",
            serde_json::json!({
                "batch": batch,
                "prompt_tokens": prompts[0].len(),
                "new_tokens": args.new_tokens,
                "preprocess_s": preprocess,
                "generate_s_median": generate_s,
                "vision_s_median": median(vision),
                "prefill_s_median": median(prefill),
                "decode_s_median": decode_s,
                "rollout_tokens_per_s": tokens_per_s,
                "generate_s_all": total,
            })
        );
    }
    Ok(())
}
