//! The job service: turns API requests into commands, events and appends, and owns the leases.
//!
//! Write path: read the projection, `decide` (pure), append with the stream version the decision
//! was based on, and retry on a version conflict. The log's writer thread applies every durable
//! batch to the projections before it acknowledges, so a caller that got its answer reads its own
//! write.
//!
//! Leases: deadlines live in memory (heartbeats are not events: they would swamp the log); the
//! lease's grant, epoch and end are events. After a restart every held job gets a fresh full TTL.
//! The reaper ([`Service::reap`]) expires lapsed leases through the same state machine, and so
//! does [`Service::expire_leases_of`] at once for an executor known to be dead.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, watch};
use twin_core::api::{Capabilities, CreateExperiment, EventsPage, LeaseGrant, LeaseRequest};
use twin_core::event::{ExperimentCreated, JobOutput, ModuleAliasSet, ModuleRegistered};
use twin_core::job::{self, JobCommand, JobState};
use twin_core::projection::{ModuleInfo, Registry};
use twin_core::spec::JobSpec;
use twin_core::train::TrainRecord;
use twin_core::{
    BlobHash, Event, ExperimentId, FailureCode, JobId, JobKind, JobSubmission, Millis, Projections,
    StreamName,
};
use twin_log::{
    AppendRequest, Appended, BlobStore, Expected, Idempotency, Log, LogConfig, StoredRecord,
};

use crate::error::{ApiError, check_text, text_limits};
use crate::metrics::{LogMetrics, Metrics};

pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn mint_id() -> String {
    ulid::Ulid::new().to_string().to_ascii_lowercase()
}

/// An executor the server has heard from.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ExecutorSeen {
    pub name: String,
    pub actor: String,
    pub capabilities: Capabilities,
    pub last_seen: Millis,
}

pub struct Service {
    pub(crate) log: Log,
    pub blobs: BlobStore,
    state: Arc<RwLock<Projections>>,
    /// Held jobs' lease deadlines, with the epoch each belongs to.
    leases: Mutex<HashMap<JobId, (u64, Instant)>>,
    executors: Mutex<BTreeMap<String, ExecutorSeen>>,
    last_seq: watch::Receiver<u64>,
    /// Woken on every durable batch: queued work may have appeared.
    work: Arc<Notify>,
    pub metrics: Arc<Metrics>,
    pub lease_ttl: Duration,
    /// Compiles and describes uploaded modules (compilation runs in a child process).
    pub plugins: Arc<twin_plugins::Host>,
    /// Where and why applying a durable batch to the projections panicked; once set, the
    /// projections are frozen, `/healthz` answers 503 and appends are refused (see
    /// [`apply_batch`]).
    projection_failure: Arc<Mutex<Option<String>>>,
    /// Where paths a submission names must lie, when the server is configured with roots
    /// (checked at submission, [`crate::paths`]); unset or empty: not checked here.
    allowed_roots: std::sync::OnceLock<twin_files::AllowedRoots>,
    /// Held long polls and event streams, bounded (see [`crate::waiters`]).
    pub waiters: Arc<crate::waiters::Waiters>,
    /// How long one attempt of a job of each kind may hold its lease (absent: no limit); set
    /// once, at start-up.
    job_timeouts: std::sync::OnceLock<BTreeMap<JobKind, Duration>>,
}

/// A job an executor holds, as the reaper sees it.
struct HeldJob {
    id: JobId,
    epoch: u64,
    kind: JobKind,
    /// When the current attempt's lease was granted.
    leased_at: Option<Millis>,
}

/// Who acts on a shared name (see [`Registry`]): the name's owner to be, and whether they may
/// act on names others own.
#[derive(Debug, Clone, Copy)]
pub struct Claimant<'a> {
    pub name: &'a str,
    pub admin: bool,
}

/// Applies one durable batch to the projections, returning the new last sequence number; `None`
/// once a batch has panicked. The panic is caught here rather than in the log's writer so the
/// server knows: the state would otherwise miss a batch silently (a succeeded job still leased in
/// memory, which the reaper would then expire, appending a contradiction to the log). Later
/// batches are not applied to a state that is already wrong; a restart replays the log.
fn apply_batch(
    state: &RwLock<Projections>,
    failure: &Mutex<Option<String>>,
    records: &[StoredRecord],
    apply: impl Fn(&StoredRecord, &mut Projections),
) -> Option<u64> {
    if failure.lock().is_some() {
        return None;
    }
    let run = std::panic::AssertUnwindSafe(|| {
        let mut s = state.write();
        for r in records {
            apply(r, &mut s);
        }
        s.last_seq
    });
    match std::panic::catch_unwind(run) {
        Ok(last) => Some(last),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            let first = records.first().map_or(0, |r| r.seq);
            let at = format!("seq {first} ({message})");
            tracing::error!(at = %at, "applying a batch to the projections panicked; changes are refused until a restart");
            *failure.lock() = Some(at);
            None
        }
    }
}

fn decode(r: &StoredRecord, into: &mut Projections) {
    match r.recorded() {
        Ok(e) => into.apply(&e),
        Err(e) => {
            tracing::error!(seq = r.seq, error = %e, "event cannot be decoded; projections skip it");
            into.anomalies.push(format!("seq {}: {e}", r.seq));
            into.last_seq = r.seq;
        }
    }
}

impl Service {
    pub fn open(
        data_dir: &std::path::Path,
        lease_ttl: Duration,
        metrics: Arc<Metrics>,
        plugins: Arc<twin_plugins::Host>,
    ) -> anyhow::Result<Arc<Self>> {
        let blobs = BlobStore::open(twin_log::blob_dir(data_dir))?;
        let state = Arc::new(RwLock::new(Projections::default()));
        let (seq_tx, last_seq) = watch::channel(0);
        let seq_tx = Arc::new(seq_tx);
        let work = Arc::new(Notify::new());
        let mut initial = Projections::default();
        let projection_failure = Arc::new(Mutex::new(None));
        let subscriber = {
            let (state, work, seq_tx) = (state.clone(), work.clone(), seq_tx.clone());
            let failure = projection_failure.clone();
            Box::new(move |records: &[StoredRecord]| {
                if let Some(last) = apply_batch(&state, &failure, records, decode) {
                    seq_tx.send_replace(last);
                    work.notify_waiters();
                }
            })
        };
        let mut config = LogConfig::new(twin_log::log_dir(data_dir));
        config.observer = Some(Arc::new(LogMetrics(metrics.clone())));
        let started = Instant::now();
        let log = Log::open(config, |r| decode(r, &mut initial), subscriber)?;
        tracing::info!(
            events = initial.last_seq,
            jobs = initial.jobs.len(),
            ms = started.elapsed().as_millis() as u64,
            "projections rebuilt from the log"
        );
        for a in &initial.anomalies {
            tracing::warn!(anomaly = %a, "replay anomaly");
        }
        let grace = Instant::now() + lease_ttl;
        let leases = initial
            .jobs
            .values()
            .filter(|j| j.status.is_held())
            .map(|j| (j.id.clone(), (j.epoch, grace)))
            .collect();
        let seq = initial.last_seq;
        *state.write() = initial;
        let svc = Service {
            log,
            blobs,
            state,
            leases: Mutex::new(leases),
            executors: Mutex::new(BTreeMap::new()),
            last_seq,
            work,
            metrics,
            lease_ttl,
            plugins,
            projection_failure,
            allowed_roots: std::sync::OnceLock::new(),
            job_timeouts: std::sync::OnceLock::new(),
            waiters: crate::waiters::Waiters::new(
                crate::waiters::Waiters::GLOBAL,
                crate::waiters::Waiters::PER_TOKEN,
            ),
        };
        // The watch was created before the replay; bring it up to date.
        seq_tx.send_replace(seq);
        Ok(Arc::new(svc))
    }

    /// Stops the log writer (after queued appends) and releases the data directory.
    pub fn close(&self) {
        self.log.close();
    }

    pub fn last_seq(&self) -> u64 {
        self.log.last_seq()
    }

    pub fn read<T>(&self, f: impl FnOnce(&Projections) -> T) -> T {
        f(&self.state.read())
    }

    pub(crate) fn job(&self, id: &JobId) -> Result<JobState, ApiError> {
        self.read(|p| p.jobs.get(id).cloned())
            .ok_or_else(|| ApiError::NotFound {
                what: "job",
                id: id.to_string(),
            })
    }

    pub fn get_job(&self, id: &str) -> Result<JobState, ApiError> {
        self.job(&parse_job_id(id)?)
    }

    /// `Err` while the server is unhealthy: its projections stopped (see [`apply_batch`]), or
    /// the log failed to make its last writes durable and has not recovered.
    pub fn health(&self) -> Result<(), ApiError> {
        if let Some(at) = self.projection_failure.lock().clone() {
            return Err(ApiError::ProjectionsFailed(at));
        }
        if self.log.is_failing() {
            return Err(ApiError::StorageUnavailable);
        }
        Ok(())
    }

    pub(crate) async fn append(
        &self,
        actor: &str,
        events: Vec<(StreamName, Event)>,
        expect: Vec<(String, Expected)>,
        idempotency: Option<Idempotency>,
    ) -> Result<Appended, ApiError> {
        if let Some(at) = self.projection_failure.lock().clone() {
            return Err(ApiError::ProjectionsFailed(at));
        }
        let events = events
            .iter()
            .map(|(s, e)| twin_log::new_event(s, e))
            .collect();
        Ok(self
            .log
            .append(AppendRequest {
                actor: actor.to_owned(),
                events,
                expect,
                idempotency,
            })
            .await?)
    }

    /// Runs one command against a job: decide on the current state, append, retry on a race.
    /// `fence`, for an executor's command, is the lease epoch it names: who holds that lease is
    /// checked on the same snapshot the decision and the version check use, so a lease granted
    /// to another executor between a check and the append cannot be acted on.
    async fn execute(
        &self,
        id: &JobId,
        actor: &str,
        fence: Option<u64>,
        command: impl Fn(&JobState) -> JobCommand,
    ) -> Result<JobState, ApiError> {
        for _ in 0..8 {
            let state = self.job(id)?;
            if let Some(epoch) = fence {
                Self::check_holder(&state, epoch, actor)?;
            }
            let events = state.decide(command(&state)).inspect_err(|r| {
                if matches!(r, twin_core::Rejection::StaleEpoch { .. }) {
                    self.metrics.stale_epoch_refusals.inc();
                    tracing::warn!(job = %id, actor, rejection = %r, "stale executor refused");
                }
            })?;
            if events.is_empty() {
                return Ok(state);
            }
            let failures: Vec<FailureCode> = events
                .iter()
                .filter_map(|(_, e)| match e {
                    Event::JobAttemptFailed(f) => Some(f.code),
                    Event::JobLeaseExpired(_) => Some(FailureCode::ExecutorLost),
                    _ => None,
                })
                .collect();
            let stream = StreamName::Job(id.clone()).to_string();
            match self
                .append(
                    actor,
                    events,
                    vec![(stream, Expected::Version(state.version))],
                    None,
                )
                .await
            {
                Ok(_) => {
                    for code in failures {
                        self.metrics
                            .attempt_failures
                            .with_label_values(&[code.as_str()])
                            .inc();
                    }
                    let after = self.job(id)?;
                    if !after.status.is_held() {
                        self.forget_lease(id, after.epoch);
                    }
                    return Ok(after);
                }
                Err(ApiError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(ApiError::Conflict(format!("job/{id}")))
    }

    /// Fails an attempt that has held its lease longer than its kind's limit (set once, at
    /// start-up; see [`Self::reap`]).
    pub fn set_job_timeouts(&self, limits: BTreeMap<JobKind, Duration>) {
        let _ = self.job_timeouts.set(limits);
    }

    /// Checks the paths later submissions name against `roots` (set once, at start-up).
    pub fn set_allowed_roots(&self, roots: twin_files::AllowedRoots) {
        let _ = self.allowed_roots.set(roots);
    }

    pub async fn submit(
        &self,
        by: Claimant<'_>,
        body: serde_json::Value,
        idempotency_key: Option<String>,
    ) -> Result<(JobState, bool), ApiError> {
        let actor = by.name;
        let mut submission = JobSubmission::from_json(body)?;
        if let Some(roots) = self.allowed_roots.get() {
            crate::paths::check(roots, &submission)?;
        }
        // A job that would register a dataset under a name someone else owns is refused now,
        // not when it has done its work.
        match &submission.spec {
            JobSpec::Ingest(spec) => self.check_owner(Registry::Dataset, &spec.dataset, by)?,
            JobSpec::BuildDataset(spec) => {
                self.check_owner(Registry::BuiltDataset, &spec.name, by)?
            }
            _ => {}
        }
        if let Some(exp) = &submission.experiment {
            let known = self.read(|p| p.experiments.contains_key(exp));
            if !known {
                return Err(ApiError::InvalidSpec(twin_core::SpecError::Invalid {
                    field: "experiment".into(),
                    message: format!("no experiment `{exp}`; create it with POST /v1/experiments"),
                }));
            }
        }
        let idempotency = idempotency_key.map(|key| Idempotency {
            key,
            digest: Sha256::digest(serde_json::to_vec(&submission).expect("submissions serialise"))
                .into(),
        });
        // Resolved after the idempotency digest, so a retry after an alias switch is still the
        // same request (and gets the job the first attempt created).
        self.resolve_modules(&mut submission)?;
        let id: JobId = mint_id().parse().expect("ULIDs are valid ids");
        let stream = StreamName::Job(id.clone()).to_string();
        let appended = self
            .append(
                actor,
                job::submit(id, submission),
                vec![(stream, Expected::NoStream)],
                idempotency,
            )
            .await?;
        let (first, replayed) = match appended {
            Appended::New(records) => (records[0].stream.clone(), false),
            Appended::Duplicate { first_seq, .. } => {
                let r = self
                    .log
                    .read_from(first_seq, 1)
                    .map_err(|e| ApiError::internal("reading a replayed submission", e))?;
                (
                    r.first().map(|r| r.stream.clone()).unwrap_or_default(),
                    true,
                )
            }
        };
        let id = match first.parse::<StreamName>() {
            Ok(StreamName::Job(id)) => id,
            _ => {
                return Err(ApiError::internal(
                    "submission",
                    format!("unexpected stream {first}"),
                ));
            }
        };
        self.work.notify_waiters();
        Ok((self.job(&id)?, replayed))
    }

    /// Pins every module and dataset a submission names to what its name points at now, and
    /// checks what the job will need: the input blobs, module kinds, granted capabilities.
    fn resolve_modules(&self, submission: &mut JobSubmission) -> Result<(), ApiError> {
        let spec = match &mut submission.spec {
            JobSpec::Score(spec) => spec,
            JobSpec::Mine(spec) => {
                self.resolve_mine(spec)?;
                // Only an executor with a GPU may lease a job that asks for CUDA.
                if spec.device == twin_core::mine::ComputeDevice::Cuda {
                    submission.requirements.gpus = submission.requirements.gpus.max(1);
                }
                return Ok(());
            }
            JobSpec::BuildDataset(spec) => return self.resolve_build(spec),
            JobSpec::Eval(spec) => {
                self.resolve_eval(spec)?;
                if spec.device == twin_core::mine::ComputeDevice::Cuda {
                    submission.requirements.gpus = submission.requirements.gpus.max(1);
                }
                return Ok(());
            }
            JobSpec::Train(spec) => {
                self.resolve_train(spec)?;
                if spec.device == twin_core::mine::ComputeDevice::Cuda {
                    submission.requirements.gpus = submission.requirements.gpus.max(1);
                }
                return Ok(());
            }
            JobSpec::Ingest(_) => return Ok(()),
        };
        if !self.blobs.contains(&spec.rollouts) {
            return Err(crate::mining::invalid(
                "spec.rollouts",
                format!(
                    "no blob {}; upload the rollouts first (PUT /v1/blobs/{{hash}})",
                    spec.rollouts
                ),
            ));
        }
        self.resolve_reward(&mut spec.reward, &spec.grants)
    }

    /// Pins each reward module a spec names (one, or each term of a weighted sum) to its hash.
    pub(crate) fn resolve_reward(
        &self,
        reward: &mut twin_core::score::RewardSpec,
        grants: &twin_core::score::Grants,
    ) -> Result<(), ApiError> {
        let single = reward.module.is_some();
        for (i, (reference, slot)) in reward.references_mut().into_iter().enumerate() {
            let field = if single {
                "spec.reward.module".to_owned()
            } else {
                format!("spec.reward.weighted_sum[{i}].module")
            };
            *slot = Some(self.resolve_module_ref(reference, &field, "reward", grants)?);
        }
        Ok(())
    }

    /// Compiles, describes and registers a module (unless its bytes are registered already), then
    /// points `alias` at it. Nothing is stored or logged unless the module loads.
    pub async fn add_module(
        &self,
        by: Claimant<'_>,
        bytes: bytes::Bytes,
        alias: Option<String>,
    ) -> Result<(ModuleInfo, bool), ApiError> {
        let actor = by.name;
        if let Some(a) = &alias {
            check_module_name(a)?;
            self.check_alias_rights(a, by)?;
        }
        let hash = BlobHash::of(&bytes);
        let created = !self.read(|p| p.modules.contains_key(&hash));
        if created {
            let plugins = self.plugins.clone();
            let blobs = self.blobs.clone();
            let started = Instant::now();
            let module = tokio::task::spawn_blocking(move || {
                let module = plugins.load(&bytes).map_err(ApiError::Module)?;
                blobs.put(&bytes)?;
                Ok::<_, ApiError>(module)
            })
            .await
            .map_err(|e| ApiError::internal("module load task", e))??;
            tracing::info!(hash = %hash, name = %module.descriptor.name, ms = started.elapsed().as_millis() as u64, "module compiled");
            let event = ModuleRegistered {
                hash,
                size: module.size,
                kind: module.kind().as_str().into(),
                name: module.descriptor.name.clone(),
                version: module.descriptor.version.clone(),
                summary: module.descriptor.summary.clone(),
                parameters_schema: module.descriptor.parameters_schema.clone(),
                imports: module.imports.clone(),
                capabilities: module.capabilities.clone(),
            };
            self.record_once(
                actor,
                StreamName::Module(hash.to_hex()),
                Event::ModuleRegistered(event),
            )
            .await?;
        }
        let info = match alias {
            Some(a) => self.set_module_alias(by, &a, &hash.to_hex()).await?,
            None => self.module(&hash.to_hex())?,
        };
        Ok((info, created))
    }

    pub fn module(&self, reference: &str) -> Result<ModuleInfo, ApiError> {
        self.read(|p| p.resolve_module(reference).cloned())
            .ok_or_else(|| ApiError::NotFound {
                what: "module",
                id: reference.chars().take(80).collect(),
            })
    }

    /// Points registry name `alias` at a registered module; one event, so atomic for readers.
    pub async fn set_module_alias(
        &self,
        by: Claimant<'_>,
        alias: &str,
        hash: &str,
    ) -> Result<ModuleInfo, ApiError> {
        check_module_name(alias)?;
        self.check_alias_rights(alias, by)?;
        let hash: BlobHash = hash.parse().map_err(|_| ApiError::InvalidId {
            what: "module hash",
            value: hash.chars().take(80).collect(),
        })?;
        self.module(&hash.to_hex())?;
        self.point_alias(
            by.name,
            by,
            (Registry::Module, alias),
            |p| {
                (
                    p.aliases.get(alias).copied(),
                    p.alias_versions.get(alias).copied(),
                )
            },
            |previous| {
                Event::ModuleAliasSet(ModuleAliasSet {
                    alias: alias.to_owned(),
                    hash,
                    previous,
                })
            },
            hash,
        )
        .await?;
        self.module(&hash.to_hex())
    }

    /// Refuses `by` a shared name that someone else owns, unless `by` is an admin.
    pub(crate) fn check_owner(
        &self,
        registry: Registry,
        name: &str,
        by: Claimant<'_>,
    ) -> Result<(), ApiError> {
        if by.admin {
            return Ok(());
        }
        match self.read(|p| p.name_owner(registry, name).map(str::to_owned)) {
            Some(owner) if owner != by.name => Err(ApiError::NotOwner {
                what: registry.as_str(),
                name: name.to_owned(),
                owner,
            }),
            _ => Ok(()),
        }
    }

    /// The eval stage's default scorers grade every benchmark run: only an admin points them.
    fn check_alias_rights(&self, alias: &str, by: Claimant<'_>) -> Result<(), ApiError> {
        let default = [
            twin_core::eval::DEFAULT_PAIR_SCORER,
            twin_core::eval::DEFAULT_MULTI_SCORER,
        ];
        if default.contains(&alias) && !by.admin {
            return Err(ApiError::Forbidden {
                name: by.name.to_owned(),
                role: "admin",
            });
        }
        Ok(())
    }

    /// Appends the first event of a content-addressed stream (`module/<hash>`, `model/<hash>`).
    /// Losing the race to another registration of the same content is success: same content,
    /// same record.
    pub(crate) async fn record_once(
        &self,
        actor: &str,
        stream: StreamName,
        event: Event,
    ) -> Result<(), ApiError> {
        let expect = vec![(stream.to_string(), Expected::NoStream)];
        match self
            .append(actor, vec![(stream, event)], expect, None)
            .await
        {
            Ok(_) | Err(ApiError::Conflict(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Points a registry name (its own stream) at `hash` with one event, retrying when another
    /// switch of the same name wins the race. `current` reads what the name points at now and
    /// its stream's version; `event` makes the switch from the previous target.
    pub(crate) async fn point_alias(
        &self,
        actor: &str,
        by: Claimant<'_>,
        (registry, name): (Registry, &str),
        current: impl Fn(&Projections) -> (Option<BlobHash>, Option<u64>),
        event: impl Fn(Option<BlobHash>) -> Event,
        hash: BlobHash,
    ) -> Result<(), ApiError> {
        let stream = match registry {
            Registry::Model => StreamName::Model(name.to_owned()),
            _ => StreamName::Module(name.to_owned()),
        };
        for _ in 0..8 {
            let (previous, version) = self.read(&current);
            if previous == Some(hash) {
                return Ok(());
            }
            // Checked on every try: a name first taken by someone else since the last one is
            // theirs (its first event moved the version, so the append below would conflict).
            self.check_owner(registry, name, by)?;
            let expected = match version {
                Some(v) => Expected::Version(v),
                None => Expected::NoStream,
            };
            match self
                .append(
                    actor,
                    vec![(stream.clone(), event(previous))],
                    vec![(stream.to_string(), expected)],
                    None,
                )
                .await
            {
                Ok(_) => return Ok(()),
                Err(ApiError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(ApiError::Conflict(stream.to_string()))
    }

    pub async fn cancel(
        &self,
        actor: &str,
        id: &str,
        reason: Option<String>,
    ) -> Result<JobState, ApiError> {
        let id = parse_job_id(id)?;
        if let Some(r) = &reason {
            check_text("reason", r, text_limits::CANCEL_REASON)?;
        }
        let reason = reason.unwrap_or_else(|| format!("cancelled by {actor}"));
        self.execute(&id, actor, None, |_| JobCommand::Cancel {
            reason: reason.clone(),
        })
        .await
    }

    pub async fn create_experiment(
        &self,
        actor: &str,
        body: CreateExperiment,
    ) -> Result<twin_core::projection::Experiment, ApiError> {
        check_text(
            "description",
            &body.description,
            text_limits::EXPERIMENT_DESCRIPTION,
        )?;
        let id: ExperimentId = body.name.parse().map_err(|_| {
            ApiError::InvalidBody(format!(
                "name: `{}` must be 1 to 64 characters from a-z, 0-9, `-` and `_`",
                body.name
            ))
        })?;
        let stream = StreamName::Experiment(id.clone());
        let event = Event::ExperimentCreated(ExperimentCreated {
            id: id.clone(),
            name: body.name.clone(),
            description: body.description,
        });
        match self
            .append(
                actor,
                vec![(stream.clone(), event)],
                vec![(stream.to_string(), Expected::NoStream)],
                None,
            )
            .await
        {
            Ok(_) => {}
            Err(ApiError::Conflict(_)) => return Err(ApiError::ExperimentExists(body.name)),
            Err(e) => return Err(e),
        }
        self.read(|p| p.experiments.get(&id).cloned())
            .ok_or_else(|| ApiError::internal("experiment", "missing after append"))
    }

    // --- executor protocol ---

    /// Grants the best eligible job to an executor, waiting up to `wait_ms` for one.
    pub async fn lease(
        &self,
        actor: &str,
        req: LeaseRequest,
    ) -> Result<Option<LeaseGrant>, ApiError> {
        if req.executor.is_empty() || req.executor.len() > 128 {
            return Err(ApiError::InvalidBody(
                "executor: must be 1 to 128 bytes".into(),
            ));
        }
        self.executors.lock().insert(
            req.executor.clone(),
            ExecutorSeen {
                name: req.executor.clone(),
                actor: actor.to_owned(),
                capabilities: req.capabilities.clone(),
                last_seen: now_ms(),
            },
        );
        let deadline = tokio::time::Instant::now() + Duration::from_millis(req.wait_ms.min(30_000));
        loop {
            let notified = self.work.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(grant) = self.try_lease(actor, &req).await? {
                return Ok(Some(grant));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            // Also wake once a second: a job's retry backoff may have run out.
            let tick = tokio::time::Instant::now() + Duration::from_secs(1);
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline.min(tick)) => {}
            }
        }
    }

    fn candidates(&self, caps: &Capabilities, now: Millis) -> Vec<JobId> {
        self.read(|p| {
            let mut eligible: Vec<&JobState> = p
                .jobs
                .values()
                .filter(|j| j.status == twin_core::JobStatus::Queued)
                .filter(|j| j.not_before.is_none_or(|t| t <= now))
                .filter(|j| caps.kinds.contains(&j.kind))
                .filter(|j| j.submission.requirements.gpus <= caps.gpus)
                .filter(|j| j.submission.requirements.labels.is_subset(&caps.labels))
                .collect();
            // Highest priority first; ids are ULIDs, so ties go to the oldest submission.
            eligible.sort_by(|a, b| {
                b.submission
                    .priority
                    .cmp(&a.submission.priority)
                    .then(a.id.cmp(&b.id))
            });
            eligible
                .into_iter()
                .take(16)
                .map(|j| j.id.clone())
                .collect()
        })
    }

    async fn try_lease(
        &self,
        actor: &str,
        req: &LeaseRequest,
    ) -> Result<Option<LeaseGrant>, ApiError> {
        let now = now_ms();
        for id in self.candidates(&req.capabilities, now) {
            let leased = self
                .execute(&id, actor, None, |_| JobCommand::Lease {
                    executor: req.executor.clone(),
                    now,
                })
                .await;
            match leased {
                Ok(job) => {
                    self.leases
                        .lock()
                        .insert(id, (job.epoch, Instant::now() + self.lease_ttl));
                    return Ok(Some(LeaseGrant {
                        epoch: job.epoch,
                        lease_ttl_ms: self.lease_ttl.as_millis() as u64,
                        job,
                    }));
                }
                // Another executor got it first.
                Err(ApiError::Rejected(_)) | Err(ApiError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Drops a lease deadline unless a newer lease has replaced it meanwhile.
    fn forget_lease(&self, id: &JobId, epoch: u64) {
        let mut leases = self.leases.lock();
        if leases.get(id).is_some_and(|(e, _)| *e <= epoch) {
            leases.remove(id);
        }
    }

    /// Only the caller that took the lease may act on it.
    /// The caller holds `job`'s current lease, of `epoch`: for calls outside the job state
    /// machine (registering a checkpoint) that must be fenced as executor commands are.
    pub(crate) fn check_lease(
        &self,
        job: &JobState,
        epoch: u64,
        actor: &str,
    ) -> Result<(), ApiError> {
        Self::check_holder(job, epoch, actor)?;
        if !job.status.is_held() || job.epoch != epoch {
            return Err(if job.status.is_held() {
                ApiError::Rejected(twin_core::Rejection::StaleEpoch {
                    job: job.id.clone(),
                    given: epoch,
                    current: job.epoch,
                })
            } else {
                ApiError::Rejected(twin_core::Rejection::InvalidState {
                    job: job.id.clone(),
                    status: job.status.as_str(),
                    action: "register a checkpoint of",
                })
            });
        }
        Ok(())
    }

    fn check_holder(job: &JobState, epoch: u64, actor: &str) -> Result<(), ApiError> {
        match job.attempts.last() {
            Some(a) if job.status.is_held() && job.epoch == epoch && a.leased_by != actor => {
                Err(ApiError::NotLeaseHolder {
                    job: job.id.to_string(),
                    holder: a.leased_by.clone(),
                })
            }
            _ => Ok(()),
        }
    }

    pub fn heartbeat(&self, actor: &str, id: &str, epoch: u64) -> Result<bool, ApiError> {
        let id = parse_job_id(id)?;
        let job = self.job(&id)?;
        Self::check_holder(&job, epoch, actor)?;
        if !job.status.is_held() || job.epoch != epoch {
            self.metrics.stale_epoch_refusals.inc();
            tracing::warn!(job = %id, given = epoch, current = job.epoch, status = job.status.as_str(), "stale heartbeat refused");
            return Err(if job.status.is_held() {
                ApiError::Rejected(twin_core::Rejection::StaleEpoch {
                    job: id,
                    given: epoch,
                    current: job.epoch,
                })
            } else {
                ApiError::Rejected(twin_core::Rejection::InvalidState {
                    job: id,
                    status: job.status.as_str(),
                    action: "heartbeat",
                })
            });
        }
        self.leases
            .lock()
            .insert(id, (epoch, Instant::now() + self.lease_ttl));
        Ok(job.cancel_requested.is_some())
    }

    pub async fn job_command(
        &self,
        actor: &str,
        id: &str,
        command: JobCommand,
    ) -> Result<JobState, ApiError> {
        let id = parse_job_id(id)?;
        let epoch = match &command {
            JobCommand::Start { epoch }
            | JobCommand::Progress { epoch, .. }
            | JobCommand::RecordArtefact { epoch, .. }
            | JobCommand::Complete { epoch, .. }
            | JobCommand::Fail { epoch, .. }
            | JobCommand::ReleaseLease { epoch, .. }
            | JobCommand::RecordTraining { epoch, .. } => Some(*epoch),
            _ => None,
        };
        match &command {
            JobCommand::RecordArtefact { blob, .. } if !self.blobs.contains(blob) => {
                return Err(ApiError::InvalidBody(format!(
                    "blob: {blob} is not in the blob store; upload it first"
                )));
            }
            JobCommand::RecordTraining { record, .. } => {
                record.check_finite().map_err(ApiError::InvalidBody)?;
                let blobs: Vec<BlobHash> = match record.as_ref() {
                    TrainRecord::Step(s) => s.rollouts.into_iter().collect(),
                    TrainRecord::Validation(v) => vec![v.samples],
                };
                if let Some(missing) = blobs.iter().find(|b| !self.blobs.contains(b)) {
                    return Err(ApiError::InvalidBody(format!(
                        "{missing} is not in the blob store; upload it first"
                    )));
                }
            }
            JobCommand::Complete { output, .. } => {
                if let JobOutput::Ingest(o) = output.as_ref()
                    && !self.blobs.contains(&o.manifest)
                {
                    return Err(ApiError::InvalidBody(format!(
                        "output.manifest: {} is not in the blob store",
                        o.manifest
                    )));
                }
            }
            _ => {}
        }
        self.execute(&id, actor, epoch, |_| command.clone()).await
    }

    pub fn dataset_id() -> twin_core::DatasetId {
        mint_id().parse().expect("ULIDs are valid ids")
    }

    /// Expires every lapsed lease; returns how many.
    ///
    /// Held jobs without a deadline (a lease whose caller vanished before it was noted, say)
    /// get one first, so no job can stay held for ever.
    pub async fn reap(&self) -> usize {
        let now = Instant::now();
        // One scan of the held jobs serves both the lease deadlines and the runtime limits.
        let held: Vec<HeldJob> = self.read(|p| {
            p.jobs
                .values()
                .filter(|j| j.status.is_held())
                .map(|j| HeldJob {
                    id: j.id.clone(),
                    epoch: j.epoch,
                    kind: j.kind,
                    leased_at: j
                        .attempts
                        .last()
                        .filter(|a| a.epoch == j.epoch)
                        .map(|a| a.leased_at),
                })
                .collect()
        });
        let lapsed: Vec<(JobId, u64)> = {
            let mut leases = self.leases.lock();
            for HeldJob { id, epoch, .. } in &held {
                let epoch = *epoch;
                let entry = leases
                    .entry(id.clone())
                    .or_insert((epoch, now + self.lease_ttl));
                if entry.0 < epoch {
                    *entry = (epoch, now + self.lease_ttl);
                }
            }
            leases
                .iter()
                .filter(|(_, (_, deadline))| *deadline <= now)
                .map(|(id, (epoch, _))| (id.clone(), *epoch))
                .collect()
        };
        let mut expired = 0;
        for (id, epoch) in lapsed {
            // A heartbeat may have arrived since the scan.
            let still_lapsed = self
                .leases
                .lock()
                .get(&id)
                .is_some_and(|(e, d)| *e == epoch && *d <= Instant::now());
            if still_lapsed && self.expire_lease(&id, epoch, "lapsed").await {
                expired += 1;
            }
        }
        expired + self.time_out(&held).await
    }

    /// Fails every attempt that has run past its kind's limit, with `timeout` and no retry: a
    /// retry would spend the same budget again. The executor learns it at its next heartbeat
    /// (the lease is gone) and stops the stage.
    async fn time_out(&self, held: &[HeldJob]) -> usize {
        let Some(limits) = self.job_timeouts.get().filter(|l| !l.is_empty()) else {
            return 0;
        };
        let now = now_ms();
        let over = held.iter().filter_map(|j| {
            let limit = *limits.get(&j.kind)?;
            let ran = u128::try_from(now.saturating_sub(j.leased_at?)).unwrap_or(0);
            (ran > limit.as_millis()).then_some((j, limit))
        });
        let mut failed = 0;
        for (
            &HeldJob {
                ref id,
                epoch,
                kind,
                ..
            },
            limit,
        ) in over
        {
            let error = format!(
                "the attempt ran past the {kind} limit of {limit:?} (job_timeouts_s.{kind} in the \
                 server's config)"
            );
            let fail = |_: &JobState| JobCommand::Fail {
                epoch,
                error: error.clone(),
                retryable: false,
                code: FailureCode::Timeout,
                detail: None,
                now: now_ms(),
            };
            match self.execute(id, "system", None, fail).await {
                Ok(_) => {
                    tracing::warn!(job = %id, epoch, %kind, limit_s = limit.as_secs(), "job timed out");
                    failed += 1;
                }
                // It ended, or was re-leased, meanwhile.
                Err(ApiError::Rejected(_)) => {}
                Err(e) => tracing::warn!(job = %id, error = %e, "timing out a job failed"),
            }
        }
        failed
    }

    /// Expires at once every lease the executor named `executor` holds, and returns those jobs.
    /// For a caller that knows the executor is dead (the process supervisor saw its child exit):
    /// waiting out the TTL would only delay the retry. The expiry goes through the same
    /// `ExpireLease` command as the reaper's, so each attempt ends as `executor_lost` and the
    /// executor-loss limit applies. A lease that moved on meanwhile is left alone.
    pub async fn expire_leases_of(&self, executor: &str) -> Vec<JobId> {
        let held: Vec<(JobId, u64)> = self.read(|p| {
            p.jobs
                .values()
                .filter(|j| j.status.is_held())
                .filter(|j| {
                    j.attempts
                        .last()
                        .is_some_and(|a| a.epoch == j.epoch && a.executor == executor)
                })
                .map(|j| (j.id.clone(), j.epoch))
                .collect()
        });
        let mut expired = Vec::new();
        for (id, epoch) in held {
            if self.expire_lease(&id, epoch, "executor gone").await {
                expired.push(id);
            }
        }
        expired
    }

    /// Expires lease `epoch` of job `id` as the system; false when the job moved on.
    async fn expire_lease(&self, id: &JobId, epoch: u64, why: &'static str) -> bool {
        match self
            .execute(id, "system", None, |_| JobCommand::ExpireLease {
                epoch,
                now: now_ms(),
            })
            .await
        {
            Ok(after) => {
                self.metrics.lease_expiries.inc();
                tracing::warn!(job = %id, epoch, why, status = after.status.as_str(), "lease expired");
                true
            }
            Err(e) => {
                // The job moved on (finished, or a newer epoch): the deadline is stale.
                self.forget_lease(id, epoch);
                tracing::debug!(job = %id, error = %e, "lease not expired");
                false
            }
        }
    }

    pub fn executors(&self) -> Vec<ExecutorSeen> {
        self.executors.lock().values().cloned().collect()
    }

    // --- events ---

    /// One page of events from `from`; waits up to `wait` when there is nothing new.
    pub async fn events(
        &self,
        from: u64,
        prefix: Option<&str>,
        limit: usize,
        wait: Duration,
    ) -> Result<EventsPage, ApiError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut from = from.max(1);
        let mut rx = self.last_seq.clone();
        loop {
            let page = self.page(from, prefix, limit)?;
            if !page.events.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(page);
            }
            from = page.next;
            if page.last_seq < from {
                // Nothing past `from` yet: wait for the next durable batch.
                match tokio::time::timeout_at(deadline, rx.changed()).await {
                    Ok(Ok(())) => {}
                    // Timed out, or the log writer is gone: answer with what there is.
                    Ok(Err(_)) | Err(_) => return Ok(page),
                }
            }
        }
    }

    fn page(&self, from: u64, prefix: Option<&str>, limit: usize) -> Result<EventsPage, ApiError> {
        let scan = if prefix.is_some() { 4096 } else { limit };
        let records = self
            .log
            .read_from(from, scan)
            .map_err(|e| ApiError::internal("reading events", e))?;
        let mut next = from;
        let mut events = Vec::new();
        for r in &records {
            next = r.seq + 1;
            if prefix.is_some_and(|p| !r.stream.starts_with(p)) {
                continue;
            }
            events.push(
                r.recorded()
                    .map_err(|e| ApiError::internal("decoding an event", e))?,
            );
            if events.len() >= limit {
                break;
            }
        }
        Ok(EventsPage {
            events,
            next,
            last_seq: self.log.last_seq(),
        })
    }
}

fn check_module_name(name: &str) -> Result<(), ApiError> {
    if twin_core::score::valid_module_name(name) {
        Ok(())
    } else {
        Err(ApiError::InvalidId {
            what: "module name (1 to 64 of a-z, 0-9, `-`, `_`, not a hash)",
            value: name.chars().take(80).collect(),
        })
    }
}

pub fn parse_job_id(id: &str) -> Result<JobId, ApiError> {
    id.parse().map_err(|_| ApiError::InvalidId {
        what: "job id",
        value: id.chars().take(80).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::{self, TestRequest};

    #[actix_web::test]
    async fn a_panic_in_the_projections_makes_the_server_unhealthy_and_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let host = twin_plugins::Host::new(twin_plugins::HostConfig::default()).unwrap();
        let svc = Service::open(
            dir.path(),
            Duration::from_secs(30),
            Arc::new(Metrics::new()),
            Arc::new(host),
        )
        .unwrap();
        let experiment = |name: &str| CreateExperiment {
            name: name.into(),
            description: String::new(),
        };
        svc.create_experiment("t", experiment("before"))
            .await
            .unwrap();
        assert!(svc.health().is_ok());

        // The batch the subscriber would apply next, through the same guard, with an
        // application that panics (an injected projection bug).
        let records = svc.log.read_from(1, 10).unwrap();
        let applied = apply_batch(&svc.state, &svc.projection_failure, &records, |_, _| {
            panic!("injected")
        });
        assert_eq!(applied, None);
        let why = svc.health().unwrap_err().to_string();
        assert!(why.contains("seq 1 (injected)"), "{why}");

        let refused = svc.create_experiment("t", experiment("after")).await;
        assert!(
            matches!(refused, Err(ApiError::ProjectionsFailed(_))),
            "{refused:?}"
        );
        // Later batches are not applied to the stale state either.
        let again = apply_batch(&svc.state, &svc.projection_failure, &records, decode);
        assert_eq!(again, None);

        let auth = Arc::new(crate::auth::Auth::new(&[]).unwrap());
        let limits = crate::api::Limits {
            max_json_bytes: 1 << 16,
            max_blob_bytes: 1 << 16,
            storage_reserve_bytes: 0,
        };
        let app = test::init_service(crate::api::app(svc.clone(), auth, limits)).await;
        let resp = test::call_service(&app, TestRequest::get().uri("/healthz").to_request()).await;
        assert_eq!(resp.status(), 503);
        let body: twin_core::api::ErrorBody = test::read_body_json(resp).await;
        assert_eq!(body.error.code, "projections_failed");
        assert!(
            body.error.message.contains("a restart rebuilds them"),
            "{body:?}"
        );
        let resp = test::call_service(
            &app,
            TestRequest::post()
                .uri("/v1/experiments")
                .set_json(serde_json::json!({"name": "over-http"}))
                .to_request(),
        )
        .await;
        assert_eq!(resp.status(), 503);
        svc.close();
    }
}
