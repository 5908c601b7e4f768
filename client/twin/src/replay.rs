//! Offline audit of a data directory: replay the log through the same reducers as the server,
//! checking the hash chain, every job event against the state machine, the chain against a head
//! written down earlier (`--expect-head`), and (with `--verify`) every blob the events refer to,
//! including the images that ingest and built-dataset manifests, mine candidates and
//! hard-negative snapshots name.
//!
//! The audited directory is only read: the log is opened from a copy (sled cannot open a
//! database without writing to it), the blob store without creating anything.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, anyhow};
use clap::Args;
use serde::Deserialize;
use twin_core::event::{Event, JobResult, JobSubmitted, JobSucceeded, ManifestEntry};
use twin_core::projection::Lineage;
use twin_core::spec::JobSpec;
use twin_core::{BlobHash, Projections, RecordedEvent, StreamName};
use twin_log::{BlobStore, LogReader, StoredRecord};

use crate::Failure;

#[derive(Args)]
pub struct ReplayArgs {
    /// The server's data directory (the server must be stopped: the log is locked while it runs).
    /// It is only read: the log is copied to `--scratch-dir` and the copy replayed.
    #[arg(long, env = "TWIN_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Check every referenced blob (and the images manifests, candidates and hard-negative
    /// snapshots name) as well as the chain, and fail on any anomaly; exit 1 at the first.
    #[arg(long)]
    pub verify: bool,
    /// Show the state as of this sequence number.
    #[arg(long)]
    pub until: Option<u64>,
    /// A chain head written down earlier (`twin log head`): `SEQ:HASH`, or the hash alone. Exit 1
    /// unless that record is on the chain: a log truncated before it or rewritten at or before
    /// it fails; one that has grown since passes.
    #[arg(long, value_name = "SEQ:HASH")]
    pub expect_head: Option<Anchor>,
    /// Where the copy of the log is made (room for the whole log); the system's temporary
    /// directory by default.
    #[arg(long)]
    pub scratch_dir: Option<PathBuf>,
}

/// A record the chain must hold: its hash, and where it was seen if known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    pub seq: Option<u64>,
    pub hash: [u8; 32],
}

impl FromStr for Anchor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (seq, hash) = match s.split_once(':') {
            Some((seq, hash)) => (
                Some(
                    seq.parse()
                        .map_err(|_| format!("`{seq}` is not a sequence number"))?,
                ),
                hash,
            ),
            None => (None, s),
        };
        let hash = hex::decode(hash)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| format!("`{hash}` is not a SHA-256 in hex (64 digits)"))?;
        Ok(Anchor { seq, hash })
    }
}

fn bad(seq: u64, what: impl std::fmt::Display) -> Failure {
    Failure {
        code: 1,
        error: anyhow!("verification failed at seq {seq}: {what}"),
    }
}

/// What a referenced blob holds that names further blobs (images), to be checked in turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contents {
    /// Nothing the audit reads into.
    Opaque,
    /// An ingest manifest: JSONL of [`ManifestEntry`].
    IngestManifest,
    /// A built dataset's manifest: its rows name their images.
    BuiltManifest,
    /// A mine job's candidates: JSONL of `{"a": {"blob"}, "b": {"blob"}, …}`.
    Candidates,
    /// A hard-negative snapshot or synthetic negatives: JSONL of `{"a", "b", …}` hashes.
    Pairs,
}

impl Contents {
    fn what(self) -> &'static str {
        match self {
            Contents::Opaque => "blob",
            Contents::IngestManifest => "manifest",
            Contents::BuiltManifest => "built dataset manifest",
            Contents::Candidates => "candidates",
            Contents::Pairs => "pair list",
        }
    }
}

/// The blobs an event refers to, with what each holds. A job's inputs count (the hard-negative
/// snapshot the server pinned, the rollouts it scores), not only its outputs.
fn references(event: &Event) -> Vec<(BlobHash, Contents)> {
    let opaque = |blobs: Vec<BlobHash>| blobs.into_iter().map(|b| (b, Contents::Opaque));
    match event {
        Event::JobSubmitted(JobSubmitted { submission, .. }) => {
            let pairs: Vec<BlobHash> = match &submission.spec {
                JobSpec::BuildDataset(b) => b
                    .hard_negatives
                    .into_iter()
                    .chain(b.synthetic.iter().copied())
                    .collect(),
                _ => Vec::new(),
            };
            let mut out: Vec<_> = pairs.iter().map(|b| (*b, Contents::Pairs)).collect();
            out.extend(opaque(submission.spec.inputs()).filter(|(b, _)| !pairs.contains(b)));
            out
        }
        Event::JobSucceeded(JobSucceeded {
            result: JobResult::Mine(m),
            ..
        }) => std::iter::once((m.candidates, Contents::Candidates))
            .chain(opaque(event.blob_refs()).filter(|(b, _)| *b != m.candidates))
            .collect(),
        Event::DatasetRegistered(d) => vec![(d.manifest, Contents::IngestManifest)],
        Event::DatasetBuilt(d) => std::iter::once((d.output.manifest, Contents::BuiltManifest))
            .chain(opaque(d.output.exports.values().copied().collect()))
            .collect(),
        other => opaque(other.blob_refs()).collect(),
    }
}

#[derive(Deserialize)]
struct Image {
    blob: BlobHash,
}

#[derive(Deserialize)]
struct CandidateImages {
    a: Image,
    b: Image,
}

#[derive(Deserialize)]
struct PairHashes {
    a: BlobHash,
    b: BlobHash,
}

/// The images a blob of `contents` names, each with a word on where (for messages).
fn named_images(contents: Contents, bytes: &[u8]) -> Result<Vec<(BlobHash, String)>, String> {
    let lines = || {
        bytes
            .split(|b| *b == b'\n')
            .enumerate()
            .filter(|(_, l)| !l.is_empty())
    };
    let line_error = |n: usize, e: serde_json::Error| format!("line {}: {e}", n + 1);
    let mut out = Vec::new();
    match contents {
        Contents::Opaque => {}
        Contents::IngestManifest => {
            for (n, line) in lines() {
                let e: ManifestEntry =
                    serde_json::from_slice(line).map_err(|e| line_error(n, e))?;
                out.push((e.blob, e.path));
            }
        }
        Contents::BuiltManifest => {
            let dataset =
                twin_data::build::BuiltDataset::from_manifest(bytes).map_err(|e| e.to_string())?;
            for row in dataset.rows {
                for image in row.images {
                    out.push((image.blob, format!("{} (row {})", image.path, row.id)));
                }
            }
        }
        Contents::Candidates => {
            for (n, line) in lines() {
                let c: CandidateImages =
                    serde_json::from_slice(line).map_err(|e| line_error(n, e))?;
                out.push((c.a.blob, format!("line {}", n + 1)));
                out.push((c.b.blob, format!("line {}", n + 1)));
            }
        }
        Contents::Pairs => {
            for (n, line) in lines() {
                let p: PairHashes = serde_json::from_slice(line).map_err(|e| line_error(n, e))?;
                out.push((p.a, format!("line {}", n + 1)));
                out.push((p.b, format!("line {}", n + 1)));
            }
        }
    }
    Ok(out)
}

/// Blobs already checked, and blobs already read for the images they name.
#[derive(Default)]
struct Checked {
    blobs: HashSet<BlobHash>,
    expanded: HashSet<BlobHash>,
}

/// Checks a blob (present, and hashing to its name) and every image it names.
fn verify_blob(
    blobs: &BlobStore,
    hash: &BlobHash,
    contents: Contents,
    seq: u64,
    checked: &mut Checked,
) -> Result<(), Failure> {
    if checked.blobs.insert(*hash) {
        blobs
            .verify(hash)
            .map_err(|e| bad(seq, format!("{} {hash}: {e}", contents.what())))?;
    }
    if contents != Contents::Opaque && checked.expanded.insert(*hash) {
        let bytes = blobs.read(hash).map_err(|e| bad(seq, e))?;
        let images = named_images(contents, &bytes)
            .map_err(|e| bad(seq, format!("{} {hash}: {e}", contents.what())))?;
        for (image, at) in images {
            if checked.blobs.insert(image) {
                blobs.verify(&image).map_err(|e| {
                    bad(
                        seq,
                        format!("image {image} at {at} of {} {hash}: {e}", contents.what()),
                    )
                })?;
            }
        }
    }
    Ok(())
}

/// What a replay found.
struct Replayed {
    state: Projections,
    /// Blobs verified (with `--verify`).
    blobs: usize,
    /// The last record replayed: its seq and hash.
    head: Option<(u64, [u8; 32])>,
    /// The anchor's record, and how many records the chain holds after it.
    anchored: Option<(u64, u64)>,
}

/// The checks of one record that the fold itself does not make: the stream's version follows
/// on, and a job event is a transition its job's state allows.
fn check_record(
    state: &Projections,
    versions: &mut HashMap<String, u64>,
    rec: &RecordedEvent,
) -> Result<(), String> {
    let version = versions.entry(rec.stream.clone()).or_default();
    let expected = *version + 1;
    *version = rec.stream_version;
    if rec.stream_version != expected {
        return Err(format!(
            "stream {} at version {}, expected {expected}",
            rec.stream, rec.stream_version
        ));
    }
    let Ok(StreamName::Job(id)) = rec.stream.parse::<StreamName>() else {
        return Ok(());
    };
    match (&rec.event, state.jobs.get(&id)) {
        (Event::JobSubmitted(s), None) if s.id != id => {
            Err(format!("job {} submitted on stream {}", s.id, rec.stream))
        }
        (_, Some(job)) => job.check(&rec.event).map_err(|e| e.to_string()),
        // An event for a job never submitted: the fold reports it as an anomaly.
        (_, None) => Ok(()),
    }
}

/// Replays up to `until` (the chain is walked on to find the anchor).
fn replay_dir(
    dir: &Path,
    verify: bool,
    until: Option<u64>,
    anchor: Option<Anchor>,
    scratch: Option<&Path>,
) -> Result<Replayed, Failure> {
    let scratch = scratch.map_or_else(std::env::temp_dir, Path::to_owned);
    let reader = LogReader::open_copy(dir, &scratch)
        .with_context(|| format!("opening {}", dir.display()))?;
    let blobs = BlobStore::open_existing(twin_log::blob_dir(dir));
    let mut out = Replayed {
        state: Projections::default(),
        blobs: 0,
        head: None,
        anchored: None,
    };
    let mut checked = Checked::default();
    let mut versions = HashMap::new();
    let mut last: Option<(u64, [u8; 32])> = None;
    for record in reader.verified() {
        let record = record.map_err(|e| match e.seq() {
            Some(seq) => bad(seq, &e),
            None => Failure {
                code: 2,
                error: anyhow!(e),
            },
        })?;
        last = Some((record.seq, record.hash));
        if let Some(a) = anchor {
            check_anchor(&a, &record)?;
            if out.anchored.is_none() && record.hash == a.hash {
                out.anchored = Some((record.seq, 0));
            }
        }
        if until.is_some_and(|u| record.seq > u) {
            if anchor.is_some() && out.anchored.is_none() {
                continue;
            }
            break;
        }
        let event = record.recorded().map_err(|e| bad(record.seq, e))?;
        if let Err(why) = check_record(&out.state, &mut versions, &event) {
            if verify {
                return Err(bad(record.seq, why));
            }
            out.state
                .anomalies
                .push(format!("seq {}: {why}", record.seq));
        }
        let anomalies = out.state.anomalies.len();
        out.state.apply(&event);
        if verify {
            if let Some(a) = out.state.anomalies.get(anomalies) {
                return Err(bad(record.seq, a));
            }
            for (blob, contents) in references(&event.event) {
                verify_blob(&blobs, &blob, contents, record.seq, &mut checked)?;
            }
        }
        out.head = Some((record.seq, record.hash));
    }
    if let Some(a) = anchor {
        let (end, end_hash) = last.unwrap_or((0, twin_log::GENESIS_HASH));
        match (out.anchored, a.seq) {
            (Some((seq, _)), _) => out.anchored = Some((seq, end - seq)),
            // The head of an empty log.
            (None, None | Some(0)) if a.hash == twin_log::GENESIS_HASH => {
                out.anchored = Some((0, end))
            }
            (None, Some(seq)) => {
                return Err(anchor_failure(format!(
                    "the log was truncated: its chain ends at seq {end}, before the anchored \
                     seq {seq}"
                )));
            }
            (None, None) => {
                return Err(anchor_failure(format!(
                    "the anchored head {} is not on the chain, which ends at seq {end} with hash \
                     {}: the log was truncated or rewritten",
                    hex::encode(a.hash),
                    hex::encode(end_hash)
                )));
            }
        }
    }
    out.blobs = checked.blobs.len();
    Ok(out)
}

fn anchor_failure(what: String) -> Failure {
    Failure {
        code: 1,
        error: anyhow!("anchor check failed: {what}"),
    }
}

/// The record at the anchor's seq must carry the anchor's hash.
fn check_anchor(anchor: &Anchor, record: &StoredRecord) -> Result<(), Failure> {
    if anchor.seq == Some(record.seq) && record.hash != anchor.hash {
        return Err(anchor_failure(format!(
            "the log was rewritten: record {} has hash {}, the anchor says {}",
            record.seq,
            hex::encode(record.hash),
            hex::encode(anchor.hash)
        )));
    }
    Ok(())
}

pub fn run(args: &ReplayArgs, json: bool) -> Result<(), Failure> {
    let Replayed {
        state,
        blobs,
        head,
        anchored,
    } = replay_dir(
        &args.data_dir,
        args.verify,
        args.until,
        args.expect_head,
        args.scratch_dir.as_deref(),
    )?;
    if json {
        let out = serde_json::json!({
            "last_seq": state.last_seq,
            "head_hash": head.map(|(_, h)| hex::encode(h)),
            "anchor_seq": anchored.map(|(seq, _)| seq),
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
    if let Some((seq, h)) = head {
        println!(
            "chain head {seq}:{}: every record's hash and link verified",
            hex::encode(h)
        );
    }
    if let Some((seq, after)) = anchored {
        println!("anchor found: record {seq} has the expected hash ({after} records after it)");
    }
    if args.verify {
        // `--verify` stops at the first anomaly, so reaching here means there was none.
        println!("{blobs} referenced blobs verified; every job event a legal transition");
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

#[derive(clap::Subcommand)]
pub enum LogCommand {
    /// Print the chain head as `SEQ:HASH`: write it down where the server cannot write, and
    /// `twin replay --expect-head SEQ:HASH` later proves the log still holds that record.
    Head,
}

pub async fn log(conn: crate::Conn, command: LogCommand) -> Result<(), Failure> {
    let client = twin_client::Client::with_ca_file(
        &conn.server,
        conn.token.clone(),
        conn.ca_file.as_deref(),
    )?;
    match command {
        LogCommand::Head => {
            let head = client.log_head().await?;
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&head)?);
            } else {
                println!("{}", head.anchor);
            }
        }
    }
    Ok(())
}

pub fn lineage(dir: &Path, target: &str, json: bool) -> Result<(), Failure> {
    let state = replay_dir(dir, false, None, None, None)?.state;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;
    use std::time::SystemTime;

    use serde_json::json;
    use twin_core::event::{JobLeased, JobStarted};
    use twin_core::{JobId, JobSubmission};
    use twin_log::{AppendRequest, Head, Log, LogConfig};

    use super::*;

    fn job() -> JobId {
        "j1".parse().unwrap()
    }

    fn submitted(spec: serde_json::Value) -> (StreamName, Event) {
        let submission: JobSubmission = serde_json::from_value(json!({ "spec": spec })).unwrap();
        (
            StreamName::Job(job()),
            Event::JobSubmitted(JobSubmitted {
                id: job(),
                submission,
            }),
        )
    }

    fn ingest() -> (StreamName, Event) {
        submitted(json!({"kind": "ingest", "dataset": "d", "source": {"dir": "/x"}}))
    }

    fn on_job(event: Event) -> (StreamName, Event) {
        (StreamName::Job(job()), event)
    }

    fn leased() -> (StreamName, Event) {
        on_job(Event::JobLeased(JobLeased {
            epoch: 1,
            executor: "e".into(),
        }))
    }

    fn started() -> (StreamName, Event) {
        on_job(Event::JobStarted(JobStarted { epoch: 1 }))
    }

    /// Appends `events` to the log of `data` (created if new), through twin-log as the server
    /// does, and returns the head.
    fn append(data: &Path, events: &[(StreamName, Event)]) -> Head {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let log = Log::open(
            LogConfig::new(twin_log::log_dir(data)),
            |_| {},
            Box::new(|_: &[StoredRecord]| {}),
        )
        .unwrap();
        for (stream, event) in events {
            rt.block_on(log.append(AppendRequest {
                actor: "alice".into(),
                events: vec![twin_log::new_event(stream, event)],
                expect: Vec::new(),
                idempotency: None,
            }))
            .unwrap();
        }
        let head = log.head().unwrap();
        log.close();
        head
    }

    fn replay(data: &Path, verify: bool, anchor: Option<&str>) -> Result<Replayed, String> {
        let anchor = anchor.map(|a| a.parse().unwrap());
        replay_dir(data, verify, None, anchor, None).map_err(|f| format!("{:#}", f.error))
    }

    fn anchor(head: Head) -> String {
        format!("{}:{}", head.seq, hex::encode(head.hash))
    }

    #[test]
    fn an_anchor_passes_on_a_log_grown_past_it() {
        let tmp = tempfile::tempdir().unwrap();
        let head = append(tmp.path(), &[ingest(), leased()]);
        append(tmp.path(), &[started()]);
        let got = replay(tmp.path(), true, Some(&anchor(head))).unwrap();
        assert_eq!(got.anchored, Some((2, 1)));
        let got = replay(tmp.path(), true, Some(&hex::encode(head.hash))).unwrap();
        assert_eq!(got.anchored, Some((2, 1)), "the hash alone is found too");
    }

    /// Copies a closed data directory as it is: a log frozen at one point of its history.
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let dst = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &dst);
            } else {
                std::fs::copy(entry.path(), dst).unwrap();
            }
        }
    }

    #[test]
    fn a_log_truncated_before_its_anchor_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("log");
        append(&log, &[ingest(), leased()]);
        // What someone who drops the tail leaves: the same first two records, byte for byte.
        let truncated = tmp.path().join("truncated");
        copy_dir(&log, &truncated);
        let head = append(&log, &[started()]);
        assert!(
            replay(&truncated, true, None).is_ok(),
            "the chain alone holds"
        );
        let err = replay(&truncated, true, Some(&anchor(head))).err().unwrap();
        assert!(
            err.contains("truncated: its chain ends at seq 2, before the anchored seq 3"),
            "{err}"
        );
        let err = replay(&truncated, false, Some(&hex::encode(head.hash)))
            .err()
            .unwrap();
        assert!(err.contains("is not on the chain"), "{err}");
    }

    #[test]
    fn a_log_rewritten_at_its_anchor_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("log");
        append(&log, &[ingest(), leased()]);
        let rewritten = tmp.path().join("rewritten");
        copy_dir(&log, &rewritten);
        let head = append(&log, &[started()]);
        // The same first two records, then another third, validly chained, and more after it.
        let released = on_job(Event::JobLeaseReleased(
            twin_core::event::JobLeaseReleased {
                epoch: 1,
                reason: "x".into(),
            },
        ));
        append(&rewritten, &[released, leased_again()]);
        assert!(
            replay(&rewritten, true, None).is_ok(),
            "the chain alone holds"
        );
        let err = replay(&rewritten, true, Some(&anchor(head))).err().unwrap();
        assert!(err.contains("rewritten: record 3 has hash"), "{err}");
        let err = replay(&rewritten, true, Some(&hex::encode(head.hash)))
            .err()
            .unwrap();
        assert!(err.contains("is not on the chain"), "{err}");
    }

    fn leased_again() -> (StreamName, Event) {
        on_job(Event::JobLeased(JobLeased {
            epoch: 2,
            executor: "e".into(),
        }))
    }

    #[test]
    fn an_illegal_transition_fails_verification_and_is_reported_without_it() {
        let tmp = tempfile::tempdir().unwrap();
        // A success for a job never leased, chained like any record.
        let success: Event = serde_json::from_value(json!({
            "type": "job_succeeded", "data": {"epoch": 1,
            "result": {"kind": "ingest", "dataset": "d1",
                "manifest": hex::encode([0u8; 32]), "images": 0, "instances": 0,
                "categories": 0, "rejected": [], "rejected_total": 0}},
        }))
        .unwrap();
        append(tmp.path(), &[ingest(), on_job(success)]);
        let err = replay(tmp.path(), true, None).err().unwrap();
        assert!(
            err.contains(
                "verification failed at seq 2: job j1: illegal job_succeeded while queued"
            ) && err.contains("holds no lease"),
            "{err}"
        );
        let got = replay(tmp.path(), false, None).unwrap();
        assert_eq!(got.state.anomalies.len(), 1, "{:?}", got.state.anomalies);

        // A job submitted on another job's stream.
        let elsewhere = tmp.path().join("elsewhere");
        let (_, submission) = ingest();
        append(
            &elsewhere,
            &[(StreamName::Job("j2".parse().unwrap()), submission)],
        );
        let err = replay(&elsewhere, true, None).err().unwrap();
        assert!(err.contains("job j1 submitted on stream job/j2"), "{err}");
    }

    /// Every file under `dir` with its bytes and modification time.
    fn files(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, SystemTime)> {
        let mut out = BTreeMap::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                out.extend(files(&path));
            } else {
                let modified = entry.metadata().unwrap().modified().unwrap();
                out.insert(path.clone(), (std::fs::read(&path).unwrap(), modified));
            }
        }
        out
    }

    fn set_mode(path: &Path, writable: bool) {
        if path.is_dir() {
            for entry in std::fs::read_dir(path).unwrap() {
                set_mode(&entry.unwrap().path(), writable);
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

    /// `chmod -R a-w`, then a verifying replay: it succeeds and leaves every byte and time as
    /// it was (compared too, since as root the permissions stop nothing).
    #[test]
    fn a_read_only_data_dir_replays_and_is_left_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let store = BlobStore::open(twin_log::blob_dir(&data)).unwrap();
        let image = store.put(b"an image").unwrap();
        let manifest = store
            .put(
                format!(
                    "{}\n",
                    json!({"blob": image, "path": "c/i/1.png", "category": "c", "instance": "i",
                           "width": 1, "height": 1, "format": "png", "phash": "0"})
                )
                .as_bytes(),
            )
            .unwrap();
        let registered: Event = serde_json::from_value(json!({
            "type": "dataset_registered", "data": {"id": "d1", "name": "d", "job": "j1",
            "manifest": manifest, "images": 1, "instances": 1, "categories": 1},
        }))
        .unwrap();
        append(
            &data,
            &[
                ingest(),
                (StreamName::Dataset("d1".parse().unwrap()), registered),
            ],
        );
        let before = files(&data);
        set_mode(&data, false);
        let got = replay(&data, true, None);
        set_mode(&data, true);
        let got = got.unwrap();
        assert_eq!(got.blobs, 2, "the manifest and its image");
        assert!(
            files(&data) == before,
            "the replay changed the data directory"
        );
    }

    #[test]
    fn a_missing_candidate_image_fails_verification() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let store = BlobStore::open(twin_log::blob_dir(&data)).unwrap();
        let kept = store.put(b"image a").unwrap();
        let lost = BlobHash::of(b"image b, never stored");
        let candidates = store
            .put(
                format!(
                    "{}\n",
                    json!({"id": "0", "a": {"blob": kept, "path": "a.png"},
                           "b": {"blob": lost, "path": "b.png"}})
                )
                .as_bytes(),
            )
            .unwrap();
        let embeddings = store.put(b"embeddings").unwrap();
        let success: Event = serde_json::from_value(json!({
            "type": "job_succeeded", "data": {"epoch": 1,
            "result": {"kind": "mine", "model_hash": "m", "embeddings": embeddings,
                "candidates": candidates, "images": 2, "reused_embeddings": 0, "skipped": [],
                "skipped_total": 0, "search": "exact", "device": "cpu", "pairs": 1, "kept": 1,
                "auto_accepted": 0, "recall_at_k": null, "filters": {}, "timings_ms": {}}},
        }))
        .unwrap();
        append(
            &data,
            &[
                submitted(json!({"kind": "mine", "dataset": "d", "model": "/m"})),
                leased(),
                started(),
                on_job(success),
            ],
        );
        let err = replay(&data, true, None).err().unwrap();
        assert!(
            err.contains(&format!(
                "verification failed at seq 4: image {lost} at line 1 of candidates {candidates}"
            )) && err.contains("not found"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_hard_negative_snapshot_or_its_image_fails_verification() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let store = BlobStore::open(twin_log::blob_dir(&data)).unwrap();
        let (a, b) = (store.put(b"a").unwrap(), BlobHash::of(b"b, never stored"));
        let snapshot = BlobHash::of(b"a snapshot, lost");
        let build = |hard: BlobHash| {
            submitted(json!({"kind": "build-dataset", "name": "p", "dataset": "d",
                             "hard_negatives": hard}))
        };
        append(&data, &[build(snapshot)]);
        let err = replay(&data, true, None).err().unwrap();
        assert!(
            err.contains(&format!("seq 1: pair list {snapshot}")) && err.contains("not found"),
            "{err}"
        );

        let data = tmp.path().join("data2");
        let store = BlobStore::open(twin_log::blob_dir(&data)).unwrap();
        store.put(b"a").unwrap();
        let snapshot = store
            .put(format!("{}\n", json!({"pair": "p", "a": a, "b": b, "by": "x"})).as_bytes())
            .unwrap();
        append(&data, &[build(snapshot)]);
        let err = replay(&data, true, None).err().unwrap();
        assert!(
            err.contains(&format!("image {b} at line 1 of pair list {snapshot}")),
            "{err}"
        );
    }
}
