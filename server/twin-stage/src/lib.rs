//! The API stages plug into: the [`Stage`] trait, the [`StageContext`] a stage runs in (blobs,
//! artefacts, progress, phases that resume, checkpoints), [`StageError`] with its failure code,
//! and the executor's one [`ModelCache`].
//!
//! No lease loop and no libtorch here: the executor (`twin-executor`) leases jobs and builds a
//! context per attempt; stage crates (`twin-stage-data`, `twin-stage-mine`, `twin-stage-eval`)
//! implement [`Stage`].

mod backend;
mod cache;
pub mod codec;
mod context;
mod error;
pub mod fault;
mod model_store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use backend::{HttpBackend, StageBackend, client_error, is_transient};
pub use cache::{CacheStats, CachedModel, ModelCache, ModelKey};
pub use codec::{Codec, Json, JsonLines};
pub use context::{CHECKPOINT_EVERY_ENV, Phase, PhaseOutput, StageContext, partial_name};
pub use error::StageError;
pub use model_store::{Fetch, ModelStore, ResolvedModel, StoredModel};
pub use twin_files::{AllowedRoots, FileError};

use twin_core::JobKind;
use twin_core::event::JobOutput;
use twin_core::job::JobState;

/// One job kind's work. `run` is called on a blocking thread, once per attempt; long work checks
/// [`StageContext::check_cancelled`] between steps. Work worth keeping across attempts goes
/// through [`StageContext::phase`].
pub trait Stage: Send + Sync + 'static {
    fn kind(&self) -> JobKind;
    fn run(&self, job: &JobState, ctx: &StageContext) -> Result<JobOutput, StageError>;
}
