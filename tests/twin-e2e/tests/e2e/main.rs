//! End-to-end tests: the real `twin-server` and `twin` binaries on loopback ports.

#![allow(clippy::unwrap_used)]

mod cli;
mod crash;
mod disk;
mod eval;
mod executor;
mod files;
mod leases;
mod mining;
mod model;
mod models;
mod modules;
mod tls;
mod train;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use twin_client::Client;
use twin_core::job::JobState;
use twin_e2e::{text, twin};

/// A small tree (2 categories × 2 instances × 2 views of 32 px): enough for an ingest, quick.
pub fn small_sample(dir: &Path) {
    sample(
        dir,
        &[
            "--categories",
            "2",
            "--instances",
            "2",
            "--views",
            "2",
            "--size",
            "32",
        ],
    );
}

/// Generates a sample image set with the CLI.
pub fn sample(dir: &Path, args: &[&str]) {
    let mut all = vec!["sample-data", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = twin(&all);
    assert!(out.status.success(), "{:?}", text(&out));
}

/// Where deploy/build-modules.sh put the Wasm components (or `TWIN_MODULES_DIR`).
pub fn modules_dir() -> PathBuf {
    std::env::var_os("TWIN_MODULES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/wasm32-wasip2/guest")
        })
}

/// Polls job `id` every 25 ms until `pred` holds; fails naming `what`, the job's status and its
/// attempts after `limit`.
pub async fn wait_for(
    client: &Client,
    id: &str,
    limit: Duration,
    what: &str,
    pred: impl Fn(&JobState) -> bool,
) -> JobState {
    let deadline = Instant::now() + limit;
    loop {
        let job = client.job(id).await.unwrap();
        if pred(&job) {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; job is {:?} with attempts {:?}",
            job.status,
            job.attempts
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
