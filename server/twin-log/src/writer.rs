//! The log writer: two threads that own every append, commit them in groups and fsync.
//!
//! The **sequencer** blocks for one request, drains whatever else is queued (up to
//! `max_batch`), checks each request's expected stream versions and idempotency key against the
//! state so far, seals the records into the hash chain, writes them into sled's memory as one
//! batch, and hands the batch to the syncer. It then goes straight on to the next batch.
//!
//! The **syncer** takes every batch handed over since its last sync, makes them durable with one
//! `flush` (sled's `sync_file_range`) and one `fsync` of sled's data file (plus, when sled wrote
//! blob files, their fsyncs in the order [`crate::sled_files`] explains), and only then hands the
//! records to the subscriber and answers the requests. The sync holds sled to itself (readers and
//! the sequencer's write wait), so the data file's fsync captures exactly the flushed state; while
//! the drive syncs group N the sequencer is already checking and sealing group N+1, and every
//! sync covers everything that arrived during the previous one.
//!
//! A request that fails its checks is answered in order with the rest, without a write.
//! Readers see records only up to the last durable sequence number.
//!
//! On a write error (a full disk) the syncer fails every request it holds and every one handed
//! to it until the sequencer recovers: the sequencer waits for the syncer to drain, reopens sled
//! (which poisons itself after an I/O error), deletes whatever lies past the last durable record,
//! and rebuilds its state from the log, so nothing reported failed ever appears later.
//! Both threads stop on [`Log::close`] or when every [`Log`] handle is dropped.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use tokio::sync::oneshot;

use crate::record::{self, ChainError, GENESIS_HASH, Idempotency, StoredRecord};
use crate::sled_files::{self, BlobFiles};

pub(crate) const LOG_TREE: &str = "events";

/// Largest payload one event may carry. The cap bounds request size and memory. On its own it
/// does not keep records out of sled's blob files: sled 0.34 writes any *page* over a quarter of
/// a segment to a file of its own, and with the 512 KiB segments of logs created before
/// `sled_files::NEW_LOG_SEGMENT_SIZE` a leaf of a few records of a few tens of KiB is one. New
/// logs' larger segments keep such leaves in the data file; either way the syncer makes blob
/// files durable before it acknowledges (see `sled_files`).
pub const MAX_PAYLOAD_BYTES: usize = 96 * 1024;

/// An event to append; the payload is already encoded by the schema (see `twin-core`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub stream: String,
    pub event_type: String,
    pub schema_version: u16,
    pub payload: Vec<u8>,
}

/// Optimistic concurrency: what the writer expects a stream's version to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    Any,
    /// The stream must not exist yet.
    NoStream,
    Version(u64),
}

#[derive(Debug, Clone)]
pub struct AppendRequest {
    pub actor: String,
    pub events: Vec<NewEvent>,
    pub expect: Vec<(String, Expected)>,
    pub idempotency: Option<Idempotency>,
}

/// What an acknowledged append returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Durable, in sequence order.
    New(Vec<StoredRecord>),
    /// The same actor sent the same key with the same digest before: these are its records.
    Duplicate { first_seq: u64, last_seq: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    #[error("stream {stream} is at version {actual}, expected {expected}")]
    VersionConflict {
        stream: String,
        expected: String,
        actual: u64,
    },
    #[error("idempotency key `{key}` was already used with a different request")]
    IdempotencyConflict { key: String },
    #[error("the log could not make the append durable: {message}")]
    Storage { message: String },
    #[error("an event payload exceeds the log's limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("an append needs at least one event")]
    Empty,
    #[error("the log writer has stopped")]
    Closed,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no event log at {0}")]
    NoLog(PathBuf),
    #[error("the event log at {0} is locked: is a server already running on this data dir?")]
    Locked(PathBuf),
    #[error("cannot open the event log at {0}: {1}")]
    Sled(PathBuf, sled::Error),
    #[error("cannot open the event log at {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("the event log at {dir} fails its hash chain: {error}")]
    Chain { dir: PathBuf, error: ChainError },
}

/// Timings of one durable batch.
#[derive(Debug, Clone)]
pub struct BatchStats {
    pub first_seq: u64,
    pub last_seq: u64,
    pub requests: usize,
    pub records: usize,
    /// sled batch + flush.
    pub write: Duration,
    /// The fsyncs: sled's data file, and any new blob files and their directory.
    pub fsync: Duration,
}

/// Hooks for metrics and tests. `batch_durable` runs after the fsync returned and before any
/// request of the batch is answered.
pub trait LogObserver: Send + Sync {
    fn batch_durable(&self, _stats: &BatchStats) {}
    fn append_failed(&self, _error: &str) {}
}

pub type Subscriber = Box<dyn FnMut(&[StoredRecord]) + Send>;

pub struct LogConfig {
    /// Directory of the sled database (see [`crate::log_dir`]).
    pub dir: PathBuf,
    pub max_batch: usize,
    pub observer: Option<Arc<dyn LogObserver>>,
}

impl LogConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            max_batch: 4096,
            observer: None,
        }
    }
}

type Reply = oneshot::Sender<Result<Appended, AppendError>>;

struct Pending {
    request: AppendRequest,
    reply: Reply,
}

enum Message {
    Append(Pending),
    /// Finish what is queued before it, release sled (and its file lock), then confirm.
    Close(mpsc::Sender<()>),
}

/// The durable state, shared with readers.
///
/// Every sled call goes through `Shared::storage`'s lock, readers' too (a traversal may split a
/// node, which writes): its exclusive mode is what lets a sync run with no sled operation in
/// flight (see [`crate::sled_files`]).
struct Storage {
    db: sled::Db,
    tree: sled::Tree,
    data_file: File,
    blobs: Mutex<BlobFiles>,
}

impl Storage {
    /// Makes everything written to sled so far durable; returns the durations of the flush and
    /// of the fsyncs. The caller must hold every other sled user off (or be the only one, as at
    /// open): see [`crate::sled_files`].
    fn sync_exclusive(&self) -> Result<(Duration, Duration), String> {
        let started = Instant::now();
        self.db.flush().map_err(|e| format!("sled flush: {e}"))?;
        let flushed = Instant::now();
        // sled's flush ends in sync_file_range, which neither flushes the drive's cache nor the
        // file's metadata; fsync does both.
        self.blobs
            .lock()
            .sync(|| self.data_file.sync_all())
            .map_err(|e| format!("fsync: {e}"))?;
        Ok((flushed - started, flushed.elapsed()))
    }
}

struct Shared {
    storage: RwLock<Option<Storage>>,
    /// Highest sequence number that is durable and visible to readers.
    committed: AtomicU64,
    /// Set by the syncer on a write error, cleared by the sequencer once it has recovered.
    failed: AtomicBool,
}

/// A handle to the log. Cloning is cheap; the writer stops when the last clone is dropped.
#[derive(Clone)]
pub struct Log {
    tx: mpsc::Sender<Message>,
    shared: Arc<Shared>,
}

/// Waits (up to 5 s) until nothing in this process holds sled's lock on `dir` any more.
/// Dropping the database does not close its data file at once: sled's I/O threads may still
/// hold clones of it for a moment, and with them the lock, so a reopen straight after `close`
/// (a test's replay, an in-process restart) was refused now and then as "locked".
fn wait_for_release(dir: &Path) {
    let Ok(data) = File::open(dir.join("db")) else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match data.try_lock() {
            Ok(()) => return,
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => {
                tracing::warn!(error = %e, dir = %dir.display(), "sled still holds the log's lock after closing");
                return;
            }
        }
    }
}

pub(crate) fn open_db(dir: &Path) -> Result<sled::Db, OpenError> {
    std::fs::create_dir_all(dir).map_err(|e| OpenError::Io(dir.to_owned(), e))?;
    // Blobs whose names a power cut lost must be back before sled's recovery looks for them,
    // and blobs a crash left unsynced durable before that recovery fsyncs pointers to them. Only
    // under sled's own lock (an exclusive flock of its data file): a server running on this log
    // must not have its blob directory touched by an offline reader that will then be refused.
    match File::open(dir.join("db")) {
        Ok(data) => {
            data.try_lock().map_err(|e| match e {
                std::fs::TryLockError::WouldBlock => OpenError::Locked(dir.to_owned()),
                std::fs::TryLockError::Error(e) => OpenError::Io(dir.to_owned(), e),
            })?;
            let prepared =
                sled_files::prepare(dir).map_err(|e| OpenError::Io(dir.to_owned(), e))?;
            if prepared != sled_files::Prepared::default() {
                tracing::warn!(
                    restored = prepared.restored,
                    linked = prepared.linked,
                    "sled blob files: names a crash lost restored, unsynced files made durable"
                );
            }
            // Dropping the file releases the lock for sled to take.
        }
        // A new log: nothing to prepare.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(OpenError::Io(dir.to_owned(), e)),
    }
    let segment_size =
        sled_files::segment_size(dir).map_err(|e| OpenError::Io(dir.to_owned(), e))?;
    sled::Config::new()
        .path(dir)
        // Large enough that a new log's pages stay out of blob files (see `sled_files`).
        .segment_size(segment_size)
        // No background flusher: durability is the writer's job, batch by batch.
        .flush_every_ms(None)
        .open()
        .map_err(|e| match &e {
            // sled reports its directory lock as a plain I/O error; name it.
            sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                OpenError::Locked(dir.to_owned())
            }
            _ => OpenError::Sled(dir.to_owned(), e),
        })
}

fn open_storage(dir: &Path) -> Result<Storage, OpenError> {
    let io = |e| OpenError::Io(dir.to_owned(), e);
    let db = open_db(dir)?;
    let tree = db
        .open_tree(LOG_TREE)
        .map_err(|e| OpenError::Sled(dir.to_owned(), e))?;
    let data_file = File::open(dir.join("db")).map_err(io)?;
    let storage = Storage {
        db,
        tree,
        data_file,
        blobs: Mutex::new(BlobFiles::open(dir).map_err(io)?),
    };
    // Whatever this open replays must be durable, even what a crashed predecessor left only in
    // the page cache (sled recovers it, and new appends chain onto it), blobs included. Nothing
    // else uses this sled yet.
    storage
        .sync_exclusive()
        .map_err(|e| io(std::io::Error::other(e)))?;
    // sled writes its `conf` once, at creation, and never fsyncs it.
    File::open(dir.join("conf"))
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    // The names created at open (`conf`, `db`, `blobs/`, `blob-links/`, a snapshot sled renamed
    // into place) and the log directory's own name in the data directory, which `open_db` may
    // have created.
    sled_files::sync_dir(dir).map_err(io)?;
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    sled_files::sync_dir(parent).map_err(io)?;
    Ok(storage)
}

#[derive(Default)]
struct State {
    last_seq: u64,
    last_hash: [u8; 32],
    last_ts: i64,
    versions: HashMap<String, u64>,
    /// (actor, key) → (digest, first seq, last seq). Rebuilt from the records at open.
    idempotency: HashMap<(String, String), ([u8; 32], u64, u64)>,
}

impl State {
    fn absorb(&mut self, r: &StoredRecord) {
        self.last_seq = r.seq;
        self.last_hash = r.hash;
        self.last_ts = self.last_ts.max(r.ts);
        self.versions.insert(r.stream.clone(), r.stream_version);
        if let Some(i) = &r.idempotency {
            self.idempotency
                .entry((r.actor.clone(), i.key.clone()))
                .and_modify(|e| e.2 = r.seq)
                .or_insert((i.digest, r.seq, r.seq));
        }
    }
}

impl Log {
    /// Opens (or creates) the log, checks the whole hash chain, passes every existing record to
    /// `replay` in order, and starts the writer. `subscriber` then sees every new durable batch.
    pub fn open(
        config: LogConfig,
        mut replay: impl FnMut(&StoredRecord),
        subscriber: Subscriber,
    ) -> Result<Log, OpenError> {
        let storage = open_storage(&config.dir)?;
        let mut state = State {
            last_hash: GENESIS_HASH,
            ..State::default()
        };
        for r in record::verified(storage.tree.iter()) {
            let r = r.map_err(|error| OpenError::Chain {
                dir: config.dir.clone(),
                error,
            })?;
            state.absorb(&r);
            replay(&r);
        }
        let shared = Arc::new(Shared {
            storage: RwLock::new(Some(storage)),
            committed: AtomicU64::new(state.last_seq),
            failed: AtomicBool::new(false),
        });
        let (sync_tx, sync_rx) = mpsc::channel();
        let syncer = Syncer {
            observer: config.observer.clone(),
            shared: shared.clone(),
            subscriber,
        };
        let syncer = std::thread::Builder::new()
            .name("twin-log-syncer".into())
            .spawn(move || syncer.run(sync_rx))
            .map_err(|e| OpenError::Io(PathBuf::new(), e))?;
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            config,
            shared: shared.clone(),
            state,
            syncer: sync_tx,
            syncer_thread: Some(syncer),
        };
        std::thread::Builder::new()
            .name("twin-log-sequencer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| OpenError::Io(PathBuf::new(), e))?;
        Ok(Log { tx, shared })
    }

    /// Appends atomically; resolves once the records are durable (or the request is refused).
    pub async fn append(&self, request: AppendRequest) -> Result<Appended, AppendError> {
        if request.events.is_empty() {
            return Err(AppendError::Empty);
        }
        if request
            .events
            .iter()
            .any(|e| e.payload.len() > MAX_PAYLOAD_BYTES)
        {
            return Err(AppendError::TooLarge {
                limit: MAX_PAYLOAD_BYTES,
            });
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Message::Append(Pending { request, reply }))
            .map_err(|_| AppendError::Closed)?;
        rx.await.map_err(|_| AppendError::Closed)?
    }

    /// Stops the writer after the appends queued so far and releases the database, so the data
    /// directory can be reopened at once. Later appends on any handle fail with `Closed`.
    pub fn close(&self) {
        let (done, wait) = mpsc::channel();
        if self.tx.send(Message::Close(done)).is_ok() {
            let _ = wait.recv();
        }
    }

    /// Whether the last write failed and the log has not recovered yet: appends are refused
    /// (and the server reports itself unhealthy) until it has.
    pub fn is_failing(&self) -> bool {
        self.shared.failed.load(Ordering::Acquire)
    }

    /// The highest durable sequence number (0 for an empty log).
    pub fn last_seq(&self) -> u64 {
        self.shared.committed.load(Ordering::Acquire)
    }

    /// Up to `limit` durable records with `seq >= from`, in order.
    pub fn read_from(&self, from: u64, limit: usize) -> Result<Vec<StoredRecord>, ChainError> {
        let last = self.last_seq();
        let guard = self.shared.storage.read();
        let storage = guard.as_ref().ok_or_else(|| ChainError::Storage {
            message: "the log is recovering from a write error".into(),
        })?;
        storage
            .tree
            .range(record::key(from.max(1))..)
            .take(limit)
            .map(|kv| {
                let (k, v) = kv.map_err(|e| ChainError::Storage {
                    message: e.to_string(),
                })?;
                record::decode(&k, &v)
            })
            .take_while(|r| r.as_ref().map_or(true, |r| r.seq <= last))
            .collect()
    }
}

struct Writer {
    config: LogConfig,
    shared: Arc<Shared>,
    /// Includes every batch handed to the syncer, durable or not yet.
    state: State,
    syncer: mpsc::Sender<SyncMessage>,
    syncer_thread: Option<std::thread::JoinHandle<()>>,
}

/// What the checks of one request decided.
enum Verdict {
    Accept { first: usize, last: usize },
    Answer(Result<Appended, AppendError>),
}

/// A batch written to sled's memory, waiting to be made durable.
struct Group {
    records: Vec<StoredRecord>,
    answers: Vec<(Reply, Verdict)>,
    write: Duration,
}

enum SyncMessage {
    Group(Group),
    /// Answered once everything sent before it is synced or failed.
    Barrier(mpsc::Sender<()>),
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn storage_error(message: &str) -> AppendError {
    AppendError::Storage {
        message: message.to_owned(),
    }
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Message>) {
        let mut closing = None;
        while let Ok(first) = rx.recv() {
            let mut batch = Vec::new();
            let mut next = Some(first);
            while let Some(message) = next.take() {
                match message {
                    Message::Append(p) => batch.push(p),
                    Message::Close(done) => {
                        closing = Some(done);
                        break;
                    }
                }
                if batch.len() < self.config.max_batch {
                    next = rx.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                self.sequence(batch);
            }
            if closing.is_some() {
                break;
            }
        }
        // Let the syncer finish what it holds, then release sled (and its file lock).
        let (syncer, thread) = (self.syncer, self.syncer_thread.take());
        drop(syncer);
        if let Some(t) = thread {
            let _ = t.join();
        }
        *self.shared.storage.write() = None;
        wait_for_release(&self.config.dir);
        tracing::debug!("log writer stopped");
        if let Some(done) = closing {
            let _ = done.send(());
        }
    }

    fn sequence(&mut self, batch: Vec<Pending>) {
        if self.shared.failed.load(Ordering::Acquire)
            && let Err(e) = self.recover()
        {
            let message = format!("recovery after an earlier write error failed: {e}");
            tracing::error!(error = %message, "log append failed");
            if let Some(o) = &self.config.observer {
                o.append_failed(&message);
            }
            for p in batch {
                let _ = p.reply.send(Err(storage_error(&message)));
            }
            return;
        }
        // Stage every check and record against an overlay of this batch's own changes.
        let mut versions: HashMap<String, u64> = HashMap::new();
        let mut keys: HashMap<(String, String), ([u8; 32], u64, u64)> = HashMap::new();
        let mut records: Vec<StoredRecord> = Vec::new();
        let mut values: Vec<Vec<u8>> = Vec::new();
        let mut answers = Vec::with_capacity(batch.len());
        let ts = now_ms().max(self.state.last_ts);
        let mut prev_hash = self.state.last_hash;
        for p in batch {
            let req = &p.request;
            let state = &self.state;
            let version_of = |versions: &HashMap<String, u64>, s: &str| {
                versions
                    .get(s)
                    .or_else(|| state.versions.get(s))
                    .copied()
                    .unwrap_or(0)
            };
            if let Some(idem) = &req.idempotency {
                let id = (req.actor.clone(), idem.key.clone());
                if let Some((digest, first, last)) =
                    keys.get(&id).or_else(|| self.state.idempotency.get(&id))
                {
                    let answer = if *digest == idem.digest {
                        Ok(Appended::Duplicate {
                            first_seq: *first,
                            last_seq: *last,
                        })
                    } else {
                        Err(AppendError::IdempotencyConflict {
                            key: idem.key.clone(),
                        })
                    };
                    answers.push((p.reply, Verdict::Answer(answer)));
                    continue;
                }
            }
            let conflict = req.expect.iter().find_map(|(stream, expected)| {
                let actual = version_of(&versions, stream);
                let ok = match expected {
                    Expected::Any => true,
                    Expected::NoStream => actual == 0,
                    Expected::Version(v) => actual == *v,
                };
                (!ok).then(|| AppendError::VersionConflict {
                    stream: stream.clone(),
                    expected: match expected {
                        Expected::NoStream => "no stream".into(),
                        other => format!("{other:?}"),
                    },
                    actual,
                })
            });
            if let Some(err) = conflict {
                answers.push((p.reply, Verdict::Answer(Err(err))));
                continue;
            }
            let first = records.len();
            for e in &req.events {
                let stream_version = version_of(&versions, &e.stream) + 1;
                versions.insert(e.stream.clone(), stream_version);
                let mut r = StoredRecord {
                    seq: self.state.last_seq + records.len() as u64 + 1,
                    ts,
                    stream: e.stream.clone(),
                    stream_version,
                    event_type: e.event_type.clone(),
                    schema_version: e.schema_version,
                    actor: req.actor.clone(),
                    idempotency: req.idempotency.clone(),
                    payload: e.payload.clone(),
                    prev_hash,
                    hash: [0; 32],
                };
                values.push(r.seal());
                prev_hash = r.hash;
                records.push(r);
            }
            if let Some(idem) = &req.idempotency {
                let seqs = (records[first].seq, records[records.len() - 1].seq);
                keys.insert(
                    (req.actor.clone(), idem.key.clone()),
                    (idem.digest, seqs.0, seqs.1),
                );
            }
            let last = records.len() - 1;
            answers.push((p.reply, Verdict::Accept { first, last }));
        }

        let started = Instant::now();
        if !records.is_empty() {
            if let Err(message) = self.write(&records, values) {
                // Nothing of this batch reached the syncer: answer it here, recover next time.
                tracing::error!(error = %message, "log append failed; nothing in this batch was acknowledged");
                if let Some(o) = &self.config.observer {
                    o.append_failed(&message);
                }
                self.shared.failed.store(true, Ordering::Release);
                // Every answer, even a conflict, may rest on this batch's own failed records.
                for (reply, _) in answers {
                    let _ = reply.send(Err(storage_error(&message)));
                }
                return;
            }
            for r in &records {
                self.state.absorb(r);
            }
        }
        let group = Group {
            records,
            answers,
            write: started.elapsed(),
        };
        if self.syncer.send(SyncMessage::Group(group)).is_err() {
            tracing::error!("the log syncer has stopped");
        }
    }

    /// Writes a sealed batch into sled's memory; the syncer makes it durable.
    fn write(&self, records: &[StoredRecord], values: Vec<Vec<u8>>) -> Result<(), String> {
        let guard = self.shared.storage.read();
        let storage = guard.as_ref().ok_or("the log storage is closed")?;
        let mut batch = sled::Batch::default();
        for (r, v) in records.iter().zip(values) {
            batch.insert(&record::key(r.seq), v);
        }
        storage
            .tree
            .apply_batch(batch)
            .map_err(|e| format!("sled write: {e}"))
    }

    /// After a write error: wait for the syncer to drain, reopen sled, delete records past the
    /// last durable one, and rebuild the sequencer's state from what is left.
    fn recover(&mut self) -> Result<(), String> {
        let (done, wait) = mpsc::channel();
        self.syncer
            .send(SyncMessage::Barrier(done))
            .map_err(|_| "the log syncer has stopped")?;
        let _ = wait.recv();
        let durable = self.shared.committed.load(Ordering::Acquire);
        let mut guard = self.shared.storage.write();
        *guard = None; // sled poisons itself after an I/O error: drop it before reopening
        let storage = open_storage(&self.config.dir).map_err(|e| e.to_string())?;
        let stale: Vec<_> = storage
            .tree
            .range(record::key(durable + 1)..)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        if !stale.is_empty() {
            let mut batch = sled::Batch::default();
            for k in &stale {
                batch.remove(k);
            }
            storage.tree.apply_batch(batch).map_err(|e| e.to_string())?;
            // Not yet published: nothing else can reach this sled.
            storage.sync_exclusive()?;
            tracing::warn!(
                removed = stale.len(),
                "removed unacknowledged records left by a failed write"
            );
        }
        let mut state = State {
            last_hash: GENESIS_HASH,
            ..State::default()
        };
        for r in record::verified(storage.tree.iter()) {
            state.absorb(&r.map_err(|e| e.to_string())?);
        }
        self.state = state;
        *guard = Some(storage);
        self.shared.failed.store(false, Ordering::Release);
        tracing::info!(
            last_seq = self.state.last_seq,
            "event log recovered from a write error"
        );
        Ok(())
    }
}

struct Syncer {
    observer: Option<Arc<dyn LogObserver>>,
    shared: Arc<Shared>,
    subscriber: Subscriber,
}

impl Syncer {
    /// Syncs every group handed over since the last sync, then answers them in order.
    fn run(mut self, rx: mpsc::Receiver<SyncMessage>) {
        while let Ok(first) = rx.recv() {
            let mut groups = Vec::new();
            let mut barriers = Vec::new();
            let mut next = Some(first);
            while let Some(message) = next.take() {
                match message {
                    SyncMessage::Group(g) => groups.push(g),
                    SyncMessage::Barrier(b) => barriers.push(b),
                }
                next = rx.try_recv().ok();
            }
            self.sync(groups);
            for b in barriers {
                let _ = b.send(());
            }
        }
    }

    fn sync(&mut self, groups: Vec<Group>) {
        let records: usize = groups.iter().map(|g| g.records.len()).sum();
        let outcome = if self.shared.failed.load(Ordering::Acquire) {
            Err("an earlier write failed and the log is recovering".to_owned())
        } else if records == 0 {
            Ok(None)
        } else {
            self.flush().map(Some)
        };
        let timings = match outcome {
            Ok(t) => t,
            Err(message) => {
                if !self.shared.failed.swap(true, Ordering::AcqRel) {
                    tracing::error!(error = %message, "log append failed; nothing in this sync was acknowledged");
                    if let Some(o) = &self.observer {
                        o.append_failed(&message);
                    }
                }
                // Every answer, even a conflict or a duplicate, may rest on records that were
                // never made durable.
                for g in groups {
                    for (reply, _) in g.answers {
                        let _ = reply.send(Err(storage_error(&message)));
                    }
                }
                return;
            }
        };
        if let (Some((flush, fsync)), Some(last)) =
            (timings, groups.iter().rev().find_map(|g| g.records.last()))
        {
            let first = groups
                .iter()
                .find_map(|g| g.records.first())
                .map_or(last.seq, |r| r.seq);
            for g in &groups {
                if !g.records.is_empty() {
                    let apply = std::panic::AssertUnwindSafe(|| (self.subscriber)(&g.records));
                    if std::panic::catch_unwind(apply).is_err() {
                        tracing::error!(
                            first_seq = g.records[0].seq,
                            "the log subscriber panicked; the records are durable, restart to rebuild projections"
                        );
                    }
                }
            }
            // Published after the subscriber: a reader never sees an event its projection lacks.
            self.shared.committed.store(last.seq, Ordering::Release);
            if let Some(o) = &self.observer {
                o.batch_durable(&BatchStats {
                    first_seq: first,
                    last_seq: last.seq,
                    requests: groups.iter().map(|g| g.answers.len()).sum(),
                    records,
                    write: groups.iter().map(|g| g.write).sum::<Duration>() + flush,
                    fsync,
                });
            }
        }
        for g in groups {
            let Group {
                records, answers, ..
            } = g;
            for (reply, v) in answers {
                let answer = match v {
                    Verdict::Accept { first, last } => {
                        Ok(Appended::New(records[first..=last].to_vec()))
                    }
                    Verdict::Answer(a) => a,
                };
                // A caller that went away no longer needs its answer; the records are durable.
                let _ = reply.send(answer);
            }
        }
    }

    /// Makes everything written so far durable; returns the durations of the flush and of the
    /// fsyncs.
    ///
    /// Holds sled to itself: with a write or a traversal in flight, the data file's fsync could
    /// capture a pointer to a blob file written after the syncer listed them, and a power cut
    /// would leave that pointer dangling (see [`crate::sled_files`]).
    fn flush(&self) -> Result<(Duration, Duration), String> {
        let guard = self.shared.storage.write();
        let storage = guard.as_ref().ok_or("the log storage is closed")?;
        storage.sync_exclusive()
    }
}
