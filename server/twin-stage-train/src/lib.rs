//! twin's `train` stage: GRPO (or SFT) post-training of a Qwen2.5-VL checkpoint on a built
//! dataset's pair questions, rewards from Wasm modules, every step into the log, checkpoints
//! registered as models, exact resume.

pub mod data;
mod stage;
pub mod trainer;

pub use stage::{STATE_ARTEFACT, TrainStage};
