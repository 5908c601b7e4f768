//! A user's session: sample data, ingest through the CLI, watch, list, stop, audit offline.

use std::time::Duration;

use twin_e2e::{Server, eventually, ingest_spec, text, twin};

#[test]
fn ingest_through_the_cli_then_audit_the_log_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    crate::sample(
        &images,
        &[
            "--categories",
            "3",
            "--instances",
            "4",
            "--views",
            "3",
            "--corrupt",
            "1",
        ],
    );
    let data = tmp.path().join("data");
    let server = Server::start(&data, &[]);
    let url = server.url.clone();
    let spec = ingest_spec(tmp.path(), "sample", &images);

    let out = twin(&["--server", &url, "submit", spec.to_str().unwrap(), "--wait"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("succeeded"), "{stdout}");
    assert!(
        stdout.contains("cannot decode"),
        "the corrupt file is reported: {stdout}"
    );
    let job_id = stdout.split_whitespace().nth(2).unwrap().to_owned();

    let (ls, _) = text(&twin(&["--server", &url, "jobs", "ls"]));
    assert!(ls.contains(&job_id) && ls.contains("succeeded"), "{ls}");
    let (datasets, _) = text(&twin(&["--server", &url, "--json", "dataset", "ls"]));
    let datasets: serde_json::Value = serde_json::from_str(&datasets).unwrap();
    let ingested = &datasets["ingested"];
    assert_eq!(ingested[0]["images"], 36, "{datasets}");
    assert_eq!(ingested[0]["instances"], 12);
    assert_eq!(datasets["built"], serde_json::json!([]), "{datasets}");
    let manifest = ingested[0]["manifest"].as_str().unwrap().to_owned();
    let (events, _) = text(&twin(&[
        "--server", &url, "events", "tail", "--prefix", "job/",
    ]));
    for kind in [
        "job_submitted",
        "job_leased",
        "job_started",
        "job_artefact_recorded",
        "job_succeeded",
    ] {
        assert!(events.contains(kind), "{kind} missing from:\n{events}");
    }
    // Following with Server-Sent Events delivers the backlog and keeps the stream open.
    let mut follow = std::process::Command::new(twin_e2e::bin("twin"))
        .args(["--server", &url, "events", "tail", "-f", "--from", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = std::io::BufReader::new(follow.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut reader, &mut first).unwrap();
    assert!(first.contains("job_submitted"), "{first}");
    follow.kill().unwrap();
    let _ = follow.wait();

    // The job's own lineage, online.
    let (lineage, _) = text(&twin(&["--server", &url, "lineage", &manifest]));
    assert!(lineage.contains(&job_id), "{lineage}");
    // The chain head, written down for the audit below.
    let (anchor, _) = text(&twin(&["--server", &url, "log", "head"]));
    let anchor = anchor.trim().to_owned();
    let (anchor_seq, _) = anchor.split_once(':').unwrap();
    server.stop();

    // The audit only reads the data dir: made read-only (which stops no one in CI, as root),
    // every file keeps its bytes and modification time.
    let before = files(&data);
    set_writable(&data, false);
    let out = twin(&[
        "replay",
        "--data-dir",
        data.to_str().unwrap(),
        "--verify",
        "--expect-head",
        &anchor,
    ]);
    set_writable(&data, true);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(files(&data) == before, "the replay changed the data dir");
    assert!(
        stdout.contains("38 referenced blobs verified"),
        "the uploaded image list the submission names, the manifest, 36 images: {stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "anchor found: record {anchor_seq} has the expected hash"
        )),
        "{stdout}"
    );
    let out = twin(&[
        "replay",
        "--data-dir",
        data.to_str().unwrap(),
        "--until",
        "2",
        "--json",
    ]);
    let state: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        state["jobs"][&job_id]["status"], "leased",
        "the state as of seq 2"
    );
    let (lineage, _) = text(&twin(&[
        "lineage",
        &manifest,
        "--data-dir",
        data.to_str().unwrap(),
    ]));
    assert!(
        // `twin submit` uploaded the images: the spec names their listing blob.
        lineage.contains(&job_id) && lineage.contains("\"blobs\""),
        "offline lineage names the job and its input: {lineage}"
    );

    // Tamper with one ingested image: verification stops at the event that references it.
    let blobs = data.join("blobs/sha256");
    let victim = eventually(Duration::from_secs(1), "a stored image", || {
        walk(&blobs).into_iter().find(|p| {
            std::fs::read(p)
                .map(|b| b.starts_with(b"\x89PNG"))
                .unwrap_or(false)
        })
    });
    let mut bytes = std::fs::read(&victim).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&victim, bytes).unwrap();
    let out = twin(&["replay", "--data-dir", data.to_str().unwrap(), "--verify"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // The sequence number depends on how many progress events the ingest wrote; the image
    // named is the one tampered with.
    let victim_hash = victim.file_name().unwrap().to_str().unwrap();
    assert!(
        stderr.contains("verification failed at seq") && stderr.contains(victim_hash),
        "{stderr}"
    );
}

/// Every file under `dir` with its bytes and modification time.
fn files(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>, std::time::SystemTime)> {
    walk(dir)
        .into_iter()
        .map(|p| {
            let modified = std::fs::metadata(&p).unwrap().modified().unwrap();
            (p.clone(), std::fs::read(&p).unwrap(), modified)
        })
        .collect()
}

/// `chmod -R a-w` (or `u+w` back).
fn set_writable(path: &std::path::Path, writable: bool) {
    use std::os::unix::fs::PermissionsExt;
    if path.is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            set_writable(&e.unwrap().path(), writable);
        }
    }
    let mode = std::fs::metadata(path).unwrap().permissions().mode();
    let mode = if writable {
        mode | 0o200
    } else {
        mode & !0o222
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p))
        } else {
            out.push(p)
        }
    }
    out.sort();
    out
}

#[test]
fn cli_errors_are_clear_and_exit_2() {
    let out = twin(&["--server", "http://127.0.0.1:9", "jobs", "ls"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("cannot reach the twin server"), "{stderr}");
    let tmp = tempfile::tempdir().unwrap();
    let out = twin(&["replay", "--data-dir", tmp.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("no event log"), "{:?}", text(&out));
}

#[test]
fn a_missing_source_fails_the_job_without_retrying() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), &[]);
    let spec = ingest_spec(tmp.path(), "ghost", &tmp.path().join("no-such-dir"));
    // Sent as a path: the executor, which has no allowed roots, refuses it at once.
    let out = twin(&[
        "--server",
        &server.url,
        "submit",
        spec.to_str().unwrap(),
        "--no-upload",
        "--wait",
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("failed") && stderr.contains("upload the file instead"),
        "{stderr}"
    );
    server.stop();
}

#[test]
fn offline_replay_of_a_running_servers_data_dir_says_to_stop_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data, &["--no-executor"]);
    let out = twin(&["replay", "--data-dir", data.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).1.contains("is a server already running"),
        "{:?}",
        text(&out)
    );
    server.stop();
}
