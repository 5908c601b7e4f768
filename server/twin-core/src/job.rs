//! The job state machine: `decide(state, command) -> events` and `apply(state, event)`.
//!
//! States: queued → leased → running → succeeded | failed | cancelled, and back to queued when
//! an attempt fails (or its lease expires) with attempts left, or when its executor releases the
//! lease. Every lease bumps the job's `epoch`; executor commands carry the epoch of their lease
//! and anything but the current one is refused, which fences off an executor that lost its lease
//! but is still running.
//!
//! Epochs count leases, not attempts: `retry.max_attempts` and the backoff count only attempts
//! that ended in a failure or an expired lease, so a released lease costs the job nothing.

mod check;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::dataset::DatasetBuilt;
use crate::event::{
    BuildDatasetResult, DatasetRegistered, Event, IngestResult, JobArtefactRecorded,
    JobAttemptFailed, JobCancelRequested, JobCancelled, JobLeaseExpired, JobLeaseReleased,
    JobLeased, JobOutput, JobProgress, JobResult, JobStarted, JobSubmitted, JobSucceeded,
};
use crate::failure::FailureCode;
use crate::ids::{Actor, BlobHash, DatasetId, ExperimentId, JobId, Millis, StreamName};
use crate::spec::{JobKind, JobSpec, JobSubmission};
use crate::train::{TrainRecord, TrainStep, TrainValidation};

pub use check::IllegalTransition;

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Leased,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Queued,
        JobStatus::Leased,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }

    /// Held by an executor: its epoch is the one that may act.
    pub fn is_held(self) -> bool {
        matches!(self, JobStatus::Leased | JobStatus::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Leased => "leased",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// How many times a job's executor may be lost (its lease expires) before the job fails for
/// good, whatever `retry.max_attempts` allows. A job that kills its executor (a native crash,
/// the OOM killer, a hang) would otherwise take down one executor after another; three losses
/// tell such a job from a machine that happened to die under it.
pub const MAX_EXECUTOR_LOSSES: u32 = 3;

/// One lease of the job and how it ended.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Attempt {
    pub epoch: u64,
    pub executor: String,
    /// The actor (token name) that took the lease; only it may act on the attempt.
    pub leased_by: Actor,
    pub leased_at: Millis,
    pub started_at: Option<Millis>,
    pub ended_at: Option<Millis>,
    /// Why the attempt failed, if it did (a lease expiry reads "lease expired").
    pub error: Option<String>,
    /// What kind of failure ended the attempt (`executor_lost` for an expired lease); absent
    /// while it runs and when it succeeded, was cancelled or was released. Defaults keep
    /// documents written before codes existed readable.
    #[serde(default)]
    pub code: Option<FailureCode>,
    /// The failure's detail for programs (a module's own error code), when the executor gave one.
    #[serde(default)]
    pub detail: Option<String>,
    /// The executor gave the lease back unfinished; such an attempt counts against no limit.
    #[serde(default)]
    pub released: bool,
    /// Why it was released, as the executor said.
    #[serde(default)]
    pub release_reason: Option<String>,
}

impl Attempt {
    /// Whether the attempt ended in a failure or a lost lease (what `retry.max_attempts` counts).
    pub fn failed(&self) -> bool {
        self.code.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Progress {
    pub message: String,
    pub fraction: Option<f64>,
    pub counters: BTreeMap<String, f64>,
    pub at: Millis,
}

#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Artefact {
    pub name: String,
    pub blob: BlobHash,
    pub bytes: u64,
    pub epoch: u64,
}

/// The projection of one job stream.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct JobState {
    pub id: JobId,
    pub kind: JobKind,
    pub experiment: Option<ExperimentId>,
    pub submission: JobSubmission,
    pub status: JobStatus,
    /// Epoch of the latest lease; 0 before the first.
    pub epoch: u64,
    pub attempts: Vec<Attempt>,
    /// A queued job waiting out its retry backoff is not leased before this time.
    pub not_before: Option<Millis>,
    pub cancel_requested: Option<String>,
    pub progress: Option<Progress>,
    pub artefacts: Vec<Artefact>,
    pub result: Option<JobResult>,
    pub submitted_by: Actor,
    pub submitted_at: Millis,
    pub updated_at: Millis,
    /// Number of events in the job's stream (its stream version).
    pub version: u64,
}

/// An executor or user request against one job.
#[derive(Debug, Clone, PartialEq)]
pub enum JobCommand {
    Lease {
        executor: String,
        now: Millis,
    },
    Start {
        epoch: u64,
    },
    Progress {
        epoch: u64,
        message: String,
        fraction: Option<f64>,
        counters: BTreeMap<String, f64>,
    },
    RecordArtefact {
        epoch: u64,
        name: String,
        blob: BlobHash,
        bytes: u64,
    },
    /// `dataset` is minted by the caller for stages that register one.
    Complete {
        epoch: u64,
        /// Boxed: outputs are large and commands are passed by value.
        output: Box<JobOutput>,
        dataset: DatasetId,
    },
    Fail {
        epoch: u64,
        error: String,
        retryable: bool,
        code: FailureCode,
        detail: Option<String>,
        now: Millis,
    },
    ExpireLease {
        epoch: u64,
        now: Millis,
    },
    /// The executor gives the job back without a result or a failure (it is shutting down):
    /// queued again at once, no backoff, no attempt counted.
    ReleaseLease {
        epoch: u64,
        reason: String,
    },
    Cancel {
        reason: String,
    },
    /// A training run's step or validation (see [`crate::train`]).
    RecordTraining {
        epoch: u64,
        record: Box<TrainRecord>,
    },
}

impl JobCommand {
    fn name(&self) -> &'static str {
        match self {
            JobCommand::Lease { .. } => "lease",
            JobCommand::Start { .. } => "start",
            JobCommand::Progress { .. } => "progress",
            JobCommand::RecordArtefact { .. } => "record an artefact for",
            JobCommand::Complete { .. } => "complete",
            JobCommand::Fail { .. } => "fail",
            JobCommand::ExpireLease { .. } => "expire the lease of",
            JobCommand::ReleaseLease { .. } => "release the lease of",
            JobCommand::Cancel { .. } => "cancel",
            JobCommand::RecordTraining { .. } => "record training for",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("job {job}: epoch {given} is stale, the current lease has epoch {current}")]
    StaleEpoch {
        job: JobId,
        given: u64,
        current: u64,
    },
    #[error("job {job} is {status}: cannot {action} it")]
    InvalidState {
        job: JobId,
        status: &'static str,
        action: &'static str,
    },
    #[error("job {job} waits for its retry backoff until {not_before}")]
    NotYetEligible { job: JobId, not_before: Millis },
    #[error("job {job}: a {kind} job cannot complete with a {output} output")]
    WrongOutput {
        job: JobId,
        kind: JobKind,
        output: JobKind,
    },
}

/// Events that start a job's stream.
pub fn submit(id: JobId, submission: JobSubmission) -> Vec<(StreamName, Event)> {
    vec![(
        StreamName::Job(id.clone()),
        Event::JobSubmitted(JobSubmitted { id, submission }),
    )]
}

impl JobState {
    fn stream(&self) -> StreamName {
        StreamName::Job(self.id.clone())
    }

    fn invalid(&self, cmd: &JobCommand) -> Rejection {
        Rejection::InvalidState {
            job: self.id.clone(),
            status: self.status.as_str(),
            action: cmd.name(),
        }
    }

    fn check_epoch(&self, cmd: &JobCommand, epoch: u64) -> Result<(), Rejection> {
        if !self.status.is_held() {
            return Err(self.invalid(cmd));
        }
        if epoch != self.epoch {
            return Err(Rejection::StaleEpoch {
                job: self.id.clone(),
                given: epoch,
                current: self.epoch,
            });
        }
        Ok(())
    }

    /// Attempts that ended in a failure or a lost lease: what `retry.max_attempts` limits and
    /// the backoff grows with. Released attempts and the one in progress do not count.
    pub fn failed_attempts(&self) -> u32 {
        self.attempts.iter().filter(|a| a.failed()).count() as u32
    }

    /// Attempts whose executor was lost (see [`MAX_EXECUTOR_LOSSES`]).
    pub fn executor_losses(&self) -> u32 {
        self.attempts
            .iter()
            .filter(|a| a.code == Some(FailureCode::ExecutorLost))
            .count() as u32
    }

    /// When the current attempt, failing now with `code`, is retried; `None` when the failure
    /// is final: not retryable, attempts exhausted, or the executor lost once too often.
    fn retry_at(&self, code: FailureCode, retryable: bool, now: Millis) -> Option<Millis> {
        let retry = &self.submission.retry;
        let failed = self.failed_attempts() + 1;
        let lost = self.executor_losses() + u32::from(code == FailureCode::ExecutorLost);
        (retryable && failed < retry.max_attempts && lost < MAX_EXECUTOR_LOSSES)
            .then(|| now.saturating_add(retry.backoff_ms(failed) as i64))
    }

    /// Decides which events a command produces. Pure: same state and command, same events.
    pub fn decide(&self, cmd: JobCommand) -> Result<Vec<(StreamName, Event)>, Rejection> {
        let one = |e: Event| Ok(vec![(self.stream(), e)]);
        match cmd {
            JobCommand::Lease { ref executor, now } => {
                if self.status != JobStatus::Queued {
                    return Err(self.invalid(&cmd));
                }
                if let Some(not_before) = self.not_before.filter(|t| *t > now) {
                    return Err(Rejection::NotYetEligible {
                        job: self.id.clone(),
                        not_before,
                    });
                }
                one(Event::JobLeased(JobLeased {
                    epoch: self.epoch + 1,
                    executor: executor.clone(),
                }))
            }
            JobCommand::Start { epoch } => {
                self.check_epoch(&cmd, epoch)?;
                if self.status == JobStatus::Running {
                    return Ok(Vec::new()); // a retried start is a no-op
                }
                one(Event::JobStarted(JobStarted { epoch }))
            }
            JobCommand::Progress {
                epoch,
                ref message,
                fraction,
                ref counters,
            } => {
                self.check_epoch(&cmd, epoch)?;
                one(Event::JobProgress(JobProgress {
                    epoch,
                    message: message.clone(),
                    fraction,
                    counters: counters.clone(),
                }))
            }
            JobCommand::RecordArtefact {
                epoch,
                ref name,
                blob,
                bytes,
            } => {
                self.check_epoch(&cmd, epoch)?;
                // A stage that resumes after a lost lease records its finished phases again;
                // the same artefact is recorded once.
                if self
                    .artefacts
                    .iter()
                    .any(|a| a.name == *name && a.blob == blob)
                {
                    return Ok(Vec::new());
                }
                one(Event::JobArtefactRecorded(JobArtefactRecorded {
                    epoch,
                    name: name.clone(),
                    blob,
                    bytes,
                }))
            }
            JobCommand::Complete {
                epoch,
                ref output,
                ref dataset,
            } => {
                self.check_epoch(&cmd, epoch)?;
                // A cancellation, once acknowledged, is what the job ends as: the stage finished
                // before it looked again, and its output (an ingest's dataset with it) is dropped.
                if self.cancel_requested.is_some() {
                    return one(Event::JobCancelled(JobCancelled { epoch: Some(epoch) }));
                }
                match (&self.submission.spec, output.as_ref()) {
                    (JobSpec::Ingest(spec), JobOutput::Ingest(out)) => Ok(vec![
                        (
                            self.stream(),
                            Event::JobSucceeded(JobSucceeded {
                                epoch,
                                result: JobResult::Ingest(IngestResult {
                                    dataset: dataset.clone(),
                                    output: out.clone(),
                                }),
                            }),
                        ),
                        (
                            StreamName::Dataset(dataset.clone()),
                            Event::DatasetRegistered(DatasetRegistered {
                                id: dataset.clone(),
                                name: spec.dataset.clone(),
                                job: self.id.clone(),
                                manifest: out.manifest,
                                images: out.images,
                                instances: out.instances,
                                categories: out.categories,
                            }),
                        ),
                    ]),
                    (JobSpec::Score(_), JobOutput::Score(out)) => {
                        one(Event::JobSucceeded(JobSucceeded {
                            epoch,
                            result: JobResult::Score(out.clone()),
                        }))
                    }
                    (JobSpec::Mine(_), JobOutput::Mine(out)) => {
                        one(Event::JobSucceeded(JobSucceeded {
                            epoch,
                            result: JobResult::Mine(out.clone()),
                        }))
                    }
                    (JobSpec::Eval(_), JobOutput::Eval(out)) => {
                        one(Event::JobSucceeded(JobSucceeded {
                            epoch,
                            result: JobResult::Eval(out.clone()),
                        }))
                    }
                    (JobSpec::Train(_), JobOutput::Train(out)) => {
                        one(Event::JobSucceeded(JobSucceeded {
                            epoch,
                            result: JobResult::Train(out.clone()),
                        }))
                    }
                    (JobSpec::BuildDataset(spec), JobOutput::BuildDataset(out)) => Ok(vec![
                        (
                            self.stream(),
                            Event::JobSucceeded(JobSucceeded {
                                epoch,
                                result: JobResult::BuildDataset(BuildDatasetResult {
                                    dataset: dataset.clone(),
                                    output: out.clone(),
                                }),
                            }),
                        ),
                        (
                            StreamName::Dataset(dataset.clone()),
                            Event::DatasetBuilt(DatasetBuilt {
                                id: dataset.clone(),
                                hash: out.manifest,
                                name: spec.name.clone(),
                                job: self.id.clone(),
                                output: out.clone(),
                            }),
                        ),
                    ]),
                    (spec, output) => Err(Rejection::WrongOutput {
                        job: self.id.clone(),
                        kind: spec.kind(),
                        output: output.kind(),
                    }),
                }
            }
            JobCommand::Fail {
                epoch,
                ref error,
                retryable,
                code,
                ref detail,
                now,
            } => {
                self.check_epoch(&cmd, epoch)?;
                if self.cancel_requested.is_some() {
                    return one(Event::JobCancelled(JobCancelled { epoch: Some(epoch) }));
                }
                one(Event::JobAttemptFailed(JobAttemptFailed {
                    epoch,
                    error: error.clone(),
                    retryable,
                    retry_at: self.retry_at(code, retryable, now),
                    code,
                    detail: detail.clone(),
                }))
            }
            JobCommand::ExpireLease { epoch, now } => {
                self.check_epoch(&cmd, epoch)?;
                if self.cancel_requested.is_some() {
                    return one(Event::JobCancelled(JobCancelled { epoch: Some(epoch) }));
                }
                one(Event::JobLeaseExpired(JobLeaseExpired {
                    epoch,
                    retry_at: self.retry_at(FailureCode::ExecutorLost, true, now),
                }))
            }
            JobCommand::ReleaseLease { epoch, ref reason } => {
                self.check_epoch(&cmd, epoch)?;
                // As with a failure: the executor stopped, and a cancellation was asked for.
                if self.cancel_requested.is_some() {
                    return one(Event::JobCancelled(JobCancelled { epoch: Some(epoch) }));
                }
                one(Event::JobLeaseReleased(JobLeaseReleased {
                    epoch,
                    reason: reason.clone(),
                }))
            }
            JobCommand::RecordTraining { epoch, ref record } => {
                self.check_epoch(&cmd, epoch)?;
                if self.submission.kind() != JobKind::Train {
                    return Err(self.invalid(&cmd));
                }
                // The record's own epoch is the lease's: a resumed run's steps say which
                // attempt took them.
                one(match record.as_ref() {
                    TrainRecord::Step(s) => Event::TrainStep(TrainStep { epoch, ..s.clone() }),
                    TrainRecord::Validation(v) => {
                        Event::TrainValidation(TrainValidation { epoch, ..v.clone() })
                    }
                })
            }
            JobCommand::Cancel { ref reason } => match self.status {
                JobStatus::Queued => one(Event::JobCancelled(JobCancelled { epoch: None })),
                JobStatus::Leased | JobStatus::Running if self.cancel_requested.is_some() => {
                    Ok(Vec::new())
                }
                JobStatus::Leased | JobStatus::Running => {
                    one(Event::JobCancelRequested(JobCancelRequested {
                        reason: reason.clone(),
                    }))
                }
                _ => Err(self.invalid(&cmd)),
            },
        }
    }

    /// Starts a job's state from its first event.
    pub fn from_submitted(e: &JobSubmitted, actor: &str, ts: Millis) -> JobState {
        JobState {
            id: e.id.clone(),
            kind: e.submission.kind(),
            experiment: e.submission.experiment.clone(),
            submission: e.submission.clone(),
            status: JobStatus::Queued,
            epoch: 0,
            attempts: Vec::new(),
            not_before: None,
            cancel_requested: None,
            progress: None,
            artefacts: Vec::new(),
            result: None,
            submitted_by: actor.to_owned(),
            submitted_at: ts,
            updated_at: ts,
            version: 1,
        }
    }

    /// Ends the latest attempt at `ts`; `how` records the way it ended.
    fn end_attempt(&mut self, ts: Millis, how: impl FnOnce(&mut Attempt)) {
        if let Some(a) = self.attempts.last_mut() {
            a.ended_at = Some(ts);
            how(a);
        }
    }

    fn end_attempt_failed(
        &mut self,
        ts: Millis,
        error: &str,
        code: FailureCode,
        detail: Option<&String>,
    ) {
        self.end_attempt(ts, |a| {
            a.error = Some(error.to_owned());
            a.code = Some(code);
            a.detail = detail.cloned();
        });
    }

    fn after_failure(&mut self, retry_at: Option<Millis>) {
        self.progress = None;
        match retry_at {
            Some(t) => {
                self.status = JobStatus::Queued;
                self.not_before = Some(t);
            }
            None => self.status = JobStatus::Failed,
        }
    }

    /// Folds one event of this job's stream into the state.
    pub fn apply(&mut self, event: &Event, ts: Millis, actor: &str) {
        self.version += 1;
        self.updated_at = ts;
        match event {
            Event::JobLeased(e) => {
                self.status = JobStatus::Leased;
                self.epoch = e.epoch;
                self.not_before = None;
                self.attempts.push(Attempt {
                    epoch: e.epoch,
                    executor: e.executor.clone(),
                    leased_by: actor.to_owned(),
                    leased_at: ts,
                    started_at: None,
                    ended_at: None,
                    error: None,
                    code: None,
                    detail: None,
                    released: false,
                    release_reason: None,
                });
            }
            Event::JobStarted(_) => {
                self.status = JobStatus::Running;
                if let Some(a) = self.attempts.last_mut() {
                    a.started_at = Some(ts);
                }
            }
            Event::JobProgress(e) => {
                self.progress = Some(Progress {
                    message: e.message.clone(),
                    fraction: e.fraction,
                    counters: e.counters.clone(),
                    at: ts,
                });
            }
            Event::JobArtefactRecorded(e) => self.artefacts.push(Artefact {
                name: e.name.clone(),
                blob: e.blob,
                bytes: e.bytes,
                epoch: e.epoch,
            }),
            Event::JobSucceeded(e) => {
                self.status = JobStatus::Succeeded;
                self.result = Some(e.result.clone());
                self.end_attempt(ts, |_| {});
            }
            Event::JobAttemptFailed(e) => {
                self.end_attempt_failed(ts, &e.error, e.code, e.detail.as_ref());
                self.after_failure(e.retry_at);
            }
            Event::JobLeaseExpired(e) => {
                // The code is implied by the event: only a lost executor lets a lease lapse.
                self.end_attempt_failed(ts, "lease expired", FailureCode::ExecutorLost, None);
                self.after_failure(e.retry_at);
            }
            Event::JobLeaseReleased(e) => {
                self.end_attempt(ts, |a| {
                    a.released = true;
                    a.release_reason = Some(e.reason.clone());
                });
                self.progress = None;
                self.status = JobStatus::Queued;
                self.not_before = None;
            }
            Event::JobCancelRequested(e) => self.cancel_requested = Some(e.reason.clone()),
            Event::JobCancelled(e) => {
                if e.epoch.is_some() {
                    self.end_attempt(ts, |a| a.error = Some("cancelled".to_owned()));
                }
                self.status = JobStatus::Cancelled;
            }
            // Other streams' events never reach a job; JobSubmitted only starts one.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::IngestOutput;
    use crate::spec::{IngestSource, IngestSpec, Requirements, RetryPolicy};

    fn given(events: &[Event]) -> JobState {
        let Event::JobSubmitted(first) = &events[0] else {
            panic!("a job starts with job_submitted")
        };
        let mut s = JobState::from_submitted(first, "alice", 0);
        for (i, e) in events[1..].iter().enumerate() {
            s.apply(e, (i as i64 + 1) * 10, "executor");
        }
        s
    }

    /// Job `j1`, an ingest allowed `max_attempts`; shared with `check`'s tests.
    pub(super) fn submitted(max_attempts: u32) -> Event {
        Event::JobSubmitted(submission(max_attempts))
    }

    pub(super) fn submission(max_attempts: u32) -> JobSubmitted {
        JobSubmitted {
            id: "j1".parse().expect("valid id"),
            submission: JobSubmission {
                experiment: None,
                priority: 0,
                requirements: Requirements::default(),
                retry: RetryPolicy {
                    max_attempts,
                    backoff_initial_ms: 100,
                    backoff_max_ms: 1000,
                },
                spec: JobSpec::Ingest(IngestSpec {
                    dataset: "d".into(),
                    source: IngestSource::Dir("/x".into()),
                }),
            },
        }
    }

    pub(super) fn leased(epoch: u64) -> Event {
        Event::JobLeased(JobLeased {
            epoch,
            executor: "gpu-1".into(),
        })
    }

    fn events_of(r: Result<Vec<(StreamName, Event)>, Rejection>) -> Vec<Event> {
        r.expect("accepted").into_iter().map(|(_, e)| e).collect()
    }

    fn output() -> JobOutput {
        JobOutput::Ingest(IngestOutput {
            manifest: BlobHash::of(b"m"),
            images: 2,
            instances: 1,
            categories: 1,
            rejected: vec![],
            rejected_total: 0,
        })
    }

    #[test]
    fn a_queued_job_is_leased_with_the_next_epoch() {
        let s = given(&[submitted(3)]);
        let got = events_of(s.decide(JobCommand::Lease {
            executor: "gpu-1".into(),
            now: 5,
        }));
        assert_eq!(got, vec![leased(1)]);
    }

    #[test]
    fn a_stale_epoch_is_refused_for_every_executor_command() {
        let s = given(&[
            submitted(3),
            leased(1),
            Event::JobLeaseExpired(JobLeaseExpired {
                epoch: 1,
                retry_at: Some(0),
            }),
            leased(2),
        ]);
        for cmd in [
            JobCommand::Start { epoch: 1 },
            JobCommand::Progress {
                epoch: 1,
                message: "x".into(),
                fraction: None,
                counters: BTreeMap::new(),
            },
            JobCommand::Complete {
                epoch: 1,
                output: Box::new(output()),
                dataset: "d1".parse().expect("id"),
            },
            JobCommand::Fail {
                epoch: 1,
                error: "x".into(),
                retryable: true,
                code: FailureCode::Unavailable,
                detail: None,
                now: 0,
            },
            JobCommand::ReleaseLease {
                epoch: 1,
                reason: "x".into(),
            },
        ] {
            assert_eq!(
                s.decide(cmd),
                Err(Rejection::StaleEpoch {
                    job: s.id.clone(),
                    given: 1,
                    current: 2
                })
            );
        }
    }

    #[test]
    fn a_retryable_failure_requeues_with_exponential_backoff_until_attempts_run_out() {
        let fail = |epoch| JobCommand::Fail {
            epoch,
            error: format!("boom {epoch}"),
            retryable: true,
            code: FailureCode::Unavailable,
            detail: None,
            now: 1000,
        };
        let s = given(&[submitted(2), leased(1)]);
        let e1 = events_of(s.decide(fail(1)));
        assert_eq!(
            e1,
            vec![Event::JobAttemptFailed(JobAttemptFailed {
                epoch: 1,
                error: "boom 1".into(),
                retryable: true,
                retry_at: Some(1100),
                code: FailureCode::Unavailable,
                detail: None,
            })]
        );
        let s = given(&[submitted(2), leased(1), e1[0].clone()]);
        assert_eq!((s.status, s.not_before), (JobStatus::Queued, Some(1100)));
        assert!(matches!(
            s.decide(JobCommand::Lease {
                executor: "e".into(),
                now: 1099
            }),
            Err(Rejection::NotYetEligible { .. })
        ));
        let s = given(&[submitted(2), leased(1), e1[0].clone(), leased(2)]);
        let e2 = events_of(s.decide(fail(2)));
        let s = given(&[
            submitted(2),
            leased(1),
            e1[0].clone(),
            leased(2),
            e2[0].clone(),
        ]);
        assert_eq!(s.status, JobStatus::Failed);
        let errors: Vec<_> = s.attempts.iter().map(|a| a.error.clone()).collect();
        assert_eq!(
            errors,
            vec![Some("boom 1".into()), Some("boom 2".into())],
            "every attempt's error is kept"
        );
    }

    #[test]
    fn a_non_retryable_failure_is_final_at_once() {
        let s = given(&[submitted(5), leased(1)]);
        let e = events_of(s.decide(JobCommand::Fail {
            epoch: 1,
            error: "bad input".into(),
            retryable: false,
            code: FailureCode::BadInput,
            detail: None,
            now: 0,
        }));
        assert_eq!(
            given(&[submitted(5), leased(1), e[0].clone()]).status,
            JobStatus::Failed
        );
    }

    #[test]
    fn cancelling_a_queued_job_ends_it_and_a_running_one_asks_its_executor() {
        let cancel = || JobCommand::Cancel {
            reason: "user".into(),
        };
        assert_eq!(
            events_of(given(&[submitted(1)]).decide(cancel())),
            vec![Event::JobCancelled(JobCancelled { epoch: None })]
        );
        let running = [
            submitted(1),
            leased(1),
            Event::JobStarted(JobStarted { epoch: 1 }),
        ];
        let e = events_of(given(&running).decide(cancel()));
        assert_eq!(
            e,
            vec![Event::JobCancelRequested(JobCancelRequested {
                reason: "user".into()
            })]
        );
        let mut with_request = running.to_vec();
        with_request.push(e[0].clone());
        let s = given(&with_request);
        assert_eq!(
            events_of(s.decide(cancel())),
            vec![],
            "a second cancel is a no-op"
        );
        let stop = events_of(s.decide(JobCommand::Fail {
            epoch: 1,
            error: "stopped".into(),
            retryable: true,
            code: FailureCode::Unclassified,
            detail: None,
            now: 0,
        }));
        assert_eq!(
            stop,
            vec![Event::JobCancelled(JobCancelled { epoch: Some(1) })]
        );
    }

    #[test]
    fn an_expired_lease_counts_as_an_attempt() {
        let s = given(&[submitted(1), leased(1)]);
        let e = events_of(s.decide(JobCommand::ExpireLease { epoch: 1, now: 0 }));
        assert_eq!(
            e,
            vec![Event::JobLeaseExpired(JobLeaseExpired {
                epoch: 1,
                retry_at: None
            })]
        );
    }

    #[test]
    fn completing_an_ingest_registers_its_dataset() {
        let s = given(&[submitted(1), leased(1)]);
        let e = s
            .decide(JobCommand::Complete {
                epoch: 1,
                output: Box::new(output()),
                dataset: "d1".parse().expect("id"),
            })
            .expect("ok");
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].0.to_string(), "dataset/d1");
        assert!(
            matches!(e[1].1, Event::DatasetRegistered(ref d) if d.images == 2 && d.name == "d")
        );
    }

    #[test]
    fn a_job_whose_cancellation_was_acknowledged_cannot_succeed() {
        let s = given(&[
            submitted(1),
            leased(1),
            Event::JobCancelRequested(JobCancelRequested { reason: "x".into() }),
        ]);
        let e = events_of(s.decide(JobCommand::Complete {
            epoch: 1,
            output: Box::new(output()),
            dataset: "d1".parse().expect("id"),
        }));
        // Cancelled, and no dataset registered.
        assert_eq!(
            e,
            vec![Event::JobCancelled(JobCancelled { epoch: Some(1) })]
        );
    }

    #[test]
    fn finished_jobs_refuse_everything() {
        let done = [
            submitted(1),
            leased(1),
            Event::JobCancelled(JobCancelled { epoch: Some(1) }),
        ];
        let s = given(&done);
        assert!(matches!(
            s.decide(JobCommand::Cancel { reason: "x".into() }),
            Err(Rejection::InvalidState { .. })
        ));
        assert!(matches!(
            s.decide(JobCommand::Start { epoch: 1 }),
            Err(Rejection::InvalidState { .. })
        ));
    }

    fn expired(epoch: u64, retry_at: Option<Millis>) -> Event {
        Event::JobLeaseExpired(JobLeaseExpired { epoch, retry_at })
    }

    fn released(epoch: u64) -> Event {
        Event::JobLeaseReleased(JobLeaseReleased {
            epoch,
            reason: "executor shutting down".into(),
        })
    }

    fn release(epoch: u64) -> JobCommand {
        JobCommand::ReleaseLease {
            epoch,
            reason: "executor shutting down".into(),
        }
    }

    /// `events` followed by what `cmd` decides on them.
    fn then(events: &[Event], cmd: JobCommand) -> Vec<Event> {
        let mut all = events.to_vec();
        all.extend(events_of(given(events).decide(cmd)));
        all
    }

    #[test]
    fn a_failure_records_its_code_and_detail_in_the_event_and_the_attempt() {
        let history = [submitted(3), leased(1)];
        let e = events_of(given(&history).decide(JobCommand::Fail {
            epoch: 1,
            error: "reward module trapped".into(),
            retryable: false,
            code: FailureCode::ModuleError,
            detail: Some("guest_trap".into()),
            now: 0,
        }));
        assert_eq!(
            e,
            vec![Event::JobAttemptFailed(JobAttemptFailed {
                epoch: 1,
                error: "reward module trapped".into(),
                retryable: false,
                retry_at: None,
                code: FailureCode::ModuleError,
                detail: Some("guest_trap".into()),
            })]
        );
        let s = given(&[submitted(3), leased(1), e[0].clone()]);
        let a = &s.attempts[0];
        assert_eq!(
            (
                a.error.as_deref(),
                a.code,
                a.detail.as_deref(),
                a.ended_at.is_some()
            ),
            (
                Some("reward module trapped"),
                Some(FailureCode::ModuleError),
                Some("guest_trap"),
                true
            )
        );
    }

    #[test]
    fn an_expired_lease_ends_its_attempt_as_executor_lost() {
        let history = then(
            &[submitted(3), leased(1)],
            JobCommand::ExpireLease { epoch: 1, now: 0 },
        );
        let s = given(&history);
        assert_eq!(s.status, JobStatus::Queued);
        let a = &s.attempts[0];
        assert_eq!(
            (a.error.as_deref(), a.code, a.detail.as_deref()),
            (Some("lease expired"), Some(FailureCode::ExecutorLost), None)
        );
        assert_eq!((s.failed_attempts(), s.executor_losses()), (1, 1));
    }

    #[test]
    fn the_third_lost_executor_fails_the_job_even_with_attempts_left() {
        let expire = |epoch| JobCommand::ExpireLease { epoch, now: 1000 };
        // Given a job allowed ten attempts whose executor was lost twice, with an ordinary
        // failure in between (which is not a loss and does not reset the count)…
        let mut history = then(&[submitted(10), leased(1)], expire(1));
        history.push(leased(2));
        history = then(
            &history,
            JobCommand::Fail {
                epoch: 2,
                error: "flake".into(),
                retryable: true,
                code: FailureCode::Unavailable,
                detail: None,
                now: 1000,
            },
        );
        history.push(leased(3));
        history = then(&history, expire(3));
        assert!(
            matches!(history.last(), Some(Event::JobLeaseExpired(e)) if e.retry_at.is_some()),
            "the second loss is retried: {history:?}"
        );
        history.push(leased(4));
        // …when its lease expires a third time…
        let e = events_of(given(&history).decide(expire(4)));
        // …then the expiry is final and the job fails as executor_lost.
        assert_eq!(e, vec![expired(4, None)]);
        history.extend(e);
        let s = given(&history);
        assert_eq!(s.status, JobStatus::Failed);
        assert_eq!(s.executor_losses(), MAX_EXECUTOR_LOSSES);
        assert_eq!(
            s.attempts.last().and_then(|a| a.code),
            Some(FailureCode::ExecutorLost)
        );
    }

    #[test]
    fn a_released_lease_requeues_at_once_and_costs_no_attempt() {
        let running = [
            submitted(1),
            leased(1),
            Event::JobStarted(JobStarted { epoch: 1 }),
        ];
        // When the executor releases its lease…
        let e = events_of(given(&running).decide(release(1)));
        assert_eq!(e, vec![released(1)]);
        let mut history = running.to_vec();
        history.extend(e);
        // …then the job is queued with no backoff, the attempt is kept as released…
        let s = given(&history);
        assert_eq!((s.status, s.not_before), (JobStatus::Queued, None));
        let a = &s.attempts[0];
        assert!(a.released && a.ended_at.is_some(), "{a:?}");
        assert_eq!((a.error.as_deref(), a.code), (None, None));
        assert_eq!(a.release_reason.as_deref(), Some("executor shutting down"));
        assert_eq!(s.failed_attempts(), 0);
        // …and the next lease, at once, gets the next epoch.
        let next = events_of(s.decide(JobCommand::Lease {
            executor: "gpu-2".into(),
            now: 0,
        }));
        assert_eq!(
            next,
            vec![Event::JobLeased(JobLeased {
                epoch: 2,
                executor: "gpu-2".into(),
            })]
        );
    }

    #[test]
    fn releases_count_toward_neither_max_attempts_nor_the_backoff() {
        let history = then(&[submitted(1), leased(1)], release(1));
        let mut history = then(&[history, vec![leased(2)]].concat(), release(2));
        history.push(leased(3));
        let s = given(&history);
        assert_eq!((s.epoch, s.attempts.len(), s.failed_attempts()), (3, 3, 0));
        // Its one real attempt fails: retryable, but that was its one attempt.
        let fail = |s: &JobState| {
            events_of(s.decide(JobCommand::Fail {
                epoch: s.epoch,
                error: "boom".into(),
                retryable: true,
                code: FailureCode::Unavailable,
                detail: None,
                now: 1000,
            }))
        };
        assert!(matches!(&fail(&s)[..], [Event::JobAttemptFailed(f)] if f.retry_at.is_none()));

        // With two attempts allowed, the first failure after releases backs off by the first
        // step (100 ms), not by one step per lease.
        let two = [
            &[submitted(2), leased(1), released(1), leased(2), released(2)][..],
            &[leased(3)],
        ]
        .concat();
        assert!(matches!(&fail(&given(&two))[..],
            [Event::JobAttemptFailed(f)] if f.retry_at == Some(1100)));
    }

    #[test]
    fn only_a_held_job_can_be_released_and_only_under_its_epoch() {
        let s = given(&[submitted(3), leased(1), expired(1, Some(0)), leased(2)]);
        assert_eq!(
            s.decide(release(1)),
            Err(Rejection::StaleEpoch {
                job: s.id.clone(),
                given: 1,
                current: 2
            })
        );
        let queued = given(&[submitted(3)]);
        let requeued = given(&[submitted(3), leased(1), released(1)]);
        let succeeded = given(&[
            submitted(3),
            leased(1),
            Event::JobSucceeded(JobSucceeded {
                epoch: 1,
                result: JobResult::Ingest(IngestResult {
                    dataset: "d1".parse().expect("id"),
                    output: match output() {
                        JobOutput::Ingest(o) => o,
                        _ => unreachable!("output() is an ingest"),
                    },
                }),
            }),
        ]);
        let failed = given(&[submitted(1), leased(1), expired(1, None)]);
        for (s, status) in [
            (queued, "queued"),
            (requeued, "queued"),
            (succeeded, "succeeded"),
            (failed, "failed"),
        ] {
            assert_eq!(
                s.decide(release(1)),
                Err(Rejection::InvalidState {
                    job: s.id.clone(),
                    status,
                    action: "release the lease of"
                })
            );
        }
    }

    #[test]
    fn releasing_a_job_whose_cancellation_was_requested_cancels_it() {
        let s = given(&[
            submitted(3),
            leased(1),
            Event::JobCancelRequested(JobCancelRequested {
                reason: "user".into(),
            }),
        ]);
        assert_eq!(
            events_of(s.decide(release(1))),
            vec![Event::JobCancelled(JobCancelled { epoch: Some(1) })]
        );
    }
}
