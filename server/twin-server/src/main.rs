//! `twin-server`: `serve` runs the job server (with an embedded executor by default);
//! `executor` runs a standalone executor against a server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use twin_server::config::ServerConfig;
use twin_server::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(name = "twin-server", version, about = "twin job server and executor")]
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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        /// TOML config file; flags and TWIN_* variables override it.
        #[arg(long, env = "TWIN_CONFIG")]
        config: Option<PathBuf>,
        /// Where the event log and blobs live (default ./twin-data).
        #[arg(long, env = "TWIN_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Address to listen on (default 127.0.0.1:7878; port 0 picks one).
        #[arg(long, env = "TWIN_LISTEN")]
        listen: Option<SocketAddr>,
        /// Do not run the embedded executor.
        #[arg(long)]
        no_executor: bool,
        /// Lease time-to-live in milliseconds.
        #[arg(long, env = "TWIN_LEASE_TTL_MS")]
        lease_ttl_ms: Option<u64>,
    },
    /// Run a standalone executor that leases jobs from a server.
    Executor {
        #[arg(long, env = "TWIN_SERVER", default_value = "http://127.0.0.1:7878")]
        server: String,
        #[arg(long, env = "TWIN_TOKEN")]
        token: Option<String>,
        /// Name recorded in leases (default: executor-<pid>).
        #[arg(long)]
        name: Option<String>,
        /// GPUs offered to jobs (default: the CUDA devices libtorch sees).
        #[arg(long)]
        gpus: Option<u32>,
        /// Labels jobs may require (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Where compiled Wasm modules are cached.
        #[arg(long, env = "TWIN_MODULE_CACHE")]
        module_cache: Option<PathBuf>,
    },
    /// Model checkpoints: make a random-weight one, describe one.
    #[cfg(feature = "ml")]
    #[command(subcommand)]
    Model(ModelCommand),
    /// Internal: compiles one Wasm module for a parent server or executor (INPUT OUTPUT FLAGS…).
    #[command(hide = true)]
    CompileModule {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[cfg(feature = "ml")]
#[derive(Subcommand)]
enum ModelCommand {
    /// Write a CLIP image tower with seeded random weights, in the Hugging Face layout.
    InitClip {
        dir: PathBuf,
        #[arg(long, value_enum, default_value = "b32")]
        preset: twin_server::model::ClipPreset,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write a Qwen2.5-VL model with seeded random weights and a byte-level tokenizer, in the
    /// Hugging Face layout.
    InitQwen {
        dir: PathBuf,
        #[arg(long, value_enum, default_value = "tiny")]
        preset: twin_server::model::QwenPreset,
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

#[cfg(feature = "ml")]
fn model_command(command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::InitClip { dir, preset, seed } => {
            let hash = twin_server::model::init_clip(&dir, preset, seed)?;
            println!("wrote {} (weights {hash})", dir.display());
        }
        ModelCommand::InitQwen { dir, preset, seed } => {
            let hash = twin_server::model::init_qwen(&dir, preset, seed)?;
            println!("wrote {} (weights {hash})", dir.display());
        }
        ModelCommand::Info { dir } => {
            let info = twin_server::model::info(&dir)?;
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
            let args = twin_server::model::GenerateArgs {
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
            let out = twin_server::model::generate(&dir, &args)?;
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    #[cfg(feature = "ml")]
    if let Command::Model(command) = cli.command {
        return match model_command(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    if let Command::CompileModule { args } = &cli.command {
        // No runtime, no logging: the child only compiles and exits.
        return ExitCode::from(twin_plugins::compile_main(args).clamp(0, 255) as u8);
    }
    telemetry::init(cli.log_format);
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
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve {
                config,
                data_dir,
                listen,
                no_executor,
                lease_ttl_ms,
            } => {
                let mut cfg = match config {
                    Some(path) => ServerConfig::from_file(&path)?,
                    None => ServerConfig::default(),
                };
                if let Some(d) = data_dir {
                    cfg.data_dir = d;
                }
                if let Some(l) = listen {
                    cfg.listen = l;
                }
                if no_executor {
                    cfg.embedded_executor = false;
                }
                if let Some(t) = lease_ttl_ms {
                    cfg.lease_ttl_ms = t;
                }
                twin_server::serve(cfg).await
            }
            Command::Executor {
                server,
                token,
                name,
                gpus,
                labels,
                module_cache,
            } => {
                let name = name.unwrap_or_else(|| format!("executor-{}", std::process::id()));
                let cache =
                    module_cache.unwrap_or_else(|| std::env::temp_dir().join("twin-module-cache"));
                twin_server::run_executor(
                    twin_executor::ExecutorConfig {
                        server,
                        token,
                        name,
                        gpus: gpus.unwrap_or_else(twin_server::detected_gpus),
                        labels,
                        poll_wait: Duration::from_secs(20),
                        model_cache_bytes: twin_executor::ExecutorConfig::DEFAULT_MODEL_CACHE_BYTES,
                    },
                    cache,
                )
                .await
            }
            Command::CompileModule { .. } => unreachable!("handled before the runtime starts"),
            #[cfg(feature = "ml")]
            Command::Model(_) => unreachable!("handled before the runtime starts"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
