//! Parity against the reference implementations, and what a bad checkpoint does.
//!
//! Every fixture directory under `$TWIN_PARITY_FIXTURES` (default: the repository's
//! `tests/fixtures/parity`, made by `tests/fixtures/make_parity_fixtures.py`) is run through
//! `twin_ml::parity` on the CPU in the precision it was made in (f32, or bf16 for a set made with
//! `--dtype bfloat16`, which deploy/test.sh also runs); each output's largest absolute difference
//! is printed (`cargo test -p twin-ml --test parity -- --nocapture` shows them). Without Python,
//! the bf16 path is run against the committed f32 CLIP fixtures. The broken-checkpoint tests copy
//! a fixture and damage the copy one way each.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use twin_ml::MlError;
use twin_ml::clip::{ClipConfig, ClipModel, ClipPreprocessor};
use twin_ml::parity::{
    Expectation, Fixture, FixtureDtype, fixture_dirs, run_fixture, run_fixture_as,
};
use twin_ml::tch::{Device, Kind, Tensor};
use twin_ml::weights::{read_safetensors, write_safetensors};

fn fixture_root() -> PathBuf {
    match std::env::var_os("TWIN_PARITY_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity"),
    }
}

fn default_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/parity")
        .join(name)
}

#[test]
fn every_fixture_matches_the_reference_unless_built_to_mismatch() {
    let root = fixture_root();
    let dirs = fixture_dirs(&root).unwrap();
    assert!(!dirs.is_empty(), "no fixtures under {}", root.display());
    let mut unexpected = Vec::new();
    for dir in &dirs {
        // In the precision the fixture was made in: a bf16 set (made with `--device cpu --dtype
        // bfloat16`) runs in bf16 against its bf16 tolerances.
        let dtype = Fixture::open(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .meta
            .dtype
            .kind();
        let report = run_fixture_as(dir, Device::Cpu, dtype)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        println!("{report}");
        if !report.as_expected() {
            unexpected.push(report.fixture.clone());
        }
    }
    assert!(
        unexpected.is_empty(),
        "fixtures not as expected: {unexpected:?}"
    );
}

#[test]
fn the_perturbed_weight_fixture_fails_parity() {
    // The harness must be able to fail: one weight changed by 0.5 after the reference ran.
    let report = run_fixture(&default_fixture("clip_perturbed_weight"), Device::Cpu).unwrap();
    println!("{report}");
    assert_eq!(report.expect, Expectation::Mismatch);
    assert!(!report.all_within_tolerance(), "{report}");
    // Preprocessing does not read weights, so it still agrees; the embeddings do not.
    let by_name = |n: &str| report.outputs.iter().find(|o| o.name == n).unwrap();
    assert!(by_name("pixel_values").within_tolerance());
    assert!(!by_name("image_embeds").within_tolerance());
}

#[test]
fn a_fixture_comparing_greedy_tokens_must_show_they_are_clear_choices() {
    // Without a margin of at least 1e-3 at every step, the token comparison could pass or fail
    // by a float near tie, so the harness refuses such a fixture before running anything.
    let dir = tempfile::tempdir().unwrap();
    for margin in [None, Some(4e-4)] {
        let mut meta = serde_json::json!({
            "kind": "qwen2_5_vl", "outputs": ["greedy_tokens"], "greedy_new_tokens": 32,
        });
        if let Some(m) = margin {
            meta["greedy_min_margin"] = serde_json::json!(m);
        }
        std::fs::write(dir.path().join("meta.json"), meta.to_string()).unwrap();
        let err = run_fixture(dir.path(), Device::Cpu).unwrap_err();
        assert!(
            err.to_string().contains("greedy_min_margin"),
            "{margin:?}: {err}"
        );
    }
    let meta = serde_json::json!({
        "kind": "qwen2_5_vl", "outputs": ["greedy_tokens"], "greedy_new_tokens": 32,
        "greedy_min_margin": 1e-2,
    });
    std::fs::write(dir.path().join("meta.json"), meta.to_string()).unwrap();
    // A clear fixture gets as far as loading its (missing) model.
    let err = run_fixture(dir.path(), Device::Cpu).unwrap_err();
    assert!(!err.to_string().contains("greedy_min_margin"), "{err}");
}

#[test]
fn a_greedy_margin_must_also_clear_twice_the_logits_tolerance() {
    // Logits allowed to move by 0.5 each could swap two tokens 1.0 apart or less: with such a
    // tolerance (a bf16 fixture's are about 1) the greedy tokens need a wider margin.
    let dir = tempfile::tempdir().unwrap();
    let meta = |margin: f64| {
        serde_json::json!({
            "kind": "qwen2_5_vl", "outputs": ["logits", "greedy_tokens"],
            "tolerances": {"logits": 0.5}, "greedy_new_tokens": 32, "greedy_min_margin": margin,
            "dtype": "bfloat16", "device": "cuda",
        })
    };
    std::fs::write(dir.path().join("meta.json"), meta(0.9).to_string()).unwrap();
    let err = Fixture::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("greedy_min_margin ≥ 1"), "{err}");
    std::fs::write(dir.path().join("meta.json"), meta(1.0).to_string()).unwrap();
    let fixture = Fixture::open(dir.path()).unwrap();
    assert_eq!(fixture.meta.dtype, FixtureDtype::Bfloat16);
    assert_eq!(fixture.meta.device, "cuda");
    assert_eq!(fixture.meta.dtype.kind(), Kind::BFloat16);
}

#[test]
fn a_fixture_without_a_dtype_is_f32_from_the_cpu_and_an_unknown_dtype_is_refused() {
    let fixture = Fixture::open(&default_fixture("clip_model")).unwrap();
    assert_eq!(fixture.meta.dtype, FixtureDtype::Float32);
    assert_eq!(fixture.meta.device, "cpu");
    let dir = tempfile::tempdir().unwrap();
    let meta = serde_json::json!({"kind": "clip", "outputs": [], "dtype": "float16"});
    std::fs::write(dir.path().join("meta.json"), meta.to_string()).unwrap();
    let err = Fixture::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("float16"), "{err}");
}

/// tests/fixtures/parity_reference.py's BF16_RELATIVE: a bf16 output's tolerance is this times
/// the reference output's largest magnitude.
const BF16_RELATIVE: f64 = 1.0 / 16.0;

#[test]
fn in_bf16_on_the_cpu_clip_stays_within_bf16_tolerances_and_outside_f32_ones() {
    // The committed fixtures are f32 references: our model in bf16 must be within the tolerance
    // a bf16 fixture set states (here against f32, which the same rounding errors make about as
    // far as transformers in bf16), and must fail the f32 tolerance, which proves the kind
    // really changed (ClipModel::load would pick f32 on the CPU).
    for name in [
        "clip_model",
        "clip_model_sharded",
        "clip_vision_with_projection",
        "clip_vision_bare",
    ] {
        let dir = default_fixture(name);
        let expected = Fixture::open(&dir).unwrap().expected().unwrap();
        let report = run_fixture_as(&dir, Device::Cpu, Kind::BFloat16).unwrap();
        println!("{report}");
        assert_eq!(
            (report.dtype.as_str(), report.device.as_str()),
            ("bfloat16", "cpu")
        );
        assert!(
            !report.all_within_tolerance(),
            "{name}: bf16 within f32 tolerances: {report}"
        );
        for o in &report.outputs {
            if o.name == "pixel_values" {
                // Preprocessing never sees the model's kind.
                assert_eq!(o.max_abs_diff, 0.0, "{name}: {report}");
                continue;
            }
            let scale = expected[&o.name].abs().max().double_value(&[]);
            let tolerance = BF16_RELATIVE * scale;
            assert!(
                o.max_abs_diff <= tolerance,
                "{name}.{}: {:.3e} > bf16 tolerance {tolerance:.3e}",
                o.name,
                o.max_abs_diff
            );
            assert!(o.max_abs_diff > 0.0, "{name}.{}: bit-equal to f32", o.name);
        }
    }
}

#[test]
fn preprocessing_equals_transformers_exactly() {
    // Exactly, not within 1e-4: the resampling is Pillow's to the u8 level and the arithmetic
    // after it is the same IEEE operations.
    for name in [
        "clip_model",
        "clip_vision_with_projection",
        "clip_vision_bare",
    ] {
        let report = run_fixture(&default_fixture(name), Device::Cpu).unwrap();
        let pixels = report
            .outputs
            .iter()
            .find(|o| o.name == "pixel_values")
            .unwrap();
        assert_eq!(pixels.max_abs_diff, 0.0, "{name}: {report}");
    }
}

/// A throwaway copy of a fixture's files (not its images) to damage.
fn copy_of(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(default_fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, tmp.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    tmp
}

fn rewrite_weights(file: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let mut tensors = read_safetensors(file).unwrap();
    edit(&mut tensors);
    write_safetensors(file, &tensors).unwrap();
}

#[test]
fn a_missing_tensor_is_named() {
    let dir = copy_of("clip_vision_with_projection");
    let victim = "vision_model.encoder.layers.1.mlp.fc1.bias";
    rewrite_weights(&dir.path().join("model.safetensors"), |t| {
        t.retain(|(n, _)| n != victim)
    });
    let err = ClipModel::load(dir.path(), Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, MlError::MissingTensor { name, .. } if name == victim),
        "{err}"
    );
    assert!(err.to_string().contains(victim), "{err}");
}

#[test]
fn a_wrong_shape_is_named_with_both_shapes() {
    let dir = copy_of("clip_model");
    let victim = "text_projection.weight";
    rewrite_weights(&dir.path().join("model.safetensors"), |tensors| {
        for (name, t) in tensors.iter_mut() {
            if name == victim {
                *t = Tensor::zeros([17, 32], (Kind::Float, Device::Cpu));
            }
        }
    });
    let err = ClipModel::load(dir.path(), Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(victim) && msg.contains("[17, 32]") && msg.contains("[16, 32]"),
        "{msg}"
    );
}

#[test]
fn an_unsupported_architecture_is_refused_by_name() {
    let dir = copy_of("clip_model");
    let config = dir.path().join("config.json");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("\"CLIPModel\"", "\"SiglipModel\"");
    std::fs::write(&config, text).unwrap();
    let err = ClipModel::load(dir.path(), Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, MlError::UnsupportedArchitecture { found, .. } if found == "SiglipModel"),
        "{err}"
    );
    assert!(
        err.to_string().contains("CLIPVisionModelWithProjection"),
        "{err}"
    );
}

#[test]
fn a_truncated_weights_file_is_named() {
    let dir = copy_of("clip_model");
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = ClipModel::load(dir.path(), Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, MlError::CorruptWeights { path, .. } if path == &file),
        "{err}"
    );
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn garbage_instead_of_safetensors_is_named() {
    let dir = copy_of("clip_vision_with_projection");
    let file = dir.path().join("model.safetensors");
    std::fs::write(&file, b"<html>404 not found</html>").unwrap();
    let err = ClipModel::load(dir.path(), Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, MlError::CorruptWeights { path, .. } if path == &file),
        "{err}"
    );
}

#[test]
fn a_missing_config_is_named() {
    let dir = copy_of("clip_vision_with_projection");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let err = ClipModel::load(dir.path(), Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, MlError::Io { path, .. } if path.ends_with("config.json")),
        "{err}"
    );
}

#[test]
fn a_missing_shard_is_named() {
    let dir = copy_of("clip_model_sharded");
    let shard = dir.path().join("model-00002-of-00003.safetensors");
    std::fs::remove_file(&shard).unwrap();
    let err = ClipModel::load(dir.path(), Device::Cpu).unwrap_err();
    assert!(
        matches!(&err, MlError::Io { path, .. } if path == &shard),
        "{err}"
    );
}

#[test]
fn a_shard_without_what_the_index_promises_is_named() {
    let dir = copy_of("clip_model_sharded");
    let index = dir.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    // Point the first tensor listed in shard 1 at shard 3, which does not hold it.
    let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let map = value["weight_map"].as_object_mut().unwrap();
    let (name, _) = map
        .iter()
        .find(|(_, f)| f.as_str() == Some("model-00001-of-00003.safetensors"))
        .unwrap();
    let name = name.clone();
    map.insert(name.clone(), "model-00003-of-00003.safetensors".into());
    std::fs::write(&index, value.to_string()).unwrap();
    let err = ClipModel::load(dir.path(), Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, MlError::CorruptWeights { .. })
            && msg.contains(&name)
            && msg.contains("00003"),
        "{msg}"
    );
}

#[test]
fn sharded_and_single_file_checkpoints_hash_their_files_in_order() {
    let model = ClipModel::load(&default_fixture("clip_model_sharded"), Device::Cpu).unwrap();
    let dir = default_fixture("clip_model_sharded");
    let mut bytes = Vec::new();
    for i in 1..=3 {
        bytes.extend(
            std::fs::read(dir.join(format!("model-0000{i}-of-00003.safetensors"))).unwrap(),
        );
    }
    use sha2::Digest;
    assert_eq!(
        model.weights_hash().unwrap(),
        hex::encode(sha2::Sha256::digest(&bytes))
    );
}

#[test]
fn a_random_model_saves_and_loads_back_identically() {
    let config = ClipConfig::tiny().vision_only();
    let a = ClipModel::init_random(config.clone(), 7, Device::Cpu).unwrap();
    let b = ClipModel::init_random(config, 7, Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hash = a.save_pretrained(dir.path()).unwrap();
    let loaded = ClipModel::load(dir.path(), Device::Cpu).unwrap();
    assert_eq!(loaded.weights_hash(), Some(hash.as_str()));

    let preprocessor = ClipPreprocessor::load(dir.path()).unwrap();
    let image = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(50, 40, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 6) as u8, ((x + y) * 3) as u8])
    }));
    let pixels = preprocessor
        .preprocess_batch(&[image.clone(), image])
        .unwrap();
    let ea = a.image_features(&pixels).unwrap();
    assert_eq!(ea.size(), vec![2, 16]);
    assert!(
        ea.equal(&b.image_features(&pixels).unwrap()),
        "same seed, same weights"
    );
    assert!(
        ea.equal(&loaded.image_features(&pixels).unwrap()),
        "saved and loaded back"
    );
    let other = ClipModel::init_random(ClipConfig::tiny().vision_only(), 8, Device::Cpu).unwrap();
    assert!(
        !ea.equal(&other.image_features(&pixels).unwrap()),
        "another seed, other weights"
    );
}

#[test]
fn the_image_tower_alone_loads_from_a_full_clip_checkpoint() {
    let dir = default_fixture("clip_model");
    let full = ClipModel::load(&dir, Device::Cpu).unwrap();
    let vision = ClipModel::load_vision(&dir, Device::Cpu).unwrap();
    assert_eq!(vision.config().text, None);
    assert_eq!(vision.embedding_dim(), full.embedding_dim());
    let preprocessor = ClipPreprocessor::load(&dir).unwrap();
    let image = image::open(dir.join("images/landscape_rgb_64x48.png")).unwrap();
    let a = full
        .embed_images(&preprocessor, std::slice::from_ref(&image))
        .unwrap();
    let b = vision.embed_images(&preprocessor, &[image]).unwrap();
    assert_eq!(a.size(), vec![1, 16]);
    assert!(a.equal(&b));
}

#[test]
fn without_a_mask_the_text_tower_is_causal_like_with_a_full_mask() {
    let dir = default_fixture("clip_model");
    let model = ClipModel::load(&dir, Device::Cpu).unwrap();
    let inputs: std::collections::BTreeMap<String, Tensor> =
        read_safetensors(&dir.join("inputs.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    // Row 1 of the fixture has no padding.
    let ids = inputs["input_ids"].narrow(0, 1, 1);
    let mask = inputs["attention_mask"].narrow(0, 1, 1);
    assert_eq!(mask.sum(Kind::Int64).int64_value(&[]), ids.size()[1]);
    let unmasked = model.text_features(&ids, None).unwrap();
    let masked = model.text_features(&ids, Some(&mask)).unwrap();
    // Two attention kernels (causal flag, explicit mask) may sum in another order: a few f32
    // steps of values near 1, not a tolerance to compare with transformers.
    let diff = (unmasked - masked).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "{diff}");
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let model = ClipModel::load(&default_fixture("clip_model"), Device::Cpu).unwrap();
    let wrong_size = Tensor::zeros([1, 3, 30, 30], (Kind::Float, Device::Cpu));
    assert!(model.image_features(&wrong_size).is_err());
    let out_of_vocab = Tensor::from_slice(&[97i64, 200, 98]).view([1, 3]);
    assert!(model.text_features(&out_of_vocab, None).is_err());
    let too_long = Tensor::ones([1, 17], (Kind::Int64, Device::Cpu));
    assert!(model.text_features(&too_long, None).is_err());
    let vision =
        ClipModel::load(&default_fixture("clip_vision_with_projection"), Device::Cpu).unwrap();
    assert!(
        vision
            .text_features(&Tensor::ones([1, 3], (Kind::Int64, Device::Cpu)), None)
            .is_err()
    );
}
