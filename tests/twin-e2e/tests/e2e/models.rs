//! Models pinned by hash through the real binaries: a checkpoint registered with `twin models
//! add`, its directory deleted, then mined with on an executor that fetches it from the server
//! into its own store; lineage reaching its files; blob collection keeping everything named; and
//! the refusals (a module given as a model and the reverse, pickles, an unknown name).

use std::path::Path;

use twin_e2e::{ExecutorProcess, Server, text, twin};

use crate::mining::{mine_spec, ok_json, prepare, write};

fn fails_with(args: &[&str], want: &str) {
    let out = twin(args);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "twin {args:?} succeeded: {stdout}");
    assert!(
        stderr.contains(want),
        "twin {args:?}: want {want:?} in\n{stderr}"
    );
}

#[test]
fn a_registered_model_is_pinned_fetched_by_hash_and_reaches_the_lineage() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), &["--no-executor"]);
    let url = server.url.as_str();
    // An executor with a model store of its own, which the client never writes to.
    let store = tmp.path().join("store");
    let _executor = ExecutorProcess::start_with_args(
        url,
        "remote",
        &["--model-store", store.to_str().unwrap()],
        &[],
    );
    let clip = prepare(tmp.path(), url, "sample");

    let info = ok_json(&[
        "--server",
        url,
        "--json",
        "models",
        "add",
        clip.to_str().unwrap(),
        "--name",
        "clip-tiny",
    ]);
    let hash = info["hash"].as_str().unwrap().to_owned();
    assert_eq!(info["aliases"], serde_json::json!(["clip-tiny"]));
    assert_eq!(info["kind"]["library"], "transformers", "{info:#}");
    let files: Vec<&str> = info["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(files.contains(&"config.json"), "{files:?}");
    assert!(
        files.iter().any(|f| f.ends_with(".safetensors")),
        "{files:?}"
    );
    // Registering the same directory again is the same model; nothing is uploaded twice.
    let again = twin(&["--server", url, "models", "add", clip.to_str().unwrap()]);
    let (_, stderr) = text(&again);
    assert!(again.status.success(), "{stderr}");
    assert!(!stderr.contains("uploading"), "{stderr}");

    // The client's copy is gone: the executor can only have it from the server, by hash.
    std::fs::remove_dir_all(&clip).unwrap();
    let spec = write(
        tmp.path(),
        "mine.json",
        mine_spec("sample", "clip-tiny", serde_json::json!({})),
    );
    let job = ok_json(&["--server", url, "--json", "submit", &spec, "--wait"]);
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["submission"]["spec"]["model_manifest"], hash.as_str());
    assert_eq!(job["result"]["model_manifest"], hash.as_str());
    assert!(store.join("models").join(&hash).join(".complete").is_file());
    let id = job["id"].as_str().unwrap().to_owned();

    // A second name for it; jobs pin the hash, so a later switch changes nothing done.
    ok_json(&["--server", url, "--json", "models", "use", "clip-b", &hash]);
    let described = ok_json(&["--server", url, "--json", "models", "describe", "clip-b"]);
    assert_eq!(
        described["aliases"],
        serde_json::json!(["clip-b", "clip-tiny"])
    );

    // Lineage of the job reaches the checkpoint's files, by name and hash.
    let lineage = ok_json(&["--server", url, "--json", "lineage", &id]);
    assert_eq!(lineage["models"][0]["hash"], hash.as_str(), "{lineage:#}");
    let out = twin(&["--server", url, "lineage", &id]);
    let (stdout, _) = text(&out);
    assert!(
        stdout.contains(&format!("model {hash} (clip-b, clip-tiny)")),
        "{stdout}"
    );
    assert!(stdout.contains("config.json"), "{stdout}");

    // Collection: a stray blob goes, nothing a job, model, module or dataset names does.
    let stray = tmp.path().join("stray.bin");
    std::fs::write(&stray, b"nobody refers to this").unwrap();
    let out = twin(&["--server", url, "blobs", "put", stray.to_str().unwrap()]);
    let (stray_hash, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let stray_hash = stray_hash.trim().to_owned();
    let dry = ok_json(&[
        "--server",
        url,
        "--json",
        "blobs",
        "gc",
        "--dry-run",
        "--min-age",
        "0s",
    ]);
    let listed: Vec<&str> = dry["unreferenced"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["hash"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [stray_hash.as_str()], "{dry:#}");
    assert_eq!(dry["deleted"], false);
    let young = ok_json(&["--server", url, "--json", "blobs", "gc", "--dry-run"]);
    assert!(
        young["unreferenced"].as_array().unwrap().is_empty(),
        "{young:#}"
    );
    let done = ok_json(&["--server", url, "--json", "blobs", "gc", "--min-age", "0s"]);
    assert_eq!(done["deleted"], true);
    let out = twin(&["--server", url, "blobs", "get", &stray_hash, "-o", "-"]);
    assert!(!out.status.success(), "the stray blob is gone");

    // The model survived collection: a fresh store fetches it again and mines with it.
    // On an executor with an empty store (the job requires its label), named by hash this time.
    let store2 = tmp.path().join("store2");
    let _second = ExecutorProcess::start_with_args(
        url,
        "remote-2",
        &[
            "--model-store",
            store2.to_str().unwrap(),
            "--label",
            "second",
        ],
        &[],
    );
    let mut submission = mine_spec("sample", &hash, serde_json::json!({"k": 2}));
    submission["requirements"] = serde_json::json!({"labels": ["second"]});
    let spec = write(tmp.path(), "mine2.json", submission);
    let job = ok_json(&["--server", url, "--json", "submit", &spec, "--wait"]);
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert!(store2.join("models").join(&hash).is_dir());

    // The log replays with the model by name and hash.
    server.stop();
    let out = twin(&[
        "replay",
        "--data-dir",
        tmp.path().join("data").to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains(&format!("model {hash} transformers")) && stdout.contains("named clip-b"),
        "{stdout}"
    );
}

#[test]
fn what_is_not_a_model_is_refused_with_the_command_meant() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"), &["--no-executor"]);
    let url = server.url.as_str();

    let wasm = crate::modules_dir().join("binary_match.wasm");
    fails_with(
        &["--server", url, "models", "add", wasm.to_str().unwrap()],
        "twin modules add",
    );
    let dir = tmp.path().join("ckpt");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("config.json"), b"{}").unwrap();
    fails_with(
        &["--server", url, "modules", "add", dir.to_str().unwrap()],
        "twin models add",
    );
    std::fs::write(dir.join("pytorch_model.bin"), b"\x80\x02}q\x00.").unwrap();
    fails_with(
        &["--server", url, "models", "add", dir.to_str().unwrap()],
        "pickled PyTorch weights",
    );
    // Nothing was uploaded for the refused directory.
    let out = twin(&["--server", url, "--json", "models", "ls"]);
    assert_eq!(text(&out).0.trim(), "[]");

    // A spec naming a model nobody registered says how to register one, or to write a path.
    let spec = write(
        Path::new(tmp.path()),
        "mine.json",
        mine_spec("sample", "nope", serde_json::json!({})),
    );
    fails_with(&["--server", url, "submit", &spec], "twin models add");
}
