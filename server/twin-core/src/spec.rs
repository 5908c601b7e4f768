//! Job submissions: the kinds of job, their typed specs, and validation that names the bad field.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use crate::dataset::BuildDatasetSpec;
pub use crate::eval::EvalSpec;
use crate::ids::{BlobHash, ExperimentId};
pub use crate::mine::MineSpec;
pub use crate::score::ScoreSpec;
pub use crate::train::TrainSpec;

/// Every kind of job the recipe has. The set is open: a kind is listed here as soon as it is
/// designed, and [`JobKind::is_built`] says whether this version can run it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    Ingest,
    Mine,
    BuildDataset,
    Eval,
    Score,
    Synthesize,
    Train,
}

impl JobKind {
    pub const ALL: [JobKind; 7] = [
        JobKind::Ingest,
        JobKind::Mine,
        JobKind::BuildDataset,
        JobKind::Eval,
        JobKind::Score,
        JobKind::Synthesize,
        JobKind::Train,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Ingest => "ingest",
            JobKind::Mine => "mine",
            JobKind::BuildDataset => "build-dataset",
            JobKind::Eval => "eval",
            JobKind::Score => "score",
            JobKind::Synthesize => "synthesize",
            JobKind::Train => "train",
        }
    }

    /// Whether this version has a spec and a stage for the kind.
    pub fn is_built(self) -> bool {
        matches!(
            self,
            JobKind::Ingest
                | JobKind::Score
                | JobKind::Mine
                | JobKind::BuildDataset
                | JobKind::Eval
                | JobKind::Train
        )
    }

    pub fn parse(s: &str) -> Option<JobKind> {
        JobKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The submission fields (dotted, from the submission's root) that name a file or directory
    /// on the executor's file system. The server refuses any of them that is not absolute, and
    /// the CLI makes relative ones absolute against the spec file's directory first, so a spec
    /// means the same wherever it is submitted from and whatever directory the executor runs
    /// in. A kind that adds a path field lists it here; the match has no catch-all so that a new
    /// kind has to say.
    pub fn host_path_fields(self) -> &'static [&'static str] {
        match self {
            JobKind::Ingest => &["spec.source.dir", "spec.source.manifest"],
            JobKind::Mine => &[],
            JobKind::Eval => &["spec.data.questions"],
            JobKind::BuildDataset | JobKind::Score => &[],
            JobKind::Synthesize | JobKind::Train => &[],
        }
    }

    /// The submission fields that name a model: a registered one by name or manifest hash
    /// (pinned to the hash at submission), or a checkpoint directory on the executor, told apart
    /// by [`crate::model::ModelRef::parse`]. A path is checked and resolved as the
    /// [`JobKind::host_path_fields`] are.
    pub fn model_fields(self) -> &'static [&'static str] {
        match self {
            JobKind::Mine | JobKind::Eval | JobKind::Train => &["spec.model"],
            JobKind::Ingest | JobKind::BuildDataset | JobKind::Score => &[],
            JobKind::Synthesize => &[],
        }
    }
}

/// A dotted submission field (`spec.source.dir`) as a JSON pointer (`/spec/source/dir`).
pub fn field_pointer(field: &str) -> String {
    field.split('.').fold(String::new(), |mut p, part| {
        p.push('/');
        p.push_str(part);
        p
    })
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The typed spec of a job, one variant per built kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum JobSpec {
    Ingest(IngestSpec),
    Score(ScoreSpec),
    Mine(MineSpec),
    BuildDataset(BuildDatasetSpec),
    /// Boxed: the largest spec, and submissions travel inside every `job_submitted` event.
    Eval(Box<EvalSpec>),
    Train(Box<TrainSpec>),
}

impl JobSpec {
    pub fn kind(&self) -> JobKind {
        match self {
            JobSpec::Ingest(_) => JobKind::Ingest,
            JobSpec::Score(_) => JobKind::Score,
            JobSpec::Mine(_) => JobKind::Mine,
            JobSpec::BuildDataset(_) => JobKind::BuildDataset,
            JobSpec::Eval(_) => JobKind::Eval,
            JobSpec::Train(_) => JobKind::Train,
        }
    }

    /// Blobs the job reads (its inputs, for lineage); module hashes once resolved.
    pub fn inputs(&self) -> Vec<BlobHash> {
        match self {
            JobSpec::Ingest(i) => match i.source {
                IngestSource::Blobs(listing) => vec![listing],
                IngestSource::Dir(_) | IngestSource::Manifest(_) => Vec::new(),
            },
            JobSpec::Score(s) => std::iter::once(s.rollouts)
                .chain(s.reward.terms().into_iter().filter_map(|t| t.module_hash))
                .collect(),
            JobSpec::Mine(m) => m
                .manifest
                .into_iter()
                .chain(m.model_manifest)
                .chain(m.filters.iter().filter_map(|f| f.module_hash))
                .collect(),
            JobSpec::BuildDataset(b) => b
                .manifest
                .into_iter()
                .chain(b.hard_negatives)
                .chain(b.synthetic.iter().copied())
                .collect(),
            JobSpec::Eval(e) => e.inputs(),
            JobSpec::Train(t) => t.inputs(),
        }
    }
}

// Its schema is a discriminated union on `kind`, written by hand (see [`crate::schema`]): each
// branch, `IngestJobSpec` and so on, lists `kind` among its own properties.
crate::schema::kind_tagged_schema!(
    JobSpec,
    "The typed spec of a job, one variant per built kind, told apart by `kind`.",
    Ingest(IngestSpec) = "IngestJobSpec",
    Score(ScoreSpec) = "ScoreJobSpec",
    Mine(MineSpec) = "MineJobSpec",
    BuildDataset(BuildDatasetSpec) = "BuildDatasetJobSpec",
    Eval(EvalSpec) = "EvalJobSpec",
    Train(TrainSpec) = "TrainJobSpec",
);

/// Ingest images into the blob store and register them as a dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IngestSpec {
    /// Name of the dataset to register (1..=64 of a-z, 0-9, `-`, `_`).
    pub dataset: String,
    /// Where the images are: uploaded blobs, or paths on the executor's file system (read only
    /// under its allowed roots).
    pub source: IngestSource,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum IngestSource {
    /// A tree `<category>/<instance>/<image>.{jpg,jpeg,png,webp}`; an absolute path on the
    /// executor.
    Dir(String),
    /// A JSONL file of `{"path", "instance", "category"}` lines; relative paths are resolved
    /// against the manifest's directory. An absolute path on the executor.
    Manifest(String),
    /// Images uploaded to the blob store: a blob of [`UploadedImage`] JSON lines. What `twin
    /// submit` sends for a `dir` or `manifest` on the submitter's machine, so an executor needs
    /// no allowed roots.
    Blobs(BlobHash),
}

/// One line of an [`IngestSource::Blobs`] listing: an uploaded image and its labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadedImage {
    pub blob: BlobHash,
    /// Where it was on the submitter's machine, relative to the directory or manifest given
    /// (the dataset's manifest keeps it).
    pub path: String,
    pub instance: String,
    pub category: String,
}

/// What a GPU count or label set an executor must offer to lease the job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Requirements {
    pub gpus: u32,
    pub labels: BTreeSet<String>,
}

/// How failed attempts are retried: delay = min(initial * 2^(attempt-1), max).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff_initial_ms: 1_000,
            backoff_max_ms: 60_000,
        }
    }
}

impl RetryPolicy {
    pub const MAX_BACKOFF_MS: u64 = 86_400_000;

    /// Delay before attempt `failed_attempt + 1`, after `failed_attempt` (1-based) failed.
    pub fn backoff_ms(&self, failed_attempt: u32) -> u64 {
        let exp = failed_attempt.saturating_sub(1).min(32);
        self.backoff_initial_ms
            .saturating_mul(1u64 << exp)
            .min(self.backoff_max_ms)
    }
}

/// A job as submitted: a spec plus scheduling metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobSubmission {
    #[serde(default)]
    pub experiment: Option<ExperimentId>,
    /// Higher runs first; ties go to the oldest submission.
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub requirements: Requirements,
    #[serde(default)]
    pub retry: RetryPolicy,
    pub spec: JobSpec,
}

/// A submission that cannot be accepted. `field` is a dotted path into the submitted document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error(
        "spec.kind: job kind `{0}` is not built in this version (built: ingest, score, mine, build-dataset, eval, train)"
    )]
    KindNotBuilt(String),
    #[error(
        "spec.kind: unknown job kind `{0}` (known: ingest, mine, build-dataset, eval, score, synthesize, train)"
    )]
    UnknownKind(String),
}

impl SpecError {
    pub(crate) fn invalid(field: &str, message: impl Into<String>) -> Self {
        SpecError::Invalid {
            field: field.to_owned(),
            message: message.into(),
        }
    }

    pub fn field(&self) -> &str {
        match self {
            SpecError::Invalid { field, .. } => field,
            _ => "spec.kind",
        }
    }
}

const SUBMISSION_FIELDS: [&str; 5] = ["experiment", "priority", "requirements", "retry", "spec"];

impl JobSubmission {
    /// Parses and validates a submission from JSON, naming the first bad field.
    pub fn from_json(value: serde_json::Value) -> Result<Self, SpecError> {
        let obj = value
            .as_object()
            .ok_or_else(|| SpecError::invalid("(body)", "expected a JSON object"))?;
        if let Some(unknown) = obj
            .keys()
            .find(|k| !SUBMISSION_FIELDS.contains(&k.as_str()))
        {
            return Err(SpecError::invalid(unknown, "unknown field"));
        }
        let spec = obj
            .get("spec")
            .ok_or_else(|| SpecError::invalid("spec", "missing field"))?;
        let kind = spec
            .get("kind")
            .ok_or_else(|| SpecError::invalid("spec.kind", "missing field"))?
            .as_str()
            .ok_or_else(|| SpecError::invalid("spec.kind", "expected a string"))?;
        let kind = match JobKind::parse(kind) {
            None => return Err(SpecError::UnknownKind(kind.to_owned())),
            Some(k) if !k.is_built() => return Err(SpecError::KindNotBuilt(kind.to_owned())),
            Some(k) => k,
        };
        for field in kind.host_path_fields() {
            if let Some(path) = value.pointer(&field_pointer(field)) {
                check_host_path(field, path)?;
            }
        }
        for field in kind.model_fields() {
            if let Some(model) = value.pointer(&field_pointer(field)) {
                check_model_ref(field, model)?;
            }
        }
        let submission: JobSubmission = serde_path_to_error::deserialize(&value).map_err(|e| {
            let path = e.path().to_string();
            let message = e.into_inner().to_string();
            // Inside the internally tagged spec serde loses the path; the kind's own struct,
            // read alone, finds it.
            if path == "spec"
                && let Some(precise) = spec_error(kind, spec)
            {
                return precise;
            }
            SpecError::Invalid {
                field: field_of(&path, &message),
                message,
            }
        })?;
        submission.validate()?;
        Ok(submission)
    }

    pub fn kind(&self) -> JobKind {
        self.spec.kind()
    }

    /// Checks the rules serde cannot express.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.retry.max_attempts == 0 || self.retry.max_attempts > 100 {
            return Err(SpecError::invalid(
                "retry.max_attempts",
                "must be between 1 and 100",
            ));
        }
        if self.retry.backoff_max_ms > RetryPolicy::MAX_BACKOFF_MS {
            return Err(SpecError::invalid(
                "retry.backoff_max_ms",
                "must be at most 86400000 (one day)",
            ));
        }
        if self.retry.backoff_initial_ms > self.retry.backoff_max_ms {
            return Err(SpecError::invalid(
                "retry.backoff_initial_ms",
                "must not exceed retry.backoff_max_ms",
            ));
        }
        for label in &self.requirements.labels {
            if label.is_empty() || label.len() > 64 {
                return Err(SpecError::invalid(
                    "requirements.labels",
                    "labels are 1 to 64 bytes",
                ));
            }
        }
        match &self.spec {
            JobSpec::Ingest(spec) => spec.validate(),
            JobSpec::Score(spec) => spec.validate(),
            JobSpec::Mine(spec) => spec.validate(),
            JobSpec::BuildDataset(spec) => spec.validate(),
            JobSpec::Eval(spec) => spec.validate(),
            JobSpec::Train(spec) => spec.validate(),
        }
    }
}

/// A path on the executor must be an absolute path: resolved against the executor's working
/// directory, a relative one would mean something else on every machine.
fn check_host_path(field: &str, path: &serde_json::Value) -> Result<(), SpecError> {
    let Some(path) = path.as_str() else {
        return Err(SpecError::invalid(field, "expected a string (a path)"));
    };
    if path.is_empty() {
        return Err(SpecError::invalid(field, "must not be empty"));
    }
    if !path.starts_with('/') {
        return Err(SpecError::invalid(
            field,
            format!(
                "must be an absolute path on the executor, got `{path}` (`twin submit` \
                 resolves relative paths against the spec file)"
            ),
        ));
    }
    Ok(())
}

fn check_model_ref(field: &str, value: &serde_json::Value) -> Result<(), SpecError> {
    let Some(model) = value.as_str() else {
        return Err(SpecError::invalid(
            field,
            "expected a string (a registered model's name or hash, or a path)",
        ));
    };
    if model.is_empty() {
        return Err(SpecError::invalid(field, "must not be empty"));
    }
    match crate::model::ModelRef::parse(model) {
        crate::model::ModelRef::Path(_) => check_host_path(field, value),
        crate::model::ModelRef::Registered(r)
            if r.parse::<BlobHash>().is_ok() || crate::model::valid_model_name(r) =>
        {
            Ok(())
        }
        crate::model::ModelRef::Registered(r) => Err(SpecError::invalid(
            field,
            format!(
                "`{r}` is neither a model name (a-z, 0-9, `-`, `_`, `.`), a manifest hash nor a \
                 path (a path has a `/`: write `./{r}` for a directory beside the spec)"
            ),
        )),
    }
}

/// The error of reading `spec` (without its `kind`) as `kind`'s spec, at its path under `spec`.
fn spec_error(kind: JobKind, spec: &serde_json::Value) -> Option<SpecError> {
    fn read<T: serde::de::DeserializeOwned>(body: &serde_json::Value) -> Option<SpecError> {
        let e = serde_path_to_error::deserialize::<_, T>(body).err()?;
        let path = match e.path().to_string() {
            p if p == "." => "spec".to_owned(),
            p => format!("spec.{p}"),
        };
        let message = e.into_inner().to_string();
        Some(SpecError::Invalid {
            field: field_of(&path, &message),
            message,
        })
    }
    let mut body = spec.clone();
    body.as_object_mut()?.remove("kind");
    match kind {
        JobKind::Ingest => read::<IngestSpec>(&body),
        JobKind::Score => read::<ScoreSpec>(&body),
        JobKind::Mine => read::<MineSpec>(&body),
        JobKind::BuildDataset => read::<BuildDatasetSpec>(&body),
        JobKind::Eval => read::<EvalSpec>(&body),
        JobKind::Train => read::<TrainSpec>(&body),
        JobKind::Synthesize => None,
    }
}

/// serde reports a missing or unknown field at its parent's path; name the field itself.
fn field_of(path: &str, message: &str) -> String {
    let named = ["missing field `", "unknown field `"]
        .iter()
        .find_map(|p| message.strip_prefix(p))
        .and_then(|rest| rest.split('`').next());
    match (path, named) {
        // serde_path_to_error already ends the path with an unknown field's name.
        (p, Some(f)) if p.ends_with(&format!(".{f}")) => p.to_owned(),
        (".", Some(f)) => f.to_owned(),
        (".", None) => "(body)".to_owned(),
        (p, Some(f)) => format!("{p}.{f}"),
        (p, None) => p.to_owned(),
    }
}

/// Dataset names: 1 to 64 characters from a-z, 0-9, `-` and `_`.
pub(crate) fn valid_name(name: &str) -> bool {
    name.parse::<crate::ids::DatasetId>().is_ok()
}

impl IngestSpec {
    fn validate(&self) -> Result<(), SpecError> {
        if self.dataset.parse::<crate::ids::DatasetId>().is_err() {
            return Err(SpecError::invalid(
                "spec.dataset",
                "use 1 to 64 characters from a-z, 0-9, `-` and `_`",
            ));
        }
        // `source`'s paths are checked with every kind's (`JobKind::host_path_fields`).
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(input: serde_json::Value, expect: Result<(), &str>) {
        let got = JobSubmission::from_json(input)
            .map(|_| ())
            .map_err(|e| e.to_string());
        match (got, expect) {
            (Ok(()), Ok(())) => {}
            (Err(e), Err(want)) => assert!(e.contains(want), "error {e:?} should contain {want:?}"),
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }

    fn ingest() -> serde_json::Value {
        json!({"spec": {"kind": "ingest", "dataset": "shoes", "source": {"dir": "/data/shoes"}}})
    }

    #[test]
    fn a_minimal_ingest_is_valid_with_defaults() {
        let s = JobSubmission::from_json(ingest()).expect("valid");
        assert_eq!(s.retry, RetryPolicy::default());
        assert_eq!(s.kind(), JobKind::Ingest);
    }

    /// A valid submission of each built kind whose spec names every path field it has.
    fn with_every_path(kind: JobKind) -> Vec<serde_json::Value> {
        let h = "ab".repeat(32);
        match kind {
            JobKind::Ingest => vec![
                json!({"spec": {"kind": "ingest", "dataset": "x", "source": {"dir": "/d"}}}),
                json!({"spec": {"kind": "ingest", "dataset": "x", "source": {"manifest": "/m"}}}),
            ],
            JobKind::Mine => vec![json!({"spec": {"kind": "mine", "dataset": "d", "model": "/m"}})],
            JobKind::Eval => vec![json!({"spec": {
                "kind": "eval", "model": "/m", "data": {"questions": "/q.jsonl"}}})],
            JobKind::BuildDataset => vec![json!({"spec": {
                "kind": "build-dataset", "name": "p", "dataset": "d", "mines": []}})],
            JobKind::Score => vec![json!({"spec": {
                "kind": "score", "rollouts": h, "reward": {"module": "m"}}})],
            JobKind::Train => vec![json!({"spec": {
                "kind": "train", "dataset": "pairs", "model": "/m"}})],
            JobKind::Synthesize => Vec::new(),
        }
    }

    #[test]
    fn every_path_field_is_a_real_field_and_must_be_absolute() {
        for kind in JobKind::ALL.into_iter().filter(|k| k.is_built()) {
            let examples = with_every_path(kind);
            for example in &examples {
                check(example.clone(), Ok(()));
            }
            for field in kind.host_path_fields() {
                let pointer = field_pointer(field);
                let mut uses = 0;
                for example in &examples {
                    let mut relative = example.clone();
                    let Some(slot) = relative.pointer_mut(&pointer) else {
                        continue;
                    };
                    uses += 1;
                    *slot = json!("models/clip");
                    check(
                        relative.clone(),
                        Err(&format!("{field}: must be an absolute path")),
                    );
                    *relative.pointer_mut(&pointer).expect("just found") = json!("");
                    check(relative, Err(&format!("{field}: must not be empty")));
                }
                assert!(
                    uses > 0,
                    "{field} ({kind}) is in no example: is it a field?"
                );
            }
            for field in kind.model_fields() {
                let pointer = field_pointer(field);
                let mut uses = 0;
                for example in &examples {
                    let mut named = example.clone();
                    if named.pointer(&pointer).is_none() {
                        continue;
                    }
                    uses += 1;
                    for ok in ["clip-b32", "ab".repeat(32).as_str(), "/abs/clip"] {
                        *named.pointer_mut(&pointer).expect("found") = json!(ok);
                        check(named.clone(), Ok(()));
                    }
                    for (bad, message) in [
                        ("models/clip", "must be an absolute path"),
                        ("./clip", "must be an absolute path"),
                        ("Bad Name", "`Bad Name` is neither a model name"),
                        ("", "must not be empty"),
                    ] {
                        *named.pointer_mut(&pointer).expect("found") = json!(bad);
                        check(named.clone(), Err(&format!("{field}: {message}")));
                    }
                }
                assert!(uses > 0, "{field} ({kind}) is in no example");
            }
        }
    }

    #[test]
    fn bad_submissions_name_the_field() {
        check(
            json!({"spec": {"kind": "ingest", "dataset": "x"}}),
            Err("spec.source"),
        );
        check(
            json!({"spec": {"kind": "ingest", "dataset": "Bad Name", "source": {"dir": "/d"}}}),
            Err("spec.dataset"),
        );
        check(
            json!({"spec": {"kind": "ingest", "dataset": "x", "source": {"dir": "rel"}}}),
            Err("spec.source.dir"),
        );
        check(
            json!({"spec": {"kind": "ingest", "dataset": "x", "source": {"dir": "/d"}, "extra": 1}}),
            Err("extra"),
        );
        check(
            json!({"spec": {"kind": "ingest", "dataset": "x", "source": {"dir": "/d"}}, "priority": "high"}),
            Err("priority"),
        );
        check(
            json!({"spec": {"kind": "ingest", "dataset": "x", "source": {"dir": "/d"}}, "retry": {"max_attempts": 0}}),
            Err("retry.max_attempts"),
        );
        check(
            json!({"spec": {"kind": "ingest", "dataset": "x", "source": {"dir": "/d"}}, "colour": 1}),
            Err("colour: unknown field"),
        );
        check(
            json!({"spec": {"kind": "mine", "dataset": "d", "model": "/m", "k": "ten"}}),
            Err("spec.k: invalid type"),
        );
        check(
            json!({"spec": {"kind": "eval", "model": "/m", "data": {"built": "d"}, "max_new_tokens": -1}}),
            Err("spec.max_new_tokens: invalid value"),
        );
        check(json!({"spec": {}}), Err("spec.kind: missing"));
        check(json!([]), Err("(body)"));
    }

    #[test]
    fn kinds_not_built_are_told_apart_from_unknown_kinds() {
        check(
            json!({"spec": {"kind": "synthesize"}}),
            Err("not built in this version"),
        );
        check(
            json!({"spec": {"kind": "dance"}}),
            Err("unknown job kind `dance`"),
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy {
            max_attempts: 5,
            backoff_initial_ms: 100,
            backoff_max_ms: 350,
        };
        assert_eq!([1, 2, 3, 4].map(|a| p.backoff_ms(a)), [100, 200, 350, 350]);
    }
}
