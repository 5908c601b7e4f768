//! The parity harness every model of this crate is held to: a fixture directory holds a
//! checkpoint made by the reference implementation (transformers), the inputs it was given and
//! the outputs it produced; the harness runs our model on the same inputs and compares each
//! named output by its largest absolute difference.
//!
//! A fixture directory (layout documented in `tests/fixtures/parity/README.md`):
//!
//! - `meta.json`: [`FixtureMeta`]: the model `kind` (which [`Runner`] runs it), the `outputs`
//!   to compare, the `tolerance` (max abs diff, default 1e-4, per-output overrides in
//!   `tolerances`), the `images` in batch order, `expect`: `"match"`, or `"mismatch"` for a
//!   fixture built to fail (it proves the harness can), and the `dtype` and `device` the
//!   reference computed the expected outputs in (absent: f32 on the CPU);
//! - the checkpoint itself: `config.json`, `model.safetensors` or shards with their index,
//!   `preprocessor_config.json` when images are preprocessed;
//! - `images/*.png`: raw images, preprocessed by our preprocessor (so preprocessing is under
//!   test too, through the `pixel_values` output);
//! - `inputs.safetensors`: other inputs (`input_ids`, `attention_mask`, or `pixel_values`
//!   when there are no images);
//! - `expected.safetensors`: the reference's outputs, by output name.
//!
//! [`run_fixture`] runs our model in f32; [`run_fixture_as`] in a chosen kind on a chosen device
//! (f32 on a GPU against the CPU-made fixtures, bf16 against a bf16 fixture set made by
//! transformers in bf16 on the same device). Outputs are compared in f64 whatever the kind.
//!
//! A new model kind plugs in by implementing [`Runner`] and adding it to [`runners`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use image::DynamicImage;
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::MlError;
use crate::clip::{ClipModel, ClipPreprocessor};
use crate::weights::{read_json, read_safetensors};

pub const META_FILE: &str = "meta.json";
pub const INPUTS_FILE: &str = "inputs.safetensors";
pub const EXPECTED_FILE: &str = "expected.safetensors";

/// Default largest absolute difference for f32 on the CPU, for outputs of magnitude ~1.
pub const DEFAULT_TOLERANCE: f64 = 1e-4;

/// The precision a fixture's expected outputs were computed in (`meta.json`'s `dtype`), and so
/// the kind our model is run in against them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FixtureDtype {
    #[default]
    Float32,
    Bfloat16,
}

impl FixtureDtype {
    pub fn kind(self) -> Kind {
        match self {
            FixtureDtype::Float32 => Kind::Float,
            FixtureDtype::Bfloat16 => Kind::BFloat16,
        }
    }
}

/// The name `meta.json` and reports use for a kind: `float32`, `bfloat16`.
pub fn dtype_name(kind: Kind) -> String {
    match kind {
        Kind::Float => "float32".to_owned(),
        Kind::BFloat16 => "bfloat16".to_owned(),
        Kind::Half => "float16".to_owned(),
        Kind::Double => "float64".to_owned(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Whether a fixture's outputs should agree with the reference.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expectation {
    #[default]
    Match,
    /// Built to disagree (weights changed after the expected outputs were computed).
    Mismatch,
}

/// `meta.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureMeta {
    /// Which runner builds the model: "clip".
    pub kind: String,
    #[serde(default)]
    pub description: String,
    /// Outputs compared, by name (each must be in `expected.safetensors`).
    pub outputs: Vec<String>,
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
    /// Per-output tolerances overriding `tolerance`.
    #[serde(default)]
    pub tolerances: BTreeMap<String, f64>,
    /// Image files, relative to the fixture, in batch order.
    #[serde(default)]
    pub images: Vec<String>,
    #[serde(default)]
    pub expect: Expectation,
    /// Free-form notes from the script that made the fixture (reference versions, seed).
    #[serde(default)]
    pub reference: serde_json::Value,
    /// Chat fixtures (Qwen2.5-VL): the conversation in Hugging Face form, image entries naming
    /// files relative to the fixture.
    #[serde(default)]
    pub messages: Option<serde_json::Value>,
    #[serde(default)]
    pub add_generation_prompt: Option<bool>,
    /// Tokens greedy decoding produced in the reference (`greedy_tokens`).
    #[serde(default)]
    pub greedy_new_tokens: Option<usize>,
    /// Smallest top-1 − top-2 logit gap over those steps. Required with `greedy_new_tokens` and
    /// at least 1e-3 (the gap at the engine's `REPRODUCIBLE_MARGIN`) and twice the logits'
    /// tolerance: below either, another machine's rounding or logits within their tolerance
    /// could flip a token and the comparison would pass or fail by a near tie.
    #[serde(default)]
    pub greedy_min_margin: Option<f64>,
    /// Preprocessing fixtures: the size each image was resized to (informational).
    #[serde(default)]
    pub resized: Option<serde_json::Value>,
    /// Images the reference refused, with its error text.
    #[serde(default)]
    pub refused: Vec<serde_json::Value>,
    /// The precision the reference computed `expected.safetensors` in (stored as f32 whatever
    /// it is); a bf16 fixture's model outputs carry bf16 `tolerances`.
    #[serde(default)]
    pub dtype: FixtureDtype,
    /// Where the reference ran: `"cpu"` (the default) or `"cuda"`. Informational: a fixture
    /// can be run on any device.
    #[serde(default = "default_device")]
    pub device: String,
}

fn default_device() -> String {
    "cpu".to_owned()
}

fn default_tolerance() -> f64 {
    DEFAULT_TOLERANCE
}

impl FixtureMeta {
    /// The tolerance output `name` is compared with: its entry in `tolerances`, else `tolerance`.
    pub fn tolerance_of(&self, name: &str) -> f64 {
        *self.tolerances.get(name).unwrap_or(&self.tolerance)
    }
}

/// An opened fixture directory.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub dir: PathBuf,
    pub meta: FixtureMeta,
}

impl Fixture {
    pub fn open(dir: &Path) -> Result<Fixture, MlError> {
        let path = dir.join(META_FILE);
        let meta: FixtureMeta = serde_json::from_value(read_json(&path)?)
            .map_err(|e| MlError::config(&path, e.to_string()))?;
        if meta.greedy_new_tokens.is_some() {
            let margin = meta.greedy_min_margin;
            // A top-2 gap; the engine's margins are half of one. And where the logits may differ
            // from the reference's by up to their tolerance (bf16 fixtures: ~1), a gap below
            // twice that could flip while every logit is within tolerance.
            let logits_tolerance = ["logits", "last_logits"]
                .iter()
                .filter(|name| meta.outputs.iter().any(|o| o == *name))
                .map(|name| meta.tolerance_of(name))
                .fold(0.0, f64::max);
            let wanted =
                (2.0 * f64::from(crate::qwen::REPRODUCIBLE_MARGIN)).max(2.0 * logits_tolerance);
            if margin.is_none_or(|m| m.is_nan() || m < wanted) {
                let margin = margin.map_or("none".to_owned(), |m| m.to_string());
                return Err(MlError::config(
                    &path,
                    format!(
                        "greedy_new_tokens needs greedy_min_margin ≥ {wanted} (got {margin}): \
                         greedy tokens with a closer call could flip on another machine or \
                         with logits within their tolerance"
                    ),
                ));
            }
        }
        Ok(Fixture {
            dir: dir.to_path_buf(),
            meta,
        })
    }

    pub fn name(&self) -> String {
        self.dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.dir.display().to_string())
    }

    fn tensors(&self, file: &str) -> Result<BTreeMap<String, Tensor>, MlError> {
        let path = self.dir.join(file);
        if !path.exists() {
            return Ok(BTreeMap::new());
        }
        Ok(read_safetensors(&path)?.into_iter().collect())
    }

    /// `inputs.safetensors` (empty when absent).
    pub fn inputs(&self) -> Result<BTreeMap<String, Tensor>, MlError> {
        self.tensors(INPUTS_FILE)
    }

    /// `expected.safetensors`.
    pub fn expected(&self) -> Result<BTreeMap<String, Tensor>, MlError> {
        let path = self.dir.join(EXPECTED_FILE);
        Ok(read_safetensors(&path)?.into_iter().collect())
    }

    /// The images `meta.json` lists, decoded, in its order.
    pub fn images(&self) -> Result<Vec<DynamicImage>, MlError> {
        self.meta
            .images
            .iter()
            .map(|name| {
                image::open(self.dir.join(name)).map_err(|e| MlError::Image {
                    name: self.dir.join(name).display().to_string(),
                    message: e.to_string(),
                })
            })
            .collect()
    }
}

/// Runs one kind of model on a fixture's inputs, producing named outputs.
pub trait Runner {
    /// The `kind` in `meta.json` this runner handles.
    fn kind(&self) -> &'static str;
    /// Runs the model loaded on `device` with `dtype` as its floating-point kind (runners
    /// without a model ignore both). Outputs may be in any kind on any device: the harness
    /// brings them to the CPU and compares them in f64.
    fn run(
        &self,
        fixture: &Fixture,
        device: Device,
        dtype: Kind,
    ) -> Result<BTreeMap<String, Tensor>, MlError>;
}

/// The runners the harness knows, one per model kind.
pub fn runners() -> Vec<Box<dyn Runner>> {
    vec![
        Box::new(ClipRunner),
        Box::new(QwenRunner),
        Box::new(QwenPreprocessRunner),
    ]
}

/// CLIP: loads the fixture as a checkpoint with [`ClipModel::load_as`]. Produces `pixel_values`
/// (our preprocessing of the images), `image_embeds` (from `image_features`),
/// `vision_image_embeds` (the same from `vision_forward`), `vision_last_hidden_state`,
/// `vision_pooler_output`, and with `input_ids` in the inputs (and a text tower)
/// `text_embeds`, `text_last_hidden_state`, `text_pooler_output`.
#[derive(Debug, Clone, Copy)]
pub struct ClipRunner;

impl Runner for ClipRunner {
    fn kind(&self) -> &'static str {
        "clip"
    }

    fn run(
        &self,
        fixture: &Fixture,
        device: Device,
        dtype: Kind,
    ) -> Result<BTreeMap<String, Tensor>, MlError> {
        // Not `ClipModel::load`, which picks bf16 on CUDA: an f32 run on a GPU must be f32.
        let model = ClipModel::load_as(&fixture.dir, device, dtype)?;
        let inputs = fixture.inputs()?;
        let mut out = BTreeMap::new();
        let pixel_values = if fixture.meta.images.is_empty() {
            inputs.get("pixel_values").map(Tensor::shallow_clone)
        } else {
            let preprocessor = ClipPreprocessor::load(&fixture.dir)?;
            Some(preprocessor.preprocess_batch(&fixture.images()?)?)
        };
        if let Some(pixel_values) = pixel_values {
            let vision = model.vision_forward(&pixel_values)?;
            // `image_features` (what callers use) takes a shorter path than `vision_forward`;
            // both are held to the reference.
            out.insert("image_embeds".into(), model.image_features(&pixel_values)?);
            out.insert("vision_image_embeds".into(), vision.image_embeds);
            out.insert("pixel_values".into(), pixel_values);
            out.insert("vision_last_hidden_state".into(), vision.last_hidden_state);
            out.insert("vision_pooler_output".into(), vision.pooler_output);
        }
        if let (Some(ids), Some(_)) = (inputs.get("input_ids"), &model.config().text) {
            let text = model.text_forward(ids, inputs.get("attention_mask"))?;
            out.insert("text_embeds".into(), text.text_embeds);
            out.insert("text_last_hidden_state".into(), text.last_hidden_state);
            out.insert("text_pooler_output".into(), text.pooler_output);
        }
        Ok(out)
    }
}

/// Qwen2.5-VL: loads the fixture as a checkpoint (model, tokenizer, chat template, image
/// processor), renders and tokenizes `meta.messages` itself, and produces `input_ids`,
/// `pixel_values`, `image_grid_thw`, `position_ids` (`[3, L]`), `rope_deltas`, `image_embeds`,
/// `logits` (at the reference's `logit_columns`), `last_logits` and `greedy_tokens` (from the
/// rollout engine, greedy, `greedy_new_tokens` long, no stop token).
#[derive(Debug, Clone, Copy)]
pub struct QwenRunner;

impl Runner for QwenRunner {
    fn kind(&self) -> &'static str {
        "qwen2_5_vl"
    }

    fn run(
        &self,
        fixture: &Fixture,
        device: Device,
        dtype: Kind,
    ) -> Result<BTreeMap<String, Tensor>, MlError> {
        use crate::qwen::{QwenAssets, QwenVl, SamplingParams, generate};
        let model = QwenVl::load_as(&fixture.dir, device, dtype)?;
        let assets = QwenAssets::load(&fixture.dir, model.config())?;
        let (messages, image_files) = chat_from_meta(fixture)?;
        let images = image_files
            .iter()
            .map(|name| open_image(&fixture.dir.join(name)))
            .collect::<Result<Vec<_>, _>>()?;
        let named: Vec<(&str, &DynamicImage)> = image_files
            .iter()
            .map(String::as_str)
            .zip(images.iter())
            .collect();
        let prompt = assets.processor.prepare(
            &assets.tokenizer,
            &messages,
            &named,
            fixture.meta.add_generation_prompt.unwrap_or(true),
        )?;
        let expected = fixture.expected()?;
        let mut out = BTreeMap::new();
        out.insert("input_ids".into(), Tensor::from_slice(&prompt.input_ids));
        let patches: Vec<f32> = prompt
            .images
            .iter()
            .flat_map(|i| i.patches.iter().copied())
            .collect();
        out.insert(
            "pixel_values".into(),
            Tensor::from_slice(&patches).view([-1, model.config().vision.patch_dim()]),
        );
        let grids: Vec<i64> = prompt
            .images
            .iter()
            .flat_map(|i| [i.grid.t, i.grid.h, i.grid.w])
            .collect();
        out.insert(
            "image_grid_thw".into(),
            Tensor::from_slice(&grids).view([-1, 3]),
        );
        let axes: Vec<i64> = prompt.positions.axes.iter().flatten().copied().collect();
        out.insert(
            "position_ids".into(),
            Tensor::from_slice(&axes).view([3, -1]),
        );
        out.insert(
            "rope_deltas".into(),
            Tensor::from_slice(&[prompt.positions.delta]),
        );
        let refs: Vec<_> = prompt.images.iter().collect();
        if !refs.is_empty() {
            out.insert("image_embeds".into(), model.encode_images(&refs)?);
        }
        let logits = model.sequence_logits(&prompt, &[])?;
        if let Some(columns) = expected.get("logit_columns") {
            let columns = columns.to_device(logits.device());
            out.insert("logits".into(), logits.index_select(1, &columns));
        }
        out.insert("last_logits".into(), logits.get(logits.size()[0] - 1));
        if let Some(n) = fixture.meta.greedy_new_tokens {
            let params = SamplingParams::greedy(n, Vec::new());
            let request = crate::qwen::GenerationRequest {
                prompt: &prompt,
                samples: 1,
                params: &params,
            };
            let (completions, _) = generate(&model, &[request], &Default::default())?;
            out.insert(
                "greedy_tokens".into(),
                Tensor::from_slice(&completions[0][0].tokens),
            );
        }
        Ok(out
            .into_iter()
            .map(|(k, v)| (k, v.to_device(Device::Cpu)))
            .collect())
    }
}

/// Qwen2.5-VL preprocessing alone: `pixel_values_{i}` per image and `image_grid_thw`; every
/// image in `meta.refused` must be refused too.
#[derive(Debug, Clone, Copy)]
pub struct QwenPreprocessRunner;

impl Runner for QwenPreprocessRunner {
    fn kind(&self) -> &'static str {
        "qwen2_5_vl_preprocess"
    }

    fn run(
        &self,
        fixture: &Fixture,
        _device: Device,
        _dtype: Kind,
    ) -> Result<BTreeMap<String, Tensor>, MlError> {
        let pre = crate::qwen::QwenPreprocessor::load(&fixture.dir)?;
        let mut out = BTreeMap::new();
        let mut grids = Vec::new();
        for (i, (name, image)) in fixture
            .meta
            .images
            .iter()
            .zip(fixture.images()?)
            .enumerate()
        {
            let p = pre.prepare(&image, name)?;
            out.insert(
                format!("pixel_values_{i}"),
                Tensor::from_slice(&p.patches).view([-1, pre.patch_dim() as i64]),
            );
            grids.extend([p.grid.t, p.grid.h, p.grid.w]);
        }
        out.insert(
            "image_grid_thw".into(),
            Tensor::from_slice(&grids).view([-1, 3]),
        );
        for refused in &fixture.meta.refused {
            let name = refused["image"].as_str().unwrap_or_default();
            let image = open_image(&fixture.dir.join(name))?;
            if pre.prepare(&image, name).is_ok() {
                return Err(MlError::Invalid(format!(
                    "{name}: transformers refuses it ({}), we accepted it",
                    refused["error"]
                )));
            }
        }
        Ok(out)
    }
}

fn open_image(path: &Path) -> Result<DynamicImage, MlError> {
    image::open(path).map_err(|e| MlError::Image {
        name: path.display().to_string(),
        message: e.to_string(),
    })
}

/// `meta.messages` as our chat type, and the image files in placeholder order.
fn chat_from_meta(fixture: &Fixture) -> Result<(Vec<crate::qwen::Message>, Vec<String>), MlError> {
    use crate::qwen::{Message, Part};
    let bad = |m: String| MlError::config(fixture.dir.join(META_FILE), m);
    let list = fixture
        .meta
        .messages
        .as_ref()
        .and_then(|m| m.as_array())
        .ok_or_else(|| bad("a qwen2_5_vl fixture needs `messages`".into()))?;
    let mut messages = Vec::new();
    let mut files = Vec::new();
    for m in list {
        let role = m["role"].as_str().unwrap_or("user").to_owned();
        let content = match &m["content"] {
            serde_json::Value::String(text) => vec![Part::Text { text: text.clone() }],
            serde_json::Value::Array(parts) => parts
                .iter()
                .map(|p| match p["type"].as_str() {
                    Some("image") => {
                        let file = p["image"]
                            .as_str()
                            .ok_or_else(|| bad(format!("image part without a file: {p}")))?;
                        files.push(file.to_owned());
                        Ok(Part::Image)
                    }
                    Some("text") => Ok(Part::Text {
                        text: p["text"].as_str().unwrap_or_default().to_owned(),
                    }),
                    _ => Err(bad(format!("unknown message part {p}"))),
                })
                .collect::<Result<_, _>>()?,
            other => return Err(bad(format!("message content {other}"))),
        };
        messages.push(Message { role, content });
    }
    Ok((messages, files))
}

/// One output's comparison.
#[derive(Debug, Clone)]
pub struct OutputComparison {
    pub name: String,
    pub shape: Vec<i64>,
    /// Largest |ours − expected|; infinite when the shapes differ or a value is NaN.
    pub max_abs_diff: f64,
    pub tolerance: f64,
    /// `(ours, expected)` when they differ.
    pub shape_mismatch: Option<(Vec<i64>, Vec<i64>)>,
}

impl OutputComparison {
    pub fn within_tolerance(&self) -> bool {
        self.shape_mismatch.is_none() && self.max_abs_diff <= self.tolerance
    }
}

/// Everything one fixture's run found.
#[derive(Debug, Clone)]
pub struct FixtureReport {
    pub fixture: String,
    /// The model kind (`meta.json`'s `kind`).
    pub kind: String,
    /// Where our model ran (`cpu`, `cuda:0`) and in what (`float32`, `bfloat16`).
    pub device: String,
    pub dtype: String,
    /// The precision of the expected outputs (`meta.json`'s `dtype`).
    pub reference_dtype: FixtureDtype,
    pub expect: Expectation,
    pub outputs: Vec<OutputComparison>,
}

impl FixtureReport {
    pub fn all_within_tolerance(&self) -> bool {
        self.outputs.iter().all(OutputComparison::within_tolerance)
    }

    /// A "match" fixture with every output within tolerance, or a "mismatch" fixture with at
    /// least one output outside it.
    pub fn as_expected(&self) -> bool {
        match self.expect {
            Expectation::Match => self.all_within_tolerance(),
            Expectation::Mismatch => !self.all_within_tolerance(),
        }
    }

    /// One output's comparison, by name.
    pub fn output(&self, name: &str) -> Option<&OutputComparison> {
        self.outputs.iter().find(|o| o.name == name)
    }
}

impl fmt::Display for FixtureReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.as_expected() {
            "as expected"
        } else {
            "UNEXPECTED"
        };
        writeln!(
            f,
            "{} ({}, {} on {}, expect {:?}): {verdict}",
            self.fixture, self.kind, self.dtype, self.device, self.expect
        )?;
        for o in &self.outputs {
            let status = if o.within_tolerance() {
                "within"
            } else {
                "OUTSIDE"
            };
            match &o.shape_mismatch {
                Some((ours, expected)) => writeln!(
                    f,
                    "  {:<26} shape {ours:?} but expected {expected:?}",
                    o.name
                )?,
                // The tolerance as written in meta.json (1e-4 prints as 0.0001, a bf16 one as
                // 0.0557), not rounded to one digit.
                None => writeln!(
                    f,
                    "  {:<26} {:?} max |diff| {:.3e} {status} tolerance {}",
                    o.name, o.shape, o.max_abs_diff, o.tolerance
                )?,
            }
        }
        Ok(())
    }
}

/// Runs one fixture in f32: opens it, runs its kind's runner on `device` and compares every
/// output `meta.json` names. An `Err` means the fixture could not be run at all (a broken
/// fixture, a model that failed to load), never that outputs differ: that is in the report.
pub fn run_fixture(dir: &Path, device: Device) -> Result<FixtureReport, MlError> {
    run_fixture_as(dir, device, Kind::Float)
}

/// [`run_fixture`] with the model in `dtype` (its floating-point kind: `Kind::Float` or
/// `Kind::BFloat16`). Each output is compared with the fixture's own tolerance, whatever
/// precision the fixture was made in: a bf16 fixture carries bf16 tolerances, and running an f32
/// fixture in bf16 is expected to fail them. Greedy tokens are compared exactly, like every
/// integer output.
pub fn run_fixture_as(dir: &Path, device: Device, dtype: Kind) -> Result<FixtureReport, MlError> {
    if !matches!(
        dtype,
        Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double
    ) {
        return Err(MlError::Invalid(format!(
            "a model runs in a floating-point kind, not {dtype:?}"
        )));
    }
    let fixture = Fixture::open(dir)?;
    let runners = runners();
    let runner = runners
        .iter()
        .find(|r| r.kind() == fixture.meta.kind)
        .ok_or_else(|| {
            let known: Vec<&str> = runners.iter().map(|r| r.kind()).collect();
            MlError::Invalid(format!(
                "fixture {}: no runner for model kind {:?} (known: {})",
                fixture.name(),
                fixture.meta.kind,
                known.join(", ")
            ))
        })?;
    let ours = runner.run(&fixture, device, dtype)?;
    let expected = fixture.expected()?;
    let mut outputs = Vec::new();
    for name in &fixture.meta.outputs {
        let missing = |what: &str| {
            MlError::Invalid(format!(
                "fixture {}: output `{name}` {what}",
                fixture.name()
            ))
        };
        let mine = ours
            .get(name)
            .ok_or_else(|| missing("is not produced by the runner"))?;
        let theirs = expected
            .get(name)
            .ok_or_else(|| missing("is not in expected.safetensors"))?;
        // Integer outputs (token ids, grids, positions, greedy tokens) are compared exactly
        // whatever tolerance meta.json gives, in bf16 as in f32.
        let tolerance = if theirs.is_floating_point() {
            fixture.meta.tolerance_of(name)
        } else {
            0.0
        };
        outputs.push(compare(name, mine, theirs, tolerance));
    }
    Ok(FixtureReport {
        fixture: fixture.name(),
        kind: fixture.meta.kind.clone(),
        device: crate::device::name(device),
        dtype: dtype_name(dtype),
        reference_dtype: fixture.meta.dtype,
        expect: fixture.meta.expect,
        outputs,
    })
}

fn compare(name: &str, ours: &Tensor, expected: &Tensor, tolerance: f64) -> OutputComparison {
    let (a, b) = (ours.size(), expected.size());
    if a != b {
        return OutputComparison {
            name: name.to_owned(),
            shape: a.clone(),
            max_abs_diff: f64::INFINITY,
            tolerance,
            shape_mismatch: Some((a, b)),
        };
    }
    let to_f64 = |t: &Tensor| t.to_device(Device::Cpu).to_kind(Kind::Double);
    let diff = (to_f64(ours) - to_f64(expected)).abs();
    let max = if diff.numel() == 0 {
        0.0
    } else if diff.isnan().any().int64_value(&[]) != 0 {
        f64::INFINITY
    } else {
        diff.max().double_value(&[])
    };
    OutputComparison {
        name: name.to_owned(),
        shape: a,
        max_abs_diff: max,
        tolerance,
        shape_mismatch: None,
    }
}

/// The fixture directories under `root` (those holding a `meta.json`), sorted by name.
pub fn fixture_dirs(root: &Path) -> Result<Vec<PathBuf>, MlError> {
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(root).map_err(|e| MlError::io(root, e))? {
        let path = entry.map_err(|e| MlError::io(root, e))?.path();
        if path.join(META_FILE).is_file() {
            dirs.push(path);
        }
    }
    dirs.sort();
    Ok(dirs)
}
