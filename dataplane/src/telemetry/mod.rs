//! Prometheus metrics: the metric names (a leaf every layer may use), the recorder, and label
//! escaping.
//!
//! Request counts and latency histograms go through the `metrics` facade with handles
//! registered per deployment when a snapshot is built (an increment is an atomic add, no label
//! lookup). Token and spend totals are rendered at scrape time straight from the ledger's exact
//! counters (`accounting::render`), and routing's gauges beside them (`routing::report`). Labels
//! are model and deployment names, which the config bounds; per-key series are opt-in
//! (`--per-key-metrics`).

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// `tollgate_requests_total{model,deployment,outcome}`.
pub(crate) const REQUESTS: &str = "tollgate_requests_total";
/// `tollgate_request_duration_seconds{model,deployment}`.
pub(crate) const DURATION: &str = "tollgate_request_duration_seconds";
/// `tollgate_time_to_first_byte_seconds{model,deployment}`.
pub(crate) const TTFB: &str = "tollgate_time_to_first_byte_seconds";
/// `tollgate_rejected_requests_total{code}`: requests refused before reaching a deployment.
pub(crate) const REJECTED: &str = "tollgate_rejected_requests_total";
/// `tollgate_redis_errors_total{op}`: failed Redis calls (the request then fails open or closed).
pub(crate) const REDIS_ERRORS: &str = "tollgate_redis_errors_total";
/// `tollgate_redis_settlements_dropped_total`: settlements dropped while Redis failed, past the
/// backlog kept to send again (their leases then charge their reserved cost when they end).
pub(crate) const REDIS_SETTLEMENTS_DROPPED: &str = "tollgate_redis_settlements_dropped_total";
/// `tollgate_redis_up`: 1 while the last Redis call succeeded.
pub(crate) const REDIS_UP: &str = "tollgate_redis_up";
/// `tollgate_retries_total{model}`: attempts retried within a model group.
pub(crate) const RETRIES: &str = "tollgate_retries_total";
/// `tollgate_fallbacks_total{from,to}`: requests passed on to a fallback model.
pub(crate) const FALLBACKS: &str = "tollgate_fallbacks_total";
/// `tollgate_cooldowns_total{model,deployment}`: endpoints taken out of rotation.
pub(crate) const COOLDOWNS: &str = "tollgate_cooldowns_total";
/// `tollgate_estimated_usage_total{model,deployment}`: requests charged an estimate because
/// the upstream did work and reported no usage.
pub(crate) const ESTIMATED: &str = "tollgate_estimated_usage_total";
/// `tollgate_upstream_resends_total`: requests sent again on a new connection because a pooled
/// one failed while the request was being written (nothing of it reached the upstream whole).
pub(crate) const RESENDS: &str = "tollgate_upstream_resends_total";
/// `tollgate_config_reloads_total{result}`.
pub(crate) const RELOADS: &str = "tollgate_config_reloads_total";
/// Client connections closed at once because `--max-connections` were open.
pub(crate) const CONNECTIONS_REFUSED: &str = "tollgate_connections_refused_total";
/// Client connections ended by a bound: `header_read`, `body_read` or `write_stall`.
pub(crate) const CONNECTIONS_TIMED_OUT: &str = "tollgate_connections_timed_out_total";
/// `tollgate_usage_stream_dropped_total`: usage records dropped from the Redis stream's backlog
/// past [`crate::accounting::usage_log::STREAM_BACKLOG`] while Redis failed (the usage log file keeps them).
pub(crate) const USAGE_STREAM_DROPPED: &str = "tollgate_usage_stream_dropped_total";
/// `tollgate_usage_log_compactions_total`: times the usage log passed `--usage-log-max-bytes`
/// and was rewritten as per-subject totals.
pub(crate) const USAGE_LOG_COMPACTIONS: &str = "tollgate_usage_log_compactions_total";

/// Latency buckets (seconds): fine at the low end, where a gateway's own overhead lives, and up
/// to the minutes a long generation takes.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

/// Installs the global recorder. Call once, from the binary.
pub(crate) fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)?
        .install_recorder()?;
    metrics::describe_counter!(REQUESTS, "Requests proxied to a deployment, by outcome.");
    metrics::describe_histogram!(
        DURATION,
        metrics::Unit::Seconds,
        "Time from request to the end of the response."
    );
    metrics::describe_histogram!(
        TTFB,
        metrics::Unit::Seconds,
        "Time from request to the first response byte."
    );
    metrics::describe_counter!(REJECTED, "Requests refused by the gateway, by error code.");
    metrics::describe_counter!(RELOADS, "Config reloads, by result.");
    metrics::describe_counter!(
        ESTIMATED,
        "Requests charged an estimate: the upstream did work and reported no usage."
    );
    metrics::describe_counter!(
        RESENDS,
        "Requests sent again on a new connection: a pooled one was closed for idleness as they went out."
    );
    metrics::describe_counter!(
        CONNECTIONS_REFUSED,
        "Client connections closed at once because --max-connections were open."
    );
    metrics::describe_counter!(
        CONNECTIONS_TIMED_OUT,
        "Client requests or connections ended by a timeout, by which (header_read, body_read, write_stall)."
    );
    metrics::describe_counter!(
        USAGE_STREAM_DROPPED,
        "Usage records dropped from the Redis stream's backlog while Redis failed."
    );
    metrics::describe_counter!(
        USAGE_LOG_COMPACTIONS,
        "Times the usage log was rewritten as per-subject totals (--usage-log-max-bytes)."
    );
    metrics::describe_counter!(RETRIES, "Attempts retried within a model group.");
    metrics::describe_counter!(FALLBACKS, "Requests passed on to a fallback model.");
    metrics::describe_counter!(
        REDIS_SETTLEMENTS_DROPPED,
        "Redis settlements dropped past the backlog kept while Redis failed."
    );
    metrics::describe_counter!(
        COOLDOWNS,
        "Deployment endpoints taken out of rotation after repeated failures."
    );
    Ok(handle)
}

pub(crate) fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Counts a connection or request ended by one of its bounds (header read, body read, write stall).
pub(crate) fn timed_out(which: &'static str) {
    metrics::counter!(CONNECTIONS_TIMED_OUT, "timeout" => which).increment(1);
}
