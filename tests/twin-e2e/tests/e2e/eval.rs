//! Evaluation through the real server and CLI: sample data → ingest → build a dataset → random
//! tiny Qwen2.5-VL checkpoints answer its eval split → metrics, comparison, samples; questions
//! from a questions.jsonl; the bad inputs; and an eval job whose executor dies mid-way.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use twin_e2e::{ExecutorProcess, Server, bin, eventually, ingest_spec, text, twin};

use crate::mining::{ok_json, write};
use crate::modules_dir;

/// A seeded random tiny Qwen2.5-VL checkpoint with a byte-level tokenizer, made by the executor
/// binary.
pub(crate) fn tiny_qwen(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let path = dir.join(name);
    let out = Command::new(bin("twin-executor"))
        .args(["model", "init-qwen", "--preset", "tiny", "--seed"])
        .arg(seed.to_string())
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    path
}

/// What `prepare` made.
pub(crate) struct Prepared {
    images: PathBuf,
    /// The built dataset's row counts (`eval.pair`, `eval.multi`, …).
    counts: serde_json::Value,
}

/// Ingests a sample set, builds dataset `pairs` (random negatives, four multi questions in the
/// eval split) and registers the FGVQA scorers under their default names.
pub(crate) fn prepare(tmp: &Path, url: &str) -> Prepared {
    let images = tmp.join("images");
    crate::sample(
        &images,
        &[
            "--categories",
            "2",
            "--instances",
            "4",
            "--views",
            "4",
            "--size",
            "64",
        ],
    );
    let spec = ingest_spec(tmp, "sample", &images);
    ok_json(&[
        "--server",
        url,
        "--json",
        "submit",
        spec.to_str().unwrap(),
        "--wait",
    ]);
    let build = write(
        tmp,
        "build.json",
        serde_json::json!({"spec": {
            "kind": "build-dataset", "name": "pairs", "dataset": "sample",
            "options": {"seed": 7, "eval_fraction": 0.5, "negatives": "random",
                        "multi_questions": {"eval": 4}},
        }}),
    );
    let built = ok_json(&["--server", url, "--json", "submit", &build, "--wait"]);
    let counts = built["result"]["counts"].clone();
    for (file, name) in [("fgvqa_pair", "fgvqa-pair"), ("fgvqa_multi", "fgvqa-multi")] {
        let path = modules_dir().join(format!("{file}.wasm"));
        ok_json(&[
            "--server",
            url,
            "--json",
            "modules",
            "add",
            path.to_str().unwrap(),
            "--name",
            name,
        ]);
    }
    Prepared { images, counts }
}

/// Runs `twin eval run …` and returns its output.
fn eval_run(url: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--server", url, "--json", "eval", "run"];
    all.extend_from_slice(args);
    twin(&all)
}

fn metric_ok(v: &serde_json::Value) -> bool {
    v.is_null() || v.as_f64().is_some_and(|x| (0.0..=1.0).contains(&x))
}

#[test]
fn evaluate_a_built_dataset_and_compare_two_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), &[]);
    let url = server.url.as_str();
    let prepared = prepare(tmp.path(), url);
    let (pairs, multis) = (
        prepared.counts["eval.pair"].as_u64().unwrap(),
        prepared.counts["eval.multi"].as_u64().unwrap(),
    );
    assert!(pairs > 0 && multis > 0, "{:#}", prepared.counts);
    let a = tiny_qwen(tmp.path(), "qwen-a", 1);
    let b = tiny_qwen(tmp.path(), "qwen-b", 2);

    // The whole eval split.
    let job_a = ok_json(&[
        "--server",
        url,
        "--json",
        "eval",
        "run",
        "--model",
        a.to_str().unwrap(),
        "--built",
        "pairs",
        "--max-new-tokens",
        "16",
        "--batch-size",
        "4",
        "--wait",
    ]);
    let r = &job_a["result"];
    assert_eq!(r["kind"], "eval", "{job_a:#}");
    let subset = &r["subsets"]["pairs"];
    assert_eq!(subset["pair_count"], pairs, "{r:#}");
    assert_eq!(subset["multi_count"], multis, "{r:#}");
    assert_eq!(r["questions"], pairs + multis);
    for m in ["pairwise_total", "multiple_choice_total", "overall_total"] {
        assert!(subset[m].is_number() && metric_ok(&subset[m]), "{m}: {r:#}");
    }
    let generated = r["generated_tokens"].as_u64().unwrap();
    assert!(generated > 0 && generated <= (pairs + multis) * 16, "{r:#}");
    let modules = ok_json(&["--server", url, "--json", "modules", "ls"]);
    let registered = |name: &str| {
        modules
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["aliases"].as_array().unwrap().iter().any(|a| a == name))
            .map(|m| m["hash"].clone())
            .unwrap()
    };
    assert_eq!(
        r["scorers"]["pair"]["module_hash"],
        registered("fgvqa-pair")
    );
    assert_eq!(
        r["scorers"]["multi"]["module_hash"],
        registered("fgvqa-multi")
    );
    assert_eq!(r["scorers"]["pair"]["scored"], pairs);
    // The job's inputs name the manifest and both scorers, so lineage is exact.
    let spec = &job_a["submission"]["spec"];
    assert_eq!(spec["dataset_name"], "pairs");
    assert!(spec["manifest"].is_string(), "{spec:#}");
    let id_a = job_a["id"].as_str().unwrap().to_owned();

    // The samples: the rendered prompt, what the model said, what the rule read, the score.
    let out = twin(&[
        "--server", url, "--json", "eval", "samples", &id_a, "--limit", "3",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    let samples: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(samples.len(), 3, "{stdout}");
    for s in &samples {
        let prompt = s["prompt"].as_str().unwrap();
        assert!(prompt.starts_with("<|im_start|>system\n"), "{prompt}");
        assert!(
            prompt.contains("use the answer tags <answer></answer>.<|im_end|>"),
            "{prompt}"
        );
        assert!(s["score"] == 0.0 || s["score"] == 1.0, "{s:#}");
        assert!(
            s["target"].is_string() && s["parsed_answer"].is_string(),
            "{s:#}"
        );
        assert!(s["tokens"].as_u64().unwrap() <= 16, "{s:#}");
    }

    // Another checkpoint, a handful of questions.
    let job_b = ok_json(&[
        "--server",
        url,
        "--json",
        "eval",
        "run",
        "--model",
        b.to_str().unwrap(),
        "--built",
        "pairs",
        "--max-new-tokens",
        "16",
        "--limit",
        "5",
        "--wait",
    ]);
    assert_eq!(job_b["result"]["questions"], 5, "{job_b:#}");
    let id_b = job_b["id"].as_str().unwrap().to_owned();
    assert_ne!(job_b["result"]["model_hash"], r["model_hash"]);

    let out = twin(&["--server", url, "eval", "compare", &id_a, &id_b]);
    let (table, stderr) = text(&out);
    assert!(out.status.success(), "{table}{stderr}");
    let lines: Vec<&str> = table.lines().collect();
    // `eval run` registered each checkpoint directory by content: columns name the hashes.
    let model = |job: &serde_json::Value| {
        job["submission"]["spec"]["model"].as_str().unwrap()[..20].to_owned()
    };
    assert!(
        lines[0].starts_with("SUBSET")
            && lines[0].contains(&model(&job_a))
            && lines[0].contains(&model(&job_b)),
        "{table}"
    );
    let row = |name: &str| {
        lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} row in:\n{table}"))
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
    };
    for name in ["pairs", "mean"] {
        let cells = row(name);
        assert_eq!(cells.len(), 6, "{table}");
        assert!(
            cells.iter().all(|c| *c == "-" || c.ends_with('%')),
            "{table}"
        );
    }
    let compared = ok_json(&["--server", url, "--json", "eval", "compare", &id_a, &id_b]);
    assert_eq!(compared["subsets"], serde_json::json!(["pairs"]));
    assert_eq!(compared["jobs"][0]["subsets"], r["subsets"]);
    assert_eq!(compared["jobs"][1]["id"], id_b.as_str());

    // Only eval jobs compare.
    let ingest_id =
        ok_json(&["--server", url, "--json", "jobs", "ls", "--kind", "ingest"])[0]["id"]
            .as_str()
            .unwrap()
            .to_owned();
    let out = twin(&["--server", url, "eval", "compare", &ingest_id]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not an eval job"), "{stderr}");
}

/// Image files of the sample set, sorted.
fn image_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "png") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A questions.jsonl in the layout `twin import fgvqa` writes, over the sample images.
fn questions_file(tmp: &Path, images: &Path, broken: bool) -> PathBuf {
    let files: Vec<String> = image_files(images)
        .iter()
        .map(|p| p.strip_prefix(tmp).unwrap().to_str().unwrap().to_owned())
        .collect();
    let mut lines = vec![
        serde_json::json!({"subset": "CUB", "question_type": "pairwise",
            "question": "Do these two images show a bird of the same species?",
            "answer": "yes", "images": [files[0], files[1]]}),
        serde_json::json!({"subset": "CUB", "question_type": "multi",
            "question": multi_question(), "answer": "2",
            "images": [files[0], files[1], files[2], files[9]]}),
        serde_json::json!({"subset": "MET", "question_type": "pairwise", "question": "",
            "answer": "no", "images": [files[0], files[9]]}),
    ];
    if broken {
        std::fs::write(tmp.join("broken.png"), b"\x89PNG not really").unwrap();
        lines.push(
            serde_json::json!({"subset": "CUB", "question_type": "pairwise",
            "question": "Same?", "answer": "no", "images": [files[3], "broken.png"]}),
        );
    }
    let name = if broken {
        "broken.jsonl"
    } else {
        "questions.jsonl"
    };
    let path = tmp.join(name);
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&path, text.join("\n") + "\n").unwrap();
    path
}

fn multi_question() -> &'static str {
    "The first image is a reference image. How many of the other images depict the same \
     product? Answer with a number from 0 to 3 in <answer> tags."
}

#[test]
fn bad_eval_inputs_are_refused_or_fail_with_reasons() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), &[]);
    let url = server.url.as_str();
    let prepared = prepare(tmp.path(), url);
    let model = tiny_qwen(tmp.path(), "qwen", 1);
    let model_arg = model.to_str().unwrap();
    let refused = |args: &[&str], want: &str| {
        let out = eval_run(url, args);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stdout}{stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    };
    refused(
        &["--model", model_arg, "--built", "nope"],
        "no built dataset `nope`",
    );
    refused(
        &[
            "--model",
            model_arg,
            "--built",
            "pairs",
            "--max-new-tokens",
            "0",
        ],
        "spec.max_new_tokens",
    );
    refused(
        &["--model", model_arg, "--built", "pairs", "--device", "cuda"],
        "CUDA was requested",
    );
    refused(
        &[
            "--model",
            model_arg,
            "--built",
            "pairs",
            "--pair-scorer",
            "unregistered",
        ],
        "spec.scorers.pair.module: no module `unregistered`",
    );

    // A checkpoint missing a tensor fails its job, naming the tensor.
    let broken = tmp.path().join("broken-qwen");
    std::fs::create_dir_all(&broken).unwrap();
    for e in std::fs::read_dir(&model).unwrap().flatten() {
        std::fs::copy(e.path(), broken.join(e.file_name())).unwrap();
    }
    let weights = broken.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let key = b"\"model.norm.weight\"";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("the header names model.norm.weight");
    // Same length, so the header stays valid: the tensor is just not there under its name.
    bytes[at + key.len() - 2] = b'X';
    std::fs::write(&weights, bytes).unwrap();
    let out = eval_run(
        url,
        &[
            "--model",
            broken.to_str().unwrap(),
            "--built",
            "pairs",
            "--wait",
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("missing tensor `model.norm.weight`"),
        "{stdout}{stderr}"
    );

    // A prompt plus max_new_tokens beyond the context fails with the engine's message.
    let out = eval_run(
        url,
        &[
            "--model",
            model_arg,
            "--built",
            "pairs",
            "--max-new-tokens",
            "5000",
            "--wait",
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("exceed the context of 4096 tokens"),
        "{stderr}"
    );

    // An unreadable image fails the job, naming the image.
    let questions = questions_file(tmp.path(), &prepared.images, true);
    let out = eval_run(
        url,
        &[
            "--model",
            model_arg,
            "--questions",
            questions.to_str().unwrap(),
            "--max-new-tokens",
            "8",
            "--wait",
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("image broken.png (question q4): not a recognised image"),
        "{stderr}"
    );

    // The server and its executor keep working: questions.jsonl, one subset.
    let questions = questions_file(tmp.path(), &prepared.images, false);
    let job = ok_json(&[
        "--server",
        url,
        "--json",
        "eval",
        "run",
        "--model",
        model_arg,
        "--questions",
        questions.to_str().unwrap(),
        "--subset",
        "cub",
        "--max-new-tokens",
        "8",
        "--wait",
    ]);
    let r = &job["result"];
    assert_eq!(r["questions"], 2, "{job:#}");
    let cub = &r["subsets"]["CUB"];
    assert_eq!(
        (cub["pair_count"].as_u64(), cub["multi_count"].as_u64()),
        (Some(1), Some(1)),
        "{r:#}"
    );
    assert!(r["subsets"]["MET"].is_null(), "{r:#}");
    // Every subset: MET's empty question takes the subset's default, and has no multi question.
    let job = ok_json(&[
        "--server",
        url,
        "--json",
        "eval",
        "run",
        "--model",
        model_arg,
        "--questions",
        questions.to_str().unwrap(),
        "--max-new-tokens",
        "8",
        "--wait",
    ]);
    let met = &job["result"]["subsets"]["MET"];
    assert!(
        met["multiple_choice_total"].is_null() && metric_ok(&met["pairwise_total"]),
        "{job:#}"
    );
    let id = job["id"].as_str().unwrap();
    let out = twin(&[
        "--server", url, "--json", "eval", "samples", id, "--subset", "met",
    ]);
    let (stdout, _) = text(&out);
    let sample: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(
        sample["prompt"]
            .as_str()
            .unwrap()
            .contains("Do these two images contain the same piece of art?"),
        "{sample:#}"
    );
}

#[test]
fn an_eval_job_resumes_from_its_answers_after_its_executor_dies() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(
        &tmp.path().join("data"),
        &["--no-executor", "--lease-ttl-ms", "1500"],
    );
    let url = server.url.clone();
    let first =
        ExecutorProcess::start_with_env(&url, "first", &[("TWIN_FAULT_STALL_AFTER", "answers")]);
    prepare(tmp.path(), &url);
    let model = tiny_qwen(tmp.path(), "qwen", 1);
    let job = ok_json(&[
        "--server",
        &url,
        "--json",
        "eval",
        "run",
        "--model",
        model.to_str().unwrap(),
        "--built",
        "pairs",
        "--max-new-tokens",
        "8",
        "--limit",
        "6",
    ]);
    let id = job["id"].as_str().unwrap().to_owned();
    let artefact_names = |j: &serde_json::Value| -> Vec<String> {
        j["artefacts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap().to_owned())
            .collect()
    };
    eventually(Duration::from_secs(120), "the answers' artefact", || {
        let j = ok_json(&["--server", &url, "--json", "jobs", "show", &id]);
        artefact_names(&j)
            .contains(&"answers".to_owned())
            .then_some(())
    });
    first.kill();
    let _second = ExecutorProcess::start(&url, "second");
    let done = ok_json(&["--server", &url, "--json", "jobs", "wait", &id]);
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(done["epoch"], 2);
    // The dead executor's answers were scored, not regenerated.
    assert_eq!(artefact_names(&done), ["answers", "samples"], "{done:#}");
    assert_eq!(done["result"]["resumed"], 6, "{done:#}");
    assert_eq!(done["result"]["questions"], 6);
}
