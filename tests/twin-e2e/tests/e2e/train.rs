//! Training through the real server, executors and CLI: a tiny random Qwen2.5-VL checkpoint
//! registered as a model trains with GRPO on a built dataset; its executor is killed after the
//! first checkpoint and another one finishes the run, bit-identical to an uninterrupted run of the
//! same spec; the curves, rollouts and checkpoints read back through `twin train`; and an eval job
//! loads the trained checkpoint by its hash.

use std::time::Duration;

use twin_e2e::{ExecutorProcess, Server, eventually, text, twin};

use crate::eval::{prepare, tiny_qwen};
use crate::mining::{ok_json, write};
use crate::modules_dir;

/// The run both jobs make: small enough for seconds on a CPU, checkpoints at steps 2 and 4.
fn train_spec() -> serde_json::Value {
    serde_json::json!({
        "dataset": "pairs", "model": "tiny",
        "batch_prompts": 4, "group_size": 2, "micro_batch": 4,
        "max_response_tokens": 4, "max_steps": 4, "save_every": 2,
        "validate_every": 2, "validation_limit": 4, "learning_rate": 0.001, "seed": 3,
        "register_as": "tiny-grpo",
    })
}

#[test]
fn a_training_run_resumes_exactly_after_its_executor_dies_and_its_checkpoint_evaluates() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(
        &tmp.path().join("data"),
        &["--no-executor", "--lease-ttl-ms", "1500"],
    );
    let url = server.url.clone();
    // The first executor stalls (as if it hung) once it has recorded the run's first state.
    let first = ExecutorProcess::start_with_env(
        &url,
        "first",
        &[("TWIN_FAULT_STALL_AFTER", "train-state")],
    );
    prepare(tmp.path(), &url);
    let reward = modules_dir().join("binary_match.wasm");
    ok_json(&[
        "--server",
        &url,
        "--json",
        "modules",
        "add",
        reward.to_str().unwrap(),
        "--name",
        "binary-match",
    ]);
    let model = tiny_qwen(tmp.path(), "qwen", 1);
    ok_json(&[
        "--server",
        &url,
        "--json",
        "models",
        "add",
        model.to_str().unwrap(),
        "--name",
        "tiny",
    ]);
    // The spec's fields alone: `twin train submit` makes them a train job.
    let spec = write(tmp.path(), "train.json", train_spec());
    let killed = ok_json(&["--server", &url, "--json", "train", "submit", &spec]);
    let id = killed["id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(180), "the first checkpoint", || {
        let j = ok_json(&["--server", &url, "--json", "jobs", "show", &id]);
        j["artefacts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"] == "train-state")
            .then_some(())
    });
    first.kill();
    let _second = ExecutorProcess::start(&url, "second");
    let resumed = ok_json(&["--server", &url, "--json", "jobs", "wait", &id]);
    assert_eq!(resumed["status"], "succeeded", "{resumed:#}");
    assert_eq!(resumed["epoch"], 2);
    let result = &resumed["result"];
    assert_eq!(result["resumed_from"], 2, "{result:#}");
    assert_eq!(result["steps"], 4);

    // The same spec without interruption ends with the same checkpoints, byte for byte.
    let whole = ok_json(&[
        "--server", &url, "--json", "train", "submit", &spec, "--wait",
    ]);
    assert_eq!(whole["status"], "succeeded", "{whole:#}");
    assert_eq!(whole["result"]["checkpoints"], result["checkpoints"]);
    assert_eq!(whole["result"]["model"], result["model"]);
    let trained = result["model"].as_str().unwrap().to_owned();

    // The log holds every step once (the resumed attempt's redo replaces the dead one's), the
    // validations, and the checkpoints the run registered.
    let report = ok_json(&["--server", &url, "--json", "train", "curves", &id]);
    let steps: Vec<u64> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4], "{report:#}");
    let validated: Vec<u64> = report["validations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(validated, [0, 2, 4], "{report:#}");
    let png = tmp.path().join("curves.png");
    let out = twin(&[
        "--server",
        &url,
        "train",
        "curves",
        &id,
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(std::fs::metadata(&png).unwrap().len() > 10_000);
    let out = twin(&["--server", &url, "train", "rollouts", &id, "--step", "3"]);
    assert!(out.status.success(), "{:?}", text(&out));
    let out = twin(&["--server", &url, "train", "checkpoints", &id]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains(&trained), "{stdout}");

    // The checkpoint is a registered model named by the spec, with the run in its lineage.
    let info = ok_json(&[
        "--server",
        &url,
        "--json",
        "models",
        "describe",
        "tiny-grpo",
    ]);
    assert_eq!(info["hash"], trained.as_str());
    assert_eq!(info["job"], id.as_str());

    // An eval job loads it by hash.
    let eval = ok_json(&[
        "--server",
        &url,
        "--json",
        "eval",
        "run",
        "--model",
        &trained,
        "--built",
        "pairs",
        "--max-new-tokens",
        "4",
        "--limit",
        "2",
        "--wait",
    ]);
    assert_eq!(eval["status"], "succeeded", "{eval:#}");
    assert_eq!(eval["result"]["model_manifest"], trained.as_str());
}

#[test]
fn bad_training_submissions_are_refused_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), &["--no-executor"]);
    let url = server.url.clone();
    // `--no-upload` sends a model path as it is (uploading would register it), so the server's
    // own refusal of a path is what is seen.
    let refused = |spec: serde_json::Value, field: &str| {
        let file = write(tmp.path(), "bad.json", spec);
        let out = twin(&["--server", &url, "train", "submit", &file, "--no-upload"]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(field), "{field} not named in: {stderr}");
    };
    refused(train_spec(), "spec.model");
    let mut spec = train_spec();
    spec["model"] = serde_json::json!("/some/dir");
    refused(spec, "registered model");
    let mut spec = train_spec();
    spec["micro_batch"] = serde_json::json!(3);
    refused(spec, "spec.micro_batch");
}
