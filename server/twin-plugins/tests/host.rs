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
    let mut cached: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    cached.sort();
    assert_eq!(cached.len(), 2, "the artefact and its sidecar: {cached:?}");
    assert!(cached[0].ends_with(".cwasm") && cached[1].ends_with(".cwasm.json"));
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

/// A reward component, written by hand, whose `describe` sleeps for an hour at a time for ever
/// through `wasi:clocks` and `wasi:io/poll` (what Rust's `std::thread::sleep` lowers to), dropping
/// each pollable. Every other export traps; only `describe` is ever reached.
fn sleeps_in_describe() -> Vec<u8> {
    wat::parse_str(
        r#"(component $c
  (import "wasi:io/poll@0.2.0" (instance $poll
    (export "pollable" (type $p (sub resource)))
    (export "[method]pollable.block" (func (param "self" (borrow $p))))))
  (alias export $poll "pollable" (type $pollable))
  (import "wasi:clocks/monotonic-clock@0.2.0" (instance $clock
    (alias outer $c $pollable (type $outer))
    (export "pollable" (type $p (eq $outer)))
    (export "subscribe-duration" (func (param "when" u64) (result (own $p))))))
  (import "twin:plugin/types@0.1.0" (instance $types
    (type $kind (enum "reward" "filter"))
    (export "module-kind" (type $k (eq $kind)))
    (type $descriptor (record (field "name" string) (field "version" string) (field "kind" $k)
      (field "summary" string) (field "parameters-schema" string)))
    (export "descriptor" (type (eq $descriptor)))
    (type $question (enum "pair" "multi" "other"))
    (export "question-type" (type $q (eq $question)))
    (type $rollout (record (field "prompt" string) (field "completion" string)
      (field "ground-truth" string) (field "question-type" $q) (field "metadata" string)))
    (export "rollout" (type (eq $rollout)))
    (type $component (record (field "name" string) (field "value" f64)))
    (export "score-component" (type $sc (eq $component)))
    (type $score (record (field "score" f64) (field "components" (list $sc))))
    (export "reward-score" (type (eq $score)))))
  (alias export $types "descriptor" (type $descriptor))
  (alias export $types "rollout" (type $rollout))
  (alias export $types "reward-score" (type $reward-score))
  (core module $m
    (import "clock" "subscribe-duration" (func $subscribe (param i64) (result i32)))
    (import "poll" "block" (func $block (param i32)))
    (import "poll" "drop" (func $drop (param i32)))
    (memory (export "memory") 1)
    (func (export "realloc") (param i32 i32 i32 i32) (result i32) (i32.const 1024))
    (func (export "describe") (result i32) (local $timer i32)
      (loop $hour
        (local.set $timer (call $subscribe (i64.const 3600000000000)))
        (call $block (local.get $timer))
        (call $drop (local.get $timer))
        (br $hour))
      (unreachable))
    (func (export "configure") (param i32 i32) (result i32) (unreachable))
    (func (export "score") (param i32 i32) (result i32) (unreachable)))
  (core func $subscribe (canon lower (func $clock "subscribe-duration")))
  (core func $block (canon lower (func $poll "[method]pollable.block")))
  (core func $drop (canon resource.drop $pollable))
  (core instance $clock_imports (export "subscribe-duration" (func $subscribe)))
  (core instance $poll_imports (export "block" (func $block)) (export "drop" (func $drop)))
  (core instance $i (instantiate $m
    (with "clock" (instance $clock_imports))
    (with "poll" (instance $poll_imports))))
  (alias core export $i "memory" (core memory $memory))
  (alias core export $i "realloc" (core func $realloc))
  (func $describe (result $descriptor)
    (canon lift (core func $i "describe") (memory $memory)))
  (func $configure (param "params" string) (result (result (error string)))
    (canon lift (core func $i "configure") (memory $memory) (realloc $realloc)))
  (func $score (param "batch" (list $rollout)) (result (result (list $reward-score) (error string)))
    (canon lift (core func $i "score") (memory $memory) (realloc $realloc)))
  (instance $module (export "describe" (func $describe)) (export "configure" (func $configure)))
  (instance $scorer (export "score" (func $score)))
  (export "twin:plugin/module@0.1.0" (instance $module))
  (export "twin:plugin/scorer@0.1.0" (instance $scorer)))"#,
    )
    .unwrap()
}

/// Issue 15 item 3: sleeping through `wasi:clocks` + `wasi:io/poll` used to block the host thread
/// past the epoch deadline (a module sleeping in `describe` hung its upload).
#[test]
fn sleeping_guests_end_at_their_deadline() {
    let short = Duration::from_millis(300);
    let host = Host::new(HostConfig {
        limits: Limits {
            deadline: short,
            fuel: u64::MAX / 2,
            ..Limits::default()
        },
        ..HostConfig::default()
    })
    .unwrap();
    // In `describe`, at upload.
    let started = Instant::now();
    assert_eq!(
        host.load(&sleeps_in_describe()).unwrap_err(),
        PluginError::Deadline(short)
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // In `score`: an hour's sleep is over at once (the clock never moves) ...
    let started = Instant::now();
    assert_eq!(misbehave(&host, "sleep", None).unwrap(), [3.0, 2.0]);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // ... and a guest that sleeps for ever is stopped at the deadline.
    let started = Instant::now();
    assert_eq!(
        misbehave(&host, "sleep-forever", None),
        Err(PluginError::Deadline(short))
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn outputs_over_the_caps_are_refused() {
    let host = host();
    match misbehave(&host, "huge-component", None) {
        Err(PluginError::BadOutput(m)) => assert!(m.contains("bytes at once"), "{m}"),
        other => panic!("{other:?}"),
    }
    match misbehave(&host, "many-components", None) {
        Err(PluginError::BadOutput(m)) => assert!(m.contains("1000 score components"), "{m}"),
        other => panic!("{other:?}"),
    }
    // A long error message is kept, cut: it becomes the job's failure detail.
    match misbehave(&host, "long-error", None) {
        Err(PluginError::GuestError(m)) => {
            assert!(
                m.len() < 5000 && m.starts_with("eee") && m.ends_with("[…]"),
                "{}",
                m.len()
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn capability_calls_are_capped() {
    let host = host();
    let m = host.load(&module_bytes("synonym_match")).unwrap();
    let grants = Grants {
        lookup: Some([("yes".to_owned(), "yes".to_owned())].into()),
    };
    // synonym-match makes one lookup per rollout with an answer.
    let batch = vec![rollout("<answer>yes</answer>", "yes"); twin_plugins::capability::MAX_CALLS];
    let out = host.score(&m, "{}", &grants, None, &batch).unwrap();
    assert_eq!(out.calls.len(), twin_plugins::capability::MAX_CALLS);
    let batch =
        vec![rollout("<answer>yes</answer>", "yes"); twin_plugins::capability::MAX_CALLS + 1];
    match host.score(&m, "{}", &grants, None, &batch) {
        Err(e) => assert_eq!(
            e,
            PluginError::MemoryLimit {
                what: "its number of capability calls",
                limit: twin_plugins::capability::MAX_CALLS as u64,
            }
        ),
        Ok(out) => panic!("{} capability calls, none refused", out.calls.len()),
    }
}

fn compiling_child(timeout: Duration) -> Compiler {
    Compiler::Subprocess {
        program: env!("CARGO_BIN_EXE_twin-wasm-compile").into(),
        args: Vec::new(),
        timeout,
    }
}

/// A component with one function of `n` dependent operations: Cranelift's memory grows with it.
fn one_big_function(n: usize) -> Vec<u8> {
    let mut wat = String::from("(component (core module (func (result i64) (local i64)");
    for i in 0..n {
        wat.push_str(&format!(
            " (local.set 0 (i64.add (local.get 0) (i64.mul (local.get 0) (i64.const {i}))))"
        ));
    }
    wat.push_str(" (local.get 0))))");
    wat::parse_str(&wat).unwrap()
}

#[test]
fn the_compiler_child_runs_under_a_memory_limit() {
    let big = one_big_function(200_000);
    let limited = |bytes| {
        Host::new(HostConfig {
            compiler: compiling_child(Duration::from_secs(120)),
            max_compile_memory_bytes: bytes,
            ..HostConfig::default()
        })
        .unwrap()
    };
    match limited(64 << 20).load(&big) {
        Err(PluginError::Invalid(m)) => assert!(m.contains("memory limit"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The same child compiles ordinary modules under that limit.
    let m = limited(64 << 20)
        .load(&module_bytes("binary_match"))
        .unwrap();
    assert_eq!(m.descriptor.name, "binary-match");
}

#[test]
fn compilations_run_a_few_at_a_time() {
    let timeout = Duration::from_millis(400);
    let host = Host::new(HostConfig {
        compiler: compiling_child(timeout),
        max_concurrent_compilations: 1,
        ..HostConfig::default()
    })
    .unwrap();
    let slow = slow_to_compile();
    let started = Instant::now();
    std::thread::scope(|s| {
        let loads: Vec<_> = (0..3).map(|_| s.spawn(|| host.load(&slow))).collect();
        for load in loads {
            assert_eq!(
                load.join().unwrap().unwrap_err(),
                PluginError::CompileTimeout(timeout)
            );
        }
    });
    // One slot: the three children ran one after another, each until it was stopped.
    assert!(
        started.elapsed() >= timeout * 3,
        "{:?}: the compilations overlapped",
        started.elapsed()
    );
}

/// Issue 15 item 4: a cached artefact is native code; one that is not what its sidecar says is
/// recompiled, never loaded.
#[test]
fn a_tampered_cached_artefact_is_recompiled_not_loaded() {
    let cache = tempfile::tempdir().unwrap();
    let cached = || {
        Host::new(HostConfig {
            cache_dir: Some(cache.path().to_owned()),
            ..HostConfig::default()
        })
        .unwrap()
    };
    let binary_match = module_bytes("binary_match");
    cached().load(&binary_match).unwrap();
    let artefact = std::fs::read_dir(cache.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .unwrap();
    let genuine = std::fs::read(&artefact).unwrap();
    // Plant a valid artefact of another module, compiled by the same engine, in its place: code
    // that wasmtime would load and run as binary-match.
    let other = tempfile::tempdir().unwrap();
    Host::new(HostConfig {
        cache_dir: Some(other.path().to_owned()),
        ..HostConfig::default()
    })
    .unwrap()
    .load(&module_bytes("distinct_instance"))
    .unwrap();
    let planted = std::fs::read_dir(other.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .unwrap();
    std::fs::copy(&planted, &artefact).unwrap();
    let m = cached().load(&binary_match).unwrap();
    assert_eq!(
        (m.descriptor.name.as_str(), m.kind()),
        ("binary-match", ModuleKind::Reward)
    );
    assert_eq!(
        std::fs::read(&artefact).unwrap(),
        genuine,
        "recompiled and written back"
    );
    // Garbage is refused the same way.
    std::fs::write(&artefact, b"not an artefact").unwrap();
    assert_eq!(
        cached().load(&binary_match).unwrap().descriptor.name,
        "binary-match"
    );
}

#[test]
fn a_cache_directory_others_can_write_or_own_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let open = |dir: &std::path::Path| {
        Host::new(HostConfig {
            cache_dir: Some(dir.to_owned()),
            ..HostConfig::default()
        })
    };
    let shared = tmp.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    match open(&shared) {
        Err(PluginError::Host(m)) => {
            assert!(m.contains("writable by group or others (mode 777)"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    // A directory created by the host is private.
    let fresh = tmp.path().join("fresh");
    open(&fresh).unwrap();
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    // Someone else's directory (needs root to make one).
    let theirs = tmp.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    match std::os::unix::fs::chown(&theirs, Some(4242), Some(4242)) {
        Ok(()) => match open(&theirs) {
            Err(PluginError::Host(m)) => assert!(m.contains("owned by uid 4242"), "{m}"),
            other => panic!("{other:?}"),
        },
        Err(e) => eprintln!("skipping the other-owner case: chown needs root ({e})"),
    }
}
