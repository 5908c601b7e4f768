//! `twin review` (a mine job's candidates: list, accept, reject, in bulk by filter) and
//! `twin dataset` (built datasets: list, export to a directory with their images).

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use clap::{Args, Subcommand};
use twin_client::{CandidateFilter, Client};
use twin_core::BlobHash;
use twin_core::api::{BulkByFilter, ReviewBody};
use twin_core::mine::Verdict;

use crate::Failure;

#[derive(Subcommand)]
pub enum ReviewCommand {
    /// List candidates (pending by default) with both images' paths and every filter's verdict.
    Ls {
        /// The mine job.
        job: String,
        /// pending, accepted, rejected or all.
        #[arg(long, default_value = "pending")]
        status: String,
        /// Only candidates this filter kept.
        #[arg(long)]
        filter: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long, default_value_t = 0)]
        offset: usize,
        /// Also download both images of each listed pair into DIR (`<pair>-a.<ext>`, `-b`).
        #[arg(long)]
        save: Option<PathBuf>,
    },
    /// Accept candidates as hard negatives.
    Accept(VerdictArgs),
    /// Reject candidates.
    Reject(VerdictArgs),
}

#[derive(Args)]
pub struct VerdictArgs {
    /// The mine job.
    job: String,
    /// Candidate ids, as listed.
    pairs: Vec<String>,
    /// Bulk: every pending candidate this filter kept.
    #[arg(long)]
    by_filter: Option<String>,
    /// With --by-filter: select the pending candidates the filter would have dropped instead.
    #[arg(long, requires = "by_filter")]
    dropped_by: bool,
    #[arg(long, default_value = "")]
    note: String,
}

#[derive(Subcommand)]
pub enum DatasetCommand {
    /// Ingested datasets (images, instances, categories) and built ones (rows per split).
    Ls,
    /// Write a built dataset's exports (JSONL, parquet) and its images into a directory.
    Export {
        /// Manifest hash or name of a built dataset.
        dataset: String,
        #[arg(long)]
        out: PathBuf,
    },
}

pub async fn review(client: &Client, command: ReviewCommand, json: bool) -> Result<(), Failure> {
    let (job, body) = match command {
        ReviewCommand::Ls {
            job,
            status,
            filter,
            limit,
            offset,
            save,
        } => {
            let status = match status.as_str() {
                "all" => None,
                "pending" | "accepted" | "rejected" => Some(status),
                other => {
                    return Err(anyhow!(
                        "--status: `{other}` is not pending, accepted, rejected or all"
                    )
                    .into());
                }
            };
            let page = client
                .candidates(
                    &job,
                    &CandidateFilter {
                        status,
                        filter,
                        offset,
                        limit: Some(limit),
                    },
                )
                .await?;
            if let Some(dir) = &save {
                save_images(client, dir, &page.candidates).await?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&page)?);
                return Ok(());
            }
            println!(
                "mine job {}: {} pending, {} accepted, {} rejected ({} dropped by required filters); {} match",
                page.job, page.pending, page.accepted, page.rejected, page.dropped, page.total
            );
            for c in &page.candidates {
                let v = &c.candidate;
                let verdicts: Vec<String> = v
                    .verdicts
                    .iter()
                    .map(|f| format!("{}={}", f.filter, if f.keep { "keep" } else { "drop" }))
                    .collect();
                println!(
                    "{}  sim {:.4}  rank {}  {:?}{}\n    a: {} ({}/{})\n    b: {} ({}/{})\n    filters: {}",
                    v.id,
                    v.similarity,
                    v.rank,
                    c.status,
                    c.decided_by
                        .as_ref()
                        .map(|d| format!(" by {d}"))
                        .unwrap_or_default(),
                    v.a.path,
                    v.a.category,
                    v.a.instance,
                    v.b.path,
                    v.b.category,
                    v.b.instance,
                    if verdicts.is_empty() {
                        "(none)".to_owned()
                    } else {
                        verdicts.join(", ")
                    }
                );
            }
            return Ok(());
        }
        ReviewCommand::Accept(a) => (a.job.clone(), body(Verdict::Accept, a)),
        ReviewCommand::Reject(a) => (a.job.clone(), body(Verdict::Reject, a)),
    };
    let out = client.review(&job, &body).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{:?}: recorded {} verdict(s), {} unchanged",
            body.verdict, out.recorded, out.unchanged
        );
    }
    Ok(())
}

fn body(verdict: Verdict, a: VerdictArgs) -> ReviewBody {
    ReviewBody {
        verdict,
        pairs: a.pairs,
        by_filter: a.by_filter.map(|filter| BulkByFilter {
            filter,
            keep: !a.dropped_by,
        }),
        note: a.note,
    }
}

/// An image path's extension when it is a plain one (`png`, `jpg`), else `img`: the extension
/// comes from the server and ends up in a local file name.
fn extension(path: &str) -> &str {
    Path::new(path)
        .extension()
        .and_then(|e| e.to_str())
        .filter(|e| !e.is_empty() && e.len() <= 10 && e.bytes().all(|b| b.is_ascii_alphanumeric()))
        .unwrap_or("img")
}

/// A file name the server gave (an export, a pair id) that may be written under the output
/// directory: one plain component of `A-Za-z0-9`, `-`, `_`, `.`, not hidden, no `..`. Anything
/// else (`../x`, `/etc/x`, `a/b`) would write outside the directory the user chose.
fn safe_file_name(name: &str) -> anyhow::Result<&str> {
    let plain = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.contains("..")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if plain {
        Ok(name)
    } else {
        Err(anyhow::anyhow!(
            "the server named a file `{}`, which is not a plain file name; refusing to write it",
            name.chars().take(100).collect::<String>()
        ))
    }
}

/// The blob an export's image reference names, when it has the one form exports write:
/// `images/<sha256>.<ext>`.
fn image_reference(file: &str) -> Option<BlobHash> {
    let name = file.strip_prefix("images/")?;
    let (hash, ext) = name.split_once('.')?;
    if ext.is_empty() || ext.len() > 10 || !ext.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    hash.parse().ok()
}

async fn save_images(
    client: &Client,
    dir: &Path,
    candidates: &[twin_core::api::ListedCandidate],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for c in candidates {
        let v = &c.candidate;
        for (side, img) in [("a", &v.a), ("b", &v.b)] {
            let bytes = client.get_blob(&img.blob).await?;
            let id = safe_file_name(&v.id)?;
            let path = dir.join(format!("{id}-{side}.{}", extension(&img.path)));
            std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}

pub async fn dataset(client: &Client, command: DatasetCommand, json: bool) -> Result<(), Failure> {
    match command {
        DatasetCommand::Ls => {
            let ingested = client.datasets().await?;
            let built = client.built_datasets().await?;
            if json {
                let v = serde_json::json!({ "ingested": ingested, "built": built });
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!("ingested:");
            for d in &ingested {
                println!(
                    "  {:<24} {} images, {} instances, {} categories  (manifest {}, job {})",
                    d.name,
                    d.images,
                    d.instances,
                    d.categories,
                    &d.manifest.to_hex()[..12],
                    d.job
                );
            }
            println!("built:");
            for d in &built {
                println!(
                    "  {:<24} {}  (manifest {}, job {})",
                    d.name,
                    split_summary(&d.counts),
                    &d.hash.to_hex()[..12],
                    d.job
                );
            }
        }
        DatasetCommand::Export { dataset, out } => {
            let d = client.built_dataset(&dataset).await?;
            export(client, &d.hash, &d.exports, &out).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else {
                println!(
                    "exported {} ({}) to {}: {}",
                    d.name,
                    d.hash,
                    out.display(),
                    d.exports.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            }
        }
    }
    Ok(())
}

/// A built dataset's rows per split, from the flat counts its build recorded (`train.pair`,
/// `train.pair.yes`, `train.multi`, …): `train 235 pairs (118 yes, 117 no), 8 multi; eval …`.
fn split_summary(counts: &std::collections::BTreeMap<String, u64>) -> String {
    let get = |key: String| counts.get(&key).copied().unwrap_or(0);
    ["train", "eval"]
        .iter()
        .map(|split| {
            format!(
                "{split} {} pairs ({} yes, {} no), {} multi",
                get(format!("{split}.pair")),
                get(format!("{split}.pair.yes")),
                get(format!("{split}.pair.no")),
                get(format!("{split}.multi"))
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Writes each export and `manifest.json`, then every image the exports refer to (their paths are
/// `images/<sha256>.<ext>`, relative to the directory), fetching each blob once.
async fn export(
    client: &Client,
    manifest: &BlobHash,
    exports: &std::collections::BTreeMap<String, BlobHash>,
    out: &Path,
) -> anyhow::Result<()> {
    let images_dir = out.join("images");
    std::fs::create_dir_all(&images_dir)
        .with_context(|| format!("creating {}", images_dir.display()))?;
    let manifest_bytes = client.get_blob(manifest).await?;
    std::fs::write(out.join("manifest.json"), &manifest_bytes)?;
    for (name, hash) in exports {
        let bytes = client.get_blob(hash).await?;
        let path = out.join(safe_file_name(name)?);
        std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    // The JSONL exports name every image as `images/<sha256>.<ext>`.
    let mut images = std::collections::BTreeSet::new();
    for name in exports.keys().filter(|n| n.ends_with(".jsonl")) {
        let text = std::fs::read_to_string(out.join(name))?;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let record: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{name} holds a line that is not JSON"))?;
            collect_image_files(&record, &mut images);
        }
    }
    for file in images {
        // Only `images/<sha256>.<ext>`: a reference of any other form is not ours to write.
        let Some(hash) = image_reference(&file) else {
            continue;
        };
        let path = out.join(&file);
        if path.exists() {
            continue;
        }
        let bytes = client.get_blob(&hash).await?;
        std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Every string value in an exported record that names an image file.
fn collect_image_files(v: &serde_json::Value, out: &mut std::collections::BTreeSet<String>) {
    match v {
        serde_json::Value::String(s) if s.starts_with("images/") => {
            out.insert(s.clone());
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_image_files(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| collect_image_files(x, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_the_server_cannot_leave_the_output_directory() {
        for ok in ["train.jsonl", "eval.parquet", "pair-0001_ab"] {
            assert_eq!(safe_file_name(ok).unwrap(), ok);
        }
        for bad in [
            "../x",
            "/etc/passwd",
            "a/b",
            "..",
            ".hidden",
            "",
            "a\\b",
            "x..y",
        ] {
            assert!(safe_file_name(bad).is_err(), "{bad}");
        }
        let h = BlobHash::of(b"x");
        assert_eq!(image_reference(&format!("images/{h}.png")), Some(h));
        for bad in [
            format!("images/{h}.png/../../../x"),
            format!("images/{h}./x"),
            format!("images/../{h}.png"),
            format!("other/{h}.png"),
            format!("images/{h}"),
        ] {
            assert_eq!(image_reference(&bad), None, "{bad}");
        }
        assert_eq!(extension("a/b.png"), "png");
        assert_eq!(extension("a/b.p/../../x"), "img");
    }

    #[test]
    fn a_built_dataset_is_summarised_from_the_counts_its_build_wrote() {
        let counts = [
            ("train.pair", 235),
            ("train.pair.yes", 118),
            ("train.pair.no", 117),
            ("train.multi", 8),
            ("eval.pair", 24),
            ("eval.pair.yes", 12),
            ("eval.pair.no", 12),
            ("eval.multi", 4),
            ("eval.multi.0", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(
            split_summary(&counts),
            "train 235 pairs (118 yes, 117 no), 8 multi; eval 24 pairs (12 yes, 12 no), 4 multi"
        );
    }
}
