//! FOR TESTS ONLY: a server in memory, so phases, checkpoints and stages can be tested without
//! HTTP. Built for this crate's tests and, through the `testing` feature, for other crates'
//! tests; no binary enables it. End-to-end tests exercise the real [`crate::HttpBackend`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use twin_client::JobFilter;
use twin_core::BlobHash;
use twin_core::job::{Artefact, JobState};
use twin_core::train::TrainRecord;

use crate::{StageBackend, StageContext, StageError};

/// A job as the server leases it: `spec` (with its `kind`) validated as a submission, queued,
/// without artefacts. Panics on a spec the server would refuse (a test's mistake).
pub fn job(spec: serde_json::Value) -> JobState {
    let submission = twin_core::spec::JobSubmission::from_json(serde_json::json!({ "spec": spec }))
        .unwrap_or_else(|e| panic!("a test job's spec: {e}"));
    let id = "01testjob"
        .parse()
        .unwrap_or_else(|e| panic!("a test job's id: {e}"));
    JobState::from_submitted(
        &twin_core::event::JobSubmitted { id, submission },
        "test",
        0,
    )
}

/// Blobs, artefacts and progress kept in memory. Clones share their state, so a test can read
/// what a stage did through its own handle. Every context it makes shares one cancel flag.
#[derive(Clone, Default)]
pub struct MemoryBackend {
    state: Arc<Mutex<State>>,
    cancel: Arc<AtomicBool>,
    upload_delay: Duration,
    /// The allowed roots of every context made here (none by default, as on an executor).
    roots: Arc<crate::AllowedRoots>,
}

#[derive(Default)]
struct State {
    blobs: HashMap<BlobHash, Bytes>,
    artefacts: Vec<Artefact>,
    progress: Vec<(Option<f64>, String)>,
    jobs: Vec<JobState>,
    training: Vec<TrainRecord>,
    /// Registered checkpoints: (manifest, name).
    checkpoints: Vec<(BlobHash, Option<String>)>,
    /// Raise the cancel flag once this artefact is recorded (an executor dying there).
    cancel_after: Option<String>,
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every upload takes this long (to test checkpoint spacing).
    #[must_use]
    pub fn with_upload_delay(mut self, delay: Duration) -> Self {
        self.upload_delay = delay;
        self
    }

    /// Contexts made here may read paths under `roots` (each must exist).
    #[must_use]
    pub fn with_allowed_roots(mut self, roots: &[&std::path::Path]) -> Self {
        let roots = crate::AllowedRoots::new(roots.iter().copied())
            .unwrap_or_else(|e| panic!("a test's allowed roots: {e}"));
        self.roots = Arc::new(roots);
        self
    }

    /// A context for an attempt that finds `earlier` artefacts (those of attempts before it).
    pub fn context(&self, earlier: &[Artefact]) -> StageContext {
        StageContext::new(Arc::new(self.clone()), earlier, self.cancel.clone())
            .with_allowed_roots(self.roots.clone())
    }

    /// The cancel flag of every context made here.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// Raises the cancel flag when artefact `name` is next recorded: the attempt stops there
    /// as if its executor had died, having recorded it.
    pub fn cancel_after(&self, name: &str) {
        self.state.lock().cancel_after = Some(name.to_owned());
    }

    /// Lowers the cancel flag for the next attempt.
    pub fn reset_cancel(&self) {
        self.cancel
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Adds a blob, as a client would have uploaded it before the job ran.
    pub fn put(&self, bytes: impl Into<Bytes>) -> BlobHash {
        let bytes = bytes.into();
        let hash = BlobHash::of(&bytes);
        self.state.lock().blobs.insert(hash, bytes);
        hash
    }

    /// Jobs the stage will see when it lists the server's jobs (unfiltered).
    pub fn set_jobs(&self, jobs: Vec<JobState>) {
        self.state.lock().jobs = jobs;
    }

    /// The artefacts recorded so far, in order.
    pub fn artefacts(&self) -> Vec<Artefact> {
        self.state.lock().artefacts.clone()
    }

    pub fn names(&self) -> Vec<String> {
        self.artefacts().into_iter().map(|a| a.name).collect()
    }

    /// A stored blob; panics when there is none (a test's mistake).
    pub fn blob(&self, hash: &BlobHash) -> Bytes {
        self.state
            .lock()
            .blobs
            .get(hash)
            .cloned()
            .unwrap_or_else(|| panic!("no blob {hash}"))
    }

    /// Every training record so far, in order.
    pub fn training(&self) -> Vec<TrainRecord> {
        self.state.lock().training.clone()
    }

    /// Every checkpoint registered so far: (manifest, name), in order.
    pub fn checkpoints(&self) -> Vec<(BlobHash, Option<String>)> {
        self.state.lock().checkpoints.clone()
    }

    /// Every progress report so far: (fraction, message).
    pub fn fractions(&self) -> Vec<(Option<f64>, String)> {
        self.state.lock().progress.clone()
    }
}

impl StageBackend for MemoryBackend {
    fn upload(&self, bytes: Vec<u8>) -> Result<BlobHash, StageError> {
        std::thread::sleep(self.upload_delay);
        Ok(self.put(bytes))
    }

    fn download(&self, hash: &BlobHash) -> Result<Bytes, StageError> {
        self.state
            .lock()
            .blobs
            .get(hash)
            .cloned()
            .ok_or_else(|| StageError::bad_input(format!("blob {hash}: not found")))
    }

    fn record_artefact(&self, name: &str, blob: BlobHash) -> Result<(), StageError> {
        let mut state = self.state.lock();
        let bytes = state
            .blobs
            .get(&blob)
            .map(|b| b.len() as u64)
            .ok_or_else(|| StageError::bad_input(format!("artefact {name}: no blob {blob}")))?;
        // As the server does: the same artefact is recorded once.
        if !state
            .artefacts
            .iter()
            .any(|a| a.name == name && a.blob == blob)
        {
            state.artefacts.push(Artefact {
                name: name.to_owned(),
                blob,
                bytes,
                epoch: 0,
            });
        }
        if state.cancel_after.as_deref() == Some(name) {
            state.cancel_after = None;
            self.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }

    fn progress(
        &self,
        message: &str,
        fraction: Option<f64>,
        _counters: &BTreeMap<String, f64>,
    ) -> Result<(), StageError> {
        self.state
            .lock()
            .progress
            .push((fraction, message.to_owned()));
        Ok(())
    }

    fn jobs(&self, _filter: &JobFilter) -> Result<Vec<JobState>, StageError> {
        Ok(self.state.lock().jobs.clone())
    }

    fn record_training(&self, record: &TrainRecord) -> Result<(), StageError> {
        self.state.lock().training.push(record.clone());
        Ok(())
    }

    fn register_checkpoint(
        &self,
        manifest: BlobHash,
        name: Option<&str>,
    ) -> Result<(), StageError> {
        let mut state = self.state.lock();
        if !state.blobs.contains_key(&manifest) {
            return Err(StageError::bad_input(format!(
                "checkpoint manifest {manifest} is not uploaded"
            )));
        }
        state.checkpoints.push((manifest, name.map(str::to_owned)));
        Ok(())
    }
}
