//! The engine, the module table and the per-call sandbox.
//!
//! One [`Host`] per process. Loading a module compiles it once (or reads the disk cache), links
//! it against WASI-with-nothing-granted plus the capabilities this host implements, works out
//! which world it exports, and asks it to `describe` itself. Each call then instantiates it from
//! its `InstancePre` into a fresh store from the pooling allocator (microseconds), configures it
//! with the job's parameters, and runs one batch under fuel, an epoch deadline and memory limits.
//!
//! Nothing a guest does holds a call past its deadline or makes the host allocate without bound:
//! timers are always ready (`clock.rs`), memories and tables of an instance share one budget, what
//! a guest hands the host in one transfer is capped ([`MAX_TRANSFER_BYTES`]), and so are its
//! capability calls and the sizes of the values it returns.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use wasmtime::component::{Component, HasSelf, InstancePre, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::bindings::{filter, lookup, reward};
use crate::cache::{ModuleCache, engine_fingerprint};
use crate::capability::{self, CapabilityCall, Grants};
use crate::clock::{self, FixedClock};
use crate::compile::{self, CompileSlots, Compiler};
use crate::types::{CandidatePair, Descriptor, ModuleKind, QuestionType, RewardScore, Rollout};
use crate::{PluginError, Verdict, module_hash};
use twin_core::module_output;

/// How often the engine's epoch advances: the granularity of call deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// What a guest may write to stderr per call (kept for panic messages in errors).
const STDERR_CAPACITY: usize = 16 * 1024;
/// Freed slots decommitted together (see `engine`).
const DECOMMIT_BATCH: usize = 16;
/// Budget of the `describe` call made when a module is loaded.
const DESCRIBE_FUEL: u64 = 2_000_000_000;
const DESCRIBE_DEADLINE: Duration = Duration::from_secs(10);
/// Modules kept loaded; beyond this the least recently loaded is dropped (the disk cache remains).
const MAX_LOADED: usize = 64;
/// Most bytes a guest hands the host in one transfer: a call's results, or the arguments of one
/// call it makes to the host (wasmtime's "hostcall fuel", 128 MiB unless set). Lifting a result
/// allocates on the host before anything can look at it, and list elements may all point at the
/// same guest bytes, so without this cap a few MiB of guest memory could make gigabytes of host
/// strings. A full batch's results (4096 scores with components) are well under 2 MiB.
pub const MAX_TRANSFER_BYTES: usize = 16 << 20;
/// WASI resources (streams, pollables) a call may hold at once; a guest needs a handful, and each
/// is a host allocation (wasmtime allows a million).
const MAX_WASI_RESOURCES: usize = 4096;
/// Bytes a table element counts against an instance's memory budget (a function reference).
const TABLE_ELEMENT_BYTES: u64 = std::mem::size_of::<usize>() as u64;
// Caps on what a module returns, beyond [`MAX_TRANSFER_BYTES`], and the checks that apply them
// live in `twin_core::module_output`, where they are fuzzed without wasmtime. A descriptor is
// recorded in the log (events are capped at 96 KiB); components and reasons are kept with every
// score and verdict; guest error messages become a job's failure detail.

/// Resource limits of one call (one batch).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Fuel units (roughly one per Wasm instruction).
    pub fuel: u64,
    /// Wall-clock deadline, enforced by epoch interruption.
    pub deadline: Duration,
    /// Bytes of all linear memories and tables of the instance together (capped by
    /// [`HostConfig::max_memory_bytes`]): a component may have several memories, and a budget per
    /// memory would multiply.
    pub memory_bytes: u64,
    /// Largest table, in elements.
    pub table_elements: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            fuel: 20_000_000_000,
            deadline: Duration::from_secs(30),
            memory_bytes: 512 << 20,
            table_elements: 200_000,
        }
    }
}

impl Limits {
    /// These limits with those a job's spec sets in their place (tables are not the job's to
    /// set).
    pub fn with_job_limits(self, job: &twin_core::score::ModuleLimits) -> Limits {
        Limits {
            fuel: job.fuel.unwrap_or(self.fuel),
            deadline: job
                .deadline_ms
                .map(Duration::from_millis)
                .unwrap_or(self.deadline),
            memory_bytes: job.memory_mb.map(|m| m << 20).unwrap_or(self.memory_bytes),
            table_elements: self.table_elements,
        }
    }
}

/// Settings of a [`Host`].
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Where compiled modules are cached; `None` keeps them in memory only.
    pub cache_dir: Option<PathBuf>,
    /// Largest module accepted, in bytes.
    pub max_module_bytes: u64,
    pub compiler: Compiler,
    /// Limits of a call when the caller gives none.
    pub limits: Limits,
    /// Meter fuel. Always on in production; off only to measure fuel's overhead.
    pub consume_fuel: bool,
    /// Upper bound on any call's linear memory; sizes the pooling allocator's slots.
    pub max_memory_bytes: u64,
    /// Calls that may run at once (pool slots).
    pub concurrency: u32,
    /// Compilations that may run at once; more wait for a slot (a minute at most).
    pub max_concurrent_compilations: u32,
    /// Memory a compiler child may allocate (`RLIMIT_DATA`); [`Compiler::Subprocess`] only.
    pub max_compile_memory_bytes: u64,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            max_module_bytes: 64 << 20,
            compiler: Compiler::InProcess,
            limits: Limits::default(),
            consume_fuel: true,
            max_memory_bytes: 1 << 30,
            concurrency: 32,
            // Two: an upload and a job's module can compile side by side, and a burst of uploads
            // cannot take every core.
            max_concurrent_compilations: 2,
            // The catalogue's components compile in under 16 MiB, and one function of 200 000
            // operations takes 128-256 MiB; generous for large components (uploads go up to
            // 64 MiB, e.g. a Python interpreter), while still bounding a hostile one.
            max_compile_memory_bytes: 4 << 30,
        }
    }
}

/// What an engine's compiled code depends on; the compiler child must use the same.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EngineSettings {
    pub consume_fuel: bool,
    pub max_memory_bytes: u64,
    pub concurrency: u32,
}

impl EngineSettings {
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--max-memory".to_owned(),
            self.max_memory_bytes.to_string(),
            "--concurrency".to_owned(),
            self.concurrency.to_string(),
        ];
        if !self.consume_fuel {
            args.push("--no-fuel".to_owned());
        }
        args
    }
}

/// What an engine is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EngineUse {
    /// Compiling and running modules: a [`Host`]'s engine.
    Run,
    /// Compiling only (the compiler child, in-process compilation). Without the pooling
    /// allocator, whose reservations (gigabytes, partly writable mappings) only instantiation
    /// needs and which would count against the compiler's `RLIMIT_DATA`. Compiled code does not
    /// depend on the allocator: the compatibility hash covers the compiler's flags, the tunables
    /// and the features, and is the same for both uses (a test checks it).
    Compile,
}

/// Builds the engine every module runs on. Compilation settings here must match between the
/// server and its compiler child, so both call this.
pub(crate) fn engine(settings: &EngineSettings, using: EngineUse) -> wasmtime::Result<Engine> {
    let mut config = Config::new();
    config.consume_fuel(settings.consume_fuel);
    config.epoch_interruption(true);
    config.wasm_component_model(true);
    config.max_wasm_stack(1 << 20);
    if using == EngineUse::Compile {
        return Engine::new(&config);
    }
    let slots = settings.concurrency.max(1);
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(slots)
        // Python and JavaScript components link a few dozen core instances sharing one memory.
        .max_core_instances_per_component(64)
        .total_core_instances(slots * 64)
        .max_memories_per_component(4)
        .max_memories_per_module(1)
        .total_memories(slots * 4)
        .max_tables_per_component(16)
        .total_tables(slots * 16)
        .table_elements(Limits::default().table_elements as usize)
        .max_memory_size(settings.max_memory_bytes as usize)
        .max_component_instance_size(4 << 20)
        .max_core_instance_size(4 << 20)
        // Slots are decommitted (madvise) in batches rather than after every call: a decommit
        // flushes TLBs on every core, and doing it per call was a fifth of a small call's cost.
        .decommit_batch_size(DECOMMIT_BATCH);
    // Page faults are about a third of a small call's cost (the slot's pages are given back
    // after each call). `linear_memory_keep_resident` trades them for a memset of the kept
    // region on every call; with a Rust guest's 1 MiB stack below its heap that made calls
    // slower (53 µs vs 30 µs, BENCHMARKS.md), so it stays off.
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&config)
}

/// A loaded module, ready to instantiate.
pub struct Module {
    pub hash: String,
    pub descriptor: Descriptor,
    /// Every interface the component imports.
    pub imports: Vec<String>,
    /// The host capabilities among them (interface names).
    pub capabilities: Vec<String>,
    pub size: u64,
    exports: Exports,
}

enum Exports {
    Reward(reward::RewardPre<CallState>),
    Filter(filter::FilterPre<CallState>),
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("hash", &self.hash)
            .field("descriptor", &self.descriptor)
            .field("imports", &self.imports)
            .finish()
    }
}

impl Module {
    pub fn kind(&self) -> ModuleKind {
        self.descriptor.kind
    }
}

/// What a call produced besides its values.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome<T> {
    pub values: Vec<T>,
    /// Capability calls, in order.
    pub calls: Vec<CapabilityCall>,
    pub fuel_used: u64,
}

/// The store's data: WASI with nothing granted, the limiter and the capability log.
pub(crate) struct CallState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
    grants: Arc<Grants>,
    calls: Vec<CapabilityCall>,
    /// Bytes of keys and values in `calls`.
    call_bytes: usize,
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl lookup::twin::plugin::lookup::Host for CallState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        let output = self
            .grants
            .lookup
            .as_ref()
            .and_then(|table| table.get(&key).cloned());
        self.record(CapabilityCall {
            capability: "lookup".into(),
            input: key,
            output: output.clone(),
        })?;
        Ok(output)
    }
}

impl CallState {
    /// Logs a capability call, or ends the call when the log is full: every call is kept (and
    /// stored with the job), so without a cap a guest in a loop could fill the host's memory.
    fn record(&mut self, call: CapabilityCall) -> wasmtime::Result<()> {
        let bytes = call.input.len() + call.output.as_ref().map_or(0, String::len);
        let hit = if self.calls.len() >= capability::MAX_CALLS {
            Some(PluginError::MemoryLimit {
                what: "its number of capability calls",
                limit: capability::MAX_CALLS as u64,
            })
        } else if self.call_bytes + bytes > capability::MAX_CALL_BYTES {
            Some(PluginError::MemoryLimit {
                what: "the bytes of its capability calls",
                limit: capability::MAX_CALL_BYTES as u64,
            })
        } else {
            None
        };
        if let Some(hit) = hit {
            self.limiter.hit = Some(hit);
            return Err(wasmtime::Error::new(LimitReached));
        }
        self.call_bytes += bytes;
        self.calls.push(call);
        Ok(())
    }
}

impl lookup::twin::plugin::types::Host for CallState {}

/// Memory and table limits that remember which one was hit, so the trap can be named. One
/// limiter serves a whole store, that is one instance: `used` adds up every memory and table it
/// has, so several memories share [`Limits::memory_bytes`] instead of each having it.
struct Limiter {
    memory_bytes: u64,
    table_elements: u64,
    /// Bytes of memories and tables granted so far.
    used: u64,
    /// The limit a call hit (this limiter's or a capability log's), for [`classify`].
    hit: Option<PluginError>,
}

impl Limiter {
    /// Grants `grown` more bytes if the budget has them.
    fn take(&mut self, grown: u64, what: &'static str) -> wasmtime::Result<bool> {
        match self.used.checked_add(grown) {
            Some(total) if total <= self.memory_bytes => {
                self.used = total;
                Ok(true)
            }
            _ => {
                self.hit = Some(PluginError::MemoryLimit {
                    what,
                    limit: self.memory_bytes,
                });
                Err(wasmtime::Error::new(LimitReached))
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("resource limit reached")]
struct LimitReached;

impl wasmtime::ResourceLimiter for Limiter {
    // wasmtime asks before every growth, a memory's or table's initial size at instantiation
    // included (`current` 0), so the sums below see everything an instance has.
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.take(
            (desired as u64).saturating_sub(current as u64),
            "linear memory",
        )
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.table_elements {
            self.hit = Some(PluginError::MemoryLimit {
                what: "a table",
                limit: self.table_elements,
            });
            return Err(wasmtime::Error::new(LimitReached));
        }
        let grown = (desired as u64).saturating_sub(current as u64);
        self.take(grown.saturating_mul(TABLE_ELEMENT_BYTES), "its tables")
    }
}

/// Advances the engine's epoch in the background; deadlines count these ticks.
struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    fn start(engine: Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .ok();
        Self { stop, thread }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Loads, caches and runs modules. Cheap to share behind an `Arc`; calls may run concurrently.
pub struct Host {
    engine: Engine,
    linker: Linker<CallState>,
    config: HostConfig,
    settings: EngineSettings,
    cache: Option<ModuleCache>,
    compile_slots: CompileSlots,
    loaded: Mutex<Vec<Arc<Module>>>,
    _ticker: Ticker,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("config", &self.config)
            .finish()
    }
}

impl Host {
    pub fn new(config: HostConfig) -> Result<Self, PluginError> {
        let settings = EngineSettings {
            consume_fuel: config.consume_fuel,
            max_memory_bytes: config.max_memory_bytes,
            concurrency: config.concurrency,
        };
        let host_err = |e: wasmtime::Error| PluginError::Host(format!("{e:#}"));
        let engine = engine(&settings, EngineUse::Run).map_err(host_err)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(host_err)?;
        clock::shadow_monotonic_clock(&mut linker).map_err(host_err)?;
        lookup::twin::plugin::lookup::add_to_linker::<CallState, HasSelf<CallState>>(
            &mut linker,
            |s| s,
        )
        .map_err(host_err)?;
        lookup::twin::plugin::types::add_to_linker::<CallState, HasSelf<CallState>>(
            &mut linker,
            |s| s,
        )
        .map_err(host_err)?;
        let cache = config
            .cache_dir
            .as_deref()
            .map(|dir| ModuleCache::open(dir, engine_fingerprint(&engine)))
            .transpose()?;
        Ok(Self {
            _ticker: Ticker::start(engine.clone()),
            engine,
            linker,
            compile_slots: CompileSlots::new(config.max_concurrent_compilations),
            config,
            settings,
            cache,
            loaded: Mutex::new(Vec::new()),
        })
    }

    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    /// The module with this hash, if it is loaded.
    pub fn get(&self, hash: &str) -> Option<Arc<Module>> {
        self.loaded.lock().iter().find(|m| m.hash == hash).cloned()
    }

    /// Compiles (or reads from the cache), links and describes a module.
    pub fn load(&self, bytes: &[u8]) -> Result<Arc<Module>, PluginError> {
        let size = bytes.len() as u64;
        if size > self.config.max_module_bytes {
            return Err(PluginError::TooLarge {
                size,
                limit: self.config.max_module_bytes,
            });
        }
        let hash = module_hash(bytes);
        if let Some(m) = self.get(&hash) {
            return Ok(m);
        }
        let component = self.component(&hash, bytes)?;
        let module = Arc::new(self.link(hash, size, &component)?);
        let mut loaded = self.loaded.lock();
        if let Some(m) = loaded.iter().find(|m| m.hash == module.hash) {
            return Ok(m.clone());
        }
        if loaded.len() >= MAX_LOADED {
            loaded.remove(0);
        }
        loaded.push(module.clone());
        Ok(module)
    }

    fn component(&self, hash: &str, bytes: &[u8]) -> Result<Component, PluginError> {
        if let Some(artefact) = self.cache.as_ref().and_then(|c| c.read(hash)) {
            match self.deserialize(&artefact) {
                Ok(c) => return Ok(c),
                Err(e) => tracing::warn!(module = hash, error = %e, "recompiling a cached module"),
            }
        }
        let artefact = compile::compile(&self.config, &self.compile_slots, &self.settings, bytes)?;
        let component = self.deserialize(&artefact)?;
        if let Some(cache) = &self.cache {
            cache.write(hash, &artefact);
        }
        Ok(component)
    }

    fn deserialize(&self, artefact: &[u8]) -> Result<Component, PluginError> {
        // SAFETY: the artefact was produced by `precompile_component` on an engine built by
        // `engine()` with this host's settings: just now, in this process or by our compiler
        // child, or earlier into the cache, whose directory only this user can write and which
        // hands out an artefact only after checking the SHA-256 of these very bytes, the module
        // they were compiled from and the engine's fingerprint (`cache.rs`). wasmtime also checks
        // the engine compatibility header and rejects artefacts from other settings.
        #[allow(unsafe_code)]
        let component = unsafe { Component::deserialize(&self.engine, artefact) };
        component.map_err(|e| PluginError::CompilerFailed(format!("load artefact: {e:#}")))
    }

    fn link(&self, hash: String, size: u64, component: &Component) -> Result<Module, PluginError> {
        let ty = component.component_type();
        let imports: Vec<String> = ty
            .imports(&self.engine)
            .map(|(name, _)| name.to_owned())
            .collect();
        for import in &imports {
            let provided = import.starts_with("wasi:")
                || import == "twin:plugin/types@0.1.0"
                || capability::known(import);
            if !provided {
                return Err(PluginError::UnknownImport {
                    import: import.clone(),
                });
            }
        }
        let capabilities: Vec<String> = imports
            .iter()
            .filter(|i| capability::known(i))
            .cloned()
            .collect();
        let pre: InstancePre<CallState> =
            self.linker
                .instantiate_pre(component)
                .map_err(|e| PluginError::UnknownImport {
                    import: format!("{e:#}"),
                })?;
        let exports = match reward::RewardPre::new(pre.clone()) {
            Ok(r) => Exports::Reward(r),
            Err(reward_err) => match filter::FilterPre::new(pre) {
                Ok(f) => Exports::Filter(f),
                Err(filter_err) => {
                    return Err(PluginError::WorldMismatch(format!(
                        "as a reward: {reward_err:#}; as a filter: {filter_err:#}"
                    )));
                }
            },
        };
        let descriptor = self.describe(&exports)?;
        let world = match exports {
            Exports::Reward(_) => ModuleKind::Reward,
            Exports::Filter(_) => ModuleKind::Filter,
        };
        if descriptor.kind != world {
            return Err(PluginError::WrongKind {
                expected: world.as_str().into(),
                actual: descriptor.kind.as_str().into(),
            });
        }
        check_descriptor(&descriptor)?;
        Ok(Module {
            hash,
            descriptor,
            imports,
            capabilities,
            size,
            exports,
        })
    }

    fn describe(&self, exports: &Exports) -> Result<Descriptor, PluginError> {
        // `describe` runs on upload, in the server: a module that stalls there holds a request,
        // so it gets a tighter budget than a scoring call.
        let limits = Limits {
            fuel: self.config.limits.fuel.min(DESCRIBE_FUEL),
            deadline: self.config.limits.deadline.min(DESCRIBE_DEADLINE),
            ..self.config.limits
        };
        // All capabilities granted: describing must not depend on them, and a module that calls
        // one here gets empty answers.
        let grants = Grants {
            lookup: Some(Default::default()),
        };
        let (mut store, stderr) = self.store(&limits, Arc::new(grants))?;
        let result = match exports {
            Exports::Reward(pre) => pre
                .instantiate(&mut store)
                .and_then(|r| r.twin_plugin_module().call_describe(&mut store))
                .map(|d| from_wit_descriptor(&d)),
            Exports::Filter(pre) => pre
                .instantiate(&mut store)
                .and_then(|f| f.twin_plugin_module().call_describe(&mut store))
                .map(|d| from_wit_descriptor(&d)),
        };
        result.map_err(|e| classify(&mut store, &limits, &stderr, e))
    }

    fn store(
        &self,
        limits: &Limits,
        grants: Arc<Grants>,
    ) -> Result<(Store<CallState>, MemoryOutputPipe), PluginError> {
        use rand010::SeedableRng;
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        let wasi = WasiCtx::builder()
            .stderr(stderr.clone())
            .wall_clock(FixedClock)
            .monotonic_clock(FixedClock)
            .secure_random(rand010::rngs::StdRng::seed_from_u64(0x7477_696e))
            .insecure_random(rand010::rngs::StdRng::seed_from_u64(0x7477_696e + 1))
            .insecure_random_seed(0x7477_696e)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = CallState {
            wasi,
            table: ResourceTable::new(),
            limiter: Limiter {
                memory_bytes: limits.memory_bytes.min(self.config.max_memory_bytes),
                table_elements: limits.table_elements,
                used: 0,
                hit: None,
            },
            grants,
            calls: Vec::new(),
            call_bytes: 0,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.set_hostcall_fuel(MAX_TRANSFER_BYTES);
        store.data_mut().table.set_max_capacity(MAX_WASI_RESOURCES);
        if self.config.consume_fuel {
            store
                .set_fuel(limits.fuel)
                .map_err(|e| PluginError::Host(format!("{e:#}")))?;
        }
        let ticks = limits.deadline.as_nanos() / EPOCH_TICK.as_nanos() + 1;
        store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX));
        store.epoch_deadline_trap();
        Ok((store, stderr))
    }

    fn check_grants(&self, module: &Module, grants: &Grants) -> Result<(), PluginError> {
        for cap in &module.capabilities {
            if !grants.grants(capability::short_name(cap)) {
                return Err(PluginError::NotGranted {
                    capability: capability::short_name(cap).into(),
                });
            }
        }
        Ok(())
    }

    /// Runs one call in a fresh sandbox. `body` instantiates, configures and calls the module;
    /// traps are classified and the output's length is checked against the batch's.
    fn call<T>(
        &self,
        module: &Module,
        grants: &Grants,
        limits: Option<&Limits>,
        batch_len: usize,
        what: &str,
        body: impl FnOnce(&mut Store<CallState>) -> wasmtime::Result<Result<Vec<T>, PluginError>>,
    ) -> Result<Outcome<T>, PluginError> {
        self.check_grants(module, grants)?;
        let limits = limits.copied().unwrap_or(self.config.limits);
        let (mut store, stderr) = self.store(&limits, Arc::new(grants.clone()))?;
        let values = match body(&mut store) {
            Ok(result) => result?,
            Err(e) => return Err(classify(&mut store, &limits, &stderr, e)),
        };
        module_output::check_count(values.len(), batch_len, what)?;
        let fuel_used = if self.config.consume_fuel {
            limits.fuel.saturating_sub(store.get_fuel().unwrap_or(0))
        } else {
            0
        };
        Ok(Outcome {
            values,
            calls: std::mem::take(&mut store.data_mut().calls),
            fuel_used,
        })
    }

    /// Scores `batch` with a reward module configured with `params` (a JSON object).
    pub fn score(
        &self,
        module: &Module,
        params: &str,
        grants: &Grants,
        limits: Option<&Limits>,
        batch: &[Rollout],
    ) -> Result<Outcome<RewardScore>, PluginError> {
        let Exports::Reward(pre) = &module.exports else {
            return Err(PluginError::WrongKind {
                expected: "reward".into(),
                actual: module.kind().as_str().into(),
            });
        };
        let input: Vec<_> = batch.iter().map(to_wit_rollout).collect();
        let out = self.call(module, grants, limits, batch.len(), "scores", |store| {
            let instance = pre.instantiate(&mut *store)?;
            if let Err(message) = instance
                .twin_plugin_module()
                .call_configure(&mut *store, params)?
            {
                return Ok(Err(PluginError::BadParams(cut(message))));
            }
            let scored = instance.twin_plugin_scorer().call_score(store, &input)?;
            Ok(scored.map_err(|m| PluginError::GuestError(cut(m))))
        })?;
        let values = out
            .values
            .into_iter()
            .enumerate()
            .map(|(i, s)| check_score(i, s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Outcome {
            values,
            calls: out.calls,
            fuel_used: out.fuel_used,
        })
    }

    /// Judges `batch` with a filter module configured with `params` (a JSON object).
    pub fn judge(
        &self,
        module: &Module,
        params: &str,
        grants: &Grants,
        limits: Option<&Limits>,
        batch: &[CandidatePair],
    ) -> Result<Outcome<Verdict>, PluginError> {
        let Exports::Filter(pre) = &module.exports else {
            return Err(PluginError::WrongKind {
                expected: "filter".into(),
                actual: module.kind().as_str().into(),
            });
        };
        let input: Vec<_> = batch.iter().map(to_wit_pair).collect();
        let out = self.call(module, grants, limits, batch.len(), "verdicts", |store| {
            let instance = pre.instantiate(&mut *store)?;
            if let Err(message) = instance
                .twin_plugin_module()
                .call_configure(&mut *store, params)?
            {
                return Ok(Err(PluginError::BadParams(cut(message))));
            }
            let judged = instance.twin_plugin_judge().call_judge(store, &input)?;
            Ok(judged.map_err(|m| PluginError::GuestError(cut(m))))
        })?;
        let values = out
            .values
            .into_iter()
            .enumerate()
            .map(|(i, v)| check_verdict(i, v))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Outcome {
            values,
            calls: out.calls,
            fuel_used: out.fuel_used,
        })
    }

    /// Judges `batch` failing closed: when the filter cannot judge (a trap, an error, bad
    /// output), every candidate is dropped with the error as its reason, and the error is
    /// returned alongside for the job's log. A broken filter never lets a candidate through.
    pub fn judge_or_drop(
        &self,
        module: &Module,
        params: &str,
        grants: &Grants,
        limits: Option<&Limits>,
        batch: &[CandidatePair],
    ) -> (Outcome<Verdict>, Option<PluginError>) {
        match self.judge(module, params, grants, limits, batch) {
            Ok(out) => (out, None),
            Err(e) => {
                let reason = format!("filter failed [{}]: {e}", e.code());
                let values = batch
                    .iter()
                    .map(|_| Verdict {
                        keep: false,
                        reason: Some(reason.clone()),
                    })
                    .collect();
                let out = Outcome {
                    values,
                    calls: Vec::new(),
                    fuel_used: 0,
                };
                (out, Some(e))
            }
        }
    }
}

/// Maps a failed call to the limit or fault behind it.
fn classify(
    store: &mut Store<CallState>,
    limits: &Limits,
    stderr: &MemoryOutputPipe,
    err: wasmtime::Error,
) -> PluginError {
    if let Some(hit) = store.data_mut().limiter.hit.take() {
        return hit;
    }
    let stderr_text = || String::from_utf8_lossy(&stderr.contents()).into_owned();
    match err.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => PluginError::OutOfFuel { fuel: limits.fuel },
        Some(Trap::Interrupt) => PluginError::Deadline(limits.deadline),
        Some(Trap::StackOverflow) => PluginError::StackOverflow,
        Some(trap) => PluginError::GuestTrap {
            trap: trap.to_string(),
            stderr: stderr_text(),
        },
        None => {
            let message = format!("{err:#}");
            // wasmtime's error type for an exhausted hostcall fuel is private; its message is
            // what there is (pinned by a test).
            if message.contains("fuel allocated for hostcalls has been exhausted") {
                return PluginError::BadOutput(format!(
                    "the module handed the host more than {MAX_TRANSFER_BYTES} bytes at once (a \
                     result, or the arguments of a call to the host)"
                ));
            }
            if message.contains("concurrent") {
                PluginError::Host(format!("too many module calls at once: {message}"))
            } else {
                PluginError::GuestTrap {
                    trap: message,
                    stderr: stderr_text(),
                }
            }
        }
    }
}

/// The plain values of a component's score, checked (`twin_core::module_output`).
fn check_score(
    index: usize,
    s: reward::twin::plugin::types::RewardScore,
) -> Result<RewardScore, PluginError> {
    let components = s
        .components
        .into_iter()
        .map(|c| (c.name, c.value))
        .collect();
    let components = module_output::check_score(index, s.score, components)?;
    Ok(RewardScore {
        score: s.score,
        components,
    })
}

fn check_verdict(
    index: usize,
    v: reward::twin::plugin::types::Verdict,
) -> Result<Verdict, PluginError> {
    module_output::check_verdict(index, v.reason.as_deref())?;
    Ok(Verdict {
        keep: v.keep,
        reason: v.reason,
    })
}

/// Checks what `describe` returned: it is stored in the registry and the log as it is.
fn check_descriptor(d: &Descriptor) -> Result<(), PluginError> {
    module_output::check_descriptor(module_output::DescriptorText {
        name: &d.name,
        version: &d.version,
        summary: &d.summary,
        parameters_schema: &d.parameters_schema,
    })?;
    Ok(())
}

/// `message` cut to `MAX_MESSAGE_BYTES` (at a character boundary), marked when cut.
fn cut(message: String) -> String {
    module_output::cut_message(message)
}

fn to_wit_rollout(r: &Rollout) -> reward::twin::plugin::types::Rollout {
    use reward::twin::plugin::types::QuestionType as Q;
    reward::twin::plugin::types::Rollout {
        prompt: r.prompt.clone(),
        completion: r.completion.clone(),
        ground_truth: r.ground_truth.clone(),
        question_type: match r.question_type {
            QuestionType::Pair => Q::Pair,
            QuestionType::Multi => Q::Multi,
            QuestionType::Other => Q::Other,
        },
        metadata: r.metadata.clone(),
    }
}

fn to_wit_pair(p: &CandidatePair) -> filter::twin::plugin::types::CandidatePair {
    filter::twin::plugin::types::CandidatePair {
        image_a: p.image_a.clone(),
        image_b: p.image_b.clone(),
        instance_a: p.instance_a.clone(),
        instance_b: p.instance_b.clone(),
        category_a: p.category_a.clone(),
        category_b: p.category_b.clone(),
        phash_a: p.phash_a,
        phash_b: p.phash_b,
        similarity: p.similarity,
        rank: p.rank,
        metadata: p.metadata.clone(),
    }
}

fn from_wit_descriptor(d: &reward::twin::plugin::types::Descriptor) -> Descriptor {
    use reward::twin::plugin::types::ModuleKind as K;
    Descriptor {
        name: d.name.clone(),
        version: d.version.clone(),
        kind: match d.kind {
            K::Reward => ModuleKind::Reward,
            K::Filter => ModuleKind::Filter,
        },
        summary: d.summary.clone(),
        parameters_schema: d.parameters_schema.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twin_core::module_output::{MAX_MESSAGE_BYTES, MAX_SCHEMA_BYTES, MAX_SUMMARY_BYTES};

    fn instantiate(host: &Host, limits: &Limits, wat: &str) -> Result<(), PluginError> {
        let component = Component::new(&host.engine, wat::parse_str(wat).expect("valid WAT"))
            .expect("compiles");
        let (mut store, stderr) = host
            .store(limits, Arc::new(Grants::default()))
            .expect("a store");
        match host.linker.instantiate(&mut store, &component) {
            Ok(_) => Ok(()),
            Err(e) => Err(classify(&mut store, limits, &stderr, e)),
        }
    }

    #[test]
    fn memories_and_tables_of_an_instance_share_one_budget() {
        let host = Host::new(HostConfig::default()).expect("host");
        let limits = Limits {
            memory_bytes: 32 << 20,
            ..Limits::default()
        };
        let over = Err(PluginError::MemoryLimit {
            what: "linear memory",
            limit: 32 << 20,
        });
        // 20 MiB (320 pages) fits ...
        let one = "(component (core module $a (memory 320)) (core instance (instantiate $a)))";
        assert_eq!(instantiate(&host, &limits, one), Ok(()));
        // ... twice does not, though each memory is under the limit on its own.
        let two = "(component
            (core module $a (memory 320)) (core instance (instantiate $a))
            (core module $b (memory 320)) (core instance (instantiate $b)))";
        assert_eq!(instantiate(&host, &limits, two), over);
        // Tables count too: 31 MiB of memory and 200000 function references (1.6 MB).
        let with_table = "(component
            (core module $a (memory 496) (table 200000 funcref)) (core instance (instantiate $a)))";
        assert!(
            matches!(
                instantiate(&host, &limits, with_table),
                Err(PluginError::MemoryLimit { limit, .. }) if limit == 32 << 20
            ),
            "memory and table together are over the budget"
        );
        let small_table = "(component
            (core module $a (memory 496) (table 1000 funcref)) (core instance (instantiate $a)))";
        assert_eq!(instantiate(&host, &limits, small_table), Ok(()));
    }

    #[test]
    fn the_compiler_and_the_runtime_engines_are_compatible() {
        let settings = EngineSettings {
            consume_fuel: true,
            max_memory_bytes: 1 << 30,
            concurrency: 4,
        };
        let run = engine(&settings, EngineUse::Run).expect("engine");
        let compile = engine(&settings, EngineUse::Compile).expect("engine");
        assert_eq!(engine_fingerprint(&run), engine_fingerprint(&compile));
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        assert_eq!(cut("short".into()), "short");
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let cut = cut(long);
        assert!(
            cut.len() <= MAX_MESSAGE_BYTES + " […]".len(),
            "{}",
            cut.len()
        );
        assert!(cut.ends_with(" […]"));
    }

    #[test]
    fn a_descriptor_over_the_caps_is_refused() {
        let ok = Descriptor {
            name: "x".into(),
            version: "1".into(),
            kind: ModuleKind::Reward,
            summary: String::new(),
            parameters_schema: "{}".into(),
        };
        assert_eq!(check_descriptor(&ok), Ok(()));
        let long_summary = Descriptor {
            summary: "s".repeat(MAX_SUMMARY_BYTES + 1),
            ..ok.clone()
        };
        assert!(
            matches!(check_descriptor(&long_summary), Err(PluginError::BadOutput(m)) if m.contains("summary"))
        );
        let big_schema = Descriptor {
            parameters_schema: format!("\"{}\"", "s".repeat(MAX_SCHEMA_BYTES)),
            ..ok
        };
        assert!(
            matches!(check_descriptor(&big_schema), Err(PluginError::BadOutput(m)) if m.contains("parameters-schema"))
        );
    }
}
