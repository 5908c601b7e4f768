//! The twin job server: HTTP API, scheduler (leases, reaper), metrics, and the supervisor of its
//! executor child.
//!
//! API boundary: the only crate that imports actix-web. `twin-server` (src/main.rs) is a thin
//! binary over [`serve`]. It links neither libtorch nor the stages: jobs run in `twin-executor`
//! processes, one of which `serve` starts and supervises by default ([`supervisor`]).

pub mod api;
pub mod auth;
pub mod config;
pub mod error;
pub mod eval;
pub mod gc;
pub mod metrics;
pub mod mining;
pub mod models;
pub mod paths;
pub mod reaper;
pub mod service;
pub mod supervisor;
pub mod telemetry;
pub mod tls;
pub mod train;
pub mod waiters;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rand::Rng;
use tokio::sync::watch;

use crate::auth::{Auth, Role};
use crate::config::ServerConfig;
use crate::service::Service;

/// Where a bind address that is not loopback goes when auth is off.
fn loopback_only(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_loopback() {
        addr
    } else {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    }
}

/// The loopback address of `addr`'s family.
fn loopback_of(addr: SocketAddr) -> std::net::IpAddr {
    match addr {
        SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
    }
}

/// Runs the server until SIGINT/SIGTERM, then stops the executor and closes the log.
pub async fn serve(config: ServerConfig) -> anyhow::Result<()> {
    auth::check_token_strength(&config.tokens)?;
    // Read before anything starts: a wrong path or key stops the server here, naming the file.
    let tls = tls::TlsFiles::from_config(config.tls_cert.as_deref(), config.tls_key.as_deref())?;
    let tls_config = tls.as_ref().map(tls::TlsFiles::server_config).transpose()?;
    let metrics = Arc::new(metrics::Metrics::new());
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let cache = config
        .modules
        .cache_dir
        .clone()
        .unwrap_or_else(|| config.data_dir.join("module-cache"));
    let plugins = plugin_host(
        cache.clone(),
        config.modules.max_module_bytes,
        Duration::from_millis(config.modules.compile_timeout_ms),
    )?;
    let svc = Service::open(
        &config.data_dir,
        config.lease_ttl(),
        metrics,
        plugins.clone(),
    )
    .with_context(|| format!("opening data dir {}", config.data_dir.display()))?;
    // Paths in specs: checked at submission under the roots, which the executor child shares.
    let roots = twin_files::AllowedRoots::new(&config.allowed_roots)
        .context("allowed_roots")?
        .deny(&config.data_dir);
    if !roots.is_empty() {
        tracing::info!(roots = ?roots.roots(), "paths in job specs are read under these roots");
        svc.set_allowed_roots(roots.clone());
    }
    svc.set_job_timeouts(config.job_timeouts());
    svc.waiters
        .set_limits(config.max_waiters, config.max_waiters_per_token);
    let mut auth = Auth::new(&config.tokens)?;
    auth.allow_hosts(config.allowed_hosts.clone());
    let mut listen = config.listen;
    if auth.is_open() && !listen.ip().is_loopback() {
        listen = loopback_only(listen);
        tracing::warn!(requested = %config.listen, using = %listen, "no tokens configured: listening on loopback only");
    } else if auth.is_open() {
        tracing::warn!(
            "no tokens configured: authentication is off and the server listens on loopback only"
        );
    }
    if tls::exposed_in_clear(listen, tls.as_ref()) {
        tracing::warn!(%listen, "listening beyond loopback without TLS: tokens and data cross the network in clear; set tls_cert and tls_key (--tls-cert, --tls-key)");
    }
    let executor_program = if config.embedded_executor {
        let program = match &config.executor.program {
            Some(p) => p.clone(),
            None => supervisor::default_program()?,
        };
        supervisor::check_program(&program)?;
        Some(program)
    } else {
        None
    };
    let executor_token = if config.embedded_executor && !auth.is_open() {
        let token: String = rand::rng()
            .sample_iter(rand::distr::Alphanumeric)
            .take(48)
            .map(char::from)
            .collect();
        auth.add(
            &format!("{}-executor", config.executor.name),
            &token,
            BTreeSet::from([Role::Execute]),
        );
        Some(token)
    } else {
        None
    };
    let auth = Arc::new(auth);
    let limits = api::Limits {
        max_json_bytes: config.max_json_bytes,
        max_blob_bytes: config.max_blob_bytes,
        storage_reserve_bytes: config.storage_reserve_bytes,
    };
    // Upload sessions idle for a day are abandoned: their partial files go (also at each new
    // session, see api/uploads.rs).
    if let Err(e) = svc.blobs.sweep_uploads(api::UPLOAD_IDLE) {
        tracing::warn!(error = %e, "sweeping idle upload sessions");
    }
    let app_svc = svc.clone();
    let mut server =
        actix_web::HttpServer::new(move || api::app(app_svc.clone(), auth.clone(), limits))
            .shutdown_timeout(5)
            // Signals are handled below, so the executor stops before the API it talks to.
            .disable_signals();
    if let Some(w) = config.workers {
        server = server.workers(w);
    }
    let server = match tls_config {
        Some(tls_config) => server.bind_rustls_0_23(listen, tls_config),
        None => server.bind(listen),
    }
    .with_context(|| format!("binding {listen}"))?;
    let bound = server
        .addrs()
        .first()
        .copied()
        .context("the server bound no address")?;
    // The executor child's way in. With TLS it gets a plain listener of its own on loopback (an
    // ephemeral port): it then needs no certificate naming 127.0.0.1 nor a CA bundle, which a
    // publicly signed certificate for the head node's name would not give it. Loopback traffic
    // never leaves the machine and other users cannot read it; the child still sends its token.
    let (server, child_addr) = match (&tls, executor_program.is_some()) {
        (Some(_), true) => {
            let loopback = SocketAddr::new(loopback_of(listen), 0);
            let server = server
                .bind(loopback)
                .with_context(|| format!("binding {loopback} for the executor child"))?;
            let plain = server
                .addrs_with_scheme()
                .into_iter()
                .find(|(_, scheme)| *scheme == "http")
                .map(|(addr, _)| addr)
                .context("the executor child's listener bound no address")?;
            tracing::info!(addr = %plain, "the executor child reaches the server on this loopback listener");
            (server, plain)
        }
        _ => (server, loopback_only(bound)),
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    // Tests and scripts read this line to find a port chosen with `:0`.
    println!("twin-server listening on {scheme}://{bound}");
    // The chain head, for anyone anchoring audits from the log (`twin replay --expect-head`).
    tracing::info!(addr = %bound, data_dir = %config.data_dir.display(), last_seq = svc.last_seq(), head = %head_anchor(&svc), "serving");
    let server = server.run();
    let handle = server.handle();
    let server = tokio::spawn(server);

    let (stop_tx, stop_rx) = watch::channel(false);
    let reaper = tokio::spawn(reaper::run(
        svc.clone(),
        config.lease_ttl(),
        stop_rx.clone(),
    ));
    let executor = match executor_program {
        Some(program) => {
            let token_file = match &executor_token {
                Some(token) => {
                    let path = config.data_dir.join("executor.token");
                    supervisor::write_token_file(&path, token)?;
                    Some(path)
                }
                None => None,
            };
            let child = supervisor::ChildSpec {
                program,
                server: format!("http://{child_addr}"),
                name: config.executor.name.clone(),
                token_file,
                gpus: config.executor.gpus,
                labels: config.executor.labels.clone(),
                module_cache: cache,
                model_store: config.data_dir.join("model-store"),
                allowed_roots: roots.roots().to_vec(),
                deny_roots: roots.denied().to_vec(),
            };
            let grace = Duration::from_millis(config.executor.stop_grace_ms);
            Some(tokio::spawn(supervisor::supervise(
                svc.clone(),
                child,
                grace,
                stop_rx.clone(),
            )))
        }
        None => None,
    };
    shutdown_signal().await?;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    // The child hands its job back (SIGTERM) while the API it reports to is still up.
    if let Some(e) = executor {
        let _ = e.await;
    }
    let _ = reaper.await;
    handle.stop(true).await;
    let result = server
        .await
        .context("http server task")?
        .context("http server");
    // Nothing appends any more: this is the head the next start will find.
    let head = head_anchor(&svc);
    svc.close();
    tracing::info!(%head, "stopped");
    result
}

/// The log's chain head as `twin replay --expect-head` takes it, `<seq>:<hash>`.
fn head_anchor(svc: &Service) -> String {
    match svc.log.head() {
        Ok(h) => format!("{}:{}", h.seq, hex::encode(h.hash)),
        Err(e) => format!("unreadable ({e})"),
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// The server's Wasm host (it compiles and describes uploaded modules). Modules are compiled by
/// this same binary run as `twin-server compile-module`, a child process killed at
/// `compile_timeout`.
pub fn plugin_host(
    cache_dir: std::path::PathBuf,
    max_module_bytes: u64,
    compile_timeout: Duration,
) -> anyhow::Result<Arc<twin_plugins::Host>> {
    let program = std::env::current_exe().context("locating this binary for the compiler child")?;
    let host = twin_plugins::Host::new(twin_plugins::HostConfig {
        cache_dir: Some(cache_dir),
        max_module_bytes,
        compiler: twin_plugins::Compiler::Subprocess {
            program,
            args: vec!["compile-module".into()],
            timeout: compile_timeout,
        },
        ..twin_plugins::HostConfig::default()
    })
    .map_err(|e| anyhow::anyhow!("starting the Wasm host: {e}"))?;
    Ok(Arc::new(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_tokens_only_loopback_addresses_are_kept() {
        let lan: SocketAddr = "0.0.0.0:7878".parse().expect("valid address");
        assert_eq!(
            loopback_only(lan),
            "127.0.0.1:7878".parse().expect("valid address")
        );
        let local: SocketAddr = "[::1]:9000".parse().expect("valid address");
        assert_eq!(loopback_only(local), local);
    }
}
