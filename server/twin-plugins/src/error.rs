//! Every way loading or running a module can fail, as one typed error.
//!
//! Traps are classified (fuel, deadline, memory, stack, guest trap) so a job's failure says which
//! limit a module hit; `code()` gives each variant a stable name for APIs and events.

use std::time::Duration;

/// Why a module could not be loaded or a call did not produce a valid result.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PluginError {
    #[error("module is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: u64, limit: u64 },
    #[error("not a WebAssembly component: {0}")]
    NotWasm(String),
    #[error("invalid component: {0}")]
    Invalid(String),
    #[error("compilation took longer than {0:?} and was stopped")]
    CompileTimeout(Duration),
    #[error("the compiler process failed: {0}")]
    CompilerFailed(String),
    #[error("module exports neither the twin:plugin@0.1.0 reward world nor the filter world: {0}")]
    WorldMismatch(String),
    #[error("module imports {import}, which this host does not provide")]
    UnknownImport { import: String },
    #[error("module imports the {capability} capability, which the job does not grant")]
    NotGranted { capability: String },
    #[error("module is a {actual} module, but a {expected} module was needed")]
    WrongKind { expected: String, actual: String },
    #[error("module ran out of fuel ({fuel} units) before finishing the call")]
    OutOfFuel { fuel: u64 },
    #[error("module passed its {0:?} deadline")]
    Deadline(Duration),
    #[error("module tried to grow {what} past the limit of {limit}")]
    MemoryLimit { what: &'static str, limit: u64 },
    #[error("module overflowed its stack")]
    StackOverflow,
    #[error("module trapped: {trap}{}", stderr_suffix(.stderr))]
    GuestTrap { trap: String, stderr: String },
    #[error("module returned an error: {0}")]
    GuestError(String),
    #[error("module rejected its parameters: {0}")]
    BadParams(String),
    #[error("module returned an invalid result: {0}")]
    BadOutput(String),
    #[error("host error: {0}")]
    Host(String),
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.trim().is_empty() {
        String::new()
    } else {
        format!(" (stderr: {})", stderr.trim())
    }
}

impl From<twin_core::module_output::BadOutput> for PluginError {
    fn from(e: twin_core::module_output::BadOutput) -> Self {
        PluginError::BadOutput(e.0)
    }
}

impl PluginError {
    /// A stable snake_case name for the variant, used in API error bodies and events.
    pub fn code(&self) -> &'static str {
        match self {
            PluginError::TooLarge { .. } => "module_too_large",
            PluginError::NotWasm(_) => "not_wasm",
            PluginError::Invalid(_) => "invalid_module",
            PluginError::CompileTimeout(_) => "compile_timeout",
            PluginError::CompilerFailed(_) => "compiler_failed",
            PluginError::WorldMismatch(_) => "world_mismatch",
            PluginError::UnknownImport { .. } => "unknown_import",
            PluginError::NotGranted { .. } => "capability_not_granted",
            PluginError::WrongKind { .. } => "wrong_module_kind",
            PluginError::OutOfFuel { .. } => "out_of_fuel",
            PluginError::Deadline(_) => "deadline_exceeded",
            PluginError::MemoryLimit { .. } => "memory_limit",
            PluginError::StackOverflow => "stack_overflow",
            PluginError::GuestTrap { .. } => "guest_trap",
            PluginError::GuestError(_) => "guest_error",
            PluginError::BadParams(_) => "bad_params",
            PluginError::BadOutput(_) => "bad_output",
            PluginError::Host(_) => "host_error",
        }
    }

    /// True for problems with the module file itself (an upload should be refused with 4xx).
    pub fn is_module_fault(&self) -> bool {
        !matches!(self, PluginError::Host(_) | PluginError::CompilerFailed(_))
    }

    /// What kind of failure this is for a job that ran the module: the module's own fault is
    /// `module_error` (with [`Self::code`] as its detail); the host's trouble (a pool exhausted,
    /// I/O) may pass, so it is `unavailable`; a compiler child that fails is a bug.
    pub fn failure_code(&self) -> twin_core::FailureCode {
        match self {
            PluginError::Host(_) => twin_core::FailureCode::Unavailable,
            PluginError::CompilerFailed(_) => twin_core::FailureCode::Internal,
            _ => twin_core::FailureCode::ModuleError,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twin_core::FailureCode;

    #[test]
    fn a_modules_own_fault_is_a_module_error_and_the_hosts_trouble_is_not() {
        assert_eq!(
            PluginError::OutOfFuel { fuel: 1 }.failure_code(),
            FailureCode::ModuleError
        );
        assert_eq!(
            PluginError::BadParams("x".into()).failure_code(),
            FailureCode::ModuleError
        );
        assert_eq!(
            PluginError::Host("pool exhausted".into()).failure_code(),
            FailureCode::Unavailable
        );
        assert_eq!(
            PluginError::CompilerFailed("signal 9".into()).failure_code(),
            FailureCode::Internal
        );
    }
}
