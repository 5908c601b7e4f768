//! CLIP (ViT-B/32, ViT-L/14, any size) from Hugging Face checkpoints: configuration
//! ([`ClipConfig`]), the model ([`ClipModel`]: image and text embeddings) and the image
//! preprocessing that feeds it ([`ClipPreprocessor`], identical to transformers' PIL processor).
//!
//! ```no_run
//! # fn main() -> Result<(), twin_ml::MlError> {
//! use twin_ml::clip::{ClipModel, ClipPreprocessor};
//! let dir = std::path::Path::new("models/clip-vit-base-patch32");
//! let device = twin_ml::device::select(twin_ml::DeviceRequest::Auto)?;
//! let model = ClipModel::load_vision(dir, device)?;
//! let preprocessor = ClipPreprocessor::load(dir)?;
//! let image = image::open("cat.png").map_err(|e| twin_ml::MlError::Image {
//!     name: "cat.png".into(),
//!     message: e.to_string(),
//! })?;
//! let embeddings = model.embed_images(&preprocessor, &[image])?; // [1, 512] f32 on the CPU
//! # Ok(()) }
//! ```

mod config;
mod model;
pub(crate) mod preprocess;

pub use config::{
    Activation, ClipArchitecture, ClipConfig, ClipTextConfig, ClipVisionConfig, ConfigError,
};
pub use model::{ClipModel, TextOutput, VisionOutput};
pub use preprocess::{
    ClipPreprocessor, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PREPROCESSOR_FILE, PixelValues, ResizeTo,
    shortest_edge_size,
};
