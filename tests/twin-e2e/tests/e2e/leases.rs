//! Leases, fencing, retries with backoff, and cancellation, against the real server.

use std::time::{Duration, Instant};

use serde_json::json;
use twin_client::Client;
use twin_core::api::{Capabilities, CompleteBody, FailBody, LeaseRequest};
use twin_core::event::{IngestOutput, JobOutput};
use twin_core::{BlobHash, JobKind, JobStatus};
use twin_e2e::{ExecutorProcess, Server, ingest_spec, text, twin};

use crate::wait_for;

fn lease_request(name: &str, wait_ms: u64) -> LeaseRequest {
    LeaseRequest {
        executor: name.into(),
        capabilities: Capabilities {
            kinds: [JobKind::Ingest].into(),
            ..Capabilities::default()
        },
        wait_ms,
    }
}

/// 600 small images: enough that an ingest is still running when the test acts on it.
fn big_sample(dir: &std::path::Path) {
    let args = [
        "--categories",
        "6",
        "--instances",
        "25",
        "--views",
        "4",
        "--size",
        "64",
    ];
    crate::sample(dir, &args);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_executor_loses_its_lease_and_its_late_completion_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    big_sample(&images);
    let server = Server::start(
        &tmp.path().join("data"),
        &["--no-executor", "--lease-ttl-ms", "1000"],
    );
    let client = Client::new(&server.url, None).unwrap();
    let spec = json!({"spec": {"kind": "ingest", "dataset": "big", "source": {"dir": images}}});
    let id = client.submit(&spec, None).await.unwrap().job.id.to_string();

    let executor = ExecutorProcess::start(&server.url, "doomed");
    let running = wait_for(
        &client,
        &id,
        Duration::from_secs(20),
        "the executor to start the job",
        |j| j.status == JobStatus::Running,
    )
    .await;
    assert_eq!(running.epoch, 1);
    executor.kill();

    let requeued = wait_for(
        &client,
        &id,
        Duration::from_secs(10),
        "the lease to expire",
        |j| j.status == JobStatus::Queued,
    )
    .await;
    assert_eq!(requeued.attempts[0].error.as_deref(), Some("lease expired"));
    let grant = client
        .lease(&lease_request("rescuer", 5_000))
        .await
        .unwrap()
        .expect("the job is leased again");
    assert_eq!(grant.epoch, 2);

    // The dead executor's completion (epoch 1) arriving late is refused and changes nothing.
    let manifest = client
        .put_blob(bytes::Bytes::from_static(b"{}\n"))
        .await
        .unwrap()
        .hash;
    let output = JobOutput::Ingest(IngestOutput {
        manifest,
        images: 1,
        instances: 1,
        categories: 1,
        rejected: vec![],
        rejected_total: 0,
    });
    let late = client
        .complete(
            &id,
            &CompleteBody {
                epoch: 1,
                output: output.clone(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(late.code(), Some("stale_epoch"), "{late}");
    let late = client.heartbeat(&id, 1).await.unwrap_err();
    assert_eq!(late.code(), Some("stale_epoch"), "{late}");
    let done = client
        .complete(&id, &CompleteBody { epoch: 2, output })
        .await
        .unwrap();
    assert_eq!(done.status, JobStatus::Succeeded);
    let metrics = client.metrics().await.unwrap();
    assert!(metrics.contains("twin_lease_expiries_total 1"), "{metrics}");
    assert!(
        metrics.contains("twin_stale_epoch_refusals_total 2"),
        "{metrics}"
    );
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failures_back_off_exponentially_until_attempts_run_out() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), &["--no-executor"]);
    let client = Client::new(&server.url, None).unwrap();
    let spec = json!({
        "spec": {"kind": "ingest", "dataset": "flaky", "source": {"dir": "/x"}},
        "retry": {"max_attempts": 3, "backoff_initial_ms": 400, "backoff_max_ms": 5000}
    });
    let id = client.submit(&spec, None).await.unwrap().job.id.to_string();
    let mut failed_at = Instant::now();
    for (attempt, min_wait_ms) in [(1u64, 0u64), (2, 400), (3, 800)] {
        let grant = client
            .lease(&lease_request("flaky", 5_000))
            .await
            .unwrap()
            .expect("a lease");
        let waited = failed_at.elapsed();
        assert_eq!(grant.epoch, attempt);
        assert!(
            waited >= Duration::from_millis(min_wait_ms.saturating_sub(50)),
            "attempt {attempt} came after {waited:?}, before its {min_wait_ms} ms backoff"
        );
        if attempt < 3 {
            assert!(
                client
                    .lease(&lease_request("flaky", 0))
                    .await
                    .unwrap()
                    .is_none(),
                "no lease during the backoff"
            );
        }
        client.start(&id, attempt).await.unwrap();
        let job = client
            .fail(
                &id,
                &FailBody {
                    epoch: attempt,
                    error: format!("flake {attempt}"),
                    retryable: true,
                    code: twin_core::FailureCode::Unavailable,
                    detail: None,
                },
            )
            .await
            .unwrap();
        failed_at = Instant::now();
        let expected = if attempt < 3 {
            JobStatus::Queued
        } else {
            JobStatus::Failed
        };
        assert_eq!(job.status, expected);
    }
    let job = client.job(&id).await.unwrap();
    let errors: Vec<_> = job
        .attempts
        .iter()
        .map(|a| a.error.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        errors,
        ["flake 1", "flake 2", "flake 3"],
        "every attempt's error is kept"
    );
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_reaches_a_running_executor() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    big_sample(&images);
    let server = Server::start(&tmp.path().join("data"), &["--lease-ttl-ms", "1500"]);
    let client = Client::new(&server.url, None).unwrap();
    let spec_path = ingest_spec(tmp.path(), "to-cancel", &images);
    let out = twin(&[
        "--server",
        &server.url,
        "--json",
        "submit",
        spec_path.to_str().unwrap(),
    ]);
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    wait_for(
        &client,
        &id,
        Duration::from_secs(20),
        "the job to run",
        |j| j.status == JobStatus::Running,
    )
    .await;
    let out = twin(&["--server", &server.url, "jobs", "cancel", &id]);
    assert!(out.status.success(), "{:?}", text(&out));
    let started = Instant::now();
    let out = twin(&[
        "--server",
        &server.url,
        "jobs",
        "wait",
        &id,
        "--timeout",
        "15",
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a cancelled job is not a success: {:?}",
        text(&out)
    );
    let job = client.job(&id).await.unwrap();
    assert_eq!(job.status, JobStatus::Cancelled);
    assert!(
        job.attempts[0]
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("cancelled"),
        "{:?}",
        job.attempts
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "cancellation took {:?}",
        started.elapsed()
    );
    server.stop();
}

#[test]
fn blob_hash_helper_matches_the_server() {
    // Guards the test helpers themselves: the client hashes what the server will check.
    assert_eq!(
        BlobHash::of(b"").to_hex(),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}
