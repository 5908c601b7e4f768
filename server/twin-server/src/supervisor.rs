//! The server's executor child: `twin-server serve` runs `twin-executor` as a separate process,
//! restarts it when it dies, and stops it by asking it to hand its job back.
//!
//! Why a process and not a task: stages run libtorch and Wasm on untrusted inputs, and an
//! allocation abort or a segfault in a stage would otherwise take the API and the log writer with
//! it (and the re-leased job would do it again). Here a dead child costs only its job's attempt:
//! its leases are expired at once (the job goes back to the queue, counting one executor loss;
//! the third loss fails it with `executor_lost`), and a new child starts after a backoff.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::service::Service;

/// How the child is started.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    /// The `twin-executor` binary.
    pub program: PathBuf,
    /// The server URL the child talks to (loopback).
    pub server: String,
    /// Recorded in its leases; the same for every incarnation, so its leases can be found.
    pub name: String,
    /// A 0600 file holding the child's execute token; `None` when auth is off.
    pub token_file: Option<PathBuf>,
    pub gpus: Option<u32>,
    pub labels: Vec<String>,
    /// Where the child caches compiled Wasm modules.
    pub module_cache: PathBuf,
    /// Where the child keeps registered models it fetched (beside the data, not in the user's
    /// cache: the server's data directory is what its operator sized).
    pub model_store: PathBuf,
    /// The server's allowed roots, which the child shares, and the directories it must never
    /// read under them (the data directory).
    pub allowed_roots: Vec<PathBuf>,
    pub deny_roots: Vec<PathBuf>,
}

/// Restart pacing: the first restart waits `BACKOFF_INITIAL`, doubling to `BACKOFF_MAX`; a child
/// that stayed up for `HEALTHY_AFTER` resets it.
const BACKOFF_INITIAL: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// Where `twin-executor` is looked for when no path is configured: beside this binary (how
/// `cargo build` and the release archives lay them out).
pub fn default_program() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("locating twin-server's own binary")?;
    let dir = me
        .parent()
        .context("twin-server's binary has no parent directory")?;
    Ok(dir.join("twin-executor"))
}

/// Checks that `program` can be started, with a message that says what to do otherwise.
pub fn check_program(program: &Path) -> anyhow::Result<()> {
    if program.is_file() {
        return Ok(());
    }
    anyhow::bail!(
        "no executor binary at {}: build it (`cargo build -p twin-executor`), point \
         `--executor-bin` (or `executor.program` in the config) at one, or run with \
         `--no-executor` and start executors yourself",
        program.display()
    )
}

/// Writes the child's token to `path`, readable by this user only (the executor refuses a token
/// file that others can read).
pub fn write_token_file(path: &Path, token: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    // Removed first: an existing file keeps its old mode through `mode()`.
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(token.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

impl ChildSpec {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.arg("--server")
            .arg(&self.server)
            .arg("--name")
            .arg(&self.name)
            .arg("--module-cache")
            .arg(&self.module_cache)
            .arg("--model-store")
            .arg(&self.model_store)
            .arg("--parent-pid")
            .arg(std::process::id().to_string());
        if let Some(t) = &self.token_file {
            cmd.arg("--token-file").arg(t);
        }
        if let Some(g) = self.gpus {
            cmd.arg("--gpus").arg(g.to_string());
        }
        for l in &self.labels {
            cmd.arg("--label").arg(l);
        }
        for r in &self.allowed_roots {
            cmd.arg("--allowed-root").arg(r);
        }
        for d in &self.deny_roots {
            cmd.arg("--deny-root").arg(d);
        }
        // Only the roots given here: never ones the server's environment happens to carry.
        cmd.env_remove("TWIN_ALLOWED_ROOTS");
        // It talks plain HTTP to a loopback listener (see `serve`): a CA file meant for clients
        // of this server's HTTPS, perhaps unreadable to it, is none of its business.
        cmd.env_remove("TWIN_CA_FILE");
        // Its logs go where the server's go; it must not outlive a server that is killed.
        cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
        cmd
    }
}

/// Runs the child until `stop` turns true, restarting it whenever it exits on its own. On stop
/// the child gets SIGTERM (it hands its job back and exits); after `grace` it is killed.
pub async fn supervise(
    svc: Arc<Service>,
    spec: ChildSpec,
    grace: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_INITIAL;
    let mut incarnation = 0u64;
    while !*stop.borrow() {
        incarnation += 1;
        let mut child = match spec.command().spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(program = %spec.program.display(), error = %e, "cannot start the executor");
                if !sleep_or_stop(backoff, &mut stop).await {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let started = tokio::time::Instant::now();
        tracing::info!(pid = child.id(), incarnation, executor = %spec.name, "executor started");
        let status = tokio::select! {
            s = child.wait() => s,
            _ = stop.changed() => {
                stop_child(&mut child, grace).await;
                return;
            }
        };
        let lost = svc.expire_leases_of(&spec.name).await;
        match status {
            Ok(s) => tracing::warn!(status = %describe(s), requeued = ?lost, "the executor exited"),
            Err(e) => tracing::warn!(error = %e, requeued = ?lost, "lost track of the executor"),
        }
        svc.metrics.executor_restarts.inc();
        if started.elapsed() >= HEALTHY_AFTER {
            backoff = BACKOFF_INITIAL;
        }
        tracing::info!(
            retry_in_ms = backoff.as_millis() as u64,
            "restarting the executor"
        );
        if !sleep_or_stop(backoff, &mut stop).await {
            return;
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// SIGTERM, then up to `grace` for the child to hand its job back and exit, then SIGKILL.
async fn stop_child(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
            tracing::warn!(error = %e, "could not signal the executor");
        }
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(Ok(s)) => tracing::info!(status = %describe(s), "the executor stopped"),
        Ok(Err(e)) => tracing::warn!(error = %e, "waiting for the executor"),
        Err(_) => {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "the executor did not stop in time; killing it (its job is re-leased after the lease expires)"
            );
            let _ = child.kill().await;
        }
    }
}

/// Sleeps for `d`; false when `stop` turned true meanwhile.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => !*stop.borrow(),
        _ = stop.changed() => false,
    }
}

fn describe(s: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_token_file_is_private_even_when_it_existed_before() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("executor.token");
        std::fs::write(&path, "old").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        write_token_file(&path, "secret").expect("written");
        let meta = std::fs::metadata(&path).expect("metadata");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "secret");
    }

    #[test]
    fn a_missing_executor_binary_says_what_to_do() {
        let err = check_program(Path::new("/nonexistent/twin-executor")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("--executor-bin") && msg.contains("--no-executor"),
            "{msg}"
        );
    }
}
