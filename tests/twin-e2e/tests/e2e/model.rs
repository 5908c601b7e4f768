//! `twin-executor model …` for Qwen2.5-VL through the real binary: a random checkpoint is made,
//! described and asked about two images; bad input (a broken checkpoint, a prompt that cannot
//! fit the context, an unreadable image) exits 2 with the reason.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use image::{Rgb, RgbImage};
use twin_e2e::{bin, text};

fn executor(args: &[&str]) -> Output {
    Command::new(bin("twin-executor"))
        .args(args)
        .output()
        .unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    let (stdout, stderr) = text(out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn failure(out: &Output) -> String {
    let (stdout, stderr) = text(out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    stderr
}

fn picture(dir: &Path, name: &str, w: u32, h: u32) -> String {
    let path = dir.join(name);
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([(x * 3) as u8, (y * 5) as u8, ((x + y) * 2) as u8])
    })
    .save(&path)
    .unwrap();
    path.to_str().unwrap().to_owned()
}

fn tiny_qwen(dir: &Path) -> PathBuf {
    let path = dir.join("qwen");
    let out = executor(&[
        "model",
        "init-qwen",
        path.to_str().unwrap(),
        "--preset",
        "tiny",
        "--seed",
        "5",
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    path
}

#[test]
fn a_random_qwen_checkpoint_is_made_described_and_generates() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_qwen(dir.path());
    let model = model.to_str().unwrap();

    let info = json(&executor(&["model", "info", model]));
    assert_eq!(info["architecture"], "Qwen2_5_VLForConditionalGeneration");
    assert_eq!(info["parameters"]["lm_head"], 0, "tied: {info}");
    assert!(info["parameters"]["total"].as_i64().unwrap() > 0);
    assert_eq!(info["text"]["layers"], 2);

    let a = picture(dir.path(), "a.png", 120, 90);
    let b = picture(dir.path(), "b.png", 90, 140);
    let args = [
        "model",
        "generate",
        model,
        "--image",
        &a,
        "--image",
        &b,
        "--prompt",
        "Same product?",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0.8",
        "--samples",
        "3",
        "--seed",
        "9",
        "--device",
        "cpu",
    ];
    let out = json(&executor(&args));
    let completions = out["completions"].as_array().unwrap();
    assert_eq!(completions.len(), 3);
    for c in completions {
        let tokens = c["tokens"].as_array().unwrap();
        assert!(!tokens.is_empty() && tokens.len() <= 6, "{c}");
        assert_eq!(c["logprobs"].as_array().unwrap().len(), tokens.len());
        assert!(
            c["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .all(|l| l.as_f64().unwrap() <= 0.0)
        );
    }
    assert_eq!(
        out["stats"]["prefilled_prompts"], 1,
        "three samples, one prefill: {out}"
    );
    assert_eq!(out["images"], serde_json::json!([[84, 112], [140, 84]]));
    // The same seed gives the same samples.
    assert_eq!(json(&executor(&args))["completions"], out["completions"]);
}

#[test]
fn bad_checkpoints_and_requests_exit_2_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_qwen(dir.path());
    let m = model.to_str().unwrap();
    let a = picture(dir.path(), "a.png", 64, 64);

    // A prompt plus new tokens beyond the context (4,096 for the tiny preset).
    let err = failure(&executor(&[
        "model",
        "generate",
        m,
        "--image",
        &a,
        "--prompt",
        "hi",
        "--max-new-tokens",
        "5000",
    ]));
    assert!(err.contains("exceed the context of 4096 tokens"), "{err}");

    // An image that is not one.
    let junk = dir.path().join("junk.png");
    std::fs::write(&junk, b"not a png").unwrap();
    let err = failure(&executor(&[
        "model",
        "generate",
        m,
        "--image",
        junk.to_str().unwrap(),
        "--prompt",
        "hi",
    ]));
    assert!(err.contains("junk.png"), "{err}");

    // An unknown architecture, named.
    let config = model.join("config.json");
    let original = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        original
            .replace(
                "Qwen2_5_VLForConditionalGeneration",
                "LlavaForConditionalGeneration",
            )
            .replace("\"qwen2_5_vl\"", "\"llava\""),
    )
    .unwrap();
    let err = failure(&executor(&["model", "info", m]));
    assert!(err.contains("LlavaForConditionalGeneration"), "{err}");
    std::fs::write(&config, original).unwrap();

    // A tensor missing from the weights, named.
    let weights = model.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    header
        .as_object_mut()
        .unwrap()
        .remove("model.norm.weight")
        .unwrap();
    let mut new_header = serde_json::to_vec(&header).unwrap();
    while !new_header.len().is_multiple_of(8) {
        new_header.push(b' ');
    }
    let mut rewritten = (new_header.len() as u64).to_le_bytes().to_vec();
    rewritten.extend_from_slice(&new_header);
    rewritten.extend_from_slice(&bytes[8 + header_len..]);
    std::fs::write(&weights, rewritten).unwrap();
    let err = failure(&executor(&[
        "model", "generate", m, "--image", &a, "--prompt", "hi",
    ]));
    assert!(err.contains("missing tensor `model.norm.weight`"), "{err}");
}
