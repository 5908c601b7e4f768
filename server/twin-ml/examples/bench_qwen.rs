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
//!     [--group 5] [--decode auto|eager|static|graphs ...] [--peak-bandwidth 4.8]
//! ```
//! `deploy/bench-qwen.sh` runs both sides in one go. Prints a human line per batch size and
//! one `RESULT {json}` line each.
//!
//! `--group N` draws N sequences per prompt, as GRPO does (the batch still counts sequences;
//! the engine prefills each prompt once). `--decode eager graphs` runs each decode path in turn
//! (CUDA graphs need a GPU) and reports each one's time per decode step, the bytes a step reads
//! (the text model's weights and the key/value cache) over that time, against
//! `--peak-bandwidth` TB/s when given, and whether its tokens agree with the first path's.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use serde_json::Value;
use twin_ml::qwen::text::KvCache;
use twin_ml::qwen::{
    Completion, DecodeMode, EngineOptions, GenerationRequest, Message, Part, QwenAssets, QwenVl,
    SamplingParams, generate,
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
    group: usize,
    decodes: Vec<DecodeMode>,
    peak_bandwidth_tbs: Option<f64>,
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
        group: 1,
        decodes: vec![DecodeMode::Auto],
        peak_bandwidth_tbs: None,
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
            "--decode" => {
                args.decodes.clear();
                while let Some(v) = raw.get(i + 1).filter(|v| !v.starts_with("--")) {
                    args.decodes.push(match v.as_str() {
                        "auto" => DecodeMode::Auto,
                        "eager" => DecodeMode::Eager,
                        "static" => DecodeMode::Static,
                        "graphs" => DecodeMode::Graphs,
                        other => bail!("--decode {other}: auto, eager, static or graphs"),
                    });
                    i += 1;
                }
                i -= 1;
            }
            "--group" => args.group = value(i)?.parse::<usize>()?.max(1),
            "--peak-bandwidth" => args.peak_bandwidth_tbs = Some(value(i)?.parse()?),
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
        // One prompt per group of `--group` sequences (the last group may be smaller).
        let groups = batch.div_ceil(args.group);
        let prompts = (0..groups)
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
            .enumerate()
            .map(|(i, p)| GenerationRequest {
                prompt: p,
                samples: args.group.min(batch - i * args.group),
                params: &params,
            })
            .collect();
        let mut first_tokens: Option<Vec<Vec<Completion>>> = None;
        for &decode_mode in &args.decodes {
            let options = EngineOptions {
                max_batch_rows: batch,
                decode: decode_mode,
                ..EngineOptions::default()
            };
            let (mut total, mut vision, mut prefill, mut decode) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut last_stats = None;
            let mut agreement = None;
            for run in 0..args.warmup + args.repeats {
                let t = Instant::now();
                let (out, stats) = generate(&model, &requests, &options)?;
                let seconds = t.elapsed().as_secs_f64();
                let tokens: usize = out.iter().flatten().map(|c| c.tokens.len()).sum();
                if tokens != batch * args.new_tokens {
                    bail!(
                        "generated {tokens} tokens, expected {}",
                        batch * args.new_tokens
                    );
                }
                if run == 0 {
                    match &first_tokens {
                        None => first_tokens = Some(out),
                        Some(first) => agreement = Some(agree(first, &out)),
                    }
                }
                if run >= args.warmup {
                    total.push(seconds);
                    vision.push(stats.vision_seconds);
                    prefill.push(stats.prefill_seconds);
                    decode.push(stats.decode_seconds);
                }
                last_stats = Some(stats);
            }
            let stats = last_stats.context("at least one run")?;
            let generate_s = median(total.clone());
            let tokens_per_s = (batch * args.new_tokens) as f64 / generate_s;
            let decode_s = median(decode.clone());
            // Captures happen in the first (warm-up) run's batches too; a step's time is the
            // decode phase over its steps, captures included.
            let step_s = decode_s / stats.decode_steps.max(1) as f64;
            let bytes = step_bytes(
                &model,
                batch as i64,
                prompts[0].len() as i64,
                args.new_tokens as i64,
                stats.decode_path,
            );
            let achieved_tbs = bytes as f64 / step_s / 1e12;
            println!(
                "batch {batch:>3} ({groups} prompts), decode {:?} ran as {:?}: {} prompt tokens \
                 each, generate {generate_s:.3} s (vision {:.3}, prefill {:.3}, decode \
                 {decode_s:.3}), {tokens_per_s:.1} rollout tokens/s, {:.2} ms per decode step, \
                 {:.2} GB read per step = {achieved_tbs:.3} TB/s{}{}{}",
                decode_mode,
                stats.decode_path,
                prompts[0].len(),
                median(vision.clone()),
                median(prefill.clone()),
                step_s * 1000.0,
                bytes as f64 / 1e9,
                args.peak_bandwidth_tbs
                    .map(|p| format!(" ({:.1}% of {p} TB/s)", 100.0 * achieved_tbs / p))
                    .unwrap_or_default(),
                stats
                    .graph_fallback
                    .as_ref()
                    .map(|f| format!(", graphs not used: {f}"))
                    .unwrap_or_default(),
                agreement
                    .map(|(same, all)| format!(
                        ", {same} of {all} sequences equal the first path's"
                    ))
                    .unwrap_or_default(),
            );
            println!(
                "RESULT {}",
                serde_json::json!({
                    "batch": batch,
                    "group": args.group,
                    "prompts": groups,
                    "decode": decode_mode,
                    "decode_path": stats.decode_path,
                    "graph_fallback": stats.graph_fallback,
                    "graph_captures_last_run": stats.graph_captures,
                    "prompt_tokens": prompts[0].len(),
                    "new_tokens": args.new_tokens,
                    "preprocess_s": preprocess,
                    "generate_s_median": generate_s,
                    "vision_s_median": median(vision),
                    "prefill_s_median": median(prefill),
                    "decode_s_median": decode_s,
                    "decode_step_ms": step_s * 1000.0,
                    "bytes_per_step": bytes,
                    "achieved_tb_per_s": achieved_tbs,
                    "peak_tb_per_s": args.peak_bandwidth_tbs,
                    "sequences_equal_to_first_decode": agreement.map(|a| a.0),
                    "sequences": batch,
                    "rollout_tokens_per_s": tokens_per_s,
                    "generate_s_all": total,
                })
            );
        }
    }
    Ok(())
}

/// How many sequences of two runs of the same requests have identical tokens.
fn agree(a: &[Vec<Completion>], b: &[Vec<Completion>]) -> (usize, usize) {
    let pairs: Vec<(&Completion, &Completion)> =
        a.iter().flatten().zip(b.iter().flatten()).collect();
    let same = pairs.iter().filter(|(x, y)| x.tokens == y.tokens).count();
    (same, pairs.len())
}

/// Bytes one decode step reads at least: the text model's weights (the decoder and the output
/// head, which is the embedding when tied; the embedding's lookup reads a few rows only) and
/// the key/value cache of every row: up to the mean filled column on the eager path, the whole
/// capacity on the fixed-shape paths, which attend over it under a mask.
fn step_bytes(
    model: &QwenVl,
    rows: i64,
    prompt: i64,
    new_tokens: i64,
    path: Option<twin_ml::qwen::DecodePath>,
) -> u64 {
    let counts = model.parameter_counts();
    let head = if counts.lm_head > 0 {
        counts.lm_head
    } else {
        counts.embedding
    };
    let element = model.kind().elt_size_in_bytes() as u64;
    let weights = (counts.decoder + head) as u64 * element;
    let columns = match path {
        Some(twin_ml::qwen::DecodePath::Eager) | None => prompt + new_tokens / 2,
        Some(_) => prompt + new_tokens,
    };
    weights + KvCache::bytes(&model.config().text, rows, columns, model.kind())
}
