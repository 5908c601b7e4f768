//! Offline reading for audits: a copy of the log, never the log itself, and the chain head.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use twin_log::{AppendRequest, Expected, GENESIS_HASH, Log, LogConfig, LogReader, NewEvent};

fn request(payload: Vec<u8>) -> AppendRequest {
    AppendRequest {
        actor: "alice".into(),
        events: vec![NewEvent {
            stream: "job/big".into(),
            event_type: "test".into(),
            schema_version: 1,
            payload,
        }],
        expect: vec![("job/big".into(), Expected::Any)],
        idempotency: None,
    }
}

fn open(dir: &Path) -> Log {
    Log::open(
        LogConfig::new(twin_log::log_dir(dir)),
        |_| {},
        Box::new(|_: &[twin_log::StoredRecord]| {}),
    )
    .unwrap()
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

fn set_writable(dir: &Path, writable: bool) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            set_writable(&path, writable);
        }
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        let mode = if writable {
            mode | 0o200
        } else {
            mode & !0o222
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let mode = std::fs::metadata(dir).unwrap().permissions().mode();
    let mode = if writable {
        mode | 0o200
    } else {
        mode & !0o222
    };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The audit's promise: a read-only log (`chmod -R a-w`) reads, and is left byte for byte and
/// time for time as it was, even where twin-log's open would repair it. Contents and times are
/// compared as well as the permissions tried, since CI runs as root, whom `chmod` does not stop.
#[tokio::test]
async fn a_copy_of_a_read_only_log_reads_and_leaves_it_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // sled's old 512 KiB segments, so large records go to sled blob files and twin-log's links.
    drop(sled::open(twin_log::log_dir(&data)).unwrap());
    let log = open(&data);
    for i in 0..30u8 {
        log.append(request(vec![i; 20_000])).await.unwrap();
    }
    let head = log.head().unwrap();
    log.close();
    // A blob without its link, as a crash leaves one: an open in place would link it.
    let links = twin_log::log_dir(&data).join("blob-links");
    let link = std::fs::read_dir(&links).unwrap().next().unwrap().unwrap();
    std::fs::remove_file(link.path()).unwrap();

    let before = files(&data);
    set_writable(&data, false);
    let scratch = tempfile::tempdir().unwrap();
    let read = {
        let reader = LogReader::open_copy(&data, scratch.path()).unwrap();
        reader.verified().map(|r| r.unwrap()).collect::<Vec<_>>()
    };
    set_writable(&data, true);
    assert_eq!(read.len(), 30);
    assert_eq!((read[29].seq, read[29].hash), (head.seq, head.hash));
    assert!(
        files(&data) == before,
        "reading a copy changed the audited directory"
    );
    assert_eq!(
        std::fs::read_dir(scratch.path()).unwrap().count(),
        0,
        "the copy is removed once read"
    );

    // Why a copy: opening in place writes (here, the lost link comes back).
    drop(LogReader::open(&data).unwrap());
    assert!(files(&data) != before, "an open in place wrote nothing");
}

#[tokio::test]
async fn a_copy_of_a_log_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    log.append(request(b"x".to_vec())).await.unwrap();
    let scratch = tempfile::tempdir().unwrap();
    match LogReader::open_copy(dir.path(), scratch.path()) {
        Err(twin_log::OpenError::Locked(_)) => {}
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("copied a log a server is writing"),
    }
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        LogReader::open_copy(empty.path(), scratch.path()),
        Err(twin_log::OpenError::NoLog(_))
    ));
}

#[tokio::test]
async fn the_head_is_the_last_durable_record() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let empty = log.head().unwrap();
    assert_eq!((empty.seq, empty.hash), (0, GENESIS_HASH));
    for i in 0..3u8 {
        log.append(request(vec![i])).await.unwrap();
    }
    let head = log.head().unwrap();
    log.close();
    let last = LogReader::open(dir.path())
        .unwrap()
        .verified()
        .last()
        .unwrap()
        .unwrap();
    assert_eq!((head.seq, head.hash), (3, last.hash));
}
