//! Fault injection for end-to-end tests, switched on by environment variables that nothing sets
//! in production. Both act on the executor process whose environment has them.
//!
//! - `TWIN_FAULT_STALL_AFTER=<artefact>`: once a stage has recorded that artefact (a phase's
//!   name such as `neighbours`, or a checkpoint such as `answers.partial`), it stops making
//!   progress until it is cancelled, so a test can kill the executor at a known phase boundary
//!   and check that the next attempt resumes there. Called by [`crate::StageContext`] after
//!   every artefact it records.
//! - `TWIN_FAULT_ABORT_IN=<job kind>`: the executor process calls `std::process::abort()` when a
//!   job of that kind (`eval`, `build-dataset`, …) starts running, before its stage sees it, so a
//!   test can check what a stage that takes its process down costs the job and the server.
//!   Called by the executor's runtime where it invokes a stage.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use twin_core::JobKind;

const STALL_AFTER: &str = "TWIN_FAULT_STALL_AFTER";
const ABORT_IN: &str = "TWIN_FAULT_ABORT_IN";

/// Stalls (until `cancel` is raised) when `TWIN_FAULT_STALL_AFTER` names `artefact`.
pub fn stall_after(artefact: &str, cancel: &AtomicBool) {
    if std::env::var(STALL_AFTER).as_deref() == Ok(artefact) {
        tracing::warn!(artefact, "{STALL_AFTER}: stalling this job");
        while !cancel.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Aborts the process when `TWIN_FAULT_ABORT_IN` names `kind`.
pub fn abort_in(kind: JobKind) {
    if std::env::var(ABORT_IN).as_deref() == Ok(kind.as_str()) {
        tracing::error!(
            kind = kind.as_str(),
            "{ABORT_IN}: aborting the executor process"
        );
        std::process::abort();
    }
}
