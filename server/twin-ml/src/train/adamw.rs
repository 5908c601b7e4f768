//! AdamW in tensor operations, with global gradient-norm clipping and a state that saves and
//! restores exactly.
//!
//! Not tch's optimizer: its moment estimates cannot be read or written, and a resumed job must
//! continue from the same state. The update is `torch.optim.AdamW`'s single-tensor path in the
//! same order (decoupled decay `p ← p·(1 − lr·wd)`, then the moments, then the bias-corrected
//! step), and clipping is `torch.nn.utils.clip_grad_norm_`'s, so on the same libtorch the weights
//! agree with PyTorch's to the last bit or nearly (`tests/grpo.rs`). A step whose gradient norm
//! is not finite is skipped, as verl's trainer does: no update, no change of state, counted.
//!
//! Parameters are f32 (master weights, as verl's FSDP keeps them) and every one must have a
//! gradient at each step: a frozen parameter does not belong to the optimizer.

use std::path::Path;

use tch::{Kind, Tensor};

use crate::MlError;
use crate::qwen::model::torch_call;
use crate::weights::{read_safetensors, write_safetensors};

/// AdamW's hyper-parameters except the learning rate, which each step takes (schedules are the
/// caller's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to every parameter.
    pub weight_decay: f64,
    /// Global gradient 2-norm clipping; `None` does not clip (the norm is still measured).
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWConfig {
    /// The recipe's: β (0.9, 0.999), ε 1e-8, weight decay 0.01, clipping to 1.0.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: Some(1.0),
        }
    }
}

/// What one call to [`AdamW::step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// The global gradient 2-norm before clipping (NaN or infinite when the step was skipped).
    pub grad_norm: f64,
    /// False when the norm was not finite and nothing was updated.
    pub applied: bool,
}

/// One parameter and its moment estimates (f32, on the parameter's device).
struct Slot {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    /// Steps applied; the bias corrections use it.
    step: u64,
    /// Steps skipped for a non-finite gradient norm.
    skipped: u64,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("config", &self.config)
            .field("parameters", &self.slots.len())
            .field("step", &self.step)
            .field("skipped", &self.skipped)
            .finish()
    }
}

/// Names of the saved state's tensors.
const STEP: &str = "step";
const SKIPPED: &str = "skipped_steps";
fn exp_avg_name(param: &str) -> String {
    format!("exp_avg/{param}")
}
fn exp_avg_sq_name(param: &str) -> String {
    format!("exp_avg_sq/{param}")
}

impl AdamW {
    /// An optimizer over named parameters (shallow handles to the model's tensors, which the
    /// steps update in place), with zero moments. The order of `params` is the order the
    /// gradient norm sums in, as `model.parameters()` is for PyTorch.
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Result<AdamW, MlError> {
        let mut seen = std::collections::HashSet::new();
        let mut slots = Vec::with_capacity(params.len());
        for (name, param) in params {
            if !seen.insert(name.clone()) {
                return Err(MlError::Invalid(format!(
                    "AdamW: parameter `{name}` is given twice"
                )));
            }
            if param.kind() != Kind::Float {
                return Err(MlError::Invalid(format!(
                    "AdamW: parameter `{name}` is {:?}; the optimizer keeps f32 master weights",
                    param.kind()
                )));
            }
            let (exp_avg, exp_avg_sq) = torch_call(|| (param.zeros_like(), param.zeros_like()))?;
            slots.push(Slot {
                name,
                param,
                exp_avg,
                exp_avg_sq,
            });
        }
        Ok(AdamW {
            config,
            slots,
            step: 0,
            skipped: 0,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Steps applied so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Steps skipped so far for a non-finite gradient norm.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped
    }

    /// The parameters' names, in order.
    pub fn parameter_names(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.name.as_str())
    }

    /// Sets every parameter's gradient to zero (where it has one).
    pub fn zero_grad(&mut self) {
        for slot in &mut self.slots {
            slot.param.zero_grad();
        }
    }

    /// Measures and clips the gradients, then applies one AdamW update with learning rate
    /// `lr` — unless the norm is not finite, in which case nothing changes but the skip count.
    pub fn step(&mut self, lr: f64) -> Result<StepOutcome, MlError> {
        let grads = self.gradients()?;
        self.step_with_gradients(lr, &grads)
    }

    /// [`step`](Self::step) with the gradients given, one f32 tensor per parameter in order,
    /// rather than read from the parameters. Clipping scales `grads` in place.
    pub fn step_with_gradients(
        &mut self,
        lr: f64,
        grads: &[Tensor],
    ) -> Result<StepOutcome, MlError> {
        if grads.len() != self.slots.len() {
            return Err(MlError::Invalid(format!(
                "AdamW: {} gradients for {} parameters",
                grads.len(),
                self.slots.len()
            )));
        }
        self.step_with_gradient_source(lr, |i| Ok(grads[i].shallow_clone()))
    }

    /// [`step`](Self::step) with each parameter's f32 gradient made on demand by `gradient(i)`
    /// (twice per step: once for the global norm, once for the update), so only one exists at
    /// a time beyond what the caller holds. Mixed precision computes gradients on the model's
    /// bf16 weights and converts them here for the f32 masters ([`super::MasterWeights`]):
    /// converting all of them first would hold a second, f32, copy of every gradient (14 GiB
    /// for a 3B model). The result is bit for bit that of converting them all first: the same
    /// per-tensor norms, coefficient and updates in the same order.
    pub fn step_with_gradient_source(
        &mut self,
        lr: f64,
        mut gradient: impl FnMut(usize) -> Result<Tensor, MlError>,
    ) -> Result<StepOutcome, MlError> {
        let mut checked = |i: usize, slot: &Slot| -> Result<Tensor, MlError> {
            let grad = gradient(i)?;
            if grad.kind() != Kind::Float || grad.size() != slot.param.size() {
                return Err(MlError::Invalid(format!(
                    "AdamW: the gradient of `{}` is {:?} {:?}, expected Float {:?}",
                    slot.name,
                    grad.kind(),
                    grad.size(),
                    slot.param.size()
                )));
            }
            Ok(grad)
        };
        let mut norms = Vec::with_capacity(self.slots.len());
        for (i, slot) in self.slots.iter().enumerate() {
            let grad = checked(i, slot)?;
            norms.push(torch_call(|| grad_norm(&grad))?);
        }
        let total = torch_call(|| norm_of_norms(&norms))?;
        let grad_norm = torch_call(|| total.double_value(&[]))?;
        if !grad_norm.is_finite() {
            self.skipped += 1;
            return Ok(StepOutcome {
                grad_norm,
                applied: false,
            });
        }
        let coefficient = match self.config.max_grad_norm {
            Some(max_norm) => Some(torch_call(|| clip_coefficient(&total, max_norm))?),
            None => None,
        };
        self.step += 1;
        let config = self.config;
        let step = self.step;
        for i in 0..self.slots.len() {
            let grad = checked(i, &self.slots[i])?;
            let slot = &mut self.slots[i];
            torch_call(|| {
                tch::no_grad(|| {
                    if let Some(c) = &coefficient {
                        let _ = grad.shallow_clone().g_mul_(c);
                    }
                    adamw_update(slot, &grad, lr, step, &config);
                })
            })?;
        }
        Ok(StepOutcome {
            grad_norm,
            applied: true,
        })
    }

    /// Every parameter's gradient, refusing a parameter that has none.
    fn gradients(&self) -> Result<Vec<Tensor>, MlError> {
        self.slots
            .iter()
            .map(|slot| {
                let grad = slot.param.grad();
                if grad.defined() {
                    Ok(grad)
                } else {
                    Err(MlError::Invalid(format!(
                        "AdamW: parameter `{}` has no gradient; leave frozen parameters out of \
                         the optimizer",
                        slot.name
                    )))
                }
            })
            .collect()
    }

    /// Writes the step counts and every parameter's moments as one safetensors file
    /// (`exp_avg/NAME`, `exp_avg_sq/NAME`, `step`, `skipped_steps`), bit for bit.
    pub fn save(&self, path: &Path) -> Result<(), MlError> {
        let mut tensors = Vec::with_capacity(2 * self.slots.len() + 2);
        tensors.push((STEP.to_owned(), Tensor::from_slice(&[self.step as i64])));
        tensors.push((
            SKIPPED.to_owned(),
            Tensor::from_slice(&[self.skipped as i64]),
        ));
        for slot in &self.slots {
            tensors.push((exp_avg_name(&slot.name), slot.exp_avg.shallow_clone()));
            tensors.push((exp_avg_sq_name(&slot.name), slot.exp_avg_sq.shallow_clone()));
        }
        write_safetensors(path, &tensors)
    }

    /// Restores a state [`save`](Self::save) wrote for the same parameters (names and shapes);
    /// a missing, extra or misshapen tensor is refused by name and nothing is changed.
    pub fn load(&mut self, path: &Path) -> Result<(), MlError> {
        let mut saved: std::collections::HashMap<String, Tensor> =
            read_safetensors(path)?.into_iter().collect();
        let step = take_count(&mut saved, path, STEP)?;
        let skipped = take_count(&mut saved, path, SKIPPED)?;
        let mut moments = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let expected = slot.param.size();
            let mut take = |name: String| -> Result<Tensor, MlError> {
                let t = saved
                    .remove(&name)
                    .ok_or_else(|| MlError::corrupt(path, format!("missing tensor `{name}`")))?;
                if t.size() != expected || t.kind() != Kind::Float {
                    return Err(MlError::corrupt(
                        path,
                        format!(
                            "tensor `{name}` is {:?} {:?}, expected Float {expected:?}",
                            t.kind(),
                            t.size()
                        ),
                    ));
                }
                Ok(t)
            };
            moments.push((
                take(exp_avg_name(&slot.name))?,
                take(exp_avg_sq_name(&slot.name))?,
            ));
        }
        if let Some(extra) = saved.keys().min() {
            return Err(MlError::corrupt(
                path,
                format!("tensor `{extra}` belongs to no parameter of this optimizer"),
            ));
        }
        torch_call(|| {
            for (slot, (exp_avg, exp_avg_sq)) in self.slots.iter_mut().zip(moments) {
                slot.exp_avg.copy_(&exp_avg);
                slot.exp_avg_sq.copy_(&exp_avg_sq);
            }
        })?;
        self.step = step;
        self.skipped = skipped;
        Ok(())
    }
}

/// Reads a one-element i64 counter out of a saved state.
fn take_count(
    saved: &mut std::collections::HashMap<String, Tensor>,
    path: &Path,
    name: &str,
) -> Result<u64, MlError> {
    let t = saved
        .remove(name)
        .ok_or_else(|| MlError::corrupt(path, format!("missing tensor `{name}`")))?;
    if t.kind() != Kind::Int64 || t.numel() != 1 {
        return Err(MlError::corrupt(
            path,
            format!(
                "tensor `{name}` must be one i64, is {:?} {:?}",
                t.kind(),
                t.size()
            ),
        ));
    }
    let value = t.int64_value(&[0]);
    u64::try_from(value)
        .map_err(|_| MlError::corrupt(path, format!("tensor `{name}` is negative: {value}")))
}

/// One parameter's update, in `torch.optim.adam._single_tensor_adam`'s order. libtorch's
/// addcmul/addcdiv take their scalar only through tch's missing `value` argument, so the scalar
/// multiplies the first factor instead: the kernels compute `self + value·t1·t2` and
/// `self + value·t1/t2` left to right, which this reproduces exactly.
fn adamw_update(slot: &mut Slot, grad: &Tensor, lr: f64, step: u64, config: &AdamWConfig) {
    let Slot {
        param,
        exp_avg,
        exp_avg_sq,
        ..
    } = slot;
    let _ = param.g_mul_scalar_(1.0 - lr * config.weight_decay);
    let _ = exp_avg.lerp_(grad, 1.0 - config.beta1);
    let _ = exp_avg_sq.g_mul_scalar_(config.beta2);
    let _ = exp_avg_sq.addcmul_(&(grad * (1.0 - config.beta2)), grad);
    let step = step as f64;
    let bias_correction1 = 1.0 - config.beta1.powf(step);
    let bias_correction2 = 1.0 - config.beta2.powf(step);
    let step_size = lr / bias_correction1;
    let denom = exp_avg_sq.sqrt() / bias_correction2.powf(0.5) + config.eps;
    let _ = param.addcdiv_(&(&*exp_avg * -step_size), &denom);
}

/// One gradient's 2-norm, as `clip_grad_norm_` computes it on the CPU.
fn grad_norm(grad: &Tensor) -> Tensor {
    grad.flatten(0, -1)
        .linalg_norm(2.0, None::<&[i64]>, false, None::<Kind>)
}

/// The 2-norm of all gradients together from their own norms (`clip_grad_norm_`'s order).
fn norm_of_norms(norms: &[Tensor]) -> Tensor {
    if norms.is_empty() {
        return Tensor::from(0f32);
    }
    Tensor::stack(norms, 0).linalg_norm(2.0, None::<&[i64]>, false, None::<Kind>)
}

/// The 2-norm of all gradients together: each gradient's norm, then the norm of those norms.
fn total_grad_norm(grads: &[Tensor]) -> Tensor {
    let norms: Vec<Tensor> = grads.iter().map(grad_norm).collect();
    norm_of_norms(&norms)
}

/// `min(1, max_norm / (norm + 1e-6))`, `clip_grad_norm_`'s coefficient computed the way
/// PyTorch's `float / tensor` does it (a reciprocal, then a product).
fn clip_coefficient(total: &Tensor, max_norm: f64) -> Tensor {
    ((total + 1e-6).reciprocal() * max_norm).clamp_max(1.0)
}

/// Scales gradients in place by [`clip_coefficient`].
fn scale_to_norm(grads: &[Tensor], total: &Tensor, max_norm: f64) {
    let coefficient = clip_coefficient(total, max_norm);
    tch::no_grad(|| {
        for grad in grads {
            let _ = grad.shallow_clone().g_mul_(&coefficient);
        }
    });
}

/// The global gradient 2-norm of `params` after clipping them to `max_norm` (what
/// `torch.nn.utils.clip_grad_norm_` does and returns). Parameters without a gradient are left
/// out, as PyTorch leaves them.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> Result<f64, MlError> {
    let grads: Vec<Tensor> = params
        .iter()
        .map(|p| p.grad())
        .filter(|g| g.defined())
        .collect();
    torch_call(|| {
        let total = total_grad_norm(&grads);
        scale_to_norm(&grads, &total, max_norm);
        total.double_value(&[])
    })
}
