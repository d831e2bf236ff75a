//! Command-line flags, each with an environment fallback (`TOLLGATE_*`).

use clap::{Parser, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Tollgate data plane: an OpenAI-compatible LLM gateway.
#[derive(Debug, Parser)]
#[command(
    name = "tollgate-dataplane",
    version,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    /// A one-off task instead of serving.
    #[command(subcommand)]
    pub command: Option<Command>,
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

/// One-off tasks.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Reads a LiteLLM proxy config.yaml and writes Tollgate manifests (LLMModels, RoutePolicies,
    /// Secret templates) to standard output or `--output`; what has no equivalent is listed on
    /// standard error, with its line. See docs/migrating-from-litellm.md.
    ImportLitellm {
        /// The LiteLLM config (`-` for standard input).
        config: PathBuf,
        /// Where to write the manifests (default: standard output).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}
