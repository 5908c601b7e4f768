//! How a phase's artefact becomes bytes and back: JSON, JSON lines, or a type's own encoding.
//!
//! An artefact outlives the executor that wrote it (a re-leased job reads it on another
//! machine, perhaps of a newer version), so decoding is fallible and a failure is not fatal:
//! the phase simply runs again.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Encodes and decodes one phase's value.
pub trait Codec<T> {
    fn encode(&self, value: &T) -> Result<Vec<u8>, String>;
    fn decode(&self, bytes: &[u8]) -> Result<T, String>;
}

/// One JSON document.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl<T: Serialize + DeserializeOwned> Codec<T> for Json {
    fn encode(&self, value: &T) -> Result<Vec<u8>, String> {
        serde_json::to_vec(value).map_err(|e| e.to_string())
    }

    fn decode(&self, bytes: &[u8]) -> Result<T, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

/// A list as one JSON document per line: the layout people and `twin` read record blobs in
/// (samples, candidates). Blank lines are skipped when reading.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonLines;

impl<T: Serialize + DeserializeOwned> Codec<Vec<T>> for JsonLines {
    fn encode(&self, items: &Vec<T>) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        for item in items {
            serde_json::to_writer(&mut out, item).map_err(|e| e.to_string())?;
            out.push(b'\n');
        }
        Ok(out)
    }

    fn decode(&self, bytes: &[u8]) -> Result<Vec<T>, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_owned())?;
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("line {}: {e}", i + 1)))
            .collect()
    }
}

/// A type's own byte layout (e.g. the mine stage's binary embedding table).
#[derive(Debug, Clone, Copy)]
pub struct Custom<E, D> {
    encode: E,
    decode: D,
}

/// A codec from an encoding function and its inverse.
pub fn custom<T, E, D>(encode: E, decode: D) -> Custom<E, D>
where
    E: Fn(&T) -> Vec<u8>,
    D: Fn(&[u8]) -> Result<T, String>,
{
    Custom { encode, decode }
}

impl<T, E, D> Codec<T> for Custom<E, D>
where
    E: Fn(&T) -> Vec<u8>,
    D: Fn(&[u8]) -> Result<T, String>,
{
    fn encode(&self, value: &T) -> Result<Vec<u8>, String> {
        Ok((self.encode)(value))
    }

    fn decode(&self, bytes: &[u8]) -> Result<T, String> {
        (self.decode)(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_round_trip_and_name_the_bad_line() {
        let items = vec![serde_json::json!({"a": 1}), serde_json::json!("two")];
        let bytes = JsonLines.encode(&items).unwrap();
        assert_eq!(bytes, b"{\"a\":1}\n\"two\"\n");
        let back: Vec<serde_json::Value> = JsonLines.decode(&bytes).unwrap();
        assert_eq!(back, items);
        let err = Codec::<Vec<u32>>::decode(&JsonLines, b"1\n\nx\n").unwrap_err();
        assert!(err.starts_with("line 3:"), "{err}");
    }

    #[test]
    fn a_custom_codec_uses_the_types_own_layout() {
        let codec = custom(
            |v: &u32| v.to_le_bytes().to_vec(),
            |b: &[u8]| {
                <[u8; 4]>::try_from(b)
                    .map(u32::from_le_bytes)
                    .map_err(|_| format!("{} bytes, expected 4", b.len()))
            },
        );
        assert_eq!(codec.decode(&codec.encode(&7).unwrap()), Ok(7));
        assert_eq!(codec.decode(b"abc"), Err("3 bytes, expected 4".into()));
    }
}
