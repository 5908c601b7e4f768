//! The executor as its own process: a stage that aborts it cannot take the server down, SIGTERM
//! hands the job back, the token comes from a private file, and failure codes reach the CLI.

use std::time::{Duration, Instant};

use serde_json::json;
use twin_client::Client;
use twin_core::{FailureCode, JobStatus};
use twin_e2e::{ExecutorProcess, Server, text, twin};

use crate::wait_for;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_that_aborts_its_executor_is_failed_as_executor_lost_and_the_server_keeps_serving()
{
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    crate::small_sample(&images);
    // The child inherits the fault: every ingest aborts the executor process that runs it.
    let mut server = Server::start_with_env(
        &tmp.path().join("data"),
        &["--allowed-root", tmp.path().to_str().unwrap()],
        &[("TWIN_FAULT_ABORT_IN", "ingest")],
    );
    let client = Client::new(&server.url, None).unwrap();
    // More attempts than the loss limit: the limit, not the retry budget, ends the job.
    let spec = json!({
        "retry": {"max_attempts": 10, "backoff_initial_ms": 1, "backoff_max_ms": 1},
        "spec": {"kind": "ingest", "dataset": "doomed", "source": {"dir": images}},
    });
    let id = client.submit(&spec, None).await.unwrap().job.id.to_string();
    let failed = wait_for(
        &client,
        &id,
        Duration::from_secs(60),
        "the third executor loss to fail the job",
        |j| j.status.is_terminal(),
    )
    .await;
    assert_eq!(failed.status, JobStatus::Failed);
    assert_eq!(failed.attempts.len(), 3, "{:?}", failed.attempts);
    for a in &failed.attempts {
        assert_eq!(a.code, Some(FailureCode::ExecutorLost), "{a:?}");
    }
    assert!(server.alive(), "the server outlived every abort");

    // The server still serves, its executor child is back, and other kinds still run.
    // The listing (not only the JSON of `jobs show`) names the code.
    let out = twin(&["--server", &server.url, "jobs", "ls"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("failed (executor_lost)"), "{stdout}");
    // The supervisor counts the restart just after it re-queues (or fails) the job.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = client.metrics().await.unwrap();
        if metrics.contains("twin_executor_restarts_total 3") {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_the_job_back_counting_no_attempt() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    crate::small_sample(&images);
    let server = Server::start(&tmp.path().join("data"), &["--no-executor"]);
    let client = Client::new(&server.url, None).unwrap();
    // One attempt only: if the hand-back counted, the job could not run again.
    let spec = json!({
        "retry": {"max_attempts": 1},
        "spec": {"kind": "ingest", "dataset": "handed", "source": {"dir": images}},
    });
    let id = client.submit(&spec, None).await.unwrap().job.id.to_string();
    let first =
        ExecutorProcess::start_with_env(&server.url, "first", &[("TWIN_FAULT_STALL_IN", "ingest")]);
    wait_for(
        &client,
        &id,
        Duration::from_secs(30),
        "the job to run",
        |j| j.status == JobStatus::Running,
    )
    .await;
    let status = first.terminate(Duration::from_secs(20));
    assert!(
        status.success(),
        "the executor exits cleanly on SIGTERM: {status}"
    );
    let requeued = client.job(&id).await.unwrap();
    assert_eq!(
        requeued.status,
        JobStatus::Queued,
        "re-queued at once, no lease expiry"
    );
    assert!(requeued.attempts[0].released, "{:?}", requeued.attempts);

    let _second = ExecutorProcess::start(&server.url, "second");
    let done = wait_for(
        &client,
        &id,
        Duration::from_secs(60),
        "the job to finish",
        |j| j.status.is_terminal(),
    )
    .await;
    assert_eq!(done.status, JobStatus::Succeeded, "{:?}", done.attempts);
    assert_eq!(done.epoch, 2);
    server.stop();
}

#[test]
fn the_token_file_must_be_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, "secret\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let exec = ExecutorProcess::start_with_args(
        "http://127.0.0.1:9",
        "careless",
        &["--token-file", token.to_str().unwrap()],
        &[],
    );
    let status = exec.wait_exit(Duration::from_secs(10));
    assert!(!status.success(), "a world-readable token file is refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_executor_exits_when_asked_and_a_bad_input_code_reaches_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), &["--no-executor"]);
    let client = Client::new(&server.url, None).unwrap();
    let spec = json!({"spec": {"kind": "ingest", "dataset": "nothing", "source": {"dir": tmp.path().join("absent")}}});
    let id = client.submit(&spec, None).await.unwrap().job.id.to_string();
    let exec =
        ExecutorProcess::start_with_args(&server.url, "brief", &["--exit-when-idle", "1"], &[]);
    let failed = wait_for(
        &client,
        &id,
        Duration::from_secs(30),
        "the job to fail",
        |j| j.status.is_terminal(),
    )
    .await;
    assert_eq!(failed.status, JobStatus::Failed);
    assert_eq!(failed.attempts[0].code, Some(FailureCode::BadInput));
    let status = exec.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "an idle executor exits cleanly: {status}");
    // `jobs wait` on a failed job exits 1 naming the code.
    let out = twin(&["--server", &server.url, "jobs", "wait", &id]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        format!("{stdout}{stderr}").contains("failed (bad_input)"),
        "{stdout}{stderr}"
    );
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_server_has_its_executor_child_hand_the_job_back() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    crate::small_sample(&images);
    let data = tmp.path().join("data");
    let server = Server::start_with_env(
        &data,
        &["--allowed-root", tmp.path().to_str().unwrap()],
        &[("TWIN_FAULT_STALL_IN", "ingest")],
    );
    let client = Client::new(&server.url, None).unwrap();
    let spec = json!({
        "retry": {"max_attempts": 1},
        "spec": {"kind": "ingest", "dataset": "interrupted", "source": {"dir": images}},
    });
    let id = client.submit(&spec, None).await.unwrap().job.id.to_string();
    wait_for(
        &client,
        &id,
        Duration::from_secs(30),
        "the child to run the job",
        |j| j.status == JobStatus::Running,
    )
    .await;
    // SIGTERM to the server: its child hands the job back before the API goes away.
    server.stop();

    let server = Server::start(&data, &["--allowed-root", tmp.path().to_str().unwrap()]);
    let client = Client::new(&server.url, None).unwrap();
    let done = wait_for(
        &client,
        &id,
        Duration::from_secs(60),
        "the job to finish",
        |j| j.status.is_terminal(),
    )
    .await;
    assert_eq!(done.status, JobStatus::Succeeded, "{:?}", done.attempts);
    assert!(done.attempts[0].released, "{:?}", done.attempts);
    server.stop();
}
