//! Identifiers, content hashes, stream names and the millisecond timestamp used everywhere.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// Milliseconds since the Unix epoch. Passed in as data: the core never reads a clock.
pub type Millis = i64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("`{0}` is not a valid id: use 1 to 64 characters from a-z, 0-9, `-` and `_`")]
    BadId(String),
    #[error("`{0}` is not a SHA-256 hash: expected 64 lower-case hex digits")]
    BadHash(String),
    #[error(
        "`{0}` is not a stream name: expected experiment/, job/, dataset/, module/ or run/ and an id"
    )]
    BadStream(String),
}

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, utoipa::ToSchema)]
        #[serde(transparent)]
        // What `valid_id` accepts, so that generated values and clients' checks agree with it.
        #[schema(pattern = "^[a-z0-9_-]{1,64}$")]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                if valid_id(s) {
                    Ok(Self(s.to_owned()))
                } else {
                    Err(IdError::BadId(s.to_owned()))
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// A job, minted by the server at submission (a lower-case ULID).
    JobId
);
id_type!(
    /// An experiment: a named group of jobs.
    ExperimentId
);
id_type!(
    /// A dataset registered by a stage (ingest today).
    DatasetId
);

/// The name of whoever caused an event: a token's name, or `local` when auth is off.
pub type Actor = String;

/// A SHA-256 content hash. Serialises as 64 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlobHash(pub [u8; 32]);

impl BlobHash {
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobHash({})", self.to_hex())
    }
}

impl fmt::Display for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl FromStr for BlobHash {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let bad = || IdError::BadHash(s.to_owned());
        if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| bad())?;
        Ok(Self(out))
    }
}

impl Serialize for BlobHash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for BlobHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl utoipa::PartialSchema for BlobHash {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some("^[0-9a-f]{64}$"))
            .description(Some("SHA-256 of the blob's bytes, lower-case hex"))
            .into()
    }
}
impl utoipa::ToSchema for BlobHash {}

/// The stream an event belongs to. Each stream has its own version counter, which is what
/// optimistic concurrency checks against.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StreamName {
    Experiment(ExperimentId),
    Job(JobId),
    Dataset(DatasetId),
    /// A Wasm module's registration (`module/<hash>`) or a registry name's alias history
    /// (`module/<name>`); names never look like hashes, so the two cannot collide.
    Module(String),
    /// A model's registration (`model/<hash>`) or a model name's alias history (`model/<name>`).
    Model(String),
    /// A training run (arrives with the training stage).
    Run(String),
    /// Reviews of a mine job's candidates (`review/<job>`).
    Review(JobId),
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamName::Experiment(id) => write!(f, "experiment/{id}"),
            StreamName::Job(id) => write!(f, "job/{id}"),
            StreamName::Dataset(id) => write!(f, "dataset/{id}"),
            StreamName::Module(h) => write!(f, "module/{h}"),
            StreamName::Model(h) => write!(f, "model/{h}"),
            StreamName::Run(id) => write!(f, "run/{id}"),
            StreamName::Review(id) => write!(f, "review/{id}"),
        }
    }
}

impl FromStr for StreamName {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let bad = || IdError::BadStream(s.to_owned());
        let (kind, id) = s.split_once('/').ok_or_else(bad)?;
        Ok(match kind {
            "experiment" => StreamName::Experiment(id.parse().map_err(|_| bad())?),
            "job" => StreamName::Job(id.parse().map_err(|_| bad())?),
            "dataset" => StreamName::Dataset(id.parse().map_err(|_| bad())?),
            "module" if id.parse::<BlobHash>().is_ok() || crate::score::valid_module_name(id) => {
                StreamName::Module(id.to_owned())
            }
            "model" if id.parse::<BlobHash>().is_ok() || crate::model::valid_model_name(id) => {
                StreamName::Model(id.to_owned())
            }
            "run" if valid_id(id) => StreamName::Run(id.to_owned()),
            "review" => StreamName::Review(id.parse().map_err(|_| bad())?),
            _ => return Err(bad()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_only_the_documented_alphabet() {
        assert!("01jabc-x_9".parse::<JobId>().is_ok());
        for bad in ["", "UPPER", "a/b", "sp ace", &"x".repeat(65)] {
            assert!(bad.parse::<JobId>().is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn blob_hash_round_trips_and_rejects_upper_case() {
        let h = BlobHash::of(b"twin");
        assert_eq!(h.to_hex().parse::<BlobHash>(), Ok(h));
        assert!(h.to_hex().to_uppercase().parse::<BlobHash>().is_err());
        assert!("abc".parse::<BlobHash>().is_err());
    }

    #[test]
    fn stream_names_round_trip() {
        for s in ["job/01j", "experiment/e1", "dataset/d", "run/r-1"] {
            assert_eq!(
                s.parse::<StreamName>().map(|n| n.to_string()),
                Ok(s.to_owned())
            );
        }
        assert!("jobs/x".parse::<StreamName>().is_err());
        assert!("job/".parse::<StreamName>().is_err());
    }
}
