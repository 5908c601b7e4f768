//! `twin-server`: `serve` runs the job server, with a supervised `twin-executor` child by default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

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
        /// Do not start an executor child (run `twin-executor` yourself).
        #[arg(long)]
        no_executor: bool,
        /// The `twin-executor` binary to start (default: the one beside twin-server).
        #[arg(long, env = "TWIN_EXECUTOR_BIN")]
        executor_bin: Option<PathBuf>,
        /// Lease time-to-live in milliseconds.
        #[arg(long, env = "TWIN_LEASE_TTL_MS")]
        lease_ttl_ms: Option<u64>,
        /// A directory whose files job specs may name by path (repeatable; adds to the config's
        /// `allowed_roots`). None by default: `twin submit` uploads instead.
        #[arg(long = "allowed-root")]
        allowed_roots: Vec<PathBuf>,
        /// PEM certificate chain to serve HTTPS with (with --tls-key; config `tls_cert`).
        #[arg(long, env = "TWIN_TLS_CERT", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key of that certificate (config `tls_key`).
        #[arg(long, env = "TWIN_TLS_KEY", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Internal: compiles one Wasm module for a parent server or executor (INPUT OUTPUT FLAGS…).
    #[command(hide = true)]
    CompileModule {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
                executor_bin,
                lease_ttl_ms,
                allowed_roots,
                tls_cert,
                tls_key,
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
                if executor_bin.is_some() {
                    cfg.executor.program = executor_bin;
                }
                if let Some(t) = lease_ttl_ms {
                    cfg.lease_ttl_ms = t;
                }
                cfg.allowed_roots.extend(allowed_roots);
                if tls_cert.is_some() {
                    cfg.tls_cert = tls_cert;
                    cfg.tls_key = tls_key;
                }
                twin_server::serve(cfg).await
            }
            Command::CompileModule { .. } => unreachable!("handled before the runtime starts"),
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
