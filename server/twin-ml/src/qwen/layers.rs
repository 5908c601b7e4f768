//! The small building blocks both Qwen2.5-VL towers share: zero-initialised linear layers (the
//! checkpoint overwrites them), RMSNorm as transformers computes it, and the SwiGLU MLP.

use tch::Tensor;
use tch::nn::{self, Module};

/// Variables start as zeros: a checkpoint (or `init_random`) overwrites every one of them.
const ZERO: nn::Init = nn::Init::Const(0.0);

pub(crate) fn linear(p: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> nn::Linear {
    nn::linear(
        p,
        in_dim,
        out_dim,
        nn::LinearConfig {
            ws_init: ZERO,
            bs_init: Some(ZERO),
            bias,
        },
    )
}

/// `Qwen2_5_VLRMSNorm`: normalise in f32, cast back to the input's kind, then scale — the
/// order matters in bf16.
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub(crate) fn new(p: nn::Path, dim: i64, eps: f64) -> RmsNorm {
        RmsNorm {
            weight: p.var("weight", &[dim], nn::Init::Const(1.0)),
            eps,
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let x32 = x.to_kind(tch::Kind::Float);
        let variance = x32
            .pow_tensor_scalar(2)
            .mean_dim(-1, true, tch::Kind::Float);
        let normed = x32 * (variance + self.eps).rsqrt();
        &self.weight * normed.to_kind(kind)
    }
}

/// `down(silu(gate(x)) · up(x))`.
pub(crate) fn silu_mlp_forward(
    x: &Tensor,
    gate: &nn::Linear,
    up: &nn::Linear,
    down: &nn::Linear,
) -> Tensor {
    down.forward(&(gate.forward(x).silu() * up.forward(x)))
}
