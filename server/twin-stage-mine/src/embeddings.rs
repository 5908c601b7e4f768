//! The embeddings blob: image embeddings keyed by (model hash, image hash), reusable across jobs.
//!
//! Layout: one JSON header line `{"format":"twin-embeddings/1","model_hash":…,"dim":…,"rows":…}`,
//! then `rows` records of 32 bytes of image SHA-256 followed by `dim` little-endian f32s, sorted
//! by image hash. Binary rather than JSON because a 100k-image dataset at dimension 768 is 300 MB
//! of floats; the header keeps it self-describing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use twin_core::BlobHash;

pub const FORMAT: &str = "twin-embeddings/1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Header {
    format: String,
    model_hash: String,
    dim: usize,
    rows: usize,
}

/// Embeddings of one model, by image.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingTable {
    pub model_hash: String,
    pub dim: usize,
    pub rows: BTreeMap<BlobHash, Vec<f32>>,
}

impl EmbeddingTable {
    pub fn new(model_hash: &str, dim: usize) -> Self {
        Self {
            model_hash: model_hash.to_owned(),
            dim,
            rows: BTreeMap::new(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let header = Header {
            format: FORMAT.into(),
            model_hash: self.model_hash.clone(),
            dim: self.dim,
            rows: self.rows.len(),
        };
        let mut out = serde_json::to_vec(&header).expect("headers serialise");
        out.push(b'\n');
        out.reserve(self.rows.len() * (32 + 4 * self.dim));
        for (hash, v) in &self.rows {
            out.extend_from_slice(&hash.0);
            for x in v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let nl = bytes
            .iter()
            .position(|b| *b == b'\n')
            .ok_or("embeddings blob: no header line")?;
        let header: Header = serde_json::from_slice(&bytes[..nl])
            .map_err(|e| format!("embeddings blob: bad header: {e}"))?;
        if header.format != FORMAT {
            return Err(format!(
                "embeddings blob: format {:?}, expected {FORMAT}",
                header.format
            ));
        }
        let body = &bytes[nl + 1..];
        let record = 32 + 4 * header.dim;
        if header.dim == 0 || body.len() != record * header.rows {
            return Err(format!(
                "embeddings blob: {} bytes of records, expected {} rows of dimension {}",
                body.len(),
                header.rows,
                header.dim
            ));
        }
        let mut rows = BTreeMap::new();
        for rec in body.chunks_exact(record) {
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&rec[..32]);
            let v = rec[32..]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            rows.insert(BlobHash(hash), v);
        }
        Ok(Self {
            model_hash: header.model_hash,
            dim: header.dim,
            rows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_truncation() {
        let mut t = EmbeddingTable::new("abc", 3);
        t.rows.insert(BlobHash::of(b"x"), vec![1.0, -2.5, 3.25]);
        t.rows
            .insert(BlobHash::of(b"y"), vec![0.0, 0.5, f32::MIN_POSITIVE]);
        let bytes = t.encode();
        assert_eq!(EmbeddingTable::decode(&bytes), Ok(t));
        let err = EmbeddingTable::decode(&bytes[..bytes.len() - 1]).unwrap_err();
        assert!(err.contains("expected 2 rows"), "{err}");
    }
}
