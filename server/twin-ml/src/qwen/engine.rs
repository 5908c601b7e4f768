//! The rollout engine: batched generation for Qwen2.5-VL with a preallocated key/value cache.
//!
//! A batch holds several prompts of different lengths, each drawn `samples` times (GRPO draws
//! five per prompt). The work per batch:
//!
//! 1. **Vision**: every image of every prompt in one vision-tower call.
//! 2. **Prefill**, once per prompt, not per sample: prompts left-padded to the longest, run
//!    together under a mask that hides the padding (a padding query attends to itself only, so
//!    no row of the softmax is empty), writing the prompt-level cache.
//! 3. **Fan-out**: each prompt's cache prefix is copied into its samples' rows of the
//!    generation cache (`prompt length + max new tokens` columns, allocated once).
//! 4. **Decode**: one token per row per step, every row writing the same cache column (the
//!    left padding aligns them); positions continue each prompt's own 3-D index. Rows that
//!    finish (a stop token, or their token budget) are dropped from the batch once a quarter of
//!    it has finished, so finished sequences stop costing compute and nothing is recomputed.
//!    On a GPU the step runs as CUDA graphs, one per bucket of rows (the `decode` module).
//!
//! Sampling follows transformers' order — temperature, then top-k, then top-p — and draws by
//! inverting the cumulative distribution with one uniform number per row and step from that
//! row's own generator (seeded by the request's seed and the sample's index), so a sample's
//! tokens do not depend on what else shares its batch. The log-probability returned for each
//! token is under the temperature-scaled distribution *before* top-k/top-p truncation, the
//! convention GRPO's importance ratio needs. Temperature 0 means greedy decoding; its
//! log-probabilities are under the unscaled distribution.
//!
//! **Reproducibility.** The same requests, seeds, batch composition, thread count and libtorch
//! build give the same tokens, bit for bit. Another batch shape or thread count sums the same
//! floats in another order, so logits differ in their last bits (measured: log-probabilities
//! up to 3.6e-5 apart on the test model), and a choice that sits on a tie can flip. Each token therefore carries its
//! *margin* ([`Completion::margins`]): how far the scores would have to move to change it. The
//! promise across batch shapes and thread counts is that two runs of a request agree on every
//! token up to the first one whose margin, in either run, is below [`REPRODUCIBLE_MARGIN`];
//! [`Completion::divergence`] finds where two runs part and says whether that was allowed.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::chat::PreparedPrompt;
use super::decode::{DecodeMode, DecodePath, Decoder};
use super::model::{QwenVl, torch_call};
use super::preprocess::PreparedImage;
use super::text::{KvCache, TextMask};
use crate::MlError;

/// How to draw one request's tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// 0 for greedy decoding.
    pub temperature: f64,
    /// Nucleus sampling mass, in (0, 1]; 1 keeps every token.
    pub top_p: f64,
    /// Keep only the k most likely tokens; 0 keeps every token.
    pub top_k: usize,
    pub max_new_tokens: usize,
    /// Tokens that end a sequence (included in its output, as transformers includes EOS).
    pub stop_token_ids: Vec<i64>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: 128,
            stop_token_ids: Vec::new(),
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_new_tokens: usize, stop_token_ids: Vec<i64>) -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            max_new_tokens,
            stop_token_ids,
            ..SamplingParams::default()
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be finite and ≥ 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.max_new_tokens == 0 {
            return Err("max_new_tokens must be at least 1".into());
        }
        Ok(())
    }

    fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    fn truncates(&self) -> bool {
        !self.is_greedy() && (self.top_k > 0 || self.top_p < 1.0)
    }
}

/// One prompt, drawn `samples` times.
#[derive(Debug, Clone, Copy)]
pub struct GenerationRequest<'a> {
    pub prompt: &'a PreparedPrompt,
    pub samples: usize,
    pub params: &'a SamplingParams,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token was drawn (it is the last token).
    Stop,
    /// `max_new_tokens` were drawn.
    Length,
}

/// Below this margin ([`Completion::margins`], logit units) a token choice may differ between
/// batch shapes or thread counts; at or above it, it may not (the module's "Reproducibility").
/// A greedy choice clears it when its top two logits are 1e-3 apart. Float sums reordered by
/// another batch shape or thread count move f32 logits by far less (measured on the test model,
/// 1 against 2 and 3 threads: greedy log-probabilities at most 3.6e-5 apart).
pub const REPRODUCIBLE_MARGIN: f32 = 5e-4;

/// One sample's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub tokens: Vec<i64>,
    /// Per token, under the temperature-scaled distribution before truncation.
    pub logprobs: Vec<f32>,
    /// Per token, a lower bound on how far the logits would have to move (the largest change
    /// of any one logit) to choose another token. Greedy: half the gap between the two largest
    /// logits. Sampled at temperature T: a change ε of the logits moves the scaled ones by ε/T
    /// and any point of the cumulative distribution by at most 2ε/T, so a draw at distance d
    /// (a share of the mass) from the nearer edge of its token's interval needs ε ≥ T·d/2;
    /// where top-k or top-p truncate, the k-th score's lead and the nearest cumulative mass to
    /// top-p bound it the same way.
    pub margins: Vec<f32>,
    pub finish: FinishReason,
}

/// Where two completions of one request part: the first token they differ in (a missing
/// token when one is a strict prefix of the other) and each run's margin there.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Divergence {
    pub index: usize,
    pub tokens: (Option<i64>, Option<i64>),
    /// `f32::INFINITY` for a missing token: one run stopping early is never a near tie.
    pub margins: (f32, f32),
}

impl Divergence {
    /// Whether the reproducibility promise allows this divergence: the choice was within
    /// [`REPRODUCIBLE_MARGIN`] of flipping in one of the runs.
    pub fn is_near_tie(&self) -> bool {
        self.margins.0.min(self.margins.1) < REPRODUCIBLE_MARGIN
    }
}

impl Completion {
    /// The first token where `self` and `other` (the same request run twice) differ, if any.
    pub fn divergence(&self, other: &Completion) -> Option<Divergence> {
        let longest = self.tokens.len().max(other.tokens.len());
        (0..longest).find_map(|index| {
            let tokens = (
                self.tokens.get(index).copied(),
                other.tokens.get(index).copied(),
            );
            (tokens.0 != tokens.1).then(|| {
                let margin = |c: &Completion| c.margins.get(index).copied();
                Divergence {
                    index,
                    tokens,
                    margins: (
                        margin(self)
                            .filter(|_| tokens.0.is_some())
                            .unwrap_or(f32::INFINITY),
                        margin(other)
                            .filter(|_| tokens.1.is_some())
                            .unwrap_or(f32::INFINITY),
                    ),
                }
            })
        })
    }
}

/// Limits of one engine run.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Sequences (samples) decoded together; requests are batched up to this many rows (a
    /// request with more samples gets a batch of its own).
    pub max_batch_rows: usize,
    /// Longest prompt plus new tokens allowed; the model's `max_position_embeddings` when
    /// `None`.
    pub max_context: Option<usize>,
    /// Padded prompt tokens per prefill forward pass (at least one prompt per pass): the
    /// attention scores of a whole batch of long prompts would not fit in memory on the CPU's
    /// math path, and larger passes gain nothing once the matrices are this big.
    pub prefill_tokens: usize,
    /// How decode steps run: CUDA graphs on a GPU by default (the `decode` module).
    pub decode: DecodeMode,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_batch_rows: 64,
            max_context: None,
            prefill_tokens: 4096,
            decode: DecodeMode::Auto,
        }
    }
}

/// What a run did, for throughput figures and for checking that prefill ran once per prompt.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GenerationStats {
    pub batches: usize,
    /// Prompts prefilled (once each, whatever their sample count).
    pub prefilled_prompts: usize,
    pub prompt_tokens: usize,
    pub images: usize,
    pub generated_tokens: usize,
    pub decode_steps: usize,
    pub vision_seconds: f64,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// What the last batch's decode steps ran as.
    pub decode_path: Option<DecodePath>,
    /// CUDA graphs captured (one per batch and bucket of rows) and replayed, and the seconds
    /// captures took (inside `decode_seconds`).
    pub graph_captures: usize,
    pub graph_replays: usize,
    pub capture_seconds: f64,
    /// Why graphs were asked for ([`DecodeMode::Graphs`]) but not used, or stopped being used.
    pub graph_fallback: Option<String>,
}

/// Generates completions for every request: `result[i]` holds request `i`'s `samples`
/// completions in sample order. A request that cannot run is refused before any work with
/// [`MlError::Request`], which carries its index.
pub fn generate(
    model: &QwenVl,
    requests: &[GenerationRequest<'_>],
    options: &EngineOptions,
) -> Result<(Vec<Vec<Completion>>, GenerationStats), MlError> {
    let context = options
        .max_context
        .unwrap_or(model.config().text.max_position_embeddings as usize);
    for (index, r) in requests.iter().enumerate() {
        let refuse = |message: String| MlError::Request { index, message };
        r.params.validate().map_err(refuse)?;
        if r.samples == 0 {
            return Err(refuse("samples must be ≥ 1".into()));
        }
        if r.prompt.is_empty() {
            return Err(refuse("the prompt is empty".into()));
        }
        let need = r.prompt.len() + r.params.max_new_tokens;
        if need > context {
            return Err(refuse(format!(
                "the prompt's {} tokens plus {} new tokens exceed the context of {context} tokens",
                r.prompt.len(),
                r.params.max_new_tokens
            )));
        }
    }
    let mut results: Vec<Vec<Completion>> = vec![Vec::new(); requests.len()];
    let mut stats = GenerationStats::default();
    let mut start = 0;
    while start < requests.len() {
        let mut end = start + 1;
        let mut rows = requests[start].samples;
        while end < requests.len() && rows + requests[end].samples <= options.max_batch_rows {
            rows += requests[end].samples;
            end += 1;
        }
        let outputs = run_batch(model, &requests[start..end], options, &mut stats)?;
        for (slot, out) in results[start..end].iter_mut().zip(outputs) {
            *slot = out;
        }
        start = end;
    }
    Ok((results, stats))
}

/// Per-row decoding state.
struct Row {
    request: usize,
    sample: usize,
    rng: rand::rngs::StdRng,
    next_position: i64,
    tokens: Vec<i64>,
    logprobs: Vec<f32>,
    margins: Vec<f32>,
    finish: Option<FinishReason>,
}

/// Mixes a request's seed with a sample index into an independent generator seed
/// (SplitMix64's finaliser).
fn row_seed(seed: u64, sample: usize) -> u64 {
    let mut z = seed
        ^ (sample as u64)
            .wrapping_add(1)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn run_batch(
    model: &QwenVl,
    requests: &[GenerationRequest<'_>],
    options: &EngineOptions,
    stats: &mut GenerationStats,
) -> Result<Vec<Vec<Completion>>, MlError> {
    let device = model.device();
    let kind = model.kind();
    let text_config = &model.config().text;
    stats.batches += 1;

    // 1. Vision, all images at once.
    let t0 = Instant::now();
    let images: Vec<&PreparedImage> = requests
        .iter()
        .flat_map(|r| r.prompt.images.iter())
        .collect();
    let image_embeds = if images.is_empty() {
        None
    } else {
        Some(model.encode_images(&images)?)
    };
    stats.images += images.len();
    stats.vision_seconds += t0.elapsed().as_secs_f64();

    // 2. Prefill, once per prompt, left-padded.
    let t0 = Instant::now();
    let prompts = requests.len() as i64;
    let lengths: Vec<i64> = requests.iter().map(|r| r.prompt.len() as i64).collect();
    let width = lengths.iter().copied().max().unwrap_or(0);
    let max_new = requests
        .iter()
        .map(|r| r.params.max_new_tokens as i64)
        .max()
        .unwrap_or(0);
    let merge = model.config().vision.spatial_merge_size;
    let (prompt_cache, last_logits, key_valid) = torch_call(|| {
        tch::no_grad(|| -> Result<_, MlError> {
            let mut embeds = Vec::with_capacity(requests.len());
            let mut positions = Vec::with_capacity(3 * requests.len());
            let mut image_row = 0;
            for r in requests {
                let p = r.prompt;
                let tokens: i64 = p.images.iter().map(|i| i.grid.tokens(merge)).sum();
                let own = image_embeds
                    .as_ref()
                    .filter(|_| tokens > 0)
                    .map(|e| e.narrow(0, image_row, tokens));
                image_row += tokens;
                let e = model.embed_prompt(&p.input_ids, own.as_ref());
                let pad = width - p.len() as i64;
                let e = if pad > 0 {
                    let zeros = Tensor::zeros([1, pad, e.size()[2]], (e.kind(), device));
                    Tensor::cat(&[zeros, e], 1)
                } else {
                    e
                };
                embeds.push(e);
                let mut flat = Vec::with_capacity(3 * width as usize);
                for axis in &p.positions.axes {
                    flat.extend(std::iter::repeat_n(0, pad as usize));
                    flat.extend_from_slice(axis);
                }
                positions.push(Tensor::from_slice(&flat).view([3, 1, width]));
            }
            let valid: Vec<bool> = lengths
                .iter()
                .flat_map(|&l| (0..width).map(move |c| c >= width - l))
                .collect();
            let key_valid = Tensor::from_slice(&valid)
                .view([prompts, width])
                .to_device(device);
            let cache = KvCache::new(text_config, prompts, width, kind, device)?;
            let padded = lengths.iter().any(|&l| l != width);
            // Prompts go through in groups of about `prefill_tokens` padded tokens.
            let per_chunk = (options.prefill_tokens as i64 / width.max(1)).max(1);
            let mut last = Vec::new();
            for start in (0..prompts).step_by(per_chunk as usize) {
                let n = per_chunk.min(prompts - start);
                let range = start as usize..(start + n) as usize;
                let chunk_embeds = Tensor::cat(&embeds[range.clone()], 0);
                let chunk_positions = Tensor::cat(&positions[range], 1).to_device(device);
                let mut rows = cache.row_range(start, n);
                let hidden = if padded {
                    let causal = super::text::causal_mask(width, 0, device);
                    let eye = Tensor::eye(width, (Kind::Bool, device)).view([1, 1, width, width]);
                    let mask = causal
                        .logical_and(&key_valid.narrow(0, start, n).view([n, 1, 1, width]))
                        .logical_or(&eye);
                    model.text.forward(
                        &chunk_embeds,
                        &chunk_positions,
                        TextMask::Explicit(&mask),
                        Some((&mut rows, 0)),
                    )
                } else {
                    model.text.forward(
                        &chunk_embeds,
                        &chunk_positions,
                        TextMask::Causal,
                        Some((&mut rows, 0)),
                    )
                };
                last.push(model.text.logits(&hidden.select(1, width - 1)));
            }
            let last = Tensor::cat(&last, 0);
            Ok((cache, last, key_valid))
        })
    })??;
    stats.prefilled_prompts += requests.len();
    stats.prompt_tokens += lengths.iter().sum::<i64>() as usize;
    stats.prefill_seconds += t0.elapsed().as_secs_f64();

    // 3. Fan out to one row per sample.
    let t0 = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut row_prompt: Vec<i64> = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        for s in 0..r.samples {
            rows.push(Row {
                request: i,
                sample: s,
                rng: rand::rngs::StdRng::seed_from_u64(row_seed(r.params.seed, s)),
                next_position: r.prompt.positions.decode_position(r.prompt.len() as i64),
                tokens: Vec::with_capacity(r.params.max_new_tokens.min(4096)),
                logprobs: Vec::with_capacity(r.params.max_new_tokens.min(4096)),
                margins: Vec::with_capacity(r.params.max_new_tokens.min(4096)),
                finish: None,
            });
            row_prompt.push(i as i64);
        }
    }
    let row_prompt = Tensor::from_slice(&row_prompt).to_device(device);
    let capacity = width + max_new;
    let (cache, prefix_valid, mut logits) = torch_call(|| {
        tch::no_grad(|| -> Result<_, MlError> {
            let mut cache = KvCache::new(text_config, rows.len() as i64, capacity, kind, device)?;
            for (dst, src) in cache
                .k
                .iter_mut()
                .zip(&prompt_cache.k)
                .chain(cache.v.iter_mut().zip(&prompt_cache.v))
            {
                dst.narrow(2, 0, width)
                    .copy_(&src.index_select(0, &row_prompt));
            }
            Ok((
                cache,
                key_valid.index_select(0, &row_prompt),
                last_logits.index_select(0, &row_prompt),
            ))
        })
    })??;
    drop(prompt_cache);
    let padded = lengths.iter().any(|&l| l != width);

    // 4. Decode.
    let mut decoder = Decoder::new(
        model,
        options.decode,
        cache,
        prefix_valid,
        width,
        padded,
        stats,
    )?;
    stats.decode_path = Some(decoder.path());
    // `active[j]` is the index into `rows` of the cache's row j.
    let mut active: Vec<usize> = (0..rows.len()).collect();
    let mut finished_since_compaction = 0;
    let mut step: i64 = 0;
    loop {
        let params: Vec<&SamplingParams> = active
            .iter()
            .map(|&j| requests[rows[j].request].params)
            .collect();
        let uniforms: Vec<f64> = active
            .iter()
            .zip(&params)
            .map(|(&j, p)| {
                if p.is_greedy() {
                    0.0
                } else {
                    rows[j].rng.random::<f64>()
                }
            })
            .collect();
        let drawn = torch_call(|| sample(&logits, &params, &uniforms))?;
        for (k, &j) in active.iter().enumerate() {
            let row = &mut rows[j];
            if row.finish.is_some() {
                continue;
            }
            let p = params[k];
            let token = drawn.tokens[k];
            row.tokens.push(token);
            row.logprobs.push(drawn.logprobs[k]);
            row.margins.push(drawn.margins[k]);
            stats.generated_tokens += 1;
            if p.stop_token_ids.contains(&token) {
                row.finish = Some(FinishReason::Stop);
            } else if row.tokens.len() >= p.max_new_tokens {
                row.finish = Some(FinishReason::Length);
            }
            if row.finish.is_some() {
                finished_since_compaction += 1;
            }
        }
        let live = active.iter().filter(|&&j| rows[j].finish.is_none()).count();
        if live == 0 {
            break;
        }
        // Drop finished rows once they are a quarter of the batch: the copy costs about one
        // decode step, so compacting after every finish would cost more than it saves.
        if finished_since_compaction * 4 >= active.len() {
            let keep: Vec<i64> = active
                .iter()
                .enumerate()
                .filter(|(_, j)| rows[**j].finish.is_none())
                .map(|(k, _)| k as i64)
                .collect();
            decoder.keep_rows(&keep)?;
            active = keep.iter().map(|&k| active[k as usize]).collect();
            finished_since_compaction = 0;
        }
        let last_tokens: Vec<i64> = active
            .iter()
            .map(|&j| *rows[j].tokens.last().expect("one token per step"))
            .collect();
        let positions: Vec<i64> = active
            .iter()
            .map(|&j| rows[j].next_position + step)
            .collect();
        logits = decoder.step(model, &last_tokens, &positions, step, stats)?;
        step += 1;
        stats.decode_steps += 1;
    }
    stats.decode_seconds += t0.elapsed().as_secs_f64();

    let mut out: Vec<Vec<Completion>> = requests
        .iter()
        .map(|r| Vec::with_capacity(r.samples))
        .collect();
    rows.sort_by_key(|r| (r.request, r.sample));
    for row in rows {
        out[row.request].push(Completion {
            tokens: row.tokens,
            logprobs: row.logprobs,
            margins: row.margins,
            finish: row.finish.unwrap_or(FinishReason::Length),
        });
    }
    Ok(out)
}

/// One decode step's choices, one entry per row.
struct Drawn {
    tokens: Vec<i64>,
    logprobs: Vec<f32>,
    margins: Vec<f32>,
}

/// Draws one token per row of `logits` `[rows, vocab]` (f32) and returns the tokens, their
/// log-probabilities (temperature-scaled, before truncation; unscaled for greedy rows) and their
/// margins ([`Completion::margins`]).
fn sample(logits: &Tensor, params: &[&SamplingParams], uniforms: &[f64]) -> Drawn {
    tch::no_grad(|| {
        let device = logits.device();
        let n = params.len() as i64;
        let temperatures: Vec<f32> = params
            .iter()
            .map(|p| {
                if p.is_greedy() {
                    1.0
                } else {
                    p.temperature as f32
                }
            })
            .collect();
        let scaled = if temperatures.iter().all(|&t| t == 1.0) {
            logits.shallow_clone()
        } else {
            logits
                / Tensor::from_slice(&temperatures)
                    .to_device(device)
                    .view([n, 1])
        };
        let logp = scaled.log_softmax(-1, Kind::Float);
        let greedy: Vec<bool> = params.iter().map(|p| p.is_greedy()).collect();
        let mut choice = if greedy.iter().any(|&g| g) {
            greedy_choice(logits)
        } else {
            Choice {
                tokens: Tensor::zeros([n], (Kind::Int64, device)),
                margins: Tensor::zeros([n], (Kind::Float, device)),
            }
        };
        if greedy.iter().any(|&g| !g) {
            let u = Tensor::from_slice(uniforms)
                .to_kind(Kind::Float)
                .to_device(device)
                .view([n, 1]);
            let drawn = if params.iter().any(|p| p.truncates()) {
                sample_truncated(&scaled, params, &u)
            } else {
                inverse_cdf(&logp.exp(), &u)
            };
            choice = if greedy.iter().any(|&g| g) {
                let g = Tensor::from_slice(&greedy).to_device(device);
                Choice {
                    tokens: choice.tokens.where_self(&g, &drawn.tokens),
                    margins: choice.margins.where_self(&g, &drawn.margins),
                }
            } else {
                drawn
            };
        }
        // Margins so far are in scaled logits (logits / T); a change ε of the logits is ε/T of
        // those.
        let margins = &choice.margins
            * Tensor::from_slice(&temperatures)
                .to_device(device)
                .view([n]);
        let chosen = logp.gather(1, &choice.tokens.view([n, 1]), false).view([n]);
        let to_vec_f32 = |t: &Tensor| {
            Vec::<f32>::try_from(t.to_kind(Kind::Float).to_device(Device::Cpu)).unwrap_or_default()
        };
        Drawn {
            tokens: Vec::<i64>::try_from(choice.tokens.to_device(Device::Cpu)).unwrap_or_default(),
            logprobs: to_vec_f32(&chosen),
            margins: to_vec_f32(&margins),
        }
    })
}

/// Tokens chosen for a step `[rows]` and how far each was from another choice `[rows]` (f32).
struct Choice {
    tokens: Tensor,
    margins: Tensor,
}

/// The most likely token of each row (the first on a tie, as transformers' argmax) and half its
/// lead over the runner-up: the change of the logits that could make them equal.
fn greedy_choice(logits: &Tensor) -> Choice {
    let vocab = logits.size()[1];
    let margins = if vocab < 2 {
        Tensor::full(
            [logits.size()[0]],
            f64::INFINITY,
            (Kind::Float, logits.device()),
        )
    } else {
        let (top, _) = logits.topk(2, -1, true, true);
        ((top.select(1, 0) - top.select(1, 1)) / 2).to_kind(Kind::Float)
    };
    Choice {
        tokens: logits.argmax(-1, false),
        margins,
    }
}

/// The index where `u · total mass` falls in each row's cumulative distribution (`probs` need
/// not be normalised: truncated rows are not), and its margin in scaled logits: half the distance
/// of that point from the nearer edge of the chosen token's interval, as a share of the total
/// mass (a change ε of the scaled logits moves every edge by at most 2ε of the mass).
fn inverse_cdf(probs: &Tensor, u: &Tensor) -> Choice {
    let cdf = probs.to_kind(Kind::Double).cumsum(-1, Kind::Double);
    let vocab = cdf.size()[1];
    let total = cdf.narrow(1, vocab - 1, 1);
    let target = u.to_kind(Kind::Double) * &total;
    let index = target
        .searchsorted(&cdf, false, true, "right", None::<Tensor>)
        .clamp(0, vocab - 1);
    // The interval of token j is [cdf[j-1], cdf[j]); cdf[-1] is 0.
    let upper = cdf.gather(1, &index, false);
    let lower = cdf
        .gather(1, &(&index - 1).clamp_min(0), false)
        .where_self(&index.gt(0), &Tensor::zeros_like(&upper));
    let margin = (&target - lower).minimum(&(upper - &target)) / total / 2;
    Choice {
        tokens: index.view([-1]),
        margins: margin.to_kind(Kind::Float).view([-1]),
    }
}

/// Top-k then top-p in sorted order, as transformers' warpers do: top-k keeps scores at least
/// the k-th largest; top-p keeps the most likely tokens until their mass reaches `top_p` (always
/// at least one). A token's margin (scaled logits) is also bounded by how close the kept set was
/// to changing: half the gap between the k-th and the next score, and half the distance of the
/// nearest cumulative mass from `top_p`.
fn sample_truncated(scaled: &Tensor, params: &[&SamplingParams], u: &Tensor) -> Choice {
    let device = scaled.device();
    let (n, vocab) = (scaled.size()[0], scaled.size()[1]);
    let (sorted, order) = scaled.sort(-1, true);
    let ks: Vec<i64> = params
        .iter()
        .map(|p| {
            if p.top_k == 0 || p.is_greedy() {
                vocab
            } else {
                (p.top_k as i64).min(vocab)
            }
        })
        .collect();
    let truncated_k: Vec<bool> = ks.iter().map(|&k| k < vocab).collect();
    let ks = Tensor::from_slice(&ks).to_device(device).view([n, 1]);
    let kth = sorted.gather(1, &(&ks - 1), false);
    // Rows that keep every token have no k-th edge: their gap is infinite.
    let next = sorted
        .gather(1, &ks.clamp_max(vocab - 1), false)
        .where_self(
            &Tensor::from_slice(&truncated_k)
                .to_device(device)
                .view([n, 1]),
            &Tensor::full_like(&kth, f64::NEG_INFINITY),
        );
    let top_k_margin = ((&kth - next) / 2).view([n]);
    let mut keep = sorted.ge_tensor(&kth);
    let top_p: Vec<f32> = params
        .iter()
        .map(|p| if p.is_greedy() { 1.0 } else { p.top_p as f32 })
        .collect();
    let truncated_p: Vec<bool> = top_p.iter().map(|&p| p < 1.0).collect();
    let top_p = Tensor::from_slice(&top_p).to_device(device).view([n, 1]);
    let masked = sorted.masked_fill(&keep.logical_not(), f64::NEG_INFINITY);
    let probs = masked.softmax(-1, Kind::Float);
    // Mass strictly before each position; position 0 is always kept.
    let before = probs.cumsum(-1, Kind::Float) - &probs;
    let top_p_margin = ((&before - &top_p) / 2)
        .abs()
        .masked_fill(&keep.logical_not(), f64::INFINITY)
        .amin(-1, false)
        .where_self(
            &Tensor::from_slice(&truncated_p).to_device(device),
            &Tensor::full([n], f64::INFINITY, (Kind::Float, device)),
        );
    keep = keep.logical_and(&before.lt_tensor(&top_p));
    let kept = probs.masked_fill(&keep.logical_not(), 0.0);
    let drawn = inverse_cdf(&kept, u);
    Choice {
        tokens: order.gather(1, &drawn.tokens.view([n, 1]), false).view([n]),
        margins: drawn
            .margins
            .minimum(&top_k_margin.to_kind(Kind::Float))
            .minimum(&top_p_margin),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn truncation_keeps_the_top_k_and_the_nucleus() {
        // Probabilities 0.5, 0.3, 0.15, 0.05 (as logits).
        let logits = Tensor::from_slice(&[0.5f32, 0.3, 0.15, 0.05])
            .log()
            .view([1, 4]);
        let draw = |p: &SamplingParams, u: f64| {
            let u = Tensor::from_slice(&[u as f32]).view([1, 1]);
            i64::try_from(sample_truncated(&logits, &[p], &u).tokens).unwrap()
        };
        let top_k = SamplingParams {
            top_k: 2,
            ..SamplingParams::default()
        };
        // Mass 0.8 kept: u = 0.99 lands in the second token.
        assert_eq!(draw(&top_k, 0.99), 1);
        assert_eq!(draw(&top_k, 0.1), 0);
        let top_p = SamplingParams {
            top_p: 0.7,
            ..SamplingParams::default()
        };
        // 0.5 < 0.7 so the second is kept; 0.8 ≥ 0.7 so the third is not.
        assert_eq!(draw(&top_p, 0.999), 1);
        let tiny_p = SamplingParams {
            top_p: 0.01,
            ..SamplingParams::default()
        };
        assert_eq!(draw(&tiny_p, 0.999), 0);
    }

    fn margins(c: &Choice) -> Vec<f32> {
        Vec::<f32>::try_from(&c.margins).unwrap()
    }

    #[test]
    fn a_draw_knows_how_far_it_was_from_the_next_token() {
        // Intervals [0, 0.5), [0.5, 0.8), [0.8, 1.0).
        let probs = Tensor::from_slice(&[0.5f32, 0.3, 0.2]).view([1, 3]);
        // Margins are half the distance to the nearer edge.
        let cases = [
            (0.55, 1, 0.025),
            (0.79, 1, 0.005),
            (0.1, 0, 0.05),
            (0.95, 2, 0.025),
        ];
        for (u, token, margin) in cases {
            let c = inverse_cdf(&probs, &Tensor::from_slice(&[u as f32]).view([1, 1]));
            assert_eq!(i64::try_from(&c.tokens).unwrap(), token, "u = {u}");
            assert!(
                (margins(&c)[0] - margin).abs() < 1e-6,
                "u = {u}: {:?}",
                margins(&c)
            );
        }
        // Unnormalised mass (a truncated row): shares of the total.
        let kept = Tensor::from_slice(&[0.25f32, 0.25, 0.0]).view([1, 3]);
        let c = inverse_cdf(&kept, &Tensor::from_slice(&[0.6f32]).view([1, 1]));
        assert_eq!(i64::try_from(&c.tokens).unwrap(), 1);
        assert!((margins(&c)[0] - 0.05).abs() < 1e-6);
    }

    #[test]
    fn a_greedy_choice_knows_its_lead_and_truncation_its_edges() {
        let logits = Tensor::from_slice(&[2.0f32, 1.5, 0.1, 3.0, 2.9995, -1.0]).view([2, 3]);
        let c = greedy_choice(&logits);
        assert_eq!(Vec::<i64>::try_from(&c.tokens).unwrap(), vec![0, 0]);
        let m = margins(&c);
        assert!(
            (m[0] - 0.25).abs() < 1e-6 && (m[1] - 2.5e-4).abs() < 1e-6,
            "{m:?}"
        );

        // Probabilities 0.5, 0.3, 0.15, 0.05: top-p 0.79 keeps two tokens, and the cumulative
        // mass before the third (0.8) is 0.01 from flipping that: a margin of 0.005.
        let logits = Tensor::from_slice(&[0.5f32, 0.3, 0.15, 0.05])
            .log()
            .view([1, 4]);
        let u = Tensor::from_slice(&[0.3f32]).view([1, 1]);
        let top_p = SamplingParams {
            top_p: 0.79,
            ..SamplingParams::default()
        };
        let c = sample_truncated(&logits, &[&top_p], &u);
        assert!((margins(&c)[0] - 0.005).abs() < 1e-5, "{:?}", margins(&c));
        // Top-k 2: the second and third scores are ln 0.3 − ln 0.15 = ln 2 apart.
        let top_k = SamplingParams {
            top_k: 2,
            ..SamplingParams::default()
        };
        let c = sample_truncated(&logits, &[&top_k], &u);
        // Renormalised, the kept two are 0.625 and 0.375: u = 0.3 lies 0.3 above the first
        // interval's lower edge and 0.325 below its upper one; ln 2 is further.
        let expected = 0.3f32.min(2f32.ln()) / 2.0;
        assert!(
            (margins(&c)[0] - expected).abs() < 1e-5,
            "{:?}",
            margins(&c)
        );
    }

    #[test]
    fn divergence_is_a_near_tie_only_below_the_margin() {
        let run = |tokens: Vec<i64>, margins: Vec<f32>| Completion {
            logprobs: vec![0.0; tokens.len()],
            tokens,
            margins,
            finish: FinishReason::Length,
        };
        let a = run(vec![1, 2, 3], vec![0.5, 0.5, 0.5]);
        assert_eq!(a.divergence(&a.clone()), None);
        let near = run(vec![1, 2, 4], vec![0.5, 0.5, 1e-4]);
        let d = a.divergence(&near).unwrap();
        assert_eq!((d.index, d.tokens), (2, (Some(3), Some(4))));
        assert!(d.is_near_tie());
        let far = run(vec![1, 5, 3], vec![0.5, 0.5, 0.5]);
        assert!(!a.divergence(&far).unwrap().is_near_tie());
        // One run ending early with identical tokens is never excused.
        let short = run(vec![1, 2], vec![0.5, 1e-9]);
        let d = a.divergence(&short).unwrap();
        assert_eq!(d.tokens, (Some(3), None));
        assert!(!d.is_near_tie());
    }

    #[test]
    fn row_seeds_differ_by_sample_and_repeat_by_seed() {
        assert_ne!(row_seed(7, 0), row_seed(7, 1));
        assert_ne!(row_seed(7, 0), row_seed(8, 0));
        assert_eq!(row_seed(7, 3), row_seed(7, 3));
    }
}
