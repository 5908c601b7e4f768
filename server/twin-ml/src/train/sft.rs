//! Supervised fine-tuning's loss on the same machinery as GRPO's: cross-entropy of the response
//! tokens (the stop token included), token-mean over the micro-batch's response mask.

use tch::Tensor;

use super::grpo::{LossAggregation, aggregate_loss};
use crate::MlError;
use crate::qwen::model::torch_call;

/// `−mean log p(token)` over the tokens `response_mask` marks: `log_prob` and `response_mask`
/// are `[B, T]` (see `QwenVl::response_log_probs`). A mask without a token is refused.
pub fn sft_loss(log_prob: &Tensor, response_mask: &Tensor) -> Result<Tensor, MlError> {
    let mean = aggregate_loss(log_prob, response_mask, LossAggregation::TokenMean)?;
    torch_call(|| -mean)
}
