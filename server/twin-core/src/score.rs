//! The `score` job: re-scoring stored rollouts with a reward module or a weighted sum of them.
//!
//! Modules are named in a submission by registry name or by hash; the server resolves each name
//! to a hash before the submission is logged (`module_hash`), so the log says exactly which code
//! scored, and a later alias switch cannot change a queued or running job.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::ids::BlobHash;
use crate::spec::SpecError;

/// Largest batch handed to a module in one call (`score`'s `batch_size`, `mine`'s
/// `filter_batch`): a batch is one sandboxed call's input and output, held in the module's
/// memory at once.
pub const MAX_BATCH: u32 = 4096;

/// Most terms of a `weighted_sum` reward: each term is a module run over every rollout.
pub const MAX_REWARD_TERMS: usize = 32;

/// Largest magnitude of a term's `weight`. Scores are finite but a weight near `f64::MAX` would
/// turn their sum into infinity; rewards that GRPO normalises per group need no weight beyond
/// a few units.
pub const MAX_REWARD_WEIGHT: f64 = 1e6;

/// Longest name of a reward term or a mine filter, in bytes: a term's name is copied into every
/// rollout's components and a filter's into every candidate's verdicts, and the default name (a
/// module name or a 64-digit hash) is never longer.
pub const MAX_NAME_BYTES: usize = 64;

/// Most entries of a `grants.lookup` table: every module call gets its own copy of the table.
pub const MAX_LOOKUP_ENTRIES: usize = 100_000;
/// Most bytes of a `grants.lookup` table's keys and values together (4 MiB), for the same reason.
pub const MAX_LOOKUP_BYTES: usize = 4 << 20;

/// Largest `limits.fuel` a job may set (2^50 instructions per call). A job may ask for more than
/// the executor's defaults, but not for a call that never ends.
pub const MAX_FUEL: u64 = 1 << 50;
/// Largest `limits.deadline_ms` a job may set: one hour per call.
pub const MAX_DEADLINE_MS: u64 = 3_600_000;
/// Largest `limits.memory_mb` a job may set: 4 GiB, the most a module's 32-bit memory addresses.
pub const MAX_MEMORY_MB: u64 = 4096;

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
    /// Rollouts per module call, 1 to 4096.
    #[serde(default = "default_batch")]
    #[schema(minimum = 1, maximum = 4096)]
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
    /// Score = Σ weight × term score; each term's score is logged as a component. At most 32
    /// terms.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 32)]
    pub weighted_sum: Vec<RewardTerm>,
}

/// One term of a weighted-sum reward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RewardTerm {
    /// Component name in the results (defaults to the module reference); at most 64 bytes, no
    /// `.`.
    #[serde(default)]
    #[schema(max_length = 64)]
    pub name: String,
    pub module: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub module_hash: Option<BlobHash>,
    /// A finite number from -1000000 to 1000000.
    #[schema(minimum = -1000000.0, maximum = 1000000.0)]
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
        match (&self.module, self.weighted_sum.is_empty()) {
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
        check_reference(&format!("{at}.module"), self.module.as_deref())?;
        check_params(&format!("{at}.params"), &self.params)?;
        if self.weighted_sum.len() > MAX_REWARD_TERMS {
            return Err(SpecError::invalid(
                &format!("{at}.weighted_sum"),
                format!(
                    "must have at most {MAX_REWARD_TERMS} terms, got {}",
                    self.weighted_sum.len()
                ),
            ));
        }
        let mut names = BTreeSet::new();
        for (i, t) in self.weighted_sum.iter().enumerate() {
            let term = |f: &str| format!("{at}.weighted_sum[{i}].{f}");
            check_reference(&term("module"), Some(&t.module))?;
            check_params(&term("params"), &t.params)?;
            if !(t.weight.is_finite() && t.weight.abs() <= MAX_REWARD_WEIGHT) {
                return Err(SpecError::invalid(
                    &term("weight"),
                    format!(
                        "must be a finite number from -{MAX_REWARD_WEIGHT} to {MAX_REWARD_WEIGHT}"
                    ),
                ));
            }
            let name = if t.name.is_empty() {
                &t.module
            } else {
                &t.name
            };
            if name.len() > MAX_NAME_BYTES {
                return Err(SpecError::invalid(
                    &term("name"),
                    format!("must be at most {MAX_NAME_BYTES} bytes"),
                ));
            }
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

/// Per-call resource limits of a module; each one set is positive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModuleLimits {
    /// Instructions per call, at most 2^50 (1125899906842624).
    #[schema(minimum = 1, maximum = 1125899906842624_u64)]
    pub fuel: Option<u64>,
    /// Wall time per call, at most 3600000 (one hour).
    #[schema(minimum = 1, maximum = 3600000)]
    pub deadline_ms: Option<u64>,
    /// Module memory, at most 4096 MiB.
    #[schema(minimum = 1, maximum = 4096)]
    pub memory_mb: Option<u64>,
}

/// Capabilities a job grants to its modules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    /// A read-only string table served by `twin:plugin/lookup.get`: at most 100000 entries and
    /// 4 MiB (4194304 bytes) of keys and values together.
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
        if !(1..=MAX_BATCH).contains(&self.batch_size) {
            return Err(SpecError::invalid(
                "spec.batch_size",
                format!("must be between 1 and {MAX_BATCH}"),
            ));
        }
        self.reward.validate("spec.reward")?;
        check_grants(&self.grants)?;
        check_limits(&self.limits)
    }
}

/// A job's lookup table within [`MAX_LOOKUP_ENTRIES`] and [`MAX_LOOKUP_BYTES`].
pub(crate) fn check_grants(g: &Grants) -> Result<(), SpecError> {
    let Some(table) = &g.lookup else {
        return Ok(());
    };
    let bytes = table.iter().fold(0usize, |sum, (k, v)| {
        sum.saturating_add(k.len()).saturating_add(v.len())
    });
    if table.len() > MAX_LOOKUP_ENTRIES || bytes > MAX_LOOKUP_BYTES {
        return Err(SpecError::invalid(
            "spec.grants.lookup",
            format!(
                "must have at most {MAX_LOOKUP_ENTRIES} entries and {MAX_LOOKUP_BYTES} bytes of \
                 keys and values, got {} entries and {bytes} bytes",
                table.len()
            ),
        ));
    }
    Ok(())
}

/// A job's module limits: each set one positive and within the host's ranges.
pub(crate) fn check_limits(l: &ModuleLimits) -> Result<(), SpecError> {
    let bad_limit = |f: &str, v: Option<u64>, max: u64| {
        v.is_some_and(|v| v == 0 || v > max).then(|| f.to_owned())
    };
    if let Some(f) = bad_limit("spec.limits.fuel", l.fuel, MAX_FUEL)
        .or_else(|| bad_limit("spec.limits.deadline_ms", l.deadline_ms, MAX_DEADLINE_MS))
        .or_else(|| bad_limit("spec.limits.memory_mb", l.memory_mb, MAX_MEMORY_MB))
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
