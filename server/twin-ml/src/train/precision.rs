//! Mixed precision for training: f32 master weights that the optimizer updates, beside the
//! model's own weights in the compute kind (bf16 on a GPU) that the forward and backward passes
//! run with.
//!
//! Why masters: at the recipe's learning rate of 1e-6 an AdamW update moves a weight by about
//! 1e-6 of itself, far below bf16's resolution (2^-8 ≈ 4e-3 relative), so updates applied to
//! bf16 weights would round away and training would not move. The masters accumulate them in
//! f32 (as verl's FSDP keeps `model_dtype: fp32`), and the model gets the masters rounded to its
//! kind after every step. With f32 compute (the CPU) there is nothing to do: give the model's
//! tensors to [`AdamW`] directly.

use std::path::Path;

use tch::{Kind, Tensor};

use super::adamw::{AdamW, StepOutcome};
use crate::MlError;
use crate::qwen::model::torch_call;
use crate::weights::{read_safetensors, write_safetensors};

/// The f32 masters of a model's trainable weights.
pub struct MasterWeights {
    /// (name, the model's tensor in its compute kind, its f32 master), in the model's order.
    slots: Vec<(String, Tensor, Tensor)>,
}

impl MasterWeights {
    /// f32 copies of the model's trainable weights (`QwenVl::trainable_parameters`).
    pub fn new(model: Vec<(String, Tensor)>) -> Result<MasterWeights, MlError> {
        let slots = torch_call(|| {
            model
                .into_iter()
                .map(|(name, weight)| {
                    let master = weight.detach().to_kind(Kind::Float).copy();
                    (name, weight, master)
                })
                .collect()
        })?;
        Ok(MasterWeights { slots })
    }

    /// The masters, by name, for [`AdamW::new`] (shallow handles: the optimizer updates them).
    pub fn masters(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .map(|(name, _, master)| (name.clone(), master.shallow_clone()))
            .collect()
    }

    /// Clears the model's gradients (the masters have none).
    pub fn zero_grad(&mut self) {
        for (_, weight, _) in &mut self.slots {
            weight.zero_grad();
        }
    }

    /// One optimizer step: the model's gradients, in f32, update the masters (clipped, or
    /// skipped when their norm is not finite, as [`AdamW::step`]), and the model's weights
    /// become the masters rounded to their kind.
    pub fn step(&self, optimizer: &mut AdamW, lr: f64) -> Result<StepOutcome, MlError> {
        let grads = self
            .slots
            .iter()
            .map(|(name, weight, _)| {
                let grad = weight.grad();
                if grad.defined() {
                    Ok(grad)
                } else {
                    Err(MlError::Invalid(format!(
                        "mixed precision: weight `{name}` has no gradient"
                    )))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Converted one at a time as the optimizer asks: an f32 copy of every gradient at once
        // would cost as much memory again as the masters' gradients.
        let outcome = optimizer
            .step_with_gradient_source(lr, |i| torch_call(|| grads[i].to_kind(Kind::Float)))?;
        if outcome.applied {
            self.masters_to_model()?;
        }
        Ok(outcome)
    }

    /// Writes the masters, rounded, into the model's weights.
    fn masters_to_model(&self) -> Result<(), MlError> {
        torch_call(|| {
            tch::no_grad(|| {
                for (_, weight, master) in &self.slots {
                    weight.shallow_clone().copy_(master);
                }
            })
        })
    }

    /// Saves the masters (a run resumes from them, not from the rounded model weights).
    pub fn save(&self, path: &Path) -> Result<(), MlError> {
        let tensors: Vec<(String, Tensor)> = self.masters();
        write_safetensors(path, &tensors)
    }

    /// Restores masters [`save`](Self::save) wrote for the same weights, and writes them into
    /// the model; a missing or misshapen tensor is refused by name and nothing is changed.
    pub fn load(&mut self, path: &Path) -> Result<(), MlError> {
        let mut saved: std::collections::HashMap<String, Tensor> =
            read_safetensors(path)?.into_iter().collect();
        let mut restored = Vec::with_capacity(self.slots.len());
        for (name, _, master) in &self.slots {
            let t = saved
                .remove(name)
                .ok_or_else(|| MlError::corrupt(path, format!("missing master `{name}`")))?;
            if t.kind() != Kind::Float || t.size() != master.size() {
                return Err(MlError::corrupt(
                    path,
                    format!(
                        "master `{name}` is {:?} {:?}, expected Float {:?}",
                        t.kind(),
                        t.size(),
                        master.size()
                    ),
                ));
            }
            restored.push(t);
        }
        if let Some(extra) = saved.keys().min() {
            return Err(MlError::corrupt(
                path,
                format!("tensor `{extra}` is no weight of this model"),
            ));
        }
        torch_call(|| {
            for ((_, _, master), t) in self.slots.iter_mut().zip(&restored) {
                master.copy_(t);
            }
        })?;
        self.masters_to_model()
    }
}
