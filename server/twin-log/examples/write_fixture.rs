//! Writes a schema fixture: a small log in this build's event schema (see
//! `tests/fixtures/README.md` for which build wrote which fixture).
//!
//! Run from the repository root: `cargo run -p twin-log --example write_fixture -- server/twin-log/tests/fixtures/log-vN`.
//! Run it only to start a new fixture for a new schema version; old fixtures stay committed as
//! they are, since their point is to be replayed by later builds. Extend the events below with
//! whatever the new version added, so the new fixture records it.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use twin_core::event::*;
use twin_core::spec::{IngestSource, IngestSpec, JobSpec, Requirements, RetryPolicy};
use twin_core::{BlobHash, JobSubmission, StreamName};
use twin_log::{AppendRequest, Log, LogConfig, new_event};

fn submission(dataset: &str, priority: i32, max_attempts: u32) -> JobSubmission {
    JobSubmission {
        experiment: Some("fixture".parse().unwrap()),
        priority,
        requirements: Requirements {
            gpus: 0,
            labels: ["cpu".to_owned()].into(),
        },
        retry: RetryPolicy {
            max_attempts,
            backoff_initial_ms: 100,
            backoff_max_ms: 1000,
        },
        spec: JobSpec::Ingest(IngestSpec {
            dataset: dataset.into(),
            source: IngestSource::Dir(format!("/data/{dataset}")),
        }),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: write_fixture DIR"));
    assert!(
        !dir.exists(),
        "{} exists; fixtures are never overwritten",
        dir.display()
    );
    let log = Log::open(
        LogConfig::new(twin_log::log_dir(&dir)),
        |_| {},
        Box::new(|_: &[_]| {}),
    )
    .unwrap();
    let manifest = BlobHash::of(b"fixture manifest");
    let j1: twin_core::JobId = "01fixturejob0000000000one".parse().unwrap();
    let j2: twin_core::JobId = "01fixturejob0000000000two".parse().unwrap();
    let j3: twin_core::JobId = "01fixturejob000000000lost".parse().unwrap();
    let d1: twin_core::DatasetId = "01fixturedataset00000000one".parse().unwrap();
    let exp = StreamName::Experiment("fixture".parse().unwrap());
    let s1 = StreamName::Job(j1.clone());
    let s2 = StreamName::Job(j2.clone());
    let s3 = StreamName::Job(j3.clone());
    let batches: Vec<Vec<(StreamName, Event)>> = vec![
        vec![(
            exp.clone(),
            Event::ExperimentCreated(ExperimentCreated {
                id: "fixture".parse().unwrap(),
                name: "fixture".into(),
                description: "schema fixture".into(),
            }),
        )],
        vec![(
            s1.clone(),
            Event::JobSubmitted(JobSubmitted {
                id: j1.clone(),
                submission: submission("mugs", 5, 3),
            }),
        )],
        vec![(
            s2.clone(),
            Event::JobSubmitted(JobSubmitted {
                id: j2.clone(),
                submission: submission("lamps", -1, 1),
            }),
        )],
        vec![(
            s1.clone(),
            Event::JobLeased(JobLeased {
                epoch: 1,
                executor: "gpu-a".into(),
            }),
        )],
        vec![(s1.clone(), Event::JobStarted(JobStarted { epoch: 1 }))],
        vec![(
            s1.clone(),
            Event::JobAttemptFailed(JobAttemptFailed {
                epoch: 1,
                error: "out of memory; lower batch_size".into(),
                retryable: true,
                retry_at: Some(1_000),
                code: twin_core::FailureCode::OutOfMemory,
                detail: Some("batch_size=64".into()),
            }),
        )],
        vec![(
            s1.clone(),
            Event::JobLeased(JobLeased {
                epoch: 2,
                executor: "gpu-b".into(),
            }),
        )],
        vec![(
            s1.clone(),
            Event::JobLeaseReleased(JobLeaseReleased {
                epoch: 2,
                reason: "executor shutting down".into(),
            }),
        )],
        vec![(
            s1.clone(),
            Event::JobLeased(JobLeased {
                epoch: 3,
                executor: "gpu-c".into(),
            }),
        )],
        vec![(s1.clone(), Event::JobStarted(JobStarted { epoch: 3 }))],
        vec![(
            s1.clone(),
            Event::JobProgress(JobProgress {
                epoch: 3,
                message: "half".into(),
                fraction: Some(0.5),
                counters: BTreeMap::from([("images".into(), 2.0)]),
            }),
        )],
        vec![(
            s1.clone(),
            Event::JobArtefactRecorded(JobArtefactRecorded {
                epoch: 3,
                name: "manifest".into(),
                blob: manifest,
                bytes: 16,
            }),
        )],
        vec![
            (
                s1.clone(),
                Event::JobSucceeded(JobSucceeded {
                    epoch: 3,
                    result: JobResult::Ingest(IngestResult {
                        dataset: d1.clone(),
                        output: IngestOutput {
                            manifest,
                            images: 4,
                            instances: 2,
                            categories: 1,
                            rejected: vec![RejectedFile {
                                path: "x.png".into(),
                                error: "cannot decode".into(),
                            }],
                            rejected_total: 1,
                        },
                    }),
                }),
            ),
            (
                StreamName::Dataset(d1.clone()),
                Event::DatasetRegistered(DatasetRegistered {
                    id: d1,
                    name: "mugs".into(),
                    job: j1,
                    manifest,
                    images: 4,
                    instances: 2,
                    categories: 1,
                }),
            ),
        ],
        vec![(
            s2.clone(),
            Event::JobCancelRequested(JobCancelRequested {
                reason: "no longer needed".into(),
            }),
        )],
        vec![(s2, Event::JobCancelled(JobCancelled { epoch: None }))],
        vec![(
            s3.clone(),
            Event::JobSubmitted(JobSubmitted {
                id: j3,
                submission: submission("vases", 0, 1),
            }),
        )],
        vec![(
            s3.clone(),
            Event::JobLeased(JobLeased {
                epoch: 1,
                executor: "gpu-a".into(),
            }),
        )],
        vec![(
            s3,
            Event::JobLeaseExpired(JobLeaseExpired {
                epoch: 1,
                retry_at: None,
            }),
        )],
    ];
    for batch in batches {
        let events = batch.iter().map(|(s, e)| new_event(s, e)).collect();
        log.append(AppendRequest {
            actor: "fixture-writer".into(),
            events,
            expect: vec![],
            idempotency: None,
        })
        .await
        .unwrap();
    }
    log.close();
    println!("wrote {}", dir.display());
}
