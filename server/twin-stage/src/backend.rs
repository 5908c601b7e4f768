//! What a stage needs from the server: blobs, artefacts, progress, other jobs. The HTTP client
//! is the real backend; the trait exists so phases and checkpoints can be tested without one.

use std::collections::BTreeMap;

use bytes::Bytes;
use tokio::runtime::Handle;
use twin_client::{Client, ClientError, JobFilter};
use twin_core::api::{ArtefactBody, ProgressBody, TrainRecordBody};
use twin_core::job::JobState;
use twin_core::model::RegisterModel;
use twin_core::train::TrainRecord;
use twin_core::{BlobHash, FailureCode};

use crate::StageError;

/// The server calls of one job attempt. Implementations are called from the stage's blocking
/// thread.
pub trait StageBackend: Send + Sync {
    /// Stores bytes in the blob store; returns their hash.
    fn upload(&self, bytes: Vec<u8>) -> Result<BlobHash, StageError>;
    /// Fetches a blob, its hash checked.
    fn download(&self, hash: &BlobHash) -> Result<Bytes, StageError>;
    /// Streams a blob into a file, its hash checked (a checkpoint never sits in memory). The
    /// default reads it whole: fine for test backends.
    fn download_to_file(&self, hash: &BlobHash, dest: &std::path::Path) -> Result<u64, StageError> {
        let bytes = self.download(hash)?;
        std::fs::write(dest, &bytes)
            .map_err(|e| StageError::internal(format!("writing {}: {e}", dest.display())))?;
        Ok(bytes.len() as u64)
    }
    /// Stores a file's bytes, streamed; returns their hash.
    fn upload_file(&self, path: &std::path::Path) -> Result<BlobHash, StageError> {
        let bytes = std::fs::read(path)
            .map_err(|e| StageError::internal(format!("reading {}: {e}", path.display())))?;
        self.upload(bytes)
    }
    /// Records `blob` as this attempt's artefact `name`.
    fn record_artefact(&self, name: &str, blob: BlobHash) -> Result<(), StageError>;
    fn progress(
        &self,
        message: &str,
        fraction: Option<f64>,
        counters: &BTreeMap<String, f64>,
    ) -> Result<(), StageError>;
    /// Jobs on the server (to find reusable results of earlier jobs).
    fn jobs(&self, filter: &JobFilter) -> Result<Vec<JobState>, StageError>;
    /// Records a training step or validation of this (train) job.
    fn record_training(&self, record: &TrainRecord) -> Result<(), StageError>;
    /// Registers the model whose manifest blob (and files) are uploaded as a checkpoint this job
    /// wrote, pointing `name` at it when given.
    fn register_checkpoint(&self, manifest: BlobHash, name: Option<&str>)
    -> Result<(), StageError>;
}

/// The server over HTTP, every call fenced by the attempt's lease epoch. Stages run on a
/// blocking thread, so calls block on the runtime's handle.
pub struct HttpBackend {
    client: Client,
    job: String,
    epoch: u64,
    rt: Handle,
}

impl HttpBackend {
    pub fn new(client: Client, job: impl Into<String>, epoch: u64, rt: Handle) -> Self {
        Self {
            client,
            job: job.into(),
            epoch,
            rt,
        }
    }
}

impl StageBackend for HttpBackend {
    fn upload(&self, bytes: Vec<u8>) -> Result<BlobHash, StageError> {
        let hash = BlobHash::of(&bytes);
        // Skipped when the server has the bytes: re-running a phase re-uploads the same blobs.
        let have = self
            .rt
            .block_on(self.client.has_blob(&hash))
            .map_err(client_error)?;
        if !have {
            let stored = self
                .rt
                .block_on(self.client.put_blob(Bytes::from(bytes)))
                .map_err(client_error)?;
            if stored.hash != hash {
                return Err(StageError::internal(format!(
                    "the server stored blob {hash} as {}",
                    stored.hash
                )));
            }
        }
        Ok(hash)
    }

    fn download(&self, hash: &BlobHash) -> Result<Bytes, StageError> {
        self.rt
            .block_on(self.client.get_blob(hash))
            .map_err(|e| client_error(e).context(format!("blob {hash}")))
    }

    fn download_to_file(&self, hash: &BlobHash, dest: &std::path::Path) -> Result<u64, StageError> {
        self.rt
            .block_on(self.client.download_to_file(hash, dest))
            .map_err(|e| client_error(e).context(format!("blob {hash}")))
    }

    fn upload_file(&self, path: &std::path::Path) -> Result<BlobHash, StageError> {
        self.rt
            .block_on(self.client.upload_file(path))
            .map(|stored| stored.hash)
            .map_err(|e| client_error(e).context(format!("uploading {}", path.display())))
    }

    fn record_artefact(&self, name: &str, blob: BlobHash) -> Result<(), StageError> {
        let body = ArtefactBody {
            epoch: self.epoch,
            name: name.to_owned(),
            blob,
        };
        self.rt
            .block_on(self.client.record_artefact(&self.job, &body))
            .map(drop)
            .map_err(client_error)
    }

    fn progress(
        &self,
        message: &str,
        fraction: Option<f64>,
        counters: &BTreeMap<String, f64>,
    ) -> Result<(), StageError> {
        let body = ProgressBody {
            epoch: self.epoch,
            message: message.to_owned(),
            fraction,
            counters: counters.clone(),
        };
        self.rt
            .block_on(self.client.progress(&self.job, &body))
            .map(drop)
            .map_err(client_error)
    }

    fn jobs(&self, filter: &JobFilter) -> Result<Vec<JobState>, StageError> {
        self.rt
            .block_on(self.client.jobs(filter))
            .map_err(client_error)
    }

    fn record_training(&self, record: &TrainRecord) -> Result<(), StageError> {
        let body = TrainRecordBody {
            epoch: self.epoch,
            record: record.clone(),
        };
        self.rt
            .block_on(self.client.record_training(&self.job, &body))
            .map(drop)
            .map_err(client_error)
    }

    fn register_checkpoint(
        &self,
        manifest: BlobHash,
        name: Option<&str>,
    ) -> Result<(), StageError> {
        let job = self
            .job
            .parse()
            .map_err(|e| StageError::internal(format!("job id {}: {e}", self.job)))?;
        let body = RegisterModel {
            manifest,
            name: name.map(str::to_owned),
            job: Some(job),
            epoch: Some(self.epoch),
        };
        self.rt
            .block_on(self.client.register_model(&body))
            .map(drop)
            .map_err(|e| client_error(e).context(format!("registering checkpoint {manifest}")))
    }
}

/// Network errors, timeouts, rate limits and server errors may pass; other answers will not.
pub fn is_transient(e: &ClientError) -> bool {
    match e.status() {
        None => true,
        Some(s) => s == 408 || s == 429 || s >= 500,
    }
}

/// A failed server call as a stage failure.
pub fn client_error(e: ClientError) -> StageError {
    let code = match e.status() {
        _ if is_transient(&e) => FailureCode::Unavailable,
        // A blob or job the spec names is not there.
        Some(404) => FailureCode::BadInput,
        // An artefact over the server's blob size limit.
        Some(413) => FailureCode::BadInput,
        // Stale epoch or another holder: this executor no longer holds the lease.
        Some(409) => FailureCode::ExecutorLost,
        // The executor sent something the server cannot take, or lacks the role: not the job's
        // fault, and not going to pass by itself. (No status is a transport error: transient.)
        Some(_) | None => FailureCode::Internal,
    };
    StageError::new(code, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16) -> ClientError {
        ClientError::Api {
            status,
            code: "x".into(),
            message: "m".into(),
        }
    }

    #[test]
    fn server_answers_are_classified() {
        let protocol = ClientError::Protocol {
            url: "http://x".into(),
            message: "truncated".into(),
        };
        for (e, code, retryable) in [
            (protocol, FailureCode::Unavailable, true),
            (api(503), FailureCode::Unavailable, true),
            (api(429), FailureCode::Unavailable, true),
            (api(404), FailureCode::BadInput, false),
            (api(409), FailureCode::ExecutorLost, true),
            (api(400), FailureCode::Internal, false),
        ] {
            let s = client_error(e);
            assert_eq!((s.code, s.retryable), (code, retryable), "{s:?}");
        }
    }
}
