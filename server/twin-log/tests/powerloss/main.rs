//! Crash consistency under simulated power loss: every acknowledged append survives a power cut
//! and the hash chain verifies.
//!
//! The log runs in a child process (this test binary again, in child mode) on a FUSE file system
//! ([`fs::PowerCutFs`]) that keeps everything not yet fsynced in memory. The test lets the child
//! append small records and records of 16–90 KB (which, in a log with sled's old 512 KiB segments,
//! make sled write its own blob files; a new log's segments keep them in the data file; half the
//! rounds run on each), collects each acknowledgement the child prints, kills the child at a
//! chosen point, cuts the
//! power (drops whatever was not durable), and reopens the surviving image with the real
//! `Log::open`, which checks the whole chain. Each round continues on the image the last one
//! left, so recovery from a cut is itself cut; some rounds kill only the process, so the next
//! child recovers unsynced writes still in the file system's memory before the power goes.
//!
//! Needs FUSE: `/dev/fuse` and the right to mount (root, or fusermount3). Without them it says
//! why and skips. `TWIN_POWERLOSS_ROUNDS` runs more rounds, `TWIN_POWERLOSS_SEED` fixes the
//! workload's seed (the timing of the cuts stays free).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

mod fs;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use twin_log::{AppendRequest, Appended, Expected, Log, LogConfig, NewEvent, StoredRecord};

/// Set in the child: the data directory (the FUSE mount) to append to.
const CHILD_DIR: &str = "TWIN_POWERLOSS_CHILD_DIR";
const CHILD_SEED: &str = "TWIN_POWERLOSS_CHILD_SEED";
/// This test's name, for the child's command line.
const TEST_NAME: &str = "acknowledged_appends_survive_power_cuts";
/// Starts each line the child reports on (the rest of its stdout is the test harness's).
const MARK: &str = "@powerloss ";

/// How a round ends.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// Power cut after this many acknowledgements in the round.
    PowerAfter(usize),
    /// Power cut a few milliseconds after the child starts: while it opens the log (recovering
    /// from the last cut), or soon after.
    PowerEarly,
    /// Only the process dies, after this many acknowledgements: what it wrote but never synced
    /// stays in the file system's memory, like a page cache, and the next child recovers it.
    CrashAfter(usize),
}

use Stop::{CrashAfter, PowerAfter, PowerEarly};

/// The rounds, in order; the test runs them twice (or `TWIN_POWERLOSS_ROUNDS` rounds).
const STOPS: &[Stop] = &[
    PowerAfter(0),
    PowerAfter(3),
    PowerAfter(12),
    PowerEarly,
    PowerAfter(40),
    CrashAfter(30),
    PowerAfter(5),
    PowerAfter(90),
    CrashAfter(10),
    CrashAfter(50),
    PowerAfter(7),
    PowerAfter(150),
    PowerAfter(25),
    PowerEarly,
    CrashAfter(20),
    PowerEarly,
    PowerAfter(60),
    PowerAfter(120),
];

#[test]
fn acknowledged_appends_survive_power_cuts() {
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        let seed = std::env::var(CHILD_SEED).unwrap().parse().unwrap();
        child(Path::new(&dir), seed);
        return;
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIPPED power-loss test: /dev/fuse does not exist (FUSE is unavailable here)");
        return;
    }
    let rounds: usize = std::env::var("TWIN_POWERLOSS_ROUNDS")
        .map(|r| r.parse().unwrap())
        .unwrap_or(2 * STOPS.len());
    let seed: u64 = std::env::var("TWIN_POWERLOSS_SEED")
        .map(|s| s.parse().unwrap())
        .unwrap_or_else(|_| rand::rng().random());
    eprintln!("power-loss test: {rounds} rounds, TWIN_POWERLOSS_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    // First a log as twin-log created them before it chose sled's segment size (sled's default,
    // 512 KiB): its pages of a few large records go to blob files. Then a log created now, whose
    // pages stay in the data file.
    let started = Instant::now();
    let Some(legacy) = run_log(true, rounds.div_ceil(2), &mut rng) else {
        return;
    };
    let new = run_log(false, rounds / 2, &mut rng).expect("mounted before");
    eprintln!(
        "power-loss test: {rounds} rounds ({} power cuts) in {:.1} s, {} acknowledged records \
         all survived",
        legacy.power_cuts + new.power_cuts,
        started.elapsed().as_secs_f64(),
        legacy.acked + new.acked
    );
    assert!(
        legacy.blob_files > 0,
        "the workload made sled write no blob file: this test no longer covers them"
    );
    if rounds > 1 {
        assert_eq!(new.blob_files, 0, "a new log's pages went to blob files");
    }
}

fn label(legacy: bool) -> &'static str {
    if legacy {
        "512 KiB-segment log"
    } else {
        "new log"
    }
}

/// What one log went through.
struct Outcome {
    acked: usize,
    power_cuts: usize,
    blob_files: u64,
}

/// Runs `rounds` rounds on one log (on a FUSE mount of its own image) and checks it after each
/// power cut.
/// Returns `None` when FUSE cannot mount here.
fn run_log(legacy: bool, rounds: usize, rng: &mut impl Rng) -> Option<Outcome> {
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("disk");
    let mount = work.path().join("mnt");
    std::fs::create_dir(&image).unwrap();
    std::fs::create_dir(&mount).unwrap();
    if legacy {
        drop(sled::open(twin_log::log_dir(&image)).unwrap());
    }

    // Every acknowledged record so far: seq → hash. A later cut must not lose an earlier one.
    let mut acked: BTreeMap<u64, [u8; 32]> = BTreeMap::new();
    let mut mounted: Option<(fuser::BackgroundSession, fs::Control)> = None;
    let mut blob_files = 0;
    let mut power_cuts = 0;
    for round in 0..rounds {
        let stop = STOPS[round % STOPS.len()];
        if mounted.is_none() {
            let (filesystem, control) = fs::PowerCutFs::load(&image).unwrap();
            let mut config = fuser::Config::default();
            config
                .mount_options
                .push(fuser::MountOption::FSName("twin-powercut".into()));
            match fuser::spawn_mount(filesystem, &mount, &config) {
                Ok(session) => mounted = Some((session, control)),
                Err(e) if round == 0 && legacy => {
                    eprintln!("SKIPPED power-loss test: cannot mount a FUSE file system here: {e}");
                    return None;
                }
                Err(e) => panic!("round {round}: mount failed after earlier rounds mounted: {e}"),
            }
        }

        let round_acks = run_child(&mount, stop, rng, round);
        for (seq, hash) in round_acks {
            assert!(
                acked.insert(seq, hash).is_none(),
                "seq {seq} acknowledged twice"
            );
        }
        if let CrashAfter(_) = stop {
            eprintln!(
                "{} round {round}: {stop:?}: {} acked so far",
                label(legacy),
                acked.len()
            );
            continue;
        }

        let (session, control) = mounted.take().unwrap();
        let stats = control.cut();
        session.umount_and_join().unwrap();
        control.write_durable_image(&image).unwrap();
        power_cuts += 1;
        blob_files += stats.blob_files_created;

        // Reboot: the real open, which verifies the whole chain.
        let links_missing = missing_blob_names(&image);
        let mut survived: BTreeMap<u64, [u8; 32]> = BTreeMap::new();
        let log = Log::open(
            LogConfig::new(twin_log::log_dir(&image)),
            |r: &StoredRecord| {
                survived.insert(r.seq, r.hash);
            },
            Box::new(|_: &[StoredRecord]| {}),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{} round {round} ({stop:?}): the log does not reopen: {e}",
                label(legacy)
            )
        });
        log.close();
        drop(log);

        let lost: Vec<u64> = acked
            .iter()
            .filter(|(seq, hash)| survived.get(*seq) != Some(*hash))
            .map(|(seq, _)| *seq)
            .collect();
        assert!(
            lost.is_empty(),
            "{} round {round} ({stop:?}): {} acknowledged records lost or changed, first {:?}; \
             {} records survived",
            label(legacy),
            lost.len(),
            &lost[..lost.len().min(10)],
            survived.len()
        );
        // Records past the last acknowledgement may or may not have survived; the next round
        // chains onto whatever did.
        eprintln!(
            "{} round {round}: {stop:?}: {} acked so far, {} records after reboot; {} fsyncs, \
             {} directory fsyncs, {} blob files created, {} blob names not durable at the cut, \
             {} restored from links, {} files with lost writes",
            label(legacy),
            acked.len(),
            survived.len(),
            stats.file_fsyncs,
            stats.dir_fsyncs,
            stats.blob_files_created,
            stats.blob_names_lost,
            links_missing,
            stats.files_with_lost_writes
        );
    }
    if let Some((session, _)) = mounted {
        session.umount_and_join().unwrap();
    }
    Some(Outcome {
        acked: acked.len(),
        power_cuts,
        blob_files,
    })
}

/// Runs one child on the mounted file system until `stop`, then kills it (SIGKILL). Returns the
/// acknowledgements it printed, all given before it died.
fn run_child(mount: &Path, stop: Stop, rng: &mut impl Rng, round: usize) -> Vec<(u64, [u8; 32])> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, mount)
        .env(CHILD_SEED, rng.random::<u64>().to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if lines_tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });

    let mut acks = Vec::new();
    let mut opened = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    let jitter = Duration::from_micros(rng.random_range(0..3000));
    match stop {
        PowerEarly => std::thread::sleep(Duration::from_millis(rng.random_range(5..60))),
        PowerAfter(k) | CrashAfter(k) => loop {
            let line = lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|e| {
                    panic!("round {round}: the child stopped or stalled before {k} acks: {e}")
                });
            absorb(&line, &mut acks, &mut opened);
            if opened && acks.len() >= k {
                std::thread::sleep(jitter);
                break;
            }
        },
    }
    // Killed before the power goes: every acknowledgement it printed came before the cut.
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();
    for line in lines.try_iter() {
        absorb(&line, &mut acks, &mut opened);
    }
    acks
}

fn absorb(line: &str, acks: &mut Vec<(u64, [u8; 32])>, opened: &mut bool) {
    // The test harness prints `test <name> ... ` with no newline before the child's first line.
    let Some(at) = line.find(MARK) else {
        return;
    };
    let mut words = line[at + MARK.len()..].split_whitespace();
    match words.next() {
        Some("opened") => *opened = true,
        Some("ack") => {
            let seq = words.next().unwrap().parse().unwrap();
            let hash = hex::decode(words.next().unwrap()).unwrap();
            acks.push((seq, hash.try_into().unwrap()));
        }
        other => panic!("unexpected line from the child: {other:?}"),
    }
}

/// Blob names in the link directory that the cut lost from sled's `blobs/` (the open will link
/// them back).
fn missing_blob_names(data_dir: &Path) -> usize {
    let log = twin_log::log_dir(data_dir);
    let names = |d: PathBuf| -> Vec<_> {
        std::fs::read_dir(d)
            .map(|r| r.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default()
    };
    let blobs = names(log.join("blobs"));
    names(log.join("blob-links"))
        .into_iter()
        .filter(|n| !blobs.contains(n))
        .count()
}

/// The child: appends until it is killed, printing each acknowledged record.
fn child(data_dir: &Path, seed: u64) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let log = Log::open(
            LogConfig::new(twin_log::log_dir(data_dir)),
            |_| {},
            Box::new(|_: &[StoredRecord]| {}),
        )
        .unwrap();
        report(&format!("{MARK}opened {}\n", log.last_seq()));
        let writers: Vec<_> = (0..4u64)
            .map(|w| {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ w);
                    // Bounded, in case the parent never kills this process.
                    for _ in 0..10_000 {
                        let events = (0..rng.random_range(1..=2))
                            .map(|_| NewEvent {
                                stream: format!("job/w{w}"),
                                event_type: "test".into(),
                                schema_version: 1,
                                payload: payload(&mut rng),
                            })
                            .collect();
                        let request = AppendRequest {
                            actor: "powerloss".into(),
                            events,
                            expect: vec![(format!("job/w{w}"), Expected::Any)],
                            idempotency: None,
                        };
                        match log.append(request).await {
                            Ok(Appended::New(records)) => report(
                                &records
                                    .iter()
                                    .map(|r| {
                                        format!("{MARK}ack {} {}\n", r.seq, hex::encode(r.hash))
                                    })
                                    .collect::<String>(),
                            ),
                            other => panic!("append: {other:?}"),
                        }
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
    });
}

/// Writes the lines to the parent, at once; exits quietly once the parent stopped listening.
fn report(lines: &str) {
    let mut out = std::io::stdout().lock();
    if out
        .write_all(lines.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        std::process::exit(0);
    }
}

/// Half small payloads, half of 16–90 KB (under the 96 KiB cap): a sled leaf holding a few of
/// those is over sled's 128 KiB threshold and goes to a blob file of its own.
fn payload(rng: &mut impl Rng) -> Vec<u8> {
    let len = if rng.random_bool(0.5) {
        rng.random_range(16..2_000)
    } else {
        rng.random_range(16_000..90_000)
    };
    let mut bytes = vec![0u8; len];
    rng.fill(&mut bytes[..]);
    bytes
}
