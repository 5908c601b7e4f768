//! Host capabilities: functions beyond WASI that a job may grant to a module, each call recorded.
//!
//! A module declares a capability by importing its interface; the host refuses to run it unless
//! the job's [`Grants`] name that capability, and records every call (input and output) so an
//! audit sees exactly what outside information a score depended on.

use serde::{Deserialize, Serialize};

/// The interface name of the `lookup` capability.
pub const LOOKUP: &str = "twin:plugin/lookup@0.1.0";

/// Most capability calls in one module call: sixteen for each rollout of the largest batch
/// (`twin_core::score::MAX_BATCH`). Every call is kept for the audit log, so the log is capped.
pub const MAX_CALLS: usize = 16 * twin_core::score::MAX_BATCH as usize;
/// Most bytes of inputs and outputs in the calls of one module call (a lookup table itself is
/// capped at 4 MiB).
pub const MAX_CALL_BYTES: usize = 16 << 20;

/// Capabilities a job grants: the job spec's own type, so nothing converts between the two.
pub use twin_core::score::Grants;

/// Short capability name for an interface name ("twin:plugin/lookup@0.1.0" → "lookup").
pub fn short_name(interface: &str) -> &str {
    let tail = interface.rsplit('/').next().unwrap_or(interface);
    tail.split('@').next().unwrap_or(tail)
}

/// Interfaces of capabilities this host implements.
pub fn known(interface: &str) -> bool {
    interface == LOOKUP
}

/// One recorded capability call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityCall {
    pub capability: String,
    pub input: String,
    pub output: Option<String>,
}
