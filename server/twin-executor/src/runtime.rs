//! The lease loop: leases, heartbeats, cancellation and reports around each stage's run.
//!
//! Loop (one per executor): ask the server for a job (long poll), mark it started, run its stage
//! on a blocking thread while a heartbeat task keeps the lease alive, then report completion or
//! failure, all fenced by the lease's epoch. The heartbeat task raises the stage's cancel flag
//! when the server asks for cancellation or refuses the epoch (the lease was lost: the result is
//! then discarded, never reported). When `shutdown` turns true the running stage is cancelled
//! and, unless it finished anyway, its job is handed back (`release`): the server re-queues it at
//! once, counting no attempt, and whatever phases and checkpoints it recorded let the next
//! attempt resume. With `exit_when_idle` the loop also stops after that long without a job.
//!
//! Each attempt's stage gets a [`StageContext`] over HTTP that knows the artefacts earlier
//! attempts recorded, so it resumes where they stopped. A stage's failure is reported with its
//! code and detail; a stage that panics is reported as `internal`. The test-only hooks
//! `TWIN_FAULT_ABORT_IN` and `TWIN_FAULT_STALL_IN` (see `twin_stage::fault`) act where a stage is
//! invoked.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::watch;
use tracing::Instrument;
use twin_client::{Client, ClientError};
use twin_core::api::{Capabilities, CompleteBody, FailBody, LeaseGrant, LeaseRequest, ReleaseBody};
use twin_core::event::JobOutput;
use twin_core::job::JobState;
use twin_stage::{
    AllowedRoots, HttpBackend, ModelCache, Stage, StageContext, StageError, is_transient,
};

#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    pub server: String,
    pub token: Option<String>,
    /// A private CA (PEM) to trust for an https server, besides the public roots.
    pub ca_file: Option<PathBuf>,
    /// Recorded in every lease; unique among running executors.
    pub name: String,
    pub gpus: u32,
    pub labels: Vec<String>,
    /// How long one lease request waits on the server for a job.
    pub poll_wait: Duration,
    /// The model cache's budget, per device ([`ModelCache`]).
    pub model_cache_bytes: u64,
    /// Stop after this long without a job (batch allocations that bill idle time).
    pub exit_when_idle: Option<Duration>,
    /// Where paths job specs name may be read; none by default, so a spec must name uploaded
    /// blobs (what `twin submit` sends) rather than paths on this machine.
    pub allowed_roots: Arc<AllowedRoots>,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            server: "http://127.0.0.1:7878".into(),
            token: None,
            ca_file: None,
            name: "executor".into(),
            gpus: 0,
            labels: Vec::new(),
            poll_wait: Duration::from_secs(20),
            model_cache_bytes: Self::DEFAULT_MODEL_CACHE_BYTES,
            exit_when_idle: None,
            allowed_roots: Arc::new(AllowedRoots::none()),
        }
    }
}

impl ExecutorConfig {
    /// 24 GiB per device: Qwen2.5-VL-7B in bf16 (16.6 GB) and a CLIP ViT-L image tower (0.6 GB)
    /// fit together, so an executor alternating mine and eval jobs keeps both, while a 40 GB GPU
    /// still has 16 GB left for activations and the KV cache. A fixed size rather than a share
    /// of the device's memory: libtorch reports no free memory to ask, and the same setting then
    /// means the same on every machine. A bigger model (a 7B in f32 on the CPU) still loads,
    /// alone.
    pub const DEFAULT_MODEL_CACHE_BYTES: u64 = 24 << 30;

    /// A model cache with this configuration's budget, for [`crate::default_stages`].
    pub fn model_cache(&self) -> Arc<ModelCache> {
        Arc::new(ModelCache::new(self.model_cache_bytes))
    }
}

pub struct Executor {
    config: ExecutorConfig,
    client: Client,
    stages: Vec<Arc<dyn Stage>>,
}

impl Executor {
    pub fn new(config: ExecutorConfig, stages: Vec<Arc<dyn Stage>>) -> Result<Self, ClientError> {
        let client = Client::with_ca_file(
            &config.server,
            config.token.clone(),
            config.ca_file.as_deref(),
        )?;
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

    /// Runs until `shutdown` becomes true (handing back the job it holds then), or until it has
    /// been idle for `exit_when_idle`.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        tracing::info!(executor = %self.config.name, server = %self.config.server, "executor started");
        let mut backoff = Duration::from_millis(250);
        let mut idle_since = tokio::time::Instant::now();
        while !*shutdown.borrow() {
            // A lease request never waits past the idle deadline.
            let mut wait = self.config.poll_wait;
            if let Some(limit) = self.config.exit_when_idle {
                let left = limit.saturating_sub(idle_since.elapsed());
                if left.is_zero() {
                    tracing::info!(
                        idle_ms = limit.as_millis() as u64,
                        "idle for too long; exiting"
                    );
                    break;
                }
                wait = wait.min(left);
            }
            let request = LeaseRequest {
                executor: self.config.name.clone(),
                capabilities: self.capabilities(),
                wait_ms: wait.as_millis() as u64,
            };
            let leased = tokio::select! {
                r = self.client.lease(&request) => r,
                _ = shutdown.changed() => break,
            };
            match leased {
                Ok(Some(grant)) => {
                    backoff = Duration::from_millis(250);
                    self.run_job(grant, shutdown.clone()).await;
                    idle_since = tokio::time::Instant::now();
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e.with_causes(), retry_in_ms = backoff.as_millis() as u64, "lease request failed");
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

    async fn run_job(&self, grant: LeaseGrant, shutdown: watch::Receiver<bool>) {
        let span = tracing::info_span!("job", job = %grant.job.id, epoch = grant.epoch, kind = %grant.job.kind);
        self.run_job_in_span(grant, shutdown).instrument(span).await
    }

    async fn run_job_in_span(&self, grant: LeaseGrant, mut shutdown: watch::Receiver<bool>) {
        let id = grant.job.id.to_string();
        let epoch = grant.epoch;
        let Some(stage) = self
            .stages
            .iter()
            .find(|s| s.kind() == grant.job.kind)
            .cloned()
        else {
            // The server only leases kinds we listed; this is a server bug, say so and give up.
            let e = StageError::internal(format!("executor has no stage for {}", grant.job.kind))
                .retryable(true);
            let body = FailBody {
                epoch,
                error: e.message,
                retryable: e.retryable,
                code: e.code,
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
        let backend = HttpBackend::new(self.client.clone(), id.clone(), epoch, Handle::current());
        let ctx = StageContext::new(Arc::new(backend), &grant.job.artefacts, cancel.clone())
            .with_allowed_roots(self.config.allowed_roots.clone());
        let job = grant.job.clone();
        // The blocking thread does not inherit the task's span; the stage's logs should name the job.
        let span = tracing::Span::current();
        let stage_cancel = cancel.clone();
        let mut running = tokio::task::spawn_blocking(move || {
            let _span = span.enter();
            twin_stage::fault::abort_in(job.kind);
            twin_stage::fault::stall_in(job.kind, &stage_cancel);
            if ctx.is_cancelled() {
                return Err(StageError::internal("stopped before the stage began"));
            }
            stage.run(&job, &ctx)
        });
        // A stopping executor cancels the stage and hands the job back once the stage returns.
        let mut handing_back = false;
        let joined = loop {
            tokio::select! {
                r = &mut running => break r,
                changed = shutdown.changed(), if !handing_back => {
                    if changed.is_err() || *shutdown.borrow() {
                        tracing::info!("stopping: cancelling the stage to hand its job back");
                        handing_back = true;
                        cancel.store(true, Ordering::SeqCst);
                    }
                }
            }
        };
        let result = joined.unwrap_or_else(|e| Err(join_failure(e)));
        if lost.load(Ordering::SeqCst) {
            heartbeat.abort();
            tracing::warn!("lease lost while running; the result is discarded");
            return;
        }
        // The heartbeat keeps the lease alive until the report is in, so a slow or retried
        // report cannot lose a finished result to a lease expiry.
        let reported = if handing_back && result.is_err() {
            self.hand_back(&id, epoch, ttl).await
        } else {
            self.report(&id, epoch, result, cancel.load(Ordering::SeqCst), ttl)
                .await
        };
        heartbeat.abort();
        match reported {
            Ok(state) => tracing::info!(status = state.status.as_str(), "job reported"),
            Err(e) => tracing::warn!(error = %e, "the job's report was not accepted"),
        }
    }

    /// Gives the lease back so the job is re-queued at once (no attempt counted), retrying
    /// transient errors for up to one lease TTL; if it never gets through, the lease expires.
    async fn hand_back(
        &self,
        id: &str,
        epoch: u64,
        ttl: Duration,
    ) -> Result<JobState, ClientError> {
        let body = ReleaseBody {
            epoch,
            reason: Some(format!("executor {} is stopping", self.config.name)),
        };
        let deadline = tokio::time::Instant::now() + ttl;
        let mut wait = Duration::from_millis(100);
        loop {
            match self.client.release(id, &body).await {
                Err(e) if is_transient(&e) && tokio::time::Instant::now() + wait < deadline => {
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "hand-back failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
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
                    tracing::warn!(%error, code = %e.code, detail = e.detail.as_deref(), retryable = e.retryable, "job attempt failed");
                    let body = FailBody {
                        epoch,
                        error,
                        retryable: e.retryable,
                        code: e.code,
                        detail: e.detail.clone(),
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

/// A stage that panicked is a bug (`internal`), its panic message kept.
fn join_failure(e: tokio::task::JoinError) -> StageError {
    if !e.is_panic() {
        return StageError::internal(format!("the stage's thread was stopped: {e}"));
    }
    let panic = e.into_panic();
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned());
    StageError::internal(format!("stage panicked: {message}"))
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
