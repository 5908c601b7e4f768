//! One optimizer step's worth of the actor's work: the actor loss of a micro-batch (verl's
//! `ppo_loss`: policy loss, plus the KL penalty times its coefficient, minus entropy times its
//! coefficient), gradient accumulation over micro-batches, and the metrics a step reports.

use std::ops::Range;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::adamw::StepOutcome;
use super::grpo::{
    KlPenalty, LossAggregation, PolicyLossConfig, PolicyLossInputs, aggregate_loss, kl_penalty,
    policy_loss,
};
use crate::MlError;
use crate::qwen::model::torch_call;

/// The actor loss's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActorLossConfig {
    pub policy: PolicyLossConfig,
    pub aggregation: LossAggregation,
    pub kl_penalty: KlPenalty,
    /// Weight of the aggregated KL penalty in the loss (applied when a reference log-probability
    /// is given).
    pub kl_coef: f64,
    /// Weight of the entropy bonus; 0 reports entropy without training on it.
    pub entropy_coeff: f64,
}

impl Default for ActorLossConfig {
    /// The recipe's: clip 0.2/0.2, dual clip 3, token-mean, k3 KL at 0.01, no entropy bonus.
    fn default() -> Self {
        ActorLossConfig {
            policy: PolicyLossConfig::default(),
            aggregation: LossAggregation::TokenMean,
            kl_penalty: KlPenalty::LOW_VAR_KL,
            kl_coef: 0.01,
            entropy_coeff: 0.0,
        }
    }
}

/// A micro-batch's tensors for the actor loss.
#[derive(Debug, Clone, Copy)]
pub struct ActorLossInputs<'a> {
    pub policy: PolicyLossInputs<'a>,
    /// Log-probabilities under the frozen reference model; `None` trains without a KL penalty.
    pub ref_log_prob: Option<&'a Tensor>,
    /// Per-token entropy of the trained policy (see `entropy_from_logits`); `None` to skip.
    pub entropy: Option<&'a Tensor>,
}

/// What one micro-batch measured (verl's `actor/*` metrics for it).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MicroBatchMetrics {
    pub policy_loss: f64,
    /// The aggregated KL penalty, before its coefficient.
    pub kl: Option<f64>,
    pub entropy: Option<f64>,
    pub clip_fraction: f64,
    pub clip_fraction_lower: f64,
    pub approx_kl: f64,
    /// Response tokens in the micro-batch.
    pub tokens: u64,
}

#[derive(Debug)]
pub struct ActorLoss {
    /// Scalar, differentiable with respect to the policy's log-probabilities (and entropy
    /// when its coefficient is not 0).
    pub loss: Tensor,
    pub metrics: MicroBatchMetrics,
}

/// The actor's loss for one micro-batch, as verl's `ppo_loss` assembles it.
pub fn actor_loss(
    inputs: ActorLossInputs<'_>,
    config: &ActorLossConfig,
) -> Result<ActorLoss, MlError> {
    let mask = inputs.policy.response_mask;
    let pg = policy_loss(inputs.policy, config.aggregation, &config.policy)?;
    let mut loss = pg.loss.shallow_clone();
    let entropy = match inputs.entropy {
        None => None,
        Some(entropy) => {
            let aggregated = aggregate_loss(entropy, mask, config.aggregation)?;
            if config.entropy_coeff != 0.0 {
                loss = torch_call(|| &loss - &aggregated * config.entropy_coeff)?;
            }
            Some(torch_call(|| aggregated.double_value(&[]))?)
        }
    };
    let kl = match inputs.ref_log_prob {
        None => None,
        Some(reference) => {
            let per_token = kl_penalty(inputs.policy.log_prob, reference, config.kl_penalty)?;
            let aggregated = aggregate_loss(&per_token, mask, config.aggregation)?;
            loss = torch_call(|| &loss + &aggregated * config.kl_coef)?;
            Some(torch_call(|| aggregated.double_value(&[]))?)
        }
    };
    let (policy_loss, tokens) = torch_call(|| {
        (
            pg.loss.double_value(&[]),
            mask.to_kind(Kind::Float).sum(Kind::Float).double_value(&[]),
        )
    })?;
    Ok(ActorLoss {
        loss,
        metrics: MicroBatchMetrics {
            policy_loss,
            kl,
            entropy,
            clip_fraction: pg.clip_fraction,
            clip_fraction_lower: pg.clip_fraction_lower,
            approx_kl: pg.approx_kl,
            tokens: tokens as u64,
        },
    })
}

/// Splits `batch` sequences into consecutive micro-batches of `micro` each, refusing a size
/// that does not divide the batch (every micro-batch must weigh the same in the average).
pub fn micro_batches(batch: usize, micro: usize) -> Result<Vec<Range<usize>>, MlError> {
    if batch == 0 || micro == 0 || !batch.is_multiple_of(micro) {
        return Err(MlError::Invalid(format!(
            "micro-batch size {micro} does not divide the batch of {batch} sequences into \
             equal micro-batches"
        )));
    }
    Ok((0..batch / micro)
        .map(|i| i * micro..(i + 1) * micro)
        .collect())
}

/// Accumulates gradients over the micro-batches of a batch: `micro_loss` gets each
/// micro-batch's range of sequences and returns its scalar loss (and anything else it
/// measured); each loss is scaled by `1 / number of micro-batches` (verl's
/// `loss_scale_factor`) and back-propagated, so the gradients add up to the gradient of the
/// micro-batch losses' mean. Returns what `micro_loss` measured, in order. Gradients are not
/// zeroed first.
pub fn accumulate_gradients<T>(
    batch: usize,
    micro: usize,
    mut micro_loss: impl FnMut(Range<usize>) -> Result<(Tensor, T), MlError>,
) -> Result<Vec<T>, MlError> {
    accumulate_micro_batches(batch, micro, |range, scale| {
        let what = format!("micro-batch {range:?}");
        let (loss, extra) = micro_loss(range)?;
        if loss.numel() != 1 {
            return Err(MlError::Invalid(format!(
                "{what}: the loss has shape {:?}; a scalar is needed to back-propagate",
                loss.size()
            )));
        }
        torch_call(|| (loss * scale).backward())?;
        Ok(extra)
    })
}

/// [`accumulate_gradients`] for a `backward` that drives its own backward pass (as
/// `QwenVl::backward_response_loss` does, which activation checkpointing needs): it gets each
/// micro-batch's range and the scale its loss must be back-propagated with (`1 / number of
/// micro-batches`), and returns what it measured.
pub fn accumulate_micro_batches<T>(
    batch: usize,
    micro: usize,
    mut backward: impl FnMut(Range<usize>, f64) -> Result<T, MlError>,
) -> Result<Vec<T>, MlError> {
    let ranges = micro_batches(batch, micro)?;
    let scale = 1.0 / ranges.len() as f64;
    ranges
        .into_iter()
        .map(|range| {
            backward(range, scale).map_err(|e| match e {
                // The sizes are what a user changes: name them beside libtorch's own line.
                MlError::OutOfMemory(message) => MlError::OutOfMemory(format!(
                    "{message} (a batch of {batch} sequences in micro-batches of {micro}: lower \
                     the micro-batch size, or turn activation checkpointing on)"
                )),
                other => other,
            })
        })
        .collect()
}

/// What one optimizer step reports: micro-batch metrics averaged over the micro-batches (as
/// verl's `reduce_metrics` does), tokens summed, and the optimizer's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub policy_loss: f64,
    pub kl: Option<f64>,
    pub entropy: Option<f64>,
    pub clip_fraction: f64,
    pub clip_fraction_lower: f64,
    pub approx_kl: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Whether this step updated the weights (false: its gradient norm was not finite).
    pub applied: bool,
    /// Steps skipped so far in the run.
    pub skipped_steps: u64,
    pub tokens: u64,
    pub micro_batches: usize,
}

impl StepMetrics {
    pub fn new(
        micro: &[MicroBatchMetrics],
        outcome: StepOutcome,
        skipped_steps: u64,
    ) -> Result<StepMetrics, MlError> {
        if micro.is_empty() {
            return Err(MlError::Invalid(
                "step metrics: a step needs at least one micro-batch".into(),
            ));
        }
        let mean = |f: &dyn Fn(&MicroBatchMetrics) -> f64| {
            micro.iter().map(f).sum::<f64>() / micro.len() as f64
        };
        let mean_of_present = |f: &dyn Fn(&MicroBatchMetrics) -> Option<f64>| {
            let present: Vec<f64> = micro.iter().filter_map(f).collect();
            (!present.is_empty()).then(|| present.iter().sum::<f64>() / present.len() as f64)
        };
        Ok(StepMetrics {
            policy_loss: mean(&|m| m.policy_loss),
            kl: mean_of_present(&|m| m.kl),
            entropy: mean_of_present(&|m| m.entropy),
            clip_fraction: mean(&|m| m.clip_fraction),
            clip_fraction_lower: mean(&|m| m.clip_fraction_lower),
            approx_kl: mean(&|m| m.approx_kl),
            grad_norm: outcome.grad_norm,
            applied: outcome.applied,
            skipped_steps,
            tokens: micro.iter().map(|m| m.tokens).sum(),
            micro_batches: micro.len(),
        })
    }
}
