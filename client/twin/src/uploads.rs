//! What `twin submit`, `twin train submit` and `twin eval run` send instead of paths on this
//! machine: the files a spec names are uploaded as blobs and the spec names the blobs, so the
//! server and its executors need no access to this machine's files (no `allowed_roots`).
//!
//! - an ingest's `source.dir` or `source.manifest`: every image is uploaded (skipped when the
//!   server has it), then a listing of `{blob, path, instance, category}` lines; the source
//!   becomes `{blobs = "<listing>"}`;
//! - an eval's `data.questions`: the file and each image it names are uploaded, then a bundle
//!   mapping the names to blobs; the data becomes `{uploaded = "<bundle>"}`;
//! - a model directory (`spec.model` that is a path): registered by content, as `twin models add`
//!   does, and replaced by its hash.
//!
//! `--no-upload` keeps the paths, for a server whose executors read them under their roots.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use twin_client::Client;
use twin_client::models::scan_model_dir;
use twin_core::BlobHash;
use twin_core::eval::QuestionsUpload;
use twin_core::model::ModelRef;
use twin_core::spec::{JobKind, UploadedImage, field_pointer};

use crate::models::human_bytes;

const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// Uploads every file the submission names on this machine and rewrites the spec to name the
/// blobs instead. Paths must already be absolute (`resolve_host_paths`).
pub async fn upload_host_paths(
    client: &Client,
    submission: &mut serde_json::Value,
) -> anyhow::Result<()> {
    let Some(kind) = submission
        .pointer("/spec/kind")
        .and_then(|k| k.as_str())
        .and_then(JobKind::parse)
    else {
        return Ok(());
    };
    let text = |pointer: &str, submission: &serde_json::Value| {
        submission
            .pointer(pointer)
            .and_then(|v| v.as_str())
            .map(PathBuf::from)
    };
    if kind == JobKind::Ingest {
        let listed = if let Some(dir) = text("/spec/source/dir", submission) {
            Some(list_dir(&dir).with_context(|| format!("spec.source.dir {}", dir.display()))?)
        } else if let Some(m) = text("/spec/source/manifest", submission) {
            Some(
                list_manifest(&m)
                    .with_context(|| format!("spec.source.manifest {}", m.display()))?,
            )
        } else {
            None
        };
        if let Some(images) = listed {
            let listing = upload_images(client, &images).await?;
            submission["spec"]["source"] = serde_json::json!({ "blobs": listing.to_hex() });
        }
    }
    if kind == JobKind::Eval
        && let Some(q) = text("/spec/data/questions", submission)
    {
        let bundle = upload_questions(client, &q)
            .await
            .with_context(|| format!("spec.data.questions {}", q.display()))?;
        submission["spec"]["data"] = serde_json::json!({ "uploaded": bundle.to_hex() });
    }
    for field in kind.model_fields() {
        let pointer = field_pointer(field);
        let Some(ModelRef::Path(dir)) = submission
            .pointer(&pointer)
            .and_then(|v| v.as_str())
            .map(ModelRef::parse)
        else {
            continue;
        };
        let dir = PathBuf::from(dir);
        let hash = upload_model(client, &dir)
            .await
            .with_context(|| format!("{field} {}", dir.display()))?;
        if let Some(slot) = submission.pointer_mut(&pointer) {
            *slot = serde_json::Value::String(hash);
        }
    }
    Ok(())
}

/// An image to upload and the listing line it gets.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LocalImage {
    file: PathBuf,
    path: String,
    instance: String,
    category: String,
}

fn has_image_extension(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The images of a `<category>/<instance>/<image>` tree, sorted, as the ingest stage lists them;
/// anything else is skipped and counted on stderr.
fn list_dir(root: &Path) -> anyhow::Result<Vec<LocalImage>> {
    fn entries(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
        let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .with_context(|| format!("listing {}", dir.display()))?;
        out.retain(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
        });
        out.sort();
        Ok(out)
    }
    let name = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("{} is not UTF-8", p.display()))
    };
    let mut images = Vec::new();
    let mut skipped = 0usize;
    for category in entries(root)? {
        if !category.is_dir() {
            // Metadata beside the tree (the sample generator's manifest.jsonl) is not an image.
            if !category
                .extension()
                .is_some_and(|e| e == "json" || e == "jsonl")
            {
                skipped += 1;
            }
            continue;
        }
        for instance in entries(&category)? {
            if !instance.is_dir() {
                skipped += 1;
                continue;
            }
            for file in entries(&instance)? {
                if !file.is_file() || !has_image_extension(&file) {
                    skipped += 1;
                    continue;
                }
                let (c, i, f) = (name(&category)?, name(&instance)?, name(&file)?);
                images.push(LocalImage {
                    path: format!("{c}/{i}/{f}"),
                    file,
                    instance: i,
                    category: c,
                });
            }
        }
    }
    if skipped > 0 {
        eprintln!(
            "skipped {skipped} entries of {} that are not images at <category>/<instance>/<file>.{{jpg,jpeg,png,webp}}",
            root.display()
        );
    }
    if images.is_empty() {
        return Err(anyhow!("no images at <category>/<instance>/<file> in it"));
    }
    Ok(images)
}

/// The images of a JSONL manifest of `{"path", "instance", "category"}` lines (relative paths
/// against its directory).
fn list_manifest(manifest: &Path) -> anyhow::Result<Vec<LocalImage>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Line {
        path: String,
        instance: String,
        category: String,
    }
    let text = std::fs::read_to_string(manifest).context("reading it")?;
    let base = manifest.parent().unwrap_or(Path::new("/"));
    let mut images = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let line: Line = serde_json::from_str(raw).with_context(|| format!("line {}", n + 1))?;
        images.push(LocalImage {
            file: base.join(&line.path),
            path: line.path,
            instance: line.instance,
            category: line.category,
        });
    }
    Ok(images)
}

/// Uploads the images (each skipped when the server has it) and their listing; the listing's
/// hash.
async fn upload_images(client: &Client, images: &[LocalImage]) -> anyhow::Result<BlobHash> {
    eprintln!("uploading {} images", images.len());
    let mut listing = Vec::new();
    let mut bytes = 0u64;
    for image in images {
        let stored = client
            .upload_file(&image.file)
            .await
            .with_context(|| format!("uploading {}", image.file.display()))?;
        bytes += stored.bytes;
        let line = UploadedImage {
            blob: stored.hash,
            path: image.path.clone(),
            instance: image.instance.clone(),
            category: image.category.clone(),
        };
        serde_json::to_writer(&mut listing, &line).expect("listing lines serialise");
        listing.push(b'\n');
    }
    eprintln!("uploaded {} images ({})", images.len(), human_bytes(bytes));
    Ok(client.put_blob(listing.into()).await?.hash)
}

/// Uploads a questions file, the images its lines name, and the bundle naming them; the
/// bundle's hash.
async fn upload_questions(client: &Client, questions: &Path) -> anyhow::Result<BlobHash> {
    let text = std::fs::read_to_string(questions).context("reading it")?;
    let base = questions.parent().unwrap_or(Path::new("/"));
    let mut names = std::collections::BTreeSet::new();
    for (n, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        // Only the image names: the executor reads the rest and names a bad line itself.
        let line: serde_json::Value =
            serde_json::from_str(raw).with_context(|| format!("line {}", n + 1))?;
        for image in line["images"].as_array().into_iter().flatten() {
            if let Some(name) = image.as_str() {
                names.insert(name.to_owned());
            }
        }
    }
    eprintln!(
        "uploading {} and {} images",
        questions.display(),
        names.len()
    );
    let mut images = BTreeMap::new();
    for name in names {
        let rel = twin_data::import::safe_relative(&name)
            .ok_or_else(|| anyhow!("image {name:?} is not a relative path inside"))?;
        let file = base.join(rel);
        let stored = client
            .upload_file(&file)
            .await
            .with_context(|| format!("uploading {}", file.display()))?;
        images.insert(name, stored.hash);
    }
    let upload = QuestionsUpload {
        questions: client.put_blob(text.into_bytes().into()).await?.hash,
        images,
    };
    let bundle = serde_json::to_vec(&upload).expect("a questions upload serialises");
    Ok(client.put_blob(bundle.into()).await?.hash)
}

/// Registers a checkpoint directory by content (its files uploaded unless the server has them),
/// as `twin models add` does; the model's hash.
async fn upload_model(client: &Client, dir: &Path) -> anyhow::Result<String> {
    let scan_dir = dir.to_owned();
    // Hashing gigabytes is blocking work.
    let local = tokio::task::spawn_blocking(move || scan_model_dir(&scan_dir, |_, _| {}))
        .await
        .context("the hashing task")??;
    let info = client
        .add_model(&local, None, |path, size| {
            eprintln!("uploading {path} ({})", human_bytes(size));
        })
        .await?;
    eprintln!("model {} registered as {}", dir.display(), info.model.hash);
    Ok(info.model.hash.to_hex())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_tree_lists_its_images_as_the_ingest_stage_does() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("mugs/mug-1")).unwrap();
        std::fs::write(root.join("mugs/mug-1/a.JPG"), b"x").unwrap();
        std::fs::write(root.join("mugs/mug-1/notes.txt"), b"x").unwrap();
        std::fs::write(root.join("mugs/mug-1/.hidden.png"), b"x").unwrap();
        std::fs::write(root.join("mugs/stray.png"), b"x").unwrap();
        std::fs::write(root.join("manifest.jsonl"), b"").unwrap();
        let images = list_dir(root).unwrap();
        assert_eq!(
            images,
            [LocalImage {
                file: root.join("mugs/mug-1/a.JPG"),
                path: "mugs/mug-1/a.JPG".into(),
                instance: "mug-1".into(),
                category: "mugs".into(),
            }]
        );
        assert!(list_dir(&root.join("mugs/mug-1")).is_err(), "no images");
    }

    #[test]
    fn a_manifest_lists_its_lines_against_its_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let m = tmp.path().join("m.jsonl");
        std::fs::write(
            &m,
            "{\"path\": \"a/1.png\", \"instance\": \"i\", \"category\": \"c\"}\n\n",
        )
        .unwrap();
        let images = list_manifest(&m).unwrap();
        assert_eq!(images.len(), 1);
        assert_eq!(images[0].file, tmp.path().join("a/1.png"));
        assert_eq!(images[0].path, "a/1.png");
    }
}
