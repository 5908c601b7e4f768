//! Helpers for the end-to-end tests: start the real `twin-server` and `twin-executor` binaries on
//! a loopback port, run the real `twin` CLI, send signals.
//!
//! The binaries come from the workspace's target directory (`cargo build --bins` first; the
//! README's test command does), or from `TWIN_BIN_DIR`.

#![allow(clippy::unwrap_used)] // test support: a failure here should stop the test loudly

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Path of a workspace binary.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("TWIN_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // target/<profile>/deps/<test binary> → target/<profile>
            let exe = std::env::current_exe().unwrap();
            exe.parent().and_then(Path::parent).unwrap().to_path_buf()
        });
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first (or set TWIN_BIN_DIR)",
        path.display()
    );
    path
}

/// A running `twin-server serve`.
pub struct Server {
    child: Child,
    pub url: String,
    pub data_dir: PathBuf,
}

impl Server {
    /// Starts a server on a free loopback port and waits until it answers.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Self::start_with_env(data_dir, extra, &[])
    }

    /// Starts a server with extra environment variables, which its executor child inherits
    /// (fault injection).
    pub fn start_with_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(bin("twin-server"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("twin-server listening on ") {
                    let _ = tx.send(url.to_owned());
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!("twin-server did not start within 30 s (see its stderr above)");
            }
        };
        Server {
            child,
            url,
            data_dir: data_dir.to_owned(),
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(mut self) {
        let _ = kill(self.pid(), Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) {
        let _ = kill(self.pid(), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    assert!(status.success(), "twin-server exited with {status}");
                    return;
                }
                _ if Instant::now() > deadline => {
                    panic!("twin-server did not stop within 20 s of SIGTERM")
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A standalone `twin-executor`.
pub struct ExecutorProcess(Child);

impl ExecutorProcess {
    pub fn start(server: &str, name: &str) -> Self {
        Self::start_with_env(server, name, &[])
    }

    /// Starts an executor with extra environment variables (fault injection, limits).
    pub fn start_with_env(server: &str, name: &str, env: &[(&str, &str)]) -> Self {
        Self::start_with_args(server, name, &[], env)
    }

    /// Starts an executor with extra flags and environment variables.
    pub fn start_with_args(server: &str, name: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(bin("twin-executor"));
        if !args.contains(&"--model-store") {
            // Not the user's cache: a store of this test run's own.
            cmd.env(
                "TWIN_MODEL_STORE",
                std::env::temp_dir().join(format!("twin-e2e-model-store-{}", std::process::id())),
            );
        }
        if !args.contains(&"--allowed-root") {
            // Tests name images and checkpoints in their temporary directories by path; an
            // executor reads no paths without roots.
            cmd.arg("--allowed-root").arg(std::env::temp_dir());
        }
        let child = cmd
            .args(["--server", server, "--name", name])
            .args(args)
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        ExecutorProcess(child)
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.0.id() as i32)
    }

    pub fn kill(mut self) {
        let _ = self.0.kill(); // SIGKILL
        let _ = self.0.wait();
    }

    /// SIGTERM, then waits up to `limit` for the exit status.
    pub fn terminate(mut self, limit: Duration) -> std::process::ExitStatus {
        let _ = kill(self.pid(), Signal::SIGTERM);
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.0.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "twin-executor did not exit within {limit:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to `limit` for the process to exit on its own.
    pub fn wait_exit(mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.0.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "twin-executor did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ExecutorProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `twin` with arguments; returns its output.
pub fn twin(args: &[&str]) -> Output {
    Command::new(bin("twin"))
        .args(args)
        .env_remove("TWIN_TOKEN")
        .output()
        .unwrap()
}

pub fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `f` every 50 ms until it returns `Some` or `limit` passes.
pub fn eventually<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes an ingest spec for `dir` and returns its path.
pub fn ingest_spec(at: &Path, dataset: &str, dir: &Path) -> PathBuf {
    let spec =
        serde_json::json!({"spec": {"kind": "ingest", "dataset": dataset, "source": {"dir": dir}}});
    let path = at.join(format!("{dataset}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    path
}
