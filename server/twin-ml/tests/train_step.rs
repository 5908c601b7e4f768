//! One whole training step of twin-ml against PyTorch: Qwen2.5-VL's forward pass with gradients
//! (multi-image prompts, trainable vision tower, tied and untied heads), the GRPO actor loss or
//! the SFT loss over two micro-batches, backward, gradient clipping and one AdamW step, compared
//! with transformers 5.17 + verl 0.9.1 + `torch.optim.AdamW` on the same checkpoint and inputs.
//!
//! Reference outputs come from `$TWIN_TRAIN_FIXTURES` (default: the committed
//! `tests/fixtures/train_step`, written by `tests/fixtures/train_step_reference.py`; deploy/test.sh
//! writes a fresh set into target/ and runs this file on it as well). Each tensor is compared as a
//! whole: `max |ours − reference| / max |reference|` must stay under [`TOLERANCE`]; the worst
//! values are printed (`cargo test -p twin-ml --test train_step -- --nocapture`). The
//! comparisons run again on a checkpoint with one weight changed, which must fail them. What
//! needs no reference (log-probabilities with gradients equal the inference path's, chunking,
//! masks at the stop token, the frozen vision tower, refusals) is checked on models made here.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use image::{DynamicImage, Rgb, RgbImage};
use twin_ml::MlError;
use twin_ml::qwen::rope::prompt_positions;
use twin_ml::qwen::{
    ChatTemplate, Grid, Message, PreparedImage, PreparedPrompt, QwenPreprocessor, QwenProcessor,
    QwenTokenizer, QwenVl, QwenVlConfig, ResponseLogProbs, TrainForwardOptions, TrainSequence,
};
use twin_ml::tch::{self, Device, Kind, Tensor};
use twin_ml::train::{
    ActorLossConfig, ActorLossInputs, AdamW, AdamWConfig, MasterWeights, PolicyLossInputs,
    accumulate_gradients, accumulate_micro_batches, actor_loss, entropy_from_logits,
    grpo_advantages, sft_loss, token_advantages,
};
use twin_ml::weights::read_safetensors;

/// Largest allowed `max |ours − reference| / max |reference|` per tensor, in f32. The worst seen
/// is printed; a changed weight moves these by orders of magnitude more.
const TOLERANCE: f64 = 1e-4;
const LR: f64 = 1e-3;
const MICRO: usize = 2;

fn fixture_root() -> PathBuf {
    match std::env::var_os("TWIN_TRAIN_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/train_step"),
    }
}

/// The reference's tensors by name, and the batch they describe.
struct Reference {
    root: PathBuf,
    tensors: HashMap<String, Tensor>,
    prompts: Vec<PreparedPrompt>,
    responses: Vec<Vec<i64>>,
    prompt_index: Vec<i64>,
}

impl Reference {
    fn load() -> Reference {
        let root = fixture_root();
        let path = root.join("step.safetensors");
        let tensors: HashMap<String, Tensor> = read_safetensors(&path)
            .unwrap_or_else(|e| {
                panic!(
                    "{e}: make the fixtures with `.venv/bin/python \
                     tests/fixtures/train_step_reference.py DIR` and point TWIN_TRAIN_FIXTURES at \
                     DIR, or unset it for the committed set"
                )
            })
            .into_iter()
            .collect();
        let mut r = Reference {
            root,
            tensors,
            prompts: Vec::new(),
            responses: Vec::new(),
            prompt_index: Vec::new(),
        };
        let config = r.model("untied").config().clone();
        for j in 0.. {
            if !r.tensors.contains_key(&format!("prompt{j}/input_ids")) {
                break;
            }
            r.prompts.push(r.prompt(j, &config));
        }
        for i in 0.. {
            match r.tensors.get(&format!("response{i}")) {
                Some(t) => r.responses.push(Vec::<i64>::try_from(t).unwrap()),
                None => break,
            }
        }
        r.prompt_index = Vec::<i64>::try_from(r.get("prompt_index")).unwrap();
        assert_eq!(r.responses.len(), r.prompt_index.len());
        r
    }

    fn get(&self, name: &str) -> Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("{}: no tensor `{name}`", self.root.display()))
            .shallow_clone()
    }

    fn model(&self, name: &str) -> QwenVl {
        QwenVl::load_as(&self.root.join(name), Device::Cpu, Kind::Float).unwrap()
    }

    /// Prompt `j` as the processor would have prepared it: ids, images split by their grids,
    /// 3-D positions.
    fn prompt(&self, j: usize, config: &QwenVlConfig) -> PreparedPrompt {
        let input_ids = Vec::<i64>::try_from(self.get(&format!("prompt{j}/input_ids"))).unwrap();
        let pixels = self.get(&format!("prompt{j}/pixel_values"));
        let thw =
            Vec::<i64>::try_from(self.get(&format!("prompt{j}/grid_thw")).flatten(0, -1)).unwrap();
        let grids: Vec<Grid> = thw
            .chunks(3)
            .map(|g| Grid {
                t: g[0],
                h: g[1],
                w: g[2],
            })
            .collect();
        let mut images = Vec::new();
        let mut start = 0;
        for grid in &grids {
            let rows = pixels.narrow(0, start, grid.patches());
            start += grid.patches();
            let patch = config.vision.patch_size as usize;
            images.push(PreparedImage {
                patches: Vec::<f32>::try_from(rows.flatten(0, -1)).unwrap(),
                grid: *grid,
                resized: (grid.h as usize * patch, grid.w as usize * patch),
            });
        }
        let merge = config.vision.spatial_merge_size;
        let positions = prompt_positions(&input_ids, &grids, config.image_token_id, merge).unwrap();
        PreparedPrompt {
            input_ids,
            images,
            positions,
            text: String::new(),
        }
    }

    fn sequences(&self) -> Vec<TrainSequence<'_>> {
        self.prompt_index
            .iter()
            .zip(&self.responses)
            .map(|(&p, r)| TrainSequence {
                prompt: &self.prompts[p as usize],
                response: r,
            })
            .collect()
    }

    /// Rows `range` of a `[B, T]` case tensor, cut to `width` columns.
    fn rows(&self, name: &str, range: &std::ops::Range<usize>, width: i64) -> Tensor {
        self.get(name)
            .narrow(0, range.start as i64, range.len() as i64)
            .narrow(1, 0, width)
    }
}

/// `max |ours − reference| / max |reference|` (or the absolute difference where the reference
/// is all zeros), or why the two cannot be compared.
fn difference(ours: &Tensor, reference: &Tensor) -> Result<f64, String> {
    if ours.size() != reference.size() {
        return Err(format!(
            "shape {:?}, reference {:?}",
            ours.size(),
            reference.size()
        ));
    }
    let (a, b) = (ours.to_kind(Kind::Double), reference.to_kind(Kind::Double));
    let scale = b.abs().max().double_value(&[]);
    let worst = (a - b).abs().max().double_value(&[]);
    Ok(if scale > 0.0 { worst / scale } else { worst })
}

/// The worst difference of each kind of quantity over a step.
#[derive(Debug, Default)]
struct Worst {
    loss: (f64, String),
    grad: (f64, String),
    delta: (f64, String),
    /// Weights whose change was compared, of all.
    compared: (i64, i64),
}

impl Worst {
    /// Records `what`'s difference; an error once it exceeds the tolerance.
    fn check(
        slot: &mut (f64, String),
        what: &str,
        ours: &Tensor,
        reference: &Tensor,
    ) -> Result<(), String> {
        let d = difference(ours, reference).map_err(|e| format!("{what}: {e}"))?;
        if d > slot.0 || slot.1.is_empty() {
            *slot = (d, what.to_owned());
        }
        if d.is_nan() || d > TOLERANCE {
            return Err(format!(
                "{what}: relative difference {d:.3e} exceeds {TOLERANCE:e}"
            ));
        }
        Ok(())
    }
}

/// What one step of ours produced.
struct Step {
    micro_losses: Vec<f64>,
    clip_fractions: Vec<f64>,
    grads: Vec<(String, Tensor)>,
    grad_norm: f64,
    delta: Vec<(String, Tensor)>,
}

#[derive(Clone, Copy, PartialEq)]
enum Loss {
    Grpo,
    Sft,
}

/// Case `case`'s loss on micro-batch `range` of the reference batch, from its log-probabilities:
/// the loss and what it measured (its value, the clip fraction).
fn micro_loss(
    r: &Reference,
    case: &str,
    loss: Loss,
    advantages: &[f32],
    range: &std::ops::Range<usize>,
    out: &ResponseLogProbs,
) -> Result<(Tensor, (f64, f64)), MlError> {
    let width = out.log_prob.size()[1];
    let mask = r.rows("response_mask", range, width);
    assert_eq!(difference(&out.response_mask, &mask), Ok(0.0), "mask");
    if loss == Loss::Sft {
        let l = sft_loss(&out.log_prob, &out.response_mask)?;
        let value = l.double_value(&[]);
        return Ok((l, (value, 0.0)));
    }
    let adv = token_advantages(&advantages[range.clone()], &out.response_mask)?;
    let old = r.rows(&format!("{case}/old_log_prob"), range, width);
    let reference = r.rows(&format!("{case}/ref_log_prob"), range, width);
    let inputs = ActorLossInputs {
        policy: PolicyLossInputs {
            old_log_prob: &old,
            log_prob: &out.log_prob,
            advantages: &adv,
            response_mask: &out.response_mask,
        },
        ref_log_prob: Some(&reference),
        entropy: out.entropy.as_ref(),
    };
    let l = actor_loss(inputs, &ActorLossConfig::default())?;
    let value = l.loss.double_value(&[]);
    Ok((l.loss, (value, l.metrics.clip_fraction)))
}

/// One optimizer step on `model` with case `case`'s inputs: forward with gradients, the loss
/// per micro-batch of [`MICRO`], accumulation, AdamW (clipping at 1.0) at [`LR`]. With
/// `checkpointing`, through `backward_response_loss` with activation checkpointing; without,
/// through `response_log_probs` and `accumulate_gradients`.
fn run_step(
    r: &Reference,
    model: &mut QwenVl,
    case: &str,
    loss: Loss,
    train_vision: bool,
    checkpointing: bool,
) -> Step {
    model.set_trainable(train_vision);
    let params = model.trainable_parameters();
    let before: Vec<Tensor> = params.iter().map(|(_, p)| p.detach().copy()).collect();
    let handles = params
        .iter()
        .map(|(n, p)| (n.clone(), p.shallow_clone()))
        .collect();
    let mut optimizer = AdamW::new(handles, AdamWConfig::default()).unwrap();
    optimizer.zero_grad();
    let sequences = r.sequences();
    let scores = Vec::<f32>::try_from(r.get("scores")).unwrap();
    let advantages = grpo_advantages(&scores, &r.prompt_index)
        .unwrap()
        .advantages;
    let options = TrainForwardOptions {
        train_vision,
        logit_chunk_rows: 4,
        activation_checkpointing: checkpointing,
        ..TrainForwardOptions::default()
    };
    let model = &*model;
    let measured = if checkpointing {
        accumulate_micro_batches(sequences.len(), MICRO, |range, scale| {
            model.backward_response_loss(&sequences[range.clone()], &options, scale, |out| {
                micro_loss(r, case, loss, &advantages, &range, out)
            })
        })
    } else {
        accumulate_gradients(sequences.len(), MICRO, |range| {
            let out = model.response_log_probs(&sequences[range.clone()], &options)?;
            micro_loss(r, case, loss, &advantages, &range, &out)
        })
    }
    .unwrap();
    let grads = params
        .iter()
        .map(|(n, p)| (n.clone(), p.grad().copy()))
        .collect();
    let outcome = optimizer.step(LR).unwrap();
    assert!(outcome.applied);
    let delta = params
        .iter()
        .zip(&before)
        .map(|((n, p), b)| (n.clone(), p.detach() - b))
        .collect();
    Step {
        micro_losses: measured.iter().map(|m| m.0).collect(),
        clip_fractions: measured.iter().map(|m| m.1).collect(),
        grads,
        grad_norm: outcome.grad_norm,
        delta,
    }
}

/// Holds a step to the reference's case `case`: micro-batch losses, gradient norm, every
/// gradient, every weight change. Returns the worst differences, or the first that is too
/// large.
fn compare(r: &Reference, case: &str, step: &Step, with_delta: bool) -> Result<Worst, String> {
    let mut worst = Worst::default();
    for (m, ours) in step.micro_losses.iter().enumerate() {
        let reference = r.get(&format!("{case}/micro{m}/loss"));
        let what = format!("{case} micro-batch {m} loss");
        Worst::check(
            &mut worst.loss,
            &what,
            &Tensor::from(*ours),
            &reference.get(0),
        )?;
    }
    let norm = r.get(&format!("{case}/grad_norm"));
    let ours = Tensor::from(step.grad_norm);
    if with_delta {
        Worst::check(&mut worst.grad, "gradient norm", &ours, &norm.get(0))?;
    }
    for (name, grad) in &step.grads {
        let reference = r.get(&format!("{case}/grad/{name}"));
        Worst::check(&mut worst.grad, &format!("grad {name}"), grad, &reference)?;
    }
    if with_delta {
        // PyTorch clips by `max_norm / (norm + 1e-6)` when the norm exceeds it.
        let norm = norm.double_value(&[0]);
        let clip = if norm > 1.0 { 1.0 / (norm + 1e-6) } else { 1.0 };
        for (name, delta) in &step.delta {
            let reference = r.get(&format!("{case}/delta/{name}"));
            let grad = r.get(&format!("{case}/grad/{name}"));
            // An exact zero (an embedding row no token used) leaves only the weight decay.
            let settled = (grad.abs() * clip)
                .ge(SETTLED_GRAD)
                .logical_or(&grad.eq(0.0));
            worst.compared.0 += settled.sum(Kind::Int64).int64_value(&[]);
            worst.compared.1 += settled.numel() as i64;
            let (ours, reference) = (
                delta.masked_select(&settled),
                reference.masked_select(&settled),
            );
            Worst::check(
                &mut worst.delta,
                &format!("change {name}"),
                &ours,
                &reference,
            )?;
        }
    }
    Ok(worst)
}

/// Weight changes are compared where the clipped gradient is at least this large. Adam's first
/// step moves a weight by about `lr · g / (|g| + ε)`, ε = 1e-8, whose slope `ε / (|g| + ε)²`
/// reaches `1 / ε` near zero: there a rounding-level difference of the gradient turns into a
/// change of up to `lr`, in either implementation. At 1e-5 the slope is below 100, so the
/// gradients' agreement carries over to the change. Exact zeros are compared too (only the
/// weight decay moves them); the share left out is printed.
const SETTLED_GRAD: f64 = 1e-5;

fn report(case: &str, worst: &Worst) {
    println!(
        "{case}: worst relative differences (tolerance {TOLERANCE:e}): loss {:.2e} ({}), \
         gradient {:.2e} ({}), weight change {:.2e} ({}) over {} of {} weights",
        worst.loss.0,
        worst.loss.1,
        worst.grad.0,
        worst.grad.1,
        worst.delta.0,
        worst.delta.1,
        worst.compared.0,
        worst.compared.1
    );
}

/// Largest allowed relative difference per gradient between a step with activation
/// checkpointing and one without: the recomputed forward is the same arithmetic, only the order
/// in which partial gradients are added differs.
const CHECKPOINT_TOLERANCE: f64 = 1e-6;

/// Runs case `case` on checkpoint `model`, with activation checkpointing and without, and holds
/// both to the reference and to each other.
fn step_matches(case: &str, model: &str, loss: Loss) {
    let r = Reference::load();
    let mut steps = Vec::new();
    for checkpointing in [false, true] {
        let mut qwen = r.model(model);
        let step = run_step(&r, &mut qwen, case, loss, true, checkpointing);
        assert_eq!(step.grads.len(), qwen.var_store().variables().len());
        let label = format!("{case}, checkpointing {checkpointing}");
        let worst = compare(&r, case, &step, true).unwrap_or_else(|e| panic!("{label}: {e}"));
        report(&label, &worst);
        if loss == Loss::Grpo {
            for (m, ours) in step.clip_fractions.iter().enumerate() {
                let reference = r
                    .get(&format!("{case}/micro{m}/clip_fraction"))
                    .double_value(&[0]);
                assert!(
                    (ours - reference).abs() < 1e-6,
                    "{label} micro-batch {m}: clip fraction"
                );
            }
        }
        steps.push(step);
    }
    let worst = checkpointing_agrees(&steps[0].grads, &steps[1].grads);
    println!("{case}: with and without checkpointing, worst gradient difference {worst:.2e}");
    assert_eq!(
        steps[0].micro_losses, steps[1].micro_losses,
        "{case}: losses"
    );
}

/// The worst relative difference between two sets of gradients, asserted under
/// [`CHECKPOINT_TOLERANCE`].
fn checkpointing_agrees(graph: &[(String, Tensor)], checkpointed: &[(String, Tensor)]) -> f64 {
    assert_eq!(graph.len(), checkpointed.len());
    let mut worst = 0.0f64;
    for ((name, a), (other, b)) in graph.iter().zip(checkpointed) {
        assert_eq!(name, other);
        let d = difference(b, a).unwrap();
        assert!(
            d <= CHECKPOINT_TOLERANCE,
            "grad {name}: checkpointing changes it by {d:e}"
        );
        worst = worst.max(d);
    }
    worst
}

#[test]
fn a_grpo_step_on_policy_matches_pytorch() {
    step_matches("on_policy", "untied", Loss::Grpo);
}

#[test]
fn a_grpo_step_with_clipped_ratios_matches_pytorch() {
    let r = Reference::load();
    // The case is only a test of clipping if the reference clipped.
    assert!(r.get("clipped/micro0/clip_fraction").double_value(&[0]) > 0.1);
    step_matches("clipped", "untied", Loss::Grpo);
}

#[test]
fn a_grpo_step_with_a_tied_head_matches_pytorch() {
    step_matches("tied", "tied", Loss::Grpo);
}

#[test]
fn an_sft_step_matches_pytorch() {
    step_matches("sft", "untied", Loss::Sft);
}

#[test]
fn log_probs_match_transformers_before_the_step() {
    let r = Reference::load();
    for name in ["untied", "tied"] {
        let mut model = r.model(name);
        model.set_trainable(true);
        let out = model
            .response_log_probs(&r.sequences(), &TrainForwardOptions::default())
            .unwrap();
        assert!(out.log_prob.requires_grad());
        let d = difference(&out.log_prob, &r.get(&format!("{name}/log_prob"))).unwrap();
        println!("{name}: log-probabilities' worst relative difference {d:.2e}");
        assert!(d < 1e-5, "{name}: log-probabilities differ by {d:e}");
    }
}

#[test]
fn a_changed_weight_fails_the_comparison() {
    let r = Reference::load();
    let mut model = r.model("untied");
    // After the reference ran: one weight of one decoder MLP, by about a tenth of its row's size.
    let vars = model.var_store().variables();
    let weight = &vars["model.layers.1.mlp.down_proj.weight"];
    tch::no_grad(|| {
        let _ = weight.get(3).get(5).g_add_scalar_(0.1);
    });
    let step = run_step(&r, &mut model, "on_policy", Loss::Grpo, true, true);
    let failure = compare(&r, "on_policy", &step, true).expect_err("a changed weight must fail");
    println!("changed weight: {failure}");
}

#[test]
fn a_frozen_vision_tower_gets_no_gradient_and_the_rest_the_same() {
    let r = Reference::load();
    let mut steps = Vec::new();
    for checkpointing in [false, true] {
        let mut model = r.model("untied");
        let step = run_step(&r, &mut model, "clipped", Loss::Grpo, false, checkpointing);
        assert!(step.grads.iter().all(|(n, _)| !n.starts_with("visual.")));
        for (name, var) in model.var_store().variables() {
            if name.starts_with("visual.") {
                assert!(!var.requires_grad() && !var.grad().defined(), "{name}");
            }
        }
        // The decoder's gradients do not depend on whether the tower trains; the norm and the
        // update (clipped by a norm without the tower) do, so they are not compared.
        let worst = compare(&r, "clipped", &step, false).unwrap_or_else(|e| panic!("{e}"));
        report(
            &format!("clipped, vision frozen, checkpointing {checkpointing}"),
            &worst,
        );
        steps.push(step);
    }
    let worst = checkpointing_agrees(&steps[0].grads, &steps[1].grads);
    println!(
        "vision frozen: with and without checkpointing, worst gradient difference {worst:.2e}"
    );
}

// ---- Models made here: no reference needed. ----

fn picture(width: u32, height: u32, seed: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(RgbImage::from_fn(width, height, |x, y| {
        Rgb([
            ((x * 7 + seed * 31) % 256) as u8,
            ((y * 5 + seed * 17) % 256) as u8,
            ((x + y) * 3 % 256) as u8,
        ])
    }))
}

/// A tiny random model (Qwen's real vocabulary) and three prompts: two images, one, none.
fn tiny() -> (QwenVl, Vec<PreparedPrompt>) {
    let config = QwenVlConfig::tiny();
    let model =
        QwenVl::init_random_scaled(config.clone(), 7, Device::Cpu, Kind::Float, 25.0).unwrap();
    let preprocessor = QwenPreprocessor {
        max_pixels: 28 * 28 * 64,
        ..QwenPreprocessor::default()
    };
    let processor = QwenProcessor::new(&config, ChatTemplate::builtin(), preprocessor);
    let tokenizer = QwenTokenizer::byte_level().unwrap();
    let prompt = |images: &[DynamicImage], text: &str| {
        let named: Vec<(&str, &DynamicImage)> = images.iter().map(|i| ("img", i)).collect();
        let messages = [Message::user_with_images(images.len(), text)];
        processor
            .prepare(&tokenizer, &messages, &named, true)
            .unwrap()
    };
    let prompts = vec![
        prompt(&[picture(150, 120, 1), picture(120, 160, 2)], "Same?"),
        prompt(&[picture(90, 90, 3)], "Describe it."),
        prompt(&[], "Hi"),
    ];
    (model, prompts)
}

/// Log-probabilities and entropy of `response` after `prompt` from the inference path.
fn inference_log_probs(
    model: &QwenVl,
    prompt: &PreparedPrompt,
    response: &[i64],
) -> (Tensor, Tensor) {
    let logits = model.sequence_logits(prompt, response).unwrap();
    let n = response.len() as i64;
    let rows = logits.narrow(0, prompt.len() as i64 - 1, n);
    let picked = rows
        .log_softmax(-1, Kind::Float)
        .gather(1, &Tensor::from_slice(response).view([n, 1]), false)
        .view([n]);
    (picked, entropy_from_logits(&rows).unwrap())
}

const STOP: i64 = 151_645;

#[test]
fn log_probs_with_gradients_equal_the_inference_path_in_any_chunking() {
    let (mut model, prompts) = tiny();
    model.set_trainable(true);
    let responses: Vec<Vec<i64>> = vec![
        vec![72, 105, 33, STOP],
        vec![1000, 2000, 3000, 4000, 5000, 6000, 7],
        // Tokens after the first stop token are neither fed nor scored.
        vec![STOP, 9, 9],
    ];
    let batch: Vec<TrainSequence<'_>> = prompts
        .iter()
        .zip(&responses)
        .map(|(prompt, response)| TrainSequence { prompt, response })
        .collect();
    let mut previous: Option<Tensor> = None;
    for rows in [1, 5, 4096] {
        let options = TrainForwardOptions {
            logit_chunk_rows: rows,
            stop_tokens: vec![STOP],
            ..TrainForwardOptions::default()
        };
        let out = model.response_log_probs(&batch, &options).unwrap();
        assert_eq!(out.log_prob.size(), [3, 7]);
        assert!(out.log_prob.requires_grad());
        let lengths =
            Vec::<f32>::try_from(out.response_mask.sum_dim_intlist(1, false, Kind::Float)).unwrap();
        assert_eq!(lengths, [4.0, 7.0, 1.0]);
        let entropy = out.entropy.as_ref().unwrap();
        assert!(!entropy.requires_grad());
        for (i, (prompt, response)) in prompts.iter().zip(&responses).enumerate() {
            let n = lengths[i] as i64;
            let (log_prob, reference_entropy) =
                inference_log_probs(&model, prompt, &response[..n as usize]);
            let ours = out.log_prob.get(i as i64).narrow(0, 0, n).detach();
            let d = (&ours - &log_prob).abs().max().double_value(&[]);
            assert!(
                d < 1e-4,
                "sequence {i}, chunks of {rows}: log-probs differ by {d}"
            );
            let e = entropy.get(i as i64).narrow(0, 0, n);
            let d = (&e - &reference_entropy).abs().max().double_value(&[]);
            assert!(d < 1e-4, "sequence {i}: entropy differs by {d}");
            let padding = out.log_prob.get(i as i64).narrow(0, n, 7 - n);
            assert_eq!(padding.abs().sum(Kind::Float).double_value(&[]), 0.0);
        }
        if let Some(p) = &previous {
            let d = difference(&out.log_prob, p).unwrap();
            assert!(
                d < 1e-6,
                "chunks of {rows} differ from the previous chunking by {d:e}"
            );
        }
        previous = Some(out.log_prob.detach());
    }
}

#[test]
fn the_sft_loss_is_the_negative_token_mean_and_reaches_every_weight() {
    let (mut model, prompts) = tiny();
    model.set_trainable(true);
    let responses = [vec![10, 20, STOP], vec![30, STOP]];
    let batch: Vec<TrainSequence<'_>> = prompts
        .iter()
        .zip(&responses)
        .map(|(prompt, response)| TrainSequence { prompt, response })
        .collect();
    let out = model
        .response_log_probs(&batch, &TrainForwardOptions::default())
        .unwrap();
    let loss = sft_loss(&out.log_prob, &out.response_mask).unwrap();
    let expected = -out.log_prob.sum(Kind::Float).double_value(&[]) / 5.0;
    assert!((loss.double_value(&[]) - expected).abs() < 1e-6);
    loss.backward();
    for (name, var) in model.var_store().variables() {
        let grad = var.grad();
        assert!(grad.defined(), "{name}: no gradient");
        // Every weight takes part in these prompts (both towers, tied head); a zero gradient
        // would mean a detached path.
        let size = grad.abs().sum(Kind::Float).double_value(&[]);
        assert!(size > 0.0, "{name}: zero gradient");
    }
}

#[test]
fn inference_is_unchanged_by_making_the_weights_trainable() {
    let (mut model, prompts) = tiny();
    let before = model.sequence_logits(&prompts[0], &[5, 6]).unwrap();
    model.set_trainable(true);
    let after = model.sequence_logits(&prompts[0], &[5, 6]).unwrap();
    assert!(!after.requires_grad());
    assert_eq!(difference(&after, &before), Ok(0.0));
}

#[test]
fn bad_training_input_is_refused_naming_the_thing() {
    let (model, prompts) = tiny();
    let refused = |batch: &[TrainSequence<'_>], options: &TrainForwardOptions| match model
        .response_log_probs(batch, options)
    {
        Err(MlError::Invalid(message)) => message,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let options = TrainForwardOptions::default();
    let empty: [i64; 0] = [];
    let m = refused(
        &[
            TrainSequence {
                prompt: &prompts[2],
                response: &[1, 2],
            },
            TrainSequence {
                prompt: &prompts[1],
                response: &empty,
            },
        ],
        &options,
    );
    assert!(
        m.contains("sequence 1") && m.contains("response is empty"),
        "{m}"
    );
    let short = TrainForwardOptions {
        max_prompt_len: 10,
        ..TrainForwardOptions::default()
    };
    let m = refused(
        &[TrainSequence {
            prompt: &prompts[0],
            response: &[1],
        }],
        &short,
    );
    let length = prompts[0].len();
    assert!(
        m.contains(&format!("{length} tokens")) && m.contains("maximum prompt length of 10"),
        "{m}"
    );
    let m = refused(
        &[TrainSequence {
            prompt: &prompts[2],
            response: &[1, 999_999],
        }],
        &options,
    );
    assert!(m.contains("response token 1 is 999999"), "{m}");
    let m = refused(&[], &options);
    assert!(m.contains("no sequence"), "{m}");
}

/// Every trainable weight's gradient of the SFT loss (scaled by `scale`) on `batch`, with
/// activation checkpointing or without, from zeroed gradients; and the loss.
fn sft_gradients(
    model: &QwenVl,
    batch: &[TrainSequence<'_>],
    options: &TrainForwardOptions,
    scale: f64,
) -> (f64, Vec<(String, Tensor)>) {
    let params = model.trainable_parameters();
    for (_, p) in &params {
        p.grad().defined().then(|| p.grad().zero_());
    }
    let loss = model
        .backward_response_loss(batch, options, scale, |out| {
            let l = sft_loss(&out.log_prob, &out.response_mask)?;
            let value = l.double_value(&[]);
            Ok((l, value))
        })
        .unwrap();
    let grads = params
        .iter()
        .map(|(n, p)| (n.clone(), p.grad().copy()))
        .collect();
    (loss, grads)
}

#[test]
fn checkpointing_gives_the_same_gradients_with_any_images_and_a_frozen_tower() {
    let (mut model, prompts) = tiny();
    let responses: Vec<Vec<i64>> = vec![vec![72, 105, 33, STOP, 4], vec![1000, 2000, 7], vec![9]];
    let all: Vec<TrainSequence<'_>> = prompts
        .iter()
        .zip(&responses)
        .map(|(prompt, response)| TrainSequence { prompt, response })
        .collect();
    // All three prompts (two images, one, none), and the text-only one alone.
    for (batch, train_vision) in [(&all[..], true), (&all[..], false), (&all[2..], true)] {
        model.set_trainable(train_vision);
        let options = TrainForwardOptions {
            train_vision,
            logit_chunk_rows: 3,
            stop_tokens: vec![STOP],
            ..TrainForwardOptions::default()
        };
        let checkpointed = TrainForwardOptions {
            activation_checkpointing: true,
            ..options.clone()
        };
        let (loss, graph) = sft_gradients(&model, batch, &options, 0.5);
        let (loss_checkpointed, grads) = sft_gradients(&model, batch, &checkpointed, 0.5);
        assert_eq!(loss, loss_checkpointed);
        assert!(
            grads
                .iter()
                .any(|(_, g)| g.abs().sum(Kind::Float).double_value(&[]) > 0.0),
            "no gradient at all"
        );
        let worst = checkpointing_agrees(&graph, &grads);
        println!(
            "{} sequences, vision trains {train_vision}: worst difference {worst:.2e}",
            batch.len()
        );
    }
}

#[test]
fn log_probs_attached_to_a_graph_refuse_checkpointing() {
    let (model, prompts) = tiny();
    let options = TrainForwardOptions {
        activation_checkpointing: true,
        ..TrainForwardOptions::default()
    };
    let batch = [TrainSequence {
        prompt: &prompts[2],
        response: &[1, 2],
    }];
    match model.response_log_probs(&batch, &options) {
        Err(MlError::Invalid(m)) => assert!(m.contains("backward_response_loss"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // A loss that does not depend on the log-probabilities cannot be back-propagated.
    let refused = model.backward_response_loss(&batch, &options, 1.0, |out| {
        Ok((out.response_mask.sum(Kind::Float), ()))
    });
    assert!(
        matches!(&refused, Err(MlError::Invalid(m)) if m.contains("does not depend")),
        "{refused:?}"
    );
}

/// One SFT step on `batch` from zeroed gradients: backward (with activation checkpointing),
/// then AdamW at learning rate 1e-3.
fn sft_step(model: &QwenVl, optimizer: &mut AdamW, batch: &[TrainSequence<'_>]) {
    optimizer.zero_grad();
    let options = TrainForwardOptions {
        stop_tokens: vec![STOP],
        activation_checkpointing: true,
        ..TrainForwardOptions::default()
    };
    model
        .backward_response_loss(batch, &options, 1.0, |out| {
            Ok((sft_loss(&out.log_prob, &out.response_mask)?, ()))
        })
        .unwrap();
    assert!(optimizer.step(1e-3).unwrap().applied);
}

#[test]
fn a_saved_model_and_optimizer_resume_with_bit_identical_steps() {
    let (mut model, prompts) = tiny();
    model.set_trainable(true);
    let responses = [vec![10, 20, STOP], vec![30, 40, 50, STOP], vec![7]];
    let batch: Vec<TrainSequence<'_>> = prompts
        .iter()
        .zip(&responses)
        .map(|(prompt, response)| TrainSequence { prompt, response })
        .collect();
    let mut optimizer = AdamW::new(model.trainable_parameters(), AdamWConfig::default()).unwrap();
    sft_step(&model, &mut optimizer, &batch);

    // Save after one step, as a run's checkpoint would, then go on.
    let dir = tempfile::tempdir().unwrap();
    model
        .save_pretrained(dir.path(), &QwenPreprocessor::default())
        .unwrap();
    QwenTokenizer::byte_level()
        .unwrap()
        .save(dir.path())
        .unwrap();
    let state = dir.path().join("optimizer.safetensors");
    optimizer.save(&state).unwrap();
    sft_step(&model, &mut optimizer, &batch);

    // A fresh process's view: the model and the optimizer from disk, the same next step.
    let mut resumed = QwenVl::load(dir.path(), Device::Cpu).unwrap();
    resumed.set_trainable(true);
    let mut restored = AdamW::new(resumed.trainable_parameters(), AdamWConfig::default()).unwrap();
    restored.load(&state).unwrap();
    assert_eq!(restored.steps(), 1);
    sft_step(&resumed, &mut restored, &batch);
    assert_eq!(restored.steps(), 2);

    let continued: HashMap<String, Tensor> = model.trainable_parameters().into_iter().collect();
    let mut compared = 0;
    for (name, weight) in resumed.trainable_parameters() {
        assert!(
            weight.equal(&continued[&name]),
            "{name} differs after the resumed step"
        );
        compared += 1;
    }
    assert_eq!(compared, continued.len());
}

/// Copies of a model's trainable weights in f32, by name.
fn weights_f32(model: &QwenVl) -> HashMap<String, Tensor> {
    model
        .trainable_parameters()
        .into_iter()
        .map(|(name, w)| (name, w.detach().to_kind(Kind::Float).copy()))
        .collect()
}

/// The bf16 step's gradient may differ from the f32 step's by this share of the f32 gradient's
/// norm (all weights together). bf16 keeps 8 significant bits (0.4%); measured 0.0044 on the
/// default-initialised tiny model.
const BF16_GRADIENT_TOLERANCE: f64 = 0.02;

#[test]
fn mixed_precision_trains_f32_masters_that_bf16_weights_alone_would_round_away() {
    // The default initialisation, not `tiny`'s 25× weights: their huge activations are a test of
    // the engine's margins, and bf16 resolves them too coarsely to compare gradients.
    let (_, prompts) = tiny();
    let model =
        QwenVl::init_random_scaled(QwenVlConfig::tiny(), 7, Device::Cpu, Kind::Float, 1.0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model
        .save_pretrained(dir.path(), &QwenPreprocessor::default())
        .unwrap();
    QwenTokenizer::byte_level()
        .unwrap()
        .save(dir.path())
        .unwrap();
    let responses = [vec![10, 20, STOP], vec![30, 40, 50, STOP], vec![7]];
    let batch: Vec<TrainSequence<'_>> = prompts
        .iter()
        .zip(&responses)
        .map(|(prompt, response)| TrainSequence { prompt, response })
        .collect();
    let options = TrainForwardOptions {
        stop_tokens: vec![STOP],
        ..TrainForwardOptions::default()
    };
    let sft = |out: &ResponseLogProbs| Ok((sft_loss(&out.log_prob, &out.response_mask)?, ()));

    for lr in [1e-3, 1e-6] {
        // The reference: the same checkpoint in f32, plain AdamW.
        let mut full = QwenVl::load_as(dir.path(), Device::Cpu, Kind::Float).unwrap();
        full.set_trainable(true);
        let start = weights_f32(&full);
        let mut optimizer =
            AdamW::new(full.trainable_parameters(), AdamWConfig::default()).unwrap();
        full.backward_response_loss(&batch, &options, 1.0, sft)
            .unwrap();
        // Read before the step, which clips the gradients in place.
        let grads_f32: HashMap<String, Tensor> = full
            .trainable_parameters()
            .into_iter()
            .map(|(name, w)| (name, w.grad().copy()))
            .collect();
        assert!(optimizer.step(lr).unwrap().applied);

        // bf16 compute, f32 masters.
        let mut half = QwenVl::load_as(dir.path(), Device::Cpu, Kind::BFloat16).unwrap();
        half.set_trainable(true);
        let rounded_start = weights_f32(&half);
        let mut masters = MasterWeights::new(half.trainable_parameters()).unwrap();
        let mut master_optimizer = AdamW::new(masters.masters(), AdamWConfig::default()).unwrap();
        masters.zero_grad();
        half.backward_response_loss(&batch, &options, 1.0, sft)
            .unwrap();
        assert!(masters.step(&mut master_optimizer, lr).unwrap().applied);

        let full_after = weights_f32(&full);
        let masters_after: HashMap<String, Tensor> = masters.masters().into_iter().collect();
        let largest = grads_f32
            .values()
            .map(|g| g.abs().max().double_value(&[]))
            .fold(0.0, f64::max);
        let (mut half_moved, mut master_moved, mut entries) = (0, 0, 0);
        let (mut agree, mut clear) = (0, 0);
        let (mut difference_squared, mut reference_squared) = (0f64, 0f64);
        for (name, weight) in half.trainable_parameters() {
            let master = &masters_after[&name];
            assert_eq!(
                (weight.kind(), master.kind()),
                (Kind::BFloat16, Kind::Float)
            );
            // The model computes with the masters rounded to its kind.
            assert!(weight.equal(&master.to_kind(Kind::BFloat16)), "{name}");
            // bf16 gradients follow f32's; counted where the gradient is not mere noise (a key
            // bias's, for one, is zero up to rounding: softmax ignores a constant shift).
            let reference = &grads_f32[&name];
            let scale = reference.abs().max().double_value(&[]);
            let difference = weight.grad().to_kind(Kind::Float) - reference;
            difference_squared += difference.square().sum(Kind::Double).double_value(&[]);
            reference_squared += reference.square().sum(Kind::Double).double_value(&[]);
            let change = master - &rounded_start[&name];
            if scale > 1e-3 * largest {
                // Adam's first step moves each weight by about ±lr: where the gradient is a
                // tenth of its tensor's largest or more, the bf16 step must move it the same way.
                let counted = reference.abs().ge(scale / 10.0);
                let reference_change = &full_after[&name] - &start[&name];
                let same = change.sign().eq_tensor(&reference_change.sign());
                clear += counted.sum(Kind::Int64).int64_value(&[]);
                agree += same.logical_and(&counted).sum(Kind::Int64).int64_value(&[]);
            }
            let moved = |t: &Tensor| t.ne(0.0).sum(Kind::Int64).int64_value(&[]);
            master_moved += moved(&change);
            half_moved += moved(&(weight.to_kind(Kind::Float) - &rounded_start[&name]));
            entries += change.numel() as i64;
        }
        let gradient_error = (difference_squared / reference_squared).sqrt();
        println!(
            "lr {lr}: bf16 gradients {gradient_error:.4} of f32's norm away; {agree} of {clear} \
             clear updates in the same direction"
        );
        assert!(gradient_error < BF16_GRADIENT_TOLERANCE, "{gradient_error}");
        assert!(agree * 100 >= clear * 99, "{agree} of {clear}");
        println!("lr {lr}: masters moved {master_moved} of {entries}, bf16 weights {half_moved}");
        assert!(
            master_moved * 10 > entries * 9,
            "lr {lr}: masters moved {master_moved}"
        );
        if lr == 1e-6 {
            // The recipe's rate: almost every update is below bf16's resolution, which is why
            // the masters exist.
            assert!(
                half_moved * 10 < entries,
                "bf16 weights moved {half_moved} of {entries}"
            );
        }
    }
}

#[test]
fn master_weights_save_and_restore_exactly_and_refuse_a_stranger() {
    let mut model =
        QwenVl::init_random_scaled(QwenVlConfig::tiny(), 3, Device::Cpu, Kind::BFloat16, 1.0)
            .unwrap();
    model.set_trainable(true);
    let mut masters = MasterWeights::new(model.trainable_parameters()).unwrap();
    // Off bf16's grid, so only an f32 file can hold them.
    let nudge = |masters: &MasterWeights, by: f64| {
        tch::no_grad(|| {
            for (_, m) in masters.masters() {
                let _ = m.shallow_clone().g_add_scalar_(by);
            }
        })
    };
    nudge(&masters, 1e-6);
    let saved: HashMap<String, Tensor> = masters
        .masters()
        .into_iter()
        .map(|(n, m)| (n, m.copy()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("masters.safetensors");
    masters.save(&path).unwrap();
    nudge(&masters, 1.0);
    masters.load(&path).unwrap();
    for (name, master) in masters.masters() {
        assert!(master.equal(&saved[&name]), "{name}");
    }
    // The model computes with the restored masters, rounded.
    for (name, weight) in model.trainable_parameters() {
        assert!(
            weight.equal(&saved[&name].to_kind(Kind::BFloat16)),
            "{name}"
        );
    }

    let mut frozen_vision =
        QwenVl::init_random_scaled(QwenVlConfig::tiny(), 3, Device::Cpu, Kind::Float, 1.0).unwrap();
    frozen_vision.set_trainable(false);
    let mut fewer = MasterWeights::new(frozen_vision.trainable_parameters()).unwrap();
    let err = fewer.load(&path).unwrap_err();
    assert!(err.to_string().contains("visual."), "{err}");
}
