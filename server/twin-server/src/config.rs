//! Server configuration: a TOML file, overridden by command-line flags and `TWIN_*` variables.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use twin_core::JobKind;

use crate::auth::TokenConfig;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Start and supervise a `twin-executor` child (the single-machine default).
    pub embedded_executor: bool,
    pub executor: EmbeddedExecutorConfig,
    /// A lease lapses this long after its grant or last heartbeat.
    pub lease_ttl_ms: u64,
    pub max_json_bytes: usize,
    /// Largest blob accepted (`PUT /v1/blobs/{hash}` and resumable uploads); bodies are streamed
    /// to disk, so this bounds disk use, not memory.
    pub max_blob_bytes: u64,
    /// Free space blob uploads must leave on the data directory's file system, so blobs never
    /// fill the disk the event log needs: an upload that would leave less is refused with 503
    /// `storage_unavailable` (checked up front and every 64 MiB while receiving).
    pub storage_reserve_bytes: u64,
    pub tokens: Vec<TokenConfig>,
    /// Host names (no ports) the server answers to besides loopback ones while no tokens are
    /// configured: a browser page whose name was rebound to this machine is refused.
    pub allowed_hosts: Vec<String>,
    pub workers: Option<usize>,
    pub modules: ModulesConfig,
    /// Directories whose files job specs may name by path (an ingest's `source.dir`, an eval's
    /// `data.questions`, a model directory). None by default: specs name uploaded blobs, which
    /// `twin submit` sends. With roots, paths are checked at submission (400 `invalid_spec`) and
    /// the embedded executor reads under the same roots; the data directory is never allowed.
    pub allowed_roots: Vec<PathBuf>,
    /// Seconds one attempt of a job of a kind may run (from its lease) before it fails with
    /// `timeout`, by kind (`eval = 7200`); 0 turns a kind's limit off. Kinds not named keep the
    /// defaults of [`ServerConfig::job_timeouts`].
    pub job_timeouts_s: BTreeMap<JobKind, u64>,
    /// Long polls and event streams held at once, in all and per token without the `execute`
    /// role (429 `too_many_waiters` beyond).
    pub max_waiters: usize,
    pub max_waiters_per_token: usize,
    /// PEM certificate chain and private key: with both set the API is served over HTTPS only
    /// (see [`crate::tls`]).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// The Wasm module registry and host.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModulesConfig {
    /// Largest module accepted for upload.
    pub max_module_bytes: u64,
    /// Compilation (in a child process) is stopped after this long.
    pub compile_timeout_ms: u64,
    /// Compiled modules; defaults to `<data_dir>/module-cache`. Its files are loaded as native
    /// code, so it must be this user's own directory, writable by nobody else (the Wasm host
    /// creates it 0700 and refuses one that is not).
    pub cache_dir: Option<PathBuf>,
}

impl Default for ModulesConfig {
    fn default() -> Self {
        Self {
            max_module_bytes: 64 << 20,
            compile_timeout_ms: 120_000,
            cache_dir: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedExecutorConfig {
    pub name: String,
    /// GPUs offered to jobs; unset = the CUDA devices the executor's libtorch sees.
    pub gpus: Option<u32>,
    pub labels: Vec<String>,
    /// The `twin-executor` binary; unset = the one beside `twin-server`.
    pub program: Option<PathBuf>,
    /// On shutdown the child is asked to hand its job back (SIGTERM) and killed after this long.
    pub stop_grace_ms: u64,
}

impl Default for EmbeddedExecutorConfig {
    fn default() -> Self {
        Self {
            name: "embedded".into(),
            gpus: None,
            labels: Vec::new(),
            program: None,
            stop_grace_ms: 30_000,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("twin-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7878)),
            embedded_executor: true,
            executor: EmbeddedExecutorConfig::default(),
            lease_ttl_ms: 30_000,
            max_json_bytes: 256 << 10,
            max_blob_bytes: 64 << 30,
            storage_reserve_bytes: 1 << 30,
            tokens: Vec::new(),
            allowed_hosts: Vec::new(),
            workers: None,
            modules: ModulesConfig::default(),
            allowed_roots: Vec::new(),
            job_timeouts_s: BTreeMap::new(),
            max_waiters: crate::waiters::Waiters::GLOBAL,
            max_waiters_per_token: crate::waiters::Waiters::PER_TOKEN,
            tls_cert: None,
            tls_key: None,
        }
    }
}

impl ServerConfig {
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))
    }

    /// The runtime limit of each kind: a day for every kind but `train` (a run takes what it
    /// takes; its checkpoints make a cancel cheap), then `job_timeouts_s` on top.
    pub fn job_timeouts(&self) -> BTreeMap<JobKind, Duration> {
        let mut limits: BTreeMap<JobKind, Duration> = JobKind::ALL
            .into_iter()
            .filter(|k| *k != JobKind::Train)
            .map(|k| (k, Duration::from_secs(24 * 3600)))
            .collect();
        for (kind, secs) in &self.job_timeouts_s {
            if *secs == 0 {
                limits.remove(kind);
            } else {
                limits.insert(*kind, Duration::from_secs(*secs));
            }
        }
        limits
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/config.example.toml");
        let cfg = ServerConfig::from_file(&path).expect("deploy/config.example.toml is valid");
        assert_eq!(cfg.tokens.len(), 2);
        assert!(!cfg.embedded_executor);
        crate::auth::Auth::new(&cfg.tokens).expect("its tokens are valid");
        // Its executor token is the placeholder, there to be replaced before the server starts.
        let refused = crate::auth::check_token_strength(&cfg.tokens).unwrap_err();
        assert!(refused.to_string().contains("placeholder"), "{refused}");
    }

    #[test]
    fn job_timeouts_default_to_a_day_but_for_training_and_are_overridden_by_kind() {
        let cfg: ServerConfig =
            toml::from_str("[job_timeouts_s]\neval = 60\nmine = 0\ntrain = 7200").unwrap();
        let limits = cfg.job_timeouts();
        assert_eq!(limits[&JobKind::Eval], Duration::from_secs(60));
        assert_eq!(limits[&JobKind::Train], Duration::from_secs(7200));
        assert!(!limits.contains_key(&JobKind::Mine));
        assert_eq!(limits[&JobKind::Ingest], Duration::from_secs(86_400));
        assert!(
            !ServerConfig::default()
                .job_timeouts()
                .contains_key(&JobKind::Train)
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = toml::from_str::<ServerConfig>("data_dirr = \"/x\"").unwrap_err();
        assert!(err.to_string().contains("data_dirr"), "{err}");
    }
}
