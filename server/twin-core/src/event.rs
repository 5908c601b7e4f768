//! The event schema: every fact the log records, with its type name, schema version and upcasters.
//!
//! Stored form: the log keeps `(event_type, schema_version, payload)` where `payload` is the
//! variant's struct encoded with rmp-serde as a map (field names kept), so that an old payload
//! can be read as a generic document and upcast. Old events are never rewritten: a change to a
//! payload bumps its version and adds an [`Upcaster`] from the previous one.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::dataset::DatasetBuilt;
use crate::ids::{BlobHash, DatasetId, ExperimentId, JobId, Millis};
use crate::mine::CandidateReviewed;
use crate::spec::JobSubmission;

/// A schema: how a set of events is encoded into and decoded from the log.
pub trait EventSchema: Sized {
    /// Returns the event type name, its current schema version and the encoded payload.
    fn encode(&self) -> (&'static str, u16, Vec<u8>);
    /// Decodes a stored payload, upcasting it from `version` when that is older than current.
    fn decode(event_type: &str, version: u16, payload: &[u8]) -> Result<Self, DecodeError>;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown event type `{0}`")]
    UnknownType(String),
    #[error("event `{event_type}` has schema version {version}, newer than this build's {current}")]
    FromTheFuture {
        event_type: String,
        version: u16,
        current: u16,
    },
    #[error("no upcaster for event `{event_type}` from version {version}")]
    NoUpcaster { event_type: String, version: u16 },
    #[error("event `{event_type}` v{version}: {message}")]
    Malformed {
        event_type: String,
        version: u16,
        message: String,
    },
}

/// Turns version `from_version` of one event type into version `from_version + 1`.
#[derive(Clone, Copy)]
pub struct Upcaster {
    pub event_type: &'static str,
    pub from_version: u16,
    pub upcast: fn(serde_json::Value) -> Result<serde_json::Value, String>,
}

/// Decodes a payload of `event_type` at `version` into `T` at `current`, applying upcasters.
pub fn decode_versioned<T: DeserializeOwned>(
    event_type: &str,
    version: u16,
    current: u16,
    payload: &[u8],
    upcasters: &[Upcaster],
) -> Result<T, DecodeError> {
    let malformed = |message: String| DecodeError::Malformed {
        event_type: event_type.to_owned(),
        version,
        message,
    };
    if version == current {
        // The fast path: replay of a log written by this build never builds a generic document.
        return rmp_serde::from_slice(payload).map_err(|e| malformed(e.to_string()));
    }
    if version > current {
        return Err(DecodeError::FromTheFuture {
            event_type: event_type.to_owned(),
            version,
            current,
        });
    }
    let mut doc: serde_json::Value =
        rmp_serde::from_slice(payload).map_err(|e| malformed(e.to_string()))?;
    for v in version..current {
        let step = upcasters
            .iter()
            .find(|u| u.event_type == event_type && u.from_version == v)
            .ok_or_else(|| DecodeError::NoUpcaster {
                event_type: event_type.to_owned(),
                version: v,
            })?;
        doc = (step.upcast)(doc).map_err(&malformed)?;
    }
    serde_json::from_value(doc).map_err(|e| malformed(e.to_string()))
}

/// Encodes a payload struct as a field-named MessagePack map.
pub fn encode_payload<T: Serialize>(payload: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(payload).expect("event payloads are plain data and always encode")
}

/// One committed event with its log coordinates, as projections and clients see it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct RecordedEvent {
    pub seq: u64,
    /// Commit time, milliseconds since the Unix epoch.
    pub ts: Millis,
    pub stream: String,
    pub stream_version: u64,
    pub actor: String,
    pub hash: BlobHash,
    #[serde(flatten)]
    pub event: Event,
}

macro_rules! events {
    ($($variant:ident($payload:ident) = $name:literal v $version:literal;)*) => {
        /// Every event twin records. The serialised form for clients is `{"type", "data"}`.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
        #[serde(tag = "type", content = "data")]
        pub enum Event {
            $(#[serde(rename = $name)] $variant($payload),)*
        }

        impl Event {
            pub fn event_type(&self) -> &'static str {
                match self { $(Event::$variant(_) => $name,)* }
            }
        }

        /// The current schema version of each event type.
        pub const SCHEMA_VERSIONS: &[(&str, u16)] = &[$(($name, $version),)*];

        impl EventSchema for Event {
            fn encode(&self) -> (&'static str, u16, Vec<u8>) {
                match self { $(Event::$variant(p) => ($name, $version, encode_payload(p)),)* }
            }

            fn decode(event_type: &str, version: u16, payload: &[u8]) -> Result<Self, DecodeError> {
                match event_type {
                    $($name => decode_versioned(event_type, version, $version, payload, UPCASTERS)
                        .map(Event::$variant),)*
                    other => Err(DecodeError::UnknownType(other.to_owned())),
                }
            }
        }
    };
}

events! {
    ExperimentCreated(ExperimentCreated) = "experiment_created" v 1;
    JobSubmitted(JobSubmitted) = "job_submitted" v 1;
    JobLeased(JobLeased) = "job_leased" v 1;
    JobStarted(JobStarted) = "job_started" v 1;
    JobProgress(JobProgress) = "job_progress" v 1;
    JobArtefactRecorded(JobArtefactRecorded) = "job_artefact_recorded" v 1;
    JobSucceeded(JobSucceeded) = "job_succeeded" v 1;
    JobAttemptFailed(JobAttemptFailed) = "job_attempt_failed" v 1;
    JobLeaseExpired(JobLeaseExpired) = "job_lease_expired" v 1;
    JobCancelRequested(JobCancelRequested) = "job_cancel_requested" v 1;
    JobCancelled(JobCancelled) = "job_cancelled" v 1;
    DatasetRegistered(DatasetRegistered) = "dataset_registered" v 1;
    ModuleRegistered(ModuleRegistered) = "module_registered" v 1;
    ModuleAliasSet(ModuleAliasSet) = "module_alias_set" v 1;
    CandidateReviewed(CandidateReviewed) = "candidate_reviewed" v 1;
    DatasetBuilt(DatasetBuilt) = "dataset_built" v 1;
}

/// Upcasters of the production schema. Empty while every type is at version 1; the schema test
/// in `tests/upcasting.rs` shows a version change against a committed log.
pub const UPCASTERS: &[Upcaster] = &[];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExperimentCreated {
    pub id: ExperimentId,
    pub name: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobSubmitted {
    pub id: JobId,
    pub submission: JobSubmission,
}

/// A lease was granted. `epoch` fences every later call of the executor that holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobLeased {
    pub epoch: u64,
    pub executor: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobStarted {
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobProgress {
    pub epoch: u64,
    pub message: String,
    /// Fraction done in [0, 1], when the stage knows it.
    pub fraction: Option<f64>,
    #[serde(default)]
    pub counters: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobArtefactRecorded {
    pub epoch: u64,
    pub name: String,
    pub blob: BlobHash,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobSucceeded {
    pub epoch: u64,
    pub result: JobResult,
}

/// An attempt failed. `retry_at` is set when the job goes back to the queue, absent when this
/// failure is final (non-retryable, or attempts exhausted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobAttemptFailed {
    pub epoch: u64,
    pub error: String,
    pub retryable: bool,
    pub retry_at: Option<Millis>,
}

/// The lease of `epoch` ran out without a heartbeat; same retry rule as a failed attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobLeaseExpired {
    pub epoch: u64,
    pub retry_at: Option<Millis>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobCancelRequested {
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobCancelled {
    /// The epoch of the executor that stopped, if one was running it.
    pub epoch: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DatasetRegistered {
    pub id: DatasetId,
    pub name: String,
    pub job: JobId,
    /// JSONL blob, one line per image (see [`ManifestEntry`]).
    pub manifest: BlobHash,
    pub images: u64,
    pub instances: u64,
    pub categories: u64,
}

/// A Wasm module was uploaded, compiled and described. Stream `module/<hash>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModuleRegistered {
    #[schema(value_type = String)]
    pub hash: BlobHash,
    pub size: u64,
    /// `reward` or `filter`.
    pub kind: String,
    /// The module's own name and version, from `describe`.
    pub name: String,
    pub version: String,
    pub summary: String,
    pub parameters_schema: String,
    /// Interfaces it imports; the host capabilities among them must be granted by jobs.
    pub imports: Vec<String>,
    pub capabilities: Vec<String>,
}

/// A registry name now points at `hash`. Stream `module/<alias>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModuleAliasSet {
    pub alias: String,
    #[schema(value_type = String)]
    pub hash: BlobHash,
    #[schema(value_type = Option<String>)]
    pub previous: Option<BlobHash>,
}

/// The typed result of a succeeded job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum JobResult {
    Ingest(IngestResult),
    Score(crate::score::ScoreOutput),
    Mine(crate::mine::MineOutput),
    BuildDataset(BuildDatasetResult),
    Eval(crate::eval::EvalOutput),
}

/// A build-dataset result: the output plus the dataset id the server minted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BuildDatasetResult {
    pub dataset: DatasetId,
    #[serde(flatten)]
    pub output: crate::dataset::BuildDatasetOutput,
}

impl JobResult {
    /// Blobs the job produced.
    pub fn blobs(&self) -> Vec<BlobHash> {
        match self {
            JobResult::Ingest(r) => vec![r.output.manifest],
            JobResult::Score(s) => std::iter::once(s.results).chain(s.capability_log).collect(),
            JobResult::Mine(m) => vec![m.embeddings, m.candidates],
            JobResult::BuildDataset(b) => std::iter::once(b.output.manifest)
                .chain(b.output.exports.values().copied())
                .collect(),
            JobResult::Eval(e) => vec![e.samples],
        }
    }
}

/// What an executor reports when an ingest finishes; the server adds the dataset id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct IngestOutput {
    pub manifest: BlobHash,
    pub images: u64,
    pub instances: u64,
    pub categories: u64,
    /// Files that could not be ingested (at most [`IngestOutput::MAX_LISTED_REJECTS`] listed).
    pub rejected: Vec<RejectedFile>,
    pub rejected_total: u64,
}

impl IngestOutput {
    /// Keeps the event well under the log's record size limit.
    pub const MAX_LISTED_REJECTS: usize = 100;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct IngestResult {
    pub dataset: DatasetId,
    #[serde(flatten)]
    pub output: IngestOutput,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RejectedFile {
    pub path: String,
    pub error: String,
}

/// One line of a dataset manifest blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ManifestEntry {
    pub blob: BlobHash,
    /// Where the image came from, relative to the ingest source.
    pub path: String,
    pub category: String,
    pub instance: String,
    pub width: u32,
    pub height: u32,
    pub format: String,
    /// 64-bit perceptual (gradient) hash, hex, for near-duplicate detection.
    pub phash: String,
}

/// What an executor sends on completion, per kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum JobOutput {
    Ingest(IngestOutput),
    Score(crate::score::ScoreOutput),
    Mine(crate::mine::MineOutput),
    BuildDataset(crate::dataset::BuildDatasetOutput),
    Eval(crate::eval::EvalOutput),
}

impl JobOutput {
    pub fn kind(&self) -> crate::spec::JobKind {
        match self {
            JobOutput::Ingest(_) => crate::spec::JobKind::Ingest,
            JobOutput::Score(_) => crate::spec::JobKind::Score,
            JobOutput::Mine(_) => crate::spec::JobKind::Mine,
            JobOutput::BuildDataset(_) => crate::spec::JobKind::BuildDataset,
            JobOutput::Eval(_) => crate::spec::JobKind::Eval,
        }
    }
}

impl Event {
    /// Blobs this event refers to, for `verify` and lineage.
    pub fn blob_refs(&self) -> Vec<BlobHash> {
        match self {
            Event::JobArtefactRecorded(a) => vec![a.blob],
            Event::JobSucceeded(JobSucceeded { result, .. }) => result.blobs(),
            Event::DatasetRegistered(d) => vec![d.manifest],
            Event::ModuleRegistered(m) => vec![m.hash],
            Event::DatasetBuilt(d) => std::iter::once(d.output.manifest)
                .chain(d.output.exports.values().copied())
                .collect(),
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_round_trips_through_its_stored_form() {
        let e = Event::JobProgress(JobProgress {
            epoch: 3,
            message: "halfway".into(),
            fraction: Some(0.5),
            counters: BTreeMap::from([("images".into(), 10.0)]),
        });
        let (ty, v, bytes) = e.encode();
        assert_eq!((ty, v), ("job_progress", 1));
        assert_eq!(Event::decode(ty, v, &bytes), Ok(e));
    }

    #[test]
    fn unknown_and_future_events_are_refused_by_name() {
        assert_eq!(
            Event::decode("nope", 1, &[]),
            Err(DecodeError::UnknownType("nope".into()))
        );
        let err = Event::decode("job_started", 9, &[]).unwrap_err();
        assert!(err.to_string().contains("newer than this build"), "{err}");
    }

    #[test]
    fn event_type_names_are_unique() {
        let mut names: Vec<_> = SCHEMA_VERSIONS.iter().map(|(n, _)| *n).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), SCHEMA_VERSIONS.len());
    }
}
