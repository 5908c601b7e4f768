//! twin's data stages, which need no model: `ingest` (images into blobs and a dataset),
//! `build-dataset` (TWIN questions and their exports) and `score` (rewards by Wasm modules).

mod build;
mod ingest;
mod score;

pub use build::BuildDatasetStage;
pub use ingest::IngestStage;
pub use score::ScoreStage;
