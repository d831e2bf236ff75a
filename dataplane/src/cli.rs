//! Command-line flags (each with an environment fallback) and process wiring.

use crate::state::{AppState, Settings};
use anyhow::Context;
use axum::serve::ListenerExt;
use clap::{Parser, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Tollgate data plane: an OpenAI-compatible LLM gateway.
#[derive(Debug, Parser)]
#[command(name = "tollgate-dataplane", version)]
pub struct Args {
    /// Manifests to serve (a YAML file or a directory of them): LLMModel, VirtualKey,
    /// RoutePolicy and v1 Secret objects. Reloaded when they change.
    #[arg(long, env = "TOLLGATE_MANIFESTS")]
    pub manifests: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "TOLLGATE_LISTEN", default_value = "0.0.0.0:4000")]
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "TOLLGATE_MAX_BODY_BYTES", default_value_t = 16 << 20)]
    pub max_body_bytes: usize,
    /// How often the manifests are checked for changes.
    #[arg(long, env = "TOLLGATE_RELOAD_INTERVAL", default_value = "1s", value_parser = humantime_duration)]
    pub reload_interval: Duration,
    /// Upstream connect timeout.
    #[arg(long, env = "TOLLGATE_CONNECT_TIMEOUT", default_value = "10s", value_parser = humantime_duration)]
    pub connect_timeout: Duration,
    /// Add per-key spend and request series to /metrics (one series per key: mind the
    /// cardinality with many keys).
    #[arg(long, env = "TOLLGATE_PER_KEY_METRICS")]
    pub per_key_metrics: bool,
    /// Log format.
    #[arg(long, env = "TOLLGATE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log filter, as RUST_LOG (e.g. `info`, `tollgate_dataplane=debug`).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log: String,
    /// Worker threads (default: one per core).
    #[arg(long, env = "TOLLGATE_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
}

/// Log output format.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    tollgate_crds::common::parse_duration(s)
}

fn init_logging(args: &Args) {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.with_ansi(false).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Runs the data plane until SIGINT or SIGTERM.
pub fn run(args: Args) -> anyhow::Result<()> {
    init_logging(&args);
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.worker_threads {
        rt.worker_threads(n);
    }
    rt.enable_all().build()?.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let config = match crate::loader::load(&args.manifests) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors {
                tracing::error!("{e}");
            }
            anyhow::bail!(
                "{} error(s) in {}; nothing served",
                errors.len(),
                args.manifests.display()
            );
        }
    };
    let prometheus = crate::metrics::install()?;
    let upkeep = prometheus.clone();
    tokio::spawn(async move {
        // Histograms buffer samples until upkeep drains them; without it memory grows.
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let settings = Settings {
        max_body_bytes: args.max_body_bytes,
        per_key_metrics: args.per_key_metrics,
        connect_timeout: args.connect_timeout,
    };
    let state = AppState::new(&config, settings, Some(prometheus))?;
    tokio::spawn(crate::loader::watch(
        state.clone(),
        args.manifests.clone(),
        args.reload_interval,
    ));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(
        config_hash = config.content_hash(),
        models = config.models.len(),
        keys = config.keys.len(),
        "tollgate data plane listening on {addr}"
    );
    // Without TCP_NODELAY the last small write of a response waits for the client's delayed
    // ACK: ~40 ms at the end of every stream.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, crate::server::router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    tracing::info!("shut down");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
