//! The ingest stage: images from a directory tree or a JSONL manifest into blobs and a dataset.
//!
//! Each image is decoded with the `image` crate (so a truncated or mislabelled file is caught
//! here, not by a later stage), measured, given a 64-bit gradient perceptual hash for
//! near-duplicate detection, and stored by content hash. A file that fails is reported with its
//! reason and the rest go on; the dataset's manifest (one JSON line per image, sorted) is stored
//! as a blob and recorded as the job's `manifest` artefact.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use image_hasher::{HashAlg, HasherConfig};
use serde::Deserialize;
use twin_core::JobKind;
use twin_core::event::{IngestOutput, JobOutput, ManifestEntry, RejectedFile};
use twin_core::job::JobState;
use twin_core::spec::{IngestSource, JobSpec};

use twin_stage::{Stage, StageContext, StageError};

pub struct IngestStage;

const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// One file to ingest, with the labels its location or manifest line gave it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Item {
    category: String,
    instance: String,
    /// Relative to the source, for the manifest.
    rel: String,
    path: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestLine {
    path: String,
    instance: String,
    category: String,
}

fn has_image_extension(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// Lists `<root>/<category>/<instance>/<image>`; anything else under `root` is rejected by name.
fn list_dir(root: &Path) -> Result<(Vec<Item>, Vec<RejectedFile>), StageError> {
    if !root.is_dir() {
        return Err(StageError::bad_input(format!(
            "spec.source.dir: {} is not a directory",
            root.display()
        )));
    }
    let mut items = Vec::new();
    let mut rejected = Vec::new();
    for entry in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                let path = e
                    .path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                rejected.push(RejectedFile {
                    path,
                    error: format!("cannot read: {e}"),
                });
                continue;
            }
        };
        if entry.file_type().is_dir() || is_hidden(entry.path()) {
            continue;
        }
        let rel = entry
            .path()
            .strip_prefix(root)
            .expect("walkdir yields paths under its root");
        let parts: Vec<_> = rel.iter().filter_map(|c| c.to_str()).collect();
        let rel_str = rel.display().to_string();
        // Metadata beside the tree (e.g. the sample generator's manifest.jsonl) is not an image.
        if parts.len() == 1
            && entry
                .path()
                .extension()
                .is_some_and(|e| e == "json" || e == "jsonl")
        {
            continue;
        }
        if parts.len() != 3 || !has_image_extension(entry.path()) {
            rejected.push(RejectedFile {
                path: rel_str,
                error: "not an image at <category>/<instance>/<file>.{jpg,jpeg,png,webp}".into(),
            });
            continue;
        }
        items.push(Item {
            category: parts[0].to_owned(),
            instance: parts[1].to_owned(),
            rel: rel_str,
            path: entry.into_path(),
        });
    }
    Ok((items, rejected))
}

fn list_manifest(path: &Path) -> Result<(Vec<Item>, Vec<RejectedFile>), StageError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        StageError::bad_input(format!(
            "spec.source.manifest: cannot read {}: {e}",
            path.display()
        ))
    })?;
    let base = path.parent().unwrap_or(Path::new("/"));
    let mut items = Vec::new();
    let mut rejected = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<ManifestLine>(line) {
            Ok(m) if m.instance.is_empty() || m.category.is_empty() => {
                rejected.push(RejectedFile {
                    path: format!("{}:{}", path.display(), n + 1),
                    error: "instance and category must not be empty".into(),
                })
            }
            Ok(m) => items.push(Item {
                category: m.category,
                instance: m.instance,
                path: base.join(&m.path),
                rel: m.path,
            }),
            Err(e) => rejected.push(RejectedFile {
                path: format!("{}:{}", path.display(), n + 1),
                error: e.to_string(),
            }),
        }
    }
    Ok((items, rejected))
}

/// Decodes and describes one image; the error names what was wrong with the file.
fn inspect(
    bytes: &[u8],
    hasher: &image_hasher::Hasher,
) -> Result<(u32, u32, String, String), String> {
    let format = image::guess_format(bytes).map_err(|e| format!("not a recognised image: {e}"))?;
    let img = image::load_from_memory_with_format(bytes, format)
        .map_err(|e| format!("cannot decode: {e}"))?;
    if img.width() == 0 || img.height() == 0 {
        return Err("image has no pixels".into());
    }
    let phash = hex::encode(hasher.hash_image(&img).as_bytes());
    let name = format!("{format:?}").to_ascii_lowercase();
    Ok((img.width(), img.height(), name, phash))
}

impl Stage for IngestStage {
    fn kind(&self) -> JobKind {
        JobKind::Ingest
    }

    fn run(&self, job: &JobState, ctx: &StageContext) -> Result<JobOutput, StageError> {
        let JobSpec::Ingest(spec) = &job.submission.spec else {
            return Err(StageError::internal(
                "the ingest stage got another kind of job",
            ));
        };
        let (mut items, mut rejected) = match &spec.source {
            IngestSource::Dir(d) => list_dir(Path::new(d))?,
            IngestSource::Manifest(m) => list_manifest(Path::new(m))?,
        };
        items.sort();
        let hasher = HasherConfig::new()
            .hash_alg(HashAlg::Gradient)
            .hash_size(8, 8)
            .to_hasher();
        let total = items.len();
        let mut entries = Vec::with_capacity(total);
        let mut last_report = Instant::now();
        for (i, item) in items.into_iter().enumerate() {
            ctx.check_cancelled()
                .map_err(|e| e.context(format!("stopped after {i} of {total} images")))?;
            let bytes = match std::fs::read(&item.path) {
                Ok(b) => b,
                Err(e) => {
                    rejected.push(RejectedFile {
                        path: item.rel,
                        error: format!("cannot read: {e}"),
                    });
                    continue;
                }
            };
            let (width, height, format, phash) = match inspect(&bytes, &hasher) {
                Ok(d) => d,
                Err(error) => {
                    rejected.push(RejectedFile {
                        path: item.rel,
                        error,
                    });
                    continue;
                }
            };
            let blob = ctx.upload(bytes)?;
            entries.push(ManifestEntry {
                blob,
                path: item.rel,
                category: item.category,
                instance: item.instance,
                width,
                height,
                format,
                phash,
            });
            if last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                let counters = BTreeMap::from([
                    ("images".to_owned(), entries.len() as f64),
                    ("rejected".to_owned(), rejected.len() as f64),
                ]);
                ctx.progress(
                    i + 1,
                    total,
                    &format!("{} of {total} files", i + 1),
                    counters,
                );
            }
        }
        if entries.is_empty() {
            let first = rejected
                .first()
                .map(|r| format!(" (first: {}: {})", r.path, r.error))
                .unwrap_or_default();
            return Err(StageError::bad_input(format!(
                "no valid images in the source; {} files rejected{first}",
                rejected.len()
            )));
        }
        let mut manifest = Vec::new();
        for e in &entries {
            serde_json::to_writer(&mut manifest, e).expect("manifest entries always serialise");
            manifest.push(b'\n');
        }
        let manifest = ctx.upload(manifest)?;
        ctx.record_artefact("manifest", manifest)?;
        let instances: BTreeSet<_> = entries.iter().map(|e| (&e.category, &e.instance)).collect();
        let categories: BTreeSet<_> = entries.iter().map(|e| &e.category).collect();
        let rejected_total = rejected.len() as u64;
        for r in &rejected {
            tracing::warn!(path = %r.path, error = %r.error, "file not ingested");
        }
        rejected.truncate(IngestOutput::MAX_LISTED_REJECTS);
        for r in &mut rejected {
            r.path = r.path.chars().take(300).collect();
            r.error = r.error.chars().take(300).collect();
        }
        Ok(JobOutput::Ingest(IngestOutput {
            manifest,
            images: entries.len() as u64,
            instances: instances.len() as u64,
            categories: categories.len() as u64,
            rejected,
            rejected_total,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tree_layout_is_enforced_file_by_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("mugs/mug-1")).expect("mkdir");
        std::fs::write(root.join("mugs/mug-1/a.JPG"), b"x").expect("write");
        std::fs::write(root.join("mugs/mug-1/notes.txt"), b"x").expect("write");
        std::fs::write(root.join("mugs/stray.png"), b"x").expect("write");
        std::fs::write(root.join("mugs/mug-1/.hidden.png"), b"x").expect("write");
        let (items, rejected) = list_dir(root).expect("list");
        assert_eq!(items.len(), 1);
        assert_eq!(
            (items[0].category.as_str(), items[0].instance.as_str()),
            ("mugs", "mug-1")
        );
        let mut bad: Vec<_> = rejected.iter().map(|r| r.path.as_str()).collect();
        bad.sort();
        assert_eq!(bad, vec!["mugs/mug-1/notes.txt", "mugs/stray.png"]);
    }

    #[test]
    fn manifest_lines_resolve_relative_paths_and_report_bad_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let manifest = dir.path().join("m.jsonl");
        let lines = [
            r#"{"path": "a/1.png", "instance": "i1", "category": "c"}"#,
            r#"{"path": "/abs/2.png", "instance": "i2", "category": "c"}"#,
            r#"{"path": "x.png", "instance": "", "category": "c"}"#,
            r#"not json"#,
            "",
        ];
        std::fs::write(&manifest, lines.join("\n")).expect("write");
        let (items, rejected) = list_manifest(&manifest).expect("readable");
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].path, dir.path().join("a/1.png"));
        assert_eq!(items[1].path, PathBuf::from("/abs/2.png"));
        let where_: Vec<_> = rejected
            .iter()
            .map(|r| r.path.rsplit(':').next().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(where_, ["3", "4"], "bad lines are reported by line number");
        assert!(list_manifest(&dir.path().join("missing.jsonl")).is_err());
    }

    #[test]
    fn a_corrupt_image_is_described_not_decoded() {
        let hasher = HasherConfig::new().hash_alg(HashAlg::Gradient).to_hasher();
        let mut png = Vec::new();
        image::RgbImage::new(4, 3)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("encode");
        let (w, h, format, phash) = inspect(&png, &hasher).expect("valid png");
        assert_eq!((w, h, format.as_str(), phash.len()), (4, 3, "png", 16));
        assert!(
            inspect(&png[..png.len() / 2], &hasher)
                .unwrap_err()
                .contains("cannot decode")
        );
        assert!(
            inspect(b"hello", &hasher)
                .unwrap_err()
                .contains("not a recognised image")
        );
    }
}
