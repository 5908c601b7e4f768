//! twin's WebAssembly host: loads reward and filter components and runs them sandboxed.
//!
//! This is the only crate that imports wasmtime. A [`Host`] owns one engine (Cranelift, the
//! pooling allocator, fuel and epoch interruption), a private disk cache of compiled modules keyed
//! by the module's SHA-256 and the engine's fingerprint and checked before loading, and a table of
//! loaded modules. Each call gets a fresh store with its own fuel, deadline and memory/table
//! limits, and WASI with nothing granted; traps come back as typed [`PluginError`]s and outputs
//! are validated before use.

mod bindings;
mod cache;
pub mod capability;
mod clock;
mod compile;
mod error;
mod host;
pub mod types;

pub use cache::user_cache_dir;
pub use capability::{CapabilityCall, Grants};
pub use compile::{Compiler, compile_main};
pub use error::PluginError;
pub use host::{Host, HostConfig, Limits, MAX_TRANSFER_BYTES, Module, Outcome};
pub use types::{
    CandidatePair, Descriptor, MAX_ROLLOUT_LINE_BYTES, ModuleKind, QuestionType, RewardScore,
    Rollout, RolloutLines, Verdict, parse_rollouts, rollout_lines,
};

/// The WIT package every module must target.
pub const WIT_PACKAGE: &str = "twin:plugin@0.1.0";

/// Hex SHA-256 of a module's bytes: its identity everywhere (registry, cache, events).
pub fn module_hash(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
