//! Errors of the ML layer, each naming what was wrong (a tensor, a file, a config key).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum MlError {
    #[error("checkpoint {dir}: missing tensor `{name}`")]
    MissingTensor { dir: PathBuf, name: String },
    #[error("checkpoint {dir}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    WrongShape {
        dir: PathBuf,
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("unsupported architecture {found:?} in {path}: expected one of {supported}")]
    UnsupportedArchitecture {
        path: PathBuf,
        found: String,
        supported: String,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    /// A weights file that cannot be read as safetensors: a bad header, a truncated body, or
    /// a shard that does not hold what its index says.
    #[error("corrupt weights file {path}: {message}")]
    CorruptWeights { path: PathBuf, message: String },
    #[error("image {name}: {message}")]
    Image { name: String, message: String },
    #[error("CUDA was requested but is not available on this machine: {0}")]
    CudaUnavailable(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("embedding row {row} is a zero vector: it has no direction to normalise")]
    ZeroEmbedding { row: usize },
    #[error("embedding row {row} holds a NaN or infinite value")]
    NonFiniteEmbedding { row: usize },
    #[error("could not start a thread pool: {0}")]
    ThreadPool(String),
    #[error("{0}")]
    Invalid(String),
}

impl MlError {
    pub fn io(path: impl Into<PathBuf>, e: impl std::fmt::Display) -> Self {
        MlError::Io {
            path: path.into(),
            message: e.to_string(),
        }
    }
    pub fn corrupt(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        MlError::CorruptWeights {
            path: path.into(),
            message: message.into(),
        }
    }
    pub fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        MlError::Config {
            path: path.into(),
            message: message.into(),
        }
    }
}
