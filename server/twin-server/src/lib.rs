//! The twin job server: HTTP API, scheduler (leases, reaper), metrics, and the embedded executor.
//!
//! API boundary: the only crate that imports actix-web. `twin-server` (src/main.rs) is a thin
//! binary over [`serve`] and [`run_executor`].

pub mod api;
pub mod auth;
pub mod config;
pub mod error;
pub mod eval;
pub mod metrics;
pub mod mining;
#[cfg(feature = "ml")]
pub mod model;
pub mod reaper;
pub mod service;
pub mod telemetry;

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

/// CUDA devices this process can use (0 without the `ml` feature).
pub fn detected_gpus() -> u32 {
    #[cfg(feature = "ml")]
    {
        if twin_ml::cuda_available() {
            return twin_ml::tch::Cuda::device_count().max(0) as u32;
        }
    }
    0
}

/// Runs the server until SIGINT/SIGTERM, then stops the executor and closes the log.
pub async fn serve(config: ServerConfig) -> anyhow::Result<()> {
    let metrics = Arc::new(metrics::Metrics::new());
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let cache = config
        .modules
        .cache_dir
        .clone()
        .unwrap_or_else(|| config.data_dir.join("module-cache"));
    let plugins = plugin_host(
        cache,
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
    let mut auth = Auth::new(&config.tokens)?;
    let mut listen = config.listen;
    if auth.is_open() && !listen.ip().is_loopback() {
        listen = loopback_only(listen);
        tracing::warn!(requested = %config.listen, using = %listen, "no tokens configured: listening on loopback only");
    } else if auth.is_open() {
        tracing::warn!(
            "no tokens configured: authentication is off and the server listens on loopback only"
        );
    }
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
    };
    let app_svc = svc.clone();
    let mut server =
        actix_web::HttpServer::new(move || api::app(app_svc.clone(), auth.clone(), limits))
            .shutdown_timeout(5)
            // Signals are handled below, so the executor stops before the API it talks to.
            .disable_signals();
    if let Some(w) = config.workers {
        server = server.workers(w);
    }
    let server = server
        .bind(listen)
        .with_context(|| format!("binding {listen}"))?;
    let bound = server
        .addrs()
        .first()
        .copied()
        .context("the server bound no address")?;
    // Tests and scripts read this line to find a port chosen with `:0`.
    println!("twin-server listening on http://{bound}");
    tracing::info!(addr = %bound, data_dir = %config.data_dir.display(), last_seq = svc.last_seq(), "serving");
    let server = server.run();
    let handle = server.handle();
    let server = tokio::spawn(server);

    let (stop_tx, stop_rx) = watch::channel(false);
    let reaper = tokio::spawn(reaper::run(
        svc.clone(),
        config.lease_ttl(),
        stop_rx.clone(),
    ));
    let executor = if config.embedded_executor {
        let cfg = twin_executor::ExecutorConfig {
            server: format!("http://{}", loopback_only(bound)),
            token: executor_token,
            name: config.executor.name.clone(),
            gpus: config.executor.gpus.unwrap_or_else(detected_gpus),
            labels: config.executor.labels.clone(),
            poll_wait: Duration::from_secs(20),
            model_cache_bytes: twin_executor::ExecutorConfig::DEFAULT_MODEL_CACHE_BYTES,
        };
        let stages = twin_executor::default_stages(plugins, cfg.model_cache());
        let exec = twin_executor::Executor::new(cfg, stages)?;
        Some(tokio::spawn(exec.run(stop_rx)))
    } else {
        None
    };
    shutdown_signal().await?;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    if let Some(e) = executor {
        let _ = tokio::time::timeout(Duration::from_secs(5), e).await;
    }
    let _ = reaper.await;
    handle.stop(true).await;
    let result = server
        .await
        .context("http server task")?
        .context("http server");
    svc.close();
    tracing::info!("stopped");
    result
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

/// The Wasm host of a server or executor. Modules are compiled by this same binary run as
/// `twin-server compile-module`, a child process killed at `compile_timeout`.
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

/// Runs a standalone executor until SIGINT/SIGTERM.
pub async fn run_executor(
    config: twin_executor::ExecutorConfig,
    module_cache: std::path::PathBuf,
) -> anyhow::Result<()> {
    let plugins = plugin_host(module_cache, 64 << 20, Duration::from_secs(120))?;
    let stages = twin_executor::default_stages(plugins, config.model_cache());
    let exec = twin_executor::Executor::new(config, stages)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(exec.run(stop_rx));
    shutdown_signal().await?;
    let _ = stop_tx.send(true);
    let _ = task.await;
    Ok(())
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
