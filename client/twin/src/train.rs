//! `twin train`: submit a post-training run (GRPO or SFT), read its curves as a table or a PNG
//! chart, a step's rollouts, and the checkpoints it registered.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, anyhow};
use clap::Subcommand;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use twin_client::Client;
use twin_core::BlobHash;
use twin_core::api::TrainingReport;
use twin_core::event::JobResult;
use twin_core::job::JobState;
use twin_core::spec::JobSpec;
use twin_core::train::{TrainOutput, TrainStep, TrainValidation};

use crate::Failure;
use crate::online::{SubmitArgs, cell};

#[derive(Subcommand)]
pub enum TrainCommand {
    /// Submit a train job from a TOML or JSON file: a whole submission (`[spec] kind = "train"`)
    /// or only the spec's fields at the top level (`dataset = "pairs"`, `model = "qwen-3b"`, …).
    Submit(SubmitArgs),
    /// The run's curves: a row per optimizer step, then the validations; `--out` draws a PNG.
    Curves {
        job: String,
        /// Also draw the curves into this PNG file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// One step's rollouts: prompt, sample, reward, advantage, tokens and the completion.
    Rollouts {
        job: String,
        /// The optimizer step (1-based, as `curves` numbers them).
        #[arg(long)]
        step: u64,
        /// At most this many rollouts.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Only the rollouts rewarded below 1.
        #[arg(long)]
        wrong: bool,
    },
    /// The checkpoints the run registered, and how to evaluate one.
    Checkpoints { job: String },
}

pub async fn run(client: &Client, command: TrainCommand, json: bool) -> Result<(), Failure> {
    match command {
        TrainCommand::Submit(args) => {
            let submission = load_submission(&args.file)?;
            return crate::online::submit(client, submission, &args, json).await;
        }
        TrainCommand::Curves { job, out } => {
            let report = client.training(&job).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", curves_table(&report));
            }
            if let Some(path) = &out {
                render_curves(&report, path)?;
                eprintln!("curves drawn into {}", path.display());
            }
        }
        TrainCommand::Rollouts {
            job,
            step,
            limit,
            wrong,
        } => {
            let report = client.training(&job).await?;
            let hash = rollouts_blob(&report, step)?;
            let bytes = client.get_blob(&hash).await?;
            let text = std::str::from_utf8(&bytes).context("the rollouts blob is not UTF-8")?;
            for line in select_rollouts(text, limit, wrong)? {
                if json {
                    println!("{}", line.stored);
                } else {
                    println!("{}", rollout_row(&line.rollout));
                }
            }
        }
        TrainCommand::Checkpoints { job } => {
            let state = client.job(&job).await?;
            let report = client.training(&job).await?;
            let output = match &state.result {
                Some(JobResult::Train(out)) => Some(out),
                _ => None,
            };
            let rows = checkpoint_rows(output, &report);
            if json {
                let body = serde_json::json!({ "job": report.job, "checkpoints": rows });
                println!("{}", serde_json::to_string_pretty(&body)?);
            } else {
                print!(
                    "{}",
                    checkpoints_table(&rows, evaluation_dataset(&state).as_deref())
                );
            }
        }
    }
    Ok(())
}

/// Reads a `twin train submit` file (TOML or JSON) into a train submission, with the paths it
/// names resolved against its directory as `twin submit` resolves them.
pub fn load_submission(path: &Path) -> anyhow::Result<serde_json::Value> {
    let (file, base) = crate::online::read_spec(path)?;
    let mut submission = submission(file).with_context(|| format!("reading {}", path.display()))?;
    // After wrapping: which fields are paths depends on the kind the wrapping adds.
    crate::online::resolve_host_paths(&mut submission, &base);
    Ok(submission)
}

/// The submission a `twin train submit` file makes. A file with a `spec` table is a whole
/// submission: its kind must be `train`, and is set when missing. Any other file holds the
/// spec's fields at the top level; the submission's own fields among them (`experiment`,
/// `priority`, `requirements`, `retry`: no train spec field has these names) stay outside.
pub fn submission(file: serde_json::Value) -> anyhow::Result<serde_json::Value> {
    let serde_json::Value::Object(mut top) = file else {
        return Err(anyhow!(
            "the file must hold a table (TOML) or an object (JSON)"
        ));
    };
    if top.contains_key("spec") {
        let spec = top
            .get_mut("spec")
            .and_then(serde_json::Value::as_object_mut)
            .ok_or_else(|| anyhow!("spec: must be a table (TOML) or an object (JSON)"))?;
        set_train_kind(spec, "spec.kind")?;
        return Ok(serde_json::Value::Object(top));
    }
    let mut submission = serde_json::Map::new();
    for field in ["experiment", "priority", "requirements", "retry"] {
        if let Some(v) = top.remove(field) {
            submission.insert(field.to_owned(), v);
        }
    }
    set_train_kind(&mut top, "kind")?;
    submission.insert("spec".to_owned(), serde_json::Value::Object(top));
    Ok(serde_json::Value::Object(submission))
}

/// Sets a spec's `kind` to `train`, refusing a spec that names another kind.
fn set_train_kind(
    spec: &mut serde_json::Map<String, serde_json::Value>,
    field: &str,
) -> anyhow::Result<()> {
    match spec.get("kind") {
        None => {
            spec.insert("kind".to_owned(), "train".into());
            Ok(())
        }
        Some(k) if k == "train" => Ok(()),
        Some(other) => Err(anyhow!(
            "{field}: is {other}, but `twin train submit` submits train jobs (use `twin submit` \
             for other kinds)"
        )),
    }
}

/// A number for a table cell: four decimals, or scientific where that would print 0.0000 for
/// a number that is not zero (a KL of 3e-5, a learning rate).
fn number(v: f64) -> String {
    if v == 0.0 || v.abs() >= 1e-3 && v.abs() < 1e6 {
        format!("{v:.4}")
    } else {
        format!("{v:.2e}")
    }
}

fn optional(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), number)
}

fn percent(v: f64) -> String {
    format!("{:.1}%", v * 100.0)
}

const STEP_HEADER: [&str; 12] = [
    "STEP",
    "REWARD",
    "ACCURACY",
    "ALL_EQUAL",
    "POLICY_LOSS",
    "KL",
    "ENTROPY",
    "GRAD_NORM",
    "RESPONSE_LEN",
    "TOKENS/S",
    "ROLLOUT_S",
    "UPDATE_S",
];

fn step_cells(s: &TrainStep) -> [String; 12] {
    let m = &s.metrics;
    [
        s.step.to_string(),
        number(m.reward_mean),
        percent(m.accuracy),
        percent(m.all_equal_fraction),
        number(m.policy_loss),
        optional(m.kl),
        optional(m.entropy),
        number(m.grad_norm),
        format!("{:.1}", m.response_length_mean),
        format!("{:.0}", m.tokens_per_second),
        format!("{:.1}", m.rollout_seconds),
        format!("{:.1}", m.update_seconds),
    ]
}

const VALIDATION_HEADER: [&str; 5] = ["STEP", "REWARD", "PAIR_ACCURACY", "QUESTIONS", "TRUNCATED"];

fn validation_cells(v: &TrainValidation) -> [String; 5] {
    [
        v.step.to_string(),
        number(v.reward_mean),
        percent(v.pair_accuracy),
        v.questions.to_string(),
        v.truncated.to_string(),
    ]
}

/// Right-aligned columns as wide as their widest cell, two spaces apart.
fn columns<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect();
        padded.join("  ") + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `twin train curves`: the steps' table, then the validations'.
pub fn curves_table(report: &TrainingReport) -> String {
    let mut out = String::new();
    if report.log.steps.is_empty() {
        out.push_str(&format!("job {}: no optimizer step yet\n", report.job));
    } else {
        let rows: Vec<_> = report.log.steps.iter().map(step_cells).collect();
        out.push_str(&columns(STEP_HEADER, &rows));
    }
    out.push('\n');
    if report.log.validations.is_empty() {
        out.push_str("no validation yet\n");
    } else {
        out.push_str("validations\n");
        let rows: Vec<_> = report
            .log
            .validations
            .iter()
            .map(validation_cells)
            .collect();
        out.push_str(&columns(VALIDATION_HEADER, &rows));
    }
    out
}

/// The bundled font's family name: plotters' default text style asks for `sans-serif`, so
/// registering it under that name makes every label (axes, captions, legends) use it.
const FONT_FAMILY: &str = "sans-serif";

/// Registers the bundled DejaVu Sans Mono (see assets/README.md) with plotters, once: plotters'
/// ab_glyph text reads only registered fonts, never the system's, so charts draw the same on a
/// bare machine.
fn register_bundled_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = REGISTERED.get_or_init(|| {
        plotters::style::register_font(
            FONT_FAMILY,
            FontStyle::Normal,
            include_bytes!("../assets/DejaVuSansMono.ttf"),
        )
        .is_ok()
    });
    if *ok {
        Ok(())
    } else {
        Err(anyhow!("the bundled font does not parse"))
    }
}

const CHART_SIZE: (u32, u32) = (1200, 900);
const REWARD_COLOUR: RGBColor = RGBColor(31, 119, 180);
const VALIDATION_REWARD_COLOUR: RGBColor = RGBColor(214, 39, 40);
const PAIR_ACCURACY_COLOUR: RGBColor = RGBColor(44, 160, 44);
const LOSS_COLOUR: RGBColor = RGBColor(148, 103, 189);
const KL_COLOUR: RGBColor = RGBColor(255, 127, 14);

/// A y range holding `values` and `always`, padded by 5% and never empty.
fn y_range(values: impl IntoIterator<Item = f64>, always: &[f64]) -> Range<f64> {
    let (lo, hi) = values
        .into_iter()
        .chain(always.iter().copied())
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return -1.0..1.0;
    }
    let pad = ((hi - lo) * 0.05).max(1e-6 * lo.abs().max(1.0));
    lo - pad..hi + pad
}

/// Draws the curves into `path` as a PNG: the reward per step with the validations' reward and
/// pair accuracy above, the policy loss and KL per step below.
pub fn render_curves(report: &TrainingReport, path: &Path) -> anyhow::Result<()> {
    let (w, h) = CHART_SIZE;
    let pixels = draw_curves(report, CHART_SIZE)?;
    image::save_buffer_with_format(
        path,
        &pixels,
        w,
        h,
        image::ExtendedColorType::Rgb8,
        image::ImageFormat::Png,
    )
    .with_context(|| format!("writing {}", path.display()))
}

/// The chart as RGB pixels, row by row.
fn draw_curves(report: &TrainingReport, (w, h): (u32, u32)) -> anyhow::Result<Vec<u8>> {
    let steps = &report.log.steps;
    let validations = &report.log.validations;
    if steps.is_empty() && validations.is_empty() {
        return Err(anyhow!(
            "job {} has recorded no step or validation yet: nothing to draw",
            report.job
        ));
    }
    register_bundled_font()?;
    let mut pixels = vec![255u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(drawing)?;
        let root = root
            .titled(&format!("train job {}", report.job), (FONT_FAMILY, 22))
            .map_err(drawing)?;
        let panels = root.split_evenly((2, 1));
        let last_step = steps
            .iter()
            .map(|s| s.step)
            .chain(validations.iter().map(|v| v.step))
            .max()
            .unwrap_or(0)
            .max(1);
        let x = 0..last_step;

        // KL sits orders of magnitude below the policy loss (1e-4 against 1e-2), so it gets
        // its own axis on the right rather than a flat line along zero.
        let kls: Vec<(u64, f64)> = steps
            .iter()
            .filter_map(|s| s.metrics.kl.map(|kl| (s.step, kl)))
            .collect();
        // Both panels keep the same plot width so their steps line up.
        let right_axis = if kls.is_empty() { 0 } else { 70 };

        let rewards = y_range(
            steps
                .iter()
                .map(|s| s.metrics.reward_mean)
                .chain(validations.iter().map(|v| v.reward_mean)),
            &[0.0, 1.0],
        );
        let mut top = ChartBuilder::on(&panels[0])
            .caption("reward and validation", (FONT_FAMILY, 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .right_y_label_area_size(right_axis)
            .build_cartesian_2d(x.clone(), rewards)
            .map_err(drawing)?;
        top.configure_mesh()
            .x_desc("step")
            .y_desc("reward / accuracy")
            .y_label_formatter(&|v| tick(*v))
            .draw()
            .map_err(drawing)?;
        let curves = [
            Curve {
                label: "reward mean (rollouts)",
                colour: REWARD_COLOUR,
                points: steps
                    .iter()
                    .map(|s| (s.step, s.metrics.reward_mean))
                    .collect(),
            },
            Curve {
                label: "validation reward",
                colour: VALIDATION_REWARD_COLOUR,
                points: validations
                    .iter()
                    .map(|v| (v.step, v.reward_mean))
                    .collect(),
            },
            Curve {
                label: "validation pair accuracy",
                colour: PAIR_ACCURACY_COLOUR,
                points: validations
                    .iter()
                    .map(|v| (v.step, v.pair_accuracy))
                    .collect(),
            },
        ];
        draw_lines(&mut top, curves)?;
        // Rewards climb towards the upper right, and the range always holds 0.
        draw_legend(&mut top, SeriesLabelPosition::LowerRight)?;

        let mut bottom = ChartBuilder::on(&panels[1])
            .caption("policy loss and KL", (FONT_FAMILY, 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .right_y_label_area_size(right_axis)
            .build_cartesian_2d(
                x.clone(),
                y_range(steps.iter().map(|s| s.metrics.policy_loss), &[0.0]),
            )
            .map_err(drawing)?
            .set_secondary_coord(x, y_range(kls.iter().map(|p| p.1), &[0.0]));
        bottom
            .configure_mesh()
            .x_desc("step")
            .y_desc("policy loss")
            .y_label_formatter(&|v| tick(*v))
            .draw()
            .map_err(drawing)?;
        draw_lines(
            &mut bottom,
            [Curve {
                label: "policy loss (left)",
                colour: LOSS_COLOUR,
                points: steps
                    .iter()
                    .map(|s| (s.step, s.metrics.policy_loss))
                    .collect(),
            }],
        )?;
        if !kls.is_empty() {
            bottom
                .configure_secondary_axes()
                .y_desc("KL to the starting model")
                .y_label_formatter(&|v| tick(*v))
                .draw()
                .map_err(drawing)?;
            bottom
                .draw_secondary_series(
                    LineSeries::new(kls, KL_COLOUR.stroke_width(2)).point_size(3),
                )
                .map_err(drawing)?
                .label("KL (right)")
                .legend(|(x, y)| legend_mark(x, y, KL_COLOUR));
        }
        draw_legend(&mut bottom, SeriesLabelPosition::UpperLeft)?;
        root.present().map_err(drawing)?;
    }
    Ok(pixels)
}

/// One line of a chart: (step, value) points.
struct Curve {
    label: &'static str,
    colour: RGBColor,
    points: Vec<(u64, f64)>,
}

type Chart<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordu64, plotters::coord::types::RangedCoordf64>,
>;

/// Lines with a dot per point (a validation curve may have one point), labelled for the legend;
/// empty ones are left out.
fn draw_lines<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    curves: impl IntoIterator<Item = Curve>,
) -> anyhow::Result<()> {
    for Curve {
        label,
        colour,
        points,
    } in curves
    {
        if points.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)).point_size(3))
            .map_err(drawing)?
            .label(label)
            .legend(move |(x, y)| legend_mark(x, y, colour));
    }
    Ok(())
}

fn legend_mark(x: i32, y: i32, colour: RGBColor) -> PathElement<(i32, i32)> {
    PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
}

fn draw_legend<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    position: SeriesLabelPosition,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT_FAMILY, 14))
        .position(position)
        .draw()
        .map_err(drawing)
}

/// An axis label: short decimals, scientific below 0.01 (KL values), and zero as `0`, not the
/// `-0.0` a range's rounding can produce.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a < 1e-12 {
        "0".to_owned()
    } else if (1e-2..1e5).contains(&a) {
        let text = format!("{v:.3}");
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        format!("{v:.1e}")
    }
}

/// plotters' drawing errors borrow nothing but are not all `'static`-friendly; their message is
/// what a person needs.
fn drawing(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the curves: {e}")
}

/// The rollouts blob of step `step`, or why there is none.
fn rollouts_blob(report: &TrainingReport, step: u64) -> anyhow::Result<BlobHash> {
    let Some(s) = report.log.steps.iter().find(|s| s.step == step) else {
        let recorded = match (report.log.steps.first(), report.log.steps.last()) {
            (Some(a), Some(b)) => format!("steps {} to {}", a.step, b.step),
            _ => "no step yet".to_owned(),
        };
        return Err(anyhow!(
            "job {} has no step {step} (it has {recorded})",
            report.job
        ));
    };
    s.rollouts
        .ok_or_else(|| anyhow!("step {step} of job {} recorded no rollouts", report.job))
}

/// What `rollouts` shows of a line of the blob: a rollout as a `score` job reads it, with what
/// the run made of it in `metadata` (the stage's `RolloutLine`). Fields it lacks read as empty,
/// so an older or newer line still shows.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Rollout {
    pub completion: String,
    pub ground_truth: String,
    pub metadata: RolloutMetadata,
}

/// The run's side of a rollout line.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct RolloutMetadata {
    pub prompt_id: String,
    pub sample: u64,
    pub tokens: u64,
    pub finish: String,
    pub reward: f64,
    pub advantage: f64,
}

/// A rollout line as stored (what `--json` prints) and as read.
pub struct RolloutLine<'a> {
    pub stored: &'a str,
    pub rollout: Rollout,
}

/// The first `limit` lines of a rollouts blob, only those rewarded below 1 with `wrong`.
pub fn select_rollouts(
    text: &str,
    limit: usize,
    wrong: bool,
) -> anyhow::Result<Vec<RolloutLine<'_>>> {
    let mut out = Vec::new();
    for (i, stored) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        if out.len() == limit {
            break;
        }
        let rollout: Rollout = serde_json::from_str(stored)
            .with_context(|| format!("line {} of the rollouts blob does not parse", i + 1))?;
        if wrong && rollout.metadata.reward >= 1.0 {
            continue;
        }
        out.push(RolloutLine { stored, rollout });
    }
    Ok(out)
}

/// One rollout on one line: `prompt #sample reward advantage tokens (finish) target completion`.
pub fn rollout_row(r: &Rollout) -> String {
    let m = &r.metadata;
    format!(
        "{}  #{}  reward {}  advantage {:+.3}  {} tokens ({})  target {:?}  {}",
        m.prompt_id,
        m.sample,
        number(m.reward),
        m.advantage,
        m.tokens,
        m.finish,
        r.ground_truth,
        cell(&r.completion, 100)
    )
}

/// A checkpoint of the run: its step when known (the job's result has them once it ends) and
/// its registration when the registry has it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointRow {
    pub step: Option<u64>,
    pub model: BlobHash,
    pub bytes: Option<u64>,
    pub registered_at: Option<i64>,
    pub aliases: Vec<String>,
    /// The run's result model (its last checkpoint).
    pub last: bool,
}

/// The report's registered checkpoints in order, with the steps the result (`output`, once the
/// job has succeeded) names; a checkpoint the result names that the report lacks is listed too.
pub fn checkpoint_rows(
    output: Option<&TrainOutput>,
    report: &TrainingReport,
) -> Vec<CheckpointRow> {
    let step_of = |hash: &BlobHash| {
        output.and_then(|o| {
            o.checkpoints
                .iter()
                .find(|c| c.model == *hash)
                .map(|c| c.step)
        })
    };
    let is_last = |hash: &BlobHash| output.is_some_and(|o| o.model == *hash);
    let mut rows: Vec<CheckpointRow> = report
        .checkpoints
        .iter()
        .map(|m| CheckpointRow {
            step: step_of(&m.model.hash),
            model: m.model.hash,
            bytes: Some(m.model.bytes),
            registered_at: Some(m.registered_at),
            aliases: m.aliases.clone(),
            last: is_last(&m.model.hash),
        })
        .collect();
    for c in output.map(|o| o.checkpoints.as_slice()).unwrap_or_default() {
        if !rows.iter().any(|r| r.model == c.model) {
            rows.push(CheckpointRow {
                step: Some(c.step),
                model: c.model,
                bytes: None,
                registered_at: None,
                aliases: Vec::new(),
                last: is_last(&c.model),
            });
        }
    }
    rows
}

/// The built dataset the run trained on, as `twin eval run --built` takes it: its name where
/// the server recorded one, else its manifest hash or the name submitted.
fn evaluation_dataset(job: &JobState) -> Option<String> {
    let JobSpec::Train(spec) = &job.submission.spec else {
        return None;
    };
    spec.dataset_name
        .clone()
        .or_else(|| spec.manifest.map(|m| m.to_string()))
        .or_else(|| Some(spec.dataset.clone()))
}

/// `twin train checkpoints`: a row per checkpoint, then the command that evaluates the last.
pub fn checkpoints_table(rows: &[CheckpointRow], dataset: Option<&str>) -> String {
    let Some(newest) = rows.last() else {
        return "no checkpoint yet\n".to_owned();
    };
    let mut out = format!(
        "{:>8}  {:<64}  {:>10}  {:<24}  NAMES\n",
        "STEP", "MODEL", "SIZE", "REGISTERED"
    );
    for r in rows {
        let mut names = r.aliases.join(",");
        if r.last {
            names = if names.is_empty() {
                "(result)".to_owned()
            } else {
                format!("{names} (result)")
            };
        }
        out.push_str(&format!(
            "{:>8}  {:<64}  {:>10}  {:<24}  {}\n",
            r.step.map_or_else(|| "-".to_owned(), |s| s.to_string()),
            r.model.to_hex(),
            r.bytes
                .map_or_else(|| "-".to_owned(), crate::models::human_bytes),
            r.registered_at
                .map_or_else(|| "-".to_owned(), crate::online::when),
            names
        ));
    }
    if rows.iter().any(|r| r.step.is_none()) {
        out.push_str("steps are known once the job ends (its result lists them)\n");
    }
    out.push_str(&format!(
        "evaluate one: twin eval run --model {} --built {} --wait\n",
        newest.model.to_hex(),
        dataset.unwrap_or("DATASET")
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use twin_core::JobSubmission;
    use twin_core::train::{TrainStepMetrics, TrainingLog};

    fn parse(submission: &serde_json::Value) -> Box<twin_core::train::TrainSpec> {
        let parsed =
            JobSubmission::from_json(submission.clone()).expect("the server's parser accepts it");
        match parsed.spec {
            JobSpec::Train(t) => t,
            other => panic!("not a train spec: {other:?}"),
        }
    }

    #[test]
    fn a_file_of_spec_fields_is_wrapped_as_a_train_submission() {
        let s = submission(json!({
            "dataset": "pairs", "model": "qwen-3b", "batch_prompts": 8, "group_size": 4,
            "micro_batch": 8, "experiment": "grpo-runs", "retry": {"max_attempts": 2}
        }))
        .expect("wrapped");
        assert_eq!(s["spec"]["kind"], "train");
        assert_eq!(s["experiment"], "grpo-runs");
        assert_eq!(s["retry"]["max_attempts"], 2);
        assert!(s["spec"].get("experiment").is_none(), "{s}");
        let spec = parse(&s);
        assert_eq!(
            (spec.dataset.as_str(), spec.model.as_str()),
            ("pairs", "qwen-3b")
        );
        assert_eq!((spec.batch_prompts, spec.group_size), (8, 4));
    }

    #[test]
    fn the_readme_example_is_a_train_submission_the_server_accepts() {
        let readme = include_str!("../../../README.md");
        let example = readme
            .split("```toml\n")
            .find(|block| block.starts_with("# train.toml"))
            .and_then(|block| block.split("```").next())
            .expect("README.md has a ```toml block starting `# train.toml`");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("train.toml");
        std::fs::write(&path, example).expect("written");
        let s = load_submission(&path).expect("loads");
        let spec = parse(&s);
        assert_eq!(
            (spec.dataset.as_str(), spec.model.as_str()),
            ("pairs", "qwen-3b")
        );
        assert_eq!(spec.max_steps, Some(200));
        assert_eq!(spec.register_as.as_deref(), Some("qwen-3b-twin"));
        // A registered model's name is not a path: it is sent as written.
        assert_eq!(s["spec"]["model"], "qwen-3b");
    }

    #[test]
    fn a_whole_submission_gets_its_kind_and_another_kind_is_refused() {
        let whole = json!({"priority": 3, "spec": {"dataset": "d", "model": "m"}});
        let s = submission(whole).expect("kind added");
        assert_eq!(
            s,
            json!({"priority": 3, "spec": {"dataset": "d", "model": "m", "kind": "train"}})
        );
        parse(&s);
        let explicit = json!({"spec": {"kind": "train", "dataset": "d", "model": "m"}});
        assert_eq!(submission(explicit.clone()).expect("kept"), explicit);
        for other in [
            json!({"spec": {"kind": "eval", "model": "m"}}),
            json!({"kind": "mine", "model": "m"}),
        ] {
            let e = submission(other.clone()).expect_err("another kind");
            assert!(e.to_string().contains("train jobs"), "{other}: {e}");
        }
        assert!(submission(json!({"spec": 3})).is_err());
        assert!(submission(json!([1, 2])).is_err());
    }

    fn step(n: u64, reward: f64, kl: Option<f64>) -> TrainStep {
        TrainStep {
            epoch: 1,
            step: n,
            data_epoch: 0,
            metrics: TrainStepMetrics {
                reward_mean: reward,
                accuracy: reward,
                all_equal_fraction: 0.25,
                policy_loss: -0.01 * n as f64,
                kl,
                entropy: Some(0.71),
                grad_norm: 0.5,
                response_length_mean: 312.4,
                tokens_per_second: 1834.6,
                rollout_seconds: 41.25,
                update_seconds: 12.0,
                ..TrainStepMetrics::default()
            },
            rollouts: Some(BlobHash::of(format!("step {n}").as_bytes())),
        }
    }

    fn validation(n: u64, reward: f64) -> TrainValidation {
        TrainValidation {
            epoch: 1,
            step: n,
            questions: 200,
            reward_mean: reward,
            pair_accuracy: reward + 0.05,
            truncated: 1,
            samples: BlobHash::of(b"samples"),
        }
    }

    fn report(steps: Vec<TrainStep>, validations: Vec<TrainValidation>) -> TrainingReport {
        TrainingReport {
            job: "01clitestjob0000000000one".parse().expect("valid id"),
            log: TrainingLog { steps, validations },
            checkpoints: Vec::new(),
        }
    }

    #[test]
    fn the_curves_table_has_a_row_per_step_and_per_validation() {
        let r = report(
            vec![step(1, 0.5, None), step(2, 0.625, Some(3e-5))],
            vec![validation(0, 0.4), validation(2, 0.6)],
        );
        let t = curves_table(&r);
        let lines: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(lines[0], STEP_HEADER, "{t}");
        assert_eq!(
            lines[1],
            [
                "1", "0.5000", "50.0%", "25.0%", "-0.0100", "-", "0.7100", "0.5000", "312.4",
                "1835", "41.2", "12.0"
            ],
            "{t}"
        );
        // A KL too small for four decimals is printed in scientific notation.
        assert_eq!(lines[2][5], "3.00e-5", "{t}");
        assert!(lines[3].is_empty() && lines[4] == ["validations"], "{t}");
        assert_eq!(lines[5], VALIDATION_HEADER, "{t}");
        assert_eq!(lines[6], ["0", "0.4000", "45.0%", "200", "1"], "{t}");
        assert_eq!(lines[7], ["2", "0.6000", "65.0%", "200", "1"], "{t}");
        // Columns line up: every step row is as long as its header.
        let raw: Vec<&str> = t.lines().collect();
        assert_eq!(raw[0].len(), raw[1].len(), "{t}");

        let empty = curves_table(&report(vec![], vec![]));
        assert!(empty.contains("no optimizer step yet") && empty.contains("no validation yet"));
    }

    #[test]
    fn the_curves_render_to_a_png_with_the_bundled_font() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("curves.png");
        let steps: Vec<TrainStep> = (1..=30)
            .map(|n| step(n, 0.3 + 0.01 * n as f64, Some(1e-4 * n as f64)))
            .collect();
        let r = report(
            steps,
            vec![
                validation(0, 0.4),
                validation(20, 0.55),
                validation(30, 0.6),
            ],
        );
        render_curves(&r, &path).expect("drawn");
        let bytes = std::fs::read(&path).expect("written");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // Text and lines, not a blank canvas: a white 1200×900 PNG compresses to a few KB.
        assert!(bytes.len() > 20_000, "{} bytes", bytes.len());
        let png = image::load_from_memory(&bytes).expect("decodes").to_rgb8();
        assert_eq!(png.dimensions(), CHART_SIZE);
        let coloured = |c: RGBColor| png.pixels().any(|p| p.0 == [c.0, c.1, c.2]);
        for c in [
            REWARD_COLOUR,
            VALIDATION_REWARD_COLOUR,
            PAIR_ACCURACY_COLOUR,
            LOSS_COLOUR,
            KL_COLOUR,
        ] {
            assert!(coloured(c), "no {c:?} line");
        }

        // One validation and no step yet still draws (a dot), and nothing at all is refused.
        render_curves(&report(vec![], vec![validation(0, 0.4)]), &path).expect("drawn");
        let e = render_curves(&report(vec![], vec![]), &path).expect_err("nothing to draw");
        assert!(e.to_string().contains("nothing to draw"), "{e}");
    }

    #[test]
    fn the_title_text_is_drawn_from_the_bundled_font() {
        // The same chart with a different job id differs only where the title's glyphs are:
        // text really is rendered, so the font loaded.
        let a = report(vec![step(1, 0.5, None)], vec![]);
        let mut b = a.clone();
        b.job = "01clitestjob0000000000two".parse().expect("valid id");
        let (pa, pb) = (
            draw_curves(&a, CHART_SIZE).expect("drawn"),
            draw_curves(&b, CHART_SIZE).expect("drawn"),
        );
        let differing = pa.iter().zip(&pb).filter(|(x, y)| x != y).count();
        assert!(differing > 50, "{differing} bytes differ");
        // Only the title band (the top 40 rows) changed.
        let band = 40 * CHART_SIZE.0 as usize * 3;
        assert_eq!(pa[band..], pb[band..]);
    }

    #[test]
    fn rollouts_are_selected_and_shown_on_one_line() {
        let blob = [
            json!({"prompt": "Same?", "completion": "<think>same\nbird</think><answer>yes</answer>",
                   "ground_truth": "yes", "question_type": "pair",
                   "metadata": {"step": 3, "prompt_id": "p1", "sample": 0, "tokens": 12,
                                "finish": "stop", "reward": 1.0,
                                "components": {"binary-match": 1.0}, "advantage": 0.8}}),
            json!({"prompt": "Same?", "completion": "x".repeat(300), "ground_truth": "yes",
                   "question_type": "pair",
                   "metadata": {"step": 3, "prompt_id": "p1", "sample": 1, "tokens": 2048,
                                "finish": "length", "reward": 0.0, "components": {},
                                "advantage": -0.8}}),
            json!({"completion": "no", "ground_truth": "no",
                   "metadata": {"step": 3, "prompt_id": "p2", "sample": 0, "tokens": 1,
                                "finish": "stop", "reward": 0.0, "advantage": 0.0}}),
        ]
        .map(|v| v.to_string())
        .join("\n");
        let all = select_rollouts(&blob, 20, false).expect("parses");
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].stored, blob.lines().next().expect("a line"));
        assert_eq!(
            rollout_row(&all[0].rollout),
            "p1  #0  reward 1.0000  advantage +0.800  12 tokens (stop)  target \"yes\"  \
             <think>same bird</think><answer>yes</answer>"
        );
        let long = rollout_row(&all[1].rollout);
        assert!(long.ends_with('…') && !long.contains('\n'), "{long}");
        let wrong = select_rollouts(&blob, 1, true).expect("parses");
        assert_eq!(wrong.len(), 1);
        assert_eq!(
            (
                wrong[0].rollout.metadata.prompt_id.as_str(),
                wrong[0].rollout.metadata.sample
            ),
            ("p1", 1)
        );
        assert!(select_rollouts("{not json", 5, false).is_err());

        let r = report(vec![step(1, 0.5, None), step(2, 0.5, None)], vec![]);
        assert_eq!(
            rollouts_blob(&r, 2).expect("found"),
            BlobHash::of(b"step 2")
        );
        let e = rollouts_blob(&r, 9).expect_err("no step 9");
        assert!(e.to_string().contains("it has steps 1 to 2"), "{e}");
    }

    #[test]
    fn checkpoints_list_steps_once_known_and_how_to_evaluate() {
        let (a, b) = (BlobHash::of(b"a"), BlobHash::of(b"b"));
        let rows = vec![
            CheckpointRow {
                step: Some(40),
                model: a,
                bytes: Some(7 * 1024 * 1024 * 1024),
                registered_at: Some(0),
                aliases: vec![],
                last: false,
            },
            CheckpointRow {
                step: None,
                model: b,
                bytes: Some(1024),
                registered_at: Some(1_000),
                aliases: vec!["qwen-twin".into()],
                last: true,
            },
        ];
        let t = checkpoints_table(&rows, Some("pairs"));
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("    STEP  MODEL"), "{t}");
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            [
                "40",
                a.to_hex().as_str(),
                "7.0",
                "GiB",
                "1970-01-01T00:00:00.000Z"
            ],
            "{t}"
        );
        assert!(
            lines[2].starts_with("       -  ") && lines[2].ends_with("qwen-twin (result)"),
            "{t}"
        );
        assert_eq!(
            lines[3],
            "steps are known once the job ends (its result lists them)"
        );
        assert_eq!(
            lines[4],
            format!(
                "evaluate one: twin eval run --model {} --built pairs --wait",
                b.to_hex()
            )
        );
        assert_eq!(checkpoints_table(&[], None), "no checkpoint yet\n");
    }

    fn registered(hash: BlobHash, at: i64) -> twin_core::projection::ModelInfo {
        twin_core::projection::ModelInfo {
            model: twin_core::event::ModelRegistered {
                hash,
                files: vec![],
                bytes: 10,
                kind: Default::default(),
                job: None,
            },
            registered_by: "executor".into(),
            registered_at: at,
            aliases: vec![],
        }
    }

    #[test]
    fn a_running_jobs_checkpoints_have_hashes_and_a_finished_ones_steps() {
        let (a, b, c) = (BlobHash::of(b"a"), BlobHash::of(b"b"), BlobHash::of(b"c"));
        let mut r = report(vec![], vec![]);
        r.checkpoints = vec![registered(a, 1), registered(b, 2)];
        let running = checkpoint_rows(None, &r);
        assert_eq!(
            running
                .iter()
                .map(|c| (c.step, c.model, c.last))
                .collect::<Vec<_>>(),
            [(None, a, false), (None, b, false)]
        );
        let output = TrainOutput {
            objective: twin_core::train::TrainObjective::Grpo,
            steps: 120,
            model: c,
            checkpoints: [(40, a), (80, b), (120, c)]
                .map(|(step, model)| twin_core::train::TrainCheckpoint { step, model })
                .to_vec(),
            train_yes: 1,
            train_no: 1,
            skipped_multi: 0,
            initial_validation: None,
            final_validation: None,
            resumed_from: 0,
            device: "cuda:0".into(),
            wall_seconds: 1.0,
        };
        let done = checkpoint_rows(Some(&output), &r);
        assert_eq!(
            done.iter()
                .map(|c| (c.step, c.model, c.last, c.bytes))
                .collect::<Vec<_>>(),
            [
                (Some(40), a, false, Some(10)),
                (Some(80), b, false, Some(10)),
                (Some(120), c, true, None)
            ]
        );
    }
}
