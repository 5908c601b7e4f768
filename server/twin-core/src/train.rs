//! The `train` job: GRPO (or SFT) post-training of a Qwen2.5-VL checkpoint on a built dataset's
//! pair questions, with the TWIN recipe's values as defaults.
//!
//! A submission names a built dataset, a registered starting model and a reward; the server pins
//! all three to hashes before the job is logged, so a later build, alias switch or module upload
//! cannot change what a queued or re-leased run trains on. While it runs the executor records one
//! [`TrainStep`] event per optimizer step and one [`TrainValidation`] event per validation; each
//! checkpoint is registered as a model whose `job` is the run, so lineage reads checkpoint ← job
//! ← dataset, reward modules and starting model.

use serde::{Deserialize, Serialize};

use crate::ids::BlobHash;
use crate::mine::ComputeDevice;
use crate::score::{Grants, ModuleLimits, RewardSpec, check_grants, check_limits};
use crate::spec::SpecError;

/// Most prompts in one step's batch (the recipe uses 480).
pub const MAX_BATCH_PROMPTS: u32 = 65_536;
/// Most samples per prompt (the recipe uses 5).
pub const MAX_GROUP_SIZE: u32 = 64;
/// Longest prompt or response a spec may allow, in tokens.
pub const MAX_TOKENS: u32 = 32_768;
/// Most data epochs a run may take.
pub const MAX_EPOCHS: u32 = 1_000;
/// Most optimizer steps a run may take.
pub const MAX_STEPS: u32 = 10_000_000;
/// Most held-out questions one validation may ask.
pub const MAX_VALIDATION_QUESTIONS: u32 = 100_000;
/// The reward module a spec names when it names none: the TWIN rule (1 when the last
/// `<answer>` equals the label after normalisation, else 0).
pub const DEFAULT_REWARD_MODULE: &str = "binary-match";
/// The loss aggregation modes (verl's names).
pub const LOSS_AGG_MODES: [&str; 5] = [
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
];

/// What the run optimises.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TrainObjective {
    /// Group relative policy optimisation with the job's reward (the paper's recipe).
    #[default]
    Grpo,
    /// Supervised fine-tuning on the target answer as the reward reads it
    /// (`<answer>yes</answer>`): a warm start that teaches a model the answer format.
    Sft,
}

impl TrainObjective {
    pub fn as_str(self) -> &'static str {
        match self {
            TrainObjective::Grpo => "grpo",
            TrainObjective::Sft => "sft",
        }
    }
}

/// Post-train a Qwen2.5-VL checkpoint on a built dataset's train split.
///
/// Defaults are per field (not `#[serde(default)]` on the struct) so the OpenAPI document lists
/// them as plain values; each field's comment says its default and bound.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// `grpo` (default) or `sft`.
    #[serde(default)]
    pub objective: TrainObjective,
    /// The built dataset: its name (the latest build) or manifest hash. Its train split's pair
    /// questions are the training data, its eval split's pair questions the validation set.
    pub dataset: String,
    /// Set by the server: the manifest `dataset` resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub manifest: Option<BlobHash>,
    /// Set by the server: the dataset's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_name: Option<String>,
    /// The starting checkpoint: a registered model's name or manifest hash (`twin models add`).
    pub model: String,
    /// Set by the server: the starting model's manifest hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub model_manifest: Option<BlobHash>,
    /// The reward: one module or a weighted sum; `binary-match` (the TWIN rule) by default.
    /// Also the validation metric.
    #[serde(default = "default_reward")]
    pub reward: RewardSpec,
    /// Host capabilities granted to the reward modules.
    #[serde(default)]
    pub grants: Grants,
    /// Per-call limits of the reward modules; unset fields take the executor's defaults.
    #[serde(default)]
    pub limits: ModuleLimits,
    /// Prompts per step, half "yes" and half "no" (even, 2..=65536; default 480).
    #[serde(default = "default_batch_prompts")]
    pub batch_prompts: u32,
    /// Samples per prompt (GRPO: 2..=64, default 5; SFT trains on one target per prompt).
    #[serde(default = "default_group_size")]
    pub group_size: u32,
    /// Sequences per micro-batch (gradient accumulation); must divide the step's sequences
    /// (default 60).
    #[serde(default = "default_micro_batch")]
    pub micro_batch: u32,
    /// Constant learning rate, no warm-up (in (0, 1]; default 1e-6).
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
    /// AdamW's decoupled weight decay (in [0, 1]; default 0.01).
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Global gradient-norm clip (in (0, 1e6]; default 1.0).
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f64,
    /// Weight of the k3 KL penalty to the frozen starting model (in [0, 100]; default 0.01; 0
    /// loads no reference model).
    #[serde(default = "default_kl_coef")]
    pub kl_coef: f64,
    /// PPO clip range (in (0, 1]; default 0.2).
    #[serde(default = "default_clip")]
    pub clip: f64,
    /// Dual-clip constant (in (1, 100]; default 3.0).
    #[serde(default = "default_dual_clip")]
    pub dual_clip: f64,
    /// verl's loss aggregation (`token-mean` by default).
    #[serde(default = "default_loss_agg_mode")]
    pub loss_agg_mode: String,
    /// Passes over the training data (1..=1000; default 1); `max_steps` ends a run earlier.
    #[serde(default = "default_epochs")]
    pub epochs: u32,
    /// At most this many optimizer steps (1..=10^7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u32>,
    /// Longest prompt, in tokens, image placeholders included (1..=32768; default 2048).
    #[serde(default = "default_max_tokens")]
    pub max_prompt_tokens: u32,
    /// Longest response, in tokens (1..=32768; default 2048).
    #[serde(default = "default_max_tokens")]
    pub max_response_tokens: u32,
    /// Rollout sampling temperature (in (0, 10]; default 1.0).
    #[serde(default = "default_one")]
    pub temperature: f64,
    /// Rollout nucleus mass (in (0, 1]; default 1.0).
    #[serde(default = "default_one")]
    pub top_p: f64,
    /// Validate every this many steps, and before the first and after the last (0: only
    /// before and after; default 20).
    #[serde(default = "default_validate_every")]
    pub validate_every: u32,
    /// At most this many eval-split pair questions per validation (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_limit: Option<u32>,
    /// Checkpoint every this many steps, and after the last (1..=10^7; default 40).
    #[serde(default = "default_save_every")]
    pub save_every: u32,
    /// Keep the vision tower frozen (default false: the recipe trains it).
    #[serde(default)]
    pub freeze_vision: bool,
    /// Seeds the sampler's order and every rollout draw (default 0).
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub device: ComputeDevice,
    /// A model name to point at the last checkpoint when the run succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub register_as: Option<String>,
}

fn default_reward() -> RewardSpec {
    RewardSpec {
        module: Some(DEFAULT_REWARD_MODULE.to_owned()),
        module_hash: None,
        params: serde_json::Value::Object(Default::default()),
        weighted_sum: Vec::new(),
    }
}
fn default_batch_prompts() -> u32 {
    480
}
fn default_group_size() -> u32 {
    5
}
fn default_micro_batch() -> u32 {
    60
}
fn default_learning_rate() -> f64 {
    1e-6
}
fn default_weight_decay() -> f64 {
    0.01
}
fn default_max_grad_norm() -> f64 {
    1.0
}
fn default_kl_coef() -> f64 {
    0.01
}
fn default_clip() -> f64 {
    0.2
}
fn default_dual_clip() -> f64 {
    3.0
}
fn default_loss_agg_mode() -> String {
    "token-mean".to_owned()
}
fn default_epochs() -> u32 {
    1
}
fn default_max_tokens() -> u32 {
    2048
}
fn default_one() -> f64 {
    1.0
}
fn default_validate_every() -> u32 {
    20
}
fn default_save_every() -> u32 {
    40
}

impl TrainSpec {
    /// Sequences in one step: every prompt's group for GRPO, one target per prompt for SFT.
    pub fn sequences_per_step(&self) -> u64 {
        match self.objective {
            TrainObjective::Grpo => u64::from(self.batch_prompts) * u64::from(self.group_size),
            TrainObjective::Sft => u64::from(self.batch_prompts),
        }
    }

    /// Blobs the job reads: the dataset's manifest, the starting model, the reward modules.
    pub fn inputs(&self) -> Vec<BlobHash> {
        self.manifest
            .into_iter()
            .chain(self.model_manifest)
            .chain(
                self.reward
                    .terms()
                    .into_iter()
                    .filter_map(|t| t.module_hash),
            )
            .collect()
    }

    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        let bad = |field: &str, message: &str| Err(SpecError::invalid(field, message));
        if self.dataset.is_empty() {
            return bad(
                "spec.dataset",
                "must name a built dataset (its name or manifest hash)",
            );
        }
        if self.batch_prompts < 2
            || self.batch_prompts > MAX_BATCH_PROMPTS
            || !self.batch_prompts.is_multiple_of(2)
        {
            return bad(
                "spec.batch_prompts",
                "must be even and between 2 and 65536 (half \"yes\", half \"no\")",
            );
        }
        let min_group = match self.objective {
            TrainObjective::Grpo => 2,
            TrainObjective::Sft => 1,
        };
        if self.group_size < min_group || self.group_size > MAX_GROUP_SIZE {
            return bad(
                "spec.group_size",
                "must be between 2 and 64 for grpo (a group of one has no advantage)",
            );
        }
        let sequences = self.sequences_per_step();
        if self.micro_batch == 0
            || u64::from(self.micro_batch) > sequences
            || !sequences.is_multiple_of(u64::from(self.micro_batch))
        {
            return Err(SpecError::invalid(
                "spec.micro_batch",
                format!(
                    "must divide the {sequences} sequences of a step (batch_prompts × \
                     group_size for grpo, batch_prompts for sft) into equal micro-batches"
                ),
            ));
        }
        let within = |field: &str, v: f64, lo: f64, lo_open: bool, hi: f64, text: &str| {
            let above = if lo_open { v > lo } else { v >= lo };
            if v.is_finite() && above && v <= hi {
                Ok(())
            } else {
                Err(SpecError::invalid(field, format!("must be in {text}")))
            }
        };
        within(
            "spec.learning_rate",
            self.learning_rate,
            0.0,
            true,
            1.0,
            "(0, 1]",
        )?;
        within(
            "spec.weight_decay",
            self.weight_decay,
            0.0,
            false,
            1.0,
            "[0, 1]",
        )?;
        within(
            "spec.max_grad_norm",
            self.max_grad_norm,
            0.0,
            true,
            1e6,
            "(0, 1e6]",
        )?;
        within("spec.kl_coef", self.kl_coef, 0.0, false, 100.0, "[0, 100]")?;
        within("spec.clip", self.clip, 0.0, true, 1.0, "(0, 1]")?;
        within(
            "spec.dual_clip",
            self.dual_clip,
            1.0,
            true,
            100.0,
            "(1, 100]",
        )?;
        within(
            "spec.temperature",
            self.temperature,
            0.0,
            true,
            10.0,
            "(0, 10]",
        )?;
        within("spec.top_p", self.top_p, 0.0, true, 1.0, "(0, 1]")?;
        if !LOSS_AGG_MODES.contains(&self.loss_agg_mode.as_str()) {
            return Err(SpecError::invalid(
                "spec.loss_agg_mode",
                format!("must be one of {}", LOSS_AGG_MODES.join(", ")),
            ));
        }
        if self.epochs == 0 || self.epochs > MAX_EPOCHS {
            return bad("spec.epochs", "must be between 1 and 1000");
        }
        if self.max_steps.is_some_and(|s| s == 0 || s > MAX_STEPS) {
            return bad("spec.max_steps", "must be between 1 and 10000000");
        }
        for (field, v) in [
            ("spec.max_prompt_tokens", self.max_prompt_tokens),
            ("spec.max_response_tokens", self.max_response_tokens),
        ] {
            if v == 0 || v > MAX_TOKENS {
                return bad(field, "must be between 1 and 32768");
            }
        }
        if self.validate_every > MAX_STEPS {
            return bad("spec.validate_every", "must be at most 10000000");
        }
        if self
            .validation_limit
            .is_some_and(|l| l == 0 || l > MAX_VALIDATION_QUESTIONS)
        {
            return bad("spec.validation_limit", "must be between 1 and 100000");
        }
        if self.save_every == 0 || self.save_every > MAX_STEPS {
            return bad("spec.save_every", "must be between 1 and 10000000");
        }
        if let Some(name) = &self.register_as
            && !crate::model::valid_model_name(name)
        {
            return bad(
                "spec.register_as",
                "must be a model name (1 to 64 of a-z, 0-9, `-`, `_`, `.`)",
            );
        }
        self.reward.validate("spec.reward")?;
        check_grants(&self.grants)?;
        check_limits(&self.limits)
    }
}

/// Rollout and update statistics of one optimizer step (the `train_step` event's payload).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TrainStepMetrics {
    /// Mean reward of the step's sequences (GRPO) or of nothing (SFT: 0).
    pub reward_mean: f64,
    /// Share of sequences whose reward is at least 1 (the binary reward's accuracy).
    pub accuracy: f64,
    /// Share of groups whose rewards are all equal (no gradient from them).
    pub all_equal_fraction: f64,
    pub advantage_mean: f64,
    pub advantage_std: f64,
    pub advantage_min: f64,
    pub advantage_max: f64,
    pub policy_loss: f64,
    /// The aggregated KL penalty to the starting model, before its coefficient.
    pub kl: Option<f64>,
    pub entropy: Option<f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Steps skipped so far because their gradient norm was not finite.
    pub skipped_steps: u64,
    pub learning_rate: f64,
    pub clip_fraction: f64,
    pub response_length_mean: f64,
    pub response_length_max: u64,
    /// Response tokens trained on per second of the whole step.
    pub tokens_per_second: f64,
    /// Mean |engine log-prob − trainer log-prob| over the response tokens: how far the rollout
    /// engine's numbers are from the trainer's (0 up to float noise when both are f32).
    pub logprob_gap: Option<f64>,
    pub rollout_seconds: f64,
    pub reward_seconds: f64,
    pub logprob_seconds: f64,
    pub update_seconds: f64,
}

/// One optimizer step of a training run. Stream `job/<id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TrainStep {
    pub epoch: u64,
    /// 1-based optimizer step.
    pub step: u64,
    /// 0-based pass over the training data the step's batch came from.
    pub data_epoch: u64,
    pub metrics: TrainStepMetrics,
    /// JSONL blob of the step's rollouts (prompt id, completion, tokens, reward, components,
    /// advantage), for `twin train rollouts` and re-scoring with a `score` job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub rollouts: Option<BlobHash>,
}

/// A validation of a training run: greedy answers to the eval split's pair questions. Stream
/// `job/<id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TrainValidation {
    pub epoch: u64,
    /// Steps taken before it (0: the starting model).
    pub step: u64,
    pub questions: u64,
    /// Mean of the job's reward over the answers (the recipe's validation metric).
    pub reward_mean: f64,
    /// Accuracy by the FGVQA pair rule (lmms-eval's reading of the answer).
    pub pair_accuracy: f64,
    /// Answers without a stop token within `max_response_tokens`.
    pub truncated: u64,
    /// JSONL blob of the answers.
    #[schema(value_type = String)]
    pub samples: BlobHash,
}

/// A checkpoint a run registered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TrainCheckpoint {
    pub step: u64,
    /// The registered model (its manifest hash): bf16 weights in the Hugging Face layout.
    #[schema(value_type = String)]
    pub model: BlobHash,
}

/// What a training run reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TrainOutput {
    pub objective: TrainObjective,
    pub steps: u64,
    /// The last checkpoint (the trained model), registered.
    #[schema(value_type = String)]
    pub model: BlobHash,
    pub checkpoints: Vec<TrainCheckpoint>,
    /// Pair questions trained on, by label, and multi questions skipped.
    pub train_yes: u64,
    pub train_no: u64,
    pub skipped_multi: u64,
    /// Validation before the first step and after the last.
    pub initial_validation: Option<TrainValidation>,
    pub final_validation: Option<TrainValidation>,
    /// The step an earlier attempt's checkpoint let this attempt resume after (0: from the
    /// start).
    pub resumed_from: u64,
    pub device: String,
    pub wall_seconds: f64,
}

impl TrainOutput {
    /// Blobs the result refers to: every checkpoint and the validations' samples.
    pub fn blobs(&self) -> Vec<BlobHash> {
        std::iter::once(self.model)
            .chain(self.checkpoints.iter().map(|c| c.model))
            .chain(self.initial_validation.iter().map(|v| v.samples))
            .chain(self.final_validation.iter().map(|v| v.samples))
            .collect()
    }
}

/// A run's steps and validations as the log holds them. A step or validation taken again by a
/// resumed attempt (after the last checkpoint, before the executor died) replaces the earlier
/// one: the curve is the run's final history.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TrainingLog {
    pub steps: Vec<TrainStep>,
    pub validations: Vec<TrainValidation>,
}

impl TrainingLog {
    pub fn record_step(&mut self, step: TrainStep) {
        // A resumed attempt goes back to its checkpoint: everything after it is redone.
        self.steps.retain(|s| s.step < step.step);
        self.validations.retain(|v| v.step < step.step);
        self.steps.push(step);
    }

    pub fn record_validation(&mut self, validation: TrainValidation) {
        self.validations.retain(|v| v.step < validation.step);
        self.validations.push(validation);
    }
}

/// A training record an executor sends while the run goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TrainRecord {
    Step(TrainStep),
    Validation(TrainValidation),
}

impl TrainRecord {
    pub fn epoch(&self) -> u64 {
        match self {
            TrainRecord::Step(s) => s.epoch,
            TrainRecord::Validation(v) => v.epoch,
        }
    }

    /// Every number is finite (JSON has no NaN, and a curve of them says nothing).
    pub fn check_finite(&self) -> Result<(), String> {
        let numbers: Vec<(&str, f64)> = match self {
            TrainRecord::Step(s) => {
                let m = &s.metrics;
                vec![
                    ("reward_mean", m.reward_mean),
                    ("accuracy", m.accuracy),
                    ("all_equal_fraction", m.all_equal_fraction),
                    ("advantage_mean", m.advantage_mean),
                    ("advantage_std", m.advantage_std),
                    ("advantage_min", m.advantage_min),
                    ("advantage_max", m.advantage_max),
                    ("policy_loss", m.policy_loss),
                    ("kl", m.kl.unwrap_or(0.0)),
                    ("entropy", m.entropy.unwrap_or(0.0)),
                    ("learning_rate", m.learning_rate),
                    ("clip_fraction", m.clip_fraction),
                    ("response_length_mean", m.response_length_mean),
                    ("tokens_per_second", m.tokens_per_second),
                    ("logprob_gap", m.logprob_gap.unwrap_or(0.0)),
                ]
            }
            TrainRecord::Validation(v) => vec![
                ("reward_mean", v.reward_mean),
                ("pair_accuracy", v.pair_accuracy),
            ],
        };
        match numbers.into_iter().find(|(_, v)| !v.is_finite()) {
            Some((name, v)) => Err(format!("{name}: {v} is not a finite number")),
            None => Ok(()),
        }
    }
}

/// Balanced batches over the training pairs: each batch holds exactly `half` "yes" and `half`
/// "no" questions. Each class is shuffled once per pass with the run's seed; the larger class
/// sets the length of an epoch, `ceil(max(yes, no) / half)` steps, and the smaller class is
/// cycled (reshuffled each time it runs out) to fill its half of every batch.
///
/// Pure and indexable: batch `k` is a function of the seed, the class sizes and `k`, so a resumed
/// run needs only the step it reached to draw the batches an uninterrupted run would.
#[derive(Debug, Clone)]
pub struct BalancedSampler {
    yes: usize,
    no: usize,
    half: usize,
    seed: u64,
}

impl BalancedSampler {
    /// Refuses a class without a member: a batch could never be balanced.
    pub fn new(yes: usize, no: usize, batch: usize, seed: u64) -> Result<Self, String> {
        if yes == 0 || no == 0 {
            return Err(format!(
                "the train split has {yes} \"yes\" and {no} \"no\" pair questions: balanced \
                 batches need both labels"
            ));
        }
        if batch < 2 || !batch.is_multiple_of(2) {
            return Err(format!("a balanced batch needs an even size, got {batch}"));
        }
        Ok(BalancedSampler {
            yes,
            no,
            half: batch / 2,
            seed,
        })
    }

    /// Steps in one pass: `ceil(max(yes, no) / half)`.
    pub fn steps_per_epoch(&self) -> u64 {
        self.yes.max(self.no).div_ceil(self.half) as u64
    }

    /// Batch `step` (0-based, counted across epochs): indices into the "yes" list and into the
    /// "no" list, `half` of each.
    pub fn batch(&self, step: u64) -> (Vec<usize>, Vec<usize>) {
        let start = step as u128 * self.half as u128;
        (
            self.draw(self.yes, start, "yes"),
            self.draw(self.no, start, "no"),
        )
    }

    /// `half` consecutive positions from `start` of an endless stream of shuffled passes over
    /// `0..n`; pass `p` is a permutation seeded by the run's seed, the class and `p`.
    fn draw(&self, n: usize, start: u128, class: &str) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.half);
        let mut pass = u64::MAX;
        let mut order: Vec<usize> = Vec::new();
        for position in start..start + self.half as u128 {
            let p = (position / n as u128) as u64;
            if p != pass {
                pass = p;
                order = permutation(n, self.seed, class, p);
            }
            out.push(order[(position % n as u128) as usize]);
        }
        out
    }
}

/// A seeded permutation of `0..n` (Fisher–Yates over SplitMix64).
fn permutation(n: usize, seed: u64, class: &str, pass: u64) -> Vec<usize> {
    let mut state = seed ^ 0x7261_696e_5f73_616d;
    for b in class.bytes() {
        state = splitmix(&mut state) ^ u64::from(b);
    }
    state ^= pass.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (splitmix(&mut state) % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::JobSubmission;
    use serde_json::json;

    fn submit(spec: serde_json::Value) -> Result<JobSubmission, SpecError> {
        let mut spec = spec;
        spec["kind"] = json!("train");
        JobSubmission::from_json(json!({ "spec": spec }))
    }

    #[test]
    fn a_minimal_spec_takes_the_recipes_values() {
        let s = submit(json!({"dataset": "pairs", "model": "qwen-3b"})).unwrap();
        let crate::spec::JobSpec::Train(t) = s.spec else {
            panic!("a train spec")
        };
        assert_eq!(t.objective, TrainObjective::Grpo);
        assert_eq!((t.batch_prompts, t.group_size, t.micro_batch), (480, 5, 60));
        assert_eq!(t.learning_rate, 1e-6);
        assert_eq!((t.kl_coef, t.clip, t.dual_clip), (0.01, 0.2, 3.0));
        assert_eq!(t.loss_agg_mode, "token-mean");
        assert_eq!((t.max_prompt_tokens, t.max_response_tokens), (2048, 2048));
        assert_eq!((t.validate_every, t.save_every, t.epochs), (20, 40, 1));
        assert_eq!(t.reward.module.as_deref(), Some("binary-match"));
        assert!(!t.freeze_vision);
    }

    #[test]
    fn every_bad_number_is_refused_naming_its_field() {
        for (patch, field) in [
            (json!({"batch_prompts": 7}), "spec.batch_prompts"),
            (json!({"batch_prompts": 0}), "spec.batch_prompts"),
            (json!({"batch_prompts": 1_000_000}), "spec.batch_prompts"),
            (json!({"group_size": 1}), "spec.group_size"),
            (json!({"micro_batch": 7}), "spec.micro_batch"),
            (json!({"micro_batch": 0}), "spec.micro_batch"),
            (json!({"learning_rate": 0.0}), "spec.learning_rate"),
            (json!({"learning_rate": 2.0}), "spec.learning_rate"),
            (json!({"kl_coef": -1.0}), "spec.kl_coef"),
            (json!({"dual_clip": 1.0}), "spec.dual_clip"),
            (json!({"temperature": 0.0}), "spec.temperature"),
            (json!({"top_p": 1.5}), "spec.top_p"),
            (json!({"loss_agg_mode": "mean"}), "spec.loss_agg_mode"),
            (json!({"epochs": 0}), "spec.epochs"),
            (json!({"max_steps": 0}), "spec.max_steps"),
            (
                json!({"max_response_tokens": 40_000}),
                "spec.max_response_tokens",
            ),
            (json!({"save_every": 0}), "spec.save_every"),
            (json!({"validation_limit": 0}), "spec.validation_limit"),
            (json!({"register_as": "Bad Name"}), "spec.register_as"),
            (json!({"dataset": ""}), "spec.dataset"),
            (json!({"nonsense": 1}), "spec.nonsense"),
        ] {
            let mut spec = json!({"dataset": "pairs", "model": "qwen-3b"});
            for (k, v) in patch.as_object().unwrap() {
                spec[k] = v.clone();
            }
            let err = submit(spec).expect_err(&format!("{patch} must be refused"));
            assert_eq!(err.field(), field, "{patch}: {err}");
        }
        // SFT trains on one sequence per prompt: the micro-batch divides the prompts.
        submit(
            json!({"dataset": "d", "model": "m", "objective": "sft", "group_size": 1,
                      "batch_prompts": 8, "micro_batch": 4}),
        )
        .unwrap();
    }

    #[test]
    fn batches_are_balanced_seeded_and_cycle_the_smaller_class() {
        let s = BalancedSampler::new(10, 3, 4, 7).unwrap();
        assert_eq!(s.steps_per_epoch(), 5);
        let mut yes_seen = Vec::new();
        for step in 0..5 {
            let (yes, no) = s.batch(step);
            assert_eq!((yes.len(), no.len()), (2, 2));
            assert!(no.iter().all(|&i| i < 3));
            yes_seen.extend(yes);
        }
        // One epoch covers the larger class exactly once.
        yes_seen.sort_unstable();
        assert_eq!(yes_seen, (0..10).collect::<Vec<_>>());
        // The same seed draws the same batches; another seed other ones.
        assert_eq!(
            s.batch(3),
            BalancedSampler::new(10, 3, 4, 7).unwrap().batch(3)
        );
        let other = BalancedSampler::new(10, 3, 4, 8).unwrap();
        assert!((0..5).any(|k| other.batch(k) != s.batch(k)));
        assert!(BalancedSampler::new(4, 0, 2, 0).is_err());
        assert!(BalancedSampler::new(4, 4, 3, 0).is_err());
    }
}
