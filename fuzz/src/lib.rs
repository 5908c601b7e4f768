//! The harnesses behind twin's fuzz targets: each takes the fuzzer's bytes, feeds them to code
//! that reads untrusted input, and asserts what that code promises. A failed assertion, a panic,
//! an abort or an allocation past libFuzzer's limit is a crash (`deploy/fuzz.sh`).
//!
//! The targets in `fuzz_targets/` are one-line wrappers, so the same harnesses run over the
//! committed corpus from `examples/write_seeds.rs`, which also writes that corpus.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use twin_core::event::SCHEMA_VERSIONS;
use twin_core::module_output::{self, DescriptorText};
use twin_core::record::{self as log_record, ChainError, GENESIS_HASH, StoredRecord};
use twin_core::safetensors::{self, TensorEntry};
use twin_core::{Event, EventSchema, JobSubmission};

/// Target `record`: the log's record decoder (`twin_core::record`), event payload decoder and
/// chain check.
///
/// The first byte picks what the rest is:
/// - a stored record (`key ‖ body`, hashed here so the body decoder is reached): it decodes or is
///   an error; a decoded record seals and decodes back to itself, sealing is a fixed point, and
///   its payload, when it decodes as an event, round-trips (below);
/// - an event payload of a known type (next byte) at a version near the current one (the byte
///   after): it decodes or is an error; a decoded event encodes at the current version, decodes
///   back, re-encodes to the same bytes, and serialises to JSON (what the API sends);
/// - payloads sealed into a chain: the chain verifies, and a flipped byte anywhere is reported at
///   exactly the record holding it, with every record before it still accepted.
pub fn record(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => stored_record(rest),
        1 => event_payload(rest),
        _ => chain(rest),
    }
}

fn stored_record(data: &[u8]) {
    let (key, body) = data.split_at(data.len().min(8));
    let mut value = Sha256::digest(body).to_vec();
    value.extend_from_slice(body);
    let Ok(record) = log_record::decode(key, &value) else {
        return;
    };
    let mut resealed = record.clone();
    let sealed = resealed.seal();
    let again = log_record::decode(key, &sealed).expect("a sealed record decodes");
    assert_eq!(again, resealed, "seal → decode is the identity");
    assert_eq!(
        StoredRecord {
            hash: record.hash,
            ..resealed.clone()
        },
        record,
        "a record keeps every field through a seal (its hash aside: encodings differ)"
    );
    assert_eq!(
        resealed.clone().seal(),
        sealed,
        "sealing a decoded record is a fixed point"
    );
    if let Ok(recorded) = record.recorded() {
        event_round_trip(&recorded.event);
    }
}

fn event_payload(data: &[u8]) {
    let [type_byte, version_byte, payload @ ..] = data else {
        return;
    };
    let (event_type, current) = SCHEMA_VERSIONS[usize::from(*type_byte) % SCHEMA_VERSIONS.len()];
    // 0 ..= current + 1: the upcasters, the fast path and one version from the future.
    let version = u16::from(*version_byte) % (current + 2);
    if let Ok(event) = Event::decode(event_type, version, payload) {
        assert_eq!(event.event_type(), event_type);
        event_round_trip(&event);
    }
}

fn event_round_trip(event: &Event) {
    let (event_type, version, bytes) = event.encode();
    let current = SCHEMA_VERSIONS
        .iter()
        .find(|(name, _)| *name == event_type)
        .map(|(_, v)| *v);
    assert_eq!(
        Some(version),
        current,
        "events encode at the current version"
    );
    let decoded = Event::decode(event_type, version, &bytes)
        .unwrap_or_else(|e| panic!("an encoded {event_type} does not decode: {e}"));
    assert_eq!(
        decoded.encode().2,
        bytes,
        "encode → decode → encode changed a {event_type}"
    );
    if let Err(e) = serde_json::to_vec(event) {
        panic!("a decodable {event_type} cannot be sent as JSON: {e}");
    }
}

fn chain(data: &[u8]) {
    let [flip_high, flip_low, rest @ ..] = data else {
        return;
    };
    // Up to 8 records; a 0xff byte separates payloads.
    let mut values = Vec::new();
    let mut prev_hash = GENESIS_HASH;
    for (i, payload) in rest.split(|&b| b == 0xff).take(8).enumerate() {
        let seq = i as u64 + 1;
        let mut record = StoredRecord {
            seq,
            ts: i64::from(payload.first().copied().unwrap_or(0)),
            stream: "job/fuzz".into(),
            stream_version: seq,
            event_type: "job_progress".into(),
            schema_version: 1,
            actor: "fuzz".into(),
            idempotency: None,
            payload: payload.to_vec(),
            prev_hash,
            hash: [0; 32],
        };
        let value = record.seal();
        prev_hash = record.hash;
        values.push((seq.to_be_bytes(), value));
    }
    let all_ok = |values: &[([u8; 8], Vec<u8>)]| {
        log_record::verify_chain(values.iter().map(|(k, v)| Ok::<_, ChainError>((k, v))))
            .collect::<Vec<_>>()
    };
    let checked = all_ok(&values);
    assert_eq!(checked.len(), values.len());
    assert!(
        checked.iter().all(Result::is_ok),
        "a sealed chain verifies: {checked:?}"
    );

    // Flip one bit of one stored value: the chain must fail at that record and not before.
    let total: usize = values.iter().map(|(_, v)| v.len()).sum();
    let mut at = usize::from(u16::from_be_bytes([*flip_high, *flip_low])) % total;
    let victim = values
        .iter()
        .position(|(_, v)| {
            if at < v.len() {
                true
            } else {
                at -= v.len();
                false
            }
        })
        .expect("`at` is inside one value");
    values[victim].1[at] ^= 1 << (flip_low % 8);
    let checked = all_ok(&values);
    assert_eq!(
        checked.len(),
        victim + 1,
        "the walk stops at the first bad record"
    );
    assert!(checked[..victim].iter().all(Result::is_ok));
    let err = checked[victim]
        .as_ref()
        .expect_err("a changed record is refused");
    assert_eq!(err.seq(), Some(victim as u64 + 1), "{err}");
}

/// Target `job_spec`: `JobSubmission::from_json`, the API's parser of job submissions.
///
/// Bytes that are JSON are parsed as a submission: the parser returns a submission or an error
/// naming a field, never panics. An accepted submission passes its own `validate`, serialises to
/// JSON that parses back to the same submission, and survives the log's MessagePack encoding
/// (a `job_submitted` event holds it): an accepted job can always be replayed.
pub fn job_spec(data: &[u8]) {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    // A refusal names a field, but it may be `""`: `{"": 1}` has an unknown field of that name.
    let Ok(submission) = JobSubmission::from_json(json) else {
        return;
    };
    submission
        .validate()
        .expect("an accepted submission is valid");
    let json = serde_json::to_value(&submission).expect("a submission serialises to JSON");
    let again = JobSubmission::from_json(json.clone())
        .unwrap_or_else(|e| panic!("the JSON of an accepted submission is refused: {e}\n{json}"));
    assert_eq!(again, submission, "JSON round trip");
    let packed = rmp_serde::to_vec_named(&submission).expect("a submission encodes");
    let unpacked: JobSubmission = rmp_serde::from_slice(&packed)
        .unwrap_or_else(|e| panic!("the log's encoding of a submission does not decode: {e}"));
    assert_eq!(unpacked, submission, "MessagePack round trip");
}

/// What a module's calls returned, as the `module_output` target reads it: MessagePack (which,
/// unlike JSON, carries NaN and infinities) of this struct in rmp-serde's compact form.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ModuleOutput {
    /// The batch the scores and verdicts answer.
    pub batch_len: u32,
    /// `(score, [(component name, value)])` per rollout.
    pub scores: Vec<(f64, Vec<(String, f64)>)>,
    /// `(keep, reason)` per candidate.
    pub verdicts: Vec<(bool, Option<String>)>,
    /// `describe`'s `(name, version, summary, parameters schema)`.
    pub describe: Option<(String, String, String, String)>,
    /// An error message the module returned.
    pub error: Option<String>,
}

/// Target `module_output`: the host's checks of a module's output (`twin_core::module_output`).
///
/// Each check accepts exactly what the host's contract allows, stated here independently:
/// the count check accepts one value per item; a score is accepted iff it is finite with at most
/// 64 components whose names are non-empty, distinct and at most 128 bytes and whose values are
/// finite, and then every component comes back unchanged; a verdict iff its reason is at most
/// 1024 bytes; a descriptor that is accepted has a non-blank name, fields within their limits and
/// a schema that is JSON. A cut error message is at most 4096 bytes plus the mark, a prefix of
/// the original, and uncut when it was short enough.
pub fn module_output(data: &[u8]) {
    let Ok(output) = rmp_serde::from_slice::<ModuleOutput>(data) else {
        return;
    };
    let batch_len = output.batch_len as usize;
    for (values, what) in [
        (output.scores.len(), "scores"),
        (output.verdicts.len(), "verdicts"),
    ] {
        assert_eq!(
            module_output::check_count(values, batch_len, what).is_ok(),
            values == batch_len
        );
    }
    for (i, (score, components)) in output.scores.iter().enumerate() {
        let mut names = std::collections::BTreeSet::new();
        let allowed = score.is_finite()
            && components.len() <= module_output::MAX_COMPONENTS
            && components.iter().all(|(name, value)| {
                !name.is_empty()
                    && name.len() <= module_output::MAX_NAME_BYTES
                    && value.is_finite()
                    && names.insert(name.as_str())
            });
        match module_output::check_score(i, *score, components.clone()) {
            Ok(by_name) => {
                assert!(allowed, "accepted {score} {components:?}");
                let given: BTreeMap<_, _> = components.iter().cloned().collect();
                assert_eq!(by_name, given);
            }
            Err(e) => {
                assert!(!allowed, "refused {score} {components:?}: {e}");
                assert!(
                    e.0.contains(&format!("rollout {i}")),
                    "{e} names the rollout"
                );
            }
        }
    }
    for (i, (_, reason)) in output.verdicts.iter().enumerate() {
        let allowed = reason
            .as_ref()
            .is_none_or(|r| r.len() <= module_output::MAX_REASON_BYTES);
        assert_eq!(
            module_output::check_verdict(i, reason.as_deref()).is_ok(),
            allowed
        );
    }
    if let Some((name, version, summary, parameters_schema)) = &output.describe {
        let text = DescriptorText {
            name,
            version,
            summary,
            parameters_schema,
        };
        if module_output::check_descriptor(text).is_ok() {
            assert!(!name.trim().is_empty());
            assert!(name.len() <= module_output::MAX_NAME_BYTES);
            assert!(version.len() <= module_output::MAX_VERSION_BYTES);
            assert!(summary.len() <= module_output::MAX_SUMMARY_BYTES);
            assert!(parameters_schema.len() <= module_output::MAX_SCHEMA_BYTES);
            assert!(serde_json::from_str::<serde_json::Value>(parameters_schema).is_ok());
        }
    }
    if let Some(message) = &output.error {
        let cut = module_output::cut_message(message.clone());
        if message.len() <= module_output::MAX_MESSAGE_BYTES {
            assert_eq!(&cut, message);
        } else {
            let kept = cut.strip_suffix(" […]").expect("a cut message is marked");
            assert!(kept.len() <= module_output::MAX_MESSAGE_BYTES);
            assert!(
                kept.len() > module_output::MAX_MESSAGE_BYTES - 4,
                "cut at most one char"
            );
            assert!(message.starts_with(kept));
        }
    }
}

/// Target `safetensors_header`: the checkpoint header reader (`twin_core::safetensors`).
///
/// The bytes are a whole file. It parses or is an error (a claimed header length past the file or
/// the limit is refused before it is allocated). Every accepted tensor's range lies in the file's
/// data and holds exactly `elements × dtype size` bytes; its dimensions multiply without
/// overflowing an `i64` in either order; and the entries written back as a header over the same
/// data parse to the same tensors.
pub fn safetensors_header(data: &[u8]) {
    let Ok(tensors) = safetensors::parse_file(data) else {
        return;
    };
    let header_len = u64::from_le_bytes(data[..8].try_into().expect("8 bytes were read"));
    let data_start = 8 + header_len;
    let file_len = data.len() as u64;
    for (name, t) in &tensors {
        assert!(t.range.start >= data_start && t.range.start <= t.range.end);
        assert!(t.range.end <= file_len, "{name} ends past the file");
        let forward = t.shape.iter().try_fold(1i64, |n, &d| n.checked_mul(d));
        let backward = t
            .shape
            .iter()
            .rev()
            .try_fold(1i64, |n, &d| n.checked_mul(d));
        assert!(
            forward.is_some() && backward.is_some(),
            "{name}: {:?}",
            t.shape
        );
        assert!(t.shape.iter().all(|&d| d >= 0));
        let bytes = forward.expect("checked") as u64 * t.dtype.size_in_bytes();
        assert_eq!(t.range.end - t.range.start, bytes, "{name}");
    }
    let rewritten = write_file(&tensors, data_start, &data[data_start as usize..]);
    let reparsed = safetensors::parse_file(&rewritten).expect("a rewritten header parses");
    let new_start = 8 + u64::from_le_bytes(rewritten[..8].try_into().expect("8 bytes"));
    let relative = |tensors: &BTreeMap<String, TensorEntry>, start: u64| {
        tensors
            .iter()
            .map(|(name, t)| {
                let range = t.range.start - start..t.range.end - start;
                (name.clone(), (t.dtype, t.shape.clone(), range))
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        relative(&reparsed, new_start),
        relative(&tensors, data_start)
    );
}

/// A safetensors file: `tensors` (ranges counted from `old_start`) written as a header, then
/// `payload`.
pub fn write_file(
    tensors: &BTreeMap<String, TensorEntry>,
    old_start: u64,
    payload: &[u8],
) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert(
        safetensors::METADATA_KEY.into(),
        serde_json::json!({"format": "pt"}),
    );
    for (name, t) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": t.dtype.as_str(),
                "shape": t.shape,
                "data_offsets": [t.range.start - old_start, t.range.end - old_start],
            }),
        );
    }
    let header = serde_json::to_vec(&header).expect("a JSON map serialises");
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&header);
    file.extend_from_slice(payload);
    file
}
