//! The content-addressed blob store: `blobs/sha256/<2 hex>/<64 hex>`, written atomically.
//!
//! A blob is streamed into a temporary file while hashed, fsynced, checked against the hash the
//! client claimed (if any), then renamed into place and its directory fsynced. A blob that exists
//! is never rewritten, so concurrent uploads of the same bytes are harmless.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

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
    #[error("blob store at {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, BlobError> {
        let root = root.into();
        for d in [root.join("sha256"), root.join("tmp")] {
            fs::create_dir_all(&d).map_err(io_at(&d))?;
        }
        Ok(Self { root })
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
        self.file.persist(&dest).map_err(|e| BlobError::Io {
            path: dest.clone(),
            source: e.error,
        })?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_at(&dir))?;
        Ok((actual, self.len))
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
}
