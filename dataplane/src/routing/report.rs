//! What operators see of routing: the `GET /health` report and the routing gauges of
//! `/metrics`. No URLs and no secrets.

use super::{Groups, QUEUE_MAX_AGE_MS, RouteState, Strategy, now_ms, strategy_name};
use std::fmt::Write;
use std::sync::Arc;

/// The health of every route, as `GET /health` shows it (no URLs, no secrets), and whether any
/// route of any model can serve.
pub(crate) fn health_report(groups: &Groups) -> (serde_json::Value, bool) {
    use serde_json::json;
    let now = now_ms();
    let mut healthy = Vec::new();
    let mut unhealthy = Vec::new();
    let mut models = serde_json::Map::new();
    let mut usable = false;
    let mut names: Vec<_> = groups.keys().collect();
    names.sort();
    for name in names {
        let g = &groups[name];
        let mut deployments = Vec::new();
        for d in &g.deployments {
            let mut endpoints = Vec::new();
            for r in g.routes.iter().filter(|r| Arc::ptr_eq(&r.deployment, d)) {
                let state = r.stats.state(&g.policy.cooldown);
                let entry = json!({"model": name, "deployment": &*d.id, "endpoint": r.endpoint});
                if state == RouteState::CoolingDown {
                    unhealthy.push(entry);
                } else {
                    usable = true;
                    healthy.push(entry);
                }
                let mut e = json!({
                    "endpoint": r.endpoint,
                    "state": state.as_str(),
                    "in_flight": r.stats.in_flight(),
                    "latency_ms": r.stats.latency().map(|l| l.as_secs_f64() * 1e3),
                    "cooldown_remaining_ms": r.stats.cooldown_left_ms(now),
                    "cooldowns": r.stats.cooldowns(),
                });
                if r.deployment.health_check.is_some() {
                    e["probe"] =
                        json!(
                            r.stats
                                .last_probe()
                                .map(|ok| if ok { "passed" } else { "failed" })
                        );
                }
                if g.policy.strategy == Strategy::QueueAware {
                    e["queue"] = match r.stats.queue(now, QUEUE_MAX_AGE_MS) {
                        Some(q) => {
                            json!({"waiting": q.waiting, "running": q.running, "kv_cache_usage": q.kv_cache})
                        }
                        None => json!(null),
                    };
                }
                endpoints.push(e);
            }
            deployments.push(json!({"id": &*d.id, "endpoints": endpoints}));
        }
        models.insert(
            name.clone(),
            json!({"strategy": strategy_name(g.policy.strategy), "deployments": deployments}),
        );
    }
    let ready = usable || groups.is_empty();
    (
        json!({
            "healthy_count": healthy.len(),
            "unhealthy_count": unhealthy.len(),
            "healthy_endpoints": healthy,
            "unhealthy_endpoints": unhealthy,
            "models": models,
        }),
        ready,
    )
}

/// Routing gauges for `/metrics`: endpoints per state and requests in flight, per
/// deployment.
pub(crate) fn render_routes(groups: &Groups, out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP tollgate_deployment_endpoints Endpoints of a deployment, by routing state.\n# TYPE tollgate_deployment_endpoints gauge"
    );
    let mut in_flight = Vec::new();
    for (model, g) in groups {
        for d in &g.deployments {
            let mut counts = [0u32; 4];
            let mut busy = 0u64;
            for r in g
                .routes
                .iter()
                .filter(|r| std::sync::Arc::ptr_eq(&r.deployment, d))
            {
                let i = match r.stats.state(&g.policy.cooldown) {
                    RouteState::Healthy => 0,
                    RouteState::Failing => 1,
                    RouteState::CoolingDown => 2,
                    RouteState::Probing => 3,
                };
                counts[i] += 1;
                busy += u64::from(r.stats.in_flight());
            }
            let (m, id) = (
                crate::telemetry::label(model),
                crate::telemetry::label(&d.id),
            );
            for (state, n) in ["healthy", "failing", "cooling_down", "probing"]
                .iter()
                .zip(counts)
            {
                let _ = writeln!(
                    out,
                    "tollgate_deployment_endpoints{{model=\"{m}\",deployment=\"{id}\",state=\"{state}\"}} {n}"
                );
            }
            in_flight.push((m, id, busy));
        }
    }
    let _ = writeln!(
        out,
        "# HELP tollgate_deployment_in_flight Requests in flight to a deployment.\n# TYPE tollgate_deployment_in_flight gauge"
    );
    for (m, id, n) in in_flight {
        let _ = writeln!(
            out,
            "tollgate_deployment_in_flight{{model=\"{m}\",deployment=\"{id}\"}} {n}"
        );
    }
}
