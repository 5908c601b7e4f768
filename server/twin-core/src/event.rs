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
use crate::failure::FailureCode;
use crate::ids::{BlobHash, DatasetId, ExperimentId, JobId, Millis};
use crate::mine::CandidateReviewed;
use crate::spec::JobSubmission;
use crate::train::{TrainStep, TrainValidation};

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

/// One committed event with its log coordinates, as projections and clients see it. Its schema
/// is written by hand, below the `events!` list.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
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

// `$name` is a `tt`, not a `literal`: a `literal` fragment reaches derive macros wrapped in an
// invisible group, which utoipa's attribute parser does not see through, so the document named
// the types after the variants (`ExperimentCreated`) while serde sends `experiment_created`.
macro_rules! events {
    ($($variant:ident($payload:ident) = $name:tt v $version:literal;)*) => {
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

        impl Event {
            /// Each event type, for [`RecordedEvent`]'s schema.
            fn schema_types() -> Vec<EventSchemaType> {
                vec![$(EventSchemaType {
                    name: $name,
                    component: concat!("Recorded", stringify!($variant)),
                    payload: <$payload as utoipa::ToSchema>::name(),
                    register: |out| {
                        out.push((
                            <$payload as utoipa::ToSchema>::name().into_owned(),
                            <$payload as utoipa::PartialSchema>::schema(),
                        ));
                        <$payload as utoipa::ToSchema>::schemas(out);
                    },
                },)*]
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
    JobAttemptFailed(JobAttemptFailed) = "job_attempt_failed" v 2;
    JobLeaseExpired(JobLeaseExpired) = "job_lease_expired" v 1;
    JobLeaseReleased(JobLeaseReleased) = "job_lease_released" v 1;
    JobCancelRequested(JobCancelRequested) = "job_cancel_requested" v 1;
    JobCancelled(JobCancelled) = "job_cancelled" v 1;
    DatasetRegistered(DatasetRegistered) = "dataset_registered" v 1;
    ModuleRegistered(ModuleRegistered) = "module_registered" v 1;
    ModuleAliasSet(ModuleAliasSet) = "module_alias_set" v 1;
    CandidateReviewed(CandidateReviewed) = "candidate_reviewed" v 1;
    DatasetBuilt(DatasetBuilt) = "dataset_built" v 1;
    ModelRegistered(ModelRegistered) = "model_registered" v 1;
    ModelAliasSet(ModelAliasSet) = "model_alias_set" v 1;
    TrainStep(TrainStep) = "train_step" v 1;
    TrainValidation(TrainValidation) = "train_validation" v 1;
}

/// One event type as [`RecordedEvent`]'s schema lists it.
struct EventSchemaType {
    /// The type name serde writes (`experiment_created`).
    name: &'static str,
    /// The component of a recorded event of this type (`RecordedExperimentCreated`).
    component: &'static str,
    /// The payload's component (`ExperimentCreated`).
    payload: std::borrow::Cow<'static, str>,
    /// Registers the payload's component and what it refers to.
    register: fn(&mut crate::schema::Schemas),
}

// A recorded event's schema, written by hand. serde flattens the event's `{type, data}` beside
// the log coordinates; the derive renders that as `allOf` of the coordinates and the event union,
// which openapi-python-client cannot take. Here each event type has its own component,
// `Recorded<Type>`: the coordinates, `type` (one value) and `data`, and the union discriminates
// on `type`.
impl utoipa::PartialSchema for RecordedEvent {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{Discriminator, OneOfBuilder, Ref};
        let types = Event::schema_types();
        let mapping = types
            .iter()
            .map(|t| (t.name, format!("#/components/schemas/{}", t.component)));
        let mut union = OneOfBuilder::new()
            .description(Some(
                "One committed event with its log coordinates, told apart by `type`.",
            ))
            .discriminator(Some(Discriminator::with_mapping("type", mapping)));
        for t in &types {
            union = union.item(Ref::from_schema_name(t.component));
        }
        union.into()
    }
}

impl utoipa::ToSchema for RecordedEvent {
    fn schemas(schemas: &mut crate::schema::Schemas) {
        use utoipa::PartialSchema;
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, Ref, SchemaFormat, Type};
        for t in Event::schema_types() {
            let branch = ObjectBuilder::new()
                .property("seq", u64::schema())
                .required("seq")
                .property(
                    "ts",
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
                        .description(Some("Commit time, milliseconds since the Unix epoch.")),
                )
                .required("ts")
                .property("stream", String::schema())
                .required("stream")
                .property("stream_version", u64::schema())
                .required("stream_version")
                .property("actor", String::schema())
                .required("actor")
                .property("hash", Ref::from_schema_name(BlobHash::name()))
                .required("hash")
                .property(
                    "type",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .enum_values(Some([t.name])),
                )
                .required("type")
                .property("data", Ref::from_schema_name(t.payload.clone()))
                .required("data");
            schemas.push((t.component.to_owned(), branch.into()));
            (t.register)(schemas);
        }
        schemas.push((BlobHash::name().into_owned(), BlobHash::schema()));
        BlobHash::schemas(schemas);
    }
}

/// Upcasters of the production schema, one per version step. `twin-log/tests/schema.rs` reads
/// the committed logs under `twin-log/tests/fixtures` through them.
pub const UPCASTERS: &[Upcaster] = &[Upcaster {
    event_type: "job_attempt_failed",
    from_version: 1,
    upcast: job_attempt_failed_v1_to_v2,
}];

/// v2 added `code` and `detail`. A v1 failure was never classified, and saying so is the only
/// honest reading: guessing a code from the message would put words in an old executor's mouth.
fn job_attempt_failed_v1_to_v2(mut doc: serde_json::Value) -> Result<serde_json::Value, String> {
    let fields = doc
        .as_object_mut()
        .ok_or("a job_attempt_failed payload is a map")?;
    fields.insert(
        "code".into(),
        serde_json::to_value(FailureCode::Unclassified).map_err(|e| e.to_string())?,
    );
    fields.insert("detail".into(), serde_json::Value::Null);
    Ok(doc)
}

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
///
/// Schema v2 added `code` and `detail`; v1 records read as `unclassified` with no detail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobAttemptFailed {
    pub epoch: u64,
    pub error: String,
    pub retryable: bool,
    pub retry_at: Option<Millis>,
    /// What kind of failure it was, from the closed list.
    pub code: FailureCode,
    /// More for programs: a module's own error code, the request that failed.
    pub detail: Option<String>,
}

/// The lease of `epoch` ran out without a heartbeat (its executor died or stopped answering):
/// the attempt ends as `executor_lost`, with the failure retry rule plus the executor-loss limit
/// (`job::MAX_EXECUTOR_LOSSES`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobLeaseExpired {
    pub epoch: u64,
    pub retry_at: Option<Millis>,
}

/// The executor holding `epoch` gave the job back unfinished and unfailed (it is shutting
/// down, say). The job is queued again at once; the attempt counts against no limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobLeaseReleased {
    pub epoch: u64,
    pub reason: String,
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

/// A model's files and canonical manifest were stored and checked. Stream `model/<hash>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelRegistered {
    /// SHA-256 of the canonical manifest: the model's identity.
    #[schema(value_type = String)]
    pub hash: BlobHash,
    /// The manifest's files (path, size, SHA-256), in its order.
    pub files: Vec<crate::model::ModelFile>,
    /// Sum of the files' sizes.
    pub bytes: u64,
    pub kind: crate::model::ModelKind,
    /// The job that wrote the checkpoint, when a job did (training).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub job: Option<JobId>,
}

/// A model name now points at `hash`. Stream `model/<alias>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelAliasSet {
    pub alias: String,
    #[schema(value_type = String)]
    pub hash: BlobHash,
    #[schema(value_type = Option<String>)]
    pub previous: Option<BlobHash>,
}

/// The typed result of a succeeded job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum JobResult {
    Ingest(IngestResult),
    Score(crate::score::ScoreOutput),
    Mine(crate::mine::MineOutput),
    BuildDataset(BuildDatasetResult),
    Eval(crate::eval::EvalOutput),
    Train(crate::train::TrainOutput),
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
            JobResult::Mine(m) => [m.embeddings, m.candidates]
                .into_iter()
                .chain(m.model_manifest)
                .collect(),
            JobResult::BuildDataset(b) => std::iter::once(b.output.manifest)
                .chain(b.output.exports.values().copied())
                .collect(),
            JobResult::Eval(e) => std::iter::once(e.samples).chain(e.model_manifest).collect(),
            JobResult::Train(t) => t.blobs(),
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum JobOutput {
    Ingest(IngestOutput),
    Score(crate::score::ScoreOutput),
    Mine(crate::mine::MineOutput),
    BuildDataset(crate::dataset::BuildDatasetOutput),
    Eval(crate::eval::EvalOutput),
    Train(crate::train::TrainOutput),
}

impl JobOutput {
    pub fn kind(&self) -> crate::spec::JobKind {
        match self {
            JobOutput::Ingest(_) => crate::spec::JobKind::Ingest,
            JobOutput::Score(_) => crate::spec::JobKind::Score,
            JobOutput::Mine(_) => crate::spec::JobKind::Mine,
            JobOutput::BuildDataset(_) => crate::spec::JobKind::BuildDataset,
            JobOutput::Eval(_) => crate::spec::JobKind::Eval,
            JobOutput::Train(_) => crate::spec::JobKind::Train,
        }
    }
}

// Both unions' schemas are written by hand, discriminated on `kind` (see [`crate::schema`]).
crate::schema::kind_tagged_schema!(
    JobResult,
    "The typed result of a succeeded job, told apart by `kind`.",
    Ingest(IngestResult) = "IngestJobResult",
    Score(crate::score::ScoreOutput) = "ScoreJobResult",
    Mine(crate::mine::MineOutput) = "MineJobResult",
    BuildDataset(BuildDatasetResult) = "BuildDatasetJobResult",
    Eval(crate::eval::EvalOutput) = "EvalJobResult",
    Train(crate::train::TrainOutput) = "TrainJobResult",
);

crate::schema::kind_tagged_schema!(
    JobOutput,
    "What an executor sends on completion, told apart by `kind`.",
    Ingest(IngestOutput) = "IngestJobOutput",
    Score(crate::score::ScoreOutput) = "ScoreJobOutput",
    Mine(crate::mine::MineOutput) = "MineJobOutput",
    BuildDataset(crate::dataset::BuildDatasetOutput) = "BuildDatasetJobOutput",
    Eval(crate::eval::EvalOutput) = "EvalJobOutput",
    Train(crate::train::TrainOutput) = "TrainJobOutput",
);

impl Event {
    /// Blobs this event refers to, for `verify` and lineage.
    pub fn blob_refs(&self) -> Vec<BlobHash> {
        match self {
            Event::JobArtefactRecorded(a) => vec![a.blob],
            Event::JobSucceeded(JobSucceeded { result, .. }) => result.blobs(),
            Event::DatasetRegistered(d) => vec![d.manifest],
            Event::ModuleRegistered(m) => vec![m.hash],
            Event::ModelRegistered(m) => std::iter::once(m.hash)
                .chain(m.files.iter().map(|f| f.sha256))
                .collect(),
            Event::DatasetBuilt(d) => std::iter::once(d.output.manifest)
                .chain(d.output.exports.values().copied())
                .collect(),
            Event::TrainStep(s) => s.rollouts.into_iter().collect(),
            Event::TrainValidation(v) => vec![v.samples],
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

    /// The v1 payload exactly as the previous build encoded it.
    #[derive(Serialize)]
    struct JobAttemptFailedV1 {
        epoch: u64,
        error: String,
        retryable: bool,
        retry_at: Option<Millis>,
    }

    #[test]
    fn a_v1_attempt_failure_reads_as_unclassified_with_its_message_intact() {
        let v1 = encode_payload(&JobAttemptFailedV1 {
            epoch: 2,
            error: "device lost".into(),
            retryable: true,
            retry_at: Some(1_000),
        });
        assert_eq!(
            Event::decode("job_attempt_failed", 1, &v1),
            Ok(Event::JobAttemptFailed(JobAttemptFailed {
                epoch: 2,
                error: "device lost".into(),
                retryable: true,
                retry_at: Some(1_000),
                code: FailureCode::Unclassified,
                detail: None,
            }))
        );
    }

    #[test]
    fn a_v2_attempt_failure_keeps_its_code_and_detail() {
        let e = Event::JobAttemptFailed(JobAttemptFailed {
            epoch: 1,
            error: "reward trapped".into(),
            retryable: false,
            retry_at: None,
            code: FailureCode::ModuleError,
            detail: Some("guest_trap".into()),
        });
        let (ty, v, bytes) = e.encode();
        assert_eq!((ty, v), ("job_attempt_failed", 2));
        assert_eq!(Event::decode(ty, v, &bytes), Ok(e));
    }

    #[test]
    fn every_older_version_has_a_chain_of_upcasters_to_the_current_one() {
        for (name, current) in SCHEMA_VERSIONS {
            for from in 1..*current {
                assert!(
                    UPCASTERS
                        .iter()
                        .any(|u| u.event_type == *name && u.from_version == from),
                    "`{name}` has no upcaster from v{from}"
                );
            }
        }
        for u in UPCASTERS {
            let current = SCHEMA_VERSIONS.iter().find(|(n, _)| *n == u.event_type);
            assert!(
                current.is_some_and(|(_, v)| u.from_version < *v),
                "upcaster of `{}` from v{} leads past the current version",
                u.event_type,
                u.from_version
            );
        }
    }
}
