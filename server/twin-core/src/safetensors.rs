//! The safetensors header: an 8-byte little-endian length, then that many bytes of JSON naming
//! each tensor's dtype, shape and byte range in the data that follows.
//!
//! The header is parsed here, on bytes, rather than in `twin-ml` next to the file reads: it is
//! untrusted input (a registered model is anyone's upload) and a pure function of its bytes can be
//! fuzzed without linking libtorch (`fuzz/fuzz_targets/safetensors_header.rs`). `twin-ml` reads
//! the first 8 bytes, asks [`header_len`] how many more to read, and hands them to
//! [`parse_header`]; every error is a sentence the caller prefixes with the file's path.
//!
//! What an accepted header promises: every tensor's byte range lies inside the file's data and
//! holds exactly `elements × dtype size` bytes, and the product of its dimensions fits an `i64`
//! in any order of multiplication, so callers can compute sizes without overflow checks.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::Deserialize;

/// Headers larger than this are refused rather than allocated (the safetensors crate's limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The header key that holds free-form metadata rather than a tensor.
pub const METADATA_KEY: &str = "__metadata__";

/// The element types twin reads and writes, with their safetensors names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    /// The dtype a header names, or `None` for one twin does not read (F8, U16, ...).
    pub fn parse(name: &str) -> Option<Dtype> {
        Some(match name {
            "F64" => Dtype::F64,
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I64" => Dtype::I64,
            "I32" => Dtype::I32,
            "I16" => Dtype::I16,
            "I8" => Dtype::I8,
            "U8" => Dtype::U8,
            "BOOL" => Dtype::Bool,
            _ => return None,
        })
    }

    /// The name a header writes.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::F64 => "F64",
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::I16 => "I16",
            Dtype::I8 => "I8",
            Dtype::U8 => "U8",
            Dtype::Bool => "BOOL",
        }
    }

    /// Bytes one element takes.
    pub fn size_in_bytes(self) -> u64 {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }
}

/// One tensor of a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub dtype: Dtype,
    /// Dimensions, each at most `i64::MAX` (libtorch's sizes are `i64`).
    pub shape: Vec<i64>,
    /// Byte range of the data inside the file (the 8 bytes and the header included in the count).
    pub range: Range<u64>,
}

/// Why a header was refused, as a sentence to follow the file's path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HeaderError(pub String);

/// The header's length from the file's first bytes (`first`: up to 8 of them), checked against
/// the file's length and [`MAX_HEADER_BYTES`] before anything that size is allocated.
pub fn header_len(file_len: u64, first: &[u8]) -> Result<u64, HeaderError> {
    let prefix: [u8; 8] = match first.get(..8) {
        Some(prefix) if file_len >= 8 => prefix.try_into().expect("a slice of 8 bytes"),
        _ => {
            return Err(HeaderError(format!(
                "{file_len} bytes is too short for a safetensors header"
            )));
        }
    };
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_HEADER_BYTES || header_len > file_len - 8 {
        return Err(HeaderError(format!(
            "truncated or not safetensors: the header claims {header_len} bytes, the file holds {file_len}"
        )));
    }
    Ok(header_len)
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// Parses the JSON `header` of a file of `file_len` bytes (`header.len()` as [`header_len`]
/// returned it): its tensors by name, each checked to lie inside the file.
pub fn parse_header(
    file_len: u64,
    header: &[u8],
) -> Result<BTreeMap<String, TensorEntry>, HeaderError> {
    let data_start = 8 + header.len() as u64;
    let data_len = file_len.checked_sub(data_start).ok_or_else(|| {
        HeaderError(format!(
            "truncated: a {}-byte header does not fit a file of {file_len} bytes",
            header.len()
        ))
    })?;
    let entries: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header)
        .map_err(|e| HeaderError(format!("the header is not valid JSON: {e}")))?;
    let mut tensors = BTreeMap::new();
    for (name, entry) in entries {
        if name == METADATA_KEY {
            continue;
        }
        let raw: RawEntry = serde_json::from_value(entry)
            .map_err(|e| HeaderError(format!("tensor `{name}`: {e}")))?;
        let dtype = Dtype::parse(&raw.dtype).ok_or_else(|| {
            HeaderError(format!(
                "tensor `{name}` has unsupported dtype {}",
                raw.dtype
            ))
        })?;
        let shape = checked_shape(&raw.shape).ok_or_else(|| {
            HeaderError(format!(
                "tensor `{name}`: shape {:?} has more elements than a tensor can hold",
                raw.shape
            ))
        })?;
        let numel = shape.iter().map(|&d| d as u64).product::<u64>();
        let bytes = numel.checked_mul(dtype.size_in_bytes());
        let [begin, end] = raw.data_offsets;
        if bytes.is_none() || end < begin || Some(end - begin) != bytes {
            return Err(HeaderError(format!(
                "tensor `{name}`: data offsets {begin}..{end} do not fit shape {:?} of {}",
                raw.shape, raw.dtype
            )));
        }
        if end > data_len {
            return Err(HeaderError(format!(
                "truncated: tensor `{name}` ends at byte {end} of the data, the file holds {data_len} bytes of data"
            )));
        }
        tensors.insert(
            name,
            TensorEntry {
                dtype,
                shape,
                range: data_start + begin..data_start + end,
            },
        );
    }
    Ok(tensors)
}

/// A whole file held in memory: [`header_len`] then [`parse_header`].
pub fn parse_file(file: &[u8]) -> Result<BTreeMap<String, TensorEntry>, HeaderError> {
    let file_len = file.len() as u64;
    let header_len = header_len(file_len, file)?;
    // `header_len` checked `8 + header_len <= file_len`.
    parse_header(file_len, &file[8..8 + header_len as usize])
}

/// The shape as `i64`s when the product of its non-zero dimensions fits an `i64`: then every
/// partial product does too, whatever the order, so `shape.iter().product::<i64>()` cannot
/// overflow in a caller. (A zero dimension makes the count 0 but would let `[0, 2^62, 2^62]`
/// pass a left-to-right check and overflow a caller that multiplies in another order.)
fn checked_shape(shape: &[u64]) -> Option<Vec<i64>> {
    let max = i64::MAX as u64;
    shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1u64, |acc, &d| acc.checked_mul(d).filter(|&n| n <= max))?;
    Some(shape.iter().map(|&d| d as i64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data, 0);
        bytes
    }

    #[test]
    fn a_valid_header_gives_each_tensor_its_range_in_the_file() {
        let header = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},"a":{"dtype":"F32","shape":[],"data_offsets":[12,16]}}"#;
        let tensors = parse_file(&file(header, 16)).expect("valid");
        let start = 8 + header.len() as u64;
        assert_eq!(
            tensors["b"],
            TensorEntry {
                dtype: Dtype::BF16,
                shape: vec![2, 3],
                range: start..start + 12
            }
        );
        assert_eq!(tensors["a"].range, start + 12..start + 16);
        assert_eq!(tensors.len(), 2);
    }

    #[test]
    fn bad_headers_are_errors_that_say_why() {
        let check = |bytes: &[u8], expect: &str| {
            let err = parse_file(bytes).expect_err("refused");
            assert!(err.0.contains(expect), "{err} should mention {expect:?}");
        };
        check(b"1234", "too short");
        check(&u64::MAX.to_le_bytes(), "the header claims");
        check(&file("{", 0), "not valid JSON");
        check(
            &file(
                r#"{"x":{"dtype":"F8","shape":[1],"data_offsets":[0,1]}}"#,
                1,
            ),
            "unsupported dtype",
        );
        check(
            &file(
                r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                8,
            ),
            "do not fit shape",
        );
        check(
            &file(
                r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                4,
            ),
            "truncated",
        );
    }

    #[test]
    fn a_shape_whose_size_overflows_in_some_order_is_refused() {
        // Zero elements, so the offsets match, but a caller multiplying the dimensions as i64
        // would overflow (and 2^63 is no i64 at all): `bytes_as` panicked in a debug build.
        for shape in [
            "[0,4611686018427387904,4611686018427387904]",
            "[0,9223372036854775808]",
        ] {
            let header =
                format!(r#"{{"x":{{"dtype":"F32","shape":{shape},"data_offsets":[0,0]}}}}"#);
            let err = parse_file(&file(&header, 0)).expect_err("refused");
            assert!(err.0.contains("more elements"), "{err}");
        }
        let header =
            r#"{"x":{"dtype":"F32","shape":[0,9223372036854775807],"data_offsets":[0,0]}}"#;
        assert_eq!(
            parse_file(&file(header, 0)).expect("fits")["x"].shape,
            vec![0, i64::MAX]
        );
    }
}
