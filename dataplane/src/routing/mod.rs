//! Routing within a model group: which endpoint serves the next attempt, and what the last
//! attempts taught us about each one.
//!
//! A group's unit of choice is a [`Route`]: one endpoint of one deployment (a deployment whose
//! backend resolved to several pods has one route per pod), so queue-aware and least-busy
//! routing see pods, not Services. Each route's [`EndpointStats`] (in-flight count, latency
//! EWMA, failure window, cooldown, scraped queue gauges) lives in [`Health`], which outlives
//! config reloads like the usage ledger does: a reload never forgets that a pod is failing.
//!
//! Cooldown is a small circuit breaker: more than `allowedFails` failures within `window`
//! take a route out for `duration`; after that it is half-open, serving one request at a time
//! until one succeeds (closed again) or fails (straight back to cooldown).

pub(crate) mod deployment;

pub(crate) mod probe;
pub(crate) mod report;

pub(crate) use deployment::{Group, RuntimeDeployment, Target};

/// Every group of a config, by public model name.
pub(crate) type Groups = std::collections::HashMap<String, Group>;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tollgate_crds::config::{CooldownConfig, PolicyConfig};
use tollgate_crds::policy::RetryOn;
use tollgate_crds::policy::Strategy;

/// Milliseconds on a monotonic clock (never 0), from the coarse clock (see [`crate::rt::clock`]):
/// cooldowns and scrape ages need no finer.
#[inline]
pub(crate) fn now_ms() -> u64 {
    crate::rt::clock::mono_ms()
}

/// Queue gauges scraped from a vLLM-style `/metrics` endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct QueueGauges {
    /// `vllm:num_requests_waiting`, summed over engines.
    pub(crate) waiting: f64,
    /// `vllm:num_requests_running`.
    pub(crate) running: f64,
    /// `vllm:kv_cache_usage_perc` (or the older `gpu_cache_usage_perc`), 0..1.
    pub(crate) kv_cache: f64,
}

/// What a route's recent history says about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RouteState {
    /// Serving, no recent failures.
    Healthy,
    /// Serving, with failures in the current window (below the cooldown threshold).
    Failing,
    /// Out of rotation until the cooldown ends.
    CoolingDown,
    /// Cooldown over; serving one probe request at a time until one succeeds.
    Probing,
}

impl RouteState {
    /// As shown in `/health` and metrics.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RouteState::Healthy => "healthy",
            RouteState::Failing => "failing",
            RouteState::CoolingDown => "cooling_down",
            RouteState::Probing => "probing",
        }
    }
}

/// Runtime statistics of one endpoint (kept across reloads).
#[derive(Debug, Default)]
pub(crate) struct EndpointStats {
    in_flight: AtomicU32,
    /// EWMA of time to response headers, µs; 0 until the first sample.
    latency_us: AtomicU64,
    /// (window start ms, failures in it).
    fails: Mutex<(u64, u32)>,
    /// While > now: cooling down. Non-zero and past: half-open.
    cooldown_until: AtomicU64,
    cooldowns: AtomicU64,
    successes: AtomicU64,
    failures: AtomicU64,
    queue_waiting: AtomicU64,
    queue_running: AtomicU64,
    queue_kv: AtomicU64,
    /// When the queue gauges were last scraped (now_ms); 0: never.
    scraped_at: AtomicU64,
    scrape_failing: AtomicBool,
    /// When the next active probe is due (now_ms); 0: now.
    next_probe: AtomicU64,
    /// The last active probe: 0 none yet, 1 passed, 2 failed.
    last_probe: std::sync::atomic::AtomicU8,
}

/// Weight of the previous average in the latency EWMA.
const EWMA_KEEP: f64 = 0.7;

impl EndpointStats {
    /// Requests in flight on this endpoint.
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    /// Marks a request as started; the guard marks it done when dropped.
    pub(crate) fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Relaxed);
        InFlight(self.clone())
    }

    /// Latency EWMA, if any request has been timed.
    pub(crate) fn latency(&self) -> Option<Duration> {
        match self.latency_us.load(Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Records a successful attempt that got its response headers after `latency`.
    pub(crate) fn success(&self, latency: Duration) {
        let sample = latency.as_micros().max(1) as f64;
        let old = self.latency_us.load(Relaxed);
        let new = if old == 0 {
            sample
        } else {
            old as f64 * EWMA_KEEP + sample * (1.0 - EWMA_KEEP)
        };
        self.latency_us.store(new.max(1.0) as u64, Relaxed);
        self.successes.fetch_add(1, Relaxed);
        if self.cooldown_until.load(Relaxed) != 0 {
            // A probe succeeded: back in rotation with a clean slate.
            self.cooldown_until.store(0, Relaxed);
            *self.fails.lock().unwrap_or_else(|e| e.into_inner()) = (0, 0);
        }
    }

    /// Records a failed attempt; returns true when this failure started a cooldown.
    pub(crate) fn failure(&self, policy: &CooldownConfig, elapsed: Duration) -> bool {
        self.failures.fetch_add(1, Relaxed);
        // A slow failure (a timeout) is also a latency sample, so latency-based routing learns.
        let old = self.latency_us.load(Relaxed);
        let sample = elapsed.as_micros().max(1) as f64;
        self.latency_us.store(
            if old == 0 {
                sample as u64
            } else {
                (old as f64 * EWMA_KEEP + sample * (1.0 - EWMA_KEEP)) as u64
            },
            Relaxed,
        );
        let now = now_ms();
        let until = self.cooldown_until.load(Relaxed);
        let half_open = until != 0 && until <= now;
        let mut fails = self.fails.lock().unwrap_or_else(|e| e.into_inner());
        if now.saturating_sub(fails.0) > policy.window_ms {
            *fails = (now, 0);
        }
        fails.1 += 1;
        if half_open || (fails.1 > policy.allowed_fails && until <= now) {
            *fails = (now, 0);
            self.cooldown_until
                .store(now + policy.duration_ms.max(1), Relaxed);
            self.cooldowns.fetch_add(1, Relaxed);
            return true;
        }
        false
    }

    /// The route's state now.
    pub(crate) fn state(&self, policy: &CooldownConfig) -> RouteState {
        let now = now_ms();
        match self.cooldown_until.load(Relaxed) {
            0 => {}
            until if until > now => return RouteState::CoolingDown,
            _ => return RouteState::Probing,
        }
        let fails = self.fails.lock().unwrap_or_else(|e| e.into_inner());
        if fails.1 > 0 && now.saturating_sub(fails.0) <= policy.window_ms {
            RouteState::Failing
        } else {
            RouteState::Healthy
        }
    }

    /// Whether the route may take a request now: not cooling down, and when half-open, only
    /// while no other probe is in flight.
    pub(crate) fn available(&self, now: u64) -> bool {
        match self.cooldown_until.load(Relaxed) {
            0 => true,
            until if until > now => false,
            _ => self.in_flight.load(Relaxed) == 0,
        }
    }

    /// Milliseconds of cooldown left (0 when not cooling down).
    pub(crate) fn cooldown_left_ms(&self, now: u64) -> u64 {
        self.cooldown_until.load(Relaxed).saturating_sub(now)
    }

    /// Cooldowns started so far.
    pub(crate) fn cooldowns(&self) -> u64 {
        self.cooldowns.load(Relaxed)
    }

    /// Records an active probe that passed: a cooling-down endpoint is back in rotation.
    pub(crate) fn probe_passed(&self) {
        self.last_probe.store(1, Relaxed);
        if self.cooldown_until.load(Relaxed) != 0 {
            self.cooldown_until.store(0, Relaxed);
            *self.fails.lock().unwrap_or_else(|e| e.into_inner()) = (0, 0);
        }
    }

    /// The last active probe's result, if any.
    pub(crate) fn last_probe(&self) -> Option<bool> {
        match self.last_probe.load(Relaxed) {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        }
    }

    /// Stores freshly scraped queue gauges.
    pub(crate) fn set_queue(&self, q: QueueGauges) {
        self.queue_waiting.store(q.waiting.to_bits(), Relaxed);
        self.queue_running.store(q.running.to_bits(), Relaxed);
        self.queue_kv.store(q.kv_cache.to_bits(), Relaxed);
        self.scraped_at.store(now_ms(), Relaxed);
        self.scrape_failing.store(false, Relaxed);
    }

    /// Notes a failed scrape (the gauges go stale).
    pub(crate) fn scrape_failed(&self) {
        self.scrape_failing.store(true, Relaxed);
    }

    /// The queue gauges, if scraped within `max_age_ms`.
    pub(crate) fn queue(&self, now: u64, max_age_ms: u64) -> Option<QueueGauges> {
        let at = self.scraped_at.load(Relaxed);
        if at == 0 || now.saturating_sub(at) > max_age_ms || self.scrape_failing.load(Relaxed) {
            return None;
        }
        Some(QueueGauges {
            waiting: f64::from_bits(self.queue_waiting.load(Relaxed)),
            running: f64::from_bits(self.queue_running.load(Relaxed)),
            kv_cache: f64::from_bits(self.queue_kv.load(Relaxed)),
        })
    }
}

/// A request in flight on an endpoint; dropping it ends the request there.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<EndpointStats>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// Endpoint statistics by (deployment id, endpoint URL), kept across reloads.
#[derive(Debug, Default)]
pub(crate) struct Health {
    endpoints: Mutex<HashMap<(String, String), Arc<EndpointStats>>>,
}

impl Health {
    /// The statistics of `url` of deployment `id` (created on first use).
    pub(crate) fn endpoint(&self, id: &str, url: &str) -> Arc<EndpointStats> {
        let mut map = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((id.to_string(), url.to_string()))
            .or_default()
            .clone()
    }
}

/// One endpoint of one deployment: what a group picks between.
#[derive(Debug)]
pub(crate) struct Route {
    /// The deployment.
    pub(crate) deployment: Arc<RuntimeDeployment>,
    /// Index into the deployment's endpoints.
    pub(crate) endpoint: usize,
    /// The endpoint's statistics.
    pub(crate) stats: Arc<EndpointStats>,
    /// Share of the deployment's weight (weight × 1000 / endpoints).
    pub(crate) weight: u64,
}

/// How a group is routed and retried: its RoutePolicy, or the defaults.
#[derive(Clone, Debug)]
pub(crate) struct Policy {
    /// Strategy.
    pub(crate) strategy: Strategy,
    /// Attempts in all, within the group.
    pub(crate) attempts: u32,
    /// Backoff base.
    pub(crate) backoff: Duration,
    /// Retried failure classes (`None`: all).
    pub(crate) retry_on: Option<Vec<RetryOn>>,
    /// Fallback model names.
    pub(crate) fallbacks: Vec<Arc<str>>,
    /// Context-window fallback model names.
    pub(crate) context_window_fallbacks: Vec<Arc<str>>,
    /// Cooldown.
    pub(crate) cooldown: CooldownConfig,
}

impl Policy {
    /// The runtime policy of a group with `config` (or none).
    pub(crate) fn new(config: Option<&PolicyConfig>) -> Self {
        match config {
            None => Self {
                strategy: Strategy::SimpleShuffle,
                attempts: 1,
                backoff: Duration::from_millis(100),
                retry_on: None,
                fallbacks: Vec::new(),
                context_window_fallbacks: Vec::new(),
                cooldown: CooldownConfig::default(),
            },
            Some(p) => Self {
                strategy: p.strategy,
                attempts: p.attempts.max(1),
                backoff: Duration::from_millis(p.backoff_ms),
                retry_on: (!p.retry_on.is_empty()).then(|| p.retry_on.clone()),
                fallbacks: p.fallbacks.iter().map(|s| Arc::from(s.as_str())).collect(),
                context_window_fallbacks: p
                    .context_window_fallbacks
                    .iter()
                    .map(|s| Arc::from(s.as_str()))
                    .collect(),
                cooldown: p.cooldown,
            },
        }
    }

    /// Whether a failure of class `class` on deployment `d` is retried. With no `retryOn`, a
    /// timeout on a priced deployment is not: the request may be running upstream, which bills
    /// it (the attempt is charged an estimate), and a retry would pay for it twice. Naming
    /// `timeout` in `retryOn` opts in.
    pub(crate) fn retries_on(&self, class: RetryOn, d: &RuntimeDeployment) -> bool {
        match &self.retry_on {
            Some(r) => r.contains(&class),
            None => class != RetryOn::Timeout || d.pricing == Default::default(),
        }
    }

    /// The pause before retry number `retry` (1-based): exponential from the base, with full
    /// jitter, at most 5 s.
    pub(crate) fn backoff(&self, retry: u32) -> Duration {
        let cap = self
            .backoff
            .saturating_mul(1 << retry.saturating_sub(1).min(16))
            .min(Duration::from_secs(5));
        let ms = cap.as_millis() as u64;
        if ms == 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(ms / 2 + fastrand::u64(..=ms / 2))
    }
}

/// Queue gauges older than this are stale; queue-aware routing then acts as least-busy.
pub(crate) const QUEUE_MAX_AGE_MS: u64 = 5_000;

/// Probability that latency-based routing explores a random route instead of the fastest.
const EXPLORE: f64 = 0.1;

/// Picks the route for the next attempt among `routes`, skipping the `excluded` indexes and
/// routes cooling down (unless `allow_cooling`: the last resort when nothing else is left).
pub(crate) fn pick(
    routes: &[Route],
    strategy: Strategy,
    excluded: &dyn Fn(usize) -> bool,
    allow_cooling: bool,
) -> Option<usize> {
    let now = now_ms();
    let ok = |i: usize, r: &Route| !excluded(i) && (allow_cooling || r.stats.available(now));
    if routes.len() == 1 {
        return ok(0, &routes[0]).then_some(0);
    }
    match strategy {
        Strategy::SimpleShuffle => {
            let total: u64 = routes
                .iter()
                .enumerate()
                .filter(|(i, r)| ok(*i, r))
                .map(|(_, r)| r.weight)
                .sum();
            if total == 0 {
                return random_of(routes, &ok);
            }
            let mut n = fastrand::u64(..total);
            routes
                .iter()
                .enumerate()
                .filter(|(i, r)| ok(*i, r))
                .find(|(_, r)| {
                    if n < r.weight {
                        true
                    } else {
                        n -= r.weight;
                        false
                    }
                })
                .map(|(i, _)| i)
        }
        Strategy::LeastBusy => min_by(routes, &ok, |r| r.stats.in_flight() as f64),
        Strategy::LatencyBased => {
            // Routes never timed go first; then, now and then, a random one, so a route that
            // was slow once (or has recovered) is measured again.
            if let Some(i) = routes
                .iter()
                .enumerate()
                .find(|(i, r)| ok(*i, r) && r.stats.latency().is_none())
                .map(|(i, _)| i)
            {
                return Some(i);
            }
            if fastrand::f64() < EXPLORE {
                return random_of(routes, &ok);
            }
            min_by(routes, &ok, |r| {
                r.stats.latency().map_or(0.0, |l| l.as_secs_f64())
            })
        }
        Strategy::CostBased => min_by(routes, &ok, |r| {
            let p = &r.deployment.pricing;
            // Cheapest first; among equals, the least busy.
            (p.input + p.output) as f64 * 1e3 + r.stats.in_flight() as f64
        }),
        Strategy::QueueAware => {
            let fresh = routes
                .iter()
                .enumerate()
                .filter(|(i, r)| ok(*i, r))
                .all(|(_, r)| r.stats.queue(now, QUEUE_MAX_AGE_MS).is_some());
            if fresh {
                min_by(routes, &ok, |r| {
                    let q = r.stats.queue(now, QUEUE_MAX_AGE_MS).unwrap_or_default();
                    queue_score(q, r.stats.in_flight())
                })
            } else {
                min_by(routes, &ok, |r| r.stats.in_flight() as f64)
            }
        }
    }
}

/// Queue-aware score (lower is better): requests waiting upstream, plus this gateway's own
/// requests in flight there (which the last scrape may not show yet), plus KV-cache use
/// weighted so that a nearly full cache counts like a few queued requests.
pub(crate) fn queue_score(q: QueueGauges, in_flight: u32) -> f64 {
    q.waiting + in_flight as f64 + 4.0 * q.kv_cache
}

fn random_of(routes: &[Route], ok: &dyn Fn(usize, &Route) -> bool) -> Option<usize> {
    let n = routes.iter().enumerate().filter(|(i, r)| ok(*i, r)).count();
    if n == 0 {
        return None;
    }
    let k = fastrand::usize(..n);
    routes
        .iter()
        .enumerate()
        .filter(|(i, r)| ok(*i, r))
        .nth(k)
        .map(|(i, _)| i)
}

/// The route with the lowest `score`; ties broken at random.
fn min_by(
    routes: &[Route],
    ok: &dyn Fn(usize, &Route) -> bool,
    score: impl Fn(&Route) -> f64,
) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    let mut ties = 0u32;
    for (i, r) in routes.iter().enumerate() {
        if !ok(i, r) {
            continue;
        }
        let s = score(r);
        match best {
            Some((_, b)) if s > b => {}
            Some((_, b)) if s == b => {
                ties += 1;
                if fastrand::u32(..=ties) == 0 {
                    best = Some((i, s));
                }
            }
            _ => {
                best = Some((i, s));
                ties = 0;
            }
        }
    }
    best.map(|(i, _)| i)
}

/// Reads vLLM's queue gauges from a Prometheus text exposition, summing over label sets (one
/// per engine). `None` when none of them is present.
pub(crate) fn parse_vllm_metrics(text: &str) -> Option<QueueGauges> {
    let mut q = QueueGauges::default();
    let mut found = false;
    let mut kv_new = None::<f64>;
    let mut kv_old = None::<f64>;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let rest = match line[name_end..].strip_prefix('{') {
            Some(r) => match r.find('}') {
                Some(e) => &r[e + 1..],
                None => continue,
            },
            None => &line[name_end..],
        };
        let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        if !value.is_finite() {
            continue;
        }
        match name {
            "vllm:num_requests_waiting" => q.waiting += value,
            "vllm:num_requests_running" => q.running += value,
            "vllm:kv_cache_usage_perc" => *kv_new.get_or_insert(0.0) += value,
            "vllm:gpu_cache_usage_perc" => *kv_old.get_or_insert(0.0) += value,
            _ => continue,
        }
        found = true;
    }
    q.kv_cache = kv_new.or(kv_old).unwrap_or(0.0);
    found.then_some(q)
}

/// The strategy's name as written in a RoutePolicy.
pub(crate) fn strategy_name(s: Strategy) -> &'static str {
    match s {
        Strategy::SimpleShuffle => "simple-shuffle",
        Strategy::LeastBusy => "least-busy",
        Strategy::LatencyBased => "latency-based",
        Strategy::CostBased => "cost-based",
        Strategy::QueueAware => "queue-aware",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_metrics_are_summed_over_engines() {
        let text = "# HELP vllm:num_requests_waiting Number of requests waiting.\n\
            # TYPE vllm:num_requests_waiting gauge\n\
            vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 3.0\n\
            vllm:num_requests_waiting{engine=\"1\",model_name=\"m\"} 2.0\n\
            vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 7\n\
            vllm:gpu_cache_usage_perc{engine=\"0\"} 0.9\n\
            vllm:kv_cache_usage_perc{engine=\"0\"} 0.25 1700000000\n\
            vllm:num_requests_waiting_total 99\n";
        let q = parse_vllm_metrics(text).expect("the gauges are there");
        assert_eq!(q.waiting, 5.0);
        assert_eq!(q.running, 7.0);
        assert_eq!(q.kv_cache, 0.25);
        assert_eq!(parse_vllm_metrics("http_requests_total 5\n"), None);
    }

    #[test]
    fn cooldown_opens_after_allowed_fails_and_a_probe_closes_it() {
        let s = EndpointStats::default();
        let policy = CooldownConfig {
            allowed_fails: 2,
            window_ms: 60_000,
            duration_ms: 50,
        };
        let t = Duration::from_millis(1);
        assert!(!s.failure(&policy, t));
        assert!(!s.failure(&policy, t));
        assert_eq!(s.state(&policy), RouteState::Failing);
        assert!(s.failure(&policy, t), "the third failure opens the breaker");
        assert_eq!(s.state(&policy), RouteState::CoolingDown);
        assert!(!s.available(now_ms()));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(s.state(&policy), RouteState::Probing);
        let probe = Arc::new(s);
        assert!(probe.available(now_ms()));
        let guard = probe.start();
        assert!(!probe.available(now_ms()), "one probe at a time");
        drop(guard);
        // A failed probe goes straight back to cooldown.
        assert!(probe.failure(&policy, t));
        assert_eq!(probe.state(&policy), RouteState::CoolingDown);
        std::thread::sleep(Duration::from_millis(60));
        probe.success(t);
        assert_eq!(probe.state(&policy), RouteState::Healthy);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = Policy {
            backoff: Duration::from_millis(100),
            ..Policy::new(None)
        };
        for _ in 0..50 {
            let b1 = p.backoff(1);
            assert!((50..=100).contains(&(b1.as_millis() as u64)), "{b1:?}");
            let b3 = p.backoff(3);
            assert!((200..=400).contains(&(b3.as_millis() as u64)), "{b3:?}");
            assert!(p.backoff(30) <= Duration::from_secs(5));
        }
    }
}
