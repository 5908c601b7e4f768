//! Wasm modules through the real server and CLI: register, name, score, switch, refuse.

use std::path::{Path, PathBuf};

use twin_e2e::{Server, text, twin};

fn module(name: &str) -> PathBuf {
    let dir = std::env::var_os("TWIN_MODULES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/wasm32-wasip2/guest")
        });
    let path = dir.join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run deploy/build-modules.sh",
        path.display()
    );
    path
}

fn ok_json(args: &[&str]) -> serde_json::Value {
    let out = twin(args);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "twin {args:?}\n{stdout}\n{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn rollouts(dir: &Path) -> PathBuf {
    let path = dir.join("rollouts.jsonl");
    let lines = [
        r#"{"completion": "Same logo. <answer>yes</answer>", "ground_truth": "yes", "question_type": "pair"}"#,
        r#"{"completion": "Different handle. <answer>No.</answer>", "ground_truth": "no"}"#,
        r#"{"completion": "<answer>yes</answer>", "ground_truth": "no", "metadata": {"pair": 3}}"#,
        r#"{"completion": "I think they match", "ground_truth": "yes"}"#,
    ];
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

#[test]
fn register_score_switch_and_audit_a_reward() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), &[]);
    let url = server.url.as_str();
    let input = rollouts(tmp.path());
    let input = input.to_str().unwrap();

    let bm = module("binary_match");
    let added = ok_json(&[
        "--server",
        url,
        "--json",
        "modules",
        "add",
        bm.to_str().unwrap(),
        "--name",
        "reward",
    ]);
    let v1 = added["hash"].as_str().unwrap().to_owned();
    assert_eq!(added["name"], "binary-match");
    assert_eq!(added["aliases"][0], "reward");

    // Offline and online scoring agree.
    let out = twin(&["modules", "run", bm.to_str().unwrap(), "--input", input]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    let offline: Vec<f64> = stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["score"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(offline, [1.0, 1.0, 0.0, 0.0]);

    let job = ok_json(&[
        "--server",
        url,
        "--json",
        "score",
        "--rollouts",
        input,
        "--module",
        "reward",
        "--wait",
    ]);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        job["submission"]["spec"]["reward"]["module_hash"],
        v1.as_str(),
        "the log records the resolved hash"
    );
    assert_eq!(job["result"]["mean"], 0.5);
    assert_eq!(job["result"]["terms"][0]["module_hash"], v1.as_str());
    let results = job["result"]["results"].as_str().unwrap();
    let lineage = ok_json(&["--server", url, "--json", "lineage", results]);
    assert!(
        lineage["blobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b == v1.as_str()),
        "{lineage}"
    );

    // Switch the name; later jobs use the new module, the old job still names the old one.
    let fmt = module("format");
    let v2 = ok_json(&[
        "--server",
        url,
        "--json",
        "modules",
        "add",
        fmt.to_str().unwrap(),
    ])["hash"]
        .as_str()
        .unwrap()
        .to_owned();
    ok_json(&["--server", url, "--json", "modules", "use", "reward", &v2]);
    let described = ok_json(&["--server", url, "--json", "modules", "describe", "reward"]);
    assert_eq!(described["hash"], v2.as_str());
    let job2 = ok_json(&[
        "--server",
        url,
        "--json",
        "score",
        "--rollouts",
        input,
        "--module",
        "reward",
        "--wait",
    ]);
    assert_eq!(
        job2["submission"]["spec"]["reward"]["module_hash"],
        v2.as_str()
    );
    let old = ok_json(&[
        "--server",
        url,
        "--json",
        "jobs",
        "show",
        job["id"].as_str().unwrap(),
    ]);
    assert_eq!(
        old["submission"]["spec"]["reward"]["module_hash"],
        v1.as_str()
    );

    // A weighted sum logs each component.
    let job3 = ok_json(&[
        "--server",
        url,
        "--json",
        "score",
        "--rollouts",
        input,
        "--term",
        &format!("correct={v1}:1.0"),
        "--term",
        "shape=reward:0.5",
        "--wait",
    ]);
    assert_eq!(job3["status"], "succeeded", "{job3}");
    let means = &job3["result"]["component_means"];
    assert_eq!(means["correct"], 0.5, "{job3}");
    assert!(means.get("shape.answer_tag").is_some(), "{job3}");
}

#[test]
fn failing_and_refused_modules() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("server.toml");
    std::fs::write(
        &config,
        "[modules]\nmax_module_bytes = 400000\ncompile_timeout_ms = 60000\n",
    )
    .unwrap();
    let server = Server::start(
        &tmp.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let url = server.url.as_str();
    let input = rollouts(tmp.path());
    let input = input.to_str().unwrap();

    // Refused uploads: each with its code, nothing registered.
    let junk = tmp.path().join("junk.wasm");
    std::fs::write(&junk, b"definitely not wasm").unwrap();
    let good = std::fs::read(module("binary_match")).unwrap();
    let truncated = tmp.path().join("truncated.wasm");
    std::fs::write(&truncated, &good[..good.len() / 3]).unwrap();
    let big = tmp.path().join("big.wasm");
    std::fs::write(&big, vec![0u8; 500_000]).unwrap();
    for (file, code) in [
        (&junk, "not_wasm"),
        (&truncated, "invalid_module"),
        (&big, "module_too_large"),
    ] {
        let out = twin(&["--server", url, "modules", "add", file.to_str().unwrap()]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(code), "{code}: {stderr}");
    }
    let listed = ok_json(&["--server", url, "--json", "modules", "ls"]);
    assert_eq!(listed.as_array().unwrap().len(), 0, "{listed}");

    // A reward that traps fails its job loudly, with the typed error.
    ok_json(&[
        "--server",
        url,
        "--json",
        "modules",
        "add",
        module("misbehave").to_str().unwrap(),
        "--name",
        "bad",
    ]);
    let out = twin(&[
        "--server",
        url,
        "--json",
        "score",
        "--rollouts",
        input,
        "--module",
        "bad",
        "--params",
        r#"{"mode":"panic"}"#,
        "--wait",
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("guest_trap") && stdout.contains("panicked on purpose"),
        "{stdout}"
    );

    // A capability the job does not grant is refused at submission.
    ok_json(&[
        "--server",
        url,
        "--json",
        "modules",
        "add",
        module("synonym_match").to_str().unwrap(),
        "--name",
        "syn",
    ]);
    let out = twin(&[
        "--server",
        url,
        "score",
        "--rollouts",
        input,
        "--module",
        "syn",
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("lookup") && stderr.contains("spec.grants"),
        "{stderr}"
    );
    let table = tmp.path().join("synonyms.json");
    std::fs::write(&table, r#"{"i think they match": "yes"}"#).unwrap();
    let job = ok_json(&[
        "--server",
        url,
        "--json",
        "score",
        "--rollouts",
        input,
        "--module",
        "syn",
        "--grant-lookup",
        table.to_str().unwrap(),
        "--wait",
    ]);
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(
        job["result"]["capability_calls"].as_u64().unwrap() >= 3,
        "{job}"
    );

    // The server kept serving through all of it.
    let listed = ok_json(&["--server", url, "--json", "modules", "ls"]);
    assert_eq!(listed.as_array().unwrap().len(), 2);
}
