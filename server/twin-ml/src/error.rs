//! Errors of the ML layer, each naming what was wrong (a tensor, a file, a config key).

use std::path::PathBuf;

use twin_core::FailureCode;

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
    /// libtorch could not allocate: CUDA out of memory, or the host's allocator refused.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// One request of a batch call (the generation engine's) was refused; `index` is its
    /// position in the call's requests, so a caller can name its own item without parsing text.
    #[error("request {index}: {message}")]
    Request { index: usize, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl MlError {
    /// A libtorch error, recognising allocation failures (CUDA's "out of memory", the CPU
    /// allocator's "not enough memory") so callers can say what happened and what to change.
    pub fn from_torch(e: tch::TchError) -> Self {
        let text = e.to_string();
        let lower = text.to_lowercase();
        if lower.contains("out of memory")
            || lower.contains("not enough memory")
            || lower.contains("can't allocate")
        {
            // libtorch's messages run to many lines of advice and a C++ backtrace; the first
            // line says what failed.
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or(&text);
            MlError::OutOfMemory(first.trim().to_owned())
        } else {
            MlError::Torch(e)
        }
    }

    /// [`Self::failure_code`] for an error while loading a checkpoint: the checkpoint's fault
    /// (`model_error`) unless the device ran out of memory or is not there.
    pub fn loading_failure_code(&self) -> FailureCode {
        match self.failure_code() {
            code @ (FailureCode::OutOfMemory | FailureCode::Unavailable) => code,
            _ => FailureCode::ModelError,
        }
    }

    /// Which request of a batch call failed, when the error is tied to one.
    pub fn request(&self) -> Option<usize> {
        match self {
            MlError::Request { index, .. } => Some(*index),
            _ => None,
        }
    }

    /// What kind of failure this is for a job. Callers that know more (any error while loading
    /// a checkpoint is the checkpoint's) override it.
    pub fn failure_code(&self) -> FailureCode {
        match self {
            MlError::OutOfMemory(_) => FailureCode::OutOfMemory,
            MlError::CudaUnavailable(_) => FailureCode::Unavailable,
            MlError::Image { .. } | MlError::Request { .. } | MlError::Invalid(_) => {
                FailureCode::BadInput
            }
            MlError::ThreadPool(_) => FailureCode::Internal,
            MlError::MissingTensor { .. }
            | MlError::WrongShape { .. }
            | MlError::UnsupportedArchitecture { .. }
            | MlError::Config { .. }
            | MlError::Io { .. }
            | MlError::CorruptWeights { .. }
            | MlError::Torch(_)
            | MlError::ZeroEmbedding { .. }
            | MlError::NonFiniteEmbedding { .. } => FailureCode::ModelError,
        }
    }

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
