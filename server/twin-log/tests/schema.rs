//! Stored-format contracts: logs written by earlier builds (committed under `tests/fixtures`,
//! made by `examples/write_fixture.rs`) still replay, and a schema change is read through an
//! upcaster without rewriting a byte of them.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use twin_core::event::{DecodeError, JobAttemptFailed, Upcaster, decode_versioned, encode_payload};
use twin_core::{Event, EventSchema, FailureCode, JobStatus, Projections};
use twin_log::LogReader;

/// Copies a fixture (opening sled writes to its directory; the committed copy stays pristine).
fn fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.path().is_dir() {
                copy(&e.path(), &to.join(e.file_name()))
            } else {
                std::fs::copy(e.path(), to.join(e.file_name()))
                    .map(|_| ())
                    .unwrap()
            }
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    copy(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
        &dir,
    );
    (tmp, dir)
}

/// Replays a fixture with this build, every record checked against the hash chain.
fn replay(dir: &Path) -> Projections {
    let reader = LogReader::open(dir).unwrap();
    let mut state = Projections::default();
    for r in reader.verified() {
        state.apply(&r.unwrap().recorded().unwrap());
    }
    state
}

#[test]
fn the_committed_v1_log_replays_with_this_build() {
    let (_tmp, dir) = fixture("log-v1");
    let state = replay(&dir);
    assert_eq!(state.last_seq, 14);
    assert!(state.anomalies.is_empty(), "{:?}", state.anomalies);
    let one = &state.jobs[&"01fixturejob0000000000one".parse().unwrap()];
    assert_eq!(
        (one.status, one.epoch, one.attempts.len()),
        (JobStatus::Succeeded, 2, 2)
    );
    // Written before failure codes (job_attempt_failed v1): read as unclassified, message intact.
    let first = &one.attempts[0];
    assert_eq!(
        (first.error.as_deref(), first.code, first.detail.as_deref()),
        (Some("device lost"), Some(FailureCode::Unclassified), None)
    );
    assert_eq!(
        (one.attempts[1].error.as_deref(), one.attempts[1].code),
        (None, None),
        "the attempt that succeeded has no failure"
    );
    assert_eq!(one.failed_attempts(), 1);
    assert_eq!(one.submission.priority, 5);
    let two = &state.jobs[&"01fixturejob0000000000two".parse().unwrap()];
    assert_eq!(two.status, JobStatus::Cancelled);
    let dataset = state.datasets.values().next().unwrap();
    assert_eq!((dataset.name.as_str(), dataset.images), ("mugs", 4));
    assert_eq!(state.experiments.values().next().unwrap().jobs.len(), 2);
}

#[test]
fn the_v1_attempt_failure_is_a_v1_record_read_through_the_production_upcaster() {
    let (_tmp, dir) = fixture("log-v1");
    let reader = LogReader::open(&dir).unwrap();
    let failed: Vec<_> = reader
        .verified()
        .map(Result::unwrap)
        .filter(|r| r.event_type == "job_attempt_failed")
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(
        failed[0].schema_version, 1,
        "the fixture predates failure codes"
    );
    let event = Event::decode("job_attempt_failed", 1, &failed[0].payload).unwrap();
    assert_eq!(
        event,
        Event::JobAttemptFailed(JobAttemptFailed {
            epoch: 1,
            error: "device lost".into(),
            retryable: true,
            retry_at: Some(1_000),
            code: FailureCode::Unclassified,
            detail: None,
        })
    );
}

#[test]
fn the_committed_v2_log_replays_with_this_build() {
    let (_tmp, dir) = fixture("log-v2");
    let versions: Vec<(String, u16)> = LogReader::open(&dir)
        .unwrap()
        .verified()
        .map(|r| r.map(|r| (r.event_type, r.schema_version)).unwrap())
        .filter(|(t, _)| t == "job_attempt_failed" || t == "job_lease_released")
        .collect();
    assert_eq!(
        versions,
        [
            ("job_attempt_failed".to_owned(), 2),
            ("job_lease_released".to_owned(), 1)
        ]
    );
    let state = replay(&dir);
    assert_eq!(state.last_seq, 19);
    assert!(state.anomalies.is_empty(), "{:?}", state.anomalies);

    // A failure with its code and detail, a released lease, then the attempt that succeeded.
    let one = &state.jobs[&"01fixturejob0000000000one".parse().unwrap()];
    assert_eq!(
        (
            one.status,
            one.epoch,
            one.attempts.len(),
            one.failed_attempts()
        ),
        (JobStatus::Succeeded, 3, 3, 1)
    );
    let oom = &one.attempts[0];
    assert_eq!(
        (oom.code, oom.detail.as_deref(), oom.error.as_deref()),
        (
            Some(FailureCode::OutOfMemory),
            Some("batch_size=64"),
            Some("out of memory; lower batch_size")
        )
    );
    let released = &one.attempts[1];
    assert!(released.released && released.error.is_none() && released.code.is_none());
    assert_eq!(
        released.release_reason.as_deref(),
        Some("executor shutting down")
    );

    // An expired lease with no attempts left: failed, its executor lost.
    let lost = &state.jobs[&"01fixturejob000000000lost".parse().unwrap()];
    assert_eq!(lost.status, JobStatus::Failed);
    assert_eq!(lost.attempts[0].code, Some(FailureCode::ExecutorLost));
    assert_eq!(lost.attempts[0].error.as_deref(), Some("lease expired"));
}

// --- A schema change, as a later build would make it ---
//
// Version 2 of `job_submitted` replaces the integer `priority` with a named `priority_class`
// and lifts `retry.max_attempts` to the top as `max_attempts`.

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct SubmissionV2 {
    priority_class: String,
    max_attempts: u32,
    spec: serde_json::Value,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct JobSubmittedV2 {
    id: String,
    submission: SubmissionV2,
}

fn job_submitted_v1_to_v2(mut doc: serde_json::Value) -> Result<serde_json::Value, String> {
    let sub = doc
        .get_mut("submission")
        .and_then(|s| s.as_object_mut())
        .ok_or("no submission")?;
    let priority = sub
        .remove("priority")
        .and_then(|p| p.as_i64())
        .ok_or("no priority")?;
    let class = if priority > 0 {
        "high"
    } else if priority < 0 {
        "low"
    } else {
        "normal"
    };
    let attempts = sub
        .get("retry")
        .and_then(|r| r.get("max_attempts"))
        .cloned()
        .ok_or("no retry.max_attempts")?;
    sub.insert("priority_class".into(), class.into());
    sub.insert("max_attempts".into(), attempts);
    Ok(doc)
}

const UPCASTERS_V2: &[Upcaster] = &[Upcaster {
    event_type: "job_submitted",
    from_version: 1,
    upcast: job_submitted_v1_to_v2,
}];

#[test]
fn a_schema_change_reads_the_v1_log_through_its_upcaster() {
    let (_tmp, dir) = fixture("log-v1");
    let reader = LogReader::open(&dir).unwrap();
    let submitted: Vec<JobSubmittedV2> = reader
        .verified()
        .map(Result::unwrap)
        .filter(|r| r.event_type == "job_submitted")
        .map(|r| {
            assert_eq!(r.schema_version, 1, "the fixture was written at v1");
            decode_versioned(&r.event_type, r.schema_version, 2, &r.payload, UPCASTERS_V2).unwrap()
        })
        .collect();
    let got: Vec<_> = submitted
        .iter()
        .map(|s| {
            (
                s.submission.priority_class.as_str(),
                s.submission.max_attempts,
            )
        })
        .collect();
    assert_eq!(got, [("high", 3), ("low", 1)]);
    assert_eq!(submitted[0].submission.spec["dataset"], "mugs");

    // A v2 payload written by the later build decodes directly, without the upcaster.
    let v2 = encode_payload(&submitted[0]);
    let direct: JobSubmittedV2 = decode_versioned("job_submitted", 2, 2, &v2, &[]).unwrap();
    assert_eq!(direct, submitted[0]);

    // Without its upcaster a v1 record is refused by name rather than misread.
    let r = reader
        .verified()
        .map(Result::unwrap)
        .find(|r| r.event_type == "job_submitted")
        .unwrap();
    let err = decode_versioned::<JobSubmittedV2>(&r.event_type, 1, 2, &r.payload, &[]).unwrap_err();
    assert_eq!(
        err,
        DecodeError::NoUpcaster {
            event_type: "job_submitted".into(),
            version: 1
        }
    );
}
