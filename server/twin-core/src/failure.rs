//! The closed list of failure codes a job attempt can end with, beside its free-text message.
//!
//! A program that reads the log (the CLI, a scheduler, a dashboard) classifies failures by this
//! code, never by parsing messages. The list is closed on purpose: a new code is a schema change
//! that every reader learns about, not a string a stage invents.

use serde::{Deserialize, Serialize};

/// Why an attempt failed. The message says what happened; the code says what kind of thing it was.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum FailureCode {
    /// The spec, the data or a file it names cannot be used; retrying the same job cannot help.
    BadInput,
    /// The device (or host) ran out of memory; the message says which size to lower.
    OutOfMemory,
    /// A model checkpoint could not be loaded or failed while running.
    ModelError,
    /// A Wasm module (reward, filter, scorer) failed; the detail carries the module's own code.
    ModuleError,
    /// The attempt ran past its time limit.
    Timeout,
    /// The executor running the attempt died or stopped answering (its lease expired).
    ExecutorLost,
    /// A service the stage needs (the server, the blob store, a busy device) was unavailable;
    /// retryable by nature.
    Unavailable,
    /// A bug in twin: an invariant broke. The message is for a bug report.
    Internal,
    /// Recorded before failure codes existed (schema version 1 of `job_attempt_failed`), or
    /// reported by an executor that sent no code.
    Unclassified,
}

impl FailureCode {
    /// Every code, in declaration order (for documentation and exhaustive tests).
    pub const ALL: [FailureCode; 9] = [
        FailureCode::BadInput,
        FailureCode::OutOfMemory,
        FailureCode::ModelError,
        FailureCode::ModuleError,
        FailureCode::Timeout,
        FailureCode::ExecutorLost,
        FailureCode::Unavailable,
        FailureCode::Internal,
        FailureCode::Unclassified,
    ];

    /// The code as it appears in JSON, events and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureCode::BadInput => "bad_input",
            FailureCode::OutOfMemory => "out_of_memory",
            FailureCode::ModelError => "model_error",
            FailureCode::ModuleError => "module_error",
            FailureCode::Timeout => "timeout",
            FailureCode::ExecutorLost => "executor_lost",
            FailureCode::Unavailable => "unavailable",
            FailureCode::Internal => "internal",
            FailureCode::Unclassified => "unclassified",
        }
    }

    /// Whether another attempt of the same job can succeed without anyone changing anything.
    /// Stages may override it per failure (a model error caused by a busy device is retryable).
    pub fn retryable_by_default(self) -> bool {
        matches!(
            self,
            FailureCode::Unavailable | FailureCode::ExecutorLost | FailureCode::Timeout
        )
    }
}

impl std::fmt::Display for FailureCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_name_is_the_display_name() {
        for code in FailureCode::ALL {
            let json = serde_json::to_value(code).expect("codes serialise");
            assert_eq!(json, serde_json::Value::String(code.as_str().to_owned()));
            let back: FailureCode = serde_json::from_value(json).expect("codes deserialise");
            assert_eq!(back, code);
        }
    }
}
