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
//!
//! Sampling follows transformers' order — temperature, then top-k, then top-p — and draws by
//! inverting the cumulative distribution with one uniform number per row and step from that
//! row's own generator (seeded by the request's seed and the sample's index), so a sample's
//! tokens do not depend on what else shares its batch. The log-probability returned for each
//! token is under the temperature-scaled distribution *before* top-k/top-p truncation, the
//! convention GRPO's importance ratio needs. Temperature 0 means greedy decoding; its
//! log-probabilities are under the unscaled distribution.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::chat::PreparedPrompt;
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

/// One sample's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub tokens: Vec<i64>,
    /// Per token, under the temperature-scaled distribution before truncation.
    pub logprobs: Vec<f32>,
    pub finish: FinishReason,
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
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_batch_rows: 64,
            max_context: None,
            prefill_tokens: 4096,
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
}

/// Generates completions for every request: `result[i]` holds request `i`'s `samples`
/// completions in sample order.
pub fn generate(
    model: &QwenVl,
    requests: &[GenerationRequest<'_>],
    options: &EngineOptions,
) -> Result<(Vec<Vec<Completion>>, GenerationStats), MlError> {
    let context = options
        .max_context
        .unwrap_or(model.config().text.max_position_embeddings as usize);
    for (i, r) in requests.iter().enumerate() {
        r.params
            .validate()
            .map_err(|m| MlError::Invalid(format!("request {i}: {m}")))?;
        if r.samples == 0 {
            return Err(MlError::Invalid(format!(
                "request {i}: samples must be ≥ 1"
            )));
        }
        if r.prompt.is_empty() {
            return Err(MlError::Invalid(format!(
                "request {i}: the prompt is empty"
            )));
        }
        let need = r.prompt.len() + r.params.max_new_tokens;
        if need > context {
            return Err(MlError::Invalid(format!(
                "request {i}: the prompt's {} tokens plus {} new tokens exceed the context of \
                 {context} tokens",
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
                finish: None,
            });
            row_prompt.push(i as i64);
        }
    }
    let row_prompt = Tensor::from_slice(&row_prompt).to_device(device);
    let capacity = width + max_new;
    let (mut cache, mut prefix_valid, mut logits) = torch_call(|| {
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
        let (tokens, logprobs) = torch_call(|| sample(&logits, &params, &uniforms))?;
        for (k, &j) in active.iter().enumerate() {
            let row = &mut rows[j];
            if row.finish.is_some() {
                continue;
            }
            let p = params[k];
            row.tokens.push(tokens[k]);
            row.logprobs.push(logprobs[k]);
            stats.generated_tokens += 1;
            if p.stop_token_ids.contains(&tokens[k]) {
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
            let keep_t = Tensor::from_slice(&keep).to_device(device);
            torch_call(|| {
                tch::no_grad(|| {
                    cache.select_rows(&keep_t);
                    prefix_valid = prefix_valid.index_select(0, &keep_t);
                })
            })?;
            active = keep.iter().map(|&k| active[k as usize]).collect();
            finished_since_compaction = 0;
        }
        let column = width + step;
        let last_tokens: Vec<i64> = active
            .iter()
            .map(|&j| *rows[j].tokens.last().expect("one token per step"))
            .collect();
        let positions: Vec<i64> = active
            .iter()
            .map(|&j| rows[j].next_position + step)
            .collect();
        let n = active.len() as i64;
        logits = torch_call(|| {
            tch::no_grad(|| {
                let ids = Tensor::from_slice(&last_tokens)
                    .to_device(device)
                    .view([n, 1]);
                let embeds = model.text.embed(&ids);
                let pos = Tensor::from_slice(&positions)
                    .to_device(device)
                    .view([1, n, 1])
                    .expand([3, n, 1], false);
                let hidden = if padded {
                    let generated = Tensor::ones([n, step + 1], (Kind::Bool, device));
                    let mask =
                        Tensor::cat(&[&prefix_valid, &generated], 1).view([n, 1, 1, column + 1]);
                    model.text.forward(
                        &embeds,
                        &pos,
                        TextMask::Explicit(&mask),
                        Some((&mut cache, column)),
                    )
                } else {
                    model
                        .text
                        .forward(&embeds, &pos, TextMask::Causal, Some((&mut cache, column)))
                };
                model.text.logits(&hidden.select(1, 0))
            })
        })?;
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
            finish: row.finish.unwrap_or(FinishReason::Length),
        });
    }
    Ok(out)
}

/// Draws one token per row of `logits` `[rows, vocab]` (f32) and returns the tokens and their
/// log-probabilities (temperature-scaled, before truncation; unscaled for greedy rows).
fn sample(logits: &Tensor, params: &[&SamplingParams], uniforms: &[f64]) -> (Vec<i64>, Vec<f32>) {
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
        let mut tokens = if greedy.iter().any(|&g| g) {
            logits.argmax(-1, false)
        } else {
            Tensor::zeros([n], (Kind::Int64, device))
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
            tokens = if greedy.iter().any(|&g| g) {
                let g = Tensor::from_slice(&greedy).to_device(device);
                tokens.where_self(&g, &drawn)
            } else {
                drawn
            };
        }
        let chosen = logp.gather(1, &tokens.view([n, 1]), false).view([n]);
        let tokens = Vec::<i64>::try_from(tokens.to_device(Device::Cpu)).unwrap_or_default();
        let logprobs = Vec::<f32>::try_from(chosen.to_device(Device::Cpu)).unwrap_or_default();
        (tokens, logprobs)
    })
}

/// The index where `u · total mass` falls in each row's cumulative distribution (`probs` need
/// not be normalised: truncated rows are not).
fn inverse_cdf(probs: &Tensor, u: &Tensor) -> Tensor {
    let cdf = probs.to_kind(Kind::Double).cumsum(-1, Kind::Double);
    let vocab = cdf.size()[1];
    let total = cdf.narrow(1, vocab - 1, 1);
    let target = u.to_kind(Kind::Double) * total;
    target
        .searchsorted(&cdf, false, true, "right", None::<Tensor>)
        .clamp(0, vocab - 1)
        .view([-1])
}

/// Top-k then top-p in sorted order, as transformers' warpers do: top-k keeps scores at least
/// the k-th largest; top-p keeps the most likely tokens until their mass reaches `top_p` (always
/// at least one).
fn sample_truncated(scaled: &Tensor, params: &[&SamplingParams], u: &Tensor) -> Tensor {
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
    let ks = Tensor::from_slice(&ks).to_device(device).view([n, 1]);
    let kth = sorted.gather(1, &(ks - 1), false);
    let mut keep = sorted.ge_tensor(&kth);
    let top_p: Vec<f32> = params
        .iter()
        .map(|p| if p.is_greedy() { 1.0 } else { p.top_p as f32 })
        .collect();
    let top_p = Tensor::from_slice(&top_p).to_device(device).view([n, 1]);
    let masked = sorted.masked_fill(&keep.logical_not(), f64::NEG_INFINITY);
    let probs = masked.softmax(-1, Kind::Float);
    // Mass strictly before each position; position 0 is always kept.
    let before = probs.cumsum(-1, Kind::Float) - &probs;
    keep = keep.logical_and(&before.lt_tensor(&top_p));
    let kept = probs.masked_fill(&keep.logical_not(), 0.0);
    let j = inverse_cdf(&kept, u).view([n, 1]);
    order.gather(1, &j, false).view([n])
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
            i64::try_from(sample_truncated(&logits, &[p], &u)).unwrap()
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

    #[test]
    fn row_seeds_differ_by_sample_and_repeat_by_seed() {
        assert_ne!(row_seed(7, 0), row_seed(7, 1));
        assert_ne!(row_seed(7, 0), row_seed(8, 0));
        assert_eq!(row_seed(7, 3), row_seed(7, 3));
    }
}
