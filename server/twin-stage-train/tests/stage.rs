//! The train stage end to end against an in-memory server: a tiny random Qwen2.5-VL checkpoint
//! registered as a model, a dataset built from generated images, the catalogue's reward modules.
//! A run records its steps and validations, registers checkpoints an eval job loads by hash,
//! resumes bit-identical after its executor dies, and refuses or fails cleanly on bad input.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use twin_core::event::{JobOutput, ManifestEntry};
use twin_core::job::JobState;
use twin_core::train::{TrainOutput, TrainRecord};
use twin_core::{BlobHash, FailureCode};
use twin_data::build::{BuildConfig, BuildInputs, RowKind};
use twin_ml::qwen::{QwenPreprocessor, QwenTokenizer, QwenVl, QwenVlConfig};
use twin_ml::tch::{Device, Kind};
use twin_plugins::{Host, HostConfig};
use twin_stage::testing::{MemoryBackend, job};
use twin_stage::{ModelCache, ModelStore, Stage, StageError};
use twin_stage_train::{STATE_ARTEFACT, TrainStage};

fn modules_dir() -> PathBuf {
    std::env::var_os("TWIN_MODULES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/wasm32-wasip2/guest")
        })
}

/// A catalogue or test module's bytes, stored on the backend; returns its hash.
fn module(backend: &MemoryBackend, name: &str) -> BlobHash {
    let path = modules_dir().join(format!("{name}.wasm"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; build the modules first with deploy/build-modules.sh",
            path.display()
        )
    });
    backend.put(bytes)
}

/// A seeded random tiny checkpoint with small images (4 tokens each), uploaded as a registered
/// model would be; returns its manifest hash.
fn tiny_model(backend: &MemoryBackend, dir: &Path) -> BlobHash {
    let model =
        QwenVl::init_random_scaled(QwenVlConfig::tiny(), 11, Device::Cpu, Kind::Float, 25.0)
            .unwrap();
    let preprocessor = QwenPreprocessor {
        min_pixels: 56 * 56,
        max_pixels: 56 * 56,
        ..QwenPreprocessor::default()
    };
    model.save_pretrained(dir, &preprocessor).unwrap();
    QwenTokenizer::byte_level().unwrap().save(dir).unwrap();
    let local = twin_client::models::scan_model_dir(dir, |_, _| {}).unwrap();
    for path in &local.paths {
        backend.put(std::fs::read(path).unwrap());
    }
    backend.put(local.manifest.to_bytes())
}

fn png(n: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(64, 48, |x, y| {
        image::Rgb([(n * 37) as u8, (x * 3 + n) as u8, (y * 5) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A built dataset of 2 categories × 4 instances × 3 images with random negatives, half of the
/// instances held out for validation; `labels` keeps only pairs whose answer it lists. Returns
/// the manifest hash.
fn dataset(backend: &MemoryBackend, labels: &[&str]) -> BlobHash {
    let mut images = Vec::new();
    let mut n = 0;
    for category in ["mug", "shoe"] {
        for i in 0..4 {
            for k in 0..3 {
                let bytes = png(n);
                n += 1;
                images.push(ManifestEntry {
                    blob: backend.put(bytes),
                    path: format!("{category}/i{i}/{k}.png"),
                    category: category.into(),
                    instance: format!("i{i}"),
                    width: 64,
                    height: 48,
                    format: "png".into(),
                    phash: "0000000000000000".into(),
                });
            }
        }
    }
    let config = BuildConfig::from_json(&serde_json::json!({
        "seed": 5, "eval_fraction": 0.5, "negatives": "random",
        "multi_questions": {"train": 4},
    }))
    .unwrap();
    let mut built = twin_data::build::build(
        &BuildInputs {
            images: &images,
            hard_negatives: &[],
            synthetic_negatives: &[],
        },
        &config,
    )
    .unwrap();
    built
        .rows
        .retain(|r| matches!(r.kind, RowKind::Multi { .. }) || labels.contains(&r.answer.as_str()));
    backend.put(built.manifest().bytes)
}

struct Fixture {
    backend: MemoryBackend,
    stage: TrainStage,
    model: BlobHash,
    manifest: BlobHash,
    reward: BlobHash,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

fn fixture(labels: &[&str], budget: u64) -> Fixture {
    let backend = MemoryBackend::new();
    let model_dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&backend, model_dir.path());
    let manifest = dataset(&backend, labels);
    let reward = module(&backend, "binary_match");
    let host = Arc::new(Host::new(HostConfig::default()).unwrap());
    let stage = TrainStage::new(
        host,
        Arc::new(ModelCache::new(budget)),
        Arc::new(ModelStore::open(store_dir.path(), 1 << 30).unwrap()),
    );
    Fixture {
        backend,
        stage,
        model,
        manifest,
        reward,
        _dirs: (model_dir, store_dir),
    }
}

impl Fixture {
    /// A small GRPO spec over the fixture's pins, `extra` merged in.
    fn job(&self, extra: serde_json::Value) -> JobState {
        let mut spec = serde_json::json!({
            "kind": "train",
            "dataset": "pairs",
            "manifest": self.manifest.to_hex(),
            "dataset_name": "pairs",
            "model": "tiny",
            "model_manifest": self.model.to_hex(),
            "reward": {"module": "binary-match", "module_hash": self.reward.to_hex()},
            "batch_prompts": 4,
            "group_size": 2,
            "micro_batch": 4,
            "max_response_tokens": 4,
            "max_steps": 3,
            "validate_every": 2,
            "save_every": 2,
            "validation_limit": 4,
            "learning_rate": 1e-3,
            "seed": 9,
        });
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        job(spec)
    }

    fn run(&self, job: &JobState) -> Result<TrainOutput, StageError> {
        let ctx = self.backend.context(&self.backend.artefacts());
        match self.stage.run(job, &ctx)? {
            JobOutput::Train(out) => Ok(out),
            other => panic!("a train job returned {other:?}"),
        }
    }
}

#[test]
fn a_grpo_run_records_steps_validations_and_checkpoints_an_eval_job_loads() {
    let f = fixture(&["yes", "no"], 1 << 30);
    let out = f.run(&f.job(serde_json::json!({}))).unwrap();
    assert_eq!(out.steps, 3);
    assert_eq!(out.resumed_from, 0);
    assert!(out.train_yes > 0 && out.train_no > 0);
    assert!(
        out.skipped_multi > 0,
        "multi questions are counted, not trained on"
    );
    // Checkpoints every 2 steps and after the last, each registered by the job.
    let steps: Vec<u64> = out.checkpoints.iter().map(|c| c.step).collect();
    assert_eq!(steps, [2, 3]);
    let registered: Vec<BlobHash> = f.backend.checkpoints().into_iter().map(|c| c.0).collect();
    assert_eq!(
        registered,
        out.checkpoints.iter().map(|c| c.model).collect::<Vec<_>>()
    );
    assert_eq!(out.model, out.checkpoints[1].model);
    assert!(f.backend.names().contains(&STATE_ARTEFACT.to_owned()));

    let records = f.backend.training();
    let step_numbers: Vec<u64> = records
        .iter()
        .filter_map(|r| match r {
            TrainRecord::Step(s) => Some(s.step),
            TrainRecord::Validation(_) => None,
        })
        .collect();
    assert_eq!(step_numbers, [1, 2, 3]);
    let validated: Vec<u64> = records
        .iter()
        .filter_map(|r| match r {
            TrainRecord::Validation(v) => Some(v.step),
            TrainRecord::Step(_) => None,
        })
        .collect();
    assert_eq!(validated, [0, 2, 3]);
    for r in &records {
        r.check_finite().unwrap();
        if let TrainRecord::Step(s) = r {
            let m = &s.metrics;
            assert!(m.response_length_max <= 4 && m.response_length_mean >= 1.0);
            assert!(m.kl.is_some(), "the recipe's KL term is on by default");
            // Both sides compute in f32 on the CPU: the engine's log-probabilities are the
            // trainer's up to float noise.
            assert!(m.logprob_gap.unwrap() < 1e-3, "gap {:?}", m.logprob_gap);
            // Every rollout is in its blob, with what a score job needs.
            let blob = f.backend.blob(&s.rollouts.unwrap());
            let lines: Vec<serde_json::Value> = blob
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| serde_json::from_slice(l).unwrap())
                .collect();
            assert_eq!(lines.len(), 8);
            // A score job reads the same blob: a run re-scores with another module.
            assert_eq!(twin_plugins::parse_rollouts(&blob).unwrap().len(), 8);
            for l in &lines {
                for key in ["prompt", "completion", "ground_truth", "question_type"] {
                    assert!(l.get(key).is_some(), "{key} missing in {l}");
                }
                for key in ["step", "prompt_id", "reward", "components", "advantage"] {
                    assert!(
                        l["metadata"].get(key).is_some(),
                        "metadata.{key} missing in {l}"
                    );
                }
            }
        }
    }

    // An eval job loads the last checkpoint by its hash, through the model store.
    let ctx = f.backend.context(&[]);
    let host = Arc::new(Host::new(HostConfig::default()).unwrap());
    let store_dir = tempfile::tempdir().unwrap();
    let eval = twin_stage_eval_stage(host, store_dir.path());
    let pair = module(&f.backend, "fgvqa_pair");
    let multi = module(&f.backend, "fgvqa_multi");
    let eval_job = job(serde_json::json!({
        "kind": "eval",
        "model": out.model.to_hex(),
        "model_manifest": out.model.to_hex(),
        "data": {"built": "pairs"},
        "manifest": f.manifest.to_hex(),
        "dataset_name": "pairs",
        "max_new_tokens": 4,
        "limit": 2,
        "scorers": {
            "pair": {"module": "fgvqa-pair", "module_hash": pair.to_hex()},
            "multi": {"module": "fgvqa-multi", "module_hash": multi.to_hex()},
        },
    }));
    let JobOutput::Eval(evaluated) = eval.run(&eval_job, &ctx).unwrap() else {
        panic!("an eval output")
    };
    assert_eq!(evaluated.model_manifest, Some(out.model));
    assert!(evaluated.questions > 0);
}

fn twin_stage_eval_stage(host: Arc<Host>, store: &Path) -> twin_stage_eval::EvalStage {
    twin_stage_eval::EvalStage::new(
        host,
        Arc::new(ModelCache::new(1 << 30)),
        Arc::new(ModelStore::open(store, 1 << 30).unwrap()),
    )
}

/// The model a run's last checkpoint holds, and the f32 weights and optimizer state it saved.
fn final_state(f: &Fixture, out: &TrainOutput) -> serde_json::Value {
    let state = f
        .backend
        .artefacts()
        .into_iter()
        .rev()
        .find(|a| a.name == STATE_ARTEFACT);
    let state: serde_json::Value =
        serde_json::from_slice(&f.backend.blob(&state.unwrap().blob)).unwrap();
    assert_eq!(state["model"], serde_json::json!(out.model.to_hex()));
    serde_json::json!({
        "model": state["model"], "weights": state["weights"], "optimizer": state["optimizer"],
    })
}

#[test]
fn a_run_killed_after_a_checkpoint_resumes_and_ends_bit_identical() {
    let spec = serde_json::json!({"max_steps": 4});
    let whole = fixture(&["yes", "no"], 1 << 30);
    let uninterrupted = whole.run(&whole.job(spec.clone())).unwrap();

    let killed = fixture(&["yes", "no"], 1 << 30);
    // The executor "dies" right after recording the state of step 2.
    killed.backend.cancel_after(STATE_ARTEFACT);
    let err = killed.run(&killed.job(spec.clone())).unwrap_err();
    assert!(err.message.contains("cancel"), "{err:?}");
    killed.backend.reset_cancel();
    let resumed = killed.run(&killed.job(spec)).unwrap();
    assert_eq!(resumed.resumed_from, 2);
    assert_eq!(resumed.steps, 4);
    assert_eq!(
        final_state(&killed, &resumed),
        final_state(&whole, &uninterrupted)
    );
    assert_eq!(resumed.checkpoints, uninterrupted.checkpoints);
}

#[test]
fn sft_trains_on_the_answer_in_the_rewards_format() {
    let f = fixture(&["yes", "no"], 1 << 30);
    let out = f
        .run(&f.job(serde_json::json!({
            "objective": "sft", "group_size": 1, "max_steps": 2, "save_every": 2,
        })))
        .unwrap();
    assert_eq!(out.steps, 2);
    let losses: Vec<f64> = f
        .backend
        .training()
        .iter()
        .filter_map(|r| match r {
            TrainRecord::Step(s) => Some(s.metrics.policy_loss),
            TrainRecord::Validation(_) => None,
        })
        .collect();
    assert_eq!(losses.len(), 2);
    assert!(
        losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );
}

#[test]
fn a_split_without_one_label_is_refused() {
    let f = fixture(&["yes"], 1 << 30);
    let err = f.run(&f.job(serde_json::json!({}))).unwrap_err();
    assert_eq!(err.code, FailureCode::BadInput, "{err:?}");
    assert!(err.message.contains("both labels"), "{}", err.message);
}

#[test]
fn a_reward_module_that_traps_fails_the_job_with_its_code_and_keeps_checkpoints() {
    let f = fixture(&["yes", "no"], 1 << 30);
    let misbehave = module(&f.backend, "misbehave");
    // The good term runs first: the run checkpoints nothing before the trap, but must fail with
    // the module's code, not retry or score zero.
    let err = f
        .run(&f.job(serde_json::json!({
            "reward": {"module": "misbehave", "module_hash": misbehave.to_hex(),
                       "params": {"mode": "panic"}},
        })))
        .unwrap_err();
    assert_eq!(err.code, FailureCode::ModuleError, "{err:?}");
    assert_eq!(err.detail.as_deref(), Some("guest_trap"), "{err:?}");
}

#[test]
fn a_weighted_sum_may_give_rewards_that_are_not_binary() {
    let f = fixture(&["yes", "no"], 1 << 30);
    let misbehave = module(&f.backend, "misbehave");
    let out = f
        .run(&f.job(serde_json::json!({
            "max_steps": 1,
            "reward": {"weighted_sum": [
                {"name": "match", "module": "binary-match", "module_hash": f.reward.to_hex(),
                 "weight": 1.0},
                {"name": "length", "module": "misbehave", "module_hash": misbehave.to_hex(),
                 "weight": 0.25, "params": {"mode": "ok"}},
            ]},
        })))
        .unwrap();
    assert_eq!(out.steps, 1);
    let step = f
        .backend
        .training()
        .into_iter()
        .find_map(|r| match r {
            TrainRecord::Step(s) => Some(s),
            TrainRecord::Validation(_) => None,
        })
        .unwrap();
    let blob = f.backend.blob(&step.rollouts.unwrap());
    let first: serde_json::Value =
        serde_json::from_slice(blob.split(|b| *b == b'\n').next().unwrap()).unwrap();
    let components = first["metadata"]["components"].as_object().unwrap();
    assert!(components.contains_key("match") && components.contains_key("length"));
    let length = components["length"].as_f64().unwrap();
    let reward = first["metadata"]["reward"].as_f64().unwrap();
    assert!(
        (reward - (components["match"].as_f64().unwrap() + 0.25 * length)).abs() < 1e-9,
        "{first}"
    );
}

#[test]
fn cancellation_stops_the_run_and_leaves_the_last_checkpoint() {
    let f = fixture(&["yes", "no"], 1 << 30);
    f.backend.cancel_after(STATE_ARTEFACT);
    let err = f
        .run(&f.job(serde_json::json!({"max_steps": 4})))
        .unwrap_err();
    assert!(err.message.contains("cancel"), "{err:?}");
    // Step 2's checkpoint is registered and its state recorded; nothing after it.
    assert_eq!(f.backend.checkpoints().len(), 1);
    let steps = f
        .backend
        .training()
        .iter()
        .filter(|r| matches!(r, TrainRecord::Step(_)))
        .count();
    assert_eq!(steps, 2);
}

#[test]
fn a_model_too_large_for_the_executors_budget_is_refused_before_loading() {
    let f = fixture(&["yes", "no"], 1 << 20);
    let err = f.run(&f.job(serde_json::json!({}))).unwrap_err();
    assert_eq!(err.code, FailureCode::OutOfMemory, "{err:?}");
    assert!(err.message.contains("budget"), "{}", err.message);
    assert!(!err.retryable);
    assert!(f.backend.training().is_empty());
}
