//! Behaviour of the event log: durability before acknowledgement, concurrency, idempotency, the chain.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use twin_log::{
    AppendError, AppendRequest, Appended, BatchStats, Expected, Idempotency, Log, LogConfig,
    LogObserver, LogReader, NewEvent, StoredRecord,
};

fn event(stream: &str, payload: &str) -> NewEvent {
    NewEvent {
        stream: stream.into(),
        event_type: "test".into(),
        schema_version: 1,
        payload: payload.as_bytes().to_vec(),
    }
}

fn request(stream: &str, payload: &str, expect: Expected) -> AppendRequest {
    AppendRequest {
        actor: "alice".into(),
        events: vec![event(stream, payload)],
        expect: vec![(stream.into(), expect)],
        idempotency: None,
    }
}

fn open(
    dir: &std::path::Path,
    observer: Option<Arc<dyn LogObserver>>,
) -> (Log, Arc<Mutex<Vec<u64>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let mut config = LogConfig::new(twin_log::log_dir(dir));
    config.observer = observer;
    let log = Log::open(
        config,
        |_| {},
        Box::new(move |records: &[StoredRecord]| {
            sink.lock().unwrap().extend(records.iter().map(|r| r.seq))
        }),
    )
    .expect("open log");
    (log, seen)
}

/// The segment size twin-log gives a new sled log (`sled_files::NEW_LOG_SEGMENT_SIZE`).
const NEW_LOG_SEGMENT_SIZE: usize = 16 << 20;

/// Creates an empty log the way twin-log did before it chose its segment size: sled's default
/// (512 KiB), under which pages of a few large records go to blob files. The log keeps it.
fn legacy_log(dir: &std::path::Path) {
    drop(sled::open(twin_log::log_dir(dir)).unwrap());
}

fn blob_files(dir: &std::path::Path) -> Vec<std::fs::DirEntry> {
    std::fs::read_dir(twin_log::log_dir(dir).join("blobs"))
        .unwrap()
        .map(|e| e.unwrap())
        .collect()
}

fn seqs(a: &Appended) -> Vec<u64> {
    match a {
        Appended::New(records) => records.iter().map(|r| r.seq).collect(),
        Appended::Duplicate {
            first_seq,
            last_seq,
        } => (*first_seq..=*last_seq).collect(),
    }
}

#[tokio::test]
async fn appends_are_chained_ordered_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, seen) = open(dir.path(), None);
        for i in 0..5 {
            let a = log
                .append(request("job/a", &format!("e{i}"), Expected::Version(i)))
                .await
                .unwrap();
            assert_eq!(seqs(&a), vec![i + 1]);
        }
        assert_eq!(
            *seen.lock().unwrap(),
            vec![1, 2, 3, 4, 5],
            "the subscriber sees every record in order"
        );
        assert_eq!(
            log.read_from(4, 10)
                .unwrap()
                .iter()
                .map(|r| r.seq)
                .collect::<Vec<_>>(),
            vec![4, 5]
        );
        log.close();
    }
    let reader = LogReader::open(dir.path()).unwrap();
    let all: Vec<_> = reader.verified().collect::<Result<_, _>>().unwrap();
    assert_eq!(all.len(), 5);
    assert_eq!(all[4].stream_version, 5);
    assert_eq!(all[4].prev_hash, all[3].hash);
    drop(reader);
    let (log, _) = open(dir.path(), None);
    let a = log
        .append(request("job/a", "after", Expected::Version(5)))
        .await
        .unwrap();
    assert_eq!(
        seqs(&a),
        vec![6],
        "stream versions and sequence numbers resume after a reopen"
    );
}

#[tokio::test]
async fn a_stale_expected_version_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path(), None);
    log.append(request("job/a", "1", Expected::NoStream))
        .await
        .unwrap();
    let err = log
        .append(request("job/a", "2", Expected::NoStream))
        .await
        .unwrap_err();
    assert!(
        matches!(err, AppendError::VersionConflict { actual: 1, .. }),
        "{err:?}"
    );
    let err = log
        .append(request("job/a", "2", Expected::Version(0)))
        .await
        .unwrap_err();
    assert!(matches!(err, AppendError::VersionConflict { .. }));
    assert_eq!(log.last_seq(), 1);
}

#[tokio::test]
async fn idempotency_keys_return_the_original_or_conflict_for_the_life_of_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let keyed = |actor: &str, digest: u8| AppendRequest {
        actor: actor.into(),
        idempotency: Some(Idempotency {
            key: "k1".into(),
            digest: [digest; 32],
        }),
        ..request("job/x", "p", Expected::Any)
    };
    {
        let (log, _) = open(dir.path(), None);
        let first = log.append(keyed("alice", 1)).await.unwrap();
        assert_eq!(seqs(&first), vec![1]);
        let again = log.append(keyed("alice", 1)).await.unwrap();
        assert_eq!(
            again,
            Appended::Duplicate {
                first_seq: 1,
                last_seq: 1
            }
        );
        let other = log.append(keyed("alice", 2)).await.unwrap_err();
        assert_eq!(other, AppendError::IdempotencyConflict { key: "k1".into() });
        let bob = log.append(keyed("bob", 2)).await.unwrap();
        assert_eq!(seqs(&bob), vec![2], "keys are scoped per actor");
        log.close();
    }
    let (log, _) = open(dir.path(), None);
    assert_eq!(
        log.append(keyed("alice", 1)).await.unwrap(),
        Appended::Duplicate {
            first_seq: 1,
            last_seq: 1
        }
    );
    assert!(
        log.append(keyed("alice", 3)).await.is_err(),
        "keys survive a restart"
    );
}

/// Records the highest sequence number whose batch has been fsynced.
#[derive(Default)]
struct SyncWatch {
    synced_through: AtomicU64,
    batches: AtomicU64,
    gate: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl LogObserver for SyncWatch {
    fn batch_durable(&self, stats: &BatchStats) {
        if let Some(gate) = self.gate.lock().unwrap().as_ref() {
            gate.recv().ok();
        }
        self.batches.fetch_add(1, Ordering::SeqCst);
        self.synced_through
            .fetch_max(stats.last_seq, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledgement_comes_after_the_fsync_of_its_record() {
    let dir = tempfile::tempdir().unwrap();
    let watch = Arc::new(SyncWatch::default());
    let (log, _) = open(dir.path(), Some(watch.clone()));
    let mut tasks = Vec::new();
    for w in 0..64 {
        let (log, watch) = (log.clone(), watch.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                let a = log
                    .append(request(
                        &format!("job/w{w}"),
                        &format!("{i}"),
                        Expected::Any,
                    ))
                    .await
                    .unwrap();
                let seq = seqs(&a)[0];
                let synced = watch.synced_through.load(Ordering::SeqCst);
                assert!(
                    synced >= seq,
                    "seq {seq} acknowledged before its fsync (synced through {synced})"
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let batches = watch.batches.load(Ordering::SeqCst);
    assert!(
        batches < 64 * 20,
        "group commit: 1280 appends took {batches} fsyncs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_waits_while_its_sync_has_not_completed() {
    let dir = tempfile::tempdir().unwrap();
    let (release, gate) = std::sync::mpsc::channel();
    let watch = Arc::new(SyncWatch {
        gate: Mutex::new(Some(gate)),
        ..SyncWatch::default()
    });
    let (log, _) = open(dir.path(), Some(watch.clone()));
    let pending = tokio::spawn({
        let log = log.clone();
        async move { log.append(request("job/a", "x", Expected::Any)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pending.is_finished(),
        "acknowledged while the sync point was still held"
    );
    release.send(()).unwrap();
    let a = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(seqs(&a), vec![1]);
}

#[tokio::test]
async fn a_tampered_record_stops_verification_at_its_sequence_number() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, _) = open(dir.path(), None);
        for i in 0..10 {
            log.append(request("job/a", &format!("payload-{i}"), Expected::Any))
                .await
                .unwrap();
        }
        log.close();
    }
    {
        let db = sled::Config::new()
            .path(twin_log::log_dir(dir.path()))
            .segment_size(NEW_LOG_SEGMENT_SIZE)
            .open()
            .unwrap();
        let tree = db.open_tree("events").unwrap();
        let key = 7u64.to_be_bytes();
        let mut value = tree.get(key).unwrap().unwrap().to_vec();
        let last = value.len() - 1;
        value[last] ^= 0x01;
        tree.insert(key, value).unwrap();
        db.flush().unwrap();
    }
    let reader = LogReader::open(dir.path()).unwrap();
    let results: Vec<_> = reader.verified().collect();
    assert_eq!(results.len(), 7, "verification stops at the bad record");
    let err = results[6].as_ref().unwrap_err();
    assert_eq!(err.seq(), Some(7), "{err}");
    drop(reader);
    match Log::open(
        LogConfig::new(twin_log::log_dir(dir.path())),
        |_| {},
        Box::new(|_: &[StoredRecord]| {}),
    ) {
        Err(e) => assert!(e.to_string().contains("record 7"), "{e}"),
        Ok(_) => panic!("a tampered log must not open for writing"),
    }
}

#[tokio::test]
async fn an_oversized_event_is_refused_before_it_reaches_sled() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path(), None);
    let mut req = request("job/a", "x", Expected::Any);
    req.events[0].payload = vec![0; twin_log::MAX_PAYLOAD_BYTES + 1];
    let err = log.append(req).await.unwrap_err();
    assert_eq!(
        err,
        AppendError::TooLarge {
            limit: twin_log::MAX_PAYLOAD_BYTES
        }
    );
    assert_eq!(log.last_seq(), 0);
}

/// The premise of `sled_files`: in a log with sled's default segment size, records far under the
/// payload cap still make sled write pages to files of their own (sled 0.34 does so for any page
/// over 128 KiB, and a leaf holds up to 17 records), and every one of them is mirrored by a hard
/// link in `blob-links/` once acknowledged.
#[tokio::test]
async fn records_under_the_cap_make_sled_write_blob_files_which_the_log_keeps_linked() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    legacy_log(dir.path());
    let (log, _) = open(dir.path(), None);
    for i in 0..60u8 {
        let mut req = request("job/big", "", Expected::Any);
        req.events[0].payload = vec![i; 20_000];
        log.append(req).await.unwrap();
    }
    let log_dir = twin_log::log_dir(dir.path());
    let blobs = blob_files(dir.path());
    assert!(
        !blobs.is_empty(),
        "sixty 20 KB records left no blob file: sled's threshold moved, revisit sled_files.rs"
    );
    for blob in &blobs {
        let link = log_dir.join("blob-links").join(blob.file_name());
        assert_eq!(
            std::fs::metadata(&link).map(|m| m.ino()).ok(),
            Some(blob.metadata().unwrap().ino()),
            "{:?} has no durable link",
            blob.file_name()
        );
    }
    log.close();
    let reader = LogReader::open(dir.path()).unwrap();
    let all: Vec<_> = reader.verified().collect::<Result<_, _>>().unwrap();
    assert_eq!(all.len(), 60);
    assert!(
        all.iter()
            .enumerate()
            .all(|(i, r)| r.payload == vec![i as u8; 20_000])
    );
}

#[tokio::test]
async fn an_offline_reader_of_a_log_in_use_is_refused_before_it_touches_the_log() {
    let dir = tempfile::tempdir().unwrap();
    legacy_log(dir.path());
    let (log, _) = open(dir.path(), None);
    let mut req = request("job/big", "", Expected::Any);
    req.events[0].payload = vec![7; 20_000];
    for _ in 0..30 {
        log.append(req.clone()).await.unwrap();
    }
    // A blob without its link: an open would link it, which it must not do to a log in use.
    let links = twin_log::log_dir(dir.path()).join("blob-links");
    let first = std::fs::read_dir(&links).unwrap().next().unwrap().unwrap();
    std::fs::remove_file(first.path()).unwrap();
    match LogReader::open(dir.path()) {
        Err(twin_log::OpenError::Locked(_)) => {}
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("a log in use opened twice"),
    }
    assert!(
        !first.path().exists(),
        "the refused reader relinked a blob of the running log"
    );
}

/// A new log's segment is large enough that no page of records under the cap goes to a blob
/// file: 60 records at the cap, 17 to a leaf, leave none.
#[tokio::test]
async fn a_new_log_keeps_records_at_the_cap_out_of_blob_files() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open(dir.path(), None);
    for i in 0..60u8 {
        let mut req = request("job/big", "", Expected::Any);
        req.events[0].payload = vec![i; twin_log::MAX_PAYLOAD_BYTES];
        log.append(req).await.unwrap();
    }
    log.close();
    assert_eq!(blob_files(dir.path()).len(), 0);
    let reader = LogReader::open(dir.path()).unwrap();
    assert_eq!(reader.verified().filter(|r| r.is_ok()).count(), 60);
}
