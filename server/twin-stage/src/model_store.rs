//! The executor's on-disk model store: registered models fetched by manifest hash, verified,
//! kept within a byte budget, and shareable by several executors on one machine.
//!
//! Layout under the root (created 0700):
//! - `files/<sha256>`: one verified file per content hash, shared by every model that has it;
//! - `models/<manifest>/`: a model's tree, hard links into `files/`, ending in `.complete`;
//! - `locks/<manifest>`: held shared while a job uses the model, exclusive while it is being
//!   built or evicted; `.lock` guards the budget while space is made;
//! - `tmp/`: downloads in flight.
//!
//! A file enters `files/` only by a rename after its SHA-256 and size are checked, and a model
//! directory enters `models/` only by a rename once complete, so a half-written file or tree is
//! never used, whatever dies when. Eviction removes least recently used models that no executor
//! holds, then every file no model links.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use parking_lot::Mutex;
use twin_client::models::{LocalModel, scan_model_dir};
use twin_core::BlobHash;
use twin_core::model::ModelManifest;

use crate::StageError;
use twin_files::{AllowedRoots, FileError};

/// Marks a model directory as whole (also its last-use time, for eviction).
const COMPLETE: &str = ".complete";

/// Registered models on disk.
#[derive(Debug)]
pub struct ModelStore {
    root: PathBuf,
    budget: u64,
    /// Manifests of local directories, by path, with the (size, mtime) of each file when hashed:
    /// a directory is re-hashed only when a file changed.
    local: Mutex<HashMap<PathBuf, (Vec<FileStamp>, LocalModel)>>,
}

/// A file's size and modification time (ns): what says it may have changed.
type FileStamp = (u64, i128);

/// A model on disk, held (shared lock) so no executor evicts it while this lives.
#[derive(Debug)]
pub struct StoredModel {
    pub dir: PathBuf,
    pub manifest: BlobHash,
    /// Whether any file had to be fetched.
    pub fetched_bytes: u64,
    _hold: File,
}

/// How the store gets what it lacks: the manifest's bytes, and a blob written to a path (the
/// implementation checks the hash; the store checks again).
pub trait Fetch {
    fn manifest(&self, hash: &BlobHash) -> Result<Vec<u8>, StageError>;
    fn file(&self, hash: &BlobHash, dest: &Path) -> Result<(), StageError>;
}

/// Marks a model as just used (eviction goes by this time).
fn touch(dir: &Path) -> Result<(), StageError> {
    File::options()
        .write(true)
        .open(dir.join(COMPLETE))
        .and_then(|f| f.set_modified(SystemTime::now()))
        .map_err(io_err(dir.display()))
}

/// A job's checkpoint, ready to load: where it is and the manifest of its files.
#[derive(Debug)]
pub struct ResolvedModel {
    pub dir: PathBuf,
    /// The registered model's manifest hash, or that of the local directory's files (uploaded,
    /// so lineage can list them).
    pub manifest: BlobHash,
    /// Keeps a stored model from eviction while the job loads it.
    pub hold: Option<StoredModel>,
}

impl Fetch for crate::StageContext {
    fn manifest(&self, hash: &BlobHash) -> Result<Vec<u8>, StageError> {
        Ok(self.download(hash)?.to_vec())
    }

    fn file(&self, hash: &BlobHash, dest: &Path) -> Result<(), StageError> {
        self.check_cancelled()?;
        self.download_to_file(hash, dest).map(drop)
    }
}

fn io_err(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> StageError {
    move |e| StageError::internal(format!("model store: {what}: {e}"))
}

impl ModelStore {
    pub fn open(root: impl Into<PathBuf>, budget: u64) -> Result<Self, StageError> {
        let root = root.into();
        for d in ["files", "models", "locks", "tmp"] {
            let dir = root.join(d);
            fs::create_dir_all(&dir).map_err(io_err(dir.display()))?;
        }
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
            .map_err(io_err(root.display()))?;
        Ok(Self {
            root,
            budget,
            local: Mutex::new(HashMap::new()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Bytes of the files on disk.
    pub fn used(&self) -> Result<u64, StageError> {
        let dir = self.root.join("files");
        let mut used = 0;
        for e in fs::read_dir(&dir).map_err(io_err(dir.display()))? {
            let e = e.map_err(io_err(dir.display()))?;
            used += e.metadata().map_err(io_err(e.path().display()))?.len();
        }
        Ok(used)
    }

    /// The directory of model `hash`, fetched and verified first where needed, and held until
    /// the returned value is dropped.
    pub fn get(&self, hash: &BlobHash, fetch: &dyn Fetch) -> Result<StoredModel, StageError> {
        let hex = hash.to_hex();
        let dir = self.root.join("models").join(&hex);
        let lock_path = self.root.join("locks").join(&hex);
        loop {
            let lock = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(io_err(lock_path.display()))?;
            // Shared first: a complete model is used by many at once.
            lock.lock_shared().map_err(io_err(lock_path.display()))?;
            if dir.join(COMPLETE).is_file() {
                touch(&dir)?;
                return Ok(StoredModel {
                    dir,
                    manifest: *hash,
                    fetched_bytes: 0,
                    _hold: lock,
                });
            }
            // Exclusive while building: a second executor asking for the same model waits for
            // the first one's download instead of repeating it.
            lock.unlock().map_err(io_err(lock_path.display()))?;
            lock.lock().map_err(io_err(lock_path.display()))?;
            let mut fetched_bytes = 0;
            if !dir.join(COMPLETE).is_file() {
                fetched_bytes = self.build(hash, &dir, fetch)?;
            }
            touch(&dir)?;
            // Shared from here on: others may use it too, nobody may evict it. Between the two
            // locks an evictor may slip in; then the model is gone and is built again.
            lock.unlock().map_err(io_err(lock_path.display()))?;
            lock.lock_shared().map_err(io_err(lock_path.display()))?;
            if dir.join(COMPLETE).is_file() {
                return Ok(StoredModel {
                    dir,
                    manifest: *hash,
                    fetched_bytes,
                    _hold: lock,
                });
            }
        }
    }

    /// Fetches what model `hash` lacks and publishes its directory. Called holding its lock.
    fn build(&self, hash: &BlobHash, dir: &Path, fetch: &dyn Fetch) -> Result<u64, StageError> {
        let bytes = fetch.manifest(hash)?;
        if BlobHash::of(&bytes) != *hash {
            return Err(StageError::bad_input(format!(
                "model {hash}: the manifest downloaded does not hash to its name"
            )));
        }
        let manifest = ModelManifest::parse(&bytes)
            .map_err(|e| StageError::bad_input(format!("model {hash}: {e}")))?;
        let files = self.root.join("files");
        let missing: Vec<_> = manifest
            .files
            .iter()
            .filter(|f| {
                fs::metadata(files.join(f.sha256.to_hex())).map_or(true, |m| m.len() != f.size)
            })
            .collect();
        let mut needed: u64 = missing.iter().map(|f| f.size).sum();
        // The same content listed twice is fetched once.
        let mut seen = std::collections::HashSet::new();
        for f in &missing {
            if !seen.insert(f.sha256) {
                needed -= f.size;
            }
        }
        if manifest.total_bytes() > self.budget {
            return Err(StageError::unavailable(format!(
                "model {hash} has {} bytes of files, more than this executor's model store holds \
                 ({} bytes); raise --model-store-bytes",
                manifest.total_bytes(),
                self.budget
            ))
            .retryable(false));
        }
        self.make_room(needed, hash)?;
        // Shared while files sit in `files/` unlinked: an evictor (exclusive) would take them for
        // orphans.
        let guard = self.guard()?;
        guard.lock_shared().map_err(io_err("the store lock"))?;
        let mut fetched = 0;
        for f in missing {
            let dest = files.join(f.sha256.to_hex());
            if fs::metadata(&dest).is_ok_and(|m| m.len() == f.size) {
                continue;
            }
            let tmp = tempfile::Builder::new()
                .prefix("fetch-")
                .tempfile_in(self.root.join("tmp"))
                .map_err(io_err("a temporary file"))?;
            fetch
                .file(&f.sha256, tmp.path())
                .map_err(|e| e.context(format!("model {hash}: file `{}`", f.path)))?;
            let (actual, size) =
                twin_client::models::hash_file(tmp.path()).map_err(io_err(tmp.path().display()))?;
            if actual != f.sha256 || size != f.size {
                return Err(StageError::bad_input(format!(
                    "model {hash}: file `{}` downloaded as {size} bytes hashing to {actual}, but \
                     the manifest says {} bytes, {}",
                    f.path, f.size, f.sha256
                )));
            }
            tmp.as_file()
                .sync_all()
                .map_err(io_err(tmp.path().display()))?;
            tmp.persist(&dest)
                .map_err(|e| io_err(dest.display())(e.error))?;
            fetched += size;
        }
        // The tree is built aside and renamed into place whole.
        let staging = tempfile::Builder::new()
            .prefix("model-")
            .tempdir_in(self.root.join("tmp"))
            .map_err(io_err("a staging directory"))?;
        for f in &manifest.files {
            let to = staging.path().join(&f.path);
            if let Some(parent) = to.parent() {
                fs::create_dir_all(parent).map_err(io_err(parent.display()))?;
            }
            fs::hard_link(files.join(f.sha256.to_hex()), &to).map_err(io_err(to.display()))?;
        }
        File::create(staging.path().join(COMPLETE)).map_err(io_err("the completion marker"))?;
        if dir.exists() {
            // Left by a build that died before it finished (no marker): never used.
            fs::remove_dir_all(dir).map_err(io_err(dir.display()))?;
        }
        let staged = staging.keep();
        fs::rename(&staged, dir).map_err(io_err(dir.display()))?;
        if let Some(models) = dir.parent() {
            File::open(models)
                .and_then(|d| d.sync_all())
                .map_err(io_err(models.display()))?;
        }
        Ok(fetched)
    }

    /// Evicts least recently used models no executor holds (never `keep`) until `needed` more
    /// bytes fit in the budget.
    fn make_room(&self, needed: u64, keep: &BlobHash) -> Result<(), StageError> {
        let guard = self.guard()?;
        guard.lock().map_err(io_err("the store lock"))?;
        self.remove_orphans()?;
        let mut used = self.used()?;
        if used + needed <= self.budget {
            return Ok(());
        }
        let models = self.root.join("models");
        let mut complete = Vec::new();
        for e in fs::read_dir(&models).map_err(io_err(models.display()))? {
            let e = e.map_err(io_err(models.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name == keep.to_hex() {
                continue;
            }
            let used_at = fs::metadata(e.path().join(COMPLETE))
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            complete.push((used_at, name));
        }
        complete.sort();
        for (_, name) in complete {
            if used + needed <= self.budget {
                break;
            }
            let lock_path = self.root.join("locks").join(&name);
            let Ok(lock) = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
            else {
                continue;
            };
            // Held by a job (here or in another executor): not ours to take.
            if lock.try_lock().is_err() {
                continue;
            }
            let dir = models.join(&name);
            tracing::info!(model = %name, "evicting a model from the store");
            fs::remove_dir_all(&dir).map_err(io_err(dir.display()))?;
            drop(lock);
            let _ = fs::remove_file(&lock_path);
            self.remove_orphans()?;
            used = self.used()?;
        }
        if used + needed > self.budget {
            return Err(StageError::unavailable(format!(
                "the model store needs {needed} more bytes but holds {used} of its {} in models \
                 other jobs are using; retry later or raise --model-store-bytes",
                self.budget
            )));
        }
        Ok(())
    }

    /// The store-wide lock file: exclusive to evict, shared while building a model.
    fn guard(&self) -> Result<File, StageError> {
        let path = self.root.join(".lock");
        File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(path.display()))
    }

    /// Removes files no model links (a link count of one: only `files/` has them).
    fn remove_orphans(&self) -> Result<(), StageError> {
        let dir = self.root.join("files");
        for e in fs::read_dir(&dir).map_err(io_err(dir.display()))? {
            let e = e.map_err(io_err(dir.display()))?;
            if e.metadata().map_err(io_err(e.path().display()))?.nlink() <= 1 {
                fs::remove_file(e.path()).map_err(io_err(e.path().display()))?;
            }
        }
        Ok(())
    }

    /// The checkpoint a job names: the registered model `pinned` (fetched into the store as
    /// needed), or else the directory `model` on this machine.
    pub fn resolve(
        &self,
        ctx: &crate::StageContext,
        model: &str,
        pinned: Option<BlobHash>,
    ) -> Result<ResolvedModel, StageError> {
        match pinned {
            Some(hash) => {
                let stored = self
                    .get(&hash, ctx)
                    .map_err(|e| e.context(format!("spec.model ({model})")))?;
                if stored.fetched_bytes > 0 {
                    ctx.note(&format!(
                        "fetched {} bytes of model {model} into the model store",
                        stored.fetched_bytes
                    ));
                }
                Ok(ResolvedModel {
                    dir: stored.dir.clone(),
                    manifest: hash,
                    hold: Some(stored),
                })
            }
            None => {
                // A checkpoint directory on this machine: only under the executor's allowed
                // roots, and so is every file in it (a Hugging Face snapshot's symlinks into
                // `blobs/` included), checked before anything is hashed or loaded.
                let files = ctx.files();
                let dir = files
                    .dir(Path::new(model))
                    .map_err(|e| StageError::bad_input(format!("spec.model: {e}")))?;
                check_tree(files, &dir, 0)
                    .map_err(|e| StageError::bad_input(format!("spec.model: {e}")))?;
                let manifest = self.local_manifest(&dir)?;
                Ok(ResolvedModel {
                    dir,
                    manifest: ctx.upload(manifest.to_bytes())?,
                    hold: None,
                })
            }
        }
    }

    /// The manifest of a checkpoint directory on this machine (a job that names a path), hashed
    /// once and again only when a file's size or modification time changes.
    pub fn local_manifest(&self, dir: &Path) -> Result<ModelManifest, StageError> {
        let stamp = |local: &LocalModel| -> Option<Vec<FileStamp>> {
            local
                .paths
                .iter()
                .map(|p| {
                    let m = fs::metadata(p).ok()?;
                    Some((
                        m.len(),
                        i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
                    ))
                })
                .collect()
        };
        if let Some((stamps, local)) = self.local.lock().get(dir)
            && stamp(local).as_ref() == Some(stamps)
        {
            return Ok(local.manifest.clone());
        }
        let local = scan_model_dir(dir, |_, _| {})
            .map_err(|e| StageError::bad_input(format!("spec.model: {e}")))?;
        if let Some(stamps) = stamp(&local) {
            self.local
                .lock()
                .insert(dir.to_owned(), (stamps, local.clone()));
        }
        Ok(local.manifest)
    }
}

/// Every file under `dir` is a regular file under the allowed roots (a symlink counts where it
/// points), so hashing and loading the checkpoint reads nothing else.
fn check_tree(files: &AllowedRoots, dir: &Path, depth: usize) -> Result<(), FileError> {
    // Checkpoint layouts are a few levels deep (a diffusers pipeline: `unet/…`).
    const MAX_DEPTH: usize = 8;
    let unavailable = || FileError::Unavailable {
        path: dir.display().to_string(),
    };
    let entries = fs::read_dir(dir).map_err(|_| unavailable())?;
    for entry in entries {
        let path = entry.map_err(|_| unavailable())?.path();
        let canonical = files.resolve(&path)?;
        if canonical.is_dir() {
            if depth >= MAX_DEPTH {
                return Err(unavailable());
            }
            check_tree(files, &canonical, depth + 1)?;
        } else {
            files.check_file(&path, u64::MAX)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use twin_core::model::ModelFile;

    use super::*;

    /// Blobs in memory; counts file fetches; may corrupt one hash's bytes.
    #[derive(Default)]
    struct Blobs {
        blobs: HashMap<BlobHash, Vec<u8>>,
        fetches: AtomicUsize,
        corrupt: Option<BlobHash>,
    }

    impl Blobs {
        fn model(&mut self, files: &[(&str, &[u8])]) -> BlobHash {
            let files = files
                .iter()
                .map(|(p, b)| {
                    let h = BlobHash::of(b);
                    self.blobs.insert(h, b.to_vec());
                    ModelFile {
                        path: (*p).into(),
                        size: b.len() as u64,
                        sha256: h,
                    }
                })
                .collect();
            let m = ModelManifest::new(files).unwrap();
            self.blobs.insert(m.hash(), m.to_bytes());
            m.hash()
        }
    }

    impl Fetch for Blobs {
        fn manifest(&self, hash: &BlobHash) -> Result<Vec<u8>, StageError> {
            self.blobs
                .get(hash)
                .cloned()
                .ok_or_else(|| StageError::bad_input("no such blob"))
        }
        fn file(&self, hash: &BlobHash, dest: &Path) -> Result<(), StageError> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            let mut bytes = self.manifest(hash)?;
            if self.corrupt == Some(*hash) {
                bytes[0] ^= 1;
            }
            fs::write(dest, bytes).map_err(io_err("test"))
        }
    }

    #[test]
    fn a_model_is_fetched_once_verified_and_laid_out() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ModelStore::open(tmp.path(), 1 << 20).unwrap();
        let mut blobs = Blobs::default();
        let h = blobs.model(&[("config.json", b"{}"), ("unet/w.safetensors", b"weights")]);
        let m = store.get(&h, &blobs).unwrap();
        assert_eq!(
            fs::read(m.dir.join("unet/w.safetensors")).unwrap(),
            b"weights"
        );
        assert_eq!(m.fetched_bytes, 9);
        assert_eq!(blobs.fetches.load(Ordering::SeqCst), 2);
        drop(m);
        let again = store.get(&h, &blobs).unwrap();
        assert_eq!(again.fetched_bytes, 0);
        assert_eq!(
            blobs.fetches.load(Ordering::SeqCst),
            2,
            "nothing fetched twice"
        );
        // A second store on the same root (another executor) finds it too.
        let other = ModelStore::open(tmp.path(), 1 << 20).unwrap();
        assert_eq!(other.get(&h, &blobs).unwrap().fetched_bytes, 0);
        assert_eq!(
            fs::metadata(tmp.path()).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn a_corrupt_download_or_a_bad_manifest_leaves_nothing_usable() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ModelStore::open(tmp.path(), 1 << 20).unwrap();
        let mut blobs = Blobs::default();
        let h = blobs.model(&[("a.safetensors", b"aaaa"), ("b.json", b"{}")]);
        blobs.corrupt = Some(BlobHash::of(b"aaaa"));
        let err = store.get(&h, &blobs).unwrap_err();
        assert!(err.message.contains("`a.safetensors`"), "{}", err.message);
        assert!(!tmp.path().join("models").join(h.to_hex()).exists());
        assert!(
            !tmp.path()
                .join("files")
                .join(BlobHash::of(b"aaaa").to_hex())
                .exists()
        );
        assert_eq!(fs::read_dir(tmp.path().join("tmp")).unwrap().count(), 0);
        // Fixed at the source: the next attempt succeeds.
        blobs.corrupt = None;
        store.get(&h, &blobs).unwrap();
        // A manifest that is not one.
        let junk = BlobHash::of(b"junk");
        blobs.blobs.insert(junk, b"junk".to_vec());
        let err = store.get(&junk, &blobs).unwrap_err();
        assert_eq!(err.code, twin_core::FailureCode::BadInput);
    }

    #[test]
    fn over_budget_evicts_the_least_recently_used_model_not_one_in_use() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ModelStore::open(tmp.path(), 100).unwrap();
        let mut blobs = Blobs::default();
        let a = blobs.model(&[("w", &[1u8; 40])]);
        let b = blobs.model(&[("w", &[2u8; 40])]);
        let c = blobs.model(&[("w", &[3u8; 40])]);
        drop(store.get(&a, &blobs).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(20));
        let held_b = store.get(&b, &blobs).unwrap();
        // a is older but c needs room: a goes, b (held) stays.
        drop(store.get(&c, &blobs).unwrap());
        assert!(!tmp.path().join("models").join(a.to_hex()).exists());
        assert!(held_b.dir.join("w").is_file());
        assert_eq!(store.used().unwrap(), 80);
        // Both of the others held: no room for a, and the error says why.
        let held_c = store.get(&c, &blobs).unwrap();
        let err = store.get(&a, &blobs).unwrap_err();
        assert!(
            err.message.contains("other jobs are using"),
            "{}",
            err.message
        );
        drop((held_b, held_c));
        store.get(&a, &blobs).unwrap();
        assert!(store.used().unwrap() <= 100);
        // A model bigger than the whole budget is refused up front.
        let big = blobs.model(&[("w", &[4u8; 101])]);
        let err = store.get(&big, &blobs).unwrap_err();
        assert!(
            err.message.contains("--model-store-bytes"),
            "{}",
            err.message
        );
    }

    #[test]
    fn a_local_directory_is_hashed_again_only_when_it_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ModelStore::open(tmp.path().join("store"), 1 << 20).unwrap();
        let dir = tmp.path().join("ckpt");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("config.json"), b"{}").unwrap();
        let first = store.local_manifest(&dir).unwrap();
        assert_eq!(store.local_manifest(&dir).unwrap(), first);
        fs::write(dir.join("config.json"), b"{\"x\":1}").unwrap();
        let second = store.local_manifest(&dir).unwrap();
        assert_ne!(second.hash(), first.hash());
        assert_eq!(second.files[0].sha256, BlobHash::of(b"{\"x\":1}"));
    }
}
