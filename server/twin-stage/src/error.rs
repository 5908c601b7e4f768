//! A stage's failure: a code from twin-core's closed list, a message for people, a detail for
//! programs, and whether another attempt may succeed.

use twin_core::FailureCode;

/// Why a job attempt failed. The runtime reports `code`, `detail` and `retryable` with the
/// message; the server retries retryable failures with backoff while attempts remain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StageError {
    pub code: FailureCode,
    pub message: String,
    /// For programs: a module's own error code, the request that failed.
    pub detail: Option<String>,
    pub retryable: bool,
}

impl StageError {
    /// A failure of `code`, retryable when that code is by default
    /// ([`FailureCode::retryable_by_default`]).
    pub fn new(code: FailureCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            detail: None,
            retryable: code.retryable_by_default(),
        }
    }

    /// The spec, the data or a file it names cannot be used.
    pub fn bad_input(message: impl Into<String>) -> Self {
        Self::new(FailureCode::BadInput, message)
    }

    /// The device or host ran out of memory; the message should say which size to lower.
    pub fn out_of_memory(message: impl Into<String>) -> Self {
        Self::new(FailureCode::OutOfMemory, message)
    }

    /// A checkpoint did not load, or failed while running.
    pub fn model(message: impl Into<String>) -> Self {
        Self::new(FailureCode::ModelError, message)
    }

    /// A Wasm module failed; `module_code` is the module host's own code for it
    /// (`out_of_fuel`, `guest_trap`, …), kept as the detail so programs need not parse messages.
    pub fn module(module_code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(FailureCode::ModuleError, message).with_detail(module_code)
    }

    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(FailureCode::Timeout, message)
    }

    /// Something the stage needs (the server, its blob store, a device) is not there now;
    /// retryable.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(FailureCode::Unavailable, message)
    }

    /// An invariant of twin broke: a bug.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(FailureCode::Internal, message)
    }

    /// The stage stopped because it was asked to. The code is never seen: the server ends a job
    /// whose cancellation was requested as cancelled whatever the report says, and a stage
    /// stopped because its lease was lost reports nothing.
    pub fn cancelled() -> Self {
        Self::unavailable("cancelled").retryable(false)
    }

    /// Overrides the code's default (a model error caused by a busy device may pass).
    #[must_use]
    pub fn retryable(mut self, retryable: bool) -> Self {
        self.retryable = retryable;
        self
    }

    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// The same failure, its message prefixed with where it happened (`"spec.model: …"`).
    #[must_use]
    pub fn context(mut self, prefix: impl std::fmt::Display) -> Self {
        self.message = format!("{prefix}: {}", self.message);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryability_follows_the_code_unless_overridden() {
        assert!(!StageError::bad_input("x").retryable);
        assert!(!StageError::out_of_memory("x").retryable);
        assert!(!StageError::model("x").retryable);
        assert!(!StageError::internal("x").retryable);
        assert!(StageError::unavailable("x").retryable);
        assert!(StageError::timeout("x").retryable);
        assert!(StageError::model("busy").retryable(true).retryable);
        assert!(!StageError::cancelled().retryable);
    }

    #[test]
    fn a_module_failure_keeps_the_modules_code_as_detail() {
        let e = StageError::module("out_of_fuel", "reward module m failed").context("term a");
        assert_eq!(e.code, FailureCode::ModuleError);
        assert_eq!(e.detail.as_deref(), Some("out_of_fuel"));
        assert_eq!(e.to_string(), "term a: reward module m failed");
    }
}
