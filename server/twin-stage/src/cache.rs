//! One cache of loaded models per executor, shared by every stage, under one memory budget.
//!
//! Models are keyed by (family, identity, device): the family says what kind of model it is
//! (`clip-vision`, `qwen2.5-vl`), the identity what makes two loads the same model (a
//! checkpoint directory and a fingerprint of its files, so a checkpoint replaced in place is
//! loaded afresh), the device where it lives (`cpu`, `cuda:0`). The budget applies to each
//! device on its own: a model in host memory takes no room from one on the GPU.
//!
//! When a new model would take a device past the budget, the least recently used models on it
//! that no job is using are dropped first. A model bigger than the whole budget still loads,
//! with a warning, after everything else on its device that can go has gone.
//!
//! Cached models are shared and immutable: a stage gets `&T`. A stage that trains a model takes
//! its own copy rather than changing the cached one. libtorch tensors are `Send` but not `Sync`,
//! so each entry has its own lock and a [`CachedModel`] holds it while the stage uses the model;
//! an executor runs one job at a time, so nobody waits on it in practice.

use std::any::Any;
use std::marker::PhantomData;
use std::path::Path;
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::{Instant, UNIX_EPOCH};

use parking_lot::{ArcMutexGuard, Mutex, RawMutex};
use sha2::{Digest, Sha256};
use twin_core::FailureCode;

use crate::StageError;

/// Which model: see the module's documentation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelKey {
    pub family: String,
    pub identity: String,
    pub device: String,
}

impl ModelKey {
    pub fn new(
        family: impl Into<String>,
        identity: impl Into<String>,
        device: impl Into<String>,
    ) -> Self {
        Self {
            family: family.into(),
            identity: identity.into(),
            device: device.into(),
        }
    }

    /// The model in checkpoint directory `dir`: its identity is the directory and a fingerprint
    /// of its files' names, sizes and modification times, which changes when a file is
    /// replaced, without reading gigabytes of weights to find out.
    pub fn checkpoint(family: impl Into<String>, dir: &Path, device: impl Into<String>) -> Self {
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        Self::new(
            family,
            format!("{}#{}", dir.display(), directory_fingerprint(&dir)),
            device,
        )
    }
}

impl std::fmt::Display for ModelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} on {}", self.family, self.identity, self.device)
    }
}

/// The first 16 hex digits of the SHA-256 of the directory's regular files (name, size,
/// modification time), sorted by name.
fn directory_fingerprint(dir: &Path) -> String {
    let mut files: Vec<(String, u64, u128)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            // Hidden files are no part of a checkpoint (models leave them out), and the model
            // store's `.complete` marker is touched at every use: counting it would make each
            // job that uses a stored model miss the cache.
            if e.file_name().to_string_lossy().starts_with('.') {
                return None;
            }
            let meta = e.metadata().ok().filter(|m| m.is_file())?;
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            Some((
                e.file_name().to_string_lossy().into_owned(),
                meta.len(),
                modified,
            ))
        })
        .collect();
    files.sort();
    let mut hasher = Sha256::new();
    for (name, size, modified) in &files {
        hasher.update(format!("{name}\0{size}\0{modified}\n").as_bytes());
    }
    hex::encode(&hasher.finalize()[..8])
}

type Slot = Arc<Mutex<Box<dyn Any + Send>>>;

struct Entry {
    key: ModelKey,
    bytes: u64,
    last_used: u64,
    model: Slot,
    /// The thread holding a [`CachedModel`] of this entry, so that thread asking for it again
    /// gets an error rather than waiting on itself for ever.
    holder: Arc<Mutex<Option<ThreadId>>>,
}

impl Entry {
    /// The cache's own handle is the only one: no job holds the model.
    fn unused(&self) -> bool {
        Arc::strong_count(&self.model) == 1
    }
}

/// Counts since the cache was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

#[derive(Default)]
struct Entries {
    list: Vec<Entry>,
    clock: u64,
    stats: CacheStats,
}

impl Entries {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn used(&self, device: &str) -> u64 {
        self.list
            .iter()
            .filter(|e| e.key.device == device)
            .map(|e| e.bytes)
            .sum()
    }

    /// Removes unused models on `device`, least recently used first, until `more` bytes fit
    /// in `budget` (or nothing more can go). Returns them, to be dropped outside the lock.
    fn make_room(&mut self, device: &str, more: u64, budget: u64, why: &str) -> Vec<Entry> {
        let mut evicted = Vec::new();
        while self.used(device).saturating_add(more) > budget {
            let Some(i) = self
                .list
                .iter()
                .enumerate()
                .filter(|(_, e)| e.key.device == device && e.unused())
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
            else {
                break;
            };
            let entry = self.list.remove(i);
            self.stats.evictions += 1;
            tracing::info!(model = %entry.key, bytes = entry.bytes, reason = why, "model evicted from the cache");
            evicted.push(entry);
        }
        evicted
    }
}

/// The executor's loaded models. See the module's documentation.
pub struct ModelCache {
    budget: u64,
    entries: Mutex<Entries>,
    /// Held while a model loads, so two loads never share the device's memory at once.
    loading: Mutex<()>,
}

impl std::fmt::Debug for ModelCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelCache")
            .field("budget", &self.budget)
            .field("resident", &self.resident())
            .finish()
    }
}

/// A cached model in use: shared access to it, and its entry kept from eviction while alive.
pub struct CachedModel<T> {
    key: ModelKey,
    /// Whether the model was already resident (a hit) rather than loaded for this request.
    from_cache: bool,
    guard: ArcMutexGuard<RawMutex, Box<dyn Any + Send>>,
    holder: Arc<Mutex<Option<ThreadId>>>,
    _model: PhantomData<fn() -> T>,
}

impl<T> CachedModel<T> {
    fn new(
        key: &ModelKey,
        from_cache: bool,
        guard: ArcMutexGuard<RawMutex, Box<dyn Any + Send>>,
        holder: Arc<Mutex<Option<ThreadId>>>,
    ) -> Self {
        *holder.lock() = Some(std::thread::current().id());
        Self {
            key: key.clone(),
            from_cache,
            guard,
            holder,
            _model: PhantomData,
        }
    }
}

impl<T> Drop for CachedModel<T> {
    fn drop(&mut self) {
        *self.holder.lock() = None;
    }
}

impl<T: 'static> CachedModel<T> {
    pub fn key(&self) -> &ModelKey {
        &self.key
    }

    /// True when the model was resident already, false when this request loaded it. Stages say
    /// which in their progress, so a job's events show what the cache saved.
    pub fn from_cache(&self) -> bool {
        self.from_cache
    }

    /// The progress note a stage records for this model: loaded or found resident.
    pub fn note(&self) -> String {
        if self.from_cache {
            format!("model {} from the executor's cache", self.key)
        } else {
            format!("model {} loaded into the executor's cache", self.key)
        }
    }
}

impl<T: 'static> std::ops::Deref for CachedModel<T> {
    type Target = T;

    fn deref(&self) -> &T {
        let model: &(dyn Any + Send) = &**self.guard;
        model
            .downcast_ref()
            .expect("the model's type was checked when the guard was made")
    }
}

impl ModelCache {
    /// A cache holding at most `budget_bytes` of models on each device.
    pub fn new(budget_bytes: u64) -> Self {
        Self {
            budget: budget_bytes,
            entries: Mutex::new(Entries::default()),
            loading: Mutex::new(()),
        }
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// The model under `key`, loading it with `load` (which returns the model and the bytes it
    /// occupies on its device) unless it is cached.
    pub fn get_or_load<T: Send + 'static>(
        &self,
        key: &ModelKey,
        load: impl FnMut() -> Result<(T, u64), StageError>,
    ) -> Result<CachedModel<T>, StageError> {
        self.get_or_load_expecting(key, 0, load)
    }

    /// [`Self::get_or_load`] for a model expected to take about `expected_bytes`: on a miss,
    /// room for it is made before it loads, so the old and the new model are not on the device
    /// together. Should the load still run out of memory, every unused model on the device is
    /// dropped and it is tried once more.
    pub fn get_or_load_expecting<T: Send + 'static>(
        &self,
        key: &ModelKey,
        expected_bytes: u64,
        mut load: impl FnMut() -> Result<(T, u64), StageError>,
    ) -> Result<CachedModel<T>, StageError> {
        if let Some(hit) = self.hit(key)? {
            return Ok(hit);
        }
        let _loading = self.loading.lock();
        // Another thread may have loaded it while this one waited.
        if let Some(hit) = self.hit(key)? {
            return Ok(hit);
        }
        let evicted = self.entries.lock().make_room(
            &key.device,
            expected_bytes,
            self.budget,
            "room for a model about to load",
        );
        drop(evicted);
        let started = Instant::now();
        let (model, bytes) = match load() {
            Err(e) if e.code == FailureCode::OutOfMemory => {
                let evicted = self.entries.lock().make_room(
                    &key.device,
                    u64::MAX,
                    0,
                    "a load ran out of memory",
                );
                if evicted.is_empty() {
                    return Err(e);
                }
                drop(evicted);
                tracing::warn!(model = %key, error = %e, "loading ran out of memory; trying again with the device's cache emptied");
                load()?
            }
            loaded => loaded?,
        };
        let slot: Slot = Arc::new(Mutex::new(Box::new(model)));
        let holder = Arc::new(Mutex::new(None));
        let guard = slot.lock_arc();
        let evicted = {
            let mut entries = self.entries.lock();
            entries.stats.misses += 1;
            let last_used = entries.tick();
            entries.list.push(Entry {
                key: key.clone(),
                bytes,
                last_used,
                model: slot,
                holder: holder.clone(),
            });
            entries.make_room(&key.device, 0, self.budget, "over budget after a load")
        };
        drop(evicted);
        if bytes > self.budget {
            tracing::warn!(model = %key, bytes, budget = self.budget, "the model is bigger than the whole model-cache budget; it is the only model kept on its device");
        }
        tracing::info!(model = %key, bytes, millis = started.elapsed().as_millis() as u64, "model loaded into the cache");
        Ok(CachedModel::new(key, false, guard, holder))
    }

    /// The model under `key` if it is cached; never loads.
    pub fn get<T: Send + 'static>(
        &self,
        key: &ModelKey,
    ) -> Result<Option<CachedModel<T>>, StageError> {
        self.hit(key)
    }

    fn hit<T: Send + 'static>(&self, key: &ModelKey) -> Result<Option<CachedModel<T>>, StageError> {
        let (slot, holder) = {
            let mut entries = self.entries.lock();
            let tick = entries.tick();
            let Some(entry) = entries.list.iter_mut().find(|e| e.key == *key) else {
                return Ok(None);
            };
            entry.last_used = tick;
            let found = (entry.model.clone(), entry.holder.clone());
            entries.stats.hits += 1;
            found
        };
        if *holder.lock() == Some(std::thread::current().id()) {
            return Err(StageError::internal(format!(
                "model cache: {key} is asked for while this thread already holds it"
            )));
        }
        // Outside the cache's lock: this waits while another job uses the model.
        let guard = slot.lock_arc();
        if !(**guard).is::<T>() {
            return Err(StageError::internal(format!(
                "model cache: {key} holds another type than the {} asked for",
                std::any::type_name::<T>()
            )));
        }
        tracing::debug!(model = %key, "model cache hit");
        Ok(Some(CachedModel::new(key, true, guard, holder)))
    }

    /// The cached models and their sizes, least recently used first.
    pub fn resident(&self) -> Vec<(ModelKey, u64)> {
        let entries = self.entries.lock();
        let mut list: Vec<_> = entries
            .list
            .iter()
            .map(|e| (e.last_used, e.key.clone(), e.bytes))
            .collect();
        list.sort();
        list.into_iter().map(|(_, k, b)| (k, b)).collect()
    }

    pub fn stats(&self) -> CacheStats {
        self.entries.lock().stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A model that counts how many are alive, to see that eviction frees them.
    struct Model {
        name: String,
        alive: Arc<AtomicUsize>,
    }

    impl Drop for Model {
        fn drop(&mut self) {
            self.alive.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn key(name: &str) -> ModelKey {
        ModelKey::new("test", name, "cpu")
    }

    fn load(
        cache: &ModelCache,
        name: &str,
        bytes: u64,
        alive: &Arc<AtomicUsize>,
    ) -> CachedModel<Model> {
        cache
            .get_or_load(&key(name), || {
                alive.fetch_add(1, Ordering::SeqCst);
                Ok((
                    Model {
                        name: name.to_owned(),
                        alive: alive.clone(),
                    },
                    bytes,
                ))
            })
            .unwrap()
    }

    fn names(cache: &ModelCache) -> Vec<String> {
        cache
            .resident()
            .into_iter()
            .map(|(k, _)| k.identity)
            .collect()
    }

    #[test]
    fn a_hit_returns_the_same_instance_without_loading() {
        let cache = ModelCache::new(100);
        let alive = Arc::new(AtomicUsize::new(0));
        let held = load(&cache, "a", 10, &alive);
        let first: *const Model = &*held;
        // Asked for again by the thread holding it: an error, not a thread waiting on itself.
        let err = cache
            .get_or_load(&key("a"), || -> Result<(Model, u64), _> {
                panic!("a is cached")
            })
            .err()
            .unwrap();
        assert_eq!(err.code, FailureCode::Internal);
        drop(held);
        let again = cache
            .get_or_load(&key("a"), || -> Result<(Model, u64), _> {
                panic!("a is cached")
            })
            .unwrap();
        assert!(std::ptr::eq(first, &*again));
        assert_eq!(again.name, "a");
        assert_eq!(
            cache.stats(),
            CacheStats {
                hits: 2,
                misses: 1,
                evictions: 0
            }
        );
        // Another device or identity is another model.
        let on_gpu = ModelKey::new("test", "a", "cuda:0");
        let other: CachedModel<Model> = cache
            .get_or_load(&on_gpu, || {
                alive.fetch_add(1, Ordering::SeqCst);
                Ok((
                    Model {
                        name: "a on the gpu".into(),
                        alive: alive.clone(),
                    },
                    10,
                ))
            })
            .unwrap();
        assert_eq!(other.name, "a on the gpu");
        assert_eq!(alive.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn the_least_recently_used_model_goes_first() {
        let cache = ModelCache::new(30);
        let alive = Arc::new(AtomicUsize::new(0));
        drop(load(&cache, "a", 10, &alive));
        drop(load(&cache, "b", 10, &alive));
        drop(load(&cache, "c", 10, &alive));
        // Using "a" makes "b" the least recently used.
        drop(load(&cache, "a", 10, &alive));
        drop(load(&cache, "d", 10, &alive));
        assert_eq!(names(&cache), ["c", "a", "d"]);
        assert_eq!(alive.load(Ordering::SeqCst), 3, "b was dropped");
        drop(load(&cache, "e", 20, &alive));
        assert_eq!(names(&cache), ["d", "e"]);
        assert_eq!(cache.stats().evictions, 3);
        // Other devices have budgets of their own.
        let gpu = ModelKey::new("test", "g", "cuda:0");
        let _g: CachedModel<Model> = cache
            .get_or_load(&gpu, || {
                alive.fetch_add(1, Ordering::SeqCst);
                Ok((
                    Model {
                        name: "g".into(),
                        alive: alive.clone(),
                    },
                    30,
                ))
            })
            .unwrap();
        assert_eq!(names(&cache), ["d", "e", "g"]);
    }

    #[test]
    fn a_model_in_use_is_not_evicted() {
        let cache = ModelCache::new(20);
        let alive = Arc::new(AtomicUsize::new(0));
        let a = load(&cache, "a", 10, &alive);
        drop(load(&cache, "b", 10, &alive));
        drop(load(&cache, "c", 10, &alive));
        // "a" is older but held: "b" goes.
        assert_eq!(names(&cache), ["a", "c"]);
        assert_eq!(a.name, "a");
        // With "a" and "c" both held, a third model goes over budget rather than evict them.
        let c = load(&cache, "c", 10, &alive);
        let d = load(&cache, "d", 10, &alive);
        assert_eq!(names(&cache), ["a", "c", "d"]);
        drop((a, c, d));
        drop(load(&cache, "e", 10, &alive));
        assert_eq!(names(&cache), ["d", "e"]);
        assert_eq!(alive.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_model_bigger_than_the_budget_loads_alone() {
        let cache = ModelCache::new(20);
        let alive = Arc::new(AtomicUsize::new(0));
        drop(load(&cache, "a", 10, &alive));
        drop(load(&cache, "b", 10, &alive));
        let big = load(&cache, "big", 50, &alive);
        assert_eq!(big.name, "big");
        assert_eq!(names(&cache), ["big"]);
        assert_eq!(alive.load(Ordering::SeqCst), 1);
        drop(big);
        drop(load(&cache, "a", 10, &alive));
        assert_eq!(names(&cache), ["a"], "the big one made way");
    }

    #[test]
    fn room_is_made_before_an_expected_load_and_after_running_out_of_memory() {
        let cache = ModelCache::new(30);
        let alive = Arc::new(AtomicUsize::new(0));
        drop(load(&cache, "a", 10, &alive));
        drop(load(&cache, "b", 10, &alive));
        let seen_alive = AtomicUsize::new(usize::MAX);
        let c: CachedModel<Model> = cache
            .get_or_load_expecting(&key("c"), 25, || {
                seen_alive.store(alive.load(Ordering::SeqCst), Ordering::SeqCst);
                alive.fetch_add(1, Ordering::SeqCst);
                Ok((
                    Model {
                        name: "c".into(),
                        alive: alive.clone(),
                    },
                    25,
                ))
            })
            .unwrap();
        assert_eq!(seen_alive.load(Ordering::SeqCst), 0, "a and b went first");
        drop(c);

        drop(load(&cache, "d", 5, &alive));
        let mut tries = 0;
        let e: CachedModel<Model> = cache
            .get_or_load(&key("e"), || {
                tries += 1;
                if tries == 1 {
                    return Err(StageError::out_of_memory("CUDA out of memory"));
                }
                alive.fetch_add(1, Ordering::SeqCst);
                Ok((
                    Model {
                        name: "e".into(),
                        alive: alive.clone(),
                    },
                    5,
                ))
            })
            .unwrap();
        assert_eq!((tries, e.name.as_str()), (2, "e"));
        assert_eq!(names(&cache), ["e"]);
        // With nothing to evict, running out of memory is the answer.
        let err = cache
            .get_or_load(&key("f"), || -> Result<(Model, u64), _> {
                Err(StageError::out_of_memory("again"))
            })
            .err()
            .unwrap();
        assert_eq!(err.code, FailureCode::OutOfMemory);
    }

    #[test]
    fn a_key_asked_for_as_another_type_is_a_bug() {
        let cache = ModelCache::new(10);
        drop(cache.get_or_load(&key("a"), || Ok((1u32, 1))).unwrap());
        let err = cache
            .get_or_load(&key("a"), || Ok(("x".to_owned(), 1)))
            .err()
            .unwrap();
        assert_eq!(err.code, FailureCode::Internal);
        assert!(cache.get::<u32>(&key("a")).unwrap().is_some());
        assert!(cache.get::<u32>(&key("b")).unwrap().is_none());
    }

    #[test]
    fn a_replaced_checkpoint_file_is_another_model() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.safetensors"), b"weights").unwrap();
        let before = ModelKey::checkpoint("qwen", dir.path(), "cpu");
        assert_eq!(before, ModelKey::checkpoint("qwen", dir.path(), "cpu"));
        std::fs::write(dir.path().join("model.safetensors"), b"new weights").unwrap();
        let after = ModelKey::checkpoint("qwen", dir.path(), "cpu");
        assert_ne!(before, after);
        assert!(
            after
                .identity
                .starts_with(&dir.path().canonicalize().unwrap().display().to_string())
        );
    }
}
