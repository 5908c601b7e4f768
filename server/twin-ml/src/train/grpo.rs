//! The GRPO recipe's mathematics as tensor functions: group-normalised advantages, PPO's
//! dual-clip policy loss, the KL penalty estimators, the loss aggregation modes, entropy from
//! logits and the actor loss that combines them.
//!
//! Each function reproduces verl 0.9.1's `verl.trainer.ppo.core_algos` (and
//! `verl.utils.torch_functional`) operation for operation, in the same order and dtype, so on
//! the same libtorch the results agree to the last bit or nearly (`tests/grpo.rs` holds them to
//! verl's outputs on fixtures `tests/fixtures/verl_reference.py` writes). Where verl would
//! silently produce NaN (a mean over an empty mask) these functions refuse with an error.
//!
//! Tensors are `[batch, response_length]` unless said otherwise; masks may be bool, integer or
//! float, 1 marking a response token and 0 padding.

use std::collections::HashMap;
use std::hash::Hash;
use std::str::FromStr;

use tch::{Kind, Tensor};

use crate::MlError;
use crate::qwen::model::torch_call;

/// The ε verl adds to a group's standard deviation before dividing by it.
pub const GRPO_EPSILON: f64 = 1e-6;

/// verl's `masked_mean` ε: metrics over an empty mask come out 0, not NaN.
const MASKED_MEAN_EPSILON: f64 = 1e-8;

/// Advantages of a batch of sequences, one per sequence, with what the batch's groups looked
/// like.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupAdvantages {
    pub advantages: Vec<f32>,
    /// Distinct prompts (groups) in the batch.
    pub groups: usize,
    /// Groups of two or more samples whose scores are all equal (0 or G correct of G): their
    /// advantages are zero, so they teach the policy nothing.
    pub uniform_groups: usize,
}

impl GroupAdvantages {
    /// The fraction of groups that carry no signal (`uniform_groups / groups`); 0 for no groups.
    pub fn uniform_fraction(&self) -> f64 {
        if self.groups == 0 {
            0.0
        } else {
            self.uniform_groups as f64 / self.groups as f64
        }
    }
}

/// GRPO's outcome advantage (verl's `compute_grpo_outcome_advantage` with
/// `norm_adv_by_std_in_grpo=True`): each sequence's score minus its group's mean, divided by the
/// group's unbiased standard deviation plus [`GRPO_EPSILON`]. A group of one sample has, by
/// verl's rule, mean 0 and standard deviation 1, so its advantage is `score / (1 + 1e-6)`.
/// `groups[i]` names the prompt sequence `i` was sampled from. Scores must be finite: one NaN
/// would poison its whole group.
pub fn grpo_advantages<K: Eq + Hash>(
    scores: &[f32],
    groups: &[K],
) -> Result<GroupAdvantages, MlError> {
    if scores.len() != groups.len() {
        return Err(MlError::Invalid(format!(
            "GRPO advantages: {} scores but {} group labels",
            scores.len(),
            groups.len()
        )));
    }
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(MlError::Invalid(format!(
            "GRPO advantages: the score of sequence {i} is {}, not a finite number",
            scores[i]
        )));
    }
    // Members of each group in order of first appearance.
    let mut members: Vec<Vec<usize>> = Vec::new();
    let mut slot: HashMap<&K, usize> = HashMap::new();
    for (i, key) in groups.iter().enumerate() {
        let g = *slot.entry(key).or_insert_with(|| {
            members.push(Vec::new());
            members.len() - 1
        });
        members[g].push(i);
    }
    let mut advantages = vec![0f32; scores.len()];
    let mut uniform_groups = 0;
    torch_call(|| {
        for idx in &members {
            let values: Vec<f32> = idx.iter().map(|&i| scores[i]).collect();
            if values.len() > 1 && values.iter().all(|v| *v == values[0]) {
                uniform_groups += 1;
            }
            let normalised = normalise_group(&values);
            for (&i, a) in idx.iter().zip(normalised) {
                advantages[i] = a;
            }
        }
    })?;
    Ok(GroupAdvantages {
        advantages,
        groups: members.len(),
        uniform_groups,
    })
}

/// One group's advantages, with libtorch's f32 mean and unbiased std as verl takes them.
fn normalise_group(values: &[f32]) -> Vec<f32> {
    let scores = Tensor::from_slice(values);
    let (mean, std) = if values.len() == 1 {
        (Tensor::from(0f32), Tensor::from(1f32))
    } else {
        (scores.mean(Kind::Float), scores.std(true))
    };
    let normalised = (scores - mean) / (std + GRPO_EPSILON);
    Vec::<f32>::try_from(&normalised).expect("a 1-D f32 tensor converts to Vec<f32>")
}

/// Broadcasts per-sequence advantages over each sequence's response tokens, zero on padding
/// (verl's `scores.unsqueeze(-1) * response_mask`). Returns `[batch, response_length]` f32 on
/// the mask's device.
pub fn token_advantages(advantages: &[f32], response_mask: &Tensor) -> Result<Tensor, MlError> {
    let size = response_mask.size();
    if size.len() != 2 || size[0] != advantages.len() as i64 {
        return Err(MlError::Invalid(format!(
            "token advantages: response_mask has shape {size:?}, expected [{}, response_length]",
            advantages.len()
        )));
    }
    torch_call(|| {
        Tensor::from_slice(advantages)
            .to_device(response_mask.device())
            .unsqueeze(-1)
            * response_mask.to_kind(Kind::Float)
    })
}

/// How a `[batch, response_length]` loss matrix becomes a scalar (verl's `agg_loss` with
/// `dp_size=1` and no global token or sequence count, i.e. normalised within the micro-batch).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossAggregation {
    /// Sum over every response token divided by their number.
    TokenMean,
    /// Sum over every response token.
    TokenSum,
    /// Each sequence's token sum, averaged over sequences that have tokens.
    SeqMeanTokenSum,
    /// Each sequence's token mean, averaged over sequences that have tokens.
    SeqMeanTokenMean,
    /// `SeqMeanTokenSum` divided by `scale`; verl's default (`None`) divides by the padded
    /// response length, `loss_mask.shape[-1]`, so the loss depends on how far the micro-batch
    /// was padded. Dr. GRPO fixes it to a constant (verl's `loss_scale_factor`).
    SeqMeanTokenSumNorm { scale: Option<f64> },
}

impl FromStr for LossAggregation {
    type Err = MlError;
    /// verl's names; `seq-mean-token-sum-norm` takes verl's default scale.
    fn from_str(s: &str) -> Result<Self, MlError> {
        Ok(match s {
            "token-mean" => LossAggregation::TokenMean,
            "token-sum" => LossAggregation::TokenSum,
            "seq-mean-token-sum" => LossAggregation::SeqMeanTokenSum,
            "seq-mean-token-mean" => LossAggregation::SeqMeanTokenMean,
            "seq-mean-token-sum-norm" => LossAggregation::SeqMeanTokenSumNorm { scale: None },
            other => {
                return Err(MlError::Invalid(format!(
                    "unknown loss aggregation `{other}`: expected token-mean, token-sum, \
                     seq-mean-token-sum, seq-mean-token-mean or seq-mean-token-sum-norm"
                )));
            }
        })
    }
}

/// Checks that two tensors have the same shape, naming both in the error.
fn same_shape(context: &str, a: (&str, &Tensor), b: (&str, &Tensor)) -> Result<(), MlError> {
    let (sa, sb) = (a.1.size(), b.1.size());
    if sa != sb {
        return Err(MlError::Invalid(format!(
            "{context}: `{}` has shape {sb:?} but `{}` has shape {sa:?}",
            b.0, a.0
        )));
    }
    Ok(())
}

/// Checks that a tensor is `[batch, response_length]`.
fn two_dimensional(context: &str, name: &str, t: &Tensor) -> Result<(), MlError> {
    if t.dim() != 2 {
        return Err(MlError::Invalid(format!(
            "{context}: `{name}` has shape {:?}, expected [batch, response_length]",
            t.size()
        )));
    }
    Ok(())
}

/// verl's `masked_sum`: values outside the mask are replaced by 0 first, so a NaN in padding
/// does not reach the sum.
fn masked_sum(values: &Tensor, mask: &Tensor) -> Tensor {
    (values.where_self(&mask.to_kind(Kind::Bool), &values.zeros_like()) * mask).sum(Kind::Float)
}

/// verl's `masked_mean` (sum over the mask divided by its size plus 1e-8).
fn masked_mean(values: &Tensor, mask: &Tensor) -> Tensor {
    masked_sum(values, mask) / (mask.sum(Kind::Float) + MASKED_MEAN_EPSILON)
}

/// Aggregates a loss matrix over its mask (verl's `agg_loss`, see [`LossAggregation`]). A
/// mask without a single token is refused: verl would divide 0 by 0 and return NaN. Sequences
/// without tokens are left out of the `seq-mean-*` averages, as in verl.
pub fn aggregate_loss(
    loss: &Tensor,
    mask: &Tensor,
    mode: LossAggregation,
) -> Result<Tensor, MlError> {
    two_dimensional("loss aggregation", "loss", loss)?;
    same_shape("loss aggregation", ("loss", loss), ("mask", mask))?;
    let mask = torch_call(|| mask.to_kind(Kind::Float))?;
    let tokens = torch_call(|| mask.sum(Kind::Float).double_value(&[]))?;
    if tokens <= 0.0 {
        return Err(MlError::Invalid(format!(
            "loss aggregation ({mode:?}): the response mask of shape {:?} holds no token, so \
             there is nothing to average (verl would return NaN)",
            mask.size()
        )));
    }
    torch_call(|| match mode {
        LossAggregation::TokenMean => masked_sum(loss, &mask) / mask.sum(Kind::Float),
        LossAggregation::TokenSum => masked_sum(loss, &mask),
        LossAggregation::SeqMeanTokenSum => seq_mean_token_sum(loss, &mask),
        LossAggregation::SeqMeanTokenSumNorm { scale } => {
            let horizon = mask.size()[1] as f64;
            seq_mean_token_sum(loss, &mask) / scale.unwrap_or(horizon)
        }
        LossAggregation::SeqMeanTokenMean => {
            let counts = mask.sum_dim_intlist(-1, false, Kind::Float);
            let seq_losses =
                (loss * &mask).sum_dim_intlist(-1, false, Kind::Float) / (&counts + 1e-8);
            let seq_mask = counts.gt(0.0).to_kind(Kind::Float);
            masked_sum(&seq_losses, &seq_mask) / seq_mask.sum(Kind::Float)
        }
    })
}

fn seq_mean_token_sum(loss: &Tensor, mask: &Tensor) -> Tensor {
    let seq_losses = (loss * mask).sum_dim_intlist(-1, false, Kind::Float);
    let seq_mask = mask
        .sum_dim_intlist(-1, false, Kind::Float)
        .gt(0.0)
        .to_kind(Kind::Float);
    masked_sum(&seq_losses, &seq_mask) / seq_mask.sum(Kind::Float)
}

/// PPO's clipping parameters (verl's actor config `clip_ratio_low`, `clip_ratio_high`,
/// `clip_ratio_c`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyLossConfig {
    pub clip_ratio_low: f64,
    pub clip_ratio_high: f64,
    /// Dual-clip constant: for negative advantages the loss is capped at `-A · c`.
    pub clip_ratio_c: f64,
}

impl Default for PolicyLossConfig {
    /// The recipe's values, which are verl's defaults.
    fn default() -> Self {
        PolicyLossConfig {
            clip_ratio_low: 0.2,
            clip_ratio_high: 0.2,
            clip_ratio_c: 3.0,
        }
    }
}

/// What the policy loss works on, all `[batch, response_length]`.
#[derive(Debug, Clone, Copy)]
pub struct PolicyLossInputs<'a> {
    /// Log-probabilities of the sampled tokens under the policy that sampled them.
    pub old_log_prob: &'a Tensor,
    /// The same under the policy being trained (carries the gradient).
    pub log_prob: &'a Tensor,
    /// Per-token advantages (see [`token_advantages`]).
    pub advantages: &'a Tensor,
    pub response_mask: &'a Tensor,
}

impl PolicyLossInputs<'_> {
    fn check(&self, context: &str) -> Result<(), MlError> {
        two_dimensional(context, "log_prob", self.log_prob)?;
        let lp = ("log_prob", self.log_prob);
        same_shape(context, lp, ("old_log_prob", self.old_log_prob))?;
        same_shape(context, lp, ("advantages", self.advantages))?;
        same_shape(context, lp, ("response_mask", self.response_mask))
    }
}

/// The policy loss and the metrics verl reports with it.
#[derive(Debug)]
pub struct PolicyLoss {
    /// Scalar, differentiable with respect to `log_prob`.
    pub loss: Tensor,
    /// Fraction of response tokens where the clipped surrogate was the larger
    /// (`actor/pg_clipfrac`).
    pub clip_fraction: f64,
    /// Fraction of response tokens with a negative advantage where the dual clip bound
    /// (`actor/pg_clipfrac_lower`).
    pub clip_fraction_lower: f64,
    /// Mean of `old_log_prob − log_prob` over response tokens (`actor/ppo_kl`).
    pub approx_kl: f64,
}

/// PPO's clipped surrogate with dual clip (verl's `compute_policy_loss_vanilla`): ratio
/// `exp(clamp(logp − logp_old, −20, 20))`, loss `max(−A·r, −A·clip(r, 1−ε_low, 1+ε_high))`,
/// and for negative advantages additionally `min(that, −A·c)`; aggregated by `mode`.
pub fn policy_loss(
    inputs: PolicyLossInputs<'_>,
    mode: LossAggregation,
    config: &PolicyLossConfig,
) -> Result<PolicyLoss, MlError> {
    inputs.check("policy loss")?;
    if config.clip_ratio_c <= 1.0 {
        return Err(MlError::Invalid(format!(
            "policy loss: the dual-clip constant clip_ratio_c must be greater than 1, got {}",
            config.clip_ratio_c
        )));
    }
    let mask = torch_call(|| inputs.response_mask.to_kind(Kind::Float))?;
    let (losses, clip_fraction, clip_fraction_lower, approx_kl) = torch_call(|| {
        let advantages = inputs.advantages;
        let negative_approx_kl = (inputs.log_prob - inputs.old_log_prob).clamp(-20.0, 20.0);
        let ratio = negative_approx_kl.exp();
        let approx_kl = masked_mean(&negative_approx_kl.neg(), &mask);
        let losses1 = advantages.neg() * &ratio;
        let clipped = ratio.clamp(1.0 - config.clip_ratio_low, 1.0 + config.clip_ratio_high);
        let losses2 = advantages.neg() * clipped;
        let clip_losses1 = losses1.maximum(&losses2);
        let clip_fraction = masked_mean(&losses2.gt_tensor(&losses1).to_kind(Kind::Float), &mask);
        let losses3 = advantages.neg() * config.clip_ratio_c;
        let clip_losses2 = losses3.minimum(&clip_losses1);
        let negative = advantages.lt(0.0);
        let lower =
            clip_losses1.gt_tensor(&losses3).to_kind(Kind::Float) * negative.to_kind(Kind::Float);
        let clip_fraction_lower = masked_mean(&lower, &mask);
        let losses = clip_losses2.where_self(&negative, &clip_losses1);
        (
            losses,
            clip_fraction.double_value(&[]),
            clip_fraction_lower.double_value(&[]),
            approx_kl.double_value(&[]),
        )
    })?;
    Ok(PolicyLoss {
        loss: aggregate_loss(&losses, &mask, mode)?,
        clip_fraction,
        clip_fraction_lower,
        approx_kl,
    })
}

/// The per-token KL estimators of verl's `kl_penalty` (J. Schulman, "Approximating KL
/// divergence", 2020), of the trained policy from the reference policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KlEstimator {
    /// k1 (`kl`): `logp − ref`.
    K1,
    /// `abs`: `|logp − ref|`.
    Abs,
    /// k2 (`mse`): `½ (logp − ref)²`.
    K2,
    /// k3 (`low_var_kl`): `exp(d) − d − 1` with `d = clamp(ref − logp, ±20)`, clamped to ±10.
    K3,
}

/// A KL penalty: an estimator, optionally with verl's straight-through `+` variant (the
/// estimator's value, k2's gradient).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KlPenalty {
    pub estimator: KlEstimator,
    pub straight_through: bool,
}

impl FromStr for KlPenalty {
    type Err = MlError;
    /// verl's names: `kl`/`k1`, `abs`, `mse`/`k2`, `low_var_kl`/`k3`, each optionally with `+`.
    fn from_str(s: &str) -> Result<Self, MlError> {
        let (base, straight_through) = match s.strip_suffix('+') {
            Some(base) => (base, true),
            None => (s, false),
        };
        let estimator = match base {
            "kl" | "k1" => KlEstimator::K1,
            "abs" => KlEstimator::Abs,
            "mse" | "k2" => KlEstimator::K2,
            "low_var_kl" | "k3" => KlEstimator::K3,
            _ => {
                return Err(MlError::Invalid(format!(
                    "unknown KL penalty `{s}`: expected kl/k1, abs, mse/k2 or low_var_kl/k3, \
                     optionally followed by `+`"
                )));
            }
        };
        Ok(KlPenalty {
            estimator,
            // k2's own gradient is k2's: the `+` changes nothing there (as in verl).
            straight_through: straight_through && estimator != KlEstimator::K2,
        })
    }
}

impl KlPenalty {
    /// The recipe's penalty: k3, `low_var_kl`.
    pub const LOW_VAR_KL: KlPenalty = KlPenalty {
        estimator: KlEstimator::K3,
        straight_through: false,
    };
}

/// Per-token KL penalty (verl's `kl_penalty`), `[batch, response_length]`, differentiable with
/// respect to `log_prob`. The coefficient is the caller's (0.01 in the recipe).
pub fn kl_penalty(
    log_prob: &Tensor,
    ref_log_prob: &Tensor,
    penalty: KlPenalty,
) -> Result<Tensor, MlError> {
    same_shape(
        "KL penalty",
        ("log_prob", log_prob),
        ("ref_log_prob", ref_log_prob),
    )?;
    torch_call(|| {
        let forward = kl_forward(log_prob, ref_log_prob, penalty.estimator);
        if !penalty.straight_through {
            return forward;
        }
        let backward = (log_prob - ref_log_prob).square() * 0.5;
        &backward - backward.detach() + forward.detach()
    })
}

fn kl_forward(log_prob: &Tensor, ref_log_prob: &Tensor, estimator: KlEstimator) -> Tensor {
    match estimator {
        KlEstimator::K1 => log_prob - ref_log_prob,
        KlEstimator::Abs => (log_prob - ref_log_prob).abs(),
        KlEstimator::K2 => (log_prob - ref_log_prob).square() * 0.5,
        KlEstimator::K3 => {
            let kl = (ref_log_prob - log_prob).clamp(-20.0, 20.0);
            let ratio = kl.exp();
            (ratio - &kl - 1.0).clamp(-10.0, 10.0)
        }
    }
}

/// Entropy of the categorical distribution at each position (verl's `entropy_from_logits`:
/// `logsumexp(logits) − Σ softmax(logits)·logits` over the last dimension). `[..., vocab]` in,
/// `[...]` out.
pub fn entropy_from_logits(logits: &Tensor) -> Result<Tensor, MlError> {
    if logits.dim() == 0 {
        return Err(MlError::Invalid(
            "entropy: logits must have a vocabulary dimension, got a scalar".into(),
        ));
    }
    torch_call(|| {
        let probabilities = logits.softmax(-1, None::<Kind>);
        logits.logsumexp([-1i64], false)
            - (probabilities * logits).sum_dim_intlist(-1, false, None::<Kind>)
    })
}
