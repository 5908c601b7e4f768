//! `twin blobs`: move blobs of any size to and from the server with flat memory; files resume
//! after a broken connection or an interrupted run.

use std::path::PathBuf;

use anyhow::{Context, anyhow};
use clap::Subcommand;
use tokio::io::AsyncWriteExt;
use twin_client::{Client, TransferEvent};
use twin_core::BlobHash;

use crate::Failure;

#[derive(Subcommand)]
pub enum BlobsCommand {
    /// Upload a file (resumable: run it again after an interruption) or stdin (`-`, one pass,
    /// needs `--bytes`); prints the blob's SHA-256.
    Put {
        /// The file, or `-` for stdin.
        file: PathBuf,
        /// The exact length of stdin (`-`): the server reserves room for it up front.
        #[arg(long)]
        bytes: Option<u64>,
    },
    /// Download a blob, checking its SHA-256; into a file through `<FILE>.partial` (resumed
    /// when an earlier run left one), or to stdout with `-o -`.
    Get {
        hash: String,
        /// Where to write it; `-` for stdout.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// List (`--dry-run`) or delete the stored blobs no record refers to (admin token). Blobs
    /// younger than `--min-age` are kept: uploads whose job or model is not registered yet.
    Gc {
        #[arg(long)]
        dry_run: bool,
        /// Keep blobs stored less than this long ago (`30m`, `2h`, `0s`).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        min_age: std::time::Duration,
    },
}

/// Progress worth telling a person, on stderr (stdout carries the hash or the blob).
fn report(event: TransferEvent) {
    match event {
        TransferEvent::Resumed { offset } => eprintln!("resuming at byte {offset}"),
        TransferEvent::Retrying {
            attempt,
            offset,
            error,
        } => eprintln!(
            "transfer interrupted ({error}); retrying from byte {offset} (attempt {attempt})"
        ),
        other => eprintln!("{other:?}"),
    }
}

pub async fn run(client: &Client, command: BlobsCommand, json: bool) -> Result<(), Failure> {
    match command {
        BlobsCommand::Put { file, bytes } => {
            let stored = if file.as_os_str() == "-" {
                let bytes = bytes.ok_or_else(|| {
                    anyhow!("uploading stdin needs its length: pass --bytes N (or upload a file)")
                })?;
                client.upload_reader(tokio::io::stdin(), bytes).await?
            } else {
                if bytes.is_some() {
                    return Err(anyhow!("--bytes is for stdin (`-`) only").into());
                }
                client
                    .upload_file_observed(&file, &mut report)
                    .await
                    .with_context(|| format!("uploading {}", file.display()))?
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&stored)?);
            } else {
                println!("{}", stored.hash);
            }
        }
        BlobsCommand::Gc { dry_run, min_age } => {
            let report = client
                .collect_blobs(&twin_core::model::GcRequest {
                    dry_run,
                    min_age_secs: min_age.as_secs(),
                })
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for b in &report.unreferenced {
                    println!("{}  {:>12}", b.hash, b.bytes);
                }
                eprintln!(
                    "{} of {} stored blobs are unreferenced ({} bytes){}; {} referenced, {} too \
                     young to collect",
                    report.unreferenced.len(),
                    report.stored,
                    report.unreferenced_bytes,
                    if report.deleted {
                        ", deleted"
                    } else {
                        ", nothing deleted (dry run)"
                    },
                    report.referenced,
                    report.too_young
                );
            }
        }
        BlobsCommand::Get { hash, output } => {
            let hash: BlobHash = hash
                .parse()
                .map_err(|e| anyhow!("`{hash}` is not a blob hash: {e}"))?;
            if output.as_os_str() == "-" {
                let mut stdout = tokio::io::stdout();
                client
                    .download_to_writer_observed(&hash, &mut stdout, &mut report)
                    .await?;
                stdout.flush().await?;
            } else {
                let len = client
                    .download_to_file_observed(&hash, &output, &mut report)
                    .await
                    .with_context(|| format!("downloading {hash} to {}", output.display()))?;
                eprintln!("{len} bytes written to {}", output.display());
            }
        }
    }
    Ok(())
}
