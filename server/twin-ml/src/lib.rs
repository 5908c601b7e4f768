//! twin's libtorch layer: device selection, model loading, CLIP, Qwen2.5-VL and its rollout
//! engine, the parity harness and the mining index. The only crate in the workspace that
//! imports tch.

pub mod clip;
pub mod cuda_graph;
pub mod device;
pub mod error;
pub mod index;
pub mod parity;
pub mod qwen;
pub mod resample;
pub mod train;
pub mod weights;

pub use device::{DeviceRequest, cuda_available};
pub use error::MlError;
pub use tch;
