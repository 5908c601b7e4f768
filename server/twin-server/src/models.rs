//! The model registry: registering an uploaded checkpoint by its manifest, names → hashes, and
//! pinning the model a job names at submission.
//!
//! A model's files and its canonical manifest are uploaded as ordinary blobs first (the client
//! streams them, resumably); registration only checks and records. Nothing is logged unless the
//! manifest is canonical, names only safe relative paths, and every file it lists is stored with
//! the size it claims (the store being content-addressed, a stored blob has the right bytes).

use twin_core::event::{ModelAliasSet, ModelRegistered};
use twin_core::model::{MAX_MANIFEST_BYTES, ModelKind, ModelManifest, ModelRef, valid_model_name};
use twin_core::projection::{ModelInfo, Registry};
use twin_core::{BlobHash, Event, JobId, JobKind, StreamName};
use twin_log::{BlobError, BlobStore};

use crate::error::ApiError;
use crate::mining::invalid;
use crate::service::{Claimant, Service};

/// Config files read to tell what a model is; larger ones are not read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

impl Service {
    /// Checks and records the model whose manifest blob is `manifest`, then points `alias` at
    /// it. `job` is the training job (and the caller's lease epoch on it) that wrote it, for
    /// lineage. Returns the model and whether it was new.
    pub async fn register_model(
        &self,
        by: Claimant<'_>,
        manifest: BlobHash,
        alias: Option<String>,
        job: Option<(JobId, u64)>,
    ) -> Result<(ModelInfo, bool), ApiError> {
        let actor = by.name;
        if let Some(a) = &alias {
            check_model_name(a)?;
        }
        // An executor names a checkpoint for the job's submitter: whether the name is theirs
        // to take is checked for them, not for the executor's token.
        let mut submitter = None;
        if let Some((id, epoch)) = &job {
            let state = self.job(id)?;
            self.check_lease(&state, *epoch, actor)?;
            if state.kind != JobKind::Train {
                return Err(ApiError::InvalidBody(format!(
                    "job: {id} is a {} job; only training jobs register checkpoints",
                    state.kind
                )));
            }
            submitter = Some(state.submitted_by);
        }
        let owner = Claimant {
            name: submitter.as_deref().unwrap_or(by.name),
            admin: submitter.is_none() && by.admin,
        };
        if let Some(a) = &alias {
            self.check_owner(Registry::Model, a, owner)?;
        }
        let created = !self.read(|p| p.models.contains_key(&manifest));
        if created {
            let blobs = self.blobs.clone();
            let (files, kind) =
                tokio::task::spawn_blocking(move || check_manifest(&blobs, manifest))
                    .await
                    .map_err(|e| ApiError::internal("model check task", e))??;
            let event = ModelRegistered {
                hash: manifest,
                bytes: files.total_bytes(),
                files: files.files,
                kind,
                job: job.map(|(id, _)| id),
            };
            tracing::info!(hash = %manifest, bytes = event.bytes, files = event.files.len(), "model registered");
            self.record_once(
                actor,
                StreamName::Model(manifest.to_hex()),
                Event::ModelRegistered(event),
            )
            .await?;
        }
        let info = match alias {
            Some(a) => {
                self.set_model_alias_as(actor, owner, &a, &manifest.to_hex())
                    .await?
            }
            None => self.model(&manifest.to_hex())?,
        };
        Ok((info, created))
    }

    pub fn model(&self, reference: &str) -> Result<ModelInfo, ApiError> {
        self.read(|p| p.resolve_model(reference).cloned())
            .ok_or_else(|| ApiError::NotFound {
                what: "model",
                id: reference.chars().take(80).collect(),
            })
    }

    /// Points model name `alias` at a registered model; one event, so atomic for readers.
    pub async fn set_model_alias(
        &self,
        by: Claimant<'_>,
        alias: &str,
        hash: &str,
    ) -> Result<ModelInfo, ApiError> {
        self.set_model_alias_as(by.name, by, alias, hash).await
    }

    /// [`Self::set_model_alias`] recorded as `actor`, its ownership checked for `by` (an
    /// executor naming a checkpoint for the job's submitter).
    async fn set_model_alias_as(
        &self,
        actor: &str,
        by: Claimant<'_>,
        alias: &str,
        hash: &str,
    ) -> Result<ModelInfo, ApiError> {
        check_model_name(alias)?;
        let hash: BlobHash = hash.parse().map_err(|_| ApiError::InvalidId {
            what: "model hash",
            value: hash.chars().take(80).collect(),
        })?;
        self.model(&hash.to_hex())?;
        self.point_alias(
            actor,
            by,
            (Registry::Model, alias),
            |p| {
                (
                    p.model_aliases.get(alias).copied(),
                    p.model_alias_versions.get(alias).copied(),
                )
            },
            |previous| {
                Event::ModelAliasSet(ModelAliasSet {
                    alias: alias.to_owned(),
                    hash,
                    previous,
                })
            },
            hash,
        )
        .await?;
        self.model(&hash.to_hex())
    }

    /// The manifest hash a job's model field pins, when it names a registered model (a path is
    /// left as it is: the executor records the manifest of what it loads).
    pub(crate) fn pin_model(
        &self,
        field: &str,
        reference: &str,
    ) -> Result<Option<BlobHash>, ApiError> {
        match ModelRef::parse(reference) {
            ModelRef::Path(_) => Ok(None),
            ModelRef::Registered(r) => {
                let info = self.read(|p| p.resolve_model(r).cloned()).ok_or_else(|| {
                    invalid(
                        field,
                        format!(
                            "no model `{r}` is registered (`twin models ls` lists them; \
                             `twin models add DIR --name {r}` registers one; a directory on \
                             the executor is written as a path, `./{r}` or `/…/{r}`)"
                        ),
                    )
                })?;
                Ok(Some(info.model.hash))
            }
        }
    }
}

/// Reads and checks a manifest blob and the files it lists; returns it and what it is.
fn check_manifest(
    blobs: &BlobStore,
    hash: BlobHash,
) -> Result<(ModelManifest, ModelKind), ApiError> {
    let bad = |m: String| ApiError::InvalidBody(format!("manifest {hash}: {m}"));
    let len = match blobs.len(&hash) {
        Ok(len) => len,
        Err(BlobError::NotFound(_)) => {
            return Err(bad(
                "not uploaded; upload the manifest blob first (`twin models add` does)".into(),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    if len > MAX_MANIFEST_BYTES {
        return Err(bad(format!(
            "{len} bytes; a manifest is at most {MAX_MANIFEST_BYTES}"
        )));
    }
    let manifest = ModelManifest::parse(&blobs.read(&hash)?).map_err(|e| bad(e.to_string()))?;
    for f in &manifest.files {
        match blobs.len(&f.sha256) {
            Ok(len) if len == f.size => {}
            Ok(len) => {
                return Err(bad(format!(
                    "file `{}` is listed with {} bytes, but blob {} has {len}",
                    f.path, f.size, f.sha256
                )));
            }
            Err(BlobError::NotFound(_)) => {
                return Err(bad(format!(
                    "file `{}` (blob {}) is not uploaded",
                    f.path, f.sha256
                )));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let small = |path: &str| {
        manifest
            .file(path)
            .filter(|f| f.size <= MAX_CONFIG_BYTES)
            .and_then(|f| blobs.read(&f.sha256).ok())
    };
    let kind = ModelKind::detect(
        small("config.json").as_deref(),
        small("model_index.json").as_deref(),
    );
    Ok((manifest, kind))
}

fn check_model_name(name: &str) -> Result<(), ApiError> {
    if valid_model_name(name) {
        Ok(())
    } else {
        Err(ApiError::InvalidId {
            what: "model name (1 to 64 of a-z, 0-9, `-`, `_`, `.`, not a hash)",
            value: name.chars().take(80).collect(),
        })
    }
}
