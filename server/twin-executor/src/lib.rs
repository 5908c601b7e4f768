//! The executor runtime: a lease loop that runs jobs through [`Stage`]s, and the stages built so far.
//!
//! Used two ways: standalone (`twin-server executor --server URL`) on GPU machines, and embedded
//! in `twin-server serve`, where it talks to its own server over loopback with the same protocol.
//! The `ml` feature (on by default) adds the stages that need libtorch (`mine`, `eval`).

mod build;
pub mod embeddings;
#[cfg(feature = "ml")]
mod eval;
mod ingest;
#[cfg(feature = "ml")]
mod mine;
mod runtime;
mod score;

pub use build::BuildDatasetStage;
#[cfg(feature = "ml")]
pub use eval::EvalStage;
pub use ingest::IngestStage;
#[cfg(feature = "ml")]
pub use mine::MineStage;
pub use runtime::{Executor, ExecutorConfig, Stage, StageContext, StageError, default_stages};
pub use score::ScoreStage;
