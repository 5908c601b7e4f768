//! `twin-executor`: leases jobs from a twin server and runs them through this build's stages;
//! `twin-executor model …` makes and inspects model checkpoints.
//!
//! One executor runs one job at a time. On SIGTERM or SIGINT it hands its current job back to
//! the server (the job is re-queued at once, counting no attempt) and exits. The token comes from
//! a file that only this user may read, never from the command line or the environment, where
//! other users of the machine can see it.

#[cfg(any(feature = "mine", feature = "eval"))]
mod model;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "twin-executor",
    version,
    about = "twin executor: leases jobs from a twin server and runs them",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "human",
        env = "TWIN_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(flatten)]
    run: RunArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Args)]
struct RunArgs {
    #[arg(long, env = "TWIN_SERVER", default_value = "http://127.0.0.1:7878")]
    server: String,
    /// A file holding the execute token (mode 0600 or stricter); none when auth is off.
    #[arg(long, env = "TWIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM file of a private CA to trust for an https server (besides the public roots).
    #[arg(long, env = "TWIN_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Name recorded in leases, unique among running executors (default: executor-<host>-<pid>).
    #[arg(long)]
    name: Option<String>,
    /// GPUs offered to jobs (default: the CUDA devices libtorch sees).
    #[arg(long)]
    gpus: Option<u32>,
    /// Labels jobs may require (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Where compiled Wasm modules are cached: a directory private to this user, since its files
    /// are loaded as native code (default: `$XDG_CACHE_HOME/twin/module-cache`, or
    /// `~/.cache/twin/module-cache`).
    #[arg(long, env = "TWIN_MODULE_CACHE")]
    module_cache: Option<PathBuf>,
    /// Bytes of models kept loaded per device between jobs (least recently used evicted first).
    #[arg(long, env = "TWIN_MODEL_CACHE_BYTES", default_value_t = twin_executor::ExecutorConfig::DEFAULT_MODEL_CACHE_BYTES)]
    model_cache_bytes: u64,
    /// Where registered models are kept on disk, fetched by hash (shareable by executors on
    /// one machine; default: `$XDG_CACHE_HOME/twin/models`, or `~/.cache/twin/models`).
    #[arg(long, env = "TWIN_MODEL_STORE")]
    model_store: Option<PathBuf>,
    /// Bytes of model files the model store may hold (least recently used models evicted).
    #[arg(long, env = "TWIN_MODEL_STORE_BYTES", default_value_t = DEFAULT_MODEL_STORE_BYTES)]
    model_store_bytes: u64,
    /// A directory whose files job specs may name by path (repeatable; `:`-separated in the
    /// environment). None by default: specs then name uploaded blobs, which `twin submit` sends.
    /// Symlinks count where they point; the model store and module cache are never allowed.
    #[arg(
        long = "allowed-root",
        env = "TWIN_ALLOWED_ROOTS",
        value_delimiter = ':'
    )]
    allowed_roots: Vec<PathBuf>,
    /// Internal (set by `twin-server serve`): a directory never allowed even under a root (the
    /// server's data directory, whose blobs sit at predictable paths).
    #[arg(long = "deny-root", hide = true)]
    deny_roots: Vec<PathBuf>,
    /// Exit after this many seconds without a job (for batch systems that bill idle time).
    #[arg(long, value_name = "SECS")]
    exit_when_idle: Option<u64>,
    /// Internal (set by `twin-server serve`): stop, handing the job back, when that process dies,
    /// so a killed server leaves no executor behind to compete with its next child.
    #[arg(long, hide = true, value_name = "PID")]
    parent_pid: Option<u32>,
}

#[derive(Subcommand)]
enum Command {
    /// Model checkpoints: make a random-weight one, describe one, generate from one.
    #[cfg(any(feature = "mine", feature = "eval"))]
    #[command(subcommand)]
    Model(ModelCommand),
    /// Internal: compiles one Wasm module for a parent executor (INPUT OUTPUT FLAGS…).
    #[command(hide = true)]
    CompileModule {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// 200 GiB: a few checkpoints of the recipe's sizes (7–15 GB each) with room to spare.
const DEFAULT_MODEL_STORE_BYTES: u64 = 200 << 30;

fn default_model_store() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("twin/models")
}

/// Reads the execute token from `path`, refusing a file that group or others can read: a token
/// that other users could read is a token they could use.
fn read_token_file(path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::metadata(path).with_context(|| format!("--token-file {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "--token-file {}: readable by group or others (mode {mode:03o}); run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("reading --token-file {}", path.display()))?;
    let token = token.trim();
    if token.is_empty() {
        anyhow::bail!("--token-file {}: the file is empty", path.display());
    }
    Ok(token.to_owned())
}

/// CUDA devices this process can use (0 without the ML stages).
fn detected_gpus() -> u32 {
    #[cfg(any(feature = "mine", feature = "eval"))]
    {
        if twin_ml::cuda_available() {
            return twin_ml::tch::Cuda::device_count().max(0) as u32;
        }
    }
    0
}

/// The Wasm host: modules are compiled by this same binary run as `twin-executor
/// compile-module`, a child process killed after two minutes.
fn plugin_host(cache_dir: PathBuf) -> anyhow::Result<std::sync::Arc<twin_plugins::Host>> {
    let program = std::env::current_exe().context("locating this binary for the compiler child")?;
    let host = twin_plugins::Host::new(twin_plugins::HostConfig {
        cache_dir: Some(cache_dir),
        compiler: twin_plugins::Compiler::Subprocess {
            program,
            args: vec!["compile-module".into()],
            timeout: Duration::from_secs(120),
        },
        ..twin_plugins::HostConfig::default()
    })
    .map_err(|e| anyhow::anyhow!("starting the Wasm host: {e}"))?;
    Ok(std::sync::Arc::new(host))
}

/// Asks the kernel for SIGTERM when the parent dies (handled like any SIGTERM: the job is handed
/// back), and stops at once if the parent is already gone.
fn follow_parent(parent: u32) -> anyhow::Result<()> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
        .context("asking for a signal when the server exits")?;
    // The parent may have died before the request above took effect.
    if nix::unistd::getppid().as_raw() as u32 != parent {
        anyhow::bail!("the server that started this executor (pid {parent}) has exited");
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    if let Some(parent) = args.parent_pid {
        follow_parent(parent)?;
    }
    let token = args
        .token_file
        .as_deref()
        .map(read_token_file)
        .transpose()?;
    let name = args.name.unwrap_or_else(|| {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "host".into());
        format!("executor-{host}-{}", std::process::id())
    });
    // Never a shared temporary directory: another user could create it first and plant code.
    let cache = match args.module_cache {
        Some(dir) => dir,
        None => twin_plugins::user_cache_dir().context(
            "no directory for compiled modules: neither XDG_CACHE_HOME nor HOME is set; \
             pass --module-cache",
        )?,
    };
    let store_dir = args.model_store.unwrap_or_else(default_model_store);
    let mut roots = twin_executor::AllowedRoots::new(&args.allowed_roots)
        .with_context(|| "--allowed-root".to_owned())?
        .deny(&store_dir)
        .deny(&cache);
    for dir in &args.deny_roots {
        roots = roots.deny(dir);
    }
    if !roots.is_empty() {
        tracing::info!(roots = ?roots.roots(), denied = ?roots.denied(), "paths in job specs are read under these roots");
    }
    let plugins = plugin_host(cache)?;
    let config = twin_executor::ExecutorConfig {
        server: args.server,
        token,
        ca_file: args.ca_file,
        name,
        gpus: args.gpus.unwrap_or_else(detected_gpus),
        labels: args.labels,
        poll_wait: Duration::from_secs(20),
        model_cache_bytes: args.model_cache_bytes,
        exit_when_idle: args.exit_when_idle.map(Duration::from_secs),
        allowed_roots: std::sync::Arc::new(roots),
    };
    let store = twin_executor::ModelStore::open(&store_dir, args.model_store_bytes)
        .map_err(|e| anyhow::anyhow!("--model-store {}: {}", store_dir.display(), e.message))?;
    let stages =
        twin_executor::default_stages(plugins, config.model_cache(), std::sync::Arc::new(store));
    let exec = twin_executor::Executor::new(config, stages)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut task = tokio::spawn(exec.run(stop_rx));
    tokio::select! {
        r = shutdown_signal() => {
            r?;
            tracing::info!("stopping: handing the current job back");
            let _ = stop_tx.send(true);
            (&mut task).await.context("the executor task")?;
        }
        // The loop ended on its own (`--exit-when-idle`).
        r = &mut task => r.context("the executor task")?,
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CompileModule { args }) => {
            // No runtime, no logging: the child only compiles and exits.
            return ExitCode::from(twin_plugins::compile_main(&args).clamp(0, 255) as u8);
        }
        #[cfg(any(feature = "mine", feature = "eval"))]
        Some(Command::Model(command)) => {
            return match model_command(command) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        None => {}
    }
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli.run)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
#[cfg(any(feature = "mine", feature = "eval"))]
#[derive(Subcommand)]
enum ModelCommand {
    /// Write a CLIP image tower with seeded random weights, in the Hugging Face layout.
    InitClip {
        dir: PathBuf,
        #[arg(long, value_enum, default_value = "b32")]
        preset: model::ClipPreset,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write a Qwen2.5-VL model with seeded random weights and a byte-level tokenizer, in the
    /// Hugging Face layout.
    InitQwen {
        dir: PathBuf,
        #[arg(long, value_enum, default_value = "tiny")]
        preset: model::QwenPreset,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Architecture, sizes, parameter count and weights hash of a checkpoint directory.
    Info { dir: PathBuf },
    /// Answer one chat turn with a Qwen2.5-VL checkpoint: images first, then the prompt.
    Generate {
        dir: PathBuf,
        /// An image file (repeatable; in order).
        #[arg(long = "image")]
        images: Vec<PathBuf>,
        #[arg(long)]
        prompt: String,
        /// A system message (Qwen's default one when absent).
        #[arg(long)]
        system: Option<String>,
        #[arg(long, default_value_t = 256)]
        max_new_tokens: usize,
        /// 0 decodes greedily.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1)]
        samples: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// auto, cpu or cuda.
        #[arg(long, default_value = "auto")]
        device: String,
    },
}

#[cfg(any(feature = "mine", feature = "eval"))]
/// The `twin models add` command that registers a checkpoint just written, named after its
/// directory when that makes a valid model name.
#[cfg(any(feature = "mine", feature = "eval"))]
fn models_add_line(dir: &Path) -> String {
    let name: String = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = if twin_core::model::valid_model_name(&name) {
        name
    } else {
        "NAME".to_owned()
    };
    let shown = dir.display().to_string();
    let quoted = if shown.contains(|c: char| c.is_whitespace() || "'\"$`\\".contains(c)) {
        format!("'{}'", shown.replace('\'', "'\\''"))
    } else {
        shown
    };
    format!("twin models add {quoted} --name {name}")
}

fn model_command(command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::InitClip { dir, preset, seed } => {
            let hash = model::init_clip(&dir, preset, seed)?;
            println!("wrote {} (weights {hash})", dir.display());
            println!("register it: {}", models_add_line(&dir));
        }
        ModelCommand::InitQwen { dir, preset, seed } => {
            let hash = model::init_qwen(&dir, preset, seed)?;
            println!("wrote {} (weights {hash})", dir.display());
            println!("register it: {}", models_add_line(&dir));
        }
        ModelCommand::Info { dir } => {
            let info = model::info(&dir)?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        ModelCommand::Generate {
            dir,
            images,
            prompt,
            system,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            samples,
            seed,
            device,
        } => {
            let device = match device.as_str() {
                "auto" => twin_ml::DeviceRequest::Auto,
                "cpu" => twin_ml::DeviceRequest::Cpu,
                "cuda" => twin_ml::DeviceRequest::Cuda,
                other => anyhow::bail!("--device: {other:?} is not auto, cpu or cuda"),
            };
            let args = model::GenerateArgs {
                images,
                prompt,
                system,
                max_new_tokens,
                temperature,
                top_p,
                top_k,
                samples,
                seed,
                device,
            };
            let out = model::generate(&dir, &args)?;
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
    }
    Ok(())
}
