//! Files a spec names: with no allowed roots (the default) `twin submit` uploads them and the
//! job runs; with roots, a path outside them, a device, a FIFO, a symlink out or a manifest line
//! reaching out is refused at submission naming the field, and the server stays up throughout.

use std::time::{Duration, Instant};

use serde_json::json;
use twin_client::Client;
use twin_core::JobStatus;
use twin_e2e::{Server, ingest_spec, text, twin};

use crate::wait_for;

/// The first image of a `<category>/<instance>/<image>` tree.
fn first_image(dir: &std::path::Path) -> std::path::PathBuf {
    let first_dir = |d: &std::path::Path| {
        let mut dirs: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        dirs.remove(0)
    };
    let instance = first_dir(&first_dir(dir));
    let mut files: Vec<_> = std::fs::read_dir(instance)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twin_submit_uploads_an_ingest_dir_to_a_server_with_no_roots() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    crate::small_sample(&images);
    let server = Server::start(&tmp.path().join("data"), &[]);
    let spec = ingest_spec(tmp.path(), "uploaded", &images);
    let out = twin(&[
        "--server",
        &server.url,
        "--json",
        "submit",
        spec.to_str().unwrap(),
        "--wait",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("uploading 8 images"), "{stderr}");
    let client = Client::new(&server.url, None).unwrap();
    let jobs = client.jobs(&Default::default()).await.unwrap();
    let job = jobs
        .iter()
        .find(|j| j.status == JobStatus::Succeeded)
        .expect("a job succeeded");
    // What the server got names blobs, not a path on this machine.
    let submitted = serde_json::to_value(&job.submission).unwrap();
    assert!(
        submitted["spec"]["source"]["blobs"].is_string(),
        "{submitted:#}"
    );
    let result = serde_json::to_value(&job.result).unwrap();
    assert_eq!(result["images"], 8, "{result:#}");
    server.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_outside_the_roots_devices_and_fifos_are_refused_and_the_server_stays_up() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let images = root.join("images");
    crate::small_sample(&images);
    let outside = tmp.path().join("outside");
    crate::small_sample(&outside);
    std::os::unix::fs::symlink(&outside, root.join("away")).unwrap();
    let fifo = root.join("fifo.jsonl");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let data = root.join("data");
    let server = Server::start(&data, &["--allowed-root", root.to_str().unwrap()]);
    let client = Client::new(&server.url, None).unwrap();
    // A blob of the server's own store, at its predictable path under the data directory.
    let blob = client.put_blob(b"{}".to_vec().into()).await.unwrap().hash;
    let hex = blob.to_hex();
    let blob_path = data.join(format!("blobs/sha256/{}/{hex}", &hex[..2]));
    let ingest = |source: serde_json::Value| json!({"spec": {"kind": "ingest", "dataset": "x", "source": source}});
    let started = Instant::now();
    let refused = [
        (
            ingest(json!({"manifest": "/dev/zero"})),
            "spec.source.manifest",
        ),
        (
            ingest(json!({"manifest": "/dev/ptmx"})),
            "spec.source.manifest",
        ),
        (ingest(json!({"manifest": fifo})), "spec.source.manifest"),
        (
            ingest(json!({"manifest": blob_path})),
            "spec.source.manifest",
        ),
        (ingest(json!({"dir": "/etc"})), "spec.source.dir"),
        (ingest(json!({"dir": root.join("away")})), "spec.source.dir"),
        (
            ingest(json!({"dir": root.join("../outside")})),
            "spec.source.dir",
        ),
        (
            json!({"spec": {"kind": "eval", "model": "/usr", "data": {"questions": "/etc/hostname"}}}),
            "spec.data.questions",
        ),
    ];
    for (spec, field) in refused {
        let e = client.submit(&spec, None).await.expect_err("refused");
        assert_eq!(e.code(), Some("invalid_spec"), "{spec}: {e}");
        assert!(e.to_string().contains(field), "{spec}: {e}");
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // A manifest under the root whose lines reach out of it is refused whole, naming the line
    // (the executor also rejects such a line unread when only it has roots: a unit test).
    let inside = first_image(&images);
    let manifest = root.join("m.jsonl");
    let line =
        |p: &std::path::Path| json!({"path": p, "instance": "i", "category": "c"}).to_string();
    for outside in [
        std::path::Path::new("/etc/hostname"),
        std::path::Path::new("/dev/zero"),
        blob_path.as_path(),
    ] {
        std::fs::write(&manifest, [line(&inside), line(outside)].join("\n")).unwrap();
        let e = client
            .submit(&ingest(json!({"manifest": manifest})), None)
            .await
            .expect_err("refused");
        assert_eq!(e.code(), Some("invalid_spec"), "{e}");
        assert!(
            e.to_string().contains("spec.source.manifest") && e.to_string().contains("line 2"),
            "{e}"
        );
    }
    // The same manifest with only the image inside is ingested.
    std::fs::write(&manifest, line(&inside)).unwrap();
    let done = ingest_to_the_end(&client, ingest(json!({"manifest": manifest}))).await;
    assert_eq!(done.status, JobStatus::Succeeded, "{done:?}");
    let out = serde_json::to_value(&done.result).unwrap();
    assert_eq!(out["images"], 1, "{out:#}");
    // The server is up and a directory under the root still ingests.
    let done = ingest_to_the_end(&client, ingest(json!({"dir": images}))).await;
    assert_eq!(done.status, JobStatus::Succeeded, "{done:?}");
    server.stop();
}

/// Submits `spec` and waits (30 s at most) for the job to end.
async fn ingest_to_the_end(
    client: &twin_client::Client,
    spec: serde_json::Value,
) -> twin_core::job::JobState {
    let id = client.submit(&spec, None).await.unwrap().job.id.to_string();
    wait_for(client, &id, Duration::from_secs(30), "the ingest", |j| {
        j.status.is_terminal()
    })
    .await
}
