//! The event log on sled (hash-chained, group-committed, fsynced) and the content-addressed blob store.
//!
//! API boundary: this is the only crate that imports sled. Callers hand it already-encoded
//! payloads ([`NewEvent`]) and get back [`StoredRecord`]s; what the payloads mean, and the
//! record's stored format and chain check (`twin_core::record`), are `twin-core`'s business.

pub mod blob;
mod reader;
mod record;
mod sled_files;
mod writer;

pub use blob::{BlobError, BlobStore, BlobWriter};
pub use reader::{Head, LogReader};
pub use record::{ChainError, GENESIS_HASH, Idempotency, StoredRecord, new_event};
pub use writer::{
    AppendError, AppendRequest, Appended, BatchStats, Expected, Log, LogConfig, LogObserver,
    MAX_PAYLOAD_BYTES, NewEvent, OpenError,
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
