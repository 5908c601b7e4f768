//! A property test of the job state machine: random command sequences, from any party and at any
//! epoch, never take a job through a transition the audit would call illegal, and keep its
//! invariants (epochs only grow, one attempt per lease, a held job has exactly one open attempt,
//! an ended job stays ended, an acknowledged cancellation is never overtaken by a success).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use proptest::prelude::*;
use twin_core::event::{IngestOutput, JobOutput, JobSubmitted};
use twin_core::spec::{IngestSource, IngestSpec, JobSpec, Requirements, RetryPolicy};
use twin_core::{FailureCode, JobCommand, JobState, JobStatus, JobSubmission, StreamName};

/// A command in the abstract: which one, and the epoch it names relative to the job's.
#[derive(Debug, Clone)]
enum Op {
    Lease,
    Start(i8),
    Progress(i8),
    Complete(i8),
    Fail(i8, bool, FailureCode),
    Expire(i8),
    Release(i8),
    Cancel,
}

fn op() -> impl Strategy<Value = Op> {
    let epoch = -1i8..=1;
    let code = prop::sample::select(FailureCode::ALL.to_vec());
    prop_oneof![
        3 => Just(Op::Lease),
        2 => epoch.clone().prop_map(Op::Start),
        1 => epoch.clone().prop_map(Op::Progress),
        2 => epoch.clone().prop_map(Op::Complete),
        2 => (epoch.clone(), any::<bool>(), code).prop_map(|(e, r, c)| Op::Fail(e, r, c)),
        2 => epoch.clone().prop_map(Op::Expire),
        1 => epoch.prop_map(Op::Release),
        1 => Just(Op::Cancel),
    ]
}

fn command(op: &Op, state: &JobState, now: i64) -> JobCommand {
    let at = |d: i8| state.epoch.saturating_add_signed(i64::from(d));
    match op {
        Op::Lease => JobCommand::Lease {
            executor: "x".into(),
            now,
        },
        Op::Start(d) => JobCommand::Start { epoch: at(*d) },
        Op::Progress(d) => JobCommand::Progress {
            epoch: at(*d),
            message: "m".into(),
            fraction: Some(0.5),
            counters: Default::default(),
        },
        Op::Complete(d) => JobCommand::Complete {
            epoch: at(*d),
            output: Box::new(JobOutput::Ingest(IngestOutput {
                manifest: twin_core::BlobHash::of(b"m"),
                images: 1,
                instances: 1,
                categories: 1,
                rejected: Vec::new(),
                rejected_total: 0,
            })),
            dataset: "d1".parse().unwrap(),
        },
        Op::Fail(d, retryable, code) => JobCommand::Fail {
            epoch: at(*d),
            error: "e".into(),
            retryable: *retryable,
            code: *code,
            detail: None,
            now,
        },
        Op::Expire(d) => JobCommand::ExpireLease { epoch: at(*d), now },
        Op::Release(d) => JobCommand::ReleaseLease {
            epoch: at(*d),
            reason: "r".into(),
        },
        Op::Cancel => JobCommand::Cancel { reason: "c".into() },
    }
}

fn submitted(max_attempts: u32) -> JobSubmitted {
    JobSubmitted {
        id: "j1".parse().unwrap(),
        submission: JobSubmission {
            experiment: None,
            priority: 0,
            requirements: Requirements::default(),
            retry: RetryPolicy {
                max_attempts,
                backoff_initial_ms: 5,
                backoff_max_ms: 20,
            },
            spec: JobSpec::Ingest(IngestSpec {
                dataset: "d".into(),
                source: IngestSource::Dir("/x".into()),
            }),
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_commands_keep_the_job_state_machines_invariants(
        max_attempts in 1u32..4,
        ops in prop::collection::vec((op(), 0i64..30), 1..60),
    ) {
        let mut state = JobState::from_submitted(&submitted(max_attempts), "alice", 0);
        let mut now = 0i64;
        let mut cancel_acknowledged = false;
        for (op, dt) in &ops {
            now += dt;
            let before = state.clone();
            let Ok(events) = state.decide(command(op, &state, now)) else {
                continue;
            };
            // The job's own events; a registration on a dataset stream is not the job's.
            let job = state.id.clone();
            let own = events
                .iter()
                .filter(|(stream, _)| matches!(stream, StreamName::Job(id) if *id == job));
            for (_, event) in own {
                // Whatever the machine decides, the audit accepts.
                prop_assert!(state.check(event).is_ok(), "{:?} after {:?}: {:?}", event, op, state.check(event));
                state.apply(event, now, "x");
            }
            if before.status.is_terminal() {
                prop_assert_eq!(&state, &before, "an ended job changed on {:?}", op);
            }
            prop_assert!(state.epoch >= before.epoch);
            prop_assert_eq!(state.attempts.len() as u64, state.epoch, "one attempt per lease");
            let open = state.attempts.iter().filter(|a| a.ended_at.is_none()).count();
            prop_assert_eq!(open, usize::from(state.status.is_held()), "{:?}", state.status);
            if state.epoch > before.epoch {
                prop_assert_eq!(before.status, JobStatus::Queued, "leased from {:?}", before.status);
            }
            prop_assert!(state.failed_attempts() <= max_attempts);
            cancel_acknowledged |= state.cancel_requested.is_some();
            if cancel_acknowledged {
                prop_assert_ne!(state.status, JobStatus::Succeeded);
            }
        }
    }
}
