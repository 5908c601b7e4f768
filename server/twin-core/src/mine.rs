//! The `mine` job (hard-negative mining) and the review of its candidates.
//!
//! A mine job embeds every image of an ingested dataset with a CLIP checkpoint, retrieves each
//! image's nearest neighbours from other instances, and passes the pairs through the job's filter
//! modules. Filters either `require` (a "drop" verdict removes the pair) or `advise` (the verdict
//! is recorded and can drive bulk review or `auto_accept`). The surviving pairs are candidates; a
//! person accepts or rejects them (`CandidateReviewed` events on stream `review/<job>`), and the
//! accepted ones become a dataset's hard negatives.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::event::RejectedFile;
use crate::ids::{BlobHash, DatasetId, JobId};
use crate::score::{Grants, MAX_BATCH, MAX_NAME_BYTES, ModuleLimits, valid_module_name};
use crate::spec::SpecError;

/// Largest `batch_size`: images in one CLIP forward pass. A batch of 4096 224-px images is about
/// 2.5 GB of input alone; larger ones only exhaust a device.
pub const MAX_MINE_BATCH: u32 = 4096;

/// Largest `k`, neighbours per image. A mine job holds about images × k pairs (the default k is
/// 10).
pub const MAX_NEIGHBOURS: u32 = 1000;

/// Largest `hnsw.ef_construction` and `hnsw.ef_search`: both size each search's candidate list,
/// so time and memory grow with them (the default is 100).
pub const MAX_HNSW_EF: u32 = 4096;

/// Largest `recall_sample`: queries searched a second time exactly to measure HNSW's recall.
/// Over ten thousand queries the measured recall's standard error is below half a percent.
pub const MAX_RECALL_SAMPLE: u32 = 10_000;

/// Most filter modules in one mine job: each runs over every candidate pair.
pub const MAX_FILTERS: usize = 32;

/// Where the model runs. `auto` takes a GPU when the executor has one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ComputeDevice {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// Which images a query may be paired with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MineScope {
    /// Only images of the query's own category (the paper's setting).
    #[default]
    PerCategory,
    Global,
}

/// How neighbours are found. `auto` = exact search (a chunked matrix product), except for a
/// global search over more than 100k images on a CPU, where HNSW is cheaper.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SearchMethod {
    #[default]
    Auto,
    Hnsw,
    Exact,
}

/// Whether a filter's "drop" removes the pair or is only recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FilterMode {
    #[default]
    Require,
    Advise,
}

/// One filter module in a mine job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FilterStep {
    /// Name of the verdict in the candidates (defaults to `module`); at most 64 bytes.
    #[serde(default)]
    #[schema(max_length = 64)]
    pub name: String,
    /// Registry name or SHA-256 of a filter module.
    pub module: String,
    /// Set by the server: the hash `module` resolved to at submission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub module_hash: Option<BlobHash>,
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    #[serde(default)]
    pub mode: FilterMode,
}

impl FilterStep {
    pub fn label(&self) -> &str {
        if self.name.is_empty() {
            &self.module
        } else {
            &self.name
        }
    }
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

/// HNSW parameters (instant-distance); higher = better recall, slower build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct HnswParams {
    /// 1 to 4096; default 100.
    #[schema(minimum = 1, maximum = 4096)]
    pub ef_construction: u32,
    /// 1 to 4096; default 100.
    #[schema(minimum = 1, maximum = 4096)]
    pub ef_search: u32,
}

impl Default for HnswParams {
    fn default() -> Self {
        Self {
            ef_construction: 100,
            ef_search: 100,
        }
    }
}

/// Mine hard negatives from an ingested dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MineSpec {
    /// The ingested dataset: its name (latest registration) or id.
    pub dataset: String,
    /// Set by the server at submission: the dataset id and manifest `dataset` resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub dataset_id: Option<DatasetId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub manifest: Option<BlobHash>,
    /// The CLIP checkpoint (`CLIPModel` or `CLIPVisionModelWithProjection`; `config.json`,
    /// safetensors, `preprocessor_config.json`): a registered model's name or manifest hash
    /// (`twin models add`), or an absolute directory path on the executor.
    pub model: String,
    /// Set by the server at submission when `model` names a registered model: its manifest hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub model_manifest: Option<BlobHash>,
    #[serde(default)]
    pub device: ComputeDevice,
    /// Images per forward pass, 1 to 4096.
    #[serde(default = "default_batch")]
    #[schema(minimum = 1, maximum = 4096)]
    pub batch_size: u32,
    /// Neighbours per image, from other instances: 1 to 1000.
    #[serde(default = "default_k")]
    #[schema(minimum = 1, maximum = 1000)]
    pub k: u32,
    #[serde(default)]
    pub scope: MineScope,
    #[serde(default)]
    pub search: SearchMethod,
    #[serde(default)]
    pub hnsw: HnswParams,
    /// Build the index on one thread so the same seed gives the same neighbours.
    #[serde(default = "yes")]
    pub deterministic: bool,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Queries on which HNSW's recall@k is measured against exact search (0 = skip), at most
    /// 10000.
    #[serde(default = "default_recall_sample")]
    #[schema(maximum = 10000)]
    pub recall_sample: u32,
    /// At most 32 filters, applied in order.
    #[serde(default)]
    #[schema(max_items = 32)]
    pub filters: Vec<FilterStep>,
    /// Candidates this (advisory or required) filter keeps are accepted without review.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_accept: Option<String>,
    #[serde(default)]
    pub grants: Grants,
    #[serde(default)]
    pub limits: ModuleLimits,
    /// Candidate pairs per filter call, 1 to 4096.
    #[serde(default = "default_filter_batch")]
    #[schema(minimum = 1, maximum = 4096)]
    pub filter_batch: u32,
}

fn default_batch() -> u32 {
    32
}
fn default_k() -> u32 {
    10
}
fn yes() -> bool {
    true
}
fn default_seed() -> u64 {
    42
}
fn default_recall_sample() -> u32 {
    200
}
fn default_filter_batch() -> u32 {
    512
}

impl MineSpec {
    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        if self.dataset.is_empty() {
            return Err(SpecError::invalid("spec.dataset", "must not be empty"));
        }
        // `model` is checked as a path with every kind's (`JobKind::host_path_fields`).
        let between = |field: &str, value: u32, max: u32| {
            if (1..=max).contains(&value) {
                Ok(())
            } else {
                Err(SpecError::invalid(
                    field,
                    format!("must be between 1 and {max}, got {value}"),
                ))
            }
        };
        between("spec.batch_size", self.batch_size, MAX_MINE_BATCH)?;
        between("spec.k", self.k, MAX_NEIGHBOURS)?;
        between("spec.filter_batch", self.filter_batch, MAX_BATCH)?;
        between(
            "spec.hnsw.ef_construction",
            self.hnsw.ef_construction,
            MAX_HNSW_EF,
        )?;
        between("spec.hnsw.ef_search", self.hnsw.ef_search, MAX_HNSW_EF)?;
        if self.recall_sample > MAX_RECALL_SAMPLE {
            return Err(SpecError::invalid(
                "spec.recall_sample",
                format!(
                    "must be at most {MAX_RECALL_SAMPLE} (0 skips it), got {}",
                    self.recall_sample
                ),
            ));
        }
        if self.filters.len() > MAX_FILTERS {
            return Err(SpecError::invalid(
                "spec.filters",
                format!(
                    "must have at most {MAX_FILTERS} filters, got {}",
                    self.filters.len()
                ),
            ));
        }
        let mut names = BTreeSet::new();
        for (i, f) in self.filters.iter().enumerate() {
            let at = |field: &str| format!("spec.filters[{i}].{field}");
            if f.module.parse::<BlobHash>().is_err() && !valid_module_name(&f.module) {
                return Err(SpecError::invalid(
                    &at("module"),
                    "must be a registered module name or a SHA-256 hash",
                ));
            }
            if !f.params.is_object() {
                return Err(SpecError::invalid(&at("params"), "must be a JSON object"));
            }
            if f.label().len() > MAX_NAME_BYTES {
                return Err(SpecError::invalid(
                    &at("name"),
                    format!("must be at most {MAX_NAME_BYTES} bytes"),
                ));
            }
            if !names.insert(f.label().to_owned()) {
                return Err(SpecError::invalid(
                    &at("name"),
                    "filter names must be unique (set `name` to use a module twice)",
                ));
            }
        }
        if let Some(a) = &self.auto_accept
            && !names.contains(a.as_str())
        {
            return Err(SpecError::invalid(
                "spec.auto_accept",
                format!("`{a}` is not one of the job's filters"),
            ));
        }
        crate::score::check_grants(&self.grants)?;
        crate::score::check_limits(&self.limits)
    }
}

/// One image of a candidate pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PairImage {
    #[schema(value_type = String)]
    pub blob: BlobHash,
    /// Path relative to the ingest source.
    pub path: String,
    pub instance: String,
    pub category: String,
}

/// A filter's verdict on a candidate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FilterVerdict {
    pub filter: String,
    pub keep: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One line of a mine job's candidates blob: an unordered pair of images of different
/// instances, found as neighbours, with every filter's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Candidate {
    /// Stable id: the first 16 hex digits of SHA-256(`a.blob` + `b.blob`), `a` < `b`.
    pub id: String,
    pub a: PairImage,
    pub b: PairImage,
    /// Cosine similarity of the two embeddings.
    pub similarity: f64,
    /// Best rank of either image among the other's neighbours (0 = nearest).
    pub rank: u32,
    pub verdicts: Vec<FilterVerdict>,
    /// Kept by every required filter (only kept candidates are reviewed).
    pub kept: bool,
    /// Accepted by the job's `auto_accept` filter.
    #[serde(default)]
    pub auto_accepted: bool,
}

impl Candidate {
    /// The id of the unordered pair `{a, b}`.
    pub fn pair_id(a: &BlobHash, b: &BlobHash) -> String {
        let (lo, hi) = if a.to_string() <= b.to_string() {
            (a, b)
        } else {
            (b, a)
        };
        let joined = format!("{lo}{hi}");
        BlobHash::of(joined.as_bytes()).to_string()[..16].to_owned()
    }

    pub fn verdict(&self, filter: &str) -> Option<&FilterVerdict> {
        self.verdicts.iter().find(|v| v.filter == filter)
    }
}

/// Counts of one filter's verdicts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FilterSummary {
    #[schema(value_type = String)]
    pub module_hash: BlobHash,
    pub module_version: String,
    pub mode: FilterMode,
    pub kept: u64,
    pub dropped: u64,
    pub fuel_used: u64,
}

/// What a mine job reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MineOutput {
    /// SHA-256 over the checkpoint's weight files: the key of the embeddings.
    pub model_hash: String,
    /// The manifest of the checkpoint's files as loaded: the registered model's, or (for a
    /// directory path) one the executor wrote and uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub model_manifest: Option<BlobHash>,
    /// Embedding blob (see the executor's `embeddings` module for the format).
    #[schema(value_type = String)]
    pub embeddings: BlobHash,
    /// JSONL blob of [`Candidate`]s, sorted by id.
    #[schema(value_type = String)]
    pub candidates: BlobHash,
    pub images: u64,
    /// Embeddings reused from earlier jobs (same model and image).
    pub reused_embeddings: u64,
    /// Images that could not be decoded (listed up to 100).
    pub skipped: Vec<RejectedFile>,
    pub skipped_total: u64,
    pub search: SearchMethod,
    pub device: String,
    pub pairs: u64,
    pub kept: u64,
    pub auto_accepted: u64,
    /// HNSW recall@k against exact search on `recall_sample` queries (absent for exact search).
    pub recall_at_k: Option<f64>,
    pub filters: BTreeMap<String, FilterSummary>,
    /// Wall time of each phase, milliseconds.
    pub timings_ms: BTreeMap<String, u64>,
}

/// A person's (or an auto-accepting filter's) decision on a candidate.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Accept,
    Reject,
}

/// A candidate was accepted or rejected. Stream `review/<mine job>`; the event's actor is who.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CandidateReviewed {
    pub job: JobId,
    pub pair: String,
    pub verdict: Verdict,
    /// Free text from the reviewer, or how a bulk review selected the pair.
    #[serde(default)]
    pub note: String,
}

/// Review status of a candidate, as listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReviewStatus {
    Pending,
    Accepted,
    Rejected,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_ids_ignore_order() {
        let a = BlobHash::of(b"a");
        let b = BlobHash::of(b"b");
        assert_eq!(Candidate::pair_id(&a, &b), Candidate::pair_id(&b, &a));
        assert_eq!(Candidate::pair_id(&a, &b).len(), 16);
        assert_ne!(Candidate::pair_id(&a, &b), Candidate::pair_id(&a, &a));
    }
}
