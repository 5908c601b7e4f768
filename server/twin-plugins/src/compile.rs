//! Turning a component's bytes into native code, in-process or in a child process.
//!
//! Cranelift compilation cannot be interrupted once started, and a hostile module can make it
//! take minutes or a lot of memory; so a server compiles uploads in a child process that it kills
//! at a deadline, with a CPU-time limit and a memory limit (`RLIMIT_DATA`) that the child sets on
//! itself before reading the module. The child writes the serialized artefact, which the parent
//! loads after checking it came from an engine with the same settings (wasmtime refuses artefacts
//! from an incompatible engine). However compiled, at most [`crate::HostConfig`]'s
//! `max_concurrent_compilations` run at once ([`CompileSlots`]): each may use a core and its
//! memory limit, and uploads are otherwise unbounded.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::PluginError;
use crate::host::{EngineSettings, EngineUse, HostConfig, engine};

/// Exit status of the child for a module that is not valid (as opposed to a crash of the child).
const EXIT_INVALID: i32 = 3;
/// What the parent keeps of the child's stderr (the rest is read and dropped, so a child that
/// writes a lot never blocks on a full pipe).
const STDERR_KEPT: u64 = 64 * 1024;
/// How long a compilation waits for a free slot before the host gives up on it.
const SLOT_WAIT: Duration = Duration::from_secs(60);
/// Most threads a compiler child compiles with. Its memory limit has to hold every thread's
/// stack and working set at once, so the count is bounded rather than the machine's core count;
/// a child on a 64-core machine would otherwise need a limit sized for 64 compilations at once.
const MAX_CHILD_THREADS: usize = 8;

/// How a [`crate::Host`] compiles modules it has not seen before.
#[derive(Debug, Clone)]
pub enum Compiler {
    /// In this process: for trusted modules and offline tools (`twin modules run`).
    InProcess,
    /// `program args… INPUT OUTPUT [engine flags]`, killed after `timeout`. The program must call
    /// [`compile_main`] with the arguments that follow `args`.
    Subprocess {
        program: PathBuf,
        args: Vec<OsString>,
        timeout: Duration,
    },
}

/// Checks the header: a component, not a core module and not something else.
pub(crate) fn check_header(bytes: &[u8]) -> Result<(), PluginError> {
    const MAGIC: &[u8] = b"\0asm";
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return Err(PluginError::NotWasm(
            "the file does not start with the WebAssembly magic bytes".into(),
        ));
    }
    match bytes[4..8] {
        // Component-model binaries: version 0x0d, layer 1.
        [0x0d, 0x00, 0x01, 0x00] => Ok(()),
        [0x01, 0x00, 0x00, 0x00] => Err(PluginError::NotWasm(
            "this is a core WebAssembly module; build a component (e.g. target wasm32-wasip2, \
             or `wasm-tools component new`)"
                .into(),
        )),
        _ => Err(PluginError::NotWasm(format!(
            "unsupported binary version {:02x?}",
            &bytes[4..8]
        ))),
    }
}

/// A counting semaphore over compilations.
#[derive(Debug)]
pub(crate) struct CompileSlots {
    free: Mutex<u32>,
    freed: Condvar,
}

/// A held compilation slot, given back on drop.
pub(crate) struct CompileSlot<'a>(&'a CompileSlots);

impl CompileSlots {
    pub fn new(slots: u32) -> Self {
        Self {
            free: Mutex::new(slots.max(1)),
            freed: Condvar::new(),
        }
    }

    /// Waits up to `wait` for a slot. Waiting rather than refusing at once keeps a burst of
    /// uploads working (one after another); the bound keeps a flood from queueing for ever.
    pub fn acquire(&self, wait: Duration) -> Result<CompileSlot<'_>, PluginError> {
        let deadline = Instant::now() + wait;
        let mut free = self.free.lock();
        while *free == 0 {
            if self.freed.wait_until(&mut free, deadline).timed_out() && *free == 0 {
                return Err(PluginError::Host(format!(
                    "too many modules are compiling at once (waited {wait:?} for one to finish); \
                     try again later"
                )));
            }
        }
        *free -= 1;
        Ok(CompileSlot(self))
    }
}

impl Drop for CompileSlot<'_> {
    fn drop(&mut self) {
        *self.0.free.lock() += 1;
        self.0.freed.notify_one();
    }
}

/// Compiles `bytes` with `settings`' engine and returns the serialized artefact, holding one of
/// `slots` while it does.
pub(crate) fn compile(
    config: &HostConfig,
    slots: &CompileSlots,
    settings: &EngineSettings,
    bytes: &[u8],
) -> Result<Vec<u8>, PluginError> {
    check_header(bytes)?;
    let _slot = slots.acquire(SLOT_WAIT)?;
    match &config.compiler {
        Compiler::InProcess => {
            let engine = engine(settings, EngineUse::Compile)
                .map_err(|e| PluginError::Host(format!("{e:#}")))?;
            engine
                .precompile_component(bytes)
                .map_err(|e| PluginError::Invalid(format!("{e:#}")))
        }
        Compiler::Subprocess {
            program,
            args,
            timeout,
        } => compile_in_child(
            program,
            args,
            *timeout,
            config.max_compile_memory_bytes,
            settings,
            bytes,
        ),
    }
}

fn compile_in_child(
    program: &Path,
    args: &[OsString],
    timeout: Duration,
    memory_bytes: u64,
    settings: &EngineSettings,
    bytes: &[u8],
) -> Result<Vec<u8>, PluginError> {
    let dir = tempfile::tempdir().map_err(|e| PluginError::Host(format!("temp dir: {e}")))?;
    let input = dir.path().join("module.wasm");
    let output = dir.path().join("module.cwasm");
    std::fs::write(&input, bytes).map_err(|e| PluginError::Host(format!("write module: {e}")))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .arg(&input)
        .arg(&output)
        .args(settings.to_args())
        .arg("--cpu-seconds")
        .arg(timeout.as_secs().saturating_add(1).to_string())
        .arg("--max-data-bytes")
        .arg(memory_bytes.to_string())
        // wasmtime compiles functions in parallel on rayon's global pool, which reads this.
        .env("RAYON_NUM_THREADS", child_threads().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| PluginError::Host(format!("start compiler {}: {e}", program.display())))?;
    let stderr = child.stderr.take().map(read_capped);
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(PluginError::CompileTimeout(timeout));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(PluginError::Host(format!("wait for compiler: {e}"))),
        }
    };
    // The child has exited, so its end of the pipe is closed and the reader finishes.
    let stderr = stderr
        .and_then(|reader| reader.join().ok())
        .unwrap_or_default();
    let stderr = stderr.trim().to_owned();
    match status.code() {
        Some(0) => std::fs::read(&output)
            .map_err(|e| PluginError::CompilerFailed(format!("read artefact: {e}"))),
        Some(EXIT_INVALID) => Err(PluginError::Invalid(stderr)),
        _ => {
            use std::os::unix::process::ExitStatusExt;
            // Killed by RLIMIT_CPU (SIGXCPU) or SIGKILL counts as running out of time.
            if matches!(status.signal(), Some(9) | Some(24)) {
                return Err(PluginError::CompileTimeout(timeout));
            }
            // An allocation refused under RLIMIT_DATA aborts the child with Rust's message: the
            // module needs more memory to compile than a module may have, which is its fault.
            if status.signal() == Some(6) && stderr.contains("memory allocation of") {
                return Err(PluginError::Invalid(format!(
                    "compiling it needs more than the compiler's {memory_bytes}-byte memory limit"
                )));
            }
            Err(PluginError::CompilerFailed(format!("{status}: {stderr}")))
        }
    }
}

fn child_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_CHILD_THREADS)
}

/// Reads a pipe to its end on a thread of its own, keeping the first [`STDERR_KEPT`] bytes.
fn read_capped(pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut pipe = pipe;
        let _ = pipe.by_ref().take(STDERR_KEPT).read_to_end(&mut kept);
        let _ = std::io::copy(&mut pipe, &mut std::io::sink());
        String::from_utf8_lossy(&kept).into_owned()
    })
}

/// The compiler child's command line: `INPUT OUTPUT` and flags.
#[derive(Debug, PartialEq)]
struct ChildArgs {
    input: String,
    output: String,
    settings: EngineSettings,
    cpu_seconds: Option<u64>,
    max_data_bytes: Option<u64>,
}

impl ChildArgs {
    /// Parses `INPUT OUTPUT`, the flags of [`EngineSettings::to_args`], `--cpu-seconds N` and
    /// `--max-data-bytes N`.
    fn parse(args: &[String]) -> Result<Self, String> {
        let usage = "usage: INPUT OUTPUT [--no-fuel] [--max-memory BYTES] [--concurrency N] \
                     [--cpu-seconds N] [--max-data-bytes BYTES]";
        let mut it = args.iter();
        let input = it.next().ok_or(usage)?.clone();
        let output = it.next().ok_or(usage)?.clone();
        let defaults = HostConfig::default();
        let mut parsed = Self {
            input,
            output,
            settings: EngineSettings {
                consume_fuel: true,
                max_memory_bytes: defaults.max_memory_bytes,
                concurrency: defaults.concurrency,
            },
            cpu_seconds: None,
            max_data_bytes: None,
        };
        while let Some(flag) = it.next() {
            let mut number = || -> Result<u64, String> {
                it.next()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| format!("{flag} needs a number; {usage}"))
            };
            match flag.as_str() {
                "--no-fuel" => parsed.settings.consume_fuel = false,
                "--max-memory" => parsed.settings.max_memory_bytes = number()?,
                "--concurrency" => {
                    parsed.settings.concurrency =
                        u32::try_from(number()?).map_err(|e| e.to_string())?
                }
                "--cpu-seconds" => parsed.cpu_seconds = Some(number()?),
                "--max-data-bytes" => parsed.max_data_bytes = Some(number()?),
                other => return Err(format!("unknown flag {other}; {usage}")),
            }
        }
        Ok(parsed)
    }
}

/// Entry point of the compiler child: `INPUT OUTPUT [--no-fuel] [--max-memory BYTES]
/// [--concurrency N] [--cpu-seconds N] [--max-data-bytes BYTES]`. Returns the process exit code
/// (0 ok, 3 invalid module, 2 usage or I/O).
pub fn compile_main(args: &[String]) -> i32 {
    let ChildArgs {
        input,
        output,
        settings,
        cpu_seconds,
        max_data_bytes,
    } = match ChildArgs::parse(args) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    // The limits are set here, by the child on itself, before it reads the module: setting them
    // between fork and exec would need `unsafe` (`pre_exec`), and this needs none. `RLIMIT_DATA`
    // rather than `RLIMIT_AS`: the engine reserves gigabytes of address space for its pooling
    // allocator, inaccessible and never committed, which `RLIMIT_AS` would count and
    // `RLIMIT_DATA` (writable private mappings, the heap included) does not.
    let limits = [
        (rlimit::Resource::CPU, cpu_seconds, "CPU"),
        (rlimit::Resource::DATA, max_data_bytes, "memory"),
    ];
    for (resource, limit, what) in limits {
        if let Some(limit) = limit
            && let Err(e) = rlimit::setrlimit(resource, limit, limit)
        {
            eprintln!("cannot set the {what} limit: {e}");
            return 2;
        }
    }
    let bytes = match std::fs::read(&input) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("read {input}: {e}");
            return 2;
        }
    };
    let engine = match engine(&settings, EngineUse::Compile) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("engine: {e:#}");
            return 2;
        }
    };
    match engine.precompile_component(&bytes) {
        Ok(artefact) => match std::fs::write(&output, artefact) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("write {output}: {e}");
                2
            }
        },
        Err(e) => {
            eprintln!("{e:#}");
            EXIT_INVALID
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_child_reads_back_what_the_parent_writes() {
        let settings = EngineSettings {
            consume_fuel: false,
            max_memory_bytes: 1 << 20,
            concurrency: 3,
        };
        let mut args = vec!["in.wasm".to_owned(), "out.cwasm".to_owned()];
        args.extend(settings.to_args());
        args.extend(["--cpu-seconds", "7", "--max-data-bytes", "1024"].map(String::from));
        assert_eq!(
            ChildArgs::parse(&args),
            Ok(ChildArgs {
                input: "in.wasm".into(),
                output: "out.cwasm".into(),
                settings,
                cpu_seconds: Some(7),
                max_data_bytes: Some(1024),
            })
        );
        assert!(ChildArgs::parse(&["a".into(), "b".into(), "--max-data-bytes".into()]).is_err());
    }

    #[test]
    fn compilations_wait_for_a_free_slot_and_give_up_after_a_while() {
        let slots = CompileSlots::new(1);
        let held = slots.acquire(Duration::ZERO).expect("a free slot");
        let err = slots
            .acquire(Duration::from_millis(20))
            .err()
            .expect("no slot while one compilation runs");
        assert!(err.to_string().contains("too many modules"), "{err}");
        drop(held);
        assert!(slots.acquire(Duration::ZERO).is_ok(), "the slot came back");
    }
}
