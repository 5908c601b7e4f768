//! GRPO learns: on the CPU, within seconds, a tiny random Qwen2.5-VL policy given an SFT warm
//! start (so it answers `<answer>yes</answer>` or `<answer>no</answer>`, half and half, to every
//! prompt) is trained by GRPO with the TWIN reward on a task it can learn: every label is "yes".
//! Its mean reward must rise by a clear margin; the same run with each step's rewards shuffled
//! across the batch (no link between a response and its reward) must not rise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use image::{DynamicImage, RgbImage};
use twin_core::train::TrainObjective;
use twin_ml::qwen::{QwenAssets, QwenPreprocessor, QwenTokenizer, QwenVl, QwenVlConfig};
use twin_ml::tch::{Device, Kind};
use twin_ml::train::{ActorLossConfig, AdamWConfig};
use twin_stage::StageError;
use twin_stage_train::data::{Example, training_message};
use twin_stage_train::trainer::{Response, Reward, TrainSettings, Trainer};

const PROMPTS: usize = 8;
const GROUP: usize = 4;
const GRPO_STEPS: u64 = 16;
const SFT_STEPS: u64 = 80;

fn settings(objective: TrainObjective, learning_rate: f64) -> TrainSettings {
    TrainSettings {
        objective,
        group_size: if objective == TrainObjective::Grpo {
            GROUP
        } else {
            1
        },
        micro_batch: 16,
        learning_rate,
        actor: ActorLossConfig {
            kl_coef: 0.0,
            ..ActorLossConfig::default()
        },
        adamw: AdamWConfig::default(),
        temperature: 1.0,
        top_p: 1.0,
        max_response_tokens: 24,
        max_prompt_tokens: 512,
        train_vision: true,
        seed: 3,
        engine_rows: 64,
        activation_checkpointing: false,
    }
}

/// The tiny checkpoint's directory, and prompts over generated image pairs.
fn setup(dir: &std::path::Path) -> (QwenVl, QwenAssets, Vec<Example>) {
    let model = QwenVl::init_random(QwenVlConfig::tiny(), 5, Device::Cpu, Kind::Float).unwrap();
    let preprocessor = QwenPreprocessor {
        min_pixels: 56 * 56,
        max_pixels: 56 * 56,
        ..QwenPreprocessor::default()
    };
    model.save_pretrained(dir, &preprocessor).unwrap();
    QwenTokenizer::byte_level().unwrap().save(dir).unwrap();
    let model = QwenVl::load(dir, Device::Cpu).unwrap();
    let assets = QwenAssets::load(dir, model.config()).unwrap();
    let examples = (0..PROMPTS)
        .map(|i| {
            let image = |k: u32| {
                DynamicImage::ImageRgb8(RgbImage::from_fn(56, 56, |x, y| {
                    image::Rgb([(i as u32 * 29 + k * 7) as u8, (x * 4) as u8, (y * 4) as u8])
                }))
            };
            let (a, b) = (image(0), image(1));
            let prompt = assets
                .processor
                .prepare(
                    &assets.tokenizer,
                    &[training_message(2, "Same?")],
                    &[("a", &a), ("b", &b)],
                    true,
                )
                .unwrap();
            Example {
                id: format!("p{i}"),
                question: "Same?".into(),
                answer: "yes".into(),
                prompt,
            }
        })
        .collect();
    (model, assets, examples)
}

/// The TWIN reward (the catalogue's `binary-match`, natively), optionally shuffled across the
/// batch by a seeded permutation.
fn reward(shuffle: Option<&mut u64>, responses: &[Response<'_>]) -> Vec<Reward> {
    let mut scores: Vec<f64> = responses
        .iter()
        .map(|r| twin_rules::binary_match(r.completion, &r.example.answer))
        .collect();
    if let Some(state) = shuffle {
        for i in (1..scores.len()).rev() {
            *state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let j = ((*state >> 33) % (i as u64 + 1)) as usize;
            scores.swap(i, j);
        }
    }
    scores
        .into_iter()
        .map(|score| Reward {
            score,
            components: BTreeMap::new(),
        })
        .collect()
}

/// Warm-starts a tiny policy with SFT on both answers to every prompt, until it writes the
/// answer format (loss under 0.08 nats a token, the yes/no choice left at half and half), and
/// saves it in f32 to `out`; returns the prompts.
fn warm_start(out: &std::path::Path) -> Vec<Example> {
    let dir = tempfile::tempdir().unwrap();
    let (model, assets, examples) = setup(dir.path());
    let mut trainer =
        Trainer::new(model, None, assets, settings(TrainObjective::Sft, 1e-2)).unwrap();
    let both: Vec<Example> = examples
        .iter()
        .flat_map(|e| {
            ["yes", "no"].map(|answer| Example {
                answer: answer.into(),
                ..e.clone()
            })
        })
        .collect();
    let batch: Vec<&Example> = both.iter().collect();
    let mut unused = |_: &[Response<'_>]| -> Result<Vec<Reward>, StageError> { Ok(Vec::new()) };
    let mut loss = f64::INFINITY;
    for step in 1..=SFT_STEPS {
        loss = trainer
            .step(step, &batch, &mut unused, &never)
            .unwrap()
            .metrics
            .policy_loss;
        if loss < 0.08 {
            break;
        }
    }
    println!("SFT warm start: loss {loss:.4} a token");
    let (model, assets) = trainer.into_parts();
    model
        .save_pretrained(out, &assets.processor.preprocessor)
        .unwrap();
    QwenTokenizer::byte_level().unwrap().save(out).unwrap();
    examples
}

fn never() -> Result<(), StageError> {
    Ok(())
}

/// GRPO from the warm start in `dir`; returns what each step's rollouts earned (before the
/// step's update).
fn grpo(dir: &std::path::Path, examples: &[Example], shuffled: bool) -> Vec<f64> {
    let model = QwenVl::load(dir, Device::Cpu).unwrap();
    let assets = QwenAssets::load(dir, model.config()).unwrap();
    let mut trainer =
        Trainer::new(model, None, assets, settings(TrainObjective::Grpo, 2e-3)).unwrap();
    let batch: Vec<&Example> = examples.iter().collect();
    let mut state = 42u64;
    let mut rewards = Vec::new();
    for step in 1..=GRPO_STEPS {
        let mut score = |responses: &[Response<'_>]| -> Result<Vec<Reward>, StageError> {
            Ok(reward(shuffled.then_some(&mut state), responses))
        };
        let report = trainer.step(step, &batch, &mut score, &never).unwrap();
        let earned = report
            .rollouts
            .iter()
            .map(|r| twin_rules::binary_match(&r.completion, "yes"))
            .sum::<f64>()
            / report.rollouts.len() as f64;
        rewards.push(earned);
    }
    rewards
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn grpo_raises_the_reward_of_a_task_the_policy_can_learn_and_shuffled_rewards_do_not() {
    let warm = tempfile::tempdir().unwrap();
    let examples = warm_start(warm.path());
    let learned = grpo(warm.path(), &examples, false);
    let first = mean(&learned[..4]);
    let last = mean(&learned[learned.len() - 4..]);
    println!("GRPO: reward by step {learned:.3?}");
    assert!(
        first > 0.1 && first < 0.9,
        "the warm start answers yes about half the time, got {first:.3}"
    );
    assert!(
        last >= first + 0.25,
        "GRPO should raise the mean reward by 0.25 or more: first steps {first:.3}, last {last:.3}"
    );

    let shuffled = grpo(warm.path(), &examples, true);
    let s_first = mean(&shuffled[..4]);
    let s_last = mean(&shuffled[shuffled.len() - 4..]);
    println!("shuffled: reward by step {shuffled:.3?}");
    assert!(
        s_last < s_first + 0.15,
        "with rewards shuffled the policy has nothing to learn: first {s_first:.3}, last {s_last:.3}"
    );
}

#[test]
fn a_step_cancelled_between_micro_batches_leaves_the_weights_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let (model, assets, examples) = setup(dir.path());
    let mut sft = settings(TrainObjective::Sft, 1e-2);
    sft.micro_batch = 4;
    let mut trainer = Trainer::new(model, None, assets, sft).unwrap();
    let before: Vec<_> = trainer
        .model()
        .trainable_parameters()
        .into_iter()
        .map(|(_, t)| t.detach().copy())
        .collect();
    let batch: Vec<&Example> = examples.iter().collect();
    // The first micro-batch runs; cancellation arrives before the second.
    let calls = std::cell::Cell::new(0);
    let stop = || {
        calls.set(calls.get() + 1);
        if calls.get() > 1 {
            Err(StageError::cancelled())
        } else {
            Ok(())
        }
    };
    let mut unused = |_: &[Response<'_>]| -> Result<Vec<Reward>, StageError> { Ok(Vec::new()) };
    let err = trainer.step(1, &batch, &mut unused, &stop).err().unwrap();
    assert_eq!(err.code, twin_core::FailureCode::Unavailable, "{err:?}");
    assert!(err.message.contains("cancel"), "{err:?}");
    assert_eq!(calls.get(), 2);
    for (b, (name, after)) in before.iter().zip(trainer.model().trainable_parameters()) {
        assert!(b.equal(&after), "{name} changed");
    }
    // The trainer is usable afterwards: the next step runs whole.
    trainer.step(1, &batch, &mut unused, &never).unwrap();
}
