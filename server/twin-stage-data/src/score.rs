//! The `score` stage: re-scores a JSONL blob of rollouts with reward modules run by twin-plugins.
//!
//! Each term of the reward (one module, or a weighted sum) is loaded by the hash the server
//! resolved at submission, checked against that hash, and run over the rollouts in batches. A
//! module failure fails the job with the module's typed error: a reward that cannot score must
//! never be mistaken for a reward of zero. Results go to a blob, one line per rollout; the job's
//! output carries the means, the module hashes and the capability-call log.

use std::collections::BTreeMap;
use std::sync::Arc;

use twin_core::event::JobOutput;
use twin_core::job::JobState;
use twin_core::score::{ScoreOutput, ScoreSpec, TermSummary};
use twin_core::spec::JobSpec;
use twin_core::{BlobHash, JobKind};
use twin_plugins::{Host, PluginError, RewardScore, Rollout, RolloutLines, rollout_lines};
use twin_stage::{Stage, StageContext, StageError};

/// Runs `score` jobs with a shared plugin host.
pub struct ScoreStage {
    host: Arc<Host>,
}

impl ScoreStage {
    pub fn new(host: Arc<Host>) -> Self {
        Self { host }
    }
}

/// A reward module's failure as the job's: the module's own fault is a `module_error` whose
/// detail is the host's code for it (`out_of_fuel`, `guest_trap`, …); the host's trouble keeps
/// the code the host gives it (`unavailable` for a pool exhausted or I/O, which may pass).
fn module_error(term: &str, module: &str, e: PluginError) -> StageError {
    let what = if term.is_empty() {
        format!("reward module {module}")
    } else {
        format!("reward term {term:?} (module {module})")
    };
    StageError::new(
        e.failure_code(),
        format!("{what} failed [{}]: {e}", e.code()),
    )
    .with_detail(e.code())
}

impl Stage for ScoreStage {
    fn kind(&self) -> JobKind {
        JobKind::Score
    }

    fn run(&self, job: &JobState, ctx: &StageContext) -> Result<JobOutput, StageError> {
        let JobSpec::Score(spec) = &job.submission.spec else {
            return Err(StageError::internal(
                "the score stage got another kind of job",
            ));
        };
        let bytes = ctx.download(&spec.rollouts)?;
        // One pass checks every line and counts them before any module runs; each term then
        // reads the lines again a batch at a time, so only one batch is ever held parsed.
        let mut count = 0usize;
        for rollout in twin_plugins::rollout_lines(&bytes[..]) {
            rollout.map_err(StageError::bad_input)?;
            count += 1;
            if count > MAX_ROLLOUTS {
                return Err(StageError::bad_input(format!(
                    "the rollouts file has more than {MAX_ROLLOUTS} rollouts; split it into \
                     several score jobs"
                )));
            }
        }
        if count == 0 {
            return Err(StageError::bad_input("the rollouts file has no rollouts"));
        }
        score(&self.host, spec, count, || rollout_lines(&bytes[..]), ctx)
    }
}

/// The most rollouts one score job reads: their totals and components stay in memory (a few
/// dozen bytes each), the rollouts themselves never all at once.
pub const MAX_ROLLOUTS: usize = 1_000_000;

fn score<'a>(
    host: &Host,
    spec: &ScoreSpec,
    count: usize,
    lines: impl Fn() -> RolloutLines<&'a [u8]>,
    ctx: &StageContext,
) -> Result<JobOutput, StageError> {
    let grants = &spec.grants;
    let limits = host.config().limits.with_job_limits(&spec.limits);
    let terms = spec.reward.terms();
    let single = spec.reward.module.is_some();
    let mut totals = vec![0.0f64; count];
    let mut components: Vec<BTreeMap<String, f64>> = vec![BTreeMap::new(); count];
    let mut summaries = Vec::new();
    let mut calls = Vec::new();
    let mut fuel_used = 0u64;
    let batch = spec.batch_size.max(1) as usize;
    let steps = terms.len() * count.div_ceil(batch);
    let mut step = 0usize;
    for term in &terms {
        let hash = term.module_hash.ok_or_else(|| {
            StageError::internal(format!("module {} was not resolved to a hash", term.module))
        })?;
        let module = match host.get(&hash.to_hex()) {
            Some(m) => m,
            None => {
                let bytes = ctx.download(&hash)?;
                host.load(&bytes)
                    .map_err(|e| module_error(&term.name, &term.module, e))?
            }
        };
        let params = term.params.to_string();
        let name = if single {
            String::new()
        } else if term.name.is_empty() {
            term.module.clone()
        } else {
            term.name.clone()
        };
        let mut sum = 0.0;
        let mut rollouts = lines();
        for chunk_index in 0.. {
            let chunk = rollouts
                .by_ref()
                .take(batch)
                .collect::<Result<Vec<Rollout>, String>>()
                .map_err(StageError::bad_input)?;
            if chunk.is_empty() {
                break;
            }
            ctx.check_cancelled()?;
            let out = host
                .score(&module, &params, grants, Some(&limits), &chunk)
                .map_err(|e| module_error(&name, &term.module, e))?;
            fuel_used = fuel_used.saturating_add(out.fuel_used);
            calls.extend(out.calls);
            for (
                j,
                RewardScore {
                    score,
                    components: parts,
                },
            ) in out.values.into_iter().enumerate()
            {
                let i = chunk_index * batch + j;
                sum += score;
                totals[i] += term.weight * score;
                if !name.is_empty() {
                    components[i].insert(name.clone(), score);
                }
                for (part, value) in parts {
                    let key = if name.is_empty() {
                        part
                    } else {
                        format!("{name}.{part}")
                    };
                    components[i].insert(key, value);
                }
            }
            step += 1;
            ctx.progress(
                step,
                steps,
                &format!(
                    "scored {} of {} rollouts with {}",
                    (chunk_index * batch + chunk.len()),
                    count,
                    term.module
                ),
                BTreeMap::new(),
            );
        }
        summaries.push(TermSummary {
            name,
            module: term.module.clone(),
            module_hash: hash,
            module_version: module.descriptor.version.clone(),
            weight: term.weight,
            mean: sum / count as f64,
        });
    }
    let n = count as f64;
    let mut results = Vec::with_capacity(count * 48);
    let mut component_sums: BTreeMap<String, f64> = BTreeMap::new();
    for (i, (total, parts)) in totals.iter().zip(&components).enumerate() {
        for (k, v) in parts {
            *component_sums.entry(k.clone()).or_default() += v;
        }
        let line = serde_json::json!({ "index": i, "score": total, "components": parts });
        results.extend_from_slice(line.to_string().as_bytes());
        results.push(b'\n');
    }
    let results = ctx.upload(results)?;
    ctx.record_artefact("scores", results)?;
    let capability_log = if calls.is_empty() {
        None
    } else {
        let mut log = Vec::new();
        for c in &calls {
            log.extend_from_slice(serde_json::to_string(c).unwrap_or_default().as_bytes());
            log.push(b'\n');
        }
        let hash: BlobHash = ctx.upload(log)?;
        ctx.record_artefact("capability-calls", hash)?;
        Some(hash)
    };
    Ok(JobOutput::Score(ScoreOutput {
        rollouts: count as u64,
        mean: totals.iter().sum::<f64>() / n,
        component_means: component_sums
            .into_iter()
            .map(|(k, v)| (k, v / n))
            .collect(),
        terms: summaries,
        results,
        capability_calls: calls.len() as u64,
        capability_log,
        fuel_used,
    }))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use twin_core::FailureCode;
    use twin_plugins::HostConfig;
    use twin_stage::testing::{MemoryBackend, job};

    fn misbehave() -> Vec<u8> {
        let dir = std::env::var_os("TWIN_MODULES_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/wasm32-wasip2/guest")
            });
        let path = dir.join("misbehave.wasm");
        std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; build the modules first with deploy/build-modules.sh",
                path.display()
            )
        })
    }

    #[test]
    fn a_reward_that_fails_fails_the_job_with_the_modules_code() {
        let backend = MemoryBackend::new();
        let module = backend.put(misbehave());
        let rollouts = backend.put(
            "{\"completion\": \"abc\", \"ground_truth\": \"x\"}\n\
             {\"completion\": \"hello\", \"ground_truth\": \"y\"}\n",
        );
        let stage = ScoreStage::new(Arc::new(Host::new(HostConfig::default()).unwrap()));
        let spec = |mode: &str| {
            job(serde_json::json!({
                "kind": "score",
                "rollouts": rollouts.to_hex(),
                "reward": {"module": "misbehave", "module_hash": module.to_hex(),
                           "params": {"mode": mode}},
            }))
        };

        // "ok" scores each rollout by its completion's length.
        let JobOutput::Score(out) = stage.run(&spec("ok"), &backend.context(&[])).unwrap() else {
            panic!("a score job's output");
        };
        assert_eq!(out.mean, 4.0);
        assert_eq!(backend.names(), ["scores"]);
        // Read a batch at a time: the same scores whatever the batch.
        let mut one_by_one = spec("ok");
        if let JobSpec::Score(s) = &mut one_by_one.submission.spec {
            s.batch_size = 1;
        }
        let JobOutput::Score(again) = stage.run(&one_by_one, &backend.context(&[])).unwrap() else {
            panic!("a score job's output");
        };
        assert_eq!((again.mean, again.rollouts), (4.0, 2));
        assert_eq!(backend.fractions().last().map(|(f, _)| *f), Some(Some(1.0)));

        for (mode, detail, says) in [
            ("panic", "guest_trap", "panicked on purpose"),
            ("error", "guest_error", "returned an error on purpose"),
            ("bad-config", "bad_params", "bad-config asked for"),
        ] {
            let err = stage.run(&spec(mode), &backend.context(&[])).unwrap_err();
            assert_eq!(err.code, FailureCode::ModuleError, "{mode}: {err}");
            assert_eq!(err.detail.as_deref(), Some(detail), "{mode}: {err}");
            assert!(!err.retryable, "{mode}: {err}");
            assert!(
                err.message.starts_with("reward module misbehave failed [")
                    && err.message.contains(says),
                "{mode}: {err}"
            );
        }

        // Rollouts that do not parse are the job's input at fault.
        let bad = backend.put("not json\n");
        let job = job(serde_json::json!({
            "kind": "score",
            "rollouts": bad.to_hex(),
            "reward": {"module": "misbehave", "module_hash": module.to_hex(),
                       "params": {"mode": "ok"}},
        }));
        let err = stage.run(&job, &backend.context(&[])).unwrap_err();
        assert_eq!(err.code, FailureCode::BadInput, "{err}");
    }
}
