//! The `score` job: re-scoring stored rollouts with a reward module or a weighted sum of them.
//!
//! Modules are named in a submission by registry name or by hash; the server resolves each name
//! to a hash before the submission is logged (`module_hash`), so the log says exactly which code
//! scored, and a later alias switch cannot change a queued or running job.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::ids::BlobHash;
use crate::spec::SpecError;

/// Largest batch handed to a module in one call.
pub const MAX_BATCH: u32 = 4096;

/// Score a JSONL blob of rollouts with a reward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScoreSpec {
    /// SHA-256 of a JSONL blob, one rollout per line: `completion`, `ground_truth` and optionally
    /// `prompt`, `question_type` (pair | multi | other), `metadata` (an object).
    #[schema(value_type = String)]
    pub rollouts: BlobHash,
    pub reward: RewardSpec,
    /// Host capabilities granted to the modules.
    #[serde(default)]
    pub grants: Grants,
    /// Per-call limits; unset fields take the executor's defaults.
    #[serde(default)]
    pub limits: ModuleLimits,
    /// Rollouts per module call.
    #[serde(default = "default_batch")]
    pub batch_size: u32,
}

fn default_batch() -> u32 {
    256
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

/// One module (`module`, `params`) or a weighted sum of modules (`weighted_sum`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RewardSpec {
    /// Registry name or SHA-256 of the module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// Set by the server: the hash `module` resolved to at submission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub module_hash: Option<BlobHash>,
    /// The module's parameters (a JSON object).
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    /// Score = Σ weight × term score; each term's score is logged as a component.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weighted_sum: Vec<RewardTerm>,
}

/// One term of a weighted-sum reward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RewardTerm {
    /// Component name in the results (defaults to the module reference).
    #[serde(default)]
    pub name: String,
    pub module: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub module_hash: Option<BlobHash>,
    pub weight: f64,
    #[serde(default = "empty_object")]
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
}

impl RewardSpec {
    /// The reward as terms: a single module is one term of weight 1 with an empty name.
    pub fn terms(&self) -> Vec<RewardTerm> {
        match &self.module {
            Some(module) => vec![RewardTerm {
                name: String::new(),
                module: module.clone(),
                module_hash: self.module_hash,
                weight: 1.0,
                params: self.params.clone(),
            }],
            None => self.weighted_sum.clone(),
        }
    }

    /// Checks a reward as a spec gives it, naming fields under `at` (e.g. `spec.reward`).
    pub(crate) fn validate(&self, at: &str) -> Result<(), SpecError> {
        let r = self;
        match (&r.module, r.weighted_sum.is_empty()) {
            (Some(_), false) => {
                return Err(SpecError::invalid(
                    at,
                    "give either `module` or `weighted_sum`, not both",
                ));
            }
            (None, true) => {
                return Err(SpecError::invalid(
                    at,
                    "give `module` (a name or hash) or a non-empty `weighted_sum`",
                ));
            }
            _ => {}
        }
        check_reference(&format!("{at}.module"), r.module.as_deref())?;
        check_params(&format!("{at}.params"), &r.params)?;
        let mut names = BTreeSet::new();
        for (i, t) in r.weighted_sum.iter().enumerate() {
            let term = |f: &str| format!("{at}.weighted_sum[{i}].{f}");
            check_reference(&term("module"), Some(&t.module))?;
            check_params(&term("params"), &t.params)?;
            if !t.weight.is_finite() {
                return Err(SpecError::invalid(
                    &term("weight"),
                    "must be a finite number",
                ));
            }
            let name = if t.name.is_empty() {
                &t.module
            } else {
                &t.name
            };
            if name.contains('.') || !names.insert(name.clone()) {
                return Err(SpecError::invalid(
                    &term("name"),
                    "term names must be unique and contain no `.`",
                ));
            }
        }
        Ok(())
    }

    /// Mutable access to every module reference and its resolved hash.
    pub fn references_mut(&mut self) -> Vec<(&str, &mut Option<BlobHash>)> {
        match &self.module {
            Some(module) => vec![(module.as_str(), &mut self.module_hash)],
            None => self
                .weighted_sum
                .iter_mut()
                .map(|t| (t.module.as_str(), &mut t.module_hash))
                .collect(),
        }
    }
}

/// Per-call resource limits of a module.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModuleLimits {
    pub fuel: Option<u64>,
    pub deadline_ms: Option<u64>,
    pub memory_mb: Option<u64>,
}

/// Capabilities a job grants to its modules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    /// A read-only string table served by `twin:plugin/lookup.get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lookup: Option<BTreeMap<String, String>>,
}

impl Grants {
    /// Whether the capability with this short name (e.g. `lookup`) is granted.
    pub fn grants(&self, capability: &str) -> bool {
        match capability {
            "lookup" => self.lookup.is_some(),
            _ => false,
        }
    }
}

/// Registry names: the job-id alphabet, and never 64 hex digits (which would read as a hash).
pub fn valid_module_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.parse::<BlobHash>().is_err()
}

impl ScoreSpec {
    pub(crate) fn validate(&self) -> Result<(), SpecError> {
        if self.batch_size == 0 || self.batch_size > MAX_BATCH {
            return Err(SpecError::invalid(
                "spec.batch_size",
                "must be between 1 and 4096",
            ));
        }
        self.reward.validate("spec.reward")?;
        check_limits(&self.limits)
    }
}

/// A job's module limits: each set one positive and within the host's ranges.
pub(crate) fn check_limits(l: &ModuleLimits) -> Result<(), SpecError> {
    let bad_limit = |f: &str, v: Option<u64>, max: u64| {
        v.is_some_and(|v| v == 0 || v > max).then(|| f.to_owned())
    };
    if let Some(f) = bad_limit("spec.limits.fuel", l.fuel, 1 << 50)
        .or_else(|| bad_limit("spec.limits.deadline_ms", l.deadline_ms, 3_600_000))
        .or_else(|| bad_limit("spec.limits.memory_mb", l.memory_mb, 4096))
    {
        return Err(SpecError::invalid(
            &f,
            "must be positive (fuel ≤ 2^50, deadline ≤ 1 h, memory ≤ 4096 MiB)",
        ));
    }
    Ok(())
}

fn check_reference(field: &str, reference: Option<&str>) -> Result<(), SpecError> {
    match reference {
        Some(r) if r.parse::<BlobHash>().is_err() && !valid_module_name(r) => Err(
            SpecError::invalid(field, "must be a registered module name or a SHA-256 hash"),
        ),
        _ => Ok(()),
    }
}

fn check_params(field: &str, params: &serde_json::Value) -> Result<(), SpecError> {
    if params.is_object() {
        Ok(())
    } else {
        Err(SpecError::invalid(field, "must be a JSON object"))
    }
}

/// What a score job reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScoreOutput {
    pub rollouts: u64,
    /// Mean of the total score.
    pub mean: f64,
    /// Mean of each logged component (term scores and the modules' own components).
    pub component_means: BTreeMap<String, f64>,
    pub terms: Vec<TermSummary>,
    /// JSONL blob: `{"index", "score", "components"}` per rollout, in input order.
    #[schema(value_type = String)]
    pub results: BlobHash,
    /// Capability calls made, and the JSONL blob listing them (when there were any).
    pub capability_calls: u64,
    #[schema(value_type = Option<String>)]
    pub capability_log: Option<BlobHash>,
    pub fuel_used: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TermSummary {
    pub name: String,
    pub module: String,
    #[schema(value_type = String)]
    pub module_hash: BlobHash,
    pub module_version: String,
    pub weight: f64,
    pub mean: f64,
}
