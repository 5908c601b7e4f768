//! The `train` stage: a run from a registered model on a built dataset, step by step into the
//! log, checkpoints registered as models, resumed exactly after its executor dies.
//!
//! Order of a run: load the dataset's pair questions (multi questions counted and skipped), the
//! reward modules (by the hashes the server pinned), the starting model (from the model store)
//! and, for GRPO with a KL weight, a frozen copy of it; restore the last checkpoint an earlier
//! attempt recorded, if any; validate before the first step; then per step draw a balanced batch
//! ([`BalancedSampler`]), run it ([`Trainer::step`]), upload its rollouts and record a
//! `train_step` event; validate every `validate_every` steps and checkpoint every `save_every`,
//! and both after the last step.
//!
//! A checkpoint is two things. The model, bf16 in the Hugging Face layout, registered with this
//! job as its writer (lineage: checkpoint ← job ← dataset, reward modules, starting model). And
//! the run's state: the f32 weights the optimizer updates, its moments, the step reached and the
//! run's record so far, uploaded as blobs and named by the artefact `train-state`, which a
//! re-leased attempt reads to continue. The sampler's position and every generator are functions
//! of the run's seed and the step, so the step is all the state they need. On the CPU a run
//! killed and resumed ends bit-identical to an uninterrupted one (`tests/resume.rs`). The
//! executor keeps the last two checkpoints' files on its disk; the server keeps every one.
//!
//! Faults. A reward module that traps fails the job with `module_error` and the module's code;
//! the checkpoints already registered stay (a module is not a bug of the run, so it is not
//! retried). Cancellation is seen between micro-batches and between steps: the step in progress
//! is dropped before the optimizer runs. A model whose training state would not fit the
//! executor's model budget is refused before it is loaded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use twin_core::event::JobOutput;
use twin_core::job::JobState;
use twin_core::score::RewardTerm;
use twin_core::spec::JobSpec;
use twin_core::train::{
    BalancedSampler, TrainCheckpoint, TrainObjective, TrainOutput, TrainRecord, TrainSpec,
    TrainStep, TrainValidation,
};
use twin_core::{BlobHash, JobKind};
use twin_data::build::{BuiltDataset, Split};
use twin_ml::qwen::{QwenAssets, QwenVl};
use twin_ml::train::{ActorLossConfig, AdamWConfig, KlPenalty, LossAggregation, PolicyLossConfig};
use twin_plugins::{Host, Module, PluginError, QuestionType, RewardScore};
use twin_stage::{ModelCache, ModelStore, Stage, StageContext, StageError};

use crate::data::{Example, Prompter, pair_rows};
use crate::trainer::{Answer, Response, Reward, Rollout, TrainSettings, Trainer};

/// The artefact naming the run's last saved state.
pub const STATE_ARTEFACT: &str = "train-state";
const STATE_FORMAT: &str = "twin-train-state/1";

/// Runs `train` jobs; reward modules on the shared plugin host, models from the shared store.
pub struct TrainStage {
    host: Arc<Host>,
    models: Arc<ModelCache>,
    store: Arc<ModelStore>,
}

impl TrainStage {
    pub fn new(host: Arc<Host>, models: Arc<ModelCache>, store: Arc<ModelStore>) -> Self {
        Self {
            host,
            models,
            store,
        }
    }
}

/// What `train-state` holds: where the run is and what it has recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedState {
    format: String,
    step: u64,
    /// The registered bf16 checkpoint of this step.
    model: BlobHash,
    /// `weights.safetensors` and `optimizer.safetensors` of [`Trainer::save_state`].
    weights: BlobHash,
    optimizer: BlobHash,
    checkpoints: Vec<TrainCheckpoint>,
    initial_validation: Option<TrainValidation>,
}

/// A reward term ready to run.
struct Term {
    name: String,
    module_ref: String,
    module: Arc<Module>,
    weight: f64,
    params: String,
}

/// A reward module's failure as the job's (the module's own fault is `module_error` with the
/// host's code as the detail), as the score stage reports it.
fn module_error(term: &str, module: &str, e: &PluginError) -> StageError {
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

impl TrainStage {
    fn terms(&self, spec: &TrainSpec, ctx: &StageContext) -> Result<Vec<Term>, StageError> {
        let single = spec.reward.module.is_some();
        spec.reward
            .terms()
            .into_iter()
            .map(|t: RewardTerm| {
                let hash = t.module_hash.ok_or_else(|| {
                    StageError::internal(format!("module {} was not resolved to a hash", t.module))
                })?;
                let name = if single {
                    String::new()
                } else if t.name.is_empty() {
                    t.module.clone()
                } else {
                    t.name.clone()
                };
                let module = match self.host.get(&hash.to_hex()) {
                    Some(m) => m,
                    None => self
                        .host
                        .load(&ctx.download(&hash)?)
                        .map_err(|e| module_error(&name, &t.module, &e))?,
                };
                Ok(Term {
                    name,
                    module_ref: t.module,
                    module,
                    weight: t.weight,
                    params: t.params.to_string(),
                })
            })
            .collect()
    }
}

/// Scores responses with every term: total = Σ weight × score; each named term's score and the
/// modules' own components are kept as components.
fn score(
    host: &Host,
    terms: &[Term],
    spec: &TrainSpec,
    responses: &[Response<'_>],
) -> Result<Vec<Reward>, StageError> {
    let limits = host.config().limits.with_job_limits(&spec.limits);
    let rollouts: Vec<twin_plugins::Rollout> = responses
        .iter()
        .map(|r| twin_plugins::Rollout {
            prompt: r.example.question.clone(),
            completion: r.completion.to_owned(),
            ground_truth: r.example.answer.clone(),
            question_type: QuestionType::Pair,
            metadata: serde_json::json!({ "id": r.example.id }).to_string(),
        })
        .collect();
    let mut out: Vec<Reward> = vec![
        Reward {
            score: 0.0,
            components: BTreeMap::new(),
        };
        rollouts.len()
    ];
    for term in terms {
        for (c, chunk) in rollouts
            .chunks(twin_core::score::MAX_BATCH as usize)
            .enumerate()
        {
            let scored = host
                .score(
                    &term.module,
                    &term.params,
                    &spec.grants,
                    Some(&limits),
                    chunk,
                )
                .map_err(|e| module_error(&term.name, &term.module_ref, &e))?;
            if scored.values.len() != chunk.len() {
                return Err(StageError::module(
                    "wrong_count",
                    format!(
                        "reward module {} scored {} of {} responses",
                        term.module_ref,
                        scored.values.len(),
                        chunk.len()
                    ),
                ));
            }
            for (j, RewardScore { score, components }) in scored.values.into_iter().enumerate() {
                let r = &mut out[c * twin_core::score::MAX_BATCH as usize + j];
                r.score += term.weight * score;
                if !term.name.is_empty() {
                    r.components.insert(term.name.clone(), score);
                }
                for (part, value) in components {
                    let key = if term.name.is_empty() {
                        part
                    } else {
                        format!("{}.{part}", term.name)
                    };
                    r.components.insert(key, value);
                }
            }
        }
    }
    Ok(out)
}

/// Bytes a run holds per parameter: the weights, their gradients, AdamW's two f32 moments, and
/// the frozen reference; on a GPU weights in bf16 plus f32 masters.
fn training_bytes(parameters: u64, gpu: bool, reference: bool) -> u64 {
    let per = if gpu {
        2 + 2 + 4 + 8 + if reference { 2 } else { 0 }
    } else {
        4 + 4 + 8 + if reference { 4 } else { 0 }
    };
    parameters.saturating_mul(per)
}

fn settings(spec: &TrainSpec) -> Result<TrainSettings, StageError> {
    let aggregation: LossAggregation = spec
        .loss_agg_mode
        .parse()
        .map_err(|e| StageError::bad_input(format!("spec.loss_agg_mode: {e}")))?;
    Ok(TrainSettings {
        objective: spec.objective,
        group_size: match spec.objective {
            TrainObjective::Grpo => spec.group_size as usize,
            TrainObjective::Sft => 1,
        },
        micro_batch: spec.micro_batch as usize,
        learning_rate: spec.learning_rate,
        actor: ActorLossConfig {
            policy: PolicyLossConfig {
                clip_ratio_low: spec.clip,
                clip_ratio_high: spec.clip,
                clip_ratio_c: spec.dual_clip,
            },
            aggregation,
            kl_penalty: KlPenalty::LOW_VAR_KL,
            kl_coef: spec.kl_coef,
            entropy_coeff: 0.0,
        },
        adamw: AdamWConfig {
            weight_decay: spec.weight_decay,
            max_grad_norm: Some(spec.max_grad_norm),
            ..AdamWConfig::default()
        },
        temperature: spec.temperature,
        top_p: spec.top_p,
        max_response_tokens: spec.max_response_tokens as usize,
        max_prompt_tokens: spec.max_prompt_tokens as usize,
        train_vision: !spec.freeze_vision,
        seed: spec.seed,
        engine_rows: 64,
        activation_checkpointing: false,
    })
}

/// Writes JSON lines.
fn jsonl<T: Serialize>(items: &[T]) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        out.extend_from_slice(serde_json::to_string(item).unwrap_or_default().as_bytes());
        out.push(b'\n');
    }
    out
}

/// One line of a step's rollouts blob: a rollout as a `score` job reads it (`prompt`,
/// `completion`, `ground_truth`, `question_type`), what the run made of it in `metadata` (the
/// step, prompt id, sample, tokens, finish, reward, components, advantage), which `twin train
/// rollouts` shows and a re-scoring module receives.
#[derive(Debug, Serialize)]
struct RolloutLine<'a> {
    prompt: &'a str,
    completion: &'a str,
    ground_truth: &'a str,
    question_type: &'static str,
    metadata: RolloutMetadata<'a>,
}

#[derive(Debug, Serialize)]
struct RolloutMetadata<'a> {
    step: u64,
    #[serde(flatten)]
    rollout: &'a Rollout,
}

fn file_err(path: &Path) -> impl Fn(std::io::Error) -> StageError + '_ {
    move |e| StageError::internal(format!("{}: {e}", path.display()))
}

impl Stage for TrainStage {
    fn kind(&self) -> JobKind {
        JobKind::Train
    }

    fn run(&self, job: &JobState, ctx: &StageContext) -> Result<JobOutput, StageError> {
        let started = Instant::now();
        let JobSpec::Train(spec) = &job.submission.spec else {
            return Err(StageError::internal(
                "the train stage got another kind of job",
            ));
        };
        let spec: &TrainSpec = spec;
        let device = twin_ml::device::for_job(spec.device)
            .map_err(|e| StageError::new(e.failure_code(), format!("spec.device: {e}")))?;
        let manifest = spec
            .manifest
            .ok_or_else(|| StageError::internal("spec.manifest was not pinned at submission"))?;
        let dataset = BuiltDataset::from_manifest(&ctx.download(&manifest)?)
            .map_err(|e| StageError::bad_input(format!("built dataset {manifest}: {e}")))?;
        let train = pair_rows(&dataset, Split::Train)?;
        let validation = pair_rows(&dataset, Split::Eval)?;
        let sampler = BalancedSampler::new(
            train.yes.len(),
            train.no.len(),
            spec.batch_prompts as usize,
            spec.seed,
        )
        .map_err(|m| StageError::bad_input(format!("spec.dataset: {m}")))?;
        let total_steps = {
            let epochs = sampler
                .steps_per_epoch()
                .saturating_mul(u64::from(spec.epochs));
            spec.max_steps.map_or(epochs, |m| epochs.min(u64::from(m)))
        };
        let terms = self.terms(spec, ctx)?;

        // The starting model, held in the store while the run reads it.
        let start = self.store.resolve(ctx, &spec.model, spec.model_manifest)?;
        let checkpoint = twin_ml::weights::Checkpoint::open(&start.dir)
            .map_err(|e| StageError::new(e.loading_failure_code(), format!("spec.model: {e}")))?;
        let gpu = device.device != twin_ml::tch::Device::Cpu;
        let with_reference = spec.objective == TrainObjective::Grpo && spec.kl_coef > 0.0;
        let parameters = checkpoint.bytes_as(twin_ml::tch::Kind::Float, |_| true) / 4;
        let needed = training_bytes(parameters, gpu, with_reference);
        if needed > self.models.budget() {
            return Err(StageError::out_of_memory(format!(
                "spec.model: training its {parameters} parameters takes about {needed} bytes \
                 (weights, gradients, optimizer state{}), more than this executor's model \
                 budget of {} bytes",
                if with_reference {
                    ", reference model"
                } else {
                    ""
                },
                self.models.budget()
            ))
            .retryable(false));
        }
        let load = |what: &str| {
            QwenVl::load(&start.dir, device.device).map_err(|e| {
                StageError::new(
                    e.loading_failure_code(),
                    format!("spec.model ({what}): {e}"),
                )
            })
        };
        let model = load("policy")?;
        let reference = with_reference.then(|| load("reference")).transpose()?;
        let assets = QwenAssets::load(&start.dir, model.config())
            .map_err(|e| StageError::new(e.loading_failure_code(), format!("spec.model: {e}")))?;
        let mut trainer = Trainer::new(model, reference, assets, settings(spec)?)?;

        let work_root = self.store.root().join("tmp");
        std::fs::create_dir_all(&work_root).map_err(file_err(&work_root))?;
        let work = tempfile::TempDir::new_in(&work_root).map_err(file_err(&work_root))?;

        // Resume from the last state an earlier attempt saved.
        let mut run = Run {
            ctx,
            start_dir: start.dir.clone(),
            work: work.path().to_owned(),
            checkpoints: Vec::new(),
            initial_validation: None,
            last_validation: None,
            saved: Vec::new(),
        };
        let mut step = 0u64;
        if let Some(blob) = ctx.recorded(STATE_ARTEFACT) {
            let state: SavedState = serde_json::from_slice(&ctx.download(&blob)?)
                .map_err(|e| StageError::internal(format!("train state {blob}: {e}")))?;
            if state.format != STATE_FORMAT {
                return Err(StageError::internal(format!(
                    "train state {blob} is {}, not {STATE_FORMAT}",
                    state.format
                )));
            }
            let dir = work.path().join("resume");
            std::fs::create_dir_all(&dir).map_err(file_err(&dir))?;
            ctx.download_to_file(&state.weights, &dir.join("weights.safetensors"))?;
            ctx.download_to_file(&state.optimizer, &dir.join("optimizer.safetensors"))?;
            trainer.load_state(&dir)?;
            step = state.step;
            run.checkpoints = state.checkpoints;
            run.initial_validation = state.initial_validation;
            ctx.note(&format!(
                "resumed after step {step} from the run's last checkpoint"
            ));
        }
        let resumed_from = step;

        // Validation questions, prepared once.
        let fetch = |h: &BlobHash| ctx.download(h);
        let mut val_rows: Vec<_> = validation
            .yes
            .iter()
            .chain(&validation.no)
            .copied()
            .collect();
        val_rows.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(limit) = spec.validation_limit {
            val_rows.truncate(limit as usize);
        }
        let val_examples: Vec<Example> = {
            let mut prompter =
                Prompter::new(&trainer.assets, &fetch, spec.max_prompt_tokens as usize);
            val_rows
                .iter()
                .map(|r| prompter.example(r))
                .collect::<Result<_, _>>()?
        };
        let stop = || ctx.check_cancelled();
        let host = &self.host;
        let mut reward = |responses: &[Response<'_>]| score(host, &terms, spec, responses);

        if step == 0 && !val_examples.is_empty() {
            let v = run.validate(&trainer, 0, &val_examples, &mut reward)?;
            run.initial_validation = Some(v);
        }
        while step < total_steps {
            ctx.check_cancelled()?;
            let (yes, no) = sampler.batch(step);
            let rows: Vec<_> = yes
                .iter()
                .map(|&i| train.yes[i])
                .chain(no.iter().map(|&i| train.no[i]))
                .collect();
            let examples: Vec<Example> = {
                let mut prompter =
                    Prompter::new(&trainer.assets, &fetch, spec.max_prompt_tokens as usize);
                rows.iter()
                    .map(|r| prompter.example(r))
                    .collect::<Result<_, _>>()?
            };
            let batch: Vec<&Example> = examples.iter().collect();
            let report = trainer.step(step + 1, &batch, &mut reward, &stop)?;
            step += 1;
            let rollouts = if report.rollouts.is_empty() {
                None
            } else {
                let by_id: BTreeMap<&str, &Example> =
                    examples.iter().map(|e| (e.id.as_str(), e)).collect();
                let lines: Vec<RolloutLine<'_>> = report
                    .rollouts
                    .iter()
                    .map(|r| {
                        let e = by_id.get(r.prompt_id.as_str());
                        RolloutLine {
                            prompt: e.map_or("", |e| e.question.as_str()),
                            completion: &r.completion,
                            ground_truth: e.map_or("", |e| e.answer.as_str()),
                            question_type: "pair",
                            metadata: RolloutMetadata { step, rollout: r },
                        }
                    })
                    .collect();
                Some(ctx.upload(jsonl(&lines))?)
            };
            let data_epoch = (step - 1) / sampler.steps_per_epoch();
            ctx.record_training(&TrainRecord::Step(TrainStep {
                epoch: 0,
                step,
                data_epoch,
                metrics: report.metrics.clone(),
                rollouts,
            }))?;
            let m = &report.metrics;
            ctx.progress(
                step as usize,
                total_steps as usize,
                &format!(
                    "step {step} of {total_steps}: reward {:.3}, loss {:.4}",
                    m.reward_mean, m.policy_loss
                ),
                BTreeMap::from([
                    ("step".to_owned(), step as f64),
                    ("reward_mean".to_owned(), m.reward_mean),
                    ("policy_loss".to_owned(), m.policy_loss),
                ]),
            );
            let last = step == total_steps;
            if (spec.validate_every > 0 && step.is_multiple_of(u64::from(spec.validate_every))
                || last)
                && !val_examples.is_empty()
            {
                run.validate(&trainer, step, &val_examples, &mut reward)?;
            }
            if step.is_multiple_of(u64::from(spec.save_every)) || last {
                run.save(&trainer, step)?;
            }
        }
        // A run resumed after its last step (it died before completing) has everything saved.
        let final_model = match run.checkpoints.last() {
            Some(c) => c.model,
            None => {
                run.save(&trainer, step)?;
                run.checkpoints
                    .last()
                    .map(|c| c.model)
                    .ok_or_else(|| StageError::internal("no checkpoint was saved"))?
            }
        };
        if let Some(name) = &spec.register_as {
            let dir = run.saved.last().map(|(_, d)| d.join("model"));
            match dir {
                Some(dir) => {
                    ctx.register_checkpoint(&dir, Some(name))?;
                }
                None => {
                    // Saved by an earlier attempt: its files are not here; write them again.
                    run.save(&trainer, step)?;
                    if let Some((_, dir)) = run.saved.last() {
                        ctx.register_checkpoint(&dir.join("model"), Some(name))?;
                    }
                }
            }
        }
        Ok(JobOutput::Train(TrainOutput {
            objective: spec.objective,
            steps: step,
            model: final_model,
            checkpoints: run.checkpoints,
            train_yes: train.yes.len() as u64,
            train_no: train.no.len() as u64,
            skipped_multi: train.skipped_multi,
            initial_validation: run.initial_validation,
            final_validation: run.last_validation,
            resumed_from,
            device: device.name,
            wall_seconds: started.elapsed().as_secs_f64(),
        }))
    }
}

/// A run's bookkeeping: what it has saved and validated.
struct Run<'a> {
    ctx: &'a StageContext,
    start_dir: PathBuf,
    work: PathBuf,
    checkpoints: Vec<TrainCheckpoint>,
    initial_validation: Option<TrainValidation>,
    last_validation: Option<TrainValidation>,
    /// Local checkpoint directories of this attempt, oldest first (the last two are kept).
    saved: Vec<(u64, PathBuf)>,
}

impl Run<'_> {
    fn validate(
        &mut self,
        trainer: &Trainer,
        step: u64,
        examples: &[Example],
        reward: &mut crate::trainer::RewardFn<'_>,
    ) -> Result<TrainValidation, StageError> {
        let stop = || self.ctx.check_cancelled();
        let answers: Vec<Answer> = trainer.validate(examples, reward, &stop)?;
        let n = answers.len().max(1) as f64;
        let samples = self.ctx.upload(jsonl(&answers))?;
        let v = TrainValidation {
            epoch: 0,
            step,
            questions: answers.len() as u64,
            reward_mean: answers.iter().map(|a| a.reward).sum::<f64>() / n,
            pair_accuracy: answers.iter().map(|a| a.pair_score).sum::<f64>() / n,
            truncated: answers.iter().filter(|a| a.truncated).count() as u64,
            samples,
        };
        self.ctx
            .record_training(&TrainRecord::Validation(v.clone()))?;
        self.last_validation = Some(v.clone());
        Ok(v)
    }

    /// Writes, uploads and registers the checkpoint of `step`, then records the run's state.
    fn save(&mut self, trainer: &Trainer, step: u64) -> Result<(), StageError> {
        let dir = self.work.join(format!("step-{step:08}"));
        let model_dir = dir.join("model");
        let state_dir = dir.join("state");
        trainer.save_checkpoint(&model_dir, &self.start_dir)?;
        trainer.save_state(&state_dir)?;
        let model = self.ctx.register_checkpoint(&model_dir, None)?;
        let weights = self
            .ctx
            .upload_file(&state_dir.join("weights.safetensors"))?;
        let optimizer = self
            .ctx
            .upload_file(&state_dir.join("optimizer.safetensors"))?;
        self.checkpoints.retain(|c| c.step != step);
        self.checkpoints.push(TrainCheckpoint { step, model });
        let state = SavedState {
            format: STATE_FORMAT.to_owned(),
            step,
            model,
            weights,
            optimizer,
            checkpoints: self.checkpoints.clone(),
            initial_validation: self.initial_validation.clone(),
        };
        let blob = self
            .ctx
            .upload(serde_json::to_vec(&state).unwrap_or_default())?;
        self.ctx.record_artefact(STATE_ARTEFACT, blob)?;
        self.ctx.note(&format!(
            "checkpoint of step {step} registered as model {model}"
        ));
        self.saved.push((step, dir));
        while self.saved.len() > 2 {
            let (_, old) = self.saved.remove(0);
            let _ = std::fs::remove_dir_all(old);
        }
        Ok(())
    }
}
