//! The ingest stage: images from a directory tree or a JSONL manifest into blobs and a dataset.
//!
//! Each image is decoded with the `image` crate (so a truncated or mislabelled file is caught
//! here, not by a later stage), measured, given a 64-bit gradient perceptual hash for
//! near-duplicate detection, and stored by content hash. A file that fails is reported with its
//! reason and the rest go on; the dataset's manifest (one JSON line per image, sorted) is stored
//! as a blob and recorded as the job's `manifest` artefact.
//!
//! The images come from blobs `twin submit` uploaded (an [`IngestSource::Blobs`] listing), or from
//! a directory or manifest on this machine, read only through [`twin_stage::AllowedRoots`]: under
//! the executor's roots, regular files only, each read capped ([`MAX_MANIFEST_BYTES`],
//! [`MAX_IMAGE_BYTES`]), and decoded under [`twin_data::decode::limits`]. A rejected file is
//! listed by its path relative to the source and a reason that never quotes its content.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};
use twin_core::BlobHash;
use twin_core::spec::UploadedImage;

use image_hasher::{HashAlg, HasherConfig};
use serde::Deserialize;
use twin_core::JobKind;
use twin_core::event::{IngestOutput, JobOutput, ManifestEntry, RejectedFile};
use twin_core::job::JobState;
use twin_core::spec::{IngestSource, JobSpec};

use twin_stage::{AllowedRoots, FileError, Stage, StageContext, StageError};

pub struct IngestStage;

const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// The largest manifest or listing read: a million lines of ~100 bytes.
pub const MAX_MANIFEST_BYTES: u64 = 128 << 20;
/// The largest image file read (a 16384-pixel-wide PNG of photographic content is ~300 MB; the
/// recipe's images are well under 10 MB).
pub const MAX_IMAGE_BYTES: u64 = 256 << 20;

/// Where an item's bytes are.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum ItemSource {
    /// A file on this machine, read under the allowed roots.
    File(PathBuf),
    /// A blob already uploaded.
    Blob(BlobHash),
}

/// One file to ingest, with the labels its location or manifest line gave it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Item {
    category: String,
    instance: String,
    /// Relative to the source, for the manifest.
    rel: String,
    source: ItemSource,
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

/// Lists `<root>/<category>/<instance>/<image>` under the allowed roots; anything else under
/// `root` is rejected by its path relative to `root`.
fn list_dir(
    files: &AllowedRoots,
    root: &Path,
) -> Result<(Vec<Item>, Vec<RejectedFile>), StageError> {
    let root = files
        .dir(root)
        .map_err(|e| StageError::bad_input(format!("spec.source.dir: {e}")))?;
    let root = root.as_path();
    let mut items = Vec::new();
    let mut rejected = Vec::new();
    for entry in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                // Relative to the root, and without the operating system's reason: job outputs
                // are visible to every read token.
                let path = e
                    .path()
                    .and_then(|p| p.strip_prefix(root).ok())
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                rejected.push(RejectedFile {
                    path,
                    error: "cannot be listed".into(),
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
            source: ItemSource::File(entry.into_path()),
        });
    }
    Ok((items, rejected))
}

/// Why a manifest line is not one, without quoting it (serde's message echoes string values).
fn line_error(e: &serde_json::Error) -> String {
    match e.classify() {
        serde_json::error::Category::Data => {
            "not a {\"path\", \"instance\", \"category\"} object of strings".into()
        }
        _ => format!("not JSON (column {})", e.column()),
    }
}

fn list_manifest(
    files: &AllowedRoots,
    path: &Path,
) -> Result<(Vec<Item>, Vec<RejectedFile>), StageError> {
    let text = files
        .read_to_string(path, MAX_MANIFEST_BYTES)
        .map_err(|e| StageError::bad_input(format!("spec.source.manifest: {e}")))?;
    // The canonical directory, so that `..` in a line means what it does on disk; each line's
    // file is checked against the roots again when it is read.
    let resolved = files
        .resolve(path)
        .map_err(|e| StageError::bad_input(format!("spec.source.manifest: {e}")))?;
    let base = resolved.parent().unwrap_or(Path::new("/"));
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
                source: ItemSource::File(base.join(&m.path)),
                rel: m.path,
            }),
            Err(e) => rejected.push(RejectedFile {
                path: format!("{}:{}", path.display(), n + 1),
                error: line_error(&e),
            }),
        }
    }
    Ok((items, rejected))
}

/// The images of an uploaded listing ([`IngestSource::Blobs`]).
fn list_blobs(
    listing: &BlobHash,
    ctx: &StageContext,
) -> Result<(Vec<Item>, Vec<RejectedFile>), StageError> {
    let bytes = ctx
        .download(listing)
        .map_err(|e| e.context(format!("spec.source.blobs ({listing})")))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| {
        StageError::bad_input(format!("spec.source.blobs: {listing} is not UTF-8 text"))
    })?;
    let mut items = Vec::new();
    let mut rejected = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<UploadedImage>(line) {
            Ok(m) if m.instance.is_empty() || m.category.is_empty() => {
                rejected.push(RejectedFile {
                    path: m.path,
                    error: "instance and category must not be empty".into(),
                })
            }
            Ok(m) => items.push(Item {
                category: m.category,
                instance: m.instance,
                source: ItemSource::Blob(m.blob),
                rel: m.path,
            }),
            Err(e) => rejected.push(RejectedFile {
                path: format!("{listing}:{}", n + 1),
                error: line_error(&e),
            }),
        }
    }
    Ok((items, rejected))
}

/// An item's bytes: a file under the roots, capped, or its blob.
fn read_item(
    source: &ItemSource,
    files: &AllowedRoots,
    ctx: &StageContext,
) -> Result<Vec<u8>, String> {
    match source {
        ItemSource::File(path) => files
            .read(path, MAX_IMAGE_BYTES)
            .map_err(|e| file_reason(&e)),
        ItemSource::Blob(hash) => match ctx.download(hash) {
            Ok(bytes) => Ok(bytes.to_vec()),
            Err(e) => Err(format!("blob {hash}: {}", e.message)),
        },
    }
}

/// A file error without the path (the reject already names it, relative to the source).
fn file_reason(e: &FileError) -> String {
    match e {
        FileError::NoRoots { .. } => "no allowed roots on this executor; upload instead".into(),
        FileError::Unavailable { .. } => "not a readable path under the allowed roots".into(),
        FileError::NotRegular { .. } => "not a regular file".into(),
        FileError::NotDirectory { .. } => "not a directory".into(),
        FileError::TooLarge { max, .. } => format!("larger than the {max} bytes allowed"),
        FileError::NotText { .. } => "not UTF-8 text".into(),
    }
}

/// Decodes and describes one image; the error names what was wrong with the file.
fn inspect(
    bytes: &[u8],
    hasher: &image_hasher::Hasher,
) -> Result<(u32, u32, String, String), String> {
    let (format, img) = twin_data::decode::decode(bytes).map_err(|e| e.to_string())?;
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
        let files = ctx.files();
        let (mut items, mut rejected) = match &spec.source {
            IngestSource::Dir(d) => list_dir(files, Path::new(d))?,
            IngestSource::Manifest(m) => list_manifest(files, Path::new(m))?,
            IngestSource::Blobs(listing) => list_blobs(listing, ctx)?,
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
            let bytes = match read_item(&item.source, files, ctx) {
                Ok(b) => b,
                Err(error) => {
                    rejected.push(RejectedFile {
                        path: item.rel,
                        error,
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
            let blob = match item.source {
                // Already stored, under the hash the download checked.
                ItemSource::Blob(hash) => hash,
                ItemSource::File(_) => ctx.upload(bytes)?,
            };
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
    use std::sync::Arc;

    use twin_stage::testing::{MemoryBackend, job};

    use super::*;

    fn roots(dir: &Path) -> AllowedRoots {
        AllowedRoots::new([dir]).expect("a root")
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut png = Vec::new();
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8 * 40, y as u8 * 40, 7]))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("encode");
        png
    }

    /// Runs an ingest of `source` with the executor's roots `roots`; the output or the error.
    fn ingest(
        source: serde_json::Value,
        roots: AllowedRoots,
    ) -> (MemoryBackend, Result<IngestOutput, StageError>) {
        let backend = MemoryBackend::new();
        let ctx = backend.context(&[]).with_allowed_roots(Arc::new(roots));
        let job = job(serde_json::json!({"kind": "ingest", "dataset": "d", "source": source}));
        let out = IngestStage.run(&job, &ctx).map(|o| match o {
            JobOutput::Ingest(o) => o,
            other => panic!("not an ingest output: {other:?}"),
        });
        (backend, out)
    }

    /// `<tmp>/root/c/i/a.png` (an image under the root) and `<tmp>/outside/b.png`.
    fn tree() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("c/i")).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::fs::write(root.join("c/i/a.png"), png(4, 3)).expect("write");
        std::fs::write(outside.join("b.png"), png(5, 5)).expect("write");
        (dir, root, outside)
    }

    #[test]
    fn the_tree_layout_is_enforced_file_by_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("mugs/mug-1")).expect("mkdir");
        std::fs::write(root.join("mugs/mug-1/a.JPG"), b"x").expect("write");
        std::fs::write(root.join("mugs/mug-1/notes.txt"), b"x").expect("write");
        std::fs::write(root.join("mugs/stray.png"), b"x").expect("write");
        std::fs::write(root.join("mugs/mug-1/.hidden.png"), b"x").expect("write");
        let (items, rejected) = list_dir(&roots(root), root).expect("list");
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
        let base = dir.path().canonicalize().expect("canonical");
        let manifest = base.join("m.jsonl");
        let lines = [
            r#"{"path": "a/1.png", "instance": "i1", "category": "c"}"#,
            r#"{"path": "/abs/2.png", "instance": "i2", "category": "c"}"#,
            r#"{"path": "x.png", "instance": "", "category": "c"}"#,
            r#"not json"#,
            r#"{"path": "secret-value", "instance": 3, "category": "c"}"#,
            "",
        ];
        std::fs::write(&manifest, lines.join("\n")).expect("write");
        let (items, rejected) = list_manifest(&roots(&base), &manifest).expect("readable");
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].source, ItemSource::File(base.join("a/1.png")));
        assert_eq!(
            items[1].source,
            ItemSource::File(PathBuf::from("/abs/2.png"))
        );
        let where_: Vec<_> = rejected
            .iter()
            .map(|r| r.path.rsplit(':').next().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(
            where_,
            ["3", "4", "5"],
            "bad lines are reported by line number"
        );
        assert!(
            rejected.iter().all(|r| !r.error.contains("secret-value")),
            "a bad line's values are not echoed: {rejected:?}"
        );
        assert!(list_manifest(&roots(&base), &base.join("missing.jsonl")).is_err());
    }

    #[test]
    fn a_corrupt_image_is_described_not_decoded() {
        let hasher = HasherConfig::new().hash_alg(HashAlg::Gradient).to_hasher();
        let png = png(4, 3);
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

    #[test]
    fn an_image_under_a_root_is_ingested() {
        let (_tmp, root, _) = tree();
        let (_, out) = ingest(serde_json::json!({"dir": root}), roots(&root));
        let out = out.expect("ingested");
        assert_eq!((out.images, out.rejected_total), (1, 0));
    }

    #[test]
    fn with_no_roots_a_path_fails_fast_saying_to_upload() {
        let (_tmp, root, _) = tree();
        let (_, out) = ingest(serde_json::json!({"dir": root}), AllowedRoots::none());
        let e = out.expect_err("refused");
        assert_eq!(e.code, twin_core::FailureCode::BadInput);
        assert!(e.message.contains("spec.source.dir"), "{}", e.message);
        assert!(e.message.contains("upload"), "{}", e.message);
    }

    #[test]
    fn a_manifest_that_is_dev_zero_or_a_fifo_fails_fast() {
        let (_tmp, root, _) = tree();
        let fifo = root.join("fifo.jsonl");
        mkfifo(&fifo);
        let started = Instant::now();
        for (manifest, roots) in [
            (
                PathBuf::from("/dev/zero"),
                AllowedRoots::new(["/dev"]).expect("root"),
            ),
            (PathBuf::from("/dev/zero"), roots(&root)),
            (fifo, roots(&root)),
        ] {
            let (_, out) = ingest(serde_json::json!({"manifest": manifest}), roots);
            let e = out.expect_err("refused");
            assert!(e.message.contains("spec.source.manifest"), "{}", e.message);
        }
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    /// `mkfifo`, without a dependency: the coreutils command.
    fn mkfifo(path: &Path) {
        let status = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .expect("mkfifo runs");
        assert!(status.success());
    }

    #[test]
    fn manifest_lines_outside_the_roots_and_symlinks_out_are_rejected_unread() {
        let (_tmp, root, outside) = tree();
        let root = root.canonicalize().expect("canonical");
        std::os::unix::fs::symlink(outside.join("b.png"), root.join("c/i/link.png"))
            .expect("symlink");
        let fifo = root.join("c/i/fifo.png");
        mkfifo(&fifo);
        let manifest = root.join("m.jsonl");
        let lines = [
            r#"{"path": "c/i/a.png", "instance": "i", "category": "c"}"#,
            r#"{"path": "/etc/hostname", "instance": "i", "category": "c"}"#,
            r#"{"path": "/dev/zero", "instance": "i", "category": "c"}"#,
            r#"{"path": "../outside/b.png", "instance": "i", "category": "c"}"#,
            r#"{"path": "c/i/link.png", "instance": "i", "category": "c"}"#,
            r#"{"path": "c/i/fifo.png", "instance": "i", "category": "c"}"#,
        ];
        std::fs::write(&manifest, lines.join("\n")).expect("write");
        let started = Instant::now();
        let (_, out) = ingest(serde_json::json!({"manifest": manifest}), roots(&root));
        let out = out.expect("the one good image is ingested");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!((out.images, out.rejected_total), (1, 5));
        let reasons: BTreeMap<_, _> = out
            .rejected
            .iter()
            .map(|r| (r.path.as_str(), r.error.as_str()))
            .collect();
        let outside = "not a readable path under the allowed roots";
        assert_eq!(reasons["/etc/hostname"], outside);
        assert_eq!(reasons["/dev/zero"], outside);
        assert_eq!(reasons["../outside/b.png"], outside);
        assert_eq!(reasons["c/i/link.png"], outside);
        assert_eq!(reasons["c/i/fifo.png"], "not a regular file");
        // And the symlinked directory case: a `dir` source that is a link out of the root.
        std::os::unix::fs::symlink(outside, root.join("away")).expect("symlink");
        let (_, out) = ingest(serde_json::json!({"dir": root.join("away")}), roots(&root));
        assert!(out.expect_err("refused").message.contains(outside));
    }

    #[test]
    fn uploaded_images_are_ingested_from_their_blobs_with_no_roots() {
        let backend = MemoryBackend::new();
        let ctx = backend.context(&[]);
        let a = ctx.upload(png(4, 3)).expect("upload");
        let b = ctx.upload(b"not an image".to_vec()).expect("upload");
        let mut listing = Vec::new();
        for (blob, path) in [(a, "c/i/a.png"), (b, "c/i/b.png")] {
            let line = UploadedImage {
                blob,
                path: path.into(),
                instance: "i".into(),
                category: "c".into(),
            };
            serde_json::to_writer(&mut listing, &line).expect("serialise");
            listing.push(b'\n');
        }
        let listing = ctx.upload(listing).expect("upload");
        let job = job(serde_json::json!({"kind": "ingest", "dataset": "d",
            "source": {"blobs": listing}}));
        let JobOutput::Ingest(out) = IngestStage.run(&job, &ctx).expect("ingested") else {
            panic!("not an ingest output");
        };
        assert_eq!((out.images, out.rejected_total), (1, 1));
        assert_eq!(out.rejected[0].path, "c/i/b.png");
    }

    #[test]
    fn an_image_whose_header_claims_too_many_pixels_is_rejected_undecoded() {
        let hasher = HasherConfig::new().hash_alg(HashAlg::Gradient).to_hasher();
        let mut bomb = png(1, 1);
        bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        // Whether the decoder checks the header's CRC first or its size, it must not allocate.
        let started = Instant::now();
        assert!(inspect(&bomb, &hasher).is_err());
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
