//! Whether a logged event is a transition the job state machine allows: the audit's side of
//! [`JobState::decide`].
//!
//! `twin replay` folds the log with `apply`, which trusts every event. A log rewritten with a
//! valid chain (or written by a buggy server) could hold a success for a job never leased, or one
//! at a stale epoch, and the fold would accept it. [`JobState::check`] holds each event to the
//! shape of the state machine: which states it may follow, the epoch fencing, the job's kind and
//! its retry budget. It does not hold events to every policy `decide` applies today (when a
//! retry is due, a cancellation winning over a late completion), since those change between
//! versions and a log written by an older, correct server must stay legal.

use crate::event::{Event, JobCancelled, JobResult};
use crate::ids::JobId;
use crate::spec::JobKind;

use super::{JobState, JobStatus};

/// An event the state machine could not have produced from the job's state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job {job}: illegal {event} while {status} at epoch {epoch}: {reason}")]
pub struct IllegalTransition {
    pub job: JobId,
    pub event: &'static str,
    pub status: &'static str,
    pub epoch: u64,
    pub reason: String,
}

impl JobState {
    /// Checks that `event`, the next one of this job's stream, is a transition from this state.
    pub fn check(&self, event: &Event) -> Result<(), IllegalTransition> {
        let illegal = |reason: String| IllegalTransition {
            job: self.id.clone(),
            event: event.event_type(),
            status: self.status.as_str(),
            epoch: self.epoch,
            reason,
        };
        let held = |epoch: u64| {
            if !self.status.is_held() {
                Err(illegal("the job holds no lease".into()))
            } else if epoch != self.epoch {
                Err(illegal(format!("epoch {epoch} is not the current lease's")))
            } else {
                Ok(())
            }
        };
        match event {
            Event::JobSubmitted(_) => Err(illegal("the job was already submitted".into())),
            Event::JobLeased(e) => {
                if self.status != JobStatus::Queued {
                    Err(illegal("only a queued job is leased".into()))
                } else if e.epoch != self.epoch + 1 {
                    Err(illegal(format!(
                        "a lease takes the next epoch, {}, not {}",
                        self.epoch + 1,
                        e.epoch
                    )))
                } else {
                    Ok(())
                }
            }
            Event::JobStarted(e) => {
                held(e.epoch)?;
                if self.status == JobStatus::Running {
                    return Err(illegal("the attempt had already started".into()));
                }
                Ok(())
            }
            Event::JobProgress(e) => held(e.epoch),
            Event::JobArtefactRecorded(e) => held(e.epoch),
            Event::TrainStep(_) | Event::TrainValidation(_) if self.kind != JobKind::Train => {
                Err(illegal(format!("a {} job records no training", self.kind)))
            }
            Event::TrainStep(e) => held(e.epoch),
            Event::TrainValidation(e) => held(e.epoch),
            Event::JobSucceeded(e) => {
                held(e.epoch)?;
                let produced = result_kind(&e.result);
                if produced != self.kind {
                    return Err(illegal(format!(
                        "a {} job cannot succeed with a {produced} result",
                        self.kind
                    )));
                }
                Ok(())
            }
            Event::JobAttemptFailed(e) => {
                held(e.epoch)?;
                if e.retry_at.is_some() && !e.retryable {
                    return Err(illegal("a failure not retryable was retried".into()));
                }
                self.check_retry(e.retry_at.is_some()).map_err(illegal)
            }
            Event::JobLeaseExpired(e) => {
                held(e.epoch)?;
                self.check_retry(e.retry_at.is_some()).map_err(illegal)
            }
            Event::JobLeaseReleased(e) => held(e.epoch),
            Event::JobCancelRequested(_) => {
                if !self.status.is_held() {
                    return Err(illegal(
                        "only a leased or running job is asked to stop".into(),
                    ));
                }
                Ok(())
            }
            Event::JobCancelled(JobCancelled { epoch: None }) => {
                if self.status != JobStatus::Queued {
                    return Err(illegal(
                        "only a queued job is cancelled without a lease".into(),
                    ));
                }
                Ok(())
            }
            Event::JobCancelled(JobCancelled { epoch: Some(epoch) }) => {
                held(*epoch)?;
                if self.cancel_requested.is_none() {
                    return Err(illegal("no cancellation was requested".into()));
                }
                Ok(())
            }
            other => Err(illegal(format!(
                "{} is not a job event",
                other.event_type()
            ))),
        }
    }

    /// A retried attempt must leave the job attempts under `retry.max_attempts`.
    fn check_retry(&self, retried: bool) -> Result<(), String> {
        let failed = self.failed_attempts() + 1;
        let max = self.submission.retry.max_attempts;
        if retried && failed >= max {
            return Err(format!(
                "retried after failed attempt {failed} of at most {max}"
            ));
        }
        Ok(())
    }
}

fn result_kind(result: &JobResult) -> JobKind {
    match result {
        JobResult::Ingest(_) => JobKind::Ingest,
        JobResult::Score(_) => JobKind::Score,
        JobResult::Mine(_) => JobKind::Mine,
        JobResult::BuildDataset(_) => JobKind::BuildDataset,
        JobResult::Eval(_) => JobKind::Eval,
        JobResult::Train(_) => JobKind::Train,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{
        IngestOutput, IngestResult, JobAttemptFailed, JobCancelRequested, JobStarted, JobSucceeded,
    };
    use crate::failure::FailureCode;
    use crate::job::tests::{leased, submission, submitted};

    fn started(epoch: u64) -> Event {
        Event::JobStarted(JobStarted { epoch })
    }

    fn succeeded(epoch: u64) -> Event {
        Event::JobSucceeded(JobSucceeded {
            epoch,
            result: JobResult::Ingest(IngestResult {
                dataset: "d1".parse().expect("valid id"),
                output: IngestOutput {
                    manifest: crate::BlobHash::of(b"m"),
                    images: 1,
                    instances: 1,
                    categories: 1,
                    rejected: vec![],
                    rejected_total: 0,
                },
            }),
        })
    }

    fn failed(epoch: u64, retried: bool) -> Event {
        Event::JobAttemptFailed(JobAttemptFailed {
            epoch,
            error: "boom".into(),
            retryable: true,
            retry_at: retried.then_some(100),
            code: FailureCode::Timeout,
            detail: None,
        })
    }

    /// Given a job allowed `max_attempts` and the events after its submission (each checked as it
    /// is applied), `event` is legal, or illegal for a reason containing `expect`.
    fn check(max_attempts: u32, history: &[Event], event: Event, expect: Option<&str>) {
        let mut state = JobState::from_submitted(&submission(max_attempts), "alice", 0);
        for e in history {
            state
                .check(e)
                .unwrap_or_else(|err| panic!("the history is legal: {err}"));
            state.apply(e, 10, "executor");
        }
        match (state.check(&event), expect) {
            (Ok(()), None) => {}
            (Err(err), Some(why)) => assert!(err.to_string().contains(why), "{err}"),
            (got, want) => panic!("{event:?}: got {got:?}, wanted illegal: {want:?}"),
        }
    }

    #[test]
    fn a_job_that_fails_then_succeeds_is_legal() {
        check(
            2,
            &[
                leased(1),
                started(1),
                failed(1, true),
                leased(2),
                started(2),
            ],
            succeeded(2),
            None,
        );
    }

    #[test]
    fn a_success_without_a_lease_is_illegal() {
        check(1, &[], succeeded(1), Some("holds no lease"));
    }

    #[test]
    fn a_success_at_a_stale_epoch_is_illegal() {
        check(
            2,
            &[leased(1), failed(1, true), leased(2), started(2)],
            succeeded(1),
            Some("epoch 1 is not the current lease's"),
        );
    }

    #[test]
    fn nothing_follows_the_end() {
        check(
            1,
            &[leased(1), succeeded(1)],
            succeeded(1),
            Some("no lease"),
        );
        check(
            1,
            &[Event::JobCancelled(JobCancelled { epoch: None })],
            leased(1),
            Some("only a queued job"),
        );
    }

    #[test]
    fn a_lease_takes_the_next_epoch_once() {
        check(1, &[], leased(2), Some("the next epoch, 1, not 2"));
        check(1, &[leased(1)], leased(2), Some("only a queued job"));
        check(
            1,
            &[leased(1), started(1)],
            started(1),
            Some("already started"),
        );
    }

    #[test]
    fn a_retry_beyond_the_budget_is_illegal() {
        check(2, &[leased(1)], failed(1, true), None);
        check(1, &[leased(1)], failed(1, true), Some("of at most 1"));
        check(1, &[leased(1)], failed(1, false), None);
    }

    #[test]
    fn a_cancellation_with_a_lease_needs_a_request() {
        let cancelled = || Event::JobCancelled(JobCancelled { epoch: Some(1) });
        check(
            1,
            &[leased(1)],
            cancelled(),
            Some("no cancellation was requested"),
        );
        let request = Event::JobCancelRequested(JobCancelRequested { reason: "x".into() });
        check(1, &[leased(1), request], cancelled(), None);
    }

    #[test]
    fn a_second_submission_is_illegal() {
        check(1, &[], submitted(1), Some("already submitted"));
    }
}
