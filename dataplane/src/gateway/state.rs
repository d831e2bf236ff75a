//! Process-wide state shared by every request: the current config snapshot (swapped atomically
//! on reload), the usage ledger, and settings.

use crate::accounting::Ledger;
use crate::accounting::usage_log;
use crate::config::snapshot::{BuildError, Snapshot};
use crate::limits::Registry;
use crate::limits::{Scope, period_index};
use crate::routing::Health;
use arc_swap::ArcSwap;
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tollgate_crds::GatewayConfig;
use tollgate_crds::config::Picodollars;

/// Settings from the command line.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    /// Largest request body accepted.
    pub(crate) max_body_bytes: usize,
    /// Whether `/metrics` has per-key series.
    pub(crate) per_key_metrics: bool,
    /// How long a client connection may stay open without a request before it is closed.
    pub(crate) idle_timeout: std::time::Duration,
    /// How long shutdown waits for in-flight requests before closing their connections.
    pub(crate) shutdown_timeout: std::time::Duration,
    /// How long the listeners keep accepting after SIGTERM, with readiness failing.
    pub(crate) shutdown_delay: std::time::Duration,
    /// Bounds on the work a client connection may make the gateway wait on.
    pub(crate) bounds: Bounds,
    /// Most client connections open at once across the process; 0 for no limit.
    pub(crate) max_connections: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 << 20,
            per_key_metrics: false,
            idle_timeout: std::time::Duration::from_secs(620),
            shutdown_timeout: std::time::Duration::from_secs(25),
            shutdown_delay: std::time::Duration::ZERO,
            bounds: Bounds::default(),
            max_connections: 10_000,
        }
    }
}

/// Shared state.
pub(crate) struct AppState {
    /// The config requests are served from. Loaded once per request.
    pub(crate) snapshot: ArcSwap<Snapshot>,
    /// Usage counters, across reloads.
    pub(crate) ledger: Ledger,
    /// Rate-limit and budget counters, across reloads.
    pub(crate) limits: Registry,
    /// Endpoint health and routing statistics, across reloads.
    pub(crate) health: Health,
    /// Settings.
    pub(crate) settings: Settings,
    /// Prometheus renderer, when the binary installed the recorder.
    pub(crate) prometheus: Option<PrometheusHandle>,
    /// Where usage records go, if anywhere.
    pub(crate) usage_log: Option<crate::accounting::usage_log::UsageLog>,
    /// Counters shared through Redis, when `--redis-url` is set.
    pub(crate) shared: Option<Arc<crate::limits::redis::SharedLimits>>,
    /// Set on SIGTERM: readiness fails from then on (see [`AppState::drain`]).
    pub(crate) draining: std::sync::atomic::AtomicBool,
    /// [`Stop::Stopping`] on SIGTERM or SIGINT, [`Stop::Now`] on a second one: every worker
    /// thread's listener watches it (one signal subscription for the process, made before the
    /// workers start).
    pub(crate) stop: tokio::sync::watch::Sender<Stop>,
    /// Client connections open now, across every listener (see `Settings::max_connections`).
    pub(crate) open_connections: std::sync::atomic::AtomicUsize,
}

/// How far the process is in stopping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Stop {
    Serving,
    /// Shutting down: the shutdown delay, then requests finish within the shutdown timeout.
    Stopping,
    /// Told again: the delay and the timeout are cut short. Requests still running are cut and
    /// settled, and the usage log is flushed, as at the shutdown timeout.
    Now,
}

impl AppState {
    /// State serving `config`.
    pub(crate) fn new(
        config: &GatewayConfig,
        settings: Settings,
        prometheus: Option<PrometheusHandle>,
        usage_log: Option<crate::accounting::usage_log::UsageLog>,
        shared: Option<Arc<crate::limits::redis::SharedLimits>>,
    ) -> Result<Arc<Self>, BuildError> {
        let ledger = Ledger::default();
        let limits = Registry::default();
        let health = Health::default();
        let snapshot = Snapshot::build(config, &ledger, &limits, &health)?;
        Ok(Arc::new(Self {
            snapshot: ArcSwap::from_pointee(snapshot),
            ledger,
            limits,
            health,
            settings,
            prometheus,
            usage_log,
            shared,
            draining: std::sync::atomic::AtomicBool::new(false),
            stop: tokio::sync::watch::Sender::new(Stop::Serving),
            open_connections: std::sync::atomic::AtomicUsize::new(0),
        }))
    }

    /// Starts shutting down: `/health/readiness` answers 503 from now on, so that Kubernetes
    /// takes the pod out of its Services' endpoints while it still serves (for the shutdown
    /// delay) the requests sent before every node and load balancer has caught up. Returns
    /// whether this call started it (each worker thread calls it).
    pub(crate) fn drain(&self) -> bool {
        !self
            .draining
            .swap(true, std::sync::atomic::Ordering::Relaxed)
    }

    /// Reads the usage log at `path` (see [`usage_log::replay`]) into the ledger, and seeds each
    /// limited key's and team's budget with its spend in the current period (`now`, Unix
    /// seconds).
    pub(crate) fn replay_usage_log(
        &self,
        path: &Path,
        now: u64,
    ) -> std::io::Result<usage_log::Replay> {
        let snapshot = self.snapshot.load();
        let periods: HashMap<&str, _> = snapshot
            .keys
            .values()
            .filter_map(|k| {
                k.config
                    .budget
                    .as_ref()
                    .map(|b| (k.config.id.as_str(), b.period))
            })
            .collect();
        let team_periods: HashMap<&str, _> = snapshot
            .keys
            .values()
            .filter_map(|k| {
                let team = k.config.team.as_deref()?;
                let b = k.team_limits.as_ref()?.rules().budget.as_ref()?;
                Some((team, b.period))
            })
            .collect();
        let mut period_spend: HashMap<&str, u64> = HashMap::new();
        let mut team_spend: HashMap<&str, u64> = HashMap::new();
        let out = usage_log::replay(path, |r| {
            let cost = Picodollars(r.cost_pico);
            self.ledger
                .key(&r.key)
                .add_many(r.requests, r.usage(), cost);
            self.ledger
                .deployment(&r.model, &r.deployment)
                .add_many(r.requests, r.usage(), cost);
            if let Some((id, p)) = periods.get_key_value(&*r.key)
                && period_index(*p, r.ts_ms / 1000) == period_index(*p, now)
            {
                *period_spend.entry(id).or_default() += r.cost_pico;
            }
            if let Some((team, p)) = r
                .team
                .as_deref()
                .and_then(|t| team_periods.get_key_value(t))
                && period_index(*p, r.ts_ms / 1000) == period_index(*p, now)
            {
                *team_spend.entry(team).or_default() += r.cost_pico;
            }
        })?;
        for (team, spend) in team_spend {
            self.limits.seed_spend(
                Scope::Team,
                team,
                team_periods[team],
                Picodollars(spend),
                now,
            );
        }
        for (key, spend) in period_spend {
            self.limits
                .seed_spend(Scope::Key, key, periods[key], Picodollars(spend), now);
        }
        Ok(out)
    }

    /// Swaps in `config`. In-flight requests finish on the snapshot they started with.
    pub(crate) fn install(&self, config: &GatewayConfig) -> Result<(), BuildError> {
        let snapshot = Snapshot::build(config, &self.ledger, &self.limits, &self.health)?;
        self.snapshot.store(Arc::new(snapshot));
        Ok(())
    }
}

/// Bounds on what a client may make a connection wait for (see `docs/limits-and-budgets.md`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bounds {
    /// From a request head's first byte (from the accept, for a connection's first request) to
    /// its end.
    pub(crate) header_read: Duration,
    /// From the end of a request head to the end of its body.
    pub(crate) body_read: Duration,
    /// Longest a write to the client may make no progress.
    pub(crate) write_stall: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(10),
            body_read: Duration::from_secs(60),
            write_stall: Duration::from_secs(60),
        }
    }
}

impl crate::config::Install for AppState {
    fn install(&self, config: &GatewayConfig) -> Result<(), BuildError> {
        AppState::install(self, config)
    }
}
