//! The `eval` job: FGVQA-style evaluation of a Qwen2.5-VL checkpoint.
//!
//! A job names a checkpoint directory on the executor and its questions: the eval split of a
//! built dataset (pinned to its manifest at submission, like a mine job's dataset) or a
//! `questions.jsonl` written by `twin import` on the executor. Every question is asked once
//! with greedy decoding (images first, then the question and the evaluation instruction), the
//! completion is scored by the pair or multi scorer module (pinned to hashes at submission), and
//! the job reports, per subset, the plain means of those 0/1 scores.
//!
//! The metric functions live here, pure, so the executor, the CLI's `eval compare` and the tests
//! compute them the same way.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::ids::BlobHash;
use crate::mine::ComputeDevice;
use crate::score::{Grants, ModuleLimits, check_limits, valid_module_name};
use crate::spec::SpecError;

/// Longest completion a job may ask for.
pub const MAX_NEW_TOKENS: u32 = 32_768;
/// Most prompts in one engine call.
pub const MAX_EVAL_BATCH: u32 = 1024;
/// The scorer modules a spec names when it names none (the FGVQA rules of lmms-eval).
pub const DEFAULT_PAIR_SCORER: &str = "fgvqa-pair";
pub const DEFAULT_MULTI_SCORER: &str = "fgvqa-multi";
/// The pixel bounds lmms-eval gives Qwen2.5-VL's processor (`min_pixels` 256·28·28,
/// `max_pixels` 2048·28·28), overriding the checkpoint's: the paper's FGVQA numbers were
/// measured with them.
pub const LMMS_EVAL_MIN_PIXELS: u64 = 256 * 28 * 28;
pub const LMMS_EVAL_MAX_PIXELS: u64 = 2048 * 28 * 28;

/// Where the questions come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum EvalData {
    /// A built dataset's eval split: its name (the latest build) or manifest hash.
    Built(String),
    /// A `questions.jsonl` made by `twin import` (`{subset, question_type, question, answer,
    /// images}`, images relative to the file), on the executor's file system; an absolute path.
    Questions(String),
    /// A questions file and its images uploaded to the blob store: a blob holding a
    /// [`QuestionsUpload`]. What `twin submit` and `twin eval run` send for a questions file on
    /// the submitter's machine, so an executor needs no allowed roots.
    Uploaded(BlobHash),
}

/// An uploaded questions file: the file's blob and the blob of each image it names, by the
/// name it gives the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuestionsUpload {
    pub questions: BlobHash,
    pub images: BTreeMap<String, BlobHash>,
}

/// The pixel bounds (`min_pixels`, `max_pixels`) the image processor brings an imported
/// question's image within.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImageBounds {
    /// lmms-eval's, 200704 to 1605632 pixels: the FGVQA protocol the paper reports.
    #[default]
    LmmsEval,
    /// The checkpoint's `preprocessor_config.json` (Qwen2.5-VL's: 3136 to 12845056).
    Checkpoint,
}

impl ImageBounds {
    /// `(min_pixels, max_pixels)` when the policy fixes them; `None` for the checkpoint's.
    pub fn pixels(self) -> Option<(u64, u64)> {
        match self {
            ImageBounds::LmmsEval => Some((LMMS_EVAL_MIN_PIXELS, LMMS_EVAL_MAX_PIXELS)),
            ImageBounds::Checkpoint => None,
        }
    }
}

/// The pixel bounds a job's images were brought within, and the policy that chose them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AppliedImageBounds {
    pub policy: ImageBounds,
    pub min_pixels: u64,
    pub max_pixels: u64,
}

/// A scorer module: a reward module given the completion and the question's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScorerRef {
    /// Registry name or SHA-256 of a reward module.
    pub module: String,
    /// Set by the server: the hash `module` resolved to at submission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub module_hash: Option<BlobHash>,
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
}

impl ScorerRef {
    fn named(module: &str) -> ScorerRef {
        ScorerRef {
            module: module.to_owned(),
            module_hash: None,
            params: empty_object(),
        }
    }
}

/// The scorer of each question type.
///
/// Defaults per field rather than `#[serde(default)]` on the struct: the same values, but the
/// struct-level form makes utoipa write them into the schema as `default` objects, which
/// openapi-python-client refuses on a property of a model type. The doc comments say them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalScorers {
    /// Yes/no pair questions; `fgvqa-pair` by default.
    #[serde(default = "default_pair_scorer")]
    pub pair: ScorerRef,
    /// 0–3 count questions; `fgvqa-multi` by default.
    #[serde(default = "default_multi_scorer")]
    pub multi: ScorerRef,
}

fn default_pair_scorer() -> ScorerRef {
    ScorerRef::named(DEFAULT_PAIR_SCORER)
}

fn default_multi_scorer() -> ScorerRef {
    ScorerRef::named(DEFAULT_MULTI_SCORER)
}

impl Default for EvalScorers {
    fn default() -> Self {
        EvalScorers {
            pair: default_pair_scorer(),
            multi: default_multi_scorer(),
        }
    }
}

impl EvalScorers {
    /// Each scorer with its question type, pair first.
    pub fn each(&self) -> [(QuestionKind, &ScorerRef); 2] {
        [
            (QuestionKind::Pair, &self.pair),
            (QuestionKind::Multi, &self.multi),
        ]
    }

    pub fn get(&self, kind: QuestionKind) -> &ScorerRef {
        match kind {
            QuestionKind::Pair => &self.pair,
            QuestionKind::Multi => &self.multi,
        }
    }
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

/// Evaluate a Qwen2.5-VL checkpoint on FGVQA-style questions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    /// The Qwen2.5-VL checkpoint (`config.json`, safetensors, `tokenizer.json`,
    /// `preprocessor_config.json`, optionally a chat template): a registered model's name or
    /// manifest hash (`twin models add`), or an absolute directory path on the executor.
    pub model: String,
    /// Set by the server at submission when `model` names a registered model: its manifest hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub model_manifest: Option<BlobHash>,
    pub data: EvalData,
    /// Set by the server for `data.built`: the manifest the reference resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub manifest: Option<BlobHash>,
    /// Set by the server for `data.built`: the dataset's name, the subset its questions are
    /// reported under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_name: Option<String>,
    /// Only these subsets (case-insensitive); every subset when empty.
    #[serde(default)]
    pub subsets: Vec<String>,
    /// At most this many questions per subset, the first in the data's order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Longest completion, in tokens (1..=32768).
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: u32,
    /// Prompts per engine call (1..=1024).
    #[serde(default = "default_batch")]
    pub batch_size: u32,
    #[serde(default)]
    pub device: ComputeDevice,
    /// The pixel bounds of a `data.questions` image: `lmms_eval` (the default; 200704 to 1605632
    /// pixels, as the paper's FGVQA numbers were measured) or `checkpoint` (its
    /// `preprocessor_config.json`'s). A `data.built` image is shown at the dataset's
    /// `resized_*` size within the checkpoint's bounds whatever this says, so that evaluation
    /// sees what training saw.
    #[serde(default)]
    pub image_bounds: ImageBounds,
    #[serde(default)]
    pub scorers: EvalScorers,
    /// Host capabilities granted to the scorer modules.
    #[serde(default)]
    pub grants: Grants,
    /// Per-call limits of the scorer modules; unset fields take the executor's defaults.
    #[serde(default)]
    pub limits: ModuleLimits,
}

fn default_max_new_tokens() -> u32 {
    1024
}
fn default_batch() -> u32 {
    8
}

impl EvalSpec {
    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        // `model` and `data.questions` are checked as paths with every kind's
        // (`JobKind::host_path_fields`).
        if let EvalData::Built(reference) = &self.data
            && reference.is_empty()
        {
            return Err(SpecError::invalid(
                "spec.data.built",
                "must name a built dataset (its name or manifest hash)",
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, s) in self.subsets.iter().enumerate() {
            if s.trim().is_empty() || s.len() > 128 {
                return Err(SpecError::invalid(
                    &format!("spec.subsets[{i}]"),
                    "subset names are 1 to 128 bytes",
                ));
            }
            if !seen.insert(s.to_lowercase()) {
                return Err(SpecError::invalid(
                    &format!("spec.subsets[{i}]"),
                    format!("`{s}` is listed twice"),
                ));
            }
        }
        if self.limit == Some(0) {
            return Err(SpecError::invalid(
                "spec.limit",
                "must be at least 1 (leave it out to ask every question)",
            ));
        }
        if !(1..=MAX_NEW_TOKENS).contains(&self.max_new_tokens) {
            return Err(SpecError::invalid(
                "spec.max_new_tokens",
                format!("must be between 1 and {MAX_NEW_TOKENS}"),
            ));
        }
        if !(1..=MAX_EVAL_BATCH).contains(&self.batch_size) {
            return Err(SpecError::invalid(
                "spec.batch_size",
                format!("must be between 1 and {MAX_EVAL_BATCH}"),
            ));
        }
        for (kind, scorer) in self.scorers.each() {
            let at = |f: &str| format!("spec.scorers.{}.{f}", kind.as_str());
            if scorer.module.parse::<BlobHash>().is_err() && !valid_module_name(&scorer.module) {
                return Err(SpecError::invalid(
                    &at("module"),
                    "must be a registered module name or a SHA-256 hash",
                ));
            }
            if !scorer.params.is_object() {
                return Err(SpecError::invalid(&at("params"), "must be a JSON object"));
            }
        }
        crate::score::check_grants(&self.grants)?;
        check_limits(&self.limits)
    }

    /// The pinned blobs the job reads: the manifest and the scorer modules.
    pub fn inputs(&self) -> Vec<BlobHash> {
        let uploaded = match self.data {
            EvalData::Uploaded(bundle) => Some(bundle),
            EvalData::Built(_) | EvalData::Questions(_) => None,
        };
        self.manifest
            .into_iter()
            .chain(uploaded)
            .chain(self.model_manifest)
            .chain(
                self.scorers
                    .each()
                    .iter()
                    .filter_map(|(_, s)| s.module_hash),
            )
            .collect()
    }
}

/// What a question asks.
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
#[serde(rename_all = "snake_case")]
pub enum QuestionKind {
    /// Two images; the answer is `yes` or `no`.
    Pair,
    /// A reference and candidates; the answer is how many candidates match (0–3).
    Multi,
}

impl QuestionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            QuestionKind::Pair => "pair",
            QuestionKind::Multi => "multi",
        }
    }
}

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EvalFinish {
    /// The model ended its turn.
    Stop,
    /// `max_new_tokens` ran out first.
    Length,
}

/// One line of an eval job's samples blob: a question, what the model said, and its score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EvalSample {
    /// The built dataset's row id, or `q<line>` for line `<line>` (from 1) of questions.jsonl.
    pub id: String,
    pub subset: String,
    pub question_type: QuestionKind,
    /// Image paths: relative to the ingest source (built datasets) or to questions.jsonl.
    pub images: Vec<String>,
    /// The rendered prompt the model read (chat template applied, one `<|image_pad|>` per image).
    pub prompt: String,
    pub completion: String,
    /// The answer the scoring rule reads from the completion (`yes`/`no`/a digit, or its first
    /// word; empty when there is none).
    pub parsed_answer: String,
    pub target: String,
    /// The scorer module's score (1 correct, 0 not).
    pub score: f64,
    pub finish: EvalFinish,
    /// Generated tokens, the stop token included.
    pub tokens: u64,
    pub prompt_tokens: u64,
}

/// One subset's results. A metric is `null` when the subset has no question of its type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SubsetMetrics {
    /// Mean score of the pair questions.
    pub pairwise_total: Option<f64>,
    /// Mean score of the multi questions.
    pub multiple_choice_total: Option<f64>,
    /// Mean score of every question of the subset (pairs and multis pooled).
    pub overall_total: Option<f64>,
    pub pair_count: u64,
    pub multi_count: u64,
}

/// The mean of each metric over the subsets that have it (each subset weighs the same).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MeanMetrics {
    pub pairwise_total: Option<f64>,
    pub multiple_choice_total: Option<f64>,
    pub overall_total: Option<f64>,
}

/// Per-subset metrics of scored questions `(subset, type, score)`.
pub fn subset_metrics<'a>(
    scored: impl IntoIterator<Item = (&'a str, QuestionKind, f64)>,
) -> BTreeMap<String, SubsetMetrics> {
    #[derive(Default)]
    struct Sums {
        pair: (f64, u64),
        multi: (f64, u64),
    }
    let mut sums: BTreeMap<&str, Sums> = BTreeMap::new();
    for (subset, kind, score) in scored {
        let s = sums.entry(subset).or_default();
        let slot = match kind {
            QuestionKind::Pair => &mut s.pair,
            QuestionKind::Multi => &mut s.multi,
        };
        slot.0 += score;
        slot.1 += 1;
    }
    let mean = |(sum, n): (f64, u64)| (n > 0).then(|| sum / n as f64);
    sums.into_iter()
        .map(|(subset, s)| {
            let all = (s.pair.0 + s.multi.0, s.pair.1 + s.multi.1);
            let metrics = SubsetMetrics {
                pairwise_total: mean(s.pair),
                multiple_choice_total: mean(s.multi),
                overall_total: mean(all),
                pair_count: s.pair.1,
                multi_count: s.multi.1,
            };
            (subset.to_owned(), metrics)
        })
        .collect()
}

/// The unweighted mean over subsets of each metric, skipping subsets where it is `null`.
pub fn mean_metrics<'a>(subsets: impl IntoIterator<Item = &'a SubsetMetrics>) -> MeanMetrics {
    let mut sums = [(0.0, 0u32); 3];
    for m in subsets {
        for (slot, value) in
            sums.iter_mut()
                .zip([m.pairwise_total, m.multiple_choice_total, m.overall_total])
        {
            if let Some(v) = value {
                slot.0 += v;
                slot.1 += 1;
            }
        }
    }
    let [pair, multi, overall] = sums.map(|(sum, n)| (n > 0).then(|| sum / f64::from(n)));
    MeanMetrics {
        pairwise_total: pair,
        multiple_choice_total: multi,
        overall_total: overall,
    }
}

/// A scorer module as it ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScorerSummary {
    /// The reference as the spec gave it.
    pub module: String,
    #[schema(value_type = String)]
    pub module_hash: BlobHash,
    pub module_version: String,
    /// Questions it scored.
    pub scored: u64,
    pub fuel_used: u64,
}

/// What an eval job reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EvalOutput {
    /// SHA-256 over the checkpoint's weight files.
    pub model_hash: String,
    /// The manifest of the checkpoint's files as loaded: the registered model's, or (for a
    /// directory path) one the executor wrote and uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub model_manifest: Option<BlobHash>,
    pub device: String,
    /// The pixel bounds the questions' images were brought within: the spec's `image_bounds`
    /// for `data.questions`, the checkpoint's for `data.built`. Absent from outputs of jobs run
    /// before the option existed (which used the checkpoint's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_bounds: Option<AppliedImageBounds>,
    /// Questions asked.
    pub questions: u64,
    pub subsets: BTreeMap<String, SubsetMetrics>,
    /// JSONL blob of [`EvalSample`]s, in question order.
    #[schema(value_type = String)]
    pub samples: BlobHash,
    /// By question type (`pair`, `multi`).
    pub scorers: BTreeMap<String, ScorerSummary>,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    /// Completions cut off by `max_new_tokens`.
    pub truncated: u64,
    /// Questions whose completions an earlier attempt had generated (resumed, not regenerated).
    pub resumed: u64,
    /// Wall time of this attempt.
    pub wall_seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::JobSubmission;
    use serde_json::json;

    fn submit(spec: serde_json::Value) -> Result<JobSubmission, String> {
        JobSubmission::from_json(json!({ "spec": spec })).map_err(|e| e.to_string())
    }

    fn eval(extra: serde_json::Value) -> serde_json::Value {
        let mut spec = json!({"kind": "eval", "model": "/m", "data": {"built": "pairs"}});
        for (k, v) in extra.as_object().expect("an object") {
            spec[k] = v.clone();
        }
        spec
    }

    #[test]
    fn a_minimal_eval_takes_the_defaults() {
        let s = submit(eval(json!({}))).expect("valid");
        let crate::spec::JobSpec::Eval(spec) = s.spec else {
            panic!("not an eval spec");
        };
        assert_eq!(spec.max_new_tokens, 1024);
        assert_eq!(spec.batch_size, 8);
        assert_eq!(spec.limit, None);
        assert_eq!(spec.device, ComputeDevice::Auto);
        assert_eq!(spec.image_bounds, ImageBounds::LmmsEval);
        assert_eq!(
            ImageBounds::LmmsEval.pixels(),
            Some((200_704, 1_605_632)),
            "256·28·28 and 2048·28·28, lmms-eval's"
        );
        assert_eq!(spec.scorers.pair.module, "fgvqa-pair");
        assert_eq!(spec.scorers.multi.module, "fgvqa-multi");
        // Naming one scorer keeps the other's default.
        let s = submit(eval(
            json!({"scorers": {"pair": {"module": "binary-match"}}}),
        ))
        .expect("valid");
        let crate::spec::JobSpec::Eval(spec) = s.spec else {
            panic!("not an eval spec");
        };
        assert_eq!(spec.scorers.pair.module, "binary-match");
        assert_eq!(spec.scorers.multi.module, "fgvqa-multi");
        let s = submit(eval(json!({"image_bounds": "checkpoint"}))).expect("valid");
        let crate::spec::JobSpec::Eval(spec) = s.spec else {
            panic!("not an eval spec");
        };
        assert_eq!(spec.image_bounds, ImageBounds::Checkpoint);
        assert_eq!(spec.image_bounds.pixels(), None);
    }

    #[test]
    fn bad_eval_specs_name_the_field() {
        let cases = [
            (json!({"max_new_tokens": 0}), "spec.max_new_tokens"),
            (json!({"max_new_tokens": 32769}), "spec.max_new_tokens"),
            (json!({"batch_size": 0}), "spec.batch_size"),
            (json!({"limit": 0}), "spec.limit"),
            (json!({"model": ""}), "spec.model"),
            (
                json!({"data": {"questions": "rel/q.jsonl"}}),
                "spec.data.questions",
            ),
            (json!({"data": {"built": ""}}), "spec.data.built"),
            (json!({"data": {"parquet": "/x"}}), "spec.data"),
            (json!({"subsets": ["cub", "CUB"]}), "spec.subsets[1]"),
            (json!({"subsets": [""]}), "spec.subsets[0]"),
            (
                json!({"scorers": {"pair": {"module": "Not A Name"}}}),
                "spec.scorers.pair.module",
            ),
            (
                json!({"scorers": {"multi": {"module": "m", "params": 3}}}),
                "spec.scorers.multi.params",
            ),
            (json!({"limits": {"fuel": 0}}), "spec.limits.fuel"),
            (json!({"temperature": 1.0}), "spec.temperature"),
            (json!({"image_bounds": "native"}), "spec.image_bounds"),
        ];
        for (extra, field) in cases {
            let err = submit(eval(extra.clone())).expect_err(&format!("{extra} should fail"));
            assert!(
                err.starts_with(field),
                "{extra}: {err:?} should name {field}"
            );
        }
        assert!(submit(eval(json!({"max_new_tokens": 32768, "batch_size": 1024}))).is_ok());
    }

    #[test]
    fn metrics_are_plain_means_and_null_without_questions() {
        use QuestionKind::{Multi, Pair};
        let scored = [
            ("cub", Pair, 1.0),
            ("cub", Pair, 0.0),
            ("cub", Pair, 1.0),
            ("cub", Pair, 1.0),
            ("twin", Pair, 0.0),
            ("twin", Multi, 1.0),
            ("twin", Multi, 1.0),
            ("twin", Multi, 0.0),
            ("only-multi", Multi, 0.0),
        ];
        let m = subset_metrics(scored);
        assert_eq!(m.len(), 3);
        let cub = &m["cub"];
        assert_eq!(cub.pairwise_total, Some(0.75));
        assert_eq!(cub.multiple_choice_total, None);
        assert_eq!(cub.overall_total, Some(0.75));
        assert_eq!((cub.pair_count, cub.multi_count), (4, 0));
        let twin = &m["twin"];
        assert_eq!(twin.pairwise_total, Some(0.0));
        assert_eq!(twin.multiple_choice_total, Some(2.0 / 3.0));
        // Pooled over the subset's questions, not the mean of the two metrics.
        assert_eq!(twin.overall_total, Some(0.5));
        assert_eq!(m["only-multi"].pairwise_total, None);

        let mean = mean_metrics(m.values());
        assert_eq!(mean.pairwise_total, Some(0.375));
        assert_eq!(mean.multiple_choice_total, Some(1.0 / 3.0));
        assert_eq!(mean.overall_total, Some((0.75 + 0.5 + 0.0) / 3.0));
        assert_eq!(mean_metrics([]).overall_total, None);
        assert!(subset_metrics([]).is_empty());
    }

    #[test]
    fn an_output_logged_before_image_bounds_still_decodes() {
        let old = json!({
            "model_hash": "ab", "device": "cpu", "questions": 0, "subsets": {},
            "samples": BlobHash::of(b"s").to_hex(), "scorers": {}, "prompt_tokens": 0,
            "generated_tokens": 0, "truncated": 0, "resumed": 0, "wall_seconds": 1.0,
        });
        let mut out: EvalOutput = serde_json::from_value(old.clone()).expect("an old output");
        assert_eq!(out.image_bounds, None);
        assert_eq!(serde_json::to_value(&out).expect("encodes"), old);
        out.image_bounds = Some(AppliedImageBounds {
            policy: ImageBounds::LmmsEval,
            min_pixels: LMMS_EVAL_MIN_PIXELS,
            max_pixels: LMMS_EVAL_MAX_PIXELS,
        });
        let new = serde_json::to_value(&out).expect("encodes");
        assert_eq!(
            new["image_bounds"],
            json!({"policy": "lmms_eval", "min_pixels": 200_704, "max_pixels": 1_605_632})
        );
        assert_eq!(
            serde_json::from_value::<EvalOutput>(new).expect("decodes"),
            out
        );
    }

    #[test]
    fn inputs_are_the_manifest_and_the_resolved_scorers() {
        let s = submit(eval(json!({}))).expect("valid");
        let crate::spec::JobSpec::Eval(mut spec) = s.spec else {
            panic!("not an eval spec");
        };
        assert!(spec.inputs().is_empty());
        spec.manifest = Some(BlobHash::of(b"m"));
        spec.scorers.multi.module_hash = Some(BlobHash::of(b"multi"));
        assert_eq!(spec.inputs(), [BlobHash::of(b"m"), BlobHash::of(b"multi")]);
    }
}
