//! Registered models: the canonical manifest of a checkpoint's files, whose SHA-256 is the
//! model's identity, and the rules a manifest must keep.
//!
//! A model is a directory tree (a Hugging Face model folder, a diffusers pipeline with `unet/`,
//! `vae/`, …) stored as one blob per file plus this manifest. The manifest has exactly one byte
//! form ([`ModelManifest::to_bytes`]: files sorted by path, fixed field order, no whitespace), so
//! the same files always give the same hash, and the server refuses any other form.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::ids::BlobHash;

/// The `format` line of every manifest.
pub const MANIFEST_FORMAT: &str = "twin.model/1";
/// Most files in one model: enough for sharded checkpoints of any size (a 70B model has ~30
/// shards) and small enough that the file list fits in the registration event.
pub const MAX_MODEL_FILES: usize = 256;
/// Longest relative path, in bytes.
pub const MAX_PATH_BYTES: usize = 256;
/// Largest manifest the server reads.
pub const MAX_MANIFEST_BYTES: u64 = 256 * 1024;

/// Extensions of pickled PyTorch weights. Loading a pickle runs code of its author's choosing,
/// so twin stores safetensors only.
const PICKLE_EXTENSIONS: [&str; 6] = ["bin", "pt", "pth", "pkl", "pickle", "ckpt"];

/// One file of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    /// Relative path inside the model, `/`-separated (`unet/config.json`).
    pub path: String,
    pub size: u64,
    /// SHA-256 of the content: the file's blob.
    #[schema(value_type = String)]
    pub sha256: BlobHash,
}

/// Every file of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelManifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// Sorted by path (byte order), no duplicates.
    pub files: Vec<ModelFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("not a model manifest: {0}")]
    Malformed(String),
    #[error("file `{path}`: {message}")]
    BadPath { path: String, message: String },
    #[error("file `{0}` is listed twice")]
    Duplicate(String),
    #[error(
        "file `{0}`: pickled PyTorch weights are refused (loading them runs arbitrary code); \
         convert them to safetensors, e.g. `model.save_pretrained(dir, safe_serialization=True)`"
    )]
    Pickle(String),
    #[error("the model has no files")]
    Empty,
    #[error("the model has {0} files; at most {MAX_MODEL_FILES} are allowed")]
    TooManyFiles(usize),
    #[error("the manifest is not in canonical form (files sorted by path, compact JSON)")]
    NotCanonical,
}

impl ModelManifest {
    /// A manifest of `files` in canonical order, checked.
    pub fn new(mut files: Vec<ModelFile>) -> Result<Self, ManifestError> {
        files.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
        let manifest = Self {
            format: MANIFEST_FORMAT.to_owned(),
            files,
        };
        manifest.check()?;
        Ok(manifest)
    }

    /// Reads a manifest, refusing any form but the canonical one.
    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        let manifest: Self =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed(e.to_string()))?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(ManifestError::Malformed(format!(
                "format `{}`, expected `{MANIFEST_FORMAT}`",
                manifest.format
            )));
        }
        manifest.check()?;
        if manifest.to_bytes() != bytes {
            return Err(ManifestError::NotCanonical);
        }
        Ok(manifest)
    }

    /// The canonical bytes; their SHA-256 is the model's identity.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("manifests serialise")
    }

    pub fn hash(&self) -> BlobHash {
        BlobHash::of(&self.to_bytes())
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    pub fn file(&self, path: &str) -> Option<&ModelFile> {
        self.files
            .binary_search_by(|f| f.path.as_bytes().cmp(path.as_bytes()))
            .ok()
            .map(|i| &self.files[i])
    }

    fn check(&self) -> Result<(), ManifestError> {
        if self.files.is_empty() {
            return Err(ManifestError::Empty);
        }
        if self.files.len() > MAX_MODEL_FILES {
            return Err(ManifestError::TooManyFiles(self.files.len()));
        }
        let mut dirs = BTreeSet::new();
        for (i, f) in self.files.iter().enumerate() {
            check_path(&f.path)?;
            if let Some(prev) = i.checked_sub(1).map(|j| &self.files[j]) {
                match prev.path.as_bytes().cmp(f.path.as_bytes()) {
                    std::cmp::Ordering::Equal => {
                        return Err(ManifestError::Duplicate(f.path.clone()));
                    }
                    std::cmp::Ordering::Greater => return Err(ManifestError::NotCanonical),
                    std::cmp::Ordering::Less => {}
                }
            }
            let mut prefix = f.path.as_str();
            while let Some((dir, _)) = prefix.rsplit_once('/') {
                dirs.insert(dir);
                prefix = dir;
            }
        }
        // A file and a directory of the same name cannot both exist on disk.
        if let Some(f) = self.files.iter().find(|f| dirs.contains(f.path.as_str())) {
            return Err(ManifestError::BadPath {
                path: f.path.clone(),
                message: "is both a file and a directory".into(),
            });
        }
        Ok(())
    }
}

/// Checks one relative path: what [`ModelManifest`] accepts and an executor may create.
pub fn check_path(path: &str) -> Result<(), ManifestError> {
    let bad = |message: &str| ManifestError::BadPath {
        path: path.chars().take(300).collect(),
        message: message.to_owned(),
    };
    if path.is_empty() {
        return Err(bad("empty path"));
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(bad(&format!("longer than {MAX_PATH_BYTES} bytes")));
    }
    if path.starts_with('/') {
        return Err(bad(
            "absolute paths are refused; paths are relative to the model",
        ));
    }
    if path
        .chars()
        .any(|c| c == '\\' || c == '\0' || c.is_control())
    {
        return Err(bad("contains a backslash or a control character"));
    }
    for part in path.split('/') {
        match part {
            "" => return Err(bad("empty path component")),
            "." | ".." => return Err(bad("`.` and `..` components are refused")),
            _ => {}
        }
    }
    if is_pickle(path) {
        return Err(ManifestError::Pickle(path.to_owned()));
    }
    Ok(())
}

/// Whether a file name says pickled weights.
pub fn is_pickle(path: &str) -> bool {
    path.rsplit_once('.')
        .is_some_and(|(_, ext)| PICKLE_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()))
}

/// What a model's config files say it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelKind {
    /// `transformers` (a `config.json` at the root), `diffusers` (`model_index.json`) or
    /// `unknown`.
    pub library: String,
    /// `model_type` of a transformers config (`qwen2_5_vl`, `clip`, …) or the pipeline class of a
    /// diffusers one (`StableDiffusionPipeline`).
    pub model_type: Option<String>,
    pub architectures: Vec<String>,
}

impl ModelKind {
    /// Reads the kind from the root `config.json` or `model_index.json`, whichever is given.
    pub fn detect(config_json: Option<&[u8]>, model_index_json: Option<&[u8]>) -> Self {
        let str_field = |v: &serde_json::Value, k: &str| {
            v.get(k)
                .and_then(|x| x.as_str())
                .map(|s| s.chars().take(128).collect())
        };
        if let Some(v) =
            model_index_json.and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
        {
            return Self {
                library: "diffusers".into(),
                model_type: str_field(&v, "_class_name"),
                architectures: Vec::new(),
            };
        }
        if let Some(v) =
            config_json.and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
        {
            let architectures = v
                .get("architectures")
                .and_then(|a| a.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str())
                        .take(8)
                        .map(|s| s.chars().take(128).collect())
                        .collect()
                })
                .unwrap_or_default();
            return Self {
                library: "transformers".into(),
                model_type: str_field(&v, "model_type"),
                architectures,
            };
        }
        Self {
            library: "unknown".into(),
            ..Self::default()
        }
    }
}

/// How a job names its model: a registered model (`name` or manifest hash) or a directory on
/// the executor's machine. A path is anything with a `/` or starting with `.`; a bare word is a
/// registry reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef<'a> {
    Registered(&'a str),
    Path(&'a str),
}

impl<'a> ModelRef<'a> {
    pub fn parse(value: &'a str) -> Self {
        if value.contains('/') || value.starts_with('.') || value.starts_with('~') {
            ModelRef::Path(value)
        } else {
            ModelRef::Registered(value)
        }
    }
}

/// Whether `name` can name a model: 1 to 64 of `a-z`, `0-9`, `-`, `_`, `.`, starting with a
/// letter or digit, and not a hash.
pub fn valid_model_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.parse::<BlobHash>().is_err()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

/// Body of `POST /v1/models`: register the model whose manifest (and files) are uploaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterModel {
    /// SHA-256 of the canonical manifest blob.
    #[schema(value_type = String)]
    pub manifest: BlobHash,
    /// A name to point at the model once it is registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The training job that wrote the checkpoint (executors only; with the lease's `epoch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub job: Option<crate::ids::JobId>,
    /// The epoch of the caller's lease on `job`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

/// Body of `POST /v1/admin/blobs/gc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GcRequest {
    /// List what would be deleted, delete nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Blobs stored more recently than this are kept whatever refers to them: an upload whose
    /// registration or job has not been recorded yet (a model's files before its manifest).
    #[serde(default = "default_gc_min_age")]
    pub min_age_secs: u64,
}

fn default_gc_min_age() -> u64 {
    3600
}

/// One blob no record refers to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UnreferencedBlob {
    #[schema(value_type = String)]
    pub hash: BlobHash,
    pub bytes: u64,
}

/// What a collection found (and, unless a dry run, deleted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GcReport {
    pub dry_run: bool,
    /// Blobs in the store.
    pub stored: u64,
    /// Blobs some record refers to (directly or through a referenced manifest).
    pub referenced: u64,
    /// Unreferenced blobs kept because they are younger than `min_age_secs`.
    pub too_young: u64,
    pub unreferenced: Vec<UnreferencedBlob>,
    pub unreferenced_bytes: u64,
    /// Whether `unreferenced` was deleted.
    pub deleted: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str) -> ModelFile {
        ModelFile {
            path: path.into(),
            size: 3,
            sha256: BlobHash::of(path.as_bytes()),
        }
    }

    #[test]
    fn the_canonical_form_is_the_only_form() {
        let m = ModelManifest::new(vec![file("b.json"), file("a/x.safetensors")]).unwrap();
        assert_eq!(m.files[0].path, "a/x.safetensors");
        let bytes = m.to_bytes();
        assert_eq!(ModelManifest::parse(&bytes).unwrap(), m);
        assert_eq!(m.hash(), BlobHash::of(&bytes));
        // The same content pretty-printed, or reordered, is refused.
        let pretty = serde_json::to_vec_pretty(&m).unwrap();
        assert_eq!(
            ModelManifest::parse(&pretty),
            Err(ManifestError::NotCanonical)
        );
        let mut swapped = m.clone();
        swapped.files.swap(0, 1);
        assert_eq!(
            ModelManifest::parse(&swapped.to_bytes()),
            Err(ManifestError::NotCanonical)
        );
    }

    #[test]
    fn bad_names_are_refused() {
        for (path, want) in [
            ("/etc/passwd", "absolute"),
            ("../x", "`..`"),
            ("a/../../x", "`..`"),
            ("a//b", "empty path component"),
            ("./a", "`.`"),
            ("a\\b", "backslash"),
            ("", "empty path"),
        ] {
            let err = ModelManifest::new(vec![file(path)])
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{path}: {err}");
        }
        let long = "x".repeat(MAX_PATH_BYTES + 1);
        assert!(ModelManifest::new(vec![file(&long)]).is_err());
        assert_eq!(
            ModelManifest::new(vec![file("a"), file("a")]),
            Err(ManifestError::Duplicate("a".into()))
        );
        assert!(matches!(
            ModelManifest::new(vec![file("unet"), file("unet/config.json")]),
            Err(ManifestError::BadPath { .. })
        ));
        assert_eq!(
            ModelManifest::new(vec![file("pytorch_model.bin")]),
            Err(ManifestError::Pickle("pytorch_model.bin".into()))
        );
        assert_eq!(ModelManifest::new(vec![]), Err(ManifestError::Empty));
        let many = (0..=MAX_MODEL_FILES)
            .map(|i| file(&format!("f{i}")))
            .collect();
        assert_eq!(
            ModelManifest::new(many),
            Err(ManifestError::TooManyFiles(MAX_MODEL_FILES + 1))
        );
        assert!(matches!(
            ModelManifest::parse(b"{\"format\":\"other\",\"files\":[]}"),
            Err(ManifestError::Malformed(_))
        ));
    }

    #[test]
    fn references_and_names() {
        assert_eq!(ModelRef::parse("clip"), ModelRef::Registered("clip"));
        assert_eq!(ModelRef::parse("/m/clip"), ModelRef::Path("/m/clip"));
        assert_eq!(ModelRef::parse("./clip"), ModelRef::Path("./clip"));
        assert_eq!(ModelRef::parse("a/b"), ModelRef::Path("a/b"));
        assert!(valid_model_name("qwen2.5-vl-3b"));
        assert!(!valid_model_name("-x"));
        assert!(!valid_model_name("Upper"));
        assert!(!valid_model_name(&"a".repeat(65)));
        assert!(!valid_model_name(&BlobHash::of(b"x").to_hex()));
    }

    #[test]
    fn kinds_come_from_the_config_files() {
        let k = ModelKind::detect(
            Some(br#"{"model_type":"clip","architectures":["CLIPModel"]}"#),
            None,
        );
        assert_eq!(k.library, "transformers");
        assert_eq!(k.model_type.as_deref(), Some("clip"));
        assert_eq!(k.architectures, vec!["CLIPModel"]);
        let d = ModelKind::detect(None, Some(br#"{"_class_name":"StableDiffusionPipeline"}"#));
        assert_eq!(d.library, "diffusers");
        assert_eq!(ModelKind::detect(None, None).library, "unknown");
    }
}
