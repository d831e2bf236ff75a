//! Background tasks that keep routing's view of endpoints fresh: active health probes, and
//! scraping vLLM's queue gauges for queue-aware groups. Each round reads the current config's
//! groups through the handle it was given, so reloads are followed.

use super::{EndpointStats, Groups, QueueGauges, Strategy, Target, now_ms, parse_vllm_metrics};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// Scrapes the `/metrics` of every endpoint of every queue-aware group, every `interval`, for
/// as long as the process runs. Reads the current groups (`current()`) each round, so reloads are followed.
pub(crate) async fn scrape_queues<S: AsRef<Groups>>(
    current: impl Fn() -> Arc<S>,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timeout = interval.clamp(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        tick.tick().await;
        let snapshot = current();
        let groups: &Groups = (*snapshot).as_ref();
        let targets: Vec<(http::Uri, Arc<EndpointStats>)> = groups
            .values()
            .filter(|g| g.policy.strategy == Strategy::QueueAware)
            .flat_map(|g| g.routes.iter())
            .filter_map(|r| match &r.deployment.target {
                Target::Upstream { endpoints, .. } => endpoints
                    .get(r.endpoint)
                    .and_then(|e| e.metrics.clone())
                    .map(|u| (u, r.stats.clone())),
                Target::Mock(_) => None,
            })
            .collect();
        if targets.is_empty() {
            continue;
        }
        futures_util::future::join_all(targets.into_iter().map(|(uri, stats)| async move {
            match tokio::time::timeout(timeout, scrape(uri.clone())).await {
                Ok(Some(q)) => stats.set_queue(q),
                _ => {
                    tracing::debug!(%uri, "queue metrics scrape failed");
                    stats.scrape_failed();
                }
            }
        }))
        .await;
    }
}

/// Probes every endpoint of every deployment with a `healthCheck`, each on its own interval,
/// for as long as the process runs. A failed probe is a failure like a failed request (it can
/// start a cooldown); a passing one ends a cooldown.
pub(crate) async fn probe_endpoints<S: AsRef<Groups>>(current: impl Fn() -> Arc<S>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let snapshot = current();
        let groups: &Groups = (*snapshot).as_ref();
        let now = now_ms();
        for g in groups.values() {
            for r in &g.routes {
                let (
                    Some(h),
                    Target::Upstream {
                        endpoints, auth, ..
                    },
                ) = (&r.deployment.health_check, &r.deployment.target)
                else {
                    continue;
                };
                let Some(uri) = endpoints.get(r.endpoint).and_then(|e| e.probe.clone()) else {
                    continue;
                };
                if r.stats.next_probe.load(Relaxed) > now {
                    continue;
                }
                r.stats.next_probe.store(now + h.interval_ms, Relaxed);
                let (stats, auth, cooldown) = (r.stats.clone(), auth.clone(), g.policy.cooldown);
                let (timeout, id) = (Duration::from_millis(h.timeout_ms), r.deployment.id.clone());
                let model = r.deployment.model.clone();
                tokio::spawn(async move {
                    let started = Instant::now();
                    let mut req = http::Request::new(bytes::Bytes::new());
                    *req.uri_mut() = uri;
                    if let Some((name, value)) = auth {
                        req.headers_mut().insert(name, value);
                    }
                    let ok = matches!(
                        tokio::time::timeout(timeout, crate::upstream::send(timeout, req)).await,
                        Ok(Ok(resp)) if resp.status().is_success()
                    );
                    if ok {
                        stats.probe_passed();
                    } else {
                        stats.last_probe.store(2, Relaxed);
                        if stats.failure(&cooldown, started.elapsed()) {
                            metrics::counter!(crate::telemetry::COOLDOWNS, "model" => model.to_string(), "deployment" => id.to_string()).increment(1);
                            tracing::warn!(
                                deployment = &*id,
                                "health probe failed; endpoint cooling down"
                            );
                        }
                    }
                });
            }
        }
    }
}

/// One scrape: GET `uri`, parse vLLM's gauges.
async fn scrape(uri: http::Uri) -> Option<QueueGauges> {
    use http_body_util::BodyExt;
    let mut req = http::Request::new(bytes::Bytes::new());
    *req.uri_mut() = uri;
    let resp = crate::upstream::send(Duration::from_secs(2), req)
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let body = http_body_util::Limited::new(resp.into_body(), 4 << 20)
        .collect()
        .await
        .ok()?
        .to_bytes();
    parse_vllm_metrics(std::str::from_utf8(&body).ok()?)
}
