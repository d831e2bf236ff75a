//! The composition root: reads the flags, builds the state, starts the runtimes (one per core,
//! or one work-stealing), the listeners and the background tasks (config reloads, probes, queue
//! scrapes, the usage log), and stops them in order.

pub mod flags;
pub mod shutdown;

pub use flags::Args;
use flags::{LogFormat, RuntimeKind};
pub use shutdown::shutdown_signal;
use shutdown::{SETTLE_GRACE, close, stop_on_signal};

use crate::gateway::state::{AppState, Settings, Stop};
use crate::http::server::Served;
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
    if let Some(command) = args.command {
        return run_command(command);
    }
    init_logging(&args);
    let threads = args
        .worker_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    match args.runtime {
        RuntimeKind::PerCore => run_per_core(args, threads),
        RuntimeKind::WorkStealing if !args.busy_poll.is_zero() => {
            anyhow::bail!(
                "--busy-poll needs --runtime per-core (a work-stealing runtime's threads steal work instead of polling for their own)"
            )
        }
        RuntimeKind::WorkStealing => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
            .block_on(async move {
                let served = prepare(&args).await?;
                let state = served.state.clone();
                stop_on_signal(&state)?;
                let listener = bind(args.listen, ReusePort::No)?;
                announce(&state, listener.local_addr()?);
                serve_on(listener, served).await?;
                close(&state).await;
                Ok(())
            }),
    }
}

/// A one-off task (`tollgate-dataplane import-litellm ...`).
fn run_command(command: flags::Command) -> anyhow::Result<()> {
    match command {
        flags::Command::ImportLitellm { config, output } => {
            let text = if config.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading standard input")?
            } else {
                std::fs::read_to_string(&config)
                    .with_context(|| format!("reading {}", config.display()))?
            };
            let imported = tollgate_crds::litellm::import(&text).map_err(anyhow::Error::msg)?;
            for w in &imported.warnings {
                eprintln!("warning: {w}");
            }
            match output {
                Some(path) => std::fs::write(&path, &imported.manifests)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => print!("{}", imported.manifests),
            }
            Ok(())
        }
    }
}

/// One single-threaded runtime per thread, each accepting on its own `SO_REUSEPORT` socket:
/// the kernel spreads connections across threads, and everything a connection does (its
/// upstream connections included, see [`crate::upstream::send`]) stays on one thread, with no
/// cross-thread wake-ups or work stealing on the request path. The first thread also runs the
/// background tasks (reload, metrics upkeep).
fn run_per_core(args: Args, threads: usize) -> anyhow::Result<()> {
    let busy_poll = args.busy_poll;
    let current = || {
        let mut b = tokio::runtime::Builder::new_current_thread();
        b.enable_all();
        if !busy_poll.is_zero() {
            b.on_thread_unpark(crate::rt::busy_poll::unparked);
        }
        b.build()
    };
    // Each thread's serving, from its own block_on (the spinner's state is per thread).
    let serve = move |listener, served: Served| async move {
        if !busy_poll.is_zero() {
            tokio::spawn(crate::rt::busy_poll::spin(busy_poll));
        }
        serve_on(listener, served).await
    };
    let rt = current()?;
    let (served, listener) = rt.block_on(async {
        let served = prepare(&args).await?;
        stop_on_signal(&served.state)?;
        anyhow::Ok((served, bind(args.listen, ReusePort::First)?))
    })?;
    let state = served.state.clone();
    // With port 0 the first socket picked the port; the others join it.
    let addr = listener.local_addr()?;
    let mut handles = Vec::new();
    for i in 1..threads {
        let served = served.clone();
        let rt = current()?;
        let listener = rt.block_on(async { bind(addr, ReusePort::Join) })?;
        handles.push(
            std::thread::Builder::new()
                .name(format!("tollgate-worker-{i}"))
                .spawn(move || rt.block_on(serve(listener, served)))?,
        );
    }
    announce(&state, addr);
    rt.block_on(async {
        // The workers are joined while this runtime still runs: the background tasks on it
        // (the Redis connection, the usage writers) serve their last requests.
        // Every worker is joined and the usage flushed even if one failed; the first failure
        // is what the process reports.
        let ended = serve(listener, served).await;
        let joined = tokio::task::spawn_blocking(move || {
            let mut first = Ok(());
            for h in handles {
                let ended = h
                    .join()
                    .map_err(|_| anyhow::anyhow!("a worker thread panicked"))
                    .and_then(|r| r);
                if first.is_ok() {
                    first = ended;
                }
            }
            first
        })
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r);
        close(&state).await;
        ended.and(joined)
    })
}

/// Loads the config, installs metrics, and starts the background tasks on this runtime.
async fn prepare(args: &Args) -> anyhow::Result<Served> {
    let (config, loaded, cluster) = match &args.manifests {
        Some(path) => {
            let loaded = crate::config::loader::fingerprint(path);
            match crate::config::loader::load(path) {
                Ok(c) => (c, loaded, None),
                Err(errors) => {
                    for e in &errors {
                        tracing::error!("{e}");
                    }
                    anyhow::bail!(
                        "{} error(s) in {}; nothing served",
                        errors.len(),
                        path.display()
                    );
                }
            }
        }
        None => {
            let source = crate::config::cluster::ConfigSource::start(
                args.config_namespace.clone(),
                args.config_name.clone(),
            )
            .await?;
            tracing::info!(
                namespace = args.config_namespace,
                name = args.config_name,
                "waiting for the operator's config"
            );
            let (config, hash) = source.first().await?;
            (config, 0, Some((source, hash)))
        }
    };
    let prometheus = crate::telemetry::install()?;
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
        idle_timeout: args.idle_timeout,
        shutdown_timeout: args.shutdown_timeout,
        shutdown_delay: args.shutdown_delay,
        bounds: crate::gateway::state::Bounds {
            header_read: args.header_read_timeout,
            body_read: args.body_read_timeout,
            write_stall: args.write_stall_timeout,
        },
        max_connections: args.max_connections,
    };
    let usage_log = args
        .usage_log
        .as_deref()
        .map(|p| crate::accounting::usage_log::open(p, args.usage_log_max_bytes))
        .transpose()
        .with_context(|| format!("opening the usage log {:?}", args.usage_log))?
        .unwrap_or_default();
    let admin = match (args.master_key.as_deref(), &args.manifests) {
        (Some(k), Some(path)) => Some(crate::admin::Admin::new(k, path.clone())),
        (Some(_), None) => {
            tracing::warn!(
                "--master-key is ignored in cluster mode: manage keys as VirtualKey objects (kubectl)"
            );
            None
        }
        (None, _) => None,
    };
    let shared = match &args.redis_url {
        Some(url) => Some(Arc::new(
            crate::limits::redis::SharedLimits::connect(url, args.redis_failure, args.redis_lease)
                .await
                .context("connecting to Redis (--redis-url)")?,
        )),
        None => None,
    };
    let usage_log = match &shared {
        Some(s) => usage_log.with_stream(s.connection()),
        None => usage_log,
    };
    let usage_log = usage_log.is_enabled().then_some(usage_log);
    let state = AppState::new(&config, settings, Some(prometheus), usage_log, shared)?;
    if let Some(path) = &args.usage_log {
        let r = state
            .replay_usage_log(path, crate::rt::clock::unix_secs())
            .with_context(|| format!("reading the usage log {}", path.display()))?;
        tracing::info!(records = r.records, skipped = r.skipped, path = %path.display(), "usage log replayed");
        if !r.crashed.is_empty() {
            tracing::warn!(
                requests = r.crashed.len(),
                "requests that went upstream before the last exit and never settled (the process was killed): charged what they reserved, outcome \"crashed\""
            );
        }
        if let Some(log) = &state.usage_log {
            for record in r.crashed {
                log.record(record);
            }
        }
    }
    let current = {
        let state = state.clone();
        move || state.snapshot.load_full()
    };
    tokio::spawn(crate::routing::probe::probe_endpoints(current.clone()));
    tokio::spawn(crate::routing::probe::scrape_queues(
        current,
        args.queue_scrape_interval,
    ));
    match (cluster, &args.manifests) {
        (Some((source, hash)), _) => {
            tokio::spawn(source.follow(state.clone(), hash));
        }
        (None, Some(path)) => {
            tokio::spawn(crate::config::loader::watch(
                state.clone(),
                path.clone(),
                args.reload_interval,
                loaded,
            ));
        }
        (None, None) => {}
    }
    Ok(Served {
        state,
        admin: admin.map(Arc::new),
    })
}

fn announce(state: &AppState, addr: SocketAddr) {
    let s = state.snapshot.load();
    tracing::info!(
        config_hash = s.config_hash,
        models = s.groups.len(),
        keys = s.keys.len(),
        "tollgate data plane listening on {addr}"
    );
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ReusePort {
    No,
    /// The first of the sockets sharing the address: checks nobody else holds it.
    First,
    /// A further socket joining the first.
    Join,
}

/// Binds a listening socket. With `reuse_port`, several sockets (one per thread) share the
/// address; a plain bind is tried first so that a port another process holds is an error, not
/// a silent share.
fn bind(addr: SocketAddr, reuse_port: ReusePort) -> anyhow::Result<tokio::net::TcpListener> {
    let socket = || {
        if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
    };
    let context = || format!("binding {addr}");
    if reuse_port == ReusePort::First && addr.port() != 0 {
        let probe = socket().with_context(context)?;
        probe.set_reuseaddr(true).with_context(context)?;
        probe.bind(addr).with_context(context)?;
        drop(probe);
    }
    let s = socket().with_context(context)?;
    s.set_reuseaddr(true).with_context(context)?;
    #[cfg(unix)]
    if reuse_port != ReusePort::No {
        s.set_reuseport(true).with_context(context)?;
    }
    s.bind(addr).with_context(context)?;
    s.listen(1024).with_context(context)
}

async fn serve_on(listener: tokio::net::TcpListener, served: Served) -> anyhow::Result<()> {
    let state = served.state.clone();
    let stop = {
        let state = state.clone();
        async move {
            let mut stopped = state.stop.subscribe();
            let _ = stopped.wait_for(|s| *s >= Stop::Stopping).await;
            let delay = state.settings.shutdown_delay;
            if state.drain() && !delay.is_zero() {
                tracing::info!(
                    "shutting down: readiness fails now; still accepting requests for {delay:?} (--shutdown-delay)"
                );
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = stopped.wait_for(|s| *s == Stop::Now) => {}
            }
        }
    };
    crate::http::server::serve(listener, served, stop).await;
    // Before this thread's runtime goes: the Redis settlements its cut requests started.
    if let Some(shared) = &state.shared {
        shared.settled(SETTLE_GRACE).await;
    }
    tracing::info!("shut down");
    Ok(())
}
