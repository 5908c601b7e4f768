//! The content-addressed blob store: `blobs/sha256/<2 hex>/<64 hex>`, written atomically.
//!
//! A blob is streamed into a temporary file while hashed, fsynced, checked against the hash the
//! client claimed (if any), then renamed into place and its directory fsynced. A blob that exists
//! is never rewritten, so concurrent uploads of the same bytes are harmless.
//!
//! Resumable uploads ([`UploadWriter`]) keep their partial file and a small JSON sidecar under
//! `blobs/uploads/`, so a session survives a restart; the sidecar's `offset` is the durable one
//! (written after an fsync of the data), and anything past it is cut off when the session is
//! next used. The finished file is renamed into `sha256/` like any other blob.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use twin_core::BlobHash;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob {0} not found")]
    NotFound(BlobHash),
    #[error("blob {expected}: content hashes to {actual}")]
    HashMismatch {
        expected: BlobHash,
        actual: BlobHash,
    },
    #[error("blob exceeds the size limit of {limit} bytes")]
    TooLarge { limit: u64 },
    /// The file system is full (ENOSPC or a quota): what was being written is removed.
    #[error("blob store at {path}: no space left")]
    NoSpace { path: PathBuf },
    #[error("upload {0} not found")]
    UploadNotFound(String),
    /// Another request is writing to the session.
    #[error("upload {0} is busy with another request; retry")]
    UploadBusy(String),
    #[error("upload {id} continues at byte {expected}, not at {got}")]
    OffsetMismatch { id: String, expected: u64, got: u64 },
    #[error("blob store at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Whether an I/O error means the file system has no room (so the caller can say "full",
/// distinct from a fault).
fn is_no_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> BlobError + '_ {
    move |source| {
        if is_no_space(&source) {
            BlobError::NoSpace {
                path: path.to_owned(),
            }
        } else {
            BlobError::Io {
                path: path.to_owned(),
                source,
            }
        }
    }
}

/// A stored blob, as [`BlobStore::list`] yields it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlob {
    pub hash: BlobHash,
    pub bytes: u64,
    /// When it was stored (the file's modification time; blobs are never rewritten).
    pub modified: SystemTime,
}

#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
    /// Shared by every clone, so all the server's workers see one table of upload sessions.
    uploads: Arc<Uploads>,
}

impl BlobStore {
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, BlobError> {
        let root = root.into();
        for d in [root.join("sha256"), root.join("tmp")] {
            fs::create_dir_all(&d).map_err(io_at(&d))?;
        }
        let uploads = Arc::new(Uploads {
            dir: root.join("uploads"),
            sessions: Mutex::new(HashMap::new()),
        });
        Ok(Self { root, uploads })
    }

    /// A store to read only: creates nothing, so an audit leaves the directory as it found it
    /// (writes through it fail, for want of `tmp/`).
    pub fn open_existing(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        let uploads = Arc::new(Uploads {
            dir: root.join("uploads"),
            sessions: Mutex::new(HashMap::new()),
        });
        Self { root, uploads }
    }

    /// The store's root directory (its file system is the one uploads fill).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every stored blob (not temporary or partial files), in no particular order. A blob being
    /// removed meanwhile may be skipped or yield an error.
    pub fn list(&self) -> impl Iterator<Item = Result<StoredBlob, BlobError>> + use<> {
        let top = self.root.join("sha256");
        let prefixes: Vec<Result<PathBuf, BlobError>> = match fs::read_dir(&top) {
            Ok(entries) => entries
                .filter_map(|entry| match entry {
                    Ok(e) => {
                        let name = e.file_name();
                        let name = name.to_str()?;
                        (name.len() == 2 && name.bytes().all(|b| b.is_ascii_hexdigit()))
                            .then(|| Ok(e.path()))
                    }
                    Err(err) => Some(Err(io_at(&top)(err))),
                })
                .collect(),
            Err(e) => vec![Err(io_at(&top)(e))],
        };
        prefixes.into_iter().flat_map(|prefix| {
            let listed: Box<dyn Iterator<Item = Result<StoredBlob, BlobError>>> = match prefix {
                Err(e) => Box::new(std::iter::once(Err(e))),
                Ok(dir) => match fs::read_dir(&dir) {
                    Err(e) => Box::new(std::iter::once(Err(io_at(&dir)(e)))),
                    Ok(entries) => Box::new(entries.filter_map(move |entry| {
                        let entry = match entry {
                            Ok(e) => e,
                            Err(e) => return Some(Err(io_at(&dir)(e))),
                        };
                        let name = entry.file_name();
                        // Stray files (not a 64-hex name under its own prefix) are not blobs.
                        let hash: BlobHash = name.to_str()?.parse().ok()?;
                        if !dir.ends_with(&hash.to_hex()[..2]) {
                            return None;
                        }
                        let path = entry.path();
                        match entry.metadata() {
                            Ok(m) if m.is_file() => Some(Ok(StoredBlob {
                                hash,
                                bytes: m.len(),
                                modified: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                            })),
                            Ok(_) => None,
                            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                            Err(e) => Some(Err(io_at(&path)(e))),
                        }
                    })),
                },
            };
            listed
        })
    }

    /// Removes a stored blob; false if it was not there. Durable when it returns (the directory
    /// is fsynced).
    pub fn remove(&self, hash: &BlobHash) -> Result<bool, BlobError> {
        let path = self.path(hash);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_at(&path)(e)),
        }
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        Ok(true)
    }

    pub fn path(&self, hash: &BlobHash) -> PathBuf {
        let hex = hash.to_hex();
        self.root.join("sha256").join(&hex[..2]).join(hex)
    }

    pub fn contains(&self, hash: &BlobHash) -> bool {
        self.path(hash).is_file()
    }

    /// Size of a stored blob.
    pub fn len(&self, hash: &BlobHash) -> Result<u64, BlobError> {
        match fs::metadata(self.path(hash)) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(BlobError::NotFound(*hash)),
            Err(e) => Err(io_at(&self.path(hash))(e)),
        }
    }

    pub fn open_blob(&self, hash: &BlobHash) -> Result<File, BlobError> {
        let path = self.path(hash);
        File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => BlobError::NotFound(*hash),
            _ => io_at(&path)(e),
        })
    }

    pub fn read(&self, hash: &BlobHash) -> Result<Vec<u8>, BlobError> {
        let mut out = Vec::new();
        let path = self.path(hash);
        self.open_blob(hash)?
            .read_to_end(&mut out)
            .map_err(io_at(&path))?;
        Ok(out)
    }

    /// Stores bytes; returns their hash.
    pub fn put(&self, bytes: &[u8]) -> Result<BlobHash, BlobError> {
        let mut w = self.writer(u64::MAX)?;
        w.write(bytes)?;
        Ok(w.finish(None)?.0)
    }

    /// Starts a streamed upload of at most `limit` bytes.
    pub fn writer(&self, limit: u64) -> Result<BlobWriter, BlobError> {
        let tmp = self.root.join("tmp");
        let file = tempfile::NamedTempFile::new_in(&tmp).map_err(io_at(&tmp))?;
        Ok(BlobWriter {
            store: self.clone(),
            file,
            hasher: Sha256::new(),
            len: 0,
            limit,
        })
    }

    /// Re-hashes a stored blob.
    pub fn verify(&self, hash: &BlobHash) -> Result<(), BlobError> {
        let path = self.path(hash);
        let mut file = self.open_blob(hash)?;
        let mut hasher = Sha256::new();
        io::copy(&mut file, &mut hasher).map_err(io_at(&path))?;
        let actual = BlobHash(hasher.finalize().into());
        if actual == *hash {
            Ok(())
        } else {
            Err(BlobError::HashMismatch {
                expected: *hash,
                actual,
            })
        }
    }
}

/// A blob being written. Dropping it without `finish` removes the temporary file.
pub struct BlobWriter {
    store: BlobStore,
    file: tempfile::NamedTempFile,
    hasher: Sha256,
    len: u64,
    limit: u64,
}

impl BlobWriter {
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), BlobError> {
        self.len += chunk.len() as u64;
        if self.len > self.limit {
            return Err(BlobError::TooLarge { limit: self.limit });
        }
        self.hasher.update(chunk);
        let path = self.file.path().to_owned();
        self.file.write_all(chunk).map_err(io_at(&path))
    }

    /// Makes the blob durable under its hash; fails if it does not hash to `expected`.
    pub fn finish(self, expected: Option<BlobHash>) -> Result<(BlobHash, u64), BlobError> {
        let actual = BlobHash(self.hasher.finalize().into());
        if let Some(expected) = expected.filter(|e| *e != actual) {
            return Err(BlobError::HashMismatch { expected, actual });
        }
        let dest = self.store.path(&actual);
        if dest.is_file() {
            return Ok((actual, self.len));
        }
        let dir = dest.parent().expect("blob paths have a parent").to_owned();
        fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        let tmp_path = self.file.path().to_owned();
        self.file.as_file().sync_all().map_err(io_at(&tmp_path))?;
        self.file
            .persist(&dest)
            .map_err(|e| io_at(&dest)(e.error))?;
        sync_dir(&dir)?;
        Ok((actual, self.len))
    }
}

fn sync_dir(dir: &Path) -> Result<(), BlobError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

// --- resumable uploads ---

/// What a session's sidecar (`uploads/<id>.json`) holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct UploadMeta {
    id: String,
    /// Who created it; only they (or an admin) may use it.
    owner: String,
    /// The declared total length.
    bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hash: Option<BlobHash>,
    /// Bytes of the partial file known durable (fsynced before this was written).
    offset: u64,
}

/// A session as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadInfo {
    pub id: String,
    pub owner: String,
    pub bytes: u64,
    pub hash: Option<BlobHash>,
    /// Durable bytes received: where the next write must start.
    pub offset: u64,
}

/// A session in memory.
struct Slot {
    meta: UploadMeta,
    /// The SHA-256 state over the first `meta.offset` bytes; `None` after a restart (rehashed
    /// from the partial file on first write).
    hasher: Option<Sha256>,
    /// A writer holds the session.
    busy: bool,
    last_used: SystemTime,
}

/// The upload sessions of one store.
struct Uploads {
    dir: PathBuf,
    sessions: Mutex<HashMap<String, Slot>>,
}

impl std::fmt::Debug for Uploads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uploads")
            .field("dir", &self.dir)
            .field("sessions", &self.sessions.lock().len())
            .finish()
    }
}

/// Session ids are generated by the caller; only these characters reach a path.
fn valid_upload_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

impl Uploads {
    fn meta_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn part_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.part"))
    }

    /// Writes the sidecar atomically (temporary file, rename, directory fsync).
    fn write_meta(&self, meta: &UploadMeta) -> Result<(), BlobError> {
        let path = self.meta_path(&meta.id);
        let tmp = self.dir.join(format!("{}.json.tmp", meta.id));
        let text = serde_json::to_vec(meta).map_err(|e| BlobError::Io {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(io_at(&path)(e));
        }
        sync_dir(&self.dir)
    }

    fn read_meta(&self, id: &str) -> Result<UploadMeta, BlobError> {
        let path = self.meta_path(id);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BlobError::UploadNotFound(id.to_owned()));
            }
            Err(e) => return Err(io_at(&path)(e)),
        };
        let meta: UploadMeta = serde_json::from_slice(&text).map_err(|e| BlobError::Io {
            path: path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?;
        if meta.id != id {
            return Err(BlobError::UploadNotFound(id.to_owned()));
        }
        Ok(meta)
    }

    /// Removes a session's files (best effort for the partial, whose space is what matters).
    fn remove_files(&self, id: &str) {
        for path in [self.part_path(id), self.meta_path(id)] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "removing an upload file")
                }
            }
        }
        let _ = sync_dir(&self.dir);
    }

    /// The slot of `id` under the lock, loaded from disk if this process has not seen it.
    fn slot<'a>(
        &self,
        sessions: &'a mut HashMap<String, Slot>,
        id: &str,
    ) -> Result<&'a mut Slot, BlobError> {
        if !valid_upload_id(id) {
            return Err(BlobError::UploadNotFound(id.chars().take(80).collect()));
        }
        if !sessions.contains_key(id) {
            let mut meta = self.read_meta(id)?;
            // The partial file may be shorter than the sidecar says only if it was damaged;
            // then the session continues from what is there (and is rehashed anyway).
            let part = self.part_path(id);
            let len = match fs::metadata(&part) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
                Err(e) => return Err(io_at(&part)(e)),
            };
            meta.offset = meta.offset.min(len);
            sessions.insert(
                id.to_owned(),
                Slot {
                    meta,
                    hasher: None,
                    busy: false,
                    last_used: SystemTime::now(),
                },
            );
        }
        sessions
            .get_mut(id)
            .ok_or_else(|| BlobError::UploadNotFound(id.to_owned()))
    }
}

impl Slot {
    fn info(&self) -> UploadInfo {
        UploadInfo {
            id: self.meta.id.clone(),
            owner: self.meta.owner.clone(),
            bytes: self.meta.bytes,
            hash: self.meta.hash,
            offset: self.meta.offset,
        }
    }
}

impl BlobStore {
    /// Creates an upload session `id` (letters and digits; the caller makes it unique) of `bytes`
    /// bytes for `owner`. With a `hash`, an unfinished session of the same owner, hash and length
    /// is returned instead (`false`: not created), so an interrupted client continues it.
    pub fn create_upload(
        &self,
        id: &str,
        owner: &str,
        bytes: u64,
        hash: Option<BlobHash>,
    ) -> Result<(UploadInfo, bool), BlobError> {
        let up = &self.uploads;
        if !valid_upload_id(id) {
            return Err(BlobError::UploadNotFound(id.chars().take(80).collect()));
        }
        fs::create_dir_all(&up.dir).map_err(io_at(&up.dir))?;
        if let Some(hash) = hash
            && let Some(found) = self.find_upload(owner, bytes, hash)?
        {
            return Ok((found, false));
        }
        let meta = UploadMeta {
            id: id.to_owned(),
            owner: owner.to_owned(),
            bytes,
            hash,
            offset: 0,
        };
        // The sidecar first: a partial file without one is an orphan the sweep removes.
        up.write_meta(&meta)?;
        let part = up.part_path(id);
        if let Err(e) = File::create(&part) {
            up.remove_files(id);
            return Err(io_at(&part)(e));
        }
        let slot = Slot {
            meta,
            hasher: Some(Sha256::new()),
            busy: false,
            last_used: SystemTime::now(),
        };
        let info = slot.info();
        up.sessions.lock().insert(id.to_owned(), slot);
        Ok((info, true))
    }

    /// An unfinished session of `owner` for this blob, in memory or on disk.
    fn find_upload(
        &self,
        owner: &str,
        bytes: u64,
        hash: BlobHash,
    ) -> Result<Option<UploadInfo>, BlobError> {
        let up = &self.uploads;
        let entries = match fs::read_dir(&up.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_at(&up.dir)(e)),
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            let mut sessions = up.sessions.lock();
            let Ok(slot) = up.slot(&mut sessions, id) else {
                continue;
            };
            let m = &slot.meta;
            if m.owner == owner && m.bytes == bytes && m.hash == Some(hash) {
                return Ok(Some(slot.info()));
            }
        }
        Ok(None)
    }

    /// A session's state.
    pub fn upload(&self, id: &str) -> Result<UploadInfo, BlobError> {
        let mut sessions = self.uploads.sessions.lock();
        Ok(self.uploads.slot(&mut sessions, id)?.info())
    }

    /// Abandons a session and removes its partial file; refused while a writer holds it.
    pub fn delete_upload(&self, id: &str) -> Result<(), BlobError> {
        let up = &self.uploads;
        let mut sessions = up.sessions.lock();
        if up.slot(&mut sessions, id)?.busy {
            return Err(BlobError::UploadBusy(id.to_owned()));
        }
        sessions.remove(id);
        up.remove_files(id);
        Ok(())
    }

    /// Takes the session for writing at `offset` (which must be its durable offset). Blocking:
    /// after a restart the partial file is rehashed here. The session is busy until the
    /// writer is finished, aborted or dropped.
    pub fn begin_upload(&self, id: &str, offset: u64) -> Result<UploadWriter, BlobError> {
        let up = &self.uploads;
        let (meta, hasher) = {
            let mut sessions = up.sessions.lock();
            let slot = up.slot(&mut sessions, id)?;
            if slot.busy {
                return Err(BlobError::UploadBusy(id.to_owned()));
            }
            if slot.meta.offset != offset {
                return Err(BlobError::OffsetMismatch {
                    id: id.to_owned(),
                    expected: slot.meta.offset,
                    got: offset,
                });
            }
            slot.busy = true;
            slot.last_used = SystemTime::now();
            (slot.meta.clone(), slot.hasher.take())
        };
        // From here the slot is busy: the guard gives it back whatever happens next.
        let hashed = hasher.is_some() || meta.offset == 0;
        let mut writer = UploadWriter {
            store: self.clone(),
            durable_hasher: hasher.clone().unwrap_or_default(),
            hasher: hasher.unwrap_or_default(),
            hashed,
            durable: meta.offset,
            offset: meta.offset,
            file: None,
            meta,
            done: false,
        };
        writer.open()?;
        Ok(writer)
    }

    /// Removes sessions idle longer than `max_idle` (their partial files too) and orphaned
    /// partial files; returns how many sessions went.
    pub fn sweep_uploads(&self, max_idle: Duration) -> Result<usize, BlobError> {
        let up = &self.uploads;
        let entries = match fs::read_dir(&up.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_at(&up.dir)(e)),
        };
        let now = SystemTime::now();
        let idle_since = |path: &Path| -> Option<Duration> {
            let modified = fs::metadata(path).and_then(|m| m.modified()).ok()?;
            now.duration_since(modified).ok()
        };
        let mut swept = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let (id, sidecar) = if let Some(id) = name.strip_suffix(".json") {
                (id, true)
            } else if let Some(id) = name.strip_suffix(".part") {
                (id, false)
            } else {
                // A sidecar's temporary file left by a crash.
                if name.ends_with(".json.tmp") && idle_since(&entry.path()) > Some(max_idle) {
                    let _ = fs::remove_file(entry.path());
                }
                continue;
            };
            if !valid_upload_id(id) {
                continue;
            }
            let mut sessions = up.sessions.lock();
            if !sidecar {
                if !up.meta_path(id).exists()
                    && !sessions.contains_key(id)
                    && idle_since(&entry.path()) > Some(max_idle)
                {
                    up.remove_files(id);
                }
                continue;
            }
            let idle = match sessions.get(id) {
                Some(slot) if slot.busy => continue,
                Some(slot) => now.duration_since(slot.last_used).unwrap_or_default(),
                None => {
                    // Not used since this process started: the files' times tell.
                    let part = idle_since(&up.part_path(id)).unwrap_or(Duration::MAX);
                    idle_since(&entry.path()).unwrap_or(Duration::MAX).min(part)
                }
            };
            if idle > max_idle {
                sessions.remove(id);
                up.remove_files(id);
                swept += 1;
            }
        }
        Ok(swept)
    }
}

/// A session being written (one `PATCH`). Dropped without [`UploadWriter::finish`] or
/// [`UploadWriter::abort`], it makes what it received durable (or, failing that, cuts the
/// partial file back to its last checkpoint) and gives the session back, so a broken request
/// leaves a consistent session.
pub struct UploadWriter {
    store: BlobStore,
    meta: UploadMeta,
    file: Option<File>,
    hasher: Sha256,
    /// Whether `hasher` covers the partial file (false after a restart until it is rehashed).
    hashed: bool,
    /// Bytes written so far.
    offset: u64,
    /// Bytes fsynced and recorded in the sidecar, and the hash state there.
    durable: u64,
    durable_hasher: Sha256,
    done: bool,
}

impl UploadWriter {
    /// Opens the partial file at the durable offset, rehashing it unless the hash state is known.
    fn open(&mut self) -> Result<(), BlobError> {
        let part = self.store.uploads.part_path(&self.meta.id);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&part)
            .map_err(io_at(&part))?;
        // Bytes past the checkpoint were never acknowledged as durable: they go.
        file.set_len(self.durable).map_err(io_at(&part))?;
        if !self.hashed {
            let mut hasher = Sha256::new();
            file.seek(SeekFrom::Start(0)).map_err(io_at(&part))?;
            let copied =
                io::copy(&mut (&mut file).take(self.durable), &mut hasher).map_err(io_at(&part))?;
            if copied != self.durable {
                return Err(io_at(&part)(io::Error::other(format!(
                    "partial file holds {copied} of {} bytes",
                    self.durable
                ))));
            }
            self.hasher = hasher.clone();
            self.durable_hasher = hasher;
            self.hashed = true;
        }
        file.seek(SeekFrom::Start(self.durable))
            .map_err(io_at(&part))?;
        self.file = Some(file);
        Ok(())
    }

    pub fn id(&self) -> &str {
        &self.meta.id
    }

    /// Bytes received so far (written, not necessarily durable).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The declared total length.
    pub fn bytes(&self) -> u64 {
        self.meta.bytes
    }

    /// Appends a chunk; refuses one that would pass the declared length (nothing of it is
    /// written).
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), BlobError> {
        if self.offset + chunk.len() as u64 > self.meta.bytes {
            return Err(BlobError::TooLarge {
                limit: self.meta.bytes,
            });
        }
        let part = self.store.uploads.part_path(&self.meta.id);
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io_at(&part)(io::Error::other("upload file not open")))?;
        file.write_all(chunk).map_err(io_at(&part))?;
        self.hasher.update(chunk);
        self.offset += chunk.len() as u64;
        Ok(())
    }

    /// Makes everything written so far durable and records it as the session's offset.
    pub fn checkpoint(&mut self) -> Result<(), BlobError> {
        if self.offset == self.durable {
            return Ok(());
        }
        let part = self.store.uploads.part_path(&self.meta.id);
        if let Some(f) = &self.file {
            f.sync_data().map_err(io_at(&part))?;
        }
        let mut meta = self.meta.clone();
        meta.offset = self.offset;
        self.store.uploads.write_meta(&meta)?;
        self.meta = meta;
        self.durable = self.offset;
        self.durable_hasher = self.hasher.clone();
        let mut sessions = self.store.uploads.sessions.lock();
        if let Some(slot) = sessions.get_mut(&self.meta.id) {
            slot.meta.offset = self.durable;
            slot.last_used = SystemTime::now();
        }
        Ok(())
    }

    /// With every declared byte received: checks the claimed hash (a mismatch removes the
    /// session), then moves the file into the store. Returns the blob's hash and length.
    pub fn finish(mut self) -> Result<(BlobHash, u64), BlobError> {
        let up = self.store.uploads.clone();
        let id = self.meta.id.clone();
        let part = up.part_path(&id);
        if self.offset != self.meta.bytes {
            return Err(io_at(&part)(io::Error::other(format!(
                "finish with {} of {} bytes",
                self.offset, self.meta.bytes
            ))));
        }
        let actual = BlobHash(std::mem::take(&mut self.hasher).finalize().into());
        if let Some(expected) = self.meta.hash.filter(|e| *e != actual) {
            self.abort();
            return Err(BlobError::HashMismatch { expected, actual });
        }
        let result = (|| {
            if let Some(f) = self.file.take() {
                f.sync_all().map_err(io_at(&part))?;
            }
            let dest = self.store.path(&actual);
            if !dest.is_file() {
                let dir = dest.parent().unwrap_or(&self.store.root).to_owned();
                fs::create_dir_all(&dir).map_err(io_at(&dir))?;
                fs::rename(&part, &dest).map_err(io_at(&dest))?;
                sync_dir(&dir)?;
            }
            Ok((actual, self.meta.bytes))
        })();
        // Stored (or failing with the bytes in an unknown state): the session is over.
        self.done = true;
        up.sessions.lock().remove(&id);
        up.remove_files(&id);
        result
    }

    /// Ends the session and removes its partial file (a full disk, a refused upload).
    pub fn abort(mut self) {
        self.abort_in_place();
    }

    fn abort_in_place(&mut self) {
        self.done = true;
        self.file = None;
        let up = &self.store.uploads;
        up.sessions.lock().remove(&self.meta.id);
        up.remove_files(&self.meta.id);
    }
}

impl Drop for UploadWriter {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if self.file.is_some() && self.offset != self.durable {
            // A request cut short: what arrived is kept, durably, so the client continues from
            // there; if that fails, the session goes back to its last checkpoint.
            if let Err(e) = self.checkpoint() {
                tracing::warn!(id = %self.meta.id, error = %e, "upload checkpoint on drop");
                if let Some(f) = &self.file {
                    let _ = f.set_len(self.durable);
                }
                self.offset = self.durable;
            }
        }
        self.file = None;
        let mut sessions = self.store.uploads.sessions.lock();
        if let Some(slot) = sessions.get_mut(&self.meta.id) {
            slot.busy = false;
            slot.meta.offset = self.durable;
            slot.hasher = self.hashed.then(|| self.durable_hasher.clone());
            slot.last_used = SystemTime::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_then_verify_then_detect_tampering() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::open(dir.path()).expect("open");
        let h = store.put(b"hello").expect("put");
        assert_eq!(h, BlobHash::of(b"hello"));
        store.verify(&h).expect("intact");
        assert_eq!(store.read(&h).expect("read"), b"hello");
        fs::write(store.path(&h), b"jello").expect("tamper");
        assert!(matches!(
            store.verify(&h),
            Err(BlobError::HashMismatch { .. })
        ));
    }

    #[test]
    fn a_wrong_claimed_hash_or_an_oversized_blob_stores_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::open(dir.path()).expect("open");
        let mut w = store.writer(100).expect("writer");
        w.write(b"abc").expect("write");
        let claimed = BlobHash::of(b"xyz");
        assert!(matches!(
            w.finish(Some(claimed)),
            Err(BlobError::HashMismatch { .. })
        ));
        assert!(!store.contains(&BlobHash::of(b"abc")));
        let mut w = store.writer(4).expect("writer");
        assert!(matches!(
            w.write(b"too long"),
            Err(BlobError::TooLarge { limit: 4 })
        ));
        drop(w);
        assert_eq!(
            fs::read_dir(dir.path().join("tmp")).expect("tmp").count(),
            0,
            "temp files are removed"
        );
    }

    #[test]
    fn list_yields_stored_blobs_only_and_remove_deletes_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::open(dir.path()).expect("open");
        let a = store.put(b"a").expect("put");
        let b = store.put(b"bb").expect("put");
        let (_, _) = store.create_upload("u1", "me", 10, None).expect("create");
        fs::write(dir.path().join("sha256").join("stray"), b"x").expect("stray");
        let mut listed: Vec<(BlobHash, u64)> = store
            .list()
            .map(|r| r.map(|s| (s.hash, s.bytes)))
            .collect::<Result<_, _>>()
            .expect("list");
        listed.sort();
        let mut want = vec![(a, 1), (b, 2)];
        want.sort();
        assert_eq!(listed, want);
        assert!(store.remove(&a).expect("remove"));
        assert!(!store.remove(&a).expect("remove again"));
        assert!(!store.contains(&a));
        assert_eq!(store.list().count(), 1);
    }

    #[test]
    fn an_upload_resumes_after_a_broken_write_and_after_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::open(dir.path()).expect("open");
        let data: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        let hash = BlobHash::of(&data);
        let (info, created) = store
            .create_upload("u1", "me", 3000, Some(hash))
            .expect("create");
        assert!(created);
        assert_eq!(info.offset, 0);
        // A write that is checkpointed, then one the request breaks off: the writer dropped
        // keeps what it received.
        let mut w = store.begin_upload("u1", 0).expect("begin");
        assert!(matches!(
            store.begin_upload("u1", 0),
            Err(BlobError::UploadBusy(_))
        ));
        w.write(&data[..600]).expect("write");
        w.checkpoint().expect("checkpoint");
        w.write(&data[600..1000]).expect("write");
        drop(w);
        assert_eq!(store.upload("u1").expect("status").offset, 1000);
        assert!(matches!(
            store.begin_upload("u1", 1500),
            Err(BlobError::OffsetMismatch {
                expected: 1000,
                got: 1500,
                ..
            })
        ));
        // A crash after bytes reached the file but before their checkpoint: they are not
        // counted, and are cut off when the session is next used.
        {
            let mut part = OpenOptions::new()
                .append(true)
                .open(dir.path().join("uploads").join("u1.part"))
                .expect("part");
            part.write_all(b"never acknowledged").expect("junk");
        }
        // The same owner asking again for the same blob gets the session back.
        let (again, created) = store
            .create_upload("u2", "me", 3000, Some(hash))
            .expect("create again");
        assert!(!created);
        assert_eq!((again.id.as_str(), again.offset), ("u1", 1000));
        let (_, created) = store
            .create_upload("u3", "someone-else", 3000, Some(hash))
            .expect("other owner");
        assert!(created, "another owner's session is not shared");

        // A restart: a new store rehashes the partial file on first use.
        let store = BlobStore::open(dir.path()).expect("reopen");
        assert_eq!(store.upload("u1").expect("status").offset, 1000);
        let mut w = store.begin_upload("u1", 1000).expect("begin");
        assert!(matches!(
            w.write(&[0u8; 2001]),
            Err(BlobError::TooLarge { limit: 3000 })
        ));
        w.write(&data[1000..]).expect("write");
        let (stored, len) = w.finish().expect("finish");
        assert_eq!((stored, len), (hash, 3000));
        assert_eq!(store.read(&hash).expect("read"), data);
        assert!(matches!(
            store.upload("u1"),
            Err(BlobError::UploadNotFound(_))
        ));
        assert!(!dir.path().join("uploads").join("u1.part").exists());
    }

    #[test]
    fn a_wrong_claimed_hash_ends_the_session_and_idle_sessions_are_swept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::open(dir.path()).expect("open");
        store
            .create_upload("u1", "me", 3, Some(BlobHash::of(b"xyz")))
            .expect("create");
        let mut w = store.begin_upload("u1", 0).expect("begin");
        w.write(b"abc").expect("write");
        assert!(matches!(w.finish(), Err(BlobError::HashMismatch { .. })));
        assert!(matches!(
            store.upload("u1"),
            Err(BlobError::UploadNotFound(_))
        ));
        assert!(!store.contains(&BlobHash::of(b"abc")));
        store.create_upload("u2", "me", 3, None).expect("create");
        assert_eq!(
            store
                .sweep_uploads(Duration::from_secs(3600))
                .expect("sweep"),
            0
        );
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            store
                .sweep_uploads(Duration::from_millis(1))
                .expect("sweep"),
            1
        );
        assert_eq!(
            fs::read_dir(dir.path().join("uploads"))
                .expect("uploads")
                .count(),
            0,
            "the sweep leaves no files"
        );
        assert!(matches!(
            store.upload("../etc"),
            Err(BlobError::UploadNotFound(_))
        ));
    }
}
