//! Bodies of the HTTP API v1, shared by the server and its clients (pure data).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::event::{JobOutput, RecordedEvent};
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

/// Body of `PUT /v1/modules/aliases/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AliasBody {
    /// SHA-256 of a registered module.
    pub hash: String,
}
