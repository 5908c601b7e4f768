//! Reading a log offline, and the chain head a reader or auditor can anchor.
//!
//! sled 0.34 has no read-only open: opening a database writes to it (recovery, its snapshot
//! file), and twin-log's own open repairs sled's blob files (see `sled_files`). An audit must
//! not change the evidence it audits, so [`LogReader::open_copy`] copies the log directory to a
//! scratch directory, under the original's lock so no server can start writing mid-copy, and
//! opens the copy; the audited directory is only read.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::record::{self, ChainError, StoredRecord};
use crate::writer::{self, Log, OpenError};

/// The chain head: the last durable record's sequence number and hash. Written down somewhere
/// the log's writers cannot reach, it lets a later audit (`twin replay --expect-head`) detect a
/// truncated or rewritten log, which the chain alone cannot: it starts from a constant genesis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// 0 for an empty log.
    pub seq: u64,
    /// [`crate::GENESIS_HASH`] for an empty log.
    pub hash: [u8; 32],
}

impl Log {
    /// The chain head as of now (later appends move it on).
    pub fn head(&self) -> Result<Head, ChainError> {
        let seq = self.last_seq();
        if seq == 0 {
            return Ok(Head {
                seq,
                hash: record::GENESIS_HASH,
            });
        }
        match self.read_from(seq, 1)?.into_iter().next() {
            Some(r) if r.seq == seq => Ok(Head { seq, hash: r.hash }),
            _ => Err(ChainError::Storage {
                message: format!("the last durable record, {seq}, is missing"),
            }),
        }
    }
}

/// Reads a log offline (the server must not be running on it: sled holds a lock).
pub struct LogReader {
    tree: sled::Tree,
    _db: sled::Db,
    /// The copy [`LogReader::open_copy`] reads, removed on drop (after the database closes:
    /// fields drop in order).
    _copy: Option<tempfile::TempDir>,
}

impl LogReader {
    /// Opens the log of a data directory in place. sled writes on open, and so may twin-log's
    /// repair of sled's blob files: auditors use [`LogReader::open_copy`].
    pub fn open(data_dir: &Path) -> Result<Self, OpenError> {
        Self::open_log(&crate::log_dir(data_dir), None)
    }

    /// Opens a copy of the log of a data directory, made in a new directory under `scratch`
    /// (which needs room for the whole log), and never writes to `data_dir`.
    pub fn open_copy(data_dir: &Path, scratch: &Path) -> Result<Self, OpenError> {
        let dir = crate::log_dir(data_dir);
        if !dir.join("conf").exists() {
            return Err(OpenError::NoLog(dir));
        }
        let copy = tempfile::Builder::new()
            .prefix("twin-log-copy-")
            .tempdir_in(scratch)
            .map_err(|e| OpenError::Io(scratch.to_owned(), e))?;
        {
            // Held while copying, so a server cannot start on the log and write mid-copy; a
            // server already running is refused the way a reader in place would be. A shared
            // lock would do, but sled takes an exclusive one, so ours must conflict with it.
            let data = File::open(dir.join("db")).map_err(|e| OpenError::Io(dir.clone(), e))?;
            data.try_lock().map_err(|e| match e {
                fs::TryLockError::WouldBlock => OpenError::Locked(dir.clone()),
                fs::TryLockError::Error(e) => OpenError::Io(dir.clone(), e),
            })?;
            copy_tree(&dir, &copy.path().join("log"))?;
        }
        Self::open_log(&copy.path().join("log"), Some(copy))
    }

    fn open_log(dir: &Path, copy: Option<tempfile::TempDir>) -> Result<Self, OpenError> {
        if !dir.join("conf").exists() {
            return Err(OpenError::NoLog(dir.to_owned()));
        }
        let db = writer::open_db(dir)?;
        let tree = db
            .open_tree(writer::LOG_TREE)
            .map_err(|e| OpenError::Sled(dir.to_owned(), e))?;
        Ok(Self {
            tree,
            _db: db,
            _copy: copy,
        })
    }

    /// Every record in sequence order, each checked against its own hash and its predecessor's.
    /// Iteration stops at the first record that fails, which is returned as the error.
    pub fn verified(&self) -> impl Iterator<Item = Result<StoredRecord, ChainError>> + '_ {
        record::verified(self.tree.iter())
    }

    /// Records without the chain check (faster; for tools that verify separately).
    pub fn raw(&self) -> impl Iterator<Item = Result<StoredRecord, ChainError>> + '_ {
        self.tree.iter().map(|kv| {
            let (k, v) = kv.map_err(|e| ChainError::Storage {
                message: e.to_string(),
            })?;
            record::decode(&k, &v)
        })
    }
}

/// Copies a directory tree of plain files (what sled and twin-log keep in `log/`). The copies
/// are made writable: sled opens its files read-write, and an audited log may be read-only.
fn copy_tree(from: &Path, to: &Path) -> Result<(), OpenError> {
    let io = |p: &Path| {
        let p: PathBuf = p.to_owned();
        move |e| OpenError::Io(p, e)
    };
    fs::create_dir(to).map_err(io(to))?;
    for entry in fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().map_err(io(&src))?;
        if kind.is_dir() {
            copy_tree(&src, &dst)?;
        } else if kind.is_file() {
            // `fs::copy` uses copy_file_range, which clones extents where the file system can.
            fs::copy(&src, &dst).map_err(io(&src))?;
            fs::set_permissions(&dst, fs::Permissions::from_mode(0o600)).map_err(io(&dst))?;
        }
    }
    Ok(())
}
