//! Models on the client side: reading a checkpoint directory into a canonical manifest, and the
//! registry calls (register, list, describe, alias; the admin's blob collection).
//!
//! A directory is read as it comes: a Hugging Face model folder, a diffusers pipeline with its
//! component folders, or a Hugging Face cache snapshot whose files are symlinks into `blobs/`
//! (links are followed to regular files). Hidden files and folders (`.git`, `.cache`,
//! `.gitattributes`) are not part of a model. Pickled weights are refused before anything is
//! uploaded.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use reqwest::Method;
use sha2::{Digest, Sha256};
use twin_core::BlobHash;
use twin_core::api::AliasBody;
use twin_core::model::{
    GcReport, GcRequest, ManifestError, ModelFile, ModelManifest, RegisterModel, check_path,
};
use twin_core::projection::ModelInfo;

use crate::{Client, ClientError};

#[derive(Debug, thiserror::Error)]
pub enum ModelDirError {
    #[error("{0}: not a directory (a model is a checkpoint directory{hint})", .path.display(), hint = if .path.extension().is_some_and(|e| e == "wasm") { "; a `.wasm` file is a module: `twin modules add`" } else { "" })]
    NotADirectory { path: PathBuf },
    #[error("{path}: {source}", path = .path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a regular file (a model holds regular files only)", path = .path.display())]
    NotRegular { path: PathBuf },
    #[error("{path}: the name is not UTF-8", path = .path.display())]
    NotUtf8 { path: PathBuf },
    #[error("{dir}: {source}", dir = .dir.display())]
    Manifest { dir: PathBuf, source: ManifestError },
}

/// A checkpoint directory read from disk: its manifest and where each file is.
#[derive(Debug, Clone)]
pub struct LocalModel {
    pub manifest: ModelManifest,
    /// Absolute path of each manifest file, in manifest order.
    pub paths: Vec<PathBuf>,
}

/// Reads `dir` into a manifest, hashing every file (`on_file(path, bytes)` after each).
pub fn scan_model_dir(
    dir: &Path,
    mut on_file: impl FnMut(&str, u64),
) -> Result<LocalModel, ModelDirError> {
    let io_at = |path: &Path| {
        let path = path.to_owned();
        move |source| ModelDirError::Io { path, source }
    };
    let meta = std::fs::metadata(dir).map_err(io_at(dir))?;
    if !meta.is_dir() {
        return Err(ModelDirError::NotADirectory {
            path: dir.to_owned(),
        });
    }
    let mut entries = Vec::new();
    let walk = walkdir::WalkDir::new(dir)
        .follow_links(true)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.'));
    for entry in walk {
        let entry = entry.map_err(|e| {
            let path = e.path().unwrap_or(dir).to_owned();
            ModelDirError::Io {
                path,
                source: e.into_io_error().unwrap_or_else(|| {
                    io::Error::other("a symlink loop (links are followed to regular files)")
                }),
            }
        })?;
        let ft = entry.file_type();
        if ft.is_dir() {
            continue;
        }
        if !ft.is_file() {
            return Err(ModelDirError::NotRegular {
                path: entry.path().to_owned(),
            });
        }
        let rel = entry
            .path()
            .strip_prefix(dir)
            .expect("walked under dir")
            .components()
            .map(|c| c.as_os_str().to_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ModelDirError::NotUtf8 {
                path: entry.path().to_owned(),
            })?
            .join("/");
        check_path(&rel).map_err(|source| ModelDirError::Manifest {
            dir: dir.to_owned(),
            source,
        })?;
        entries.push((rel, entry.path().to_owned()));
    }
    // The manifest's order (path bytes), so file i of the manifest is entry i.
    entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut files = Vec::with_capacity(entries.len());
    for (rel, path) in &entries {
        let (sha256, size) = hash_file(path).map_err(io_at(path))?;
        on_file(rel, size);
        files.push(ModelFile {
            path: rel.clone(),
            size,
            sha256,
        });
    }
    let manifest = ModelManifest::new(files).map_err(|source| ModelDirError::Manifest {
        dir: dir.to_owned(),
        source,
    })?;
    let paths = entries.into_iter().map(|(_, path)| path).collect();
    Ok(LocalModel { manifest, paths })
}

/// SHA-256 and length of a file, streamed.
pub fn hash_file(path: &Path) -> io::Result<(BlobHash, u64)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((BlobHash(hasher.finalize().into()), len))
}

impl Client {
    /// Uploads a scanned model's files (each skipped when the server has it) and manifest, then
    /// registers it, pointing `name` at it when given. `on_upload(path, bytes)` runs before each
    /// file is sent.
    pub async fn add_model(
        &self,
        local: &LocalModel,
        name: Option<&str>,
        mut on_upload: impl FnMut(&str, u64),
    ) -> Result<ModelInfo, ClientError> {
        for (file, path) in local.manifest.files.iter().zip(&local.paths) {
            if self.has_blob(&file.sha256).await? {
                continue;
            }
            on_upload(&file.path, file.size);
            let stored = self
                .upload_file_as(path, file.sha256, file.size, &mut |_| {})
                .await?;
            if stored.hash != file.sha256 {
                return Err(ClientError::Protocol {
                    url: self.base_url().to_owned(),
                    message: format!(
                        "{} changed while it was uploaded (it now hashes to {})",
                        path.display(),
                        stored.hash
                    ),
                });
            }
        }
        let manifest = Bytes::from(local.manifest.to_bytes());
        let stored = self.put_blob(manifest).await?;
        self.register_model(&RegisterModel {
            manifest: stored.hash,
            name: name.map(str::to_owned),
            job: None,
            epoch: None,
        })
        .await
    }

    /// Registers a model whose manifest and files are uploaded.
    pub async fn register_model(&self, body: &RegisterModel) -> Result<ModelInfo, ClientError> {
        self.json(self.request(Method::POST, "/v1/models").json(body))
            .await
    }

    pub async fn models(&self) -> Result<Vec<ModelInfo>, ClientError> {
        self.json(self.request(Method::GET, "/v1/models")).await
    }

    /// A model by name or manifest hash.
    pub async fn model(&self, reference: &str) -> Result<ModelInfo, ClientError> {
        self.json(self.request(Method::GET, &format!("/v1/models/{reference}")))
            .await
    }

    /// Points model name `name` at the registered model `hash`.
    pub async fn set_model_alias(&self, name: &str, hash: &str) -> Result<ModelInfo, ClientError> {
        self.json(
            self.request(Method::PUT, &format!("/v1/models/aliases/{name}"))
                .json(&AliasBody {
                    hash: hash.to_owned(),
                }),
        )
        .await
    }

    /// Lists (dry run) or deletes the blobs no record refers to (admin token).
    pub async fn collect_blobs(&self, body: &GcRequest) -> Result<GcReport, ClientError> {
        self.json(self.request(Method::POST, "/v1/admin/blobs/gc").json(body))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hugging_face_snapshot_is_read_through_its_links() {
        let tmp = tempfile::tempdir().unwrap();
        let blobs = tmp.path().join("blobs");
        let snap = tmp.path().join("snapshots/abc");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::create_dir_all(snap.join("unet")).unwrap();
        std::fs::create_dir_all(snap.join(".cache/huggingface")).unwrap();
        std::fs::write(blobs.join("1"), b"{\"model_type\":\"clip\"}").unwrap();
        std::fs::write(blobs.join("2"), b"weights").unwrap();
        std::os::unix::fs::symlink("../../blobs/1", snap.join("config.json")).unwrap();
        std::os::unix::fs::symlink("../../../blobs/2", snap.join("unet/w.safetensors")).unwrap();
        std::fs::write(snap.join(".gitattributes"), b"x").unwrap();
        std::fs::write(snap.join(".cache/huggingface/lock"), b"x").unwrap();
        let mut seen = Vec::new();
        let local = scan_model_dir(&snap, |p, n| seen.push((p.to_owned(), n))).unwrap();
        let paths: Vec<_> = local
            .manifest
            .files
            .iter()
            .map(|f| f.path.as_str())
            .collect();
        assert_eq!(paths, ["config.json", "unet/w.safetensors"]);
        assert_eq!(local.manifest.files[1].sha256, BlobHash::of(b"weights"));
        assert_eq!(local.manifest.files[1].size, 7);
        assert_eq!(local.paths[1], snap.join("unet/w.safetensors"));
        assert_eq!(seen.len(), 2);
    }

    #[test]
    fn pickles_special_files_and_wasm_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("config.json"), b"{}").unwrap();
        std::fs::write(tmp.path().join("pytorch_model.bin"), b"\x80\x02").unwrap();
        let err = scan_model_dir(tmp.path(), |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("pickled PyTorch weights"), "{err}");
        assert!(err.contains("safetensors"), "{err}");

        let fifo = tempfile::tempdir().unwrap();
        nix::unistd::mkfifo(&fifo.path().join("pipe"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = scan_model_dir(fifo.path(), |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a regular file"), "{err}");

        let wasm = tmp.path().join("reward.wasm");
        std::fs::write(&wasm, b"\0asm").unwrap();
        let err = scan_model_dir(&wasm, |_, _| {}).unwrap_err().to_string();
        assert!(err.contains("twin modules add"), "{err}");

        let dangling = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/nonexistent/x", dangling.path().join("x")).unwrap();
        assert!(scan_model_dir(dangling.path(), |_, _| {}).is_err());
    }
}
