//! `twin`: submit and watch jobs, tail events, and audit a data directory offline.
//!
//! Exit codes: 0 success; 1 the thing checked is bad (a failed job, a broken chain); 2 the
//! command could not run (bad arguments, server unreachable, API error).

mod blobs;
mod eval;
mod import;
mod models;
mod modules;
mod online;
mod replay;
mod review;
mod sample;
mod train;
mod uploads;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "twin", version, about = "Client of the twin job server")]
struct Cli {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
pub struct Conn {
    /// Server URL.
    #[arg(
        long,
        global = true,
        env = "TWIN_SERVER",
        default_value = "http://127.0.0.1:7878"
    )]
    pub server: String,
    /// Bearer token.
    #[arg(long, global = true, env = "TWIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of a private CA to trust for an https server (besides the public roots).
    #[arg(long, global = true, env = "TWIN_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Submit a job from a TOML or JSON spec file.
    Submit(online::SubmitArgs),
    /// List, show, cancel and wait for jobs.
    #[command(subcommand)]
    Jobs(online::JobsCommand),
    /// Read the event stream.
    #[command(subcommand)]
    Events(online::EventsCommand),
    /// List or create experiments.
    #[command(subcommand)]
    Experiments(online::ExperimentsCommand),
    /// Review a mine job's candidate hard negatives: list, accept, reject (also in bulk).
    #[command(subcommand)]
    Review(review::ReviewCommand),
    /// Datasets: list ingested and built ones, export a built one with its images.
    #[command(subcommand)]
    Dataset(review::DatasetCommand),
    /// Register, list, describe and name Wasm modules; `run` scores a file offline.
    #[command(subcommand)]
    Modules(modules::ModulesCommand),
    /// Upload and download blobs of any size (resumable, flat memory).
    #[command(subcommand)]
    Blobs(blobs::BlobsCommand),
    /// Register, list, describe and name model checkpoints (uploaded by content hash).
    #[command(subcommand)]
    Models(models::ModelsCommand),
    /// Score a JSONL file of rollouts with a registered reward (uploads it, submits a job).
    Score(modules::ScoreArgs),
    /// Evaluate a Qwen2.5-VL checkpoint (FGVQA metrics), compare evaluations, read samples.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Post-train a checkpoint (GRPO or SFT): submit a run, read its curves, rollouts and
    /// checkpoints.
    #[command(subcommand)]
    Train(train::TrainCommand),
    /// Replay a data directory offline: verify the chain and blobs, show the state at a point.
    Replay(replay::ReplayArgs),
    /// The server's event log: `head` prints the chain head to write down for
    /// `replay --expect-head`.
    #[command(subcommand)]
    Log(replay::LogCommand),
    /// What produced a blob or a job (offline with --data-dir, else asks the server).
    Lineage {
        /// A blob's SHA-256 or a job id.
        target: String,
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Generate a small image set `<category>/<instance>/<view>.png` for trying twin out.
    #[command(visible_alias = "sample")]
    SampleData(sample::SampleArgs),
    /// Convert the public TWIN or FGVQA parquet files into images and an ingest manifest.
    #[command(subcommand)]
    Import(import::ImportCommand),
}

/// Runs an online command to completion.
fn block_on(command: impl Future<Output = Result<(), Failure>>) -> Result<(), Failure> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(command),
        Err(e) => Err(e.into()),
    }
}

/// An error and the exit code it maps to.
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            code: 2,
            error: e.into(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Replay(args) => replay::run(&args, cli.conn.json),
        Command::Lineage {
            target,
            data_dir: Some(dir),
        } => replay::lineage(&dir, &target, cli.conn.json),
        Command::SampleData(args) => sample::run(&args),
        Command::Import(command) => import::run(&command),
        Command::Modules(modules::ModulesCommand::Run(args)) => modules::run(&args),
        Command::Modules(modules::ModulesCommand::Inspect { module }) => modules::inspect(&module),
        Command::Log(command) => block_on(replay::log(cli.conn, command)),
        online_command => block_on(online::run(cli.conn, online_command)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}
