//! Offline audit of a data directory: replay the log through the same reducers as the server,
//! checking the hash chain and (with `--verify`) every blob the events refer to, including the
//! images listed in dataset manifests.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use clap::Args;
use twin_core::event::{Event, ManifestEntry};
use twin_core::projection::Lineage;
use twin_core::{BlobHash, Projections};
use twin_log::{BlobStore, LogReader};

use crate::Failure;

#[derive(Args)]
pub struct ReplayArgs {
    /// The server's data directory (the server must be stopped: the log is locked while it runs).
    #[arg(long, env = "TWIN_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Check every referenced blob as well as the chain; exit 1 at the first bad record.
    #[arg(long)]
    pub verify: bool,
    /// Show the state as of this sequence number.
    #[arg(long)]
    pub until: Option<u64>,
}

fn bad(seq: u64, what: impl std::fmt::Display) -> Failure {
    Failure {
        code: 1,
        error: anyhow!("verification failed at seq {seq}: {what}"),
    }
}

/// Blobs already checked, and manifests already expanded.
#[derive(Default)]
struct Checked {
    blobs: HashSet<BlobHash>,
    manifests: HashSet<BlobHash>,
}

/// Checks a blob and, for a manifest, every image blob it lists.
fn verify_blob(
    blobs: &BlobStore,
    hash: &BlobHash,
    seq: u64,
    checked: &mut Checked,
    is_manifest: bool,
) -> Result<(), Failure> {
    if checked.blobs.insert(*hash) {
        blobs.verify(hash).map_err(|e| bad(seq, e))?;
    }
    if is_manifest && checked.manifests.insert(*hash) {
        let text = blobs.read(hash).map_err(|e| bad(seq, e))?;
        for (n, line) in text
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .enumerate()
        {
            let entry: ManifestEntry = serde_json::from_slice(line)
                .map_err(|e| bad(seq, format!("manifest {hash} line {}: {e}", n + 1)))?;
            verify_blob(blobs, &entry.blob, seq, checked, false).map_err(|f| {
                bad(
                    seq,
                    format!("image {} of manifest {hash}: {:#}", entry.path, f.error),
                )
            })?;
        }
    }
    Ok(())
}

/// Replays up to `until`; returns the projections and how many blobs were verified.
fn replay_dir(
    dir: &Path,
    verify: bool,
    until: Option<u64>,
) -> Result<(Projections, usize, Option<String>), Failure> {
    let reader = LogReader::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let blobs = BlobStore::open(twin_log::blob_dir(dir))?;
    let mut state = Projections::default();
    let mut checked = Checked::default();
    let mut head = None;
    for record in reader.verified() {
        let record = record.map_err(|e| match e.seq() {
            Some(seq) => bad(seq, &e),
            None => Failure {
                code: 2,
                error: anyhow!(e),
            },
        })?;
        if until.is_some_and(|u| record.seq > u) {
            break;
        }
        let event = record.recorded().map_err(|e| bad(record.seq, e))?;
        if verify {
            for blob in event.event.blob_refs() {
                let is_manifest = matches!(event.event, Event::DatasetRegistered(_));
                verify_blob(&blobs, &blob, record.seq, &mut checked, is_manifest)?;
            }
        }
        head = Some(hex::encode(record.hash));
        state.apply(&event);
    }
    Ok((state, checked.blobs.len(), head))
}

pub fn run(args: &ReplayArgs, json: bool) -> Result<(), Failure> {
    let (state, blobs, head) = replay_dir(&args.data_dir, args.verify, args.until)?;
    if json {
        let out = serde_json::json!({
            "last_seq": state.last_seq,
            "head_hash": head,
            "verified_blobs": blobs,
            "jobs": state.jobs,
            "experiments": state.experiments,
            "datasets": state.datasets,
            "modules": state.modules.values().collect::<Vec<_>>(),
            "aliases": state.aliases,
            "models": state.models.values().collect::<Vec<_>>(),
            "model_aliases": state.model_aliases,
            "anomalies": state.anomalies,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "replayed {} events from {}",
        state.last_seq,
        args.data_dir.display()
    );
    if let Some(h) = head {
        println!("chain head {h}: every record's hash and link verified");
    }
    if args.verify {
        println!("{blobs} referenced blobs verified");
    }
    let counts: Vec<String> = state
        .count_by_status()
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(s, n)| format!("{n} {}", s.as_str()))
        .collect();
    println!(
        "jobs: {}",
        if counts.is_empty() {
            "none".into()
        } else {
            counts.join(", ")
        }
    );
    for job in state.jobs.values() {
        println!(
            "  {}  {:<8} {:<10} attempts {}  by {}{}",
            job.id,
            job.kind.as_str(),
            job.status.as_str(),
            job.attempts.len(),
            job.submitted_by,
            job.attempts
                .iter()
                .rev()
                .find(|a| a.error.is_some())
                .map(|a| format!("  last error: {}", crate::online::attempt_outcome(a)))
                .unwrap_or_default()
        );
    }
    for exp in state.experiments.values() {
        println!("experiment {}: {} jobs", exp.name, exp.jobs.len());
    }
    for d in state.datasets.values() {
        println!(
            "dataset {} ({}): {} images, {} instances, {} categories, manifest {} (from job {})",
            d.name, d.id, d.images, d.instances, d.categories, d.manifest, d.job
        );
    }
    for m in state.modules.values() {
        let r = &m.module;
        println!(
            "module {} {} {} ({}), registered by {}{}",
            r.hash,
            r.name,
            r.version,
            r.kind,
            m.registered_by,
            if m.aliases.is_empty() {
                String::new()
            } else {
                format!(", named {}", m.aliases.join(", "))
            }
        );
    }
    for m in state.models.values() {
        println!(
            "model {} {}, {} files, {} bytes, registered by {}{}",
            m.model.hash,
            crate::models::kind_phrase(m),
            m.model.files.len(),
            m.model.bytes,
            m.registered_by,
            if m.aliases.is_empty() {
                String::new()
            } else {
                format!(", named {}", m.aliases.join(", "))
            }
        );
    }
    for a in &state.anomalies {
        println!("anomaly: {a}");
    }
    Ok(())
}

pub fn lineage(dir: &Path, target: &str, json: bool) -> Result<(), Failure> {
    let (state, _, _) = replay_dir(dir, false, None)?;
    let lineage = state.lineage(target).ok_or_else(|| Failure {
        code: 1,
        error: anyhow!("nothing in the log produced or is `{target}`"),
    })?;
    print_lineage(&lineage, json)
}

/// Prints a lineage as a short account (or JSON).
pub fn print_lineage(l: &Lineage, json: bool) -> Result<(), Failure> {
    if json {
        println!("{}", serde_json::to_string_pretty(l)?);
        return Ok(());
    }
    println!("{}", l.target);
    if let Some(p) = &l.producer {
        println!("  produced at seq {} as {}", p.seq, p.role);
    }
    if let Some(job) = &l.job {
        println!(
            "  by job {} ({}, {}), submitted by {} at {}",
            job.id,
            job.kind.as_str(),
            job.status.as_str(),
            job.submitted_by,
            crate::online::when(job.submitted_at)
        );
        println!("  spec: {}", serde_json::to_string(&job.submission.spec)?);
        for a in &job.attempts {
            println!(
                "  attempt epoch {} on {}: {}",
                a.epoch,
                a.executor,
                crate::online::attempt_outcome(a)
            );
        }
    }
    if let Some(e) = &l.experiment {
        println!("  in experiment {}", e.name);
    }
    for d in &l.datasets {
        println!(
            "  registered dataset {} ({}): {} images, manifest {}",
            d.name, d.id, d.images, d.manifest
        );
    }
    for m in &l.models {
        let names = if m.aliases.is_empty() {
            String::new()
        } else {
            format!(" ({})", m.aliases.join(", "))
        };
        println!(
            "  model {}{names}: {}, {} files",
            m.model.hash,
            crate::models::kind_phrase(m),
            m.model.files.len()
        );
        for f in &m.model.files {
            println!("    file {} {} ({} bytes)", f.sha256, f.path, f.size);
        }
    }
    for b in &l.blobs {
        println!("  output blob {b}");
    }
    Ok(())
}
