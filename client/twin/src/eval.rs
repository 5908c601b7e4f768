//! `twin eval`: submit an evaluation of a Qwen2.5-VL checkpoint, compare finished evaluations
//! side by side, and read an evaluation's per-question samples.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use clap::{Args, Subcommand};
use twin_client::Client;
use twin_core::eval::{
    AppliedImageBounds, EvalFinish, EvalOutput, EvalSample, ImageBounds, MeanMetrics,
    SubsetMetrics, mean_metrics,
};
use twin_core::event::JobResult;
use twin_core::job::{JobState, JobStatus};
use twin_core::spec::JobSpec;

use crate::Failure;

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Submit an eval job: a checkpoint answers a built dataset's eval split or a questions.jsonl.
    Run(RunArgs),
    /// Compare finished eval jobs: one row per subset (and their mean), three metrics per job.
    Compare {
        /// Eval job ids, in column order.
        #[arg(required = true)]
        jobs: Vec<String>,
    },
    /// Print an eval job's per-question records (question, completion, parsed answer, score).
    Samples {
        job: String,
        /// At most this many records.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Only this subset (case-insensitive).
        #[arg(long)]
        subset: Option<String>,
        /// Only the questions answered wrongly.
        #[arg(long)]
        wrong: bool,
    },
}

#[derive(Args)]
pub struct RunArgs {
    /// The Qwen2.5-VL checkpoint: a registered model's name or hash (`twin models ls`), or a
    /// directory path as the executor sees it (a path has a `/`: `./qwen`; made absolute here).
    #[arg(long)]
    pub model: String,
    /// A built dataset (name or manifest hash): its eval split.
    #[arg(
        long,
        conflicts_with = "questions",
        required_unless_present = "questions"
    )]
    pub built: Option<String>,
    /// A questions.jsonl made by `twin import` on the executor's file system (made absolute here).
    #[arg(long)]
    pub questions: Option<PathBuf>,
    /// Only this subset (repeatable; case-insensitive).
    #[arg(long = "subset")]
    pub subsets: Vec<String>,
    /// At most this many questions per subset.
    #[arg(long)]
    pub limit: Option<u32>,
    /// Longest completion in tokens.
    #[arg(long, default_value_t = 1024)]
    pub max_new_tokens: u32,
    /// Prompts per engine call.
    #[arg(long, default_value_t = 8)]
    pub batch_size: u32,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Pixel bounds of --questions images: lmms_eval (FGVQA's protocol) or checkpoint.
    #[arg(long, default_value = "lmms_eval")]
    pub image_bounds: String,
    /// Scorer of the pair questions (a registered reward module: name or hash).
    #[arg(long, default_value = twin_core::eval::DEFAULT_PAIR_SCORER)]
    pub pair_scorer: String,
    /// Scorer of the multi questions.
    #[arg(long, default_value = twin_core::eval::DEFAULT_MULTI_SCORER)]
    pub multi_scorer: String,
    #[arg(long)]
    pub experiment: Option<String>,
    /// Wait for the job and print its metrics (exit 1 unless it succeeds).
    #[arg(long)]
    pub wait: bool,
}

/// A path as given, made absolute against the current directory (not resolved: the executor
/// may be another machine, where only the path's text means something).
fn absolute(path: &Path) -> anyhow::Result<String> {
    let p = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir()
            .context("reading the current directory")?
            .join(path)
    };
    p.to_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{} is not UTF-8", p.display()))
}

/// The submission `twin eval run` sends.
pub fn submission(args: &RunArgs) -> anyhow::Result<serde_json::Value> {
    let data = match (&args.built, &args.questions) {
        (Some(b), None) => serde_json::json!({ "built": b }),
        (None, Some(q)) => serde_json::json!({ "questions": absolute(q)? }),
        _ => return Err(anyhow!("give exactly one of --built and --questions")),
    };
    let mut spec = serde_json::json!({
        "kind": "eval",
        "model": match twin_core::model::ModelRef::parse(&args.model) {
            twin_core::model::ModelRef::Path(p) => absolute(Path::new(p))?,
            twin_core::model::ModelRef::Registered(name) => name.to_owned(),
        },
        "data": data,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "device": args.device,
        "image_bounds": args.image_bounds,
        "scorers": {
            "pair": {"module": args.pair_scorer},
            "multi": {"module": args.multi_scorer},
        },
    });
    if !args.subsets.is_empty() {
        spec["subsets"] = serde_json::json!(args.subsets);
    }
    if let Some(limit) = args.limit {
        spec["limit"] = limit.into();
    }
    let mut submission = serde_json::json!({ "spec": spec });
    if let Some(e) = &args.experiment {
        submission["experiment"] = e.clone().into();
    }
    Ok(submission)
}

pub async fn run(client: &Client, command: EvalCommand, json: bool) -> Result<(), Failure> {
    match command {
        EvalCommand::Run(args) => {
            let mut submission = submission(&args)?;
            // The questions file and a model directory are on this machine: sent as blobs.
            crate::uploads::upload_host_paths(client, &mut submission).await?;
            let job = client.submit(&submission, None).await?.job;
            if !args.wait {
                if json {
                    println!("{}", serde_json::to_string_pretty(&job)?);
                } else {
                    println!("submitted job {} (eval)", job.id);
                }
                return Ok(());
            }
            if !json {
                println!("submitted job {} (eval)", job.id);
            }
            crate::online::wait(client, job.id.as_str(), None, json).await?;
            if !json {
                let done = evaluated(&client.job(job.id.as_str()).await?)?;
                print_table(&[done]);
            }
        }
        EvalCommand::Compare { jobs } => {
            let mut columns = Vec::with_capacity(jobs.len());
            for id in &jobs {
                columns.push(evaluated(&client.job(id).await?)?);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&compare_json(&columns))?);
            } else {
                print_table(&columns);
            }
        }
        EvalCommand::Samples {
            job,
            limit,
            subset,
            wrong,
        } => {
            let column = evaluated(&client.job(&job).await?)?;
            let bytes = client.get_blob(&column.output.samples).await?;
            let text = std::str::from_utf8(&bytes).context("the samples blob is not UTF-8")?;
            let mut shown = 0;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let s: EvalSample =
                    serde_json::from_str(line).context("a samples line does not parse")?;
                if subset
                    .as_ref()
                    .is_some_and(|x| !x.eq_ignore_ascii_case(&s.subset))
                    || (wrong && s.score >= 1.0)
                {
                    continue;
                }
                if shown == limit {
                    break;
                }
                shown += 1;
                if json {
                    println!("{}", serde_json::to_string(&s)?);
                } else {
                    print_sample(&s);
                }
            }
        }
    }
    Ok(())
}

/// A finished eval job and how it is labelled in tables.
pub struct Evaluated {
    pub id: String,
    /// The checkpoint directory's last component and the weights hash's first 8 digits.
    pub label: String,
    pub model: String,
    pub output: EvalOutput,
}

/// The job's eval output, or why it has none.
fn evaluated(job: &JobState) -> Result<Evaluated, Failure> {
    let JobSpec::Eval(spec) = &job.submission.spec else {
        return Err(anyhow!("job {} is a {} job, not an eval job", job.id, job.kind).into());
    };
    match (&job.result, job.status) {
        (Some(JobResult::Eval(out)), JobStatus::Succeeded) => {
            let dir = Path::new(&spec.model)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or(&spec.model);
            let short = out.model_hash.get(..8).unwrap_or(&out.model_hash);
            Ok(Evaluated {
                id: job.id.to_string(),
                label: format!("{dir} {short}"),
                model: spec.model.clone(),
                output: out.clone(),
            })
        }
        (_, status) => Err(anyhow!(
            "eval job {} is {}; only a succeeded job has metrics",
            job.id,
            status.as_str()
        )
        .into()),
    }
}

fn compare_json(columns: &[Evaluated]) -> serde_json::Value {
    let jobs: Vec<serde_json::Value> = columns
        .iter()
        .map(|c| {
            serde_json::json!({
                "id": c.id,
                "label": c.label,
                "model": c.model,
                "model_hash": c.output.model_hash,
                "image_bounds": c.output.image_bounds,
                "questions": c.output.questions,
                "subsets": c.output.subsets,
                "mean": mean_metrics(c.output.subsets.values()),
            })
        })
        .collect();
    serde_json::json!({ "subsets": subset_names(columns), "jobs": jobs })
}

/// Every subset any job has, sorted.
fn subset_names(columns: &[Evaluated]) -> Vec<String> {
    let names: std::collections::BTreeSet<&String> = columns
        .iter()
        .flat_map(|c| c.output.subsets.keys())
        .collect();
    names.into_iter().cloned().collect()
}

const CELL: usize = 8;
const METRICS: [&str; 3] = ["pair", "multi", "overall"];

fn percent(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{:.1}%", v * 100.0))
}

fn cells(m: Option<&SubsetMetrics>) -> [String; 3] {
    match m {
        Some(m) => [
            percent(m.pairwise_total),
            percent(m.multiple_choice_total),
            percent(m.overall_total),
        ],
        None => ["n/a".to_owned(), "n/a".to_owned(), "n/a".to_owned()],
    }
}

fn mean_cells(m: &MeanMetrics) -> [String; 3] {
    [
        percent(m.pairwise_total),
        percent(m.multiple_choice_total),
        percent(m.overall_total),
    ]
}

/// The comparison table: a subset per row, then their mean; per job the pair, multi and overall
/// accuracy (`-` where the subset has no question of that type, `n/a` where the job did not
/// evaluate the subset).
pub fn table(columns: &[Evaluated]) -> String {
    let subsets = subset_names(columns);
    let first = subsets
        .iter()
        .map(String::len)
        .chain([6])
        .max()
        .unwrap_or(6);
    let block = METRICS.len() * CELL + (METRICS.len() - 1);
    let mut labels: Vec<String> = columns.iter().map(|c| c.label.clone()).collect();
    // The same checkpoint evaluated twice gets its job ids to tell the columns apart.
    for (i, c) in columns.iter().enumerate() {
        if columns.iter().filter(|o| o.label == c.label).count() > 1 {
            labels[i] = format!("{} {}", c.label, &c.id[c.id.len().saturating_sub(6)..]);
        }
    }
    let mut out = String::new();
    let row = |out: &mut String, name: &str, blocks: Vec<[String; 3]>| {
        out.push_str(&format!("{name:<first$}"));
        for b in blocks {
            out.push_str("   ");
            let text: Vec<String> = b.iter().map(|c| format!("{c:>CELL$}")).collect();
            out.push_str(&text.join(" "));
        }
        out.push('\n');
    };
    out.push_str(&format!("{:<first$}", "SUBSET"));
    for l in &labels {
        let l: String = l.chars().take(block).collect();
        out.push_str(&format!("   {l:<block$}"));
    }
    out.push('\n');
    row(
        &mut out,
        "",
        columns.iter().map(|_| METRICS.map(str::to_owned)).collect(),
    );
    for s in &subsets {
        row(
            &mut out,
            s,
            columns
                .iter()
                .map(|c| cells(c.output.subsets.get(s)))
                .collect(),
        );
    }
    row(
        &mut out,
        "mean",
        columns
            .iter()
            .map(|c| mean_cells(&mean_metrics(c.output.subsets.values())))
            .collect(),
    );
    for (c, l) in columns.iter().zip(&labels) {
        let o = &c.output;
        let (pairs, multis): (u64, u64) = o
            .subsets
            .values()
            .fold((0, 0), |(p, m), s| (p + s.pair_count, m + s.multi_count));
        out.push_str(&format!(
            "{l}: job {}, {} questions ({pairs} pair, {multis} multi), {} cut off at max_new_tokens, {:.1} s{}\n",
            c.id,
            o.questions,
            o.truncated,
            o.wall_seconds,
            o.image_bounds.map(bounds_note).unwrap_or_default()
        ));
    }
    out
}

/// The image bounds a job ran with, for the table's footer: accuracy depends on them.
fn bounds_note(b: AppliedImageBounds) -> String {
    let policy = match b.policy {
        ImageBounds::LmmsEval => "lmms_eval",
        ImageBounds::Checkpoint => "checkpoint",
    };
    format!(
        ", images within {}–{} pixels ({policy})",
        b.min_pixels, b.max_pixels
    )
}

fn print_table(columns: &[Evaluated]) {
    for line in table(columns).lines() {
        println!("{}", line.trim_end());
    }
}

fn print_sample(s: &EvalSample) {
    println!(
        "{}  {}  {}  score {}  target {:?}  parsed {:?}  ({}, {} tokens)",
        s.id,
        s.subset,
        s.question_type.as_str(),
        s.score,
        s.target,
        s.parsed_answer,
        match s.finish {
            EvalFinish::Stop => "stopped",
            EvalFinish::Length => "cut off at max_new_tokens",
        },
        s.tokens
    );
    println!("    images: {}", s.images.join(", "));
    println!("    completion: {:?}", s.completion);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use twin_core::BlobHash;
    use twin_core::eval::{QuestionKind, subset_metrics};

    fn column(id: &str, label: &str, scored: &[(&str, QuestionKind, f64)]) -> Evaluated {
        Evaluated {
            id: id.into(),
            label: label.into(),
            model: "/m".into(),
            output: EvalOutput {
                model_hash: "ab".repeat(32),
                model_manifest: None,
                device: "cpu".into(),
                image_bounds: None,
                questions: scored.len() as u64,
                subsets: subset_metrics(scored.iter().copied()),
                samples: BlobHash::of(b"s"),
                scorers: BTreeMap::new(),
                prompt_tokens: 0,
                generated_tokens: 0,
                truncated: 0,
                resumed: 0,
                wall_seconds: 1.0,
            },
        }
    }

    #[test]
    fn the_table_has_a_row_per_subset_and_the_mean() {
        use QuestionKind::{Multi, Pair};
        let a = column(
            "01JOBAAAAAAAAAAAAAAAAAAAAA",
            "qwen abababab",
            &[("cub", Pair, 1.0), ("cub", Pair, 0.0), ("twin", Multi, 1.0)],
        );
        let mut b = column(
            "01JOBBBBBBBBBBBBBBBBBBBBBB",
            "qwen abababab",
            &[("cub", Pair, 1.0)],
        );
        b.output.image_bounds = Some(AppliedImageBounds {
            policy: ImageBounds::LmmsEval,
            min_pixels: 200_704,
            max_pixels: 1_605_632,
        });
        let t = table(&[a, b]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("SUBSET"), "{t}");
        // Same label twice: the job ids tell them apart.
        assert!(
            lines[0].contains("AAAAAA") && lines[0].contains("BBBBBB"),
            "{t}"
        );
        assert!(
            lines[1].contains("pair") && lines[1].contains("overall"),
            "{t}"
        );
        let cub: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            cub,
            ["cub", "50.0%", "-", "50.0%", "100.0%", "-", "100.0%"],
            "{t}"
        );
        let twin: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(
            twin,
            ["twin", "-", "100.0%", "100.0%", "n/a", "n/a", "n/a"],
            "{t}"
        );
        let mean: Vec<&str> = lines[4].split_whitespace().collect();
        assert_eq!(
            mean,
            ["mean", "50.0%", "100.0%", "75.0%", "100.0%", "-", "100.0%"],
            "{t}"
        );
        assert!(lines[5].contains("3 questions (2 pair, 1 multi)"), "{t}");
        assert!(!lines[5].contains("images within"), "{t}");
        assert!(
            lines[6].ends_with(", images within 200704–1605632 pixels (lmms_eval)"),
            "{t}"
        );
    }

    #[test]
    fn run_arguments_make_an_eval_submission() {
        let args = RunArgs {
            model: "./ckpt".into(),
            built: None,
            questions: Some(PathBuf::from("/data/fgvqa/questions.jsonl")),
            subsets: vec!["cub".into()],
            limit: Some(5),
            max_new_tokens: 16,
            batch_size: 4,
            device: "cpu".into(),
            image_bounds: "checkpoint".into(),
            pair_scorer: "fgvqa-pair".into(),
            multi_scorer: "fgvqa-multi".into(),
            experiment: None,
            wait: false,
        };
        let s = submission(&args).expect("valid");
        let parsed =
            twin_core::JobSubmission::from_json(s.clone()).expect("the server's parser accepts it");
        let JobSpec::Eval(spec) = parsed.spec else {
            panic!("not an eval spec: {s}");
        };
        assert!(
            spec.model.starts_with('/') && spec.model.ends_with("/ckpt"),
            "{}",
            spec.model
        );
        assert_eq!(
            spec.data,
            twin_core::eval::EvalData::Questions("/data/fgvqa/questions.jsonl".into())
        );
        // A bare word is a registered model, sent as it is.
        let named = submission(&RunArgs {
            model: "qwen-3b".into(),
            ..args
        })
        .expect("valid");
        assert_eq!(named["spec"]["model"], "qwen-3b");
        assert_eq!(
            (spec.limit, spec.max_new_tokens, spec.batch_size),
            (Some(5), 16, 4)
        );
        assert_eq!(spec.subsets, ["cub"]);
        assert_eq!(spec.image_bounds, ImageBounds::Checkpoint);
    }
}
