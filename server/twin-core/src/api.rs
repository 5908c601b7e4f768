//! Bodies of the HTTP API v1, shared by the server and its clients (pure data).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::event::{JobOutput, RecordedEvent};
use crate::failure::FailureCode;
use crate::ids::BlobHash;
use crate::job::JobState;
use crate::spec::JobKind;

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable snake_case code (see ARCHITECTURE.md, "Error table").
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateExperiment {
    /// Becomes the experiment's id, so it is one.
    #[schema(pattern = "^[a-z0-9_-]{1,64}$")]
    pub name: String,
    #[serde(default)]
    pub description: String,
}

/// What an executor can run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct Capabilities {
    pub gpus: u32,
    pub labels: BTreeSet<String>,
    /// Job kinds the executor has stages for.
    pub kinds: BTreeSet<JobKind>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    /// A name for the executor, unique among running executors (recorded in the lease).
    pub executor: String,
    #[serde(default)]
    pub capabilities: Capabilities,
    /// How long to wait for a job before answering 204 (at most 30 000).
    #[serde(default)]
    pub wait_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeaseGrant {
    pub job: JobState,
    pub epoch: u64,
    /// The lease lapses this long after the grant or the last heartbeat.
    pub lease_ttl_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EpochBody {
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeartbeatResponse {
    /// Stop the job and report it with `fail`: it becomes cancelled.
    pub cancel_requested: bool,
    pub lease_ttl_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProgressBody {
    pub epoch: u64,
    pub message: String,
    #[serde(default)]
    pub fraction: Option<f64>,
    #[serde(default)]
    pub counters: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ArtefactBody {
    pub epoch: u64,
    pub name: String,
    /// Upload the bytes first with `PUT /v1/blobs/{hash}`.
    pub blob: BlobHash,
}

/// A training step or validation of the leased `train` job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainRecordBody {
    pub epoch: u64,
    pub record: crate::train::TrainRecord,
}

/// A training run's history: its steps and validations (as `train_step` and `train_validation`
/// events recorded them) and the checkpoints it registered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TrainingReport {
    pub job: crate::ids::JobId,
    #[serde(flatten)]
    pub log: crate::train::TrainingLog,
    /// Registered models the run wrote, oldest first.
    pub checkpoints: Vec<crate::projection::ModelInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteBody {
    pub epoch: u64,
    pub output: JobOutput,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailBody {
    pub epoch: u64,
    pub error: String,
    /// A retryable failure is retried with backoff while attempts remain.
    #[serde(default)]
    pub retryable: bool,
    /// What kind of failure this was (`unclassified` when an older executor does not say).
    #[serde(default = "unclassified")]
    pub code: FailureCode,
    /// More about the failure for programs: a module's own error code, the failing request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl FailBody {
    /// The longest `error` kept, in bytes: the server cuts a longer one (on a character
    /// boundary) rather than refuse it, since the message is for people and a refused report
    /// would leave the job held until its lease expires.
    pub const MAX_ERROR_BYTES: usize = 16 * 1024;
    /// The longest `detail` accepted, in bytes; a longer one is refused with 400. Detail is for
    /// programs, and a cut one (a module's code, a request id) would mislead. With the error's
    /// cap, a failure event stays far below the log's payload limit.
    pub const MAX_DETAIL_BYTES: usize = 4 * 1024;
}

fn unclassified() -> FailureCode {
    FailureCode::Unclassified
}

/// `POST /v1/jobs/{id}/release`: the lease holder gives the job back unfinished (it is shutting
/// down, say). The job is queued again at once, with no backoff, and the attempt counts against
/// no limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseBody {
    pub epoch: u64,
    /// Why, for people reading the job; defaults to `released by <caller>`. Cut at
    /// [`ReleaseBody::MAX_REASON_BYTES`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ReleaseBody {
    /// The longest reason kept, in bytes; a longer one is cut rather than refused, so that an
    /// executor on its way out never has its release refused for its wording.
    pub const MAX_REASON_BYTES: usize = 1024;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BlobStored {
    pub hash: BlobHash,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventsPage {
    pub events: Vec<RecordedEvent>,
    /// Pass as `from` to continue.
    pub next: u64,
    pub last_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    pub status: String,
    pub last_seq: u64,
    pub version: String,
}

/// The log's chain head (`GET /v1/log/head`). Written down where the server cannot write, it
/// lets a later audit (`twin replay --expect-head`) prove the log still holds that record: the
/// chain alone cannot show a truncated or wholly rewritten log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LogHead {
    /// Sequence number of the last durable record; 0 for an empty log.
    pub seq: u64,
    /// SHA-256 of that record, in hex (64 zeros for an empty log).
    pub hash: String,
    /// `<seq>:<hash>`, as `twin replay --expect-head` takes it.
    pub anchor: String,
}

/// Body of `PUT /v1/modules/aliases/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AliasBody {
    /// SHA-256 of a registered module.
    pub hash: String,
}

/// `POST /v1/jobs/{id}/reviews`: accept or reject candidates of a mine job, by id or in bulk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReviewBody {
    pub verdict: crate::mine::Verdict,
    /// Candidate ids (as listed).
    #[serde(default)]
    pub pairs: Vec<String>,
    /// Bulk: every pending candidate on which this filter gave the verdict `keep`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by_filter: Option<BulkByFilter>,
    #[serde(default)]
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkByFilter {
    pub filter: String,
    #[serde(default = "yes")]
    pub keep: bool,
}

fn yes() -> bool {
    true
}

/// What a review request recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReviewOutcome {
    /// Verdicts recorded (one event each).
    pub recorded: u64,
    /// Pairs that already had this verdict (nothing recorded for them).
    pub unchanged: u64,
    pub pairs: Vec<String>,
}

/// A candidate with its review status, as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ListedCandidate {
    #[serde(flatten)]
    pub candidate: crate::mine::Candidate,
    pub status: crate::mine::ReviewStatus,
    /// Who decided: a reviewer's name, or `filter:<name>` for an auto-accepted pair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
}

/// `GET /v1/jobs/{id}/candidates`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CandidatePage {
    pub job: String,
    /// Kept candidates by status, over the whole job.
    pub pending: u64,
    pub accepted: u64,
    pub rejected: u64,
    /// Candidates dropped by a required filter (never reviewed).
    pub dropped: u64,
    /// Matching the query, before `offset`/`limit`.
    pub total: u64,
    pub candidates: Vec<ListedCandidate>,
}

/// `POST /v1/uploads`: starts a resumable upload of `bytes` bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UploadCreate {
    /// The blob's total length.
    pub bytes: u64,
    /// The blob's SHA-256 if the client knows it: checked when the last byte arrives, and an
    /// upload of a blob already stored is answered at once (nothing to send).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<BlobHash>,
}

/// A resumable upload session (`/v1/uploads/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UploadStatus {
    /// The session's id; empty when no session was needed (the blob was already stored).
    pub id: String,
    /// The blob's total length, as declared.
    pub bytes: u64,
    /// Bytes durably received: where the next `PATCH` starts (its `Upload-Offset`).
    pub offset: u64,
    /// The stored blob, once the last byte arrived (the session is then gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<BlobStored>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_executors_fail_body_reads_as_unclassified() {
        let b: FailBody = serde_json::from_str(r#"{"epoch": 1, "error": "x"}"#).expect("valid");
        assert_eq!((b.code, b.detail), (FailureCode::Unclassified, None));
    }
}
