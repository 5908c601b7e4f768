//! `twin models …`: register checkpoint directories as models (uploaded by content, resumably),
//! list and describe them, and point names at them.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use twin_client::Client;
use twin_client::models::scan_model_dir;
use twin_core::projection::ModelInfo;

use crate::Failure;

#[derive(Subcommand)]
pub enum ModelsCommand {
    /// Upload a checkpoint directory (a Hugging Face model folder or cache snapshot, a diffusers
    /// pipeline) file by file, skipping files the server has and resuming interrupted ones, then
    /// register it. Its identity is the SHA-256 of its manifest of files.
    Add {
        dir: PathBuf,
        /// Point this name at it (specs then say `model = "NAME"`).
        #[arg(long)]
        name: Option<String>,
    },
    /// List registered models.
    Ls,
    /// Show one model (by name or hash) with its files.
    Describe { reference: String },
    /// Point model name NAME at model HASH (later jobs naming NAME use it).
    Use { name: String, hash: String },
}

pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// What a model is, in one phrase: `transformers qwen2_5_vl (Qwen2_5_VLForConditionalGeneration)`.
pub fn kind_phrase(m: &ModelInfo) -> String {
    let k = &m.model.kind;
    let mut s = k.library.clone();
    if let Some(t) = &k.model_type {
        s.push(' ');
        s.push_str(t);
    }
    if !k.architectures.is_empty() {
        s.push_str(&format!(" ({})", k.architectures.join(", ")));
    }
    s
}

fn print_model(m: &ModelInfo, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(m)?);
        return Ok(());
    }
    let r = &m.model;
    println!(
        "{} {}, {} files, {}",
        r.hash,
        kind_phrase(m),
        r.files.len(),
        human_bytes(r.bytes)
    );
    if !m.aliases.is_empty() {
        println!("  names: {}", m.aliases.join(", "));
    }
    println!(
        "  registered by {} at {}",
        m.registered_by,
        crate::online::when(m.registered_at)
    );
    if let Some(job) = &r.job {
        println!("  written by job {job}");
    }
    for f in &r.files {
        println!("  {}  {:>10}  {}", f.sha256, human_bytes(f.size), f.path);
    }
    Ok(())
}

pub async fn run(client: &Client, command: ModelsCommand, json: bool) -> Result<(), Failure> {
    match command {
        ModelsCommand::Add { dir, name } => {
            let scan_dir = dir.clone();
            // Hashing gigabytes is blocking work; the runtime has other things to do.
            let local = tokio::task::spawn_blocking(move || {
                scan_model_dir(&scan_dir, |path, size| {
                    eprintln!("hashed {path} ({})", human_bytes(size));
                })
            })
            .await
            .context("the hashing task")??;
            let info = client
                .add_model(&local, name.as_deref(), |path, size| {
                    eprintln!("uploading {path} ({})", human_bytes(size));
                })
                .await
                .with_context(|| format!("registering {}", dir.display()))?;
            print_model(&info, json)?;
        }
        ModelsCommand::Ls => {
            let models = client.models().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&models)?);
            } else {
                println!("{:<64}  {:>10}  {:<32}  names", "hash", "size", "kind");
                for m in models {
                    println!(
                        "{:<64}  {:>10}  {:<32}  {}",
                        m.model.hash.to_hex(),
                        human_bytes(m.model.bytes),
                        kind_phrase(&m),
                        m.aliases.join(",")
                    );
                }
            }
        }
        ModelsCommand::Describe { reference } => {
            print_model(&client.model(&reference).await?, json)?
        }
        ModelsCommand::Use { name, hash } => {
            let m = client.set_model_alias(&name, &hash).await?;
            if json {
                print_model(&m, true)?;
            } else {
                println!("{name} → {}", m.model.hash);
            }
        }
    }
    Ok(())
}
