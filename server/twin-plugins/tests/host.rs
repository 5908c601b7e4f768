//! The host against real components: the catalogue, and a module that misbehaves on request.
//!
//! The components are built by `deploy/build-modules.sh` (cargo, target wasm32-wasip2, profile
//! `guest`) into `target/wasm32-wasip2/guest/`, or wherever `TWIN_MODULES_DIR` points.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use twin_plugins::{
    CandidatePair, Compiler, Grants, Host, HostConfig, Limits, ModuleKind, PluginError,
    QuestionType, Rollout,
};

fn modules_dir() -> PathBuf {
    std::env::var_os("TWIN_MODULES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/wasm32-wasip2/guest")
        })
}

fn module_bytes(name: &str) -> Vec<u8> {
    let path = modules_dir().join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; build the modules first with deploy/build-modules.sh",
            path.display()
        )
    })
}

fn host() -> Host {
    Host::new(HostConfig::default()).unwrap()
}

fn rollout(completion: &str, truth: &str) -> Rollout {
    Rollout {
        prompt: "Are these the same?".into(),
        completion: completion.into(),
        ground_truth: truth.into(),
        question_type: QuestionType::Pair,
        metadata: "{}".into(),
    }
}

fn pair(similarity: f64, instance_b: &str) -> CandidatePair {
    CandidatePair {
        image_a: "aa".into(),
        image_b: "bb".into(),
        instance_a: "mug-1".into(),
        instance_b: instance_b.into(),
        category_a: "mug".into(),
        category_b: "mug".into(),
        phash_a: 0,
        phash_b: u64::MAX,
        similarity,
        rank: 0,
        metadata: "{}".into(),
    }
}

#[test]
fn binary_match_scores_a_batch_in_order() {
    let host = host();
    let m = host.load(&module_bytes("binary_match")).unwrap();
    assert_eq!(m.descriptor.name, "binary-match");
    assert_eq!(m.kind(), ModuleKind::Reward);
    assert!(m.capabilities.is_empty(), "{:?}", m.imports);
    let batch = vec![
        rollout("Same logo. <answer>Yes.</answer>", "yes"),
        rollout("<answer>no</answer>", "yes"),
        rollout("no tags at all: yes", "yes"),
        rollout("<ANSWER>\u{1c}yes\u{85}</answer>", "YES"),
    ];
    let out = host
        .score(&m, "{}", &Grants::default(), None, &batch)
        .unwrap();
    let scores: Vec<f64> = out.values.iter().map(|s| s.score).collect();
    assert_eq!(scores, [1.0, 0.0, 0.0, 1.0]);
    assert!(out.fuel_used > 0);
    // The module's identity is its hash; loading the same bytes again is the same module.
    let again = host.load(&module_bytes("binary_match")).unwrap();
    assert!(Arc::ptr_eq(&m, &again));
}

#[test]
fn every_catalogue_module_describes_itself() {
    let host = host();
    for (file, name, kind) in [
        ("binary_match", "binary-match", ModuleKind::Reward),
        ("fgvqa_pair", "fgvqa-pair", ModuleKind::Reward),
        ("fgvqa_multi", "fgvqa-multi", ModuleKind::Reward),
        ("format", "format", ModuleKind::Reward),
        ("synonym_match", "synonym-match", ModuleKind::Reward),
        ("similarity_band", "similarity-band", ModuleKind::Filter),
        ("distinct_instance", "distinct-instance", ModuleKind::Filter),
        ("near_duplicate", "near-duplicate", ModuleKind::Filter),
    ] {
        let m = host.load(&module_bytes(file)).unwrap();
        assert_eq!((m.descriptor.name.as_str(), m.kind()), (name, kind));
        let schema: serde_json::Value = serde_json::from_str(&m.descriptor.parameters_schema)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(schema["type"], "object", "{name}");
    }
}

#[test]
fn format_logs_its_components() {
    let host = host();
    let m = host.load(&module_bytes("format")).unwrap();
    let out = host
        .score(
            &m,
            r#"{"partial": true}"#,
            &Grants::default(),
            None,
            &[rollout("<answer>yes</answer>", "yes")],
        )
        .unwrap();
    assert_eq!(out.values[0].score, 0.5);
    assert_eq!(out.values[0].components["answer_tag"], 1.0);
    assert_eq!(out.values[0].components["explanation"], 0.0);
    let err = host
        .score(
            &m,
            r#"{"partial": 3}"#,
            &Grants::default(),
            None,
            &[rollout("x", "y")],
        )
        .unwrap_err();
    assert!(matches!(err, PluginError::BadParams(_)), "{err}");
}

#[test]
fn filters_judge_and_explain() {
    let host = host();
    let band = host.load(&module_bytes("similarity_band")).unwrap();
    let out = host
        .judge(
            &band,
            r#"{"min":0.8,"max":0.95}"#,
            &Grants::default(),
            None,
            &[pair(0.9, "mug-2"), pair(0.99, "mug-2")],
        )
        .unwrap();
    assert!(out.values[0].keep);
    assert!(!out.values[1].keep);
    assert!(
        out.values[1]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("above")
    );
    let distinct = host.load(&module_bytes("distinct_instance")).unwrap();
    let out = host
        .judge(
            &distinct,
            "{}",
            &Grants::default(),
            None,
            &[pair(0.9, "mug-1")],
        )
        .unwrap();
    assert!(!out.values[0].keep);
    // A filter that cannot judge fails closed: everything is dropped, the error is kept.
    let (out, err) = host.judge_or_drop(
        &band,
        r#"{"min": 2, "max": 1}"#,
        &Grants::default(),
        None,
        &[pair(0.9, "mug-2")],
    );
    assert!(matches!(err, Some(PluginError::BadParams(_))), "{err:?}");
    assert!(!out.values[0].keep);
    assert!(
        out.values[0]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("bad_params")
    );
    // A reward is not a filter.
    let err = host
        .score(&distinct, "{}", &Grants::default(), None, &[])
        .unwrap_err();
    assert!(matches!(err, PluginError::WrongKind { .. }), "{err}");
}

#[test]
fn capabilities_must_be_granted_and_are_recorded() {
    let host = host();
    let m = host.load(&module_bytes("synonym_match")).unwrap();
    assert_eq!(m.capabilities, ["twin:plugin/lookup@0.1.0"]);
    let batch = [
        rollout("<answer>Yeah!</answer>", "yes"),
        rollout("<answer>nope</answer>", "yes"),
    ];
    let err = host
        .score(&m, "{}", &Grants::default(), None, &batch)
        .unwrap_err();
    assert_eq!(
        err,
        PluginError::NotGranted {
            capability: "lookup".into()
        }
    );
    let grants = Grants {
        lookup: Some(
            [
                ("yeah".to_owned(), "yes".to_owned()),
                ("nope".to_owned(), "no".to_owned()),
            ]
            .into(),
        ),
    };
    let out = host.score(&m, "{}", &grants, None, &batch).unwrap();
    assert_eq!(
        out.values.iter().map(|s| s.score).collect::<Vec<_>>(),
        [1.0, 0.0]
    );
    assert_eq!(out.calls.len(), 2);
    assert_eq!(out.calls[0].input, "yeah");
    assert_eq!(out.calls[0].output.as_deref(), Some("yes"));
}

fn misbehave(host: &Host, mode: &str, limits: Option<&Limits>) -> Result<Vec<f64>, PluginError> {
    let m = host.load(&module_bytes("misbehave")).unwrap();
    let params = format!(r#"{{"mode":"{mode}"}}"#);
    host.score(
        &m,
        &params,
        &Grants::default(),
        limits,
        &[rollout("abc", "x"), rollout("de", "x")],
    )
    .map(|o| o.values.into_iter().map(|s| s.score).collect())
}

#[test]
fn limits_and_faults_come_back_typed() {
    let host = host();
    assert_eq!(misbehave(&host, "ok", None).unwrap(), [3.0, 2.0]);
    let small_fuel = Limits {
        fuel: 5_000_000,
        ..Limits::default()
    };
    assert_eq!(
        misbehave(&host, "loop", Some(&small_fuel)),
        Err(PluginError::OutOfFuel { fuel: 5_000_000 })
    );
    let short = Limits {
        fuel: u64::MAX / 2,
        deadline: Duration::from_millis(200),
        ..Limits::default()
    };
    let started = Instant::now();
    assert_eq!(
        misbehave(&host, "loop", Some(&short)),
        Err(PluginError::Deadline(Duration::from_millis(200)))
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let small_memory = Limits {
        memory_bytes: 32 << 20,
        ..Limits::default()
    };
    assert!(matches!(
        misbehave(&host, "memory", Some(&small_memory)),
        Err(PluginError::MemoryLimit {
            what: "linear memory",
            ..
        })
    ));
    assert_eq!(
        misbehave(&host, "recursion", None),
        Err(PluginError::StackOverflow)
    );
    match misbehave(&host, "panic", None) {
        Err(PluginError::GuestTrap { stderr, .. }) => {
            assert!(stderr.contains("panicked on purpose"), "{stderr}")
        }
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(misbehave(&host, "error", None), Err(PluginError::GuestError(m)) if m.contains("on purpose"))
    );
    assert!(matches!(
        misbehave(&host, "bad-config", None),
        Err(PluginError::BadParams(_))
    ));
    assert!(
        matches!(misbehave(&host, "nan", None), Err(PluginError::BadOutput(m)) if m.contains("not finite"))
    );
    assert!(matches!(
        misbehave(&host, "infinite-component", None),
        Err(PluginError::BadOutput(_))
    ));
    assert!(
        matches!(misbehave(&host, "wrong-length", None), Err(PluginError::BadOutput(m)) if m.contains("1 scores for a batch of 2"))
    );
    // After all of that, the same host still works.
    assert_eq!(misbehave(&host, "ok", None).unwrap(), [3.0, 2.0]);
}

#[test]
fn the_sandbox_grants_nothing_and_is_deterministic() {
    let host = host();
    assert_eq!(
        misbehave(&host, "clock", None).unwrap(),
        [0.0, 0.0],
        "the clock is fixed"
    );
    assert_eq!(
        misbehave(&host, "env", None).unwrap(),
        [0.0, 0.0],
        "no environment"
    );
    assert_eq!(
        misbehave(&host, "fs", None).unwrap(),
        [0.0, 0.0],
        "no file system"
    );
    let a = misbehave(&host, "random", None).unwrap();
    let b = misbehave(&host, "random", None).unwrap();
    assert_eq!(a, b, "seeded randomness");
}

#[test]
fn bad_files_are_refused_by_kind() {
    let host = Host::new(HostConfig {
        max_module_bytes: 1 << 20,
        ..HostConfig::default()
    })
    .unwrap();
    assert!(matches!(
        host.load(b"hello world, not wasm"),
        Err(PluginError::NotWasm(_))
    ));
    let core = wat::parse_str("(module)").unwrap();
    assert!(matches!(host.load(&core), Err(PluginError::NotWasm(m)) if m.contains("core")));
    let good = module_bytes("binary_match");
    let truncated = &good[..good.len() / 2];
    assert!(matches!(host.load(truncated), Err(PluginError::Invalid(_))));
    let big = vec![0u8; (1 << 20) + 1];
    assert!(matches!(host.load(&big), Err(PluginError::TooLarge { .. })));
    let no_world = wat::parse_str("(component)").unwrap();
    assert!(matches!(
        host.load(&no_world),
        Err(PluginError::WorldMismatch(_))
    ));
    let alien =
        wat::parse_str(r#"(component (import "evil:net/socket@1.0.0" (instance)))"#).unwrap();
    assert!(matches!(
        host.load(&alien),
        Err(PluginError::UnknownImport { .. })
    ));
}

/// A component whose compilation takes far longer than the limit: many large functions.
fn slow_to_compile() -> Vec<u8> {
    let mut wat = String::from("(component (core module");
    for _ in 0..150 {
        wat.push_str(" (func (result i64) (local i64)");
        for i in 0..2000 {
            wat.push_str(&format!(
                " (local.set 0 (i64.add (local.get 0) (i64.mul (local.get 0) (i64.const {i}))))"
            ));
        }
        wat.push_str(" (local.get 0))");
    }
    wat.push_str("))");
    wat::parse_str(&wat).unwrap()
}

#[test]
fn compilation_in_a_child_is_stopped_at_its_deadline() {
    let cache = tempfile::tempdir().unwrap();
    let child = |timeout| Compiler::Subprocess {
        program: env!("CARGO_BIN_EXE_twin-wasm-compile").into(),
        args: Vec::new(),
        timeout,
    };
    let host = Host::new(HostConfig {
        compiler: child(Duration::from_millis(300)),
        cache_dir: Some(cache.path().to_owned()),
        ..HostConfig::default()
    })
    .unwrap();
    let slow = slow_to_compile();
    let started = Instant::now();
    let err = host.load(&slow).unwrap_err();
    assert_eq!(err, PluginError::CompileTimeout(Duration::from_millis(300)));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The child path compiles good modules, and the artefact lands in the cache.
    let host = Host::new(HostConfig {
        compiler: child(Duration::from_secs(60)),
        cache_dir: Some(cache.path().to_owned()),
        ..HostConfig::default()
    })
    .unwrap();
    let m = host.load(&module_bytes("binary_match")).unwrap();
    assert_eq!(m.descriptor.name, "binary-match");
    let cached: Vec<_> = std::fs::read_dir(cache.path()).unwrap().flatten().collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    assert!(matches!(
        host.load(b"\0asm\x0d\0\x01\0garbage"),
        Err(PluginError::Invalid(_))
    ));
    // A second host finds the artefact in the cache without compiling.
    let cold = Host::new(HostConfig {
        compiler: child(Duration::from_millis(1)),
        cache_dir: Some(cache.path().to_owned()),
        ..HostConfig::default()
    })
    .unwrap();
    assert!(cold.load(&module_bytes("binary_match")).is_ok());
}
