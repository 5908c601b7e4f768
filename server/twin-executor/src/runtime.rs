//! The lease loop and the context a stage runs in.
//!
//! Loop (one per executor): ask the server for a job (long poll), mark it started, run its stage
//! on a blocking thread while a heartbeat task keeps the lease alive, then report completion or
//! failure, all fenced by the lease's epoch. The heartbeat task raises the stage's cancel flag
//! when the server asks for cancellation or refuses the epoch (the lease was lost: the result is
//! then discarded, never reported). The loop stops when `shutdown` turns true, after the current
//! job: a job cut short by a stopping executor is simply re-leased after its lease expires.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tracing::Instrument;
use twin_client::{Client, ClientError};
use twin_core::api::{
    ArtefactBody, Capabilities, CompleteBody, FailBody, LeaseGrant, LeaseRequest, ProgressBody,
};
use twin_core::event::JobOutput;
use twin_core::job::JobState;
use twin_core::{BlobHash, JobKind};

/// A failure of a stage: `retryable` failures are retried by the server with backoff.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StageError {
    pub message: String,
    pub retryable: bool,
}

impl StageError {
    /// Bad input: retrying cannot help.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }
    /// A transient fault (the server unreachable, a busy device).
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }
}

/// One job kind's work. `run` is called on a blocking thread; long work checks
/// [`StageContext::is_cancelled`] between steps.
pub trait Stage: Send + Sync + 'static {
    fn kind(&self) -> JobKind;
    fn run(&self, job: &JobState, ctx: &StageContext) -> Result<JobOutput, StageError>;
}

/// Every stage this build has; `plugins` runs the Wasm modules of `score`, `mine` and `eval`
/// jobs. Without the `ml` feature (no libtorch) there is no `mine` or `eval` stage.
pub fn default_stages(plugins: Arc<twin_plugins::Host>) -> Vec<Arc<dyn Stage>> {
    vec![
        Arc::new(crate::IngestStage),
        Arc::new(crate::ScoreStage::new(plugins.clone())),
        #[cfg(feature = "ml")]
        Arc::new(crate::mine::MineStage::new(plugins.clone())),
        #[cfg(feature = "ml")]
        Arc::new(crate::eval::EvalStage::new(plugins)),
        Arc::new(crate::build::BuildDatasetStage),
    ]
}

/// What a running stage may do: report progress, store blobs, record artefacts, see cancellation.
pub struct StageContext {
    client: Client,
    job: String,
    epoch: u64,
    rt: Handle,
    cancel: Arc<AtomicBool>,
}

impl StageContext {
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Best effort: a lost progress event is not worth failing the job for.
    pub fn progress(&self, message: &str, fraction: Option<f64>, counters: BTreeMap<String, f64>) {
        let body = ProgressBody {
            epoch: self.epoch,
            message: message.to_owned(),
            fraction,
            counters,
        };
        if let Err(e) = self.rt.block_on(self.client.progress(&self.job, &body)) {
            tracing::warn!(job = %self.job, error = %e, "progress not recorded");
        }
    }

    /// Stores bytes in the server's blob store (skipped when the server already has them).
    pub fn upload(&self, bytes: Vec<u8>) -> Result<BlobHash, StageError> {
        let hash = BlobHash::of(&bytes);
        let have = self
            .rt
            .block_on(self.client.has_blob(&hash))
            .map_err(transient)?;
        if !have {
            let stored = self
                .rt
                .block_on(self.client.put_blob(Bytes::from(bytes)))
                .map_err(transient)?;
            debug_assert_eq!(stored.hash, hash);
        }
        Ok(hash)
    }

    /// Fetches a blob from the server (its hash checked).
    pub fn download(&self, hash: &BlobHash) -> Result<Bytes, StageError> {
        self.rt
            .block_on(self.client.get_blob(hash))
            .map_err(transient)
    }

    /// Jobs on the server (to find reusable results of earlier jobs).
    pub fn jobs(&self, filter: &twin_client::JobFilter) -> Result<Vec<JobState>, StageError> {
        self.rt
            .block_on(self.client.jobs(filter))
            .map_err(transient)
    }

    pub fn record_artefact(&self, name: &str, blob: BlobHash) -> Result<(), StageError> {
        let body = ArtefactBody {
            epoch: self.epoch,
            name: name.to_owned(),
            blob,
        };
        self.rt
            .block_on(self.client.record_artefact(&self.job, &body))
            .map_err(transient)?;
        self.stall_if_asked(name);
        Ok(())
    }

    /// Fault injection for the resume tests: with `TWIN_FAULT_STALL_AFTER=<artefact>`, the stage
    /// stops making progress once it has recorded that artefact (until cancelled), so a test
    /// can kill the executor at a known phase boundary.
    fn stall_if_asked(&self, artefact: &str) {
        if std::env::var("TWIN_FAULT_STALL_AFTER").as_deref() == Ok(artefact) {
            tracing::warn!(artefact, "TWIN_FAULT_STALL_AFTER: stalling this job");
            while !self.is_cancelled() {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

fn transient(e: ClientError) -> StageError {
    match e {
        ref api @ ClientError::Api { .. } if !is_transient(api) => {
            StageError::permanent(e.to_string())
        }
        e => StageError::transient(e.to_string()),
    }
}

#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    pub server: String,
    pub token: Option<String>,
    /// Recorded in every lease; unique among running executors.
    pub name: String,
    pub gpus: u32,
    pub labels: Vec<String>,
    /// How long one lease request waits on the server for a job.
    pub poll_wait: Duration,
}

pub struct Executor {
    config: ExecutorConfig,
    client: Client,
    stages: Vec<Arc<dyn Stage>>,
}

impl Executor {
    pub fn new(config: ExecutorConfig, stages: Vec<Arc<dyn Stage>>) -> Result<Self, ClientError> {
        let client = Client::new(&config.server, config.token.clone())?;
        Ok(Self {
            config,
            client,
            stages,
        })
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            gpus: self.config.gpus,
            labels: self.config.labels.iter().cloned().collect(),
            kinds: self.stages.iter().map(|s| s.kind()).collect(),
        }
    }

    /// Runs until `shutdown` becomes true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let request = LeaseRequest {
            executor: self.config.name.clone(),
            capabilities: self.capabilities(),
            wait_ms: self.config.poll_wait.as_millis() as u64,
        };
        tracing::info!(executor = %self.config.name, server = %self.config.server, "executor started");
        let mut backoff = Duration::from_millis(250);
        while !*shutdown.borrow() {
            let leased = tokio::select! {
                r = self.client.lease(&request) => r,
                _ = shutdown.changed() => break,
            };
            match leased {
                Ok(Some(grant)) => {
                    backoff = Duration::from_millis(250);
                    self.run_job(grant).await;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "lease request failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        tracing::info!(executor = %self.config.name, "executor stopped");
    }

    async fn run_job(&self, grant: LeaseGrant) {
        let span = tracing::info_span!("job", job = %grant.job.id, epoch = grant.epoch, kind = %grant.job.kind);
        self.run_job_in_span(grant).instrument(span).await
    }

    async fn run_job_in_span(&self, grant: LeaseGrant) {
        let id = grant.job.id.to_string();
        let epoch = grant.epoch;
        let Some(stage) = self
            .stages
            .iter()
            .find(|s| s.kind() == grant.job.kind)
            .cloned()
        else {
            // The server only leases kinds we listed; this is a server bug, say so and give up.
            let body = FailBody {
                epoch,
                error: format!("executor has no stage for {}", grant.job.kind),
                retryable: true,
                code: twin_core::FailureCode::Internal,
                detail: None,
            };
            let _ = self.client.fail(&id, &body).await;
            return;
        };
        if let Err(e) = self.client.start(&id, epoch).await {
            tracing::warn!(error = %e, "could not start the job; leaving it to the lease reaper");
            return;
        }
        tracing::info!("job started");
        let cancel = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicBool::new(false));
        let ttl = Duration::from_millis(grant.lease_ttl_ms);
        let heartbeat = tokio::spawn(heartbeat_loop(
            self.client.clone(),
            id.clone(),
            epoch,
            ttl,
            cancel.clone(),
            lost.clone(),
        ));
        let ctx = StageContext {
            client: self.client.clone(),
            job: id.clone(),
            epoch,
            rt: Handle::current(),
            cancel: cancel.clone(),
        };
        let job = grant.job.clone();
        let result = tokio::task::spawn_blocking(move || stage.run(&job, &ctx))
            .await
            .unwrap_or_else(|e| Err(StageError::permanent(format!("stage panicked: {e}"))));
        if lost.load(Ordering::SeqCst) {
            heartbeat.abort();
            tracing::warn!("lease lost while running; the result is discarded");
            return;
        }
        // The heartbeat keeps the lease alive until the report is in, so a slow or retried
        // report cannot lose a finished result to a lease expiry.
        let reported = self
            .report(&id, epoch, result, cancel.load(Ordering::SeqCst), ttl)
            .await;
        heartbeat.abort();
        match reported {
            Ok(state) => tracing::info!(status = state.status.as_str(), "job reported"),
            Err(e) => tracing::warn!(error = %e, "the job's report was not accepted"),
        }
    }

    /// Reports the outcome, retrying transient errors for up to one lease TTL.
    async fn report(
        &self,
        id: &str,
        epoch: u64,
        result: Result<JobOutput, StageError>,
        cancelled: bool,
        ttl: Duration,
    ) -> Result<JobState, ClientError> {
        let deadline = tokio::time::Instant::now() + ttl;
        let mut wait = Duration::from_millis(100);
        loop {
            let sent = match &result {
                Ok(output) => {
                    let body = CompleteBody {
                        epoch,
                        output: output.clone(),
                    };
                    self.client.complete(id, &body).await
                }
                Err(e) => {
                    let error = if cancelled {
                        format!("cancelled: {e}")
                    } else {
                        e.message.clone()
                    };
                    tracing::warn!(%error, retryable = e.retryable, "job attempt failed");
                    let body = FailBody {
                        epoch,
                        error,
                        retryable: e.retryable,
                        code: twin_core::FailureCode::Unclassified,
                        detail: None,
                    };
                    self.client.fail(id, &body).await
                }
            };
            match sent {
                Err(e) if is_transient(&e) && tokio::time::Instant::now() + wait < deadline => {
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "report failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }
}

/// Network errors, timeouts, rate limits and server errors may pass; other answers will not.
fn is_transient(e: &ClientError) -> bool {
    match e.status() {
        None => true,
        Some(s) => s == 408 || s == 429 || s >= 500,
    }
}

/// Heartbeats every third of the TTL. Raises `cancel` when the server asks; raises `lost` (and
/// `cancel`) when the server refuses the epoch or no heartbeat got through for a whole TTL,
/// since by then the server has expired the lease.
async fn heartbeat_loop(
    client: Client,
    id: String,
    epoch: u64,
    ttl: Duration,
    cancel: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
) {
    let every = (ttl / 3).max(Duration::from_millis(50));
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(every).await;
        match client.heartbeat(&id, epoch).await {
            Ok(r) => {
                last_ok = tokio::time::Instant::now();
                if r.cancel_requested {
                    cancel.store(true, Ordering::SeqCst);
                }
            }
            Err(e) if !is_transient(&e) => {
                tracing::warn!(error = %e, "heartbeat refused: the lease is gone");
                lost.store(true, Ordering::SeqCst);
                cancel.store(true, Ordering::SeqCst);
                return;
            }
            Err(e) if last_ok.elapsed() >= ttl => {
                tracing::warn!(error = %e, "no heartbeat got through for a whole lease TTL; stopping the job");
                lost.store(true, Ordering::SeqCst);
                cancel.store(true, Ordering::SeqCst);
                return;
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed; retrying"),
        }
    }
}
