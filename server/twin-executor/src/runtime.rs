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

/// Every stage this build has.
pub fn default_stages() -> Vec<Arc<dyn Stage>> {
    vec![Arc::new(crate::IngestStage)]
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

    pub fn record_artefact(&self, name: &str, blob: BlobHash) -> Result<(), StageError> {
        let body = ArtefactBody {
            epoch: self.epoch,
            name: name.to_owned(),
            blob,
        };
        self.rt
            .block_on(self.client.record_artefact(&self.job, &body))
            .map(|_| ())
            .map_err(transient)
    }
}

fn transient(e: ClientError) -> StageError {
    match e {
        ClientError::Api { status, .. } if (400..500).contains(&status) => {
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

/// How a job attempt ended, from the executor's side.
enum Outcome {
    Done(Result<JobOutput, StageError>),
    LeaseLost,
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
        let id = grant.job.id.to_string();
        let epoch = grant.epoch;
        let span = tracing::info_span!("job", job = %id, epoch, kind = %grant.job.kind);
        let _enter = span.enter();
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
        let heartbeat = tokio::spawn(heartbeat_loop(
            self.client.clone(),
            id.clone(),
            epoch,
            Duration::from_millis((grant.lease_ttl_ms / 3).max(50)),
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
        heartbeat.abort();
        let outcome = if lost.load(Ordering::SeqCst) {
            Outcome::LeaseLost
        } else {
            Outcome::Done(result)
        };
        let reported = match outcome {
            Outcome::LeaseLost => {
                tracing::warn!("lease lost while running; the result is discarded");
                return;
            }
            Outcome::Done(Ok(output)) => {
                self.client
                    .complete(&id, &CompleteBody { epoch, output })
                    .await
            }
            Outcome::Done(Err(e)) => {
                let error = if cancel.load(Ordering::SeqCst) {
                    format!("cancelled: {e}")
                } else {
                    e.message
                };
                tracing::warn!(%error, retryable = e.retryable, "job attempt failed");
                self.client
                    .fail(
                        &id,
                        &FailBody {
                            epoch,
                            error,
                            retryable: e.retryable,
                        },
                    )
                    .await
            }
        };
        match reported {
            Ok(state) => tracing::info!(status = state.status.as_str(), "job reported"),
            Err(e) => tracing::warn!(error = %e, "the server refused the job's report"),
        }
    }
}

async fn heartbeat_loop(
    client: Client,
    id: String,
    epoch: u64,
    every: Duration,
    cancel: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
) {
    loop {
        tokio::time::sleep(every).await;
        match client.heartbeat(&id, epoch).await {
            Ok(r) if r.cancel_requested => cancel.store(true, Ordering::SeqCst),
            Ok(_) => {}
            Err(e) if e.status() == Some(409) || e.status() == Some(404) => {
                tracing::warn!(error = %e, "heartbeat refused: the lease is gone");
                lost.store(true, Ordering::SeqCst);
                cancel.store(true, Ordering::SeqCst);
                return;
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed; retrying"),
        }
    }
}
