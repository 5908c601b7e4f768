//! SIGKILL during a burst of concurrent submissions loses no acknowledged job.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use twin_client::{Client, JobFilter};
use twin_e2e::{Server, text, twin};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_job_survives_a_kill_during_a_burst() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data, &["--no-executor"]);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for w in 0..16 {
        let (url, acked) = (server.url.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            let client = Client::new(&url, None).unwrap();
            for i in 0.. {
                let spec = json!({"spec": {"kind": "ingest", "dataset": format!("w{w}-{i}"), "source": {"dir": "/tmp/x"}}});
                match client.submit(&spec, None).await {
                    Ok(s) => acked.lock().unwrap().push(s.job.id.to_string()),
                    Err(_) => return, // the server is gone
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill();
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 50,
        "the burst acknowledged only {} jobs",
        acked.len()
    );

    let server = Server::start(&data, &["--no-executor"]);
    let client = Client::new(&server.url, None).unwrap();
    let present: std::collections::HashSet<String> = client
        .jobs(&JobFilter {
            limit: Some(10_000),
            ..JobFilter::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id.to_string())
        .collect();
    let lost: Vec<_> = acked.iter().filter(|id| !present.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged jobs lost: {lost:?}",
        lost.len(),
        acked.len()
    );
    server.stop();
    let out = twin(&["replay", "--data-dir", data.to_str().unwrap(), "--verify"]);
    assert!(out.status.success(), "{:?}", text(&out));
}
