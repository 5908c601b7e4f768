//! The records modules consume and produce, as plain Rust values with serde forms.
//!
//! These mirror the WIT records in `wasm-sdk/wit/plugin.wit` field for field; the JSON forms use
//! the WIT names in snake_case, which is what `twin modules run` reads and what `score` jobs store.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a module is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleKind {
    Reward,
    Filter,
}

impl ModuleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ModuleKind::Reward => "reward",
            ModuleKind::Filter => "filter",
        }
    }
}

/// A module's answer to `describe`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    pub name: String,
    pub version: String,
    pub kind: ModuleKind,
    pub summary: String,
    /// JSON Schema of `configure`'s parameters, as the module wrote it.
    pub parameters_schema: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuestionType {
    Pair,
    Multi,
    #[default]
    Other,
}

/// One model completion to score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    #[serde(default)]
    pub prompt: String,
    pub completion: String,
    pub ground_truth: String,
    #[serde(default)]
    pub question_type: QuestionType,
    /// A JSON object. In JSON input it may be given as an object or as a string holding one.
    #[serde(default = "empty_object", deserialize_with = "metadata_string")]
    pub metadata: String,
}

/// A reward's score for one rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardScore {
    pub score: f64,
    /// Named parts of a composite score, in the order the module gave them.
    #[serde(default)]
    pub components: BTreeMap<String, f64>,
}

/// A candidate negative pair for a filter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CandidatePair {
    pub image_a: String,
    pub image_b: String,
    pub instance_a: String,
    pub instance_b: String,
    #[serde(default)]
    pub category_a: String,
    #[serde(default)]
    pub category_b: String,
    #[serde(default)]
    pub phash_a: u64,
    #[serde(default)]
    pub phash_b: u64,
    pub similarity: f64,
    #[serde(default)]
    pub rank: u32,
    #[serde(default = "empty_object", deserialize_with = "metadata_string")]
    pub metadata: String,
}

/// A filter's judgement of one candidate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub keep: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Parses a JSONL file of rollouts (blank lines skipped); the error names the first bad line.
/// An empty file is an error: there is nothing to score.
pub fn parse_rollouts(bytes: &[u8]) -> Result<Vec<Rollout>, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("rollouts are not UTF-8: {e}"))?;
    let rollouts = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| format!("rollouts line {}: {e}", i + 1))
        })
        .collect::<Result<Vec<Rollout>, String>>()?;
    if rollouts.is_empty() {
        return Err("the rollouts file has no rollouts".into());
    }
    Ok(rollouts)
}

fn empty_object() -> String {
    "{}".to_owned()
}

/// Accepts metadata as a JSON object (the natural form in JSONL) or as a string holding one (the
/// WIT form); either way the module receives a string.
fn metadata_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    use serde::de::Error;
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Ok(s),
        v @ serde_json::Value::Object(_) => Ok(v.to_string()),
        serde_json::Value::Null => Ok(empty_object()),
        other => Err(D::Error::custom(format!(
            "metadata must be a JSON object or a string, not {other}"
        ))),
    }
}
