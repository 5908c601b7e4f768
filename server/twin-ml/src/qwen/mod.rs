//! Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) in tch: configuration in both Hugging Face
//! layouts, image preprocessing, the chat template and tokenizer, the vision tower, the Qwen2
//! decoder with M-RoPE, loading and saving checkpoints, the batched rollout engine, and the
//! forward pass with gradients that training runs.
//!
//! Faithful to transformers 5.17's `modeling_qwen2_5_vl.py`; `tests/parity.rs` holds it to
//! transformers' outputs on fixtures that `tests/fixtures/make_parity_fixtures.py` exports.

pub mod chat;
pub mod config;
pub mod decode;
pub mod engine;
mod layers;
pub mod model;
pub mod preprocess;
pub mod rope;
pub mod text;
pub mod training;
pub mod vision;

pub use chat::{ChatTemplate, Message, Part, PreparedPrompt, QwenProcessor, QwenTokenizer};
pub use config::QwenVlConfig;
pub use decode::{DecodeMode, DecodePath};
pub use engine::{
    Completion, Divergence, EngineOptions, FinishReason, GenerationRequest, GenerationStats,
    REPRODUCIBLE_MARGIN, SamplingParams, generate,
};
pub use model::{ParameterCounts, QwenAssets, QwenVl};
pub use preprocess::{PreparedImage, QwenPreprocessor};
pub use training::{ResponseLogProbs, TrainForwardOptions, TrainSequence};
pub use vision::Grid;
