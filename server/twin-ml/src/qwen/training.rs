//! Qwen2.5-VL's forward pass with gradients, for training: the log-probabilities (temperature
//! 1.0) of given response tokens after their prompts, with autograd on, over the same modules
//! and weights the rollout engine runs under `no_grad`, and the backward pass of a loss of them.
//!
//! A micro-batch's sequences are right-padded into one decoder pass: with a causal mask a real
//! position never sees the padding after it, so no attention mask is needed and every real
//! position computes what it would alone. Only the hidden states that predict response tokens
//! go through the vocabulary projection, a bounded number of rows at a time: full logits of a
//! micro-batch over Qwen's 151,936-row vocabulary would take gigabytes.
//!
//! The model runs as a chain of stages (patch embedding, vision blocks, merger, token embedding
//! with the image rows placed, decoder layers, final norm), each a function of the previous
//! one's output. [`QwenVl::response_log_probs`] runs the chain with autograd and returns
//! log-probabilities attached to the graph: every stage's activations and every vocabulary
//! chunk's f32 log-softmax stay alive until backward. With
//! [`TrainForwardOptions::activation_checkpointing`], [`QwenVl::backward_response_loss`]
//! instead runs the chain without gradients keeping only each stage's input, computes the loss
//! on log-probabilities made a leaf, then walks back: the head chunk by chunk (each chunk's
//! logits recomputed and back-propagated with its share of dL/dlogp), then each stage
//! recomputed with autograd from its kept input (made a leaf) and back-propagated with the
//! gradient of its output. Weight gradients accumulate into `.grad()` across these partial
//! backward passes; the gradient reaching a stage's input leaf is what flows to the stage
//! before. tch has no checkpoint function and no custom autograd functions: `(out · g).sum()`
//! back-propagates exactly `g` into `out`.

use tch::{Kind, Tensor};

use super::chat::PreparedPrompt;
use super::model::{QwenVl, torch_call};
use super::preprocess::PreparedImage;
use super::text::TextMask;
use super::vision::VisionPass;
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
    /// Recompute activations in the backward pass instead of keeping them (see the module's
    /// documentation): the activations kept drop from every layer's plus every vocabulary
    /// chunk's f32 log-softmax to each stage's input plus one stage's and one chunk's, for
    /// about one more forward pass (the head's included).
    /// Off by default, because only [`QwenVl::backward_response_loss`] can honour it
    /// ([`QwenVl::response_log_probs`] returns a graph, which is what checkpointing does without)
    /// and because at small sizes the memory is not needed; a trainer at the real model size
    /// turns it on, as verl's recipe does (`enable_gradient_checkpointing`).
    pub activation_checkpointing: bool,
}

impl Default for TrainForwardOptions {
    fn default() -> Self {
        TrainForwardOptions {
            train_vision: true,
            logit_chunk_rows: 1024,
            max_prompt_len: 8192,
            stop_tokens: Vec::new(),
            entropy: true,
            activation_checkpointing: false,
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
    /// longest; see [`ResponseLogProbs`]. Refuses `activation_checkpointing`, which needs the
    /// loss: see [`QwenVl::backward_response_loss`].
    pub fn response_log_probs(
        &self,
        batch: &[TrainSequence<'_>],
        options: &TrainForwardOptions,
    ) -> Result<ResponseLogProbs, MlError> {
        if options.activation_checkpointing {
            return Err(MlError::Invalid(
                "training forward: activation checkpointing recomputes the graph in the backward \
                 pass, so it cannot return log-probabilities attached to one; use \
                 backward_response_loss"
                    .into(),
            ));
        }
        let layout = Layout::new(batch, options, self.config().text.vocab_size)?;
        let trunk = Trunk::new(self, batch, &layout, options)?;
        let hidden = torch_call(|| tch::with_grad(|| trunk.forward()))?;
        let (log_prob, entropy) = self.project_in_chunks(&hidden, &trunk.targets, options, true)?;
        let placement = Placement::new(&layout, self)?;
        torch_call(|| ResponseLogProbs {
            log_prob: tch::with_grad(|| placement.place(&log_prob)),
            entropy: entropy.as_ref().map(|e| placement.place(e)),
            response_mask: placement.mask(),
        })
    }

    /// Back-propagates `loss_scale ×` the scalar loss `loss` makes of the micro-batch's
    /// [`ResponseLogProbs`] into the trainable weights' `.grad()` (accumulating, not zeroing),
    /// and returns what else `loss` measured. Without `activation_checkpointing` this is
    /// [`QwenVl::response_log_probs`] then `backward`; with it, the checkpointed passes the
    /// module's documentation describes, where `loss` sees log-probabilities that are a leaf of
    /// a graph of their own. Either way the entropy carries no gradient.
    pub fn backward_response_loss<T>(
        &self,
        batch: &[TrainSequence<'_>],
        options: &TrainForwardOptions,
        loss_scale: f64,
        loss: impl FnOnce(&ResponseLogProbs) -> Result<(Tensor, T), MlError>,
    ) -> Result<T, MlError> {
        if !options.activation_checkpointing {
            let out = self.response_log_probs(batch, options)?;
            let (l, measured) = loss(&out)?;
            backward_scaled(&l, loss_scale)?;
            return Ok(measured);
        }
        let layout = Layout::new(batch, options, self.config().text.vocab_size)?;
        let trunk = Trunk::new(self, batch, &layout, options)?;
        let (kept, hidden) = torch_call(|| tch::no_grad(|| trunk.forward_keeping_inputs()))?;
        let (log_prob, entropy) =
            self.project_in_chunks(&hidden, &trunk.targets, options, false)?;
        let placement = Placement::new(&layout, self)?;
        let leaf = torch_call(|| log_prob.detach().set_requires_grad(true))?;
        let out = torch_call(|| ResponseLogProbs {
            log_prob: tch::with_grad(|| placement.place(&leaf)),
            entropy: entropy.as_ref().map(|e| placement.place(e)),
            response_mask: placement.mask(),
        })?;
        let (l, measured) = loss(&out)?;
        backward_scaled(&l, loss_scale)?;
        drop(out);
        let grad = leaf.grad();
        if grad.defined() {
            let grad = self.head_backward(&hidden, &trunk.targets, &grad, options)?;
            drop(hidden);
            trunk.backward(kept, grad)?;
        }
        Ok(measured)
    }

    /// Back-propagates `grad` `[N]` (dL/dlogp) through the vocabulary projection of `hidden`
    /// `[N, hidden]`, recomputing one chunk's logits at a time; returns dL/dhidden.
    fn head_backward(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
        grad: &Tensor,
        options: &TrainForwardOptions,
    ) -> Result<Tensor, MlError> {
        let leaf = torch_call(|| hidden.detach().set_requires_grad(true))?;
        let n = hidden.size()[0];
        let mut start = 0;
        while start < n {
            let rows = options.logit_chunk_rows.min(n - start);
            torch_call(|| {
                tch::with_grad(|| {
                    let log_prob = self.chunk_log_probs(
                        &leaf.narrow(0, start, rows),
                        &targets.narrow(0, start, rows),
                    );
                    (log_prob * grad.narrow(0, start, rows))
                        .sum(Kind::Float)
                        .backward()
                })
            })?;
            start += rows;
        }
        Ok(leaf.grad())
    }

    /// Log-probabilities `[rows]` of `targets` under the head's logits of `hidden`
    /// `[rows, hidden]`, in the current autograd mode.
    fn chunk_log_probs(&self, hidden: &Tensor, targets: &Tensor) -> Tensor {
        self.text
            .logits(hidden)
            .log_softmax(-1, Kind::Float)
            .gather(1, &targets.unsqueeze(1), false)
            .squeeze_dim(1)
    }

    /// Log-probabilities `[N]` of `targets` under the head's logits of `hidden` `[N, hidden]`,
    /// `options.logit_chunk_rows` rows at a time (with autograd when `grad`), and their entropy
    /// `[N]` (no gradient).
    fn project_in_chunks(
        &self,
        hidden: &Tensor,
        targets: &Tensor,
        options: &TrainForwardOptions,
        grad: bool,
    ) -> Result<(Tensor, Option<Tensor>), MlError> {
        let n = hidden.size()[0];
        let mut log_probs = Vec::new();
        let mut entropies = Vec::new();
        let mut start = 0;
        while start < n {
            let rows = options.logit_chunk_rows.min(n - start);
            let chunk = hidden.narrow(0, start, rows);
            let logits = torch_call(|| {
                if grad {
                    tch::with_grad(|| self.text.logits(&chunk))
                } else {
                    tch::no_grad(|| self.text.logits(&chunk))
                }
            })?;
            if options.entropy {
                let detached = logits.detach();
                entropies.push(tch::no_grad(|| entropy_from_logits(&detached))?);
            }
            log_probs.push(torch_call(|| {
                let picked = || {
                    logits
                        .log_softmax(-1, Kind::Float)
                        .gather(1, &targets.narrow(0, start, rows).unsqueeze(1), false)
                        .squeeze_dim(1)
                };
                if grad {
                    tch::with_grad(picked)
                } else {
                    tch::no_grad(picked)
                }
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

/// `(loss · scale).backward()`, refusing a loss that is not a scalar or does not depend on
/// anything trainable.
fn backward_scaled(loss: &Tensor, scale: f64) -> Result<(), MlError> {
    if loss.numel() != 1 {
        return Err(MlError::Invalid(format!(
            "training backward: the loss has shape {:?}; a scalar is needed to back-propagate",
            loss.size()
        )));
    }
    if !loss.requires_grad() {
        return Err(MlError::Invalid(
            "training backward: the loss does not depend on the log-probabilities".into(),
        ));
    }
    torch_call(|| (loss * scale).backward())
}

/// Where a micro-batch's `N` scored tokens go in the `[B, T]` outputs.
struct Placement {
    /// Flat `[B·T]` index of every scored token, sequence by sequence.
    slots: Tensor,
    b: i64,
    t: i64,
    device: tch::Device,
}

impl Placement {
    fn new(layout: &Layout, model: &QwenVl) -> Result<Placement, MlError> {
        let b = layout.kept.len() as i64;
        let t = layout.longest_response();
        let slots: Vec<i64> = (0..b)
            .flat_map(|i| (0..layout.kept[i as usize]).map(move |k| i * t + k))
            .collect();
        let device = model.device();
        let slots = torch_call(|| Tensor::from_slice(&slots).to_device(device))?;
        Ok(Placement {
            slots,
            b,
            t,
            device,
        })
    }

    /// `values` `[N]` at their slots of a zero `[B, T]`.
    fn place(&self, values: &Tensor) -> Tensor {
        Tensor::zeros([self.b * self.t], (Kind::Float, self.device))
            .index_copy(0, &self.slots, values)
            .view([self.b, self.t])
    }

    fn mask(&self) -> Tensor {
        let ones = Tensor::ones([self.slots.size()[0]], (Kind::Float, self.device));
        self.place(&ones)
    }
}

/// One step of the model's chain, each a function of the previous step's output.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// Pixels → patch embeddings in window order.
    Patches,
    VisionBlock(usize),
    /// Last vision block's output → merged image tokens.
    Merge,
    /// Image tokens (or nothing) → the decoder's input embeddings, image rows placed.
    Embed,
    Layer(usize),
    /// Last layer's output → final-normed hidden states of the scored positions `[N, hidden]`.
    Final,
}

/// A micro-batch's pass through the model as a chain of [`Stage`]s, with what the stages share.
struct Trunk<'m> {
    model: &'m QwenVl,
    /// The chain's input: pixels when the vision tower trains, else its (gradient-free) image
    /// tokens, or an empty tensor for a batch without images.
    input: Tensor,
    stages: Vec<Stage>,
    vision: Option<VisionPass>,
    ids: Tensor,
    /// `[B, L, hidden]`, true at image placeholders; `None` without images.
    image_slots: Option<Tensor>,
    cos: Tensor,
    sin: Tensor,
    /// Flat `[B·L]` row of each scored position.
    rows: Tensor,
    /// The scored tokens `[N]`.
    targets: Tensor,
}

impl<'m> Trunk<'m> {
    fn new(
        model: &'m QwenVl,
        batch: &[TrainSequence<'_>],
        layout: &Layout,
        options: &TrainForwardOptions,
    ) -> Result<Trunk<'m>, MlError> {
        let device = model.device();
        let images: Vec<&PreparedImage> = batch.iter().flat_map(|s| &s.prompt.images).collect();
        let mut stages = Vec::new();
        let (input, vision) = if images.is_empty() {
            (
                torch_call(|| Tensor::zeros([0], (model.kind(), device)))?,
                None,
            )
        } else if options.train_vision {
            let (pixels, grids) = model.image_pixels(&images)?;
            let pass = torch_call(|| model.vision.prepare(&grids, device))?;
            stages.push(Stage::Patches);
            stages.extend((0..model.vision.depth()).map(Stage::VisionBlock));
            stages.push(Stage::Merge);
            (pixels, Some(pass))
        } else {
            (model.encode_images(&images)?, None)
        };
        stages.push(Stage::Embed);
        stages.extend((0..model.text.num_layers()).map(Stage::Layer));
        stages.push(Stage::Final);
        let (b, l) = (batch.len() as i64, layout.columns);
        let padded = Padded::new(batch, layout, model.config().image_token_id);
        let hidden = model.config().text.hidden_size;
        torch_call(|| {
            let positions = Tensor::from_slice(&padded.positions.concat())
                .to_device(device)
                .view([3, b, l]);
            let (cos, sin) = model.text.rotary(&positions, model.kind());
            Trunk {
                model,
                stages,
                vision,
                ids: Tensor::from_slice(&padded.ids)
                    .to_device(device)
                    .view([b, l]),
                image_slots: (!images.is_empty()).then(|| {
                    Tensor::from_slice(&padded.image_slots)
                        .to_device(device)
                        .view([b, l, 1])
                        .expand([b, l, hidden], false)
                }),
                input,
                cos,
                sin,
                rows: Tensor::from_slice(&padded.rows).to_device(device),
                targets: Tensor::from_slice(&padded.targets).to_device(device),
            }
        })
    }

    fn run(&self, stage: Stage, x: &Tensor) -> Tensor {
        let vision = || {
            self.vision
                .as_ref()
                .expect("vision stages come with their pass")
        };
        let model = self.model;
        match stage {
            Stage::Patches => model.vision.embed_patches(x, vision()),
            Stage::VisionBlock(i) => model.vision.block(i, x, vision()),
            Stage::Merge => model.vision.merge(x, vision()),
            Stage::Embed => {
                let embeds = model.text.embed(&self.ids);
                match &self.image_slots {
                    Some(mask) => embeds.masked_scatter(mask, &x.to_kind(embeds.kind())),
                    None => embeds,
                }
            }
            Stage::Layer(i) => {
                model
                    .text
                    .layer(i, x, &self.cos, &self.sin, &TextMask::Causal, None)
            }
            Stage::Final => {
                let hidden = model.config().text.hidden_size;
                model
                    .text
                    .final_norm(x)
                    .view([-1, hidden])
                    .index_select(0, &self.rows)
            }
        }
    }

    /// The whole chain in the current autograd mode: final hidden states `[N, hidden]`.
    fn forward(&self) -> Tensor {
        let mut x = self.input.shallow_clone();
        for &stage in &self.stages {
            x = self.run(stage, &x);
        }
        x
    }

    /// The whole chain (run under `no_grad`), keeping each stage's input.
    fn forward_keeping_inputs(&self) -> (Vec<Tensor>, Tensor) {
        let mut kept = Vec::with_capacity(self.stages.len());
        let mut x = self.input.shallow_clone();
        for &stage in &self.stages {
            let next = self.run(stage, &x);
            kept.push(x);
            x = next;
        }
        (kept, x)
    }

    /// Walks the chain backwards from `grad` (dL/d its output): each stage recomputed with
    /// autograd from its kept input, made a leaf, and back-propagated with the gradient of its
    /// output; the leaf's gradient is the previous stage's. Stops early where nothing before
    /// can receive a gradient.
    fn backward(&self, mut kept: Vec<Tensor>, mut grad: Tensor) -> Result<(), MlError> {
        for (i, &stage) in self.stages.iter().enumerate().rev() {
            let input = kept.pop().expect("one kept input per stage");
            // The chain's own input (pixels, frozen image tokens) takes no gradient.
            let wants_grad = i > 0;
            let next = torch_call(|| {
                let leaf = input.detach().set_requires_grad(wants_grad);
                drop(input);
                tch::with_grad(|| {
                    let out = self.run(stage, &leaf);
                    if out.requires_grad() {
                        (out * &grad).sum(Kind::Float).backward();
                    }
                });
                leaf.grad()
            })?;
            if !wants_grad || !next.defined() {
                break;
            }
            grad = next;
        }
        Ok(())
    }
}
