//! Benchmarks of the event log, each against a baseline measured in the same run:
//!
//! 1. durable appends/s with 1, 8 and 64 concurrent writers (group commit) against a naive loop
//!    that makes each append durable by itself with the same primitives (sled flush + fsync);
//! 2. replay with full hash-chain verification, against plain sled iteration of the same log.
//!
//! Run: `cargo run --release -p twin-log --example bench_log -- [--seconds 5] [--events 1000000]
//! [--payload-bytes 200] [--no-replay] [--dir D]` (D defaults to the system temp dir; put it on the
//! disk you care about). Payloads of 20000 bytes or more make sled write blob files, whose fsyncs
//! the log adds to a sync.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use twin_log::{AppendRequest, Expected, Log, LogConfig, LogReader, NewEvent};

/// The payload size unless `--payload-bytes` says otherwise.
const PAYLOAD_BYTES: usize = 200;

fn payload_bytes() -> usize {
    arg("--payload-bytes", &PAYLOAD_BYTES.to_string())
        .parse()
        .unwrap()
}

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_owned())
}

fn event(stream: usize) -> NewEvent {
    NewEvent {
        stream: format!("job/bench-{stream}"),
        event_type: "job_progress".into(),
        schema_version: 1,
        payload: vec![b'x'; payload_bytes()],
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Sums the writer's batch timings, to show where a group commit's time goes.
#[derive(Default)]
struct Totals {
    batches: AtomicU64,
    records: AtomicU64,
    write_us: AtomicU64,
    fsync_us: AtomicU64,
}

impl twin_log::LogObserver for Totals {
    fn batch_durable(&self, s: &twin_log::BatchStats) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.records.fetch_add(s.records as u64, Ordering::Relaxed);
        self.write_us
            .fetch_add(s.write.as_micros() as u64, Ordering::Relaxed);
        self.fsync_us
            .fetch_add(s.fsync.as_micros() as u64, Ordering::Relaxed);
    }
}

async fn group_commit(base: &std::path::Path, writers: usize, seconds: f64) -> f64 {
    let dir = tempfile::tempdir_in(base).unwrap();
    let totals = Arc::new(Totals::default());
    let mut config = LogConfig::new(dir.path().join("log"));
    config.observer = Some(totals.clone());
    let log = Log::open(config, |_| {}, Box::new(|_: &[_]| {})).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (log, stop, count) = (log.clone(), stop.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let req = AppendRequest {
                    actor: "bench".into(),
                    events: vec![event(w)],
                    expect: vec![(format!("job/bench-{w}"), Expected::Any)],
                    idempotency: None,
                };
                log.append(req).await.unwrap();
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let rate = count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    log.close();
    let b = totals.batches.load(Ordering::Relaxed).max(1);
    eprintln!(
        "  ({writers} writers: {} batches, {:.1} records/batch, write {:.0} us/batch, fsync {:.0} us/batch)",
        b,
        totals.records.load(Ordering::Relaxed) as f64 / b as f64,
        totals.write_us.load(Ordering::Relaxed) as f64 / b as f64,
        totals.fsync_us.load(Ordering::Relaxed) as f64 / b as f64
    );
    rate
}

/// The baseline: each append on its own, made durable with the same sled flush + fsync.
fn naive(base: &std::path::Path, seconds: f64) -> f64 {
    let dir = tempfile::tempdir_in(base).unwrap();
    let db = sled::Config::new()
        .path(dir.path())
        .flush_every_ms(None)
        .open()
        .unwrap();
    let tree = db.open_tree("events").unwrap();
    let file = std::fs::File::open(dir.path().join("db")).unwrap();
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        n += 1;
        tree.insert(n.to_be_bytes(), vec![b'x'; payload_bytes() + 80])
            .unwrap();
        db.flush().unwrap();
        file.sync_all().unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

async fn fill(dir: &std::path::Path, events: usize) {
    let log = Log::open(
        LogConfig::new(dir.join("log")),
        |_| {},
        Box::new(|_: &[_]| {}),
    )
    .unwrap();
    let per_request = 1000;
    for i in 0..events.div_ceil(per_request) {
        let events = (0..per_request)
            .map(|j| event((i * per_request + j) % 1000))
            .collect();
        log.append(AppendRequest {
            actor: "bench".into(),
            events,
            expect: vec![],
            idempotency: None,
        })
        .await
        .unwrap();
    }
    log.close();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds: f64 = arg("--seconds", "5").parse().unwrap();
    let events: usize = arg("--events", "1000000").parse().unwrap();
    let base = std::path::PathBuf::from(arg("--dir", &std::env::temp_dir().display().to_string()));
    let payload = payload_bytes();
    let replay = !std::env::args().any(|a| a == "--no-replay");
    let reps = 3;
    println!(
        "# bench_log: {payload}-byte payloads, {seconds} s per run, median of {reps} runs, dir {}",
        base.display()
    );
    println!(
        "# command: cargo run --release -p twin-log --example bench_log -- --seconds {seconds} --events {events} --payload-bytes {payload}{}",
        if replay { "" } else { " --no-replay" }
    );

    let naive_rate = median((0..reps).map(|_| naive(&base, seconds)).collect());
    println!("naive (insert + flush + fsync per append): {naive_rate:>10.0} appends/s");
    for writers in [1, 8, 64] {
        let mut runs = Vec::new();
        for _ in 0..reps {
            runs.push(group_commit(&base, writers, seconds).await);
        }
        let rate = median(runs);
        println!(
            "group commit, {writers:>2} writers:              {rate:>10.0} appends/s  ({:.1}x naive)",
            rate / naive_rate
        );
    }
    if !replay {
        return;
    }

    let dir = tempfile::tempdir_in(&base).unwrap();
    let started = Instant::now();
    fill(dir.path(), events).await;
    println!(
        "wrote {events} events for replay in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mut raw = Vec::new();
    {
        // Baseline: the same records read from sled with no decoding and no hashing. sled
        // refuses a segment size other than the log's: twin-log creates logs with 16 MiB
        // (`sled_files::NEW_LOG_SEGMENT_SIZE`).
        let db = sled::Config::new()
            .path(dir.path().join("log"))
            .segment_size(16 << 20)
            .open()
            .unwrap();
        let tree = db.open_tree("events").unwrap();
        for _ in 0..reps {
            let t = Instant::now();
            let bytes: usize = tree.iter().map(|kv| kv.unwrap().1.len()).sum();
            raw.push(events as f64 / t.elapsed().as_secs_f64());
            assert!(bytes > events * payload);
        }
    }
    let reader = LogReader::open(dir.path()).unwrap();
    let mut verified = Vec::new();
    let mut decoded = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let n = reader
            .verified()
            .inspect(|r| assert!(r.is_ok(), "{r:?}"))
            .count();
        verified.push(n as f64 / t.elapsed().as_secs_f64());
        assert_eq!(n, events);
        let t = Instant::now();
        let n = reader
            .raw()
            .inspect(|r| assert!(r.is_ok(), "{r:?}"))
            .count();
        decoded.push(n as f64 / t.elapsed().as_secs_f64());
    }
    let (raw, verified, decoded) = (median(raw), median(verified), median(decoded));
    println!("replay, plain sled iteration (baseline):            {raw:>10.0} events/s");
    println!(
        "replay, decode + own-hash check, no chain:          {decoded:>10.0} events/s  ({:.2}x baseline)",
        decoded / raw
    );
    println!(
        "replay, full hash-chain verification (one core):    {verified:>10.0} events/s  ({:.2}x baseline)",
        verified / raw
    );
}
