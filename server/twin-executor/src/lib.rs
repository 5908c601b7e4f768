//! The executor runtime: a lease loop that runs jobs through [`Stage`]s, and the stages built so far.
//!
//! Used two ways: standalone (`twin-server executor --server URL`) on GPU machines, and embedded
//! in `twin-server serve`, where it talks to its own server over loopback with the same protocol.

mod ingest;
mod runtime;
mod score;

pub use ingest::IngestStage;
pub use runtime::{Executor, ExecutorConfig, Stage, StageContext, StageError, default_stages};
pub use score::ScoreStage;
