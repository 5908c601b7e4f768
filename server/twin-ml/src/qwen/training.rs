//! Qwen2.5-VL's forward pass with gradients, for training: the log-probabilities (temperature
//! 1.0) of given response tokens after their prompts, with autograd on, over the same modules
//! and weights the rollout engine runs under `no_grad`.
//!
//! A micro-batch's sequences are right-padded into one decoder pass: with a causal mask a real
//! position never sees the padding after it, so no attention mask is needed and every real
//! position computes what it would alone. Only the hidden states that predict response tokens
//! go through the vocabulary projection, a bounded number of rows at a time: full logits of a
//! micro-batch over Qwen's 151,936-row vocabulary would take gigabytes. The chunks bound the
//! forward pass's temporaries; autograd still keeps each chunk's f32 log-softmax until
//! backward, so backward memory grows as scored tokens × vocabulary (a head backward that
//! recomputes chunk by chunk would remove that; it is not here).

use tch::{Kind, Tensor};

use super::chat::PreparedPrompt;
use super::model::{QwenVl, torch_call};
use super::preprocess::PreparedImage;
use super::text::TextMask;
use crate::MlError;
use crate::train::entropy_from_logits;

/// One sequence of a training micro-batch: a prepared prompt (images included) and the response
/// tokens sampled after it.
#[derive(Debug, Clone, Copy)]
pub struct TrainSequence<'a> {
    pub prompt: &'a PreparedPrompt,
    pub response: &'a [i64],
}

/// How [`QwenVl::response_log_probs`] runs.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainForwardOptions {
    /// False freezes the vision tower: it runs without gradients (and without keeping its
    /// activations), and its weights get no gradient.
    pub train_vision: bool,
    /// Response positions projected onto the vocabulary per chunk.
    pub logit_chunk_rows: i64,
    /// Longest prompt accepted, in tokens (image placeholders included).
    pub max_prompt_len: usize,
    /// A response's mask ends at its first stop token, which it includes; later tokens are
    /// neither fed nor scored. Empty: every response token counts.
    pub stop_tokens: Vec<i64>,
    /// Whether to report per-token entropy (computed without gradients, for metrics only).
    pub entropy: bool,
}

impl Default for TrainForwardOptions {
    fn default() -> Self {
        TrainForwardOptions {
            train_vision: true,
            logit_chunk_rows: 1024,
            max_prompt_len: 8192,
            stop_tokens: Vec::new(),
            entropy: true,
        }
    }
}

/// What [`QwenVl::response_log_probs`] returns, right-padded to the longest response.
#[derive(Debug)]
pub struct ResponseLogProbs {
    /// `[B, T]` f32, differentiable with respect to the trainable weights; 0 off the mask.
    pub log_prob: Tensor,
    /// `[B, T]` f32 without gradient, 0 off the mask; `None` unless asked for.
    pub entropy: Option<Tensor>,
    /// `[B, T]` f32: 1 at real response tokens (the first stop token included), 0 at padding.
    pub response_mask: Tensor,
}

/// A checked micro-batch: each sequence's prompt length and scored response length.
struct Layout {
    prompt_lens: Vec<i64>,
    kept: Vec<i64>,
    /// Decoder columns: the longest prompt plus response minus one (the last response token
    /// predicts nothing that is scored).
    columns: i64,
}

impl Layout {
    fn new(
        batch: &[TrainSequence<'_>],
        options: &TrainForwardOptions,
        vocab: i64,
    ) -> Result<Layout, MlError> {
        if batch.is_empty() {
            return Err(MlError::Invalid(
                "training forward: the micro-batch holds no sequence".into(),
            ));
        }
        if options.logit_chunk_rows < 1 {
            return Err(MlError::Invalid(format!(
                "training forward: logit_chunk_rows must be at least 1, got {}",
                options.logit_chunk_rows
            )));
        }
        let mut layout = Layout {
            prompt_lens: Vec::with_capacity(batch.len()),
            kept: Vec::with_capacity(batch.len()),
            columns: 0,
        };
        for (i, s) in batch.iter().enumerate() {
            check_sequence(i, s, options, vocab)?;
            let kept = s
                .response
                .iter()
                .position(|t| options.stop_tokens.contains(t))
                .map_or(s.response.len(), |p| p + 1);
            layout.prompt_lens.push(s.prompt.len() as i64);
            layout.kept.push(kept as i64);
            layout.columns = layout.columns.max((s.prompt.len() + kept - 1) as i64);
        }
        Ok(layout)
    }

    fn longest_response(&self) -> i64 {
        self.kept.iter().copied().max().unwrap_or(0)
    }
}

/// A micro-batch laid out for one decoder pass, row-major `[B, columns]`: each row its prompt,
/// then its response but the last scored token, then padding.
struct Padded {
    ids: Vec<i64>,
    /// Where the image rows go: the prompts' placeholders only, whatever a response holds.
    image_slots: Vec<bool>,
    /// Time, height and width positions; padding continues the decode positions.
    positions: [Vec<i64>; 3],
    /// Flat row of the hidden state that predicts each scored token, and the token.
    rows: Vec<i64>,
    targets: Vec<i64>,
}

impl Padded {
    fn new(batch: &[TrainSequence<'_>], layout: &Layout, image_token_id: i64) -> Padded {
        let l = layout.columns;
        let cells = batch.len() * l as usize;
        let mut out = Padded {
            ids: Vec::with_capacity(cells),
            image_slots: Vec::with_capacity(cells),
            positions: [Vec::new(), Vec::new(), Vec::new()],
            rows: Vec::new(),
            targets: Vec::new(),
        };
        for (i, s) in batch.iter().enumerate() {
            let (p, kept) = (layout.prompt_lens[i], layout.kept[i] as usize);
            let fed = &s.response[..kept - 1];
            let pad = (l - p - fed.len() as i64) as usize;
            out.ids.extend_from_slice(&s.prompt.input_ids);
            out.ids.extend_from_slice(fed);
            out.ids.extend(std::iter::repeat_n(0, pad));
            let prompt = &s.prompt.input_ids;
            out.image_slots
                .extend(prompt.iter().map(|&t| t == image_token_id));
            out.image_slots
                .extend(std::iter::repeat_n(false, fed.len() + pad));
            for (axis, dst) in s.prompt.positions.axes.iter().zip(&mut out.positions) {
                dst.extend_from_slice(axis);
                dst.extend((p..l).map(|c| s.prompt.positions.decode_position(c)));
            }
            out.rows
                .extend((0..kept as i64).map(|k| i as i64 * l + p - 1 + k));
            out.targets.extend_from_slice(&s.response[..kept]);
        }
        out
    }
}

fn check_sequence(
    i: usize,
    s: &TrainSequence<'_>,
    options: &TrainForwardOptions,
    vocab: i64,
) -> Result<(), MlError> {
    if s.prompt.is_empty() {
        return Err(MlError::Invalid(format!(
            "training sequence {i}: the prompt is empty"
        )));
    }
    if s.prompt.len() > options.max_prompt_len {
        return Err(MlError::Invalid(format!(
            "training sequence {i}: the prompt has {} tokens, more than the maximum prompt \
             length of {}",
            s.prompt.len(),
            options.max_prompt_len
        )));
    }
    if s.response.is_empty() {
        return Err(MlError::Invalid(format!(
            "training sequence {i}: the response is empty (a response needs at least one \
             token, its stop token if nothing else)"
        )));
    }
    if let Some((k, t)) = s
        .response
        .iter()
        .enumerate()
        .find(|(_, t)| !(0..vocab).contains(*t))
    {
        return Err(MlError::Invalid(format!(
            "training sequence {i}: response token {k} is {t}, outside the vocabulary of {vocab}"
        )));
    }
    Ok(())
}

impl QwenVl {
    /// Makes the weights trainable: every variable requires a gradient, the vision tower's only
    /// when `vision` is true. Inference is unchanged: the engine and
    /// [`QwenVl::sequence_logits`] run under `no_grad`.
    pub fn set_trainable(&mut self, vision: bool) {
        for (name, var) in self.var_store().variables() {
            let wanted = vision || !name.starts_with("visual.");
            let _ = var.set_requires_grad(wanted);
        }
    }

    /// The variables that require a gradient, by checkpoint name in name order: handles to the
    /// model's own tensors, for the optimizer (see [`QwenVl::set_trainable`]).
    pub fn trainable_parameters(&self) -> Vec<(String, Tensor)> {
        let mut params: Vec<(String, Tensor)> = self
            .var_store()
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        params
    }

    /// Log-probabilities (temperature 1.0) of each sequence's response tokens after its
    /// prompt, with autograd on, and optionally their entropy. Responses are right-padded to the
    /// longest; see [`ResponseLogProbs`].
    pub fn response_log_probs(
        &self,
        batch: &[TrainSequence<'_>],
        options: &TrainForwardOptions,
    ) -> Result<ResponseLogProbs, MlError> {
        let layout = Layout::new(batch, options, self.config().text.vocab_size)?;
        let image_embeds = self.train_image_embeds(batch, options.train_vision)?;
        let (hidden, targets) = torch_call(|| {
            tch::with_grad(|| self.response_hidden(batch, &layout, image_embeds.as_ref()))
        })?;
        let (log_prob, entropy) = self.project_in_chunks(&hidden, &targets, options)?;
        torch_call(|| {
            let b = batch.len() as i64;
            let t = layout.longest_response();
            // Flat `[B·T]` index of every scored token, sequence by sequence.
            let slots: Vec<i64> = (0..b)
                .flat_map(|i| (0..layout.kept[i as usize]).map(move |k| i * t + k))
                .collect();
            let slots = Tensor::from_slice(&slots).to_device(self.device());
            let place = |values: &Tensor| {
                Tensor::zeros([b * t], (Kind::Float, self.device()))
                    .index_copy(0, &slots, values)
                    .view([b, t])
            };
            let ones = Tensor::ones([slots.size()[0]], (Kind::Float, self.device()));
            ResponseLogProbs {
                log_prob: tch::with_grad(|| place(&log_prob)),
                entropy: entropy.as_ref().map(&place),
                response_mask: place(&ones),
            }
        })
    }

    /// The merged image tokens of every prompt's images, in order; with gradients when the
    /// vision tower trains.
    fn train_image_embeds(
        &self,
        batch: &[TrainSequence<'_>],
        train_vision: bool,
    ) -> Result<Option<Tensor>, MlError> {
        let images: Vec<&PreparedImage> = batch.iter().flat_map(|s| &s.prompt.images).collect();
        if images.is_empty() {
            return Ok(None);
        }
        if !train_vision {
            return self.encode_images(&images).map(Some);
        }
        let (pixels, grids) = self.image_pixels(&images)?;
        torch_call(|| tch::with_grad(|| Some(self.vision.forward(&pixels, &grids))))
    }

    /// The final hidden states `[N, hidden]` that predict the `N` scored response tokens, and
    /// those tokens `[N]`, sequence by sequence.
    fn response_hidden(
        &self,
        batch: &[TrainSequence<'_>],
        layout: &Layout,
        image_embeds: Option<&Tensor>,
    ) -> (Tensor, Tensor) {
        let device = self.device();
        let (b, l) = (batch.len() as i64, layout.columns);
        let padded = Padded::new(batch, layout, self.config().image_token_id);
        let ids = Tensor::from_slice(&padded.ids)
            .to_device(device)
            .view([b, l]);
        let mut embeds = self.text.embed(&ids);
        if let Some(img) = image_embeds {
            let mask = Tensor::from_slice(&padded.image_slots)
                .to_device(device)
                .view([b, l, 1])
                .expand_as(&embeds);
            embeds = embeds.masked_scatter(&mask, &img.to_kind(embeds.kind()));
        }
        let positions = Tensor::from_slice(&padded.positions.concat())
            .to_device(device)
            .view([3, b, l]);
        let hidden = self
            .text
            .forward(&embeds, &positions, TextMask::Causal, None);
        let rows = Tensor::from_slice(&padded.rows).to_device(device);
        let hidden = hidden
            .view([b * l, self.config().text.hidden_size])
            .index_select(0, &rows);
        (
            hidden,
            Tensor::from_slice(&padded.targets).to_device(device),
        )
    }

    /// Log-probabilities `[N]` of `targets` under the head's logits of `hidden` `[N, hidden]`,
    /// `options.logit_chunk_rows` rows at a time, and their entropy `[N]` (no gradient).
    fn project_in_chunks(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
        options: &TrainForwardOptions,
    ) -> Result<(Tensor, Option<Tensor>), MlError> {
        let n = hidden.size()[0];
        let mut log_probs = Vec::new();
        let mut entropies = Vec::new();
        let mut start = 0;
        while start < n {
            let rows = options.logit_chunk_rows.min(n - start);
            let logits =
                torch_call(|| tch::with_grad(|| self.text.logits(&hidden.narrow(0, start, rows))))?;
            if options.entropy {
                let detached = logits.detach();
                entropies.push(tch::no_grad(|| entropy_from_logits(&detached))?);
            }
            log_probs.push(torch_call(|| {
                tch::with_grad(|| {
                    logits
                        .log_softmax(-1, Kind::Float)
                        .gather(1, &targets.narrow(0, start, rows).unsqueeze(1), false)
                        .squeeze_dim(1)
                })
            })?);
            start += rows;
        }
        torch_call(|| {
            let log_prob = tch::with_grad(|| Tensor::cat(&log_probs, 0));
            let entropy = options.entropy.then(|| Tensor::cat(&entropies, 0));
            (log_prob, entropy)
        })
    }
}
