//! Turning a component's bytes into native code, in-process or in a child process.
//!
//! Cranelift compilation cannot be interrupted once started, and a hostile module can make it
//! take minutes or a lot of memory; so a server compiles uploads in a child process that it kills
//! at a deadline, with a CPU-time limit set inside the child as a backstop. The child writes the
//! serialized artefact, which the parent loads after checking it came from an engine with the same
//! settings (wasmtime refuses artefacts from an incompatible engine).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::PluginError;
use crate::host::{EngineSettings, engine};

/// Exit status of the child for a module that is not valid (as opposed to a crash of the child).
const EXIT_INVALID: i32 = 3;

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

/// Compiles `bytes` with `settings`' engine and returns the serialized artefact.
pub(crate) fn compile(
    compiler: &Compiler,
    settings: &EngineSettings,
    bytes: &[u8],
) -> Result<Vec<u8>, PluginError> {
    check_header(bytes)?;
    match compiler {
        Compiler::InProcess => {
            let engine = engine(settings).map_err(|e| PluginError::Host(format!("{e:#}")))?;
            engine
                .precompile_component(bytes)
                .map_err(|e| PluginError::Invalid(format!("{e:#}")))
        }
        Compiler::Subprocess {
            program,
            args,
            timeout,
        } => compile_in_child(program, args, *timeout, settings, bytes),
    }
}

fn compile_in_child(
    program: &Path,
    args: &[OsString],
    timeout: Duration,
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
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| PluginError::Host(format!("start compiler {}: {e}", program.display())))?;
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
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        use std::io::Read;
        let _ = pipe.read_to_string(&mut stderr);
    }
    let stderr = stderr.trim().to_owned();
    match status.code() {
        Some(0) => std::fs::read(&output)
            .map_err(|e| PluginError::CompilerFailed(format!("read artefact: {e}"))),
        Some(EXIT_INVALID) => Err(PluginError::Invalid(stderr)),
        _ => {
            // Killed by RLIMIT_CPU (SIGXCPU) or SIGKILL counts as running out of time.
            #[cfg(unix)]
            {
                use std::os::unix::process::ExitStatusExt;
                if matches!(status.signal(), Some(9) | Some(24)) {
                    return Err(PluginError::CompileTimeout(timeout));
                }
            }
            Err(PluginError::CompilerFailed(format!("{status}: {stderr}")))
        }
    }
}

/// Entry point of the compiler child: `INPUT OUTPUT [--no-fuel] [--max-memory BYTES]
/// [--cpu-seconds N]`. Returns the process exit code (0 ok, 3 invalid module, 2 usage or I/O).
pub fn compile_main(args: &[String]) -> i32 {
    let (input, output, settings, cpu) = match EngineSettings::from_args(args) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    if let Some(seconds) = cpu
        && let Err(e) = rlimit::setrlimit(rlimit::Resource::CPU, seconds, seconds)
    {
        eprintln!("cannot set the CPU limit: {e}");
        return 2;
    }
    let bytes = match std::fs::read(&input) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("read {input}: {e}");
            return 2;
        }
    };
    let engine = match engine(&settings) {
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
