//! Writes the committed seed corpus, `fuzz/corpus/<target>/`, and checks it: every seed goes
//! through its harness, and the inputs meant to be valid are checked to be accepted, so the
//! fuzzer starts from the deep paths. Run from `fuzz/` when a format changes:
//! `cargo +nightly run --example write_seeds` (the committed logs of twin-log's tests supply
//! real records of every event type).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use twin_core::event::SCHEMA_VERSIONS;
use twin_fuzz::ModuleOutput;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus = root.join("corpus");
    write(&corpus, "record", &record_seeds(root), twin_fuzz::record);
    write(&corpus, "job_spec", &job_spec_seeds(), twin_fuzz::job_spec);
    write(
        &corpus,
        "module_output",
        &module_output_seeds(),
        twin_fuzz::module_output,
    );
    write(
        &corpus,
        "safetensors_header",
        &safetensors_seeds(),
        twin_fuzz::safetensors_header,
    );
}

/// Writes each seed under the SHA-1-like name libFuzzer would give it (here SHA-256, cut), after
/// running it through the harness.
fn write(corpus: &Path, target: &str, seeds: &[Vec<u8>], harness: fn(&[u8])) {
    let dir = corpus.join(target);
    std::fs::create_dir_all(&dir).expect("create the corpus directory");
    for seed in seeds {
        harness(seed);
        let name = hex(&Sha256::digest(seed)[..20]);
        std::fs::write(dir.join(name), seed).expect("write a seed");
    }
    println!("{target}: {} seeds in {}", seeds.len(), dir.display());
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every record of the committed logs, as a stored record (mode 0) and as a bare payload of its
/// type and version (mode 1), plus a few chains (mode 2).
fn record_seeds(root: &Path) -> Vec<Vec<u8>> {
    let fixtures = root.join("../server/twin-log/tests/fixtures");
    let scratch = tempfile_dir();
    let mut seeds = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for log in ["log-v1", "log-v2"] {
        let reader = twin_log::LogReader::open_copy(&fixtures.join(log), &scratch)
            .unwrap_or_else(|e| panic!("open {log}: {e}"));
        for record in reader.verified() {
            let mut record = record.expect("the committed logs verify");
            record
                .recorded()
                .expect("the committed logs' events decode");
            // One of each (type, version): the logs repeat types.
            if !seen.insert((record.event_type.clone(), record.schema_version)) {
                continue;
            }
            let value = record.seal();
            let mut stored = vec![0u8];
            stored.extend_from_slice(&record.seq.to_be_bytes());
            stored.extend_from_slice(&value[32..]);
            seeds.push(stored);
            let type_index = SCHEMA_VERSIONS
                .iter()
                .position(|(name, _)| *name == record.event_type)
                .expect("a known event type");
            let mut payload = vec![1u8, type_index as u8, record.schema_version as u8];
            payload.extend_from_slice(&record.payload);
            seeds.push(payload);
        }
    }
    std::fs::remove_dir_all(&scratch).ok();
    seeds.push(vec![2, 0, 7]);
    seeds.push(b"\x02\x01\x00first\xffsecond\xff\xffthird".to_vec());
    seeds
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("twin-fuzz-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create a scratch directory");
    dir
}

/// Specs from the README and the tests, one or more per kind, and a few refusals.
fn job_spec_seeds() -> Vec<Vec<u8>> {
    let hash = "ab".repeat(32);
    let valid = [
        r#"{"spec": {"kind": "ingest", "dataset": "shoes", "source": {"dir": "/data/shoes"}}}"#.to_owned(),
        r#"{"spec": {"kind": "ingest", "dataset": "x", "source": {"manifest": "/m"}}, "priority": 5}"#.to_owned(),
        format!(r#"{{"spec": {{"kind": "score", "rollouts": "{hash}", "reward": {{"module": "binary-match", "params": {{}}}}}}}}"#),
        format!(
            r#"{{"spec": {{"kind": "score", "rollouts": "{hash}", "reward": {{"weighted_sum": [{{"name": "correct", "module": "binary-match", "weight": 1.0, "params": {{}}}}, {{"name": "shape", "module": "format", "weight": 0.1}}]}}, "grants": {{"lookup": {{"a": "b"}}}}, "limits": {{"fuel": 1000000, "deadline_ms": 1000, "memory_mb": 64}}, "batch_size": 256}}, "retry": {{"max_attempts": 3, "backoff_initial_ms": 1000, "backoff_max_ms": 60000}}, "requirements": {{"labels": ["gpu"]}}}}"#
        ),
        r#"{"spec": {"kind": "mine", "dataset": "d", "model": "/m", "k": 8, "filters": [{"module": "distinct"}, {"module": "band", "name": "band"}]}}"#.to_owned(),
        r#"{"spec": {"kind": "build-dataset", "name": "b", "dataset": "d"}}"#.to_owned(),
        r#"{"spec": {"kind": "eval", "model": "/m", "data": {"built": "pairs"}}}"#.to_owned(),
        r#"{"spec": {"kind": "eval", "model": "/m", "data": {"questions": "/q.jsonl"}}}"#.to_owned(),
        r#"{"spec": {"kind": "train", "dataset": "pairs", "model": "/m"}}"#.to_owned(),
    ];
    for spec in &valid {
        let json = serde_json::from_str(spec).expect("a seed is JSON");
        if let Err(e) = twin_core::JobSubmission::from_json(json) {
            panic!("seed spec refused: {e}\n{spec}");
        }
    }
    let refused = [
        r#"{"spec": {"kind": "synthesize"}}"#,
        r#"{"spec": {"kind": "ingest", "dataset": "d", "source": {"dir": "rel/ative"}}}"#,
        r#"{"spec": {"kind": "train", "dataset": "pairs", "model": "/m"}, "retry": {"max_attempts": 0}}"#,
        r#"[]"#,
    ];
    valid
        .iter()
        .map(String::as_str)
        .chain(refused)
        .map(|s| s.as_bytes().to_vec())
        .collect()
}

fn module_output_seeds() -> Vec<Vec<u8>> {
    let name = |s: &str| s.to_owned();
    let outputs = [
        // A reward's batch of two, valid.
        ModuleOutput {
            batch_len: 2,
            scores: vec![
                (1.0, vec![(name("correct"), 1.0), (name("format"), 0.5)]),
                (0.0, vec![]),
            ],
            ..ModuleOutput::default()
        },
        // Refused: NaN, an infinite component, a repeated name, a wrong count.
        ModuleOutput {
            batch_len: 3,
            scores: vec![
                (f64::NAN, vec![]),
                (1.0, vec![(name("a"), f64::INFINITY)]),
                (1.0, vec![(name("a"), 1.0), (name("a"), 2.0)]),
                (1.0, vec![(name(""), 1.0)]),
            ],
            ..ModuleOutput::default()
        },
        // A filter's verdicts, one reason over the limit.
        ModuleOutput {
            batch_len: 2,
            verdicts: vec![(true, None), (false, Some("x".repeat(1025)))],
            ..ModuleOutput::default()
        },
        // Descriptors, and a guest error long enough to be cut (with a multi-byte character).
        ModuleOutput {
            describe: Some((
                name("binary-match"),
                name("0.1.0"),
                name("1 when the answer matches"),
                name(r#"{"type": "object", "properties": {}}"#),
            )),
            error: Some(format!("{}é", "e".repeat(4095))),
            ..ModuleOutput::default()
        },
        ModuleOutput {
            describe: Some((name(" "), name("1"), String::new(), name("{"))),
            error: Some(name("bad params: `threshold` must be a number")),
            ..ModuleOutput::default()
        },
    ];
    outputs
        .iter()
        .map(|o| rmp_serde::to_vec(o).expect("encodes"))
        .collect()
}

fn safetensors_seeds() -> Vec<Vec<u8>> {
    let file = |header: &str, data: usize| {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data, 0x3f);
        bytes
    };
    let valid = [
        // As twin-ml's `write_safetensors` writes them: metadata first, names sorted.
        file(
            r#"{"__metadata__":{"format":"pt"},"text_model.embeddings.weight":{"dtype":"F32","shape":[4,2],"data_offsets":[0,32]},"visual.proj":{"dtype":"BF16","shape":[2,2],"data_offsets":[32,40]}}   "#,
            40,
        ),
        file(
            r#"{"a":{"dtype":"I64","shape":[],"data_offsets":[0,8]},"b":{"dtype":"BOOL","shape":[0,3],"data_offsets":[8,8]},"c":{"dtype":"U8","shape":[3],"data_offsets":[8,11]}}"#,
            11,
        ),
        file(r#"{}"#, 0),
    ];
    for seed in &valid {
        twin_core::safetensors::parse_file(seed).expect("a valid seed parses");
    }
    let mut seeds = valid.to_vec();
    seeds.push(file(
        r#"{"x":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}}"#,
        2,
    ));
    seeds.push(file(
        r#"{"x":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}}"#,
        1,
    ));
    seeds.push(u64::MAX.to_le_bytes().to_vec());
    seeds
}
