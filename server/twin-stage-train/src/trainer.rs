//! The training loop's core, apart from the server: one GRPO or SFT step on a batch of
//! examples, greedy validation, and the trainer's state saved and restored exactly.
//!
//! A GRPO step (the recipe's, traced through verl in the design notes):
//! 1. *rollout*: the engine draws `group_size` responses per prompt (one prefill per prompt,
//!    shared by its samples), temperature and top-p as the spec says, each sample's generator
//!    seeded by the run's seed, the step and the sample's place in the batch, so a step is
//!    redrawn identically after a resume;
//! 2. *reward*: each response, decoded without special tokens, is scored by the caller's reward;
//! 3. *log-probs*: the frozen reference model's log-probabilities for the KL term, per
//!    micro-batch (timed apart from the update);
//! 4. *update*: per micro-batch the policy's log-probabilities with gradients, the actor loss
//!    (dual-clip PPO + k3 KL), back-propagated scaled by 1/micro-batches; then AdamW with clipping.
//!
//! One PPO epoch on one mini-batch makes the update on-policy: the policy that sampled is the one
//! being trained, so the "old" log-probabilities are the trained ones detached and the ratio is
//! exactly 1 (verl recomputes them in a separate forward pass and gets the same numbers up to
//! float noise; we save that pass). The engine's own sampled log-probabilities are compared with
//! the trainer's: their mean gap is a metric, since an engine that drifts from the trainer
//! silently turns on-policy training off-policy.
//!
//! State: on the CPU the model computes in f32 and AdamW updates its tensors directly; on a GPU
//! the model computes in bf16 and AdamW updates f32 master weights (`MasterWeights`). Either way
//! [`Trainer::save_state`] writes the f32 weights the optimizer updates and the optimizer's
//! moments, and [`Trainer::load_state`] restores both bit for bit; with the step number (which
//! seeds everything else) that is all a run needs to continue exactly.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::time::Instant;

use twin_core::train::{TrainObjective, TrainStepMetrics};
use twin_ml::MlError;
use twin_ml::qwen::{
    EngineOptions, FinishReason, GenerationRequest, QwenAssets, QwenVl, SamplingParams,
    TrainForwardOptions, TrainSequence,
};
use twin_ml::tch::{self, Kind, Tensor};
use twin_ml::train::{
    ActorLossConfig, ActorLossInputs, AdamW, AdamWConfig, MasterWeights, PolicyLossInputs,
    StepMetrics, accumulate_micro_batches, actor_loss, grpo_advantages, sft_loss, token_advantages,
};
use twin_stage::StageError;

use crate::data::Example;

/// How a run trains (the spec's numbers, typed).
#[derive(Debug, Clone)]
pub struct TrainSettings {
    pub objective: TrainObjective,
    pub group_size: usize,
    pub micro_batch: usize,
    pub learning_rate: f64,
    pub actor: ActorLossConfig,
    pub adamw: AdamWConfig,
    pub temperature: f64,
    pub top_p: f64,
    pub max_response_tokens: usize,
    pub max_prompt_tokens: usize,
    pub train_vision: bool,
    pub seed: u64,
    /// Sequences decoded together by the engine.
    pub engine_rows: usize,
    /// Recompute activations in the backward pass (the recipe's gradient checkpointing); worth
    /// it at the real size on a GPU, not on small models.
    pub activation_checkpointing: bool,
}

/// One sampled (or, for SFT, target) response and what it earned.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Rollout {
    /// The example (prompt) it answers.
    pub prompt_id: String,
    pub sample: usize,
    pub completion: String,
    pub tokens: usize,
    pub finish: String,
    pub reward: f64,
    pub components: BTreeMap<String, f64>,
    pub advantage: f64,
}

/// A reward's verdict on one response.
#[derive(Debug, Clone, PartialEq)]
pub struct Reward {
    pub score: f64,
    pub components: BTreeMap<String, f64>,
}

/// What the reward sees of a response.
#[derive(Debug, Clone, Copy)]
pub struct Response<'a> {
    pub example: &'a Example,
    /// Decoded without special tokens, as verl's reward manager decodes it.
    pub completion: &'a str,
}

/// Scores responses in order.
pub type RewardFn<'a> = dyn FnMut(&[Response<'_>]) -> Result<Vec<Reward>, StageError> + 'a;

/// What one step did.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub metrics: TrainStepMetrics,
    pub rollouts: Vec<Rollout>,
    pub applied: bool,
}

/// A greedy answer to a validation question.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Answer {
    pub id: String,
    pub completion: String,
    pub target: String,
    pub reward: f64,
    /// The FGVQA pair rule's score of the answer (1 or 0).
    pub pair_score: f64,
    pub tokens: usize,
    pub truncated: bool,
}

/// The trained policy, its optimizer and the frozen reference.
pub struct Trainer {
    model: QwenVl,
    reference: Option<QwenVl>,
    pub assets: QwenAssets,
    optimizer: AdamW,
    /// f32 masters when the model computes in a lower precision.
    masters: Option<MasterWeights>,
    settings: TrainSettings,
    stops: Vec<i64>,
}

fn ml(what: &str) -> impl Fn(MlError) -> StageError + '_ {
    move |e| match e {
        MlError::OutOfMemory(_) => StageError::out_of_memory(format!(
            "{what}: {e}; lower spec.micro_batch, spec.batch_prompts or \
             spec.max_response_tokens (or use a device with more memory)"
        )),
        e => StageError::new(e.failure_code(), format!("{what}: {e}")),
    }
}

impl Trainer {
    /// A trainer of `model` (made trainable here), with `reference` for the KL term when the
    /// settings weigh it.
    pub fn new(
        mut model: QwenVl,
        reference: Option<QwenVl>,
        assets: QwenAssets,
        settings: TrainSettings,
    ) -> Result<Trainer, StageError> {
        model.set_trainable(settings.train_vision);
        let stops = assets.stop_tokens(model.config());
        let (optimizer, masters) = if model.kind() == Kind::Float {
            let params = model.trainable_parameters();
            (
                AdamW::new(params, settings.adamw).map_err(ml("optimizer"))?,
                None,
            )
        } else {
            let masters =
                MasterWeights::new(model.trainable_parameters()).map_err(ml("master weights"))?;
            let optimizer =
                AdamW::new(masters.masters(), settings.adamw).map_err(ml("optimizer"))?;
            (optimizer, Some(masters))
        };
        Ok(Trainer {
            model,
            reference,
            assets,
            optimizer,
            masters,
            settings,
            stops,
        })
    }

    pub fn model(&self) -> &QwenVl {
        &self.model
    }

    /// The trained model and its assets, the optimizer dropped (to train them on another way).
    pub fn into_parts(self) -> (QwenVl, QwenAssets) {
        (self.model, self.assets)
    }

    pub fn stop_tokens(&self) -> &[i64] {
        &self.stops
    }

    fn forward_options(&self) -> TrainForwardOptions {
        TrainForwardOptions {
            train_vision: self.settings.train_vision,
            max_prompt_len: self.settings.max_prompt_tokens,
            stop_tokens: self.stops.clone(),
            entropy: true,
            activation_checkpointing: self.settings.activation_checkpointing,
            ..TrainForwardOptions::default()
        }
    }

    /// One optimizer step on `batch` (prompts in order). `stop` is asked between micro-batches;
    /// when it says so the step is abandoned before the optimizer runs (the weights untouched)
    /// with `Err(cancelled)`.
    pub fn step(
        &mut self,
        step: u64,
        batch: &[&Example],
        reward: &mut RewardFn<'_>,
        stop: &dyn Fn() -> Result<(), StageError>,
    ) -> Result<StepReport, StageError> {
        match self.settings.objective {
            TrainObjective::Grpo => self.grpo_step(step, batch, reward, stop),
            TrainObjective::Sft => self.sft_step(batch, stop),
        }
    }

    fn grpo_step(
        &mut self,
        step: u64,
        batch: &[&Example],
        reward: &mut RewardFn<'_>,
        stop: &dyn Fn() -> Result<(), StageError>,
    ) -> Result<StepReport, StageError> {
        let started = Instant::now();
        let s = self.settings.clone();
        let group = s.group_size;
        // Rollouts.
        let params: Vec<SamplingParams> = (0..batch.len())
            .map(|i| SamplingParams {
                temperature: s.temperature,
                top_p: s.top_p,
                top_k: 0,
                max_new_tokens: s.max_response_tokens,
                stop_token_ids: self.stops.clone(),
                seed: rollout_seed(s.seed, step, i),
            })
            .collect();
        let requests: Vec<GenerationRequest<'_>> = batch
            .iter()
            .zip(&params)
            .map(|(e, params)| GenerationRequest {
                prompt: &e.prompt,
                samples: group,
                params,
            })
            .collect();
        let options = EngineOptions {
            max_batch_rows: s.engine_rows.max(1),
            ..EngineOptions::default()
        };
        let (completions, _) =
            twin_ml::qwen::generate(&self.model, &requests, &options).map_err(|e| {
                if let MlError::Request { index, message } = &e
                    && let Some(ex) = batch.get(*index)
                {
                    return StageError::new(
                        e.failure_code(),
                        format!("question {}: {message}", ex.id),
                    );
                }
                ml("rollouts")(e)
            })?;
        let rollout_seconds = started.elapsed().as_secs_f64();
        stop()?;

        // Rewards, on responses decoded without special tokens.
        let reward_started = Instant::now();
        let mut texts = Vec::with_capacity(batch.len() * group);
        for (e, samples) in batch.iter().zip(&completions) {
            for c in samples {
                let text = self
                    .assets
                    .tokenizer
                    .decode(&c.tokens)
                    .map_err(ml(&format!("decoding a response to {}", e.id)))?;
                texts.push(text);
            }
        }
        let responses: Vec<Response<'_>> = batch
            .iter()
            .flat_map(|e| std::iter::repeat_n(*e, group))
            .zip(&texts)
            .map(|(example, completion)| Response {
                example,
                completion,
            })
            .collect();
        let rewards = reward(&responses)?;
        if rewards.len() != responses.len() {
            return Err(StageError::internal(format!(
                "the reward scored {} of {} responses",
                rewards.len(),
                responses.len()
            )));
        }
        if let Some(i) = rewards.iter().position(|r| !r.score.is_finite()) {
            return Err(StageError::new(
                twin_core::FailureCode::ModuleError,
                format!(
                    "the reward of a response to {} is {}, not a finite number",
                    responses[i].example.id, rewards[i].score
                ),
            ));
        }
        let reward_seconds = reward_started.elapsed().as_secs_f64();

        let scores: Vec<f32> = rewards.iter().map(|r| r.score as f32).collect();
        let groups: Vec<usize> = (0..batch.len())
            .flat_map(|i| std::iter::repeat_n(i, group))
            .collect();
        let advantages = grpo_advantages(&scores, &groups).map_err(ml("advantages"))?;

        // Log-probabilities and the update, micro-batch by micro-batch.
        let flat: Vec<(&Example, &twin_ml::qwen::Completion)> = batch
            .iter()
            .zip(&completions)
            .flat_map(|(e, samples)| samples.iter().map(move |c| (*e, c)))
            .collect();
        let sequences: Vec<TrainSequence<'_>> = flat
            .iter()
            .map(|(e, c)| TrainSequence {
                prompt: &e.prompt,
                response: &c.tokens,
            })
            .collect();
        let engine_logprobs: Vec<&[f32]> =
            flat.iter().map(|(_, c)| c.logprobs.as_slice()).collect();
        let options = self.forward_options();
        // The reference pass needs log-probabilities only: entropy over the vocabulary is the
        // policy's metric.
        let ref_options = TrainForwardOptions {
            entropy: false,
            ..options.clone()
        };
        let update_started = Instant::now();
        let mut logprob_seconds = 0.0;
        let mut gap_sum = 0.0f64;
        let mut gap_tokens = 0u64;
        self.zero_grad();
        let model = &self.model;
        let reference = self.reference.as_ref();
        let actor = s.actor;
        let adv = &advantages.advantages;
        let micro = accumulate_micro_batches(sequences.len(), s.micro_batch, |range, scale| {
            stop().map_err(|e| MlError::Invalid(format!("cancelled: {e}")))?;
            let seqs = &sequences[range.clone()];
            let ref_started = Instant::now();
            let ref_log_prob = match reference {
                Some(r) if actor.kl_coef != 0.0 => {
                    let out = tch::no_grad(|| r.response_log_probs(seqs, &ref_options))?;
                    Some(out.log_prob)
                }
                _ => None,
            };
            logprob_seconds += ref_started.elapsed().as_secs_f64();
            model.backward_response_loss(seqs, &options, scale, |out| {
                let (gap, n) = logprob_gap(
                    &out.log_prob,
                    &out.response_mask,
                    &engine_logprobs[range.clone()],
                )?;
                gap_sum += gap;
                gap_tokens += n;
                let token_adv = token_advantages(&adv[range.clone()], &out.response_mask)?;
                let old = out.log_prob.detach();
                let ref_lp = ref_log_prob.as_ref().map(|t| t.to_kind(Kind::Float));
                let loss = actor_loss(
                    ActorLossInputs {
                        policy: PolicyLossInputs {
                            old_log_prob: &old,
                            log_prob: &out.log_prob,
                            advantages: &token_adv,
                            response_mask: &out.response_mask,
                        },
                        ref_log_prob: ref_lp.as_ref(),
                        entropy: out.entropy.as_ref(),
                    },
                    &actor,
                )?;
                Ok((loss.loss, loss.metrics))
            })
        })
        .map_err(|e| match e {
            MlError::Invalid(m) if m.starts_with("cancelled") => StageError::cancelled(),
            e => ml("the update")(e),
        })?;
        let outcome = self.optimizer_step()?;
        let skipped = self.optimizer.skipped_steps();
        let measured = StepMetrics::new(&micro, outcome, skipped).map_err(ml("step metrics"))?;
        let update_seconds = update_started.elapsed().as_secs_f64() - logprob_seconds;

        let lengths: Vec<usize> = flat.iter().map(|(_, c)| c.tokens.len()).collect();
        let rollouts: Vec<Rollout> = flat
            .iter()
            .enumerate()
            .map(|(i, (e, c))| Rollout {
                prompt_id: e.id.clone(),
                sample: i % group,
                completion: texts[i].clone(),
                tokens: c.tokens.len(),
                finish: match c.finish {
                    FinishReason::Stop => "stop".into(),
                    FinishReason::Length => "length".into(),
                },
                reward: rewards[i].score,
                components: rewards[i].components.clone(),
                advantage: f64::from(advantages.advantages[i]),
            })
            .collect();
        let adv64: Vec<f64> = advantages
            .advantages
            .iter()
            .map(|a| f64::from(*a))
            .collect();
        let (adv_mean, adv_std) = mean_std(&adv64);
        let wall = started.elapsed().as_secs_f64();
        let metrics = TrainStepMetrics {
            reward_mean: mean(rewards.iter().map(|r| r.score)),
            accuracy: mean(rewards.iter().map(|r| f64::from(u8::from(r.score >= 1.0)))),
            all_equal_fraction: advantages.uniform_fraction(),
            advantage_mean: adv_mean,
            advantage_std: adv_std,
            advantage_min: adv64.iter().copied().fold(f64::INFINITY, f64::min),
            advantage_max: adv64.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            policy_loss: measured.policy_loss,
            kl: measured.kl,
            entropy: measured.entropy,
            grad_norm: finite_or_zero(measured.grad_norm),
            skipped_steps: skipped,
            learning_rate: s.learning_rate,
            clip_fraction: measured.clip_fraction,
            response_length_mean: mean(lengths.iter().map(|l| *l as f64)),
            response_length_max: lengths.iter().copied().max().unwrap_or(0) as u64,
            tokens_per_second: measured.tokens as f64 / wall.max(1e-9),
            logprob_gap: (gap_tokens > 0).then(|| gap_sum / gap_tokens as f64),
            rollout_seconds,
            reward_seconds,
            logprob_seconds,
            update_seconds,
        };
        Ok(StepReport {
            metrics,
            rollouts,
            applied: outcome.applied,
        })
    }

    /// The SFT target of an example: its answer as the reward reads it, then the end of turn.
    pub fn sft_target(&self, example: &Example) -> Result<Vec<i64>, StageError> {
        let mut tokens = self
            .assets
            .tokenizer
            .encode(&format!("<answer>{}</answer>", example.answer))
            .map_err(ml("the SFT target"))?;
        let end = self
            .assets
            .tokenizer
            .token_id(twin_ml::qwen::chat::IM_END)
            .or_else(|| self.stops.first().copied())
            .ok_or_else(|| StageError::model("the checkpoint has no stop token"))?;
        tokens.push(end);
        Ok(tokens)
    }

    fn sft_step(
        &mut self,
        batch: &[&Example],
        stop: &dyn Fn() -> Result<(), StageError>,
    ) -> Result<StepReport, StageError> {
        let started = Instant::now();
        let targets: Vec<Vec<i64>> = batch
            .iter()
            .map(|e| self.sft_target(e))
            .collect::<Result<_, _>>()?;
        let sequences: Vec<TrainSequence<'_>> = batch
            .iter()
            .zip(&targets)
            .map(|(e, t)| TrainSequence {
                prompt: &e.prompt,
                response: t,
            })
            .collect();
        let options = self.forward_options();
        self.zero_grad();
        let model = &self.model;
        let micro = accumulate_micro_batches(
            sequences.len(),
            self.settings.micro_batch,
            |range: Range<usize>, scale| {
                stop().map_err(|e| MlError::Invalid(format!("cancelled: {e}")))?;
                model.backward_response_loss(&sequences[range], &options, scale, |out| {
                    let loss = sft_loss(&out.log_prob, &out.response_mask)?;
                    let value = loss.double_value(&[]);
                    let tokens = out.response_mask.sum(Kind::Float).double_value(&[]);
                    let entropy = out
                        .entropy
                        .as_ref()
                        .map(|e| (e * &out.response_mask).sum(Kind::Float).double_value(&[]));
                    Ok((loss, (value, tokens, entropy)))
                })
            },
        )
        .map_err(|e| match e {
            MlError::Invalid(m) if m.starts_with("cancelled") => StageError::cancelled(),
            e => ml("the update")(e),
        })?;
        let outcome = self.optimizer_step()?;
        let tokens: f64 = micro.iter().map(|m| m.1).sum();
        let entropy_sum: Option<f64> = micro.iter().map(|m| m.2).sum();
        let wall = started.elapsed().as_secs_f64();
        let lengths: Vec<usize> = targets.iter().map(Vec::len).collect();
        let metrics = TrainStepMetrics {
            policy_loss: mean(micro.iter().map(|m| m.0)),
            entropy: entropy_sum.map(|e| e / tokens.max(1.0)),
            grad_norm: finite_or_zero(outcome.grad_norm),
            skipped_steps: self.optimizer.skipped_steps(),
            learning_rate: self.settings.learning_rate,
            response_length_mean: mean(lengths.iter().map(|l| *l as f64)),
            response_length_max: lengths.iter().copied().max().unwrap_or(0) as u64,
            tokens_per_second: tokens / wall.max(1e-9),
            update_seconds: wall,
            ..TrainStepMetrics::default()
        };
        Ok(StepReport {
            metrics,
            rollouts: Vec::new(),
            applied: outcome.applied,
        })
    }

    fn zero_grad(&mut self) {
        match &mut self.masters {
            Some(m) => m.zero_grad(),
            None => self.optimizer.zero_grad(),
        }
    }

    fn optimizer_step(&mut self) -> Result<twin_ml::train::StepOutcome, StageError> {
        let lr = self.settings.learning_rate;
        match &self.masters {
            Some(m) => m.step(&mut self.optimizer, lr),
            None => self.optimizer.step(lr),
        }
        .map_err(ml("the optimizer step"))
    }

    /// Greedy answers to `examples`, scored by `reward` and by the FGVQA pair rule.
    pub fn validate(
        &self,
        examples: &[Example],
        reward: &mut RewardFn<'_>,
        stop: &dyn Fn() -> Result<(), StageError>,
    ) -> Result<Vec<Answer>, StageError> {
        let params = SamplingParams::greedy(self.settings.max_response_tokens, self.stops.clone());
        let options = EngineOptions {
            max_batch_rows: self.settings.engine_rows.max(1),
            ..EngineOptions::default()
        };
        let mut answers = Vec::with_capacity(examples.len());
        for chunk in examples.chunks(self.settings.engine_rows.max(1)) {
            stop()?;
            let requests: Vec<GenerationRequest<'_>> = chunk
                .iter()
                .map(|e| GenerationRequest {
                    prompt: &e.prompt,
                    samples: 1,
                    params: &params,
                })
                .collect();
            let (out, _) = twin_ml::qwen::generate(&self.model, &requests, &options)
                .map_err(ml("validation"))?;
            let mut texts = Vec::with_capacity(chunk.len());
            let mut meta = Vec::with_capacity(chunk.len());
            for (e, c) in chunk.iter().zip(out) {
                let c = c
                    .into_iter()
                    .next()
                    .ok_or_else(|| StageError::internal("the engine returned no completion"))?;
                let text = self
                    .assets
                    .tokenizer
                    .decode(&c.tokens)
                    .map_err(ml(&format!("decoding the answer to {}", e.id)))?;
                texts.push(text);
                meta.push((c.tokens.len(), c.finish == FinishReason::Length));
            }
            let responses: Vec<Response<'_>> = chunk
                .iter()
                .zip(&texts)
                .map(|(example, completion)| Response {
                    example,
                    completion,
                })
                .collect();
            let scored = reward(&responses)?;
            for (((e, text), (tokens, truncated)), r) in
                chunk.iter().zip(texts).zip(meta).zip(scored)
            {
                answers.push(Answer {
                    id: e.id.clone(),
                    pair_score: twin_rules::fgvqa_pair(&text, &e.answer),
                    completion: text,
                    target: e.answer.clone(),
                    reward: r.score,
                    tokens,
                    truncated,
                });
            }
        }
        Ok(answers)
    }

    /// Writes what the run needs to continue: the f32 weights the optimizer updates
    /// (`weights.safetensors`) and the optimizer's state (`optimizer.safetensors`).
    pub fn save_state(&self, dir: &Path) -> Result<(), StageError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StageError::internal(format!("creating {}: {e}", dir.display())))?;
        let weights = dir.join(WEIGHTS_FILE);
        match &self.masters {
            Some(m) => m.save(&weights),
            None => {
                twin_ml::weights::write_safetensors(&weights, &self.model.trainable_parameters())
            }
        }
        .map_err(ml("saving the weights"))?;
        self.optimizer
            .save(&dir.join(OPTIMIZER_FILE))
            .map_err(ml("saving the optimizer"))
    }

    /// Restores what [`Trainer::save_state`] wrote for this model.
    pub fn load_state(&mut self, dir: &Path) -> Result<(), StageError> {
        let weights = dir.join(WEIGHTS_FILE);
        match &mut self.masters {
            Some(m) => m.load(&weights).map_err(ml("restoring the weights"))?,
            None => {
                let saved: std::collections::HashMap<String, Tensor> =
                    twin_ml::weights::read_safetensors(&weights)
                        .map_err(ml("restoring the weights"))?
                        .into_iter()
                        .collect();
                let params = self.model.trainable_parameters();
                for (name, p) in &params {
                    let t = saved.get(name).ok_or_else(|| {
                        StageError::internal(format!("{}: no weight `{name}`", weights.display()))
                    })?;
                    if t.size() != p.size() || t.kind() != p.kind() {
                        return Err(StageError::internal(format!(
                            "{}: weight `{name}` is {:?} {:?}, expected {:?} {:?}",
                            weights.display(),
                            t.kind(),
                            t.size(),
                            p.kind(),
                            p.size()
                        )));
                    }
                }
                tch::no_grad(|| {
                    for (name, p) in &params {
                        if let Some(t) = saved.get(name) {
                            p.shallow_clone().copy_(t);
                        }
                    }
                });
            }
        }
        self.optimizer
            .load(&dir.join(OPTIMIZER_FILE))
            .map_err(ml("restoring the optimizer"))
    }

    /// Writes a checkpoint in the Hugging Face layout, weights in bf16 (what transformers and the
    /// eval stage load), with the starting checkpoint's tokenizer, template and processor files.
    pub fn save_checkpoint(&self, dir: &Path, assets_from: &Path) -> Result<(), StageError> {
        let io =
            |p: &Path, e: std::io::Error| StageError::internal(format!("{}: {e}", p.display()));
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        self.model
            .save_pretrained_as(dir, &self.assets.processor.preprocessor, Kind::BFloat16)
            .map_err(ml("writing the checkpoint"))?;
        for name in CARRIED_FILES {
            let from = assets_from.join(name);
            if from.is_file() {
                std::fs::copy(&from, dir.join(name)).map_err(|e| io(&from, e))?;
            }
        }
        Ok(())
    }
}

/// Files of the starting checkpoint a saved checkpoint carries over unchanged.
const CARRIED_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];
const WEIGHTS_FILE: &str = "weights.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// The seed of prompt `index`'s samples at `step`: a function of the run's seed and the position
/// only, so a resumed run redraws exactly what an uninterrupted one draws.
pub fn rollout_seed(seed: u64, step: u64, index: usize) -> u64 {
    let mut z = seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (index as u64).rotate_left(32);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Sum of |trainer − engine| log-probabilities over the mask, and the tokens counted.
fn logprob_gap(log_prob: &Tensor, mask: &Tensor, engine: &[&[f32]]) -> Result<(f64, u64), MlError> {
    let width = log_prob.size()[1] as usize;
    let mut rows = Vec::with_capacity(engine.len() * width);
    for lp in engine {
        rows.extend(lp.iter().take(width).copied());
        rows.extend(std::iter::repeat_n(0f32, width.saturating_sub(lp.len())));
    }
    let engine = Tensor::from_slice(&rows)
        .view([engine.len() as i64, width as i64])
        .to_device(log_prob.device());
    let gap = ((log_prob.detach().to_kind(Kind::Float) - engine).abs() * mask)
        .sum(Kind::Double)
        .double_value(&[]);
    let n = mask.sum(Kind::Double).double_value(&[]);
    Ok((gap, n as u64))
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { 0.0 } else { sum / n as f64 }
}

fn mean_std(values: &[f64]) -> (f64, f64) {
    let m = mean(values.iter().copied());
    let var = mean(values.iter().map(|v| (v - m) * (v - m)));
    (m, var.sqrt())
}

fn finite_or_zero(v: f64) -> f64 {
    if v.is_finite() { v } else { 0.0 }
}
