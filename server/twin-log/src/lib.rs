//! The event log on sled (hash-chained, group-committed, fsynced) and the content-addressed blob store.
//!
//! API boundary: this is the only crate that imports sled. Callers hand it already-encoded
//! payloads ([`NewEvent`]) and get back [`StoredRecord`]s; what the payloads mean is
//! `twin-core`'s business.

pub mod blob;
mod record;
mod sled_files;
mod writer;

pub use blob::{BlobError, BlobStore, BlobWriter};
pub use record::{ChainError, GENESIS_HASH, StoredRecord, new_event};
pub use writer::{
    AppendError, AppendRequest, Appended, BatchStats, Expected, Idempotency, Log, LogConfig,
    LogObserver, MAX_PAYLOAD_BYTES, NewEvent, OpenError,
};

use std::path::{Path, PathBuf};

/// Where the sled database lives inside a data directory.
pub fn log_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("log")
}

/// Where blobs live inside a data directory.
pub fn blob_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("blobs")
}

/// Reads a log offline (the server must not be running on it: sled holds a lock).
pub struct LogReader {
    tree: sled::Tree,
    _db: sled::Db,
}

impl LogReader {
    pub fn open(data_dir: &Path) -> Result<Self, OpenError> {
        let dir = log_dir(data_dir);
        if !dir.join("conf").exists() {
            return Err(OpenError::NoLog(dir));
        }
        let db = writer::open_db(&dir)?;
        let tree = db
            .open_tree(writer::LOG_TREE)
            .map_err(|e| OpenError::Sled(dir.clone(), e))?;
        Ok(Self { tree, _db: db })
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
