//! One log record: its stored bytes, its hash, and the check of the chain.
//!
//! Stored value = `hash (32 bytes) ‖ body`, where body is the rmp-serde encoding of
//! [`Body`] (which includes the previous record's hash) and `hash = SHA-256(body)`. So a changed
//! byte anywhere in a body breaks its own hash, and a re-hashed record breaks its successor's link.
//!
//! The format lives here, as pure functions of bytes, and `twin-log` (the only crate with sled)
//! stores what [`StoredRecord::seal`] returns and reads it back through [`decode`] and
//! [`verify_chain`]: a log's bytes are input a reader must survive whatever they hold (a copied
//! or damaged log), and here they are fuzzed without sled (`fuzz/fuzz_targets/record.rs`).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::event::{DecodeError, Event, EventSchema, RecordedEvent};
use crate::ids::BlobHash;

/// The `prev_hash` of the first record.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

/// An idempotency key (scoped to the request's actor) and the digest of the request it guards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    pub key: String,
    pub digest: [u8; 32],
}

/// A record as stored and as handed to subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub seq: u64,
    pub ts: i64,
    pub stream: String,
    pub stream_version: u64,
    pub event_type: String,
    pub schema_version: u16,
    pub actor: String,
    pub idempotency: Option<Idempotency>,
    pub payload: Vec<u8>,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

#[derive(Serialize, Deserialize)]
struct Body<'a> {
    seq: u64,
    ts: i64,
    stream: &'a str,
    stream_version: u64,
    event_type: &'a str,
    schema_version: u16,
    actor: &'a str,
    idempotency_key: Option<&'a str>,
    #[serde(with = "serde_bytes")]
    idempotency_digest: &'a [u8],
    #[serde(with = "serde_bytes")]
    payload: &'a [u8],
    #[serde(with = "serde_bytes")]
    prev_hash: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("record {seq}: stored hash does not match its contents (tampered or corrupt)")]
    HashMismatch { seq: u64 },
    #[error("record {seq}: previous-hash link does not match record {prev}")]
    BrokenLink { seq: u64, prev: u64 },
    #[error("record {seq}: expected sequence number {expected} (a record is missing)")]
    Gap { seq: u64, expected: u64 },
    #[error("record {seq}: undecodable: {message}")]
    Undecodable { seq: u64, message: String },
    #[error("log storage: {message}")]
    Storage { message: String },
}

impl ChainError {
    /// The sequence number of the bad record, where there is one.
    pub fn seq(&self) -> Option<u64> {
        match self {
            ChainError::HashMismatch { seq }
            | ChainError::BrokenLink { seq, .. }
            | ChainError::Gap { seq, .. }
            | ChainError::Undecodable { seq, .. } => Some(*seq),
            ChainError::Storage { .. } => None,
        }
    }
}

/// The key a record is stored under: its sequence number, big-endian, so keys sort in log order.
pub fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

impl StoredRecord {
    /// Encodes the record body and fills in `hash`; returns the value to store under
    /// [`key`]`(seq)`.
    pub fn seal(&mut self) -> Vec<u8> {
        let (key, digest) = match &self.idempotency {
            Some(i) => (Some(i.key.as_str()), &i.digest[..]),
            None => (None, &[][..]),
        };
        let body = Body {
            seq: self.seq,
            ts: self.ts,
            stream: &self.stream,
            stream_version: self.stream_version,
            event_type: &self.event_type,
            schema_version: self.schema_version,
            actor: &self.actor,
            idempotency_key: key,
            idempotency_digest: digest,
            payload: &self.payload,
            prev_hash: &self.prev_hash,
        };
        let body =
            rmp_serde::to_vec(&body).expect("record bodies are plain data and always encode");
        self.hash = Sha256::digest(&body).into();
        let mut value = Vec::with_capacity(32 + body.len());
        value.extend_from_slice(&self.hash);
        value.extend_from_slice(&body);
        value
    }
}

/// Decodes a stored record (`key` = its big-endian sequence number, `value` = what [`StoredRecord::seal`]
/// returned) and checks it against its own hash (not the chain). Any bytes give a record or an
/// error, never a panic (`fuzz/fuzz_targets/record.rs`).
pub fn decode(key: &[u8], value: &[u8]) -> Result<StoredRecord, ChainError> {
    let seq = key.try_into().map(u64::from_be_bytes).unwrap_or(0);
    let undecodable = |message: String| ChainError::Undecodable { seq, message };
    if value.len() < 32 {
        return Err(undecodable("shorter than its hash".into()));
    }
    let (hash, body_bytes) = value.split_at(32);
    if Sha256::digest(body_bytes).as_slice() != hash {
        return Err(ChainError::HashMismatch { seq });
    }
    let body: Body<'_> =
        rmp_serde::from_slice(body_bytes).map_err(|e| undecodable(e.to_string()))?;
    if body.seq != seq {
        return Err(undecodable(format!(
            "body says sequence number {}",
            body.seq
        )));
    }
    let fixed = |b: &[u8], what: &str| -> Result<[u8; 32], ChainError> {
        b.try_into()
            .map_err(|_| undecodable(format!("{what} is not 32 bytes")))
    };
    let idempotency = match body.idempotency_key {
        Some(key) => Some(Idempotency {
            key: key.to_owned(),
            digest: fixed(body.idempotency_digest, "idempotency digest")?,
        }),
        None => None,
    };
    Ok(StoredRecord {
        seq,
        ts: body.ts,
        stream: body.stream.to_owned(),
        stream_version: body.stream_version,
        event_type: body.event_type.to_owned(),
        schema_version: body.schema_version,
        actor: body.actor.to_owned(),
        idempotency,
        payload: body.payload.to_vec(),
        prev_hash: fixed(body.prev_hash, "previous hash")?,
        hash: fixed(hash, "hash")?,
    })
}

/// Walks `(key, value)` pairs in key order, checking each record and its link to the one before;
/// it stops after the first error. Storage errors come in as [`ChainError::Storage`].
pub fn verify_chain<I, K, V>(iter: I) -> impl Iterator<Item = Result<StoredRecord, ChainError>>
where
    I: Iterator<Item = Result<(K, V), ChainError>>,
    K: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    let mut prev_hash = GENESIS_HASH;
    let mut expected = 1u64;
    let mut failed = false;
    iter.map_while(move |kv| {
        if failed {
            return None;
        }
        let checked = kv
            .and_then(|(k, v)| decode(k.as_ref(), v.as_ref()))
            .and_then(|r| {
                if r.seq != expected {
                    Err(ChainError::Gap {
                        seq: r.seq,
                        expected,
                    })
                } else if r.prev_hash != prev_hash {
                    Err(ChainError::BrokenLink {
                        seq: r.seq,
                        prev: r.seq - 1,
                    })
                } else {
                    Ok(r)
                }
            });
        match &checked {
            Ok(r) => {
                prev_hash = r.hash;
                expected += 1;
            }
            Err(_) => failed = true,
        }
        Some(checked)
    })
}

impl StoredRecord {
    /// Decodes the payload with the production schema (upcasting old versions).
    pub fn recorded(&self) -> Result<RecordedEvent, DecodeError> {
        let event = Event::decode(&self.event_type, self.schema_version, &self.payload)?;
        Ok(RecordedEvent {
            seq: self.seq,
            ts: self.ts,
            stream: self.stream.clone(),
            stream_version: self.stream_version,
            actor: self.actor.clone(),
            hash: BlobHash(self.hash),
            event,
        })
    }
}
