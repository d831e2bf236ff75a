//! Command-line flags (each with an environment fallback) and process wiring.

use crate::gateway::state::{AppState, Settings, Stop};
use crate::http::server::Served;
use anyhow::Context;
use clap::{Parser, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Tollgate data plane: an OpenAI-compatible LLM gateway.
#[derive(Debug, Parser)]
#[command(name = "tollgate-dataplane", version)]
pub struct Args {
    /// Manifests to serve (a YAML file or a directory of them): LLMModel, VirtualKey,
    /// RoutePolicy and v1 Secret objects. Reloaded when they change.
    #[arg(
        long,
        env = "TOLLGATE_MANIFESTS",
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    pub(crate) manifests: Option<PathBuf>,
    /// Cluster mode: serve the config the operator publishes in `--config-namespace` (through
    /// the in-cluster service account, or KUBECONFIG).
    #[arg(long, env = "TOLLGATE_KUBERNETES")]
    pub(crate) kubernetes: bool,
    /// Cluster mode: namespace of the published config Secrets.
    #[arg(
        long,
        env = "TOLLGATE_CONFIG_NAMESPACE",
        default_value = "tollgate-system"
    )]
    pub(crate) config_namespace: String,
    /// Cluster mode: name of the head config Secret.
    #[arg(long, env = "TOLLGATE_CONFIG_NAME", default_value = tollgate_crds::publish::DEFAULT_NAME)]
    pub(crate) config_name: String,
    /// Address to listen on.
    #[arg(long, env = "TOLLGATE_LISTEN", default_value = "0.0.0.0:4000")]
    pub(crate) listen: SocketAddr,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "TOLLGATE_MAX_BODY_BYTES", default_value_t = 16 << 20)]
    pub(crate) max_body_bytes: usize,
    /// How long a client connection may stay open without a request (keep-alive idle, or a
    /// request head that never completes) before the gateway closes it. Longer than the idle
    /// timeouts of the load balancers and ingresses that pool connections to the gateway (60 to
    /// 350 s for cloud load balancers, 60 s for ingress-nginx), so that the gateway is never
    /// the side that closes a pooled connection as a request is sent on it.
    #[arg(long, env = "TOLLGATE_IDLE_TIMEOUT", default_value = "620s", value_parser = idle_timeout)]
    pub(crate) idle_timeout: Duration,
    /// How long a client may take to send a request head, from its first byte (or, for a
    /// connection's first request, from when the connection was accepted). Past it the
    /// connection is closed, with a `408` if part of a head had come. Time between requests on
    /// a keep-alive connection is the idle timeout's.
    #[arg(long, env = "TOLLGATE_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub(crate) header_read_timeout: Duration,
    /// How long a client may take to send a whole request body, from the end of its head: a
    /// total, not a gap between bytes, so that a body dripped byte by byte is bounded too. Past
    /// it the request gets a `408` and nothing goes upstream.
    #[arg(long, env = "TOLLGATE_BODY_READ_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    pub(crate) body_read_timeout: Duration,
    /// How long a write to a client may make no progress (a client that stopped reading a
    /// streamed response) before the connection is dropped; its request is then settled as if
    /// the client had gone, and the upstream request cancelled.
    #[arg(long, env = "TOLLGATE_WRITE_STALL_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    pub(crate) write_stall_timeout: Duration,
    /// Most client connections open at once (all worker threads together); past it a new
    /// connection is accepted and closed at once, and counted in
    /// `tollgate_connections_refused_total`. `0`: no limit.
    #[arg(long, env = "TOLLGATE_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub(crate) max_connections: usize,
    /// On SIGTERM, how long in-flight requests (long streams included) may run before their
    /// connections are closed; then usage is flushed and the process exits. Keep it a few
    /// seconds under the pod's `terminationGracePeriodSeconds` (30 s by default; the Helm chart
    /// sets this flag from its own), so that the flush happens before Kubernetes' SIGKILL.
    #[arg(long, env = "TOLLGATE_SHUTDOWN_TIMEOUT", default_value = "25s", value_parser = humantime_duration)]
    pub(crate) shutdown_timeout: Duration,
    /// On SIGTERM, how long to keep accepting new requests (with `/health/readiness` failing)
    /// before closing the listeners: the time Kubernetes takes to remove a terminating pod from
    /// its Services' endpoints everywhere, during which clients still send to it. The Helm chart
    /// sets `5s`; standalone there is nothing to wait for.
    #[arg(long, env = "TOLLGATE_SHUTDOWN_DELAY", default_value = "0s", value_parser = humantime_duration)]
    pub(crate) shutdown_delay: Duration,
    /// How often the manifests are checked for changes.
    #[arg(long, env = "TOLLGATE_RELOAD_INTERVAL", default_value = "1s", value_parser = humantime_duration)]
    pub(crate) reload_interval: Duration,
    /// How often queue-aware routing scrapes each vLLM endpoint's `/metrics`.
    #[arg(long, env = "TOLLGATE_QUEUE_SCRAPE_INTERVAL", default_value = "500ms", value_parser = humantime_duration)]
    pub(crate) queue_scrape_interval: Duration,
    /// Master key for the admin API (`/key/generate`, `/key/info`, `/spend/keys`, ...). Without
    /// it the admin API is off.
    #[arg(long, env = "TOLLGATE_MASTER_KEY", hide_env_values = true)]
    pub(crate) master_key: Option<String>,
    /// Redis URL (`redis://host:6379/0`): limits and budgets are then shared by every replica.
    #[arg(long, env = "TOLLGATE_REDIS_URL", hide_env_values = true)]
    pub(crate) redis_url: Option<String>,
    /// When Redis can't be reached: `open` falls back to this replica's own counters, `closed`
    /// refuses limited requests with 503.
    #[arg(
        long,
        env = "TOLLGATE_REDIS_FAILURE",
        value_enum,
        default_value = "open"
    )]
    pub(crate) redis_failure: crate::limits::redis::FailureMode,
    /// How long a request's reservation in Redis is held at most: the slot of a request whose
    /// replica died before settling it comes back after this, and its reserved cost is then
    /// charged as spent (it may have run upstream). Longer than your longest request.
    #[arg(long, env = "TOLLGATE_REDIS_LEASE", default_value = "15m", value_parser = humantime_duration)]
    pub(crate) redis_lease: Duration,
    /// Append a usage record per request to this file (JSON lines), and read it back at
    /// start-up so spend and budgets survive a restart.
    #[arg(long, env = "TOLLGATE_USAGE_LOG")]
    pub(crate) usage_log: Option<PathBuf>,
    /// When the usage log passes this many bytes it is rewritten as one row per key, model,
    /// deployment and time bucket (minutes for the last hour, hours for two days, days for 32
    /// days, one row before), which keeps budgets and totals exact; 0 never compacts.
    #[arg(long, env = "TOLLGATE_USAGE_LOG_MAX_BYTES", default_value_t = crate::accounting::usage_log::DEFAULT_MAX_BYTES)]
    pub(crate) usage_log_max_bytes: u64,
    /// Add per-key spend and request series to /metrics (one series per key: mind the
    /// cardinality with many keys).
    #[arg(long, env = "TOLLGATE_PER_KEY_METRICS")]
    pub(crate) per_key_metrics: bool,
    /// Log format.
    #[arg(long, env = "TOLLGATE_LOG_FORMAT", value_enum, default_value = "text")]
    pub(crate) log_format: LogFormat,
    /// Log filter, as RUST_LOG (e.g. `info`, `tollgate_dataplane=debug`).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub(crate) log: String,
    /// Worker threads (default: one per core).
    #[arg(long, env = "TOLLGATE_WORKER_THREADS")]
    pub(crate) worker_threads: Option<usize>,
    /// Runtime: `per-core` (a single-threaded runtime per worker, each with its own listening
    /// socket and upstream pool) or `work-stealing` (one shared multi-threaded runtime).
    #[arg(long, env = "TOLLGATE_RUNTIME", value_enum, default_value = "per-core")]
    pub(crate) runtime: RuntimeKind,
    /// With `per-core`: how long a worker thread keeps polling its sockets after its last work
    /// before it sleeps, so that the next event doesn't wait for an idle CPU to wake (slow on
    /// VMs). Costs CPU while it polls; `0` turns it off. See `docs/benchmarks.md`.
    #[arg(long, env = "TOLLGATE_BUSY_POLL", default_value = "0", value_parser = busy_poll)]
    pub(crate) busy_poll: Duration,
}

/// How requests are spread over threads.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum RuntimeKind {
    /// A current-thread runtime per worker thread, connections spread by `SO_REUSEPORT`.
    PerCore,
    /// Tokio's multi-threaded, work-stealing runtime.
    WorkStealing,
}

/// Log output format.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    tollgate_crds::common::parse_duration(s)
}

/// `--busy-poll`: at most 10 ms. Probes and scrapes open a window too, and longer windows mostly
/// burn CPU: the wake-ups it hides take tens to hundreds of microseconds.
fn busy_poll(s: &str) -> Result<Duration, String> {
    let d = humantime_duration(s)?;
    if d > Duration::from_millis(10) {
        return Err("must be at most 10ms (100us is typical)".into());
    }
    Ok(d)
}

/// `--header-read-timeout` and the like: a duration over zero.
fn positive_duration(s: &str) -> Result<Duration, String> {
    let d = humantime_duration(s)?;
    if d.is_zero() {
        return Err("must be more than 0s".into());
    }
    Ok(d)
}

/// `--idle-timeout`: a duration of at least a second (the sweeper looks four times per timeout).
fn idle_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err("must be at least 1s".into());
    }
    Ok(d)
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

/// How long a thread that stopped serving waits for the Redis settlements still unanswered (each
/// is one script call, normally a millisecond; a Redis call times out after 250 ms). Together
/// with [`crate::http::connections::ABORT_GRACE`] it fits in the 5 s the Helm chart leaves after the
/// shutdown timeout.
const SETTLE_GRACE: Duration = Duration::from_secs(2);

/// After the listeners stopped and in-flight requests finished: flush what is still buffered.
async fn close(state: &AppState) {
    if let Some(log) = &state.usage_log {
        log.close().await;
        tracing::info!("usage log flushed");
    }
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

/// Subscribes to SIGTERM and SIGINT now (before any worker thread serves, so that a signal that
/// comes during start-up isn't missed by a thread that subscribes late), and sets `state.stop`
/// when one comes: [`Stop::Stopping`], then [`Stop::Now`] on a second (an operator's second
/// Ctrl-C, or `kill` again, shouldn't have to wait out the shutdown timeout). Call inside the
/// runtime that runs the background tasks.
fn stop_on_signal(state: &Arc<AppState>) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("subscribing to SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("subscribing to SIGINT")?;
        let state = state.clone();
        tokio::spawn(async move {
            for stop in [Stop::Stopping, Stop::Now] {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
                if stop == Stop::Now {
                    tracing::warn!(
                        "second signal: cutting the requests still running now (their spend is kept)"
                    );
                }
                state.stop.send_replace(stop);
            }
        });
    }
    #[cfg(not(unix))]
    {
        let state = state.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            state.stop.send_replace(Stop::Stopping);
        });
    }
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
