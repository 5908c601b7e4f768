//! The executor runtime: a lease loop that runs jobs through [`Stage`]s, and the stages this build
//! has, chosen by cargo features.
//!
//! Used two ways: standalone on GPU machines, and embedded in `twin-server serve`, where it talks
//! to its own server over loopback with the same protocol. Features: `data` (ingest,
//! build-dataset, score), `mine`, `eval` and `train` (all need libtorch), `ml` = `mine` + `eval` +
//! `train`; all are on by default. The stage API itself is `twin-stage`, re-exported here.

mod runtime;

pub use runtime::{Executor, ExecutorConfig};
pub use twin_stage::{
    AllowedRoots, CacheStats, ModelCache, ModelKey, ModelStore, Stage, StageBackend, StageContext,
    StageError,
};
#[cfg(feature = "data")]
pub use twin_stage_data::{BuildDatasetStage, IngestStage, ScoreStage};
#[cfg(feature = "eval")]
pub use twin_stage_eval::EvalStage;
#[cfg(feature = "mine")]
pub use twin_stage_mine::{EmbeddingTable, MineStage, embeddings};
#[cfg(feature = "train")]
pub use twin_stage_train::TrainStage;

use std::sync::Arc;

/// Every stage this build has, all sharing `models` (one cache per executor, so a model one stage
/// loaded counts against the budget another stage's model needs) and `store` (registered models
/// on disk). `plugins` runs the Wasm modules of `score`, `mine` and `eval` jobs.
pub fn default_stages(
    plugins: Arc<twin_plugins::Host>,
    models: Arc<ModelCache>,
    store: Arc<ModelStore>,
) -> Vec<Arc<dyn Stage>> {
    // A build without the families that use them has no use for the host or the caches.
    let _ = (&plugins, &models, &store);
    vec![
        #[cfg(feature = "data")]
        Arc::new(IngestStage),
        #[cfg(feature = "data")]
        Arc::new(ScoreStage::new(plugins.clone())),
        #[cfg(feature = "data")]
        Arc::new(BuildDatasetStage),
        #[cfg(feature = "mine")]
        Arc::new(MineStage::new(
            plugins.clone(),
            models.clone(),
            store.clone(),
        )),
        #[cfg(feature = "eval")]
        Arc::new(EvalStage::new(
            plugins.clone(),
            models.clone(),
            store.clone(),
        )),
        #[cfg(feature = "train")]
        Arc::new(TrainStage::new(
            plugins.clone(),
            models.clone(),
            store.clone(),
        )),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use twin_core::JobKind;

    #[test]
    fn the_stages_of_this_build_share_one_model_cache() {
        let host = Arc::new(twin_plugins::Host::new(twin_plugins::HostConfig::default()).unwrap());
        let models = Arc::new(ModelCache::new(1 << 20));
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(ModelStore::open(tmp.path(), 1 << 20).unwrap());
        let stages = default_stages(host, models.clone(), store);
        let kinds: Vec<JobKind> = stages.iter().map(|s| s.kind()).collect();
        let mut want = Vec::new();
        if cfg!(feature = "data") {
            want.extend([JobKind::Ingest, JobKind::Score, JobKind::BuildDataset]);
        }
        if cfg!(feature = "mine") {
            want.push(JobKind::Mine);
        }
        if cfg!(feature = "eval") {
            want.push(JobKind::Eval);
        }
        if cfg!(feature = "train") {
            want.push(JobKind::Train);
        }
        assert_eq!(kinds, want);
        // Each ML stage holds the one cache: shared, not copied.
        let ml = usize::from(cfg!(feature = "mine"))
            + usize::from(cfg!(feature = "eval"))
            + usize::from(cfg!(feature = "train"));
        assert_eq!(Arc::strong_count(&models), 1 + ml);
    }
}
