//! A full disk: appends fail loudly, nothing acknowledged is lost, the server recovers.
//! Needs root to mount a tmpfs; skipped (with a message) where that is not allowed.

use std::path::Path;
use std::time::Duration;

use nix::mount::{MsFlags, mount, umount};
use serde_json::json;
use twin_client::{Client, JobFilter};
use twin_e2e::{Server, text, twin};

struct Tmpfs<'a>(&'a Path);

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        let _ = umount(self.0);
    }
}

fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_appends_loudly_and_the_server_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    if let Err(e) = mount(
        Some("tmpfs"),
        &mnt,
        Some("tmpfs"),
        MsFlags::empty(),
        // Room for a few of the log's 16 MiB sled segments: space that returns must be able to
        // hold a new segment for appends to resume.
        Some("size=64m"),
    ) {
        eprintln!("skipped: cannot mount a tmpfs here ({e}); run as root to test a full disk");
        return;
    }
    let _guard = Tmpfs(&mnt);
    let data = mnt.join("data");
    let mut server = Server::start(&data, &["--no-executor"]);
    let client = Client::new(&server.url, None).unwrap();
    let spec = |i: usize| json!({"spec": {"kind": "ingest", "dataset": format!("d{i}"), "source": {"dir": format!("/{}", "p".repeat(2000))}}});
    let mut acked = Vec::new();
    for i in 0..20 {
        acked.push(
            client
                .submit(&spec(i), None)
                .await
                .unwrap()
                .job
                .id
                .to_string(),
        );
    }
    fill(&mnt.join("filler"));
    let mut refusals = 0;
    for i in 20..2000 {
        match client.submit(&spec(i), None).await {
            Ok(s) => acked.push(s.job.id.to_string()),
            Err(e) => {
                assert_eq!(e.code(), Some("storage_unavailable"), "{e}");
                assert_eq!(e.status(), Some(503));
                refusals += 1;
                if refusals >= 5 {
                    break;
                }
            }
        }
    }
    assert!(
        refusals >= 5,
        "the full disk never refused an append ({} acknowledged)",
        acked.len()
    );
    assert!(server.alive(), "the server survives a full disk");
    std::fs::remove_file(mnt.join("filler")).unwrap();
    let recovered = async {
        for i in 3000..3100 {
            if let Ok(s) = client.submit(&spec(i), None).await {
                return Some(s.job.id.to_string());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    };
    acked.push(
        recovered
            .await
            .expect("appends succeed again once space returns"),
    );
    server.stop();

    let server = Server::start(&data, &["--no-executor"]);
    let client = Client::new(&server.url, None).unwrap();
    let jobs = client
        .jobs(&JobFilter {
            limit: Some(10_000),
            ..JobFilter::default()
        })
        .await
        .unwrap();
    let present: std::collections::HashSet<_> = jobs.iter().map(|j| j.id.to_string()).collect();
    assert!(
        acked.iter().all(|id| present.contains(id)),
        "an acknowledged job was lost"
    );
    assert_eq!(
        jobs.len(),
        acked.len(),
        "a refused submission must not appear later"
    );
    server.stop();
    let out = twin(&["replay", "--data-dir", data.to_str().unwrap(), "--verify"]);
    assert!(out.status.success(), "{:?}", text(&out));
}
