//! GRPO post-training's core in tch: the recipe's mathematics (advantages, the clipped policy
//! loss, KL penalties, loss aggregation, entropy), the AdamW optimizer with gradient clipping
//! and a savable state, micro-batch gradient accumulation, the per-step metrics and the SFT
//! loss; mixed precision's f32 master weights (`precision.rs`).
//!
//! Held to verl 0.9.1's `core_algos` and to PyTorch's `AdamW`/`clip_grad_norm_` by
//! `tests/grpo.rs`, on fixtures `tests/fixtures/verl_reference.py` writes. The model's forward
//! pass with gradients is `qwen::training`; `tests/train_step.rs` holds a whole step (forward,
//! loss, backward, clipping, AdamW) to PyTorch and transformers.

pub mod adamw;
pub mod grpo;
pub mod precision;
pub mod sft;
pub mod step;

pub use adamw::{AdamW, AdamWConfig, StepOutcome, clip_grad_norm};
pub use grpo::{
    GRPO_EPSILON, GroupAdvantages, KlEstimator, KlPenalty, LossAggregation, PolicyLoss,
    PolicyLossConfig, PolicyLossInputs, aggregate_loss, entropy_from_logits, grpo_advantages,
    kl_penalty, policy_loss, token_advantages,
};
pub use precision::MasterWeights;
pub use sft::sft_loss;
pub use step::{
    ActorLoss, ActorLossConfig, ActorLossInputs, MicroBatchMetrics, StepMetrics,
    accumulate_gradients, accumulate_micro_batches, actor_loss, micro_batches,
};
