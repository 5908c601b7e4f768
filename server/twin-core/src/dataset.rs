//! The `build-dataset` job: TWIN pair and multi questions from instances and hard negatives.
//!
//! The spec names an ingested dataset and the mine jobs whose accepted candidates are the hard
//! negatives. At submission the server pins both: the dataset's manifest, and a snapshot of the
//! accepted pairs as a blob (`hard_negatives`), so a review arriving later cannot change what a
//! queued job builds. The building itself (split, sampling, question texts, exports) lives in
//! `twin-data`; its options travel here as a JSON object, validated at submission as a
//! [`crate::build_config::BuildConfig`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{BlobHash, DatasetId, JobId};
use crate::spec::SpecError;

/// Most mine jobs one build names: the server reads every one's candidates into the
/// hard-negative snapshot at submission. A dataset is usually mined once or a few times.
pub const MAX_MINES: usize = 256;

/// Most synthetic-negative blobs one build names: the stage downloads and holds them all.
pub const MAX_SYNTHETIC_BLOBS: usize = 256;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildDatasetSpec {
    /// Name of the built dataset (1..=64 of a-z, 0-9, `-`, `_`).
    pub name: String,
    /// The ingested dataset whose instances give the positives: name or id.
    pub dataset: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub dataset_id: Option<DatasetId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub manifest: Option<BlobHash>,
    /// Succeeded mine jobs on the same dataset; their accepted candidates are the hard negatives.
    /// At most 256.
    #[serde(default)]
    #[schema(value_type = Vec<String>, max_items = 256)]
    pub mines: Vec<JobId>,
    /// Set by the server: JSONL snapshot of the accepted pairs (`{"pair","a","b","by"}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub hard_negatives: Option<BlobHash>,
    /// Synthetic negatives (JSONL blobs of `{"a","b"}` image hashes) — filled by the synthesis
    /// stage of a later version; accepted as given. At most 256.
    #[serde(default)]
    #[schema(value_type = Vec<String>, max_items = 256)]
    pub synthetic: Vec<BlobHash>,
    /// Building options (split, sampling, question counts): a [`crate::build_config::BuildConfig`]
    /// as a JSON object, absent fields taking their defaults. The bounds: `eval_fraction` in
    /// [0, 1); `positives_per_instance` 1 to 1000000; `random_negatives_per_instance` at most
    /// 1000000 (at least 1 in `random` mode); `hard_share` 0.01 to 0.99 (`both` mode);
    /// `multi_questions.train` and `.eval` multiples of 4, at most 1000000 each; `max_side` 1 to
    /// 8192. The `random` and `both` modes draw at most 5000000 random negatives per split.
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub options: serde_json::Value,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

impl BuildDatasetSpec {
    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        if !crate::spec::valid_name(&self.name) {
            return Err(SpecError::invalid(
                "spec.name",
                "must be 1..=64 characters of a-z, 0-9, `-`, `_`",
            ));
        }
        if self.dataset.is_empty() {
            return Err(SpecError::invalid("spec.dataset", "must not be empty"));
        }
        for (field, count, most) in [
            ("spec.mines", self.mines.len(), MAX_MINES),
            ("spec.synthetic", self.synthetic.len(), MAX_SYNTHETIC_BLOBS),
        ] {
            if count > most {
                return Err(SpecError::invalid(
                    field,
                    format!("must list at most {most}, got {count}"),
                ));
            }
        }
        if !self.options.is_object() {
            return Err(SpecError::invalid("spec.options", "must be a JSON object"));
        }
        crate::build_config::BuildConfig::from_json(&self.options)
            .map_err(|e| SpecError::invalid(&format!("spec.options.{}", e.field), e.message))?;
        Ok(())
    }
}

/// What a build-dataset job reports; the server adds the registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BuildDatasetOutput {
    /// The dataset's manifest blob; its hash is the dataset's identity.
    #[schema(value_type = String)]
    pub manifest: BlobHash,
    /// Exported files by name (`train.jsonl`, `eval.parquet`, …).
    #[schema(value_type = BTreeMap<String, String>)]
    pub exports: BTreeMap<String, BlobHash>,
    /// Row counts (`train.pair.yes`, `eval.multi`, `dropped.cross_split`, …).
    pub counts: BTreeMap<String, u64>,
}

/// A dataset was built. Stream `dataset/<id>`; `hash` (the manifest's) identifies it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DatasetBuilt {
    pub id: DatasetId,
    #[schema(value_type = String)]
    pub hash: BlobHash,
    pub name: String,
    pub job: JobId,
    #[serde(flatten)]
    pub output: BuildDatasetOutput,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(options: serde_json::Value) -> BuildDatasetSpec {
        BuildDatasetSpec {
            name: "built".into(),
            dataset: "demo".into(),
            dataset_id: None,
            manifest: None,
            mines: Vec::new(),
            hard_negatives: None,
            synthetic: Vec::new(),
            options,
        }
    }

    fn field_of(r: Result<(), SpecError>) -> String {
        match r {
            Err(SpecError::Invalid { field, .. }) => field,
            other => panic!("expected an invalid field, got {other:?}"),
        }
    }

    #[test]
    fn options_are_validated_here_naming_the_option() {
        assert!(spec(serde_json::json!({})).validate().is_ok());
        assert!(
            spec(serde_json::json!({"balance": "downsample", "eval_fraction": 0.25}))
                .validate()
                .is_ok()
        );
        assert_eq!(
            field_of(spec(serde_json::json!({"eval_fraction": 2.0})).validate()),
            "spec.options.eval_fraction"
        );
        assert_eq!(
            field_of(spec(serde_json::json!({"balance": "sometimes"})).validate()),
            "spec.options.balance"
        );
        assert_eq!(
            field_of(spec(serde_json::json!({"multi_questions": {"train": 6}})).validate()),
            "spec.options.multi_questions.train"
        );
        assert_eq!(
            field_of(spec(serde_json::json!({"colour": "red"})).validate()),
            "spec.options.colour"
        );
        assert_eq!(
            field_of(spec(serde_json::json!([1, 2])).validate()),
            "spec.options"
        );
    }
}
