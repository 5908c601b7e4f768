//! Mining through the real server and CLI: sample data → ingest → mine with filters → review →
//! build a dataset → export; the bad inputs; and a mine job whose executor dies mid-way.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use twin_e2e::{ExecutorProcess, Server, bin, eventually, ingest_spec, text, twin};

use crate::modules_dir;

/// Runs a successful `twin --json …`; returns the last JSON document it printed (`submit --wait`
/// prints the submitted job, then the finished one).
pub(crate) fn ok_json(args: &[&str]) -> serde_json::Value {
    let out = twin(args);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "twin {args:?}\n{stdout}\n{stderr}");
    serde_json::Deserializer::from_str(&stdout)
        .into_iter::<serde_json::Value>()
        .last()
        .unwrap_or_else(|| panic!("no JSON in: {stdout}"))
        .unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// A seeded random-weight CLIP image tower in the Hugging Face layout, made by the executor binary.
fn tiny_clip(dir: &Path) -> PathBuf {
    let path = dir.join("clip");
    let out = Command::new(bin("twin-executor"))
        .args(["model", "init-clip", "--preset", "tiny", "--seed", "3"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{:?}", text(&out));
    path
}

pub(crate) fn write(dir: &Path, name: &str, spec: serde_json::Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Ingests a fresh sample set as `dataset` and registers the two filters.
pub(crate) fn prepare(tmp: &Path, url: &str, dataset: &str) -> PathBuf {
    let images = tmp.join("images");
    crate::sample(
        &images,
        &[
            "--categories",
            "3",
            "--instances",
            "3",
            "--views",
            "4",
            "--size",
            "64",
        ],
    );
    let spec = ingest_spec(tmp, dataset, &images);
    ok_json(&[
        "--server",
        url,
        "--json",
        "submit",
        spec.to_str().unwrap(),
        "--wait",
    ]);
    for (file, name) in [
        ("distinct_instance", "distinct"),
        ("similarity_band", "band"),
    ] {
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
    tiny_clip(tmp)
}

/// A mine submission; `model` is a checkpoint path or a registered model's name.
pub(crate) fn mine_spec(
    dataset: &str,
    model: impl AsRef<std::ffi::OsStr>,
    extra: serde_json::Value,
) -> serde_json::Value {
    let model = model.as_ref().to_str().unwrap();
    let mut spec = serde_json::json!({
        "kind": "mine",
        "dataset": dataset,
        "model": model,
        "k": 3,
        "batch_size": 8,
        "search": "hnsw",
        "recall_sample": 20,
        "filters": [
            {"module": "distinct"},
            {"module": "band", "mode": "advise"},
        ],
    });
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    serde_json::json!({ "spec": spec })
}

#[test]
fn mine_review_build_and_export_a_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), &[]);
    let url = server.url.as_str();
    let model = prepare(tmp.path(), url, "sample");

    let spec = write(
        tmp.path(),
        "mine.json",
        mine_spec("sample", &model, serde_json::json!({})),
    );
    let job = ok_json(&["--server", url, "--json", "submit", &spec, "--wait"]);
    let id = job["id"].as_str().unwrap().to_owned();
    let result = &job["result"];
    assert_eq!(result["kind"], "mine", "{job:#}");
    assert_eq!(result["images"], 36);
    assert_eq!(result["search"], "hnsw");
    let recall = result["recall_at_k"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&recall), "{recall}");
    assert!(result["kept"].as_u64().unwrap() > 0, "{result:#}");
    assert_eq!(result["filters"]["distinct"]["mode"], "require");

    // A second mine job with the same checkpoint on the same executor: the CLIP tower the first
    // one loaded is still in the executor's model cache, and the job's events say so.
    let again = write(
        tmp.path(),
        "mine-again.json",
        mine_spec("sample", &model, serde_json::json!({"k": 2})),
    );
    let second = ok_json(&["--server", url, "--json", "submit", &again, "--wait"]);
    let second_id = second["id"].as_str().unwrap();
    let events = twin(&[
        "--server",
        url,
        "events",
        "tail",
        "--prefix",
        &format!("job/{second_id}"),
    ]);
    let (stdout, stderr) = text(&events);
    assert!(events.status.success(), "{stderr}");
    assert!(
        stdout.contains("from the executor's cache"),
        "the second job reused the loaded model: {stdout}"
    );

    // Review: list pending with both paths, accept two, reject one, then bulk by filter.
    let page = ok_json(&[
        "--server", url, "--json", "review", "ls", &id, "--limit", "3",
    ]);
    let pending = page["pending"].as_u64().unwrap();
    assert!(pending >= 3, "{page:#}");
    let ids: Vec<String> = page["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert!(c["a"]["path"].as_str().unwrap().ends_with(".png"));
            assert_ne!(c["a"]["instance"], c["b"]["instance"]);
            c["id"].as_str().unwrap().to_owned()
        })
        .collect();
    let out = ok_json(&[
        "--server", url, "--json", "review", "accept", &id, &ids[0], &ids[1],
    ]);
    assert_eq!(out["recorded"], 2);
    let out = ok_json(&["--server", url, "--json", "review", "reject", &id, &ids[2]]);
    assert_eq!(out["recorded"], 1);
    // Accepting again records nothing new.
    let out = ok_json(&["--server", url, "--json", "review", "accept", &id, &ids[0]]);
    assert_eq!(
        (out["recorded"].as_u64(), out["unchanged"].as_u64()),
        (Some(0), Some(1))
    );
    let page = ok_json(&[
        "--server", url, "--json", "review", "ls", &id, "--status", "accepted",
    ]);
    assert_eq!(page["accepted"], 2);
    assert_eq!(page["candidates"][0]["decided_by"], "local");
    let bulk = ok_json(&[
        "--server",
        url,
        "--json",
        "review",
        "accept",
        &id,
        "--by-filter",
        "band",
    ]);
    assert_eq!(bulk["recorded"].as_u64().unwrap(), pending - 3);

    // A review of something that is not a candidate changes nothing.
    let out = twin(&["--server", url, "review", "accept", &id, "0123456789abcdef"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not a candidate"), "{stderr}");

    // Build and export.
    let build = write(
        tmp.path(),
        "build.json",
        serde_json::json!({"spec": {
            "kind": "build-dataset", "name": "pairs", "dataset": "sample", "mines": [id],
            "options": {"seed": 7, "eval_fraction": 0.34},
        }}),
    );
    let built = ok_json(&["--server", url, "--json", "submit", &build, "--wait"]);
    let result = &built["result"];
    assert_eq!(result["kind"], "build-dataset", "{built:#}");
    // 3 categories of 3 instances, 34 % to eval: two categories send two instances each (so
    // eval negatives exist inside eval), 4 positives per instance, and eval's negatives are
    // filled up to its positives.
    let counts = &result["counts"];
    assert_eq!(
        (
            counts["eval.instances"].as_u64(),
            counts["train.instances"].as_u64()
        ),
        (Some(4), Some(5)),
        "{counts:#}"
    );
    assert_eq!(counts["eval.pair.yes"], 16, "{counts:#}");
    assert!(counts["eval.pair.no"].as_u64().unwrap() >= 16, "{counts:#}");
    let hash = result["manifest"].as_str().unwrap().to_owned();
    let listed = ok_json(&["--server", url, "--json", "dataset", "ls"]);
    assert_eq!(listed["built"][0]["hash"], hash.as_str());
    let out_dir = tmp.path().join("export");
    ok_json(&[
        "--server",
        url,
        "--json",
        "dataset",
        "export",
        "pairs",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let train = std::fs::read_to_string(out_dir.join("train.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(train.lines().next().unwrap()).unwrap();
    let content = first["prompt"][0]["content"].as_str().unwrap();
    assert!(content.starts_with("<image>\n<image>\n\n"), "{content}");
    for img in first["images"].as_array().unwrap() {
        let file = img["image"].as_str().unwrap();
        assert!(out_dir.join(file).is_file(), "{file} was not exported");
    }
    assert!(out_dir.join("train.parquet").is_file());
    assert!(out_dir.join("eval.jsonl").is_file());

    // Lineage of the dataset reaches the mine job's inputs.
    let lineage = ok_json(&["--server", url, "--json", "lineage", &hash]);
    assert_eq!(lineage["job"]["id"], built["id"]);

    // The audit of the whole flow: every transition legal, every candidate's, snapshot's and
    // built row's image present, the head as served on the chain.
    let head = ok_json(&["--server", url, "--json", "log", "head"]);
    let anchor = head["anchor"].as_str().unwrap().to_owned();
    let data = server.data_dir.clone();
    server.stop();
    let audit = |extra: &[&str]| {
        let mut args = vec!["replay", "--data-dir", data.to_str().unwrap(), "--verify"];
        args.extend(extra);
        twin(&args)
    };
    let out = audit(&["--expect-head", &anchor]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("every job event a legal transition"),
        "{stdout}"
    );
    // Without the hard-negative snapshot the server pinned, the build cannot be audited.
    let snapshot = built["submission"]["spec"]["hard_negatives"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::remove_file(
        data.join("blobs/sha256")
            .join(&snapshot[..2])
            .join(&snapshot),
    )
    .unwrap();
    let out = audit(&[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("pair list {snapshot}")) && stderr.contains("not found"),
        "{stderr}"
    );
}

#[test]
fn bad_mining_inputs_are_refused_with_reasons() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), &[]);
    let url = server.url.as_str();
    let model = prepare(tmp.path(), url, "sample");
    let refused = |name: &str, spec: serde_json::Value, want: &str| {
        let path = write(tmp.path(), name, spec);
        let out = twin(&["--server", url, "submit", &path]);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {stdout}{stderr}");
        assert!(stderr.contains(want), "{name}: {stderr}");
    };
    refused(
        "cuda.json",
        mine_spec("sample", &model, serde_json::json!({"device": "cuda"})),
        "CUDA was requested",
    );
    refused(
        "nodata.json",
        mine_spec("nope", &model, serde_json::json!({})),
        "no ingested dataset `nope`",
    );
    refused(
        "reward-as-filter.json",
        mine_spec(
            "sample",
            &model,
            serde_json::json!({"filters": [{"module": "band"}, {"module": "band"}]}),
        ),
        "filter names must be unique",
    );

    // A checkpoint with a tensor missing fails the job, naming the tensor.
    let broken = tmp.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for f in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(model.join(f), broken.join(f)).unwrap();
    }
    std::fs::write(broken.join("model.safetensors"), b"{}").unwrap();
    let path = write(
        tmp.path(),
        "broken.json",
        mine_spec("sample", &broken, serde_json::json!({})),
    );
    let out = twin(&["--server", url, "--json", "submit", &path, "--wait"]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("spec.model"), "{stdout}");

    // k larger than the population is not an error: every other instance is returned.
    let path = write(
        tmp.path(),
        "bigk.json",
        mine_spec(
            "sample",
            &model,
            serde_json::json!({"k": 500, "filters": []}),
        ),
    );
    let job = ok_json(&["--server", url, "--json", "submit", &path, "--wait"]);
    // 36 images in 3 categories of 12: each pairs with the 8 images of other instances.
    assert_eq!(job["result"]["pairs"], 36 * 8 / 2, "{job:#}");
}

#[test]
fn a_mine_job_resumes_from_its_last_phase_after_its_executor_dies() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(
        &tmp.path().join("data"),
        &["--no-executor", "--lease-ttl-ms", "1500"],
    );
    let url = server.url.clone();
    let first =
        ExecutorProcess::start_with_env(&url, "first", &[("TWIN_FAULT_STALL_AFTER", "neighbours")]);
    let model = prepare(tmp.path(), &url, "sample");
    let spec = write(
        tmp.path(),
        "mine.json",
        mine_spec("sample", &model, serde_json::json!({})),
    );
    let job = ok_json(&["--server", &url, "--json", "submit", &spec]);
    let id = job["id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(60), "the neighbours phase", || {
        let j = ok_json(&["--server", &url, "--json", "jobs", "show", &id]);
        let names: Vec<String> = j["artefacts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap().to_owned())
            .collect();
        names.contains(&"neighbours".to_owned()).then_some(())
    });
    first.kill();
    let _second = ExecutorProcess::start(&url, "second");
    let done = ok_json(&["--server", &url, "--json", "jobs", "wait", &id]);
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(done["epoch"], 2);
    let names: Vec<&str> = done["artefacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    // Each phase recorded once, the first two by the dead executor.
    assert_eq!(
        names,
        ["embeddings", "neighbours", "candidates"],
        "{done:#}"
    );
    let epochs: Vec<u64> = done["artefacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, [1, 1, 2]);
}
