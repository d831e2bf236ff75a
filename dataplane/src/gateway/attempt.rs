//! Serving one model group: pick a route by the group's strategy, admit it (limits and
//! budgets, reserved locally or in Redis), attempt it (the mock in process, or [`super::forward`]);
//! on a failure another attempt may fix, back off and pick again.

use super::forward::{forward, insert_cost, stream_response};
use super::{Attempt, Class, Ctx, DEPLOYMENT_HEADER, Failure, GroupEnd, MAX_RETRY_AFTER};
use crate::accounting::Outcome;
use crate::api::error::ApiError;
use crate::config::snapshot::RuntimeKey;
use crate::gateway::charge::Charge;
use crate::gateway::relay::SseRelay;
use crate::gateway::state::AppState;
use crate::limits::redis::FailureMode;
use crate::limits::{Ask, Refused, Reservation, Room, Scope};
use crate::routing::Route;
use crate::routing::{Group, RuntimeDeployment, Target};
use axum::body::Body;
use axum::response::Response;
use http::{HeaderValue, header};
use std::sync::Arc;
use std::time::Instant;
use tollgate_crds::policy::RetryOn;

/// Tries the group's deployments under its policy: pick, admit, attempt; on a retryable
/// failure, back off and pick again (another endpoint first).
pub(super) async fn serve_group(ctx: &mut Ctx<'_>, group: &Group, last_resort: bool) -> GroupEnd {
    let policy = &group.policy;
    let mut tried: Vec<usize> = Vec::new();
    let mut last: Option<Failure> = None;
    for attempt in 0..policy.attempts {
        let idx = match admit_route(ctx, group, &mut tried, last_resort).await {
            Admitted::Route(i) => i,
            Admitted::Exhausted(refusal) => {
                // Nothing (else) can take it. A limit refusal is the answer when nothing
                // failed before it.
                if last.is_none()
                    && let Some(e) = refusal
                {
                    last = Some(Failure {
                        answer: Err(e),
                        outcome: Outcome::Rejected,
                        class: Class::Retry(RetryOn::RateLimited),
                        retry_after: None,
                    });
                }
                break;
            }
            Admitted::Final(e) => {
                if let Some(c) = ctx.charge.take() {
                    c.settle(None, Outcome::Rejected);
                }
                return GroupEnd::Done(Err(e));
            }
        };
        let route = &group.routes[idx];
        let began = Instant::now();
        let Some(mut charge) = ctx.charge.take() else {
            return GroupEnd::Done(Err(ApiError::internal("admitted without a charge")));
        };
        charge.set_in_flight(route.stats.start());
        let result = attempt_route(ctx, route, charge, began).await;
        let f = match result {
            Attempt::Done(r) => return GroupEnd::Done(r),
            Attempt::Failed(f) => f,
        };
        let d = &route.deployment;
        if let Some(c) = ctx.charge.as_mut() {
            c.attempt_failed();
        }
        if f.class == Class::ContextWindow {
            return GroupEnd::TooLong(f);
        }
        if route.stats.failure(&policy.cooldown, began.elapsed()) {
            metrics::counter!(crate::telemetry::COOLDOWNS, "model" => d.model.to_string(), "deployment" => d.id.to_string()).increment(1);
            tracing::warn!(
                deployment = &*d.id,
                endpoint = route.endpoint,
                cooldown_ms = policy.cooldown.duration_ms,
                "deployment endpoint cooling down after repeated failures"
            );
        }
        let Class::Retry(class) = f.class else {
            unreachable!()
        };
        tried.push(idx);
        let retry_after = f.retry_after;
        last = Some(f);
        if attempt + 1 >= policy.attempts || !policy.retries_on(class, d) {
            break;
        }
        let mut pause = policy.backoff(attempt + 1);
        // A retry-after is about the endpoint that sent it: waited for only when the retry
        // would go back to it (nothing else left), and then only when it is short.
        if let Some(ra) = retry_after
            && group.routes.len() == 1
        {
            if ra > MAX_RETRY_AFTER {
                break;
            }
            pause = pause.max(ra);
        }
        tracing::debug!(deployment = &*d.id, ?class, ?pause, "retrying");
        metrics::counter!(crate::telemetry::RETRIES, "model" => group.name.to_string())
            .increment(1);
        ctx.retries += 1;
        tokio::time::sleep(pause).await;
    }
    GroupEnd::Failed(last)
}

/// The outcome of picking and admitting a route.
enum Admitted {
    Route(usize),
    /// No route can take the request: all tried, cooling down, or at their limits (the last
    /// limit refusal, if any).
    Exhausted(Option<ApiError>),
    /// Refused for good (the key's limit or budget, or limits unavailable).
    Final(ApiError),
}

/// Picks a route by the group's strategy and reserves its deployment's limits (and, on the
/// request's first admission, the key's). A deployment at its limit is skipped for another.
async fn admit_route(
    ctx: &mut Ctx<'_>,
    group: &Group,
    tried: &mut Vec<usize>,
    last_resort: bool,
) -> Admitted {
    let mut full: Vec<usize> = Vec::new();
    let mut refused: Option<Refused> = None;
    let mut reused = false;
    loop {
        let excluded = |i: usize| tried.contains(&i) || full.contains(&i);
        let picked = crate::routing::pick(&group.routes, group.policy.strategy, &excluded, false)
            .or_else(|| {
                last_resort
                    .then(|| {
                        crate::routing::pick(&group.routes, group.policy.strategy, &excluded, true)
                    })
                    .flatten()
            });
        let Some(idx) = picked else {
            // Every route was tried once: retries go round again.
            if !tried.is_empty() && !reused {
                reused = true;
                tried.clear();
                continue;
            }
            return Admitted::Exhausted(refused.map(ApiError::from));
        };
        let d = &group.routes[idx].deployment;
        let first = ctx.charge.is_none();
        // The estimate (a BPE count for OpenAI models) only when a limit or budget needs it.
        let (ask, now) = if reserves(d, first.then_some(&**ctx.key)) {
            (ctx.ask_for(d), crate::rt::clock::unix_secs())
        } else {
            (Ask::default(), 0)
        };
        let mut fresh = Reservation::default();
        let reservation = match ctx.charge.as_mut() {
            Some(c) => c.reservation_mut(),
            None => &mut fresh,
        };
        let key = first.then_some(&**ctx.key);
        match reserve(ctx.state, reservation, d, key, ask, now).await {
            Ok(room) => {
                match ctx.charge.as_mut() {
                    Some(c) => c.set_deployment(d.clone()),
                    None => {
                        ctx.room = room;
                        ctx.charge = Some(
                            Charge::new(
                                ctx.rid.clone(),
                                ctx.key.clone(),
                                d.clone(),
                                ctx.started,
                                fresh,
                                ctx.state.usage_log.clone(),
                            )
                            .with_request(ctx.body.clone(), ctx.endpoint),
                        );
                    }
                }
                return Admitted::Route(idx);
            }
            Err(Denied::Deployment(r)) => {
                full.extend(
                    group
                        .routes
                        .iter()
                        .enumerate()
                        .filter(|(_, r)| Arc::ptr_eq(&r.deployment, d))
                        .map(|(i, _)| i),
                );
                refused = Some(r);
            }
            Err(Denied::Final(e)) => return Admitted::Final(e),
        }
    }
}

/// Why a reservation was refused.
enum Denied {
    /// The deployment is at a limit: another may have room.
    Deployment(Refused),
    /// The key's limit or budget, or limits can't be checked (Redis down, failing closed).
    Final(ApiError),
}

/// Whether admitting a request to `d` (and, with `key`, the key's first admission) reserves
/// anything: a limit or budget on the deployment, the key or its team.
fn reserves(d: &RuntimeDeployment, key: Option<&RuntimeKey>) -> bool {
    d.limits.is_some() || key.is_some_and(|k| k.limits.is_some() || k.team_limits.is_some())
}

/// Reserves the request's share of `d`'s limits and, with `key`, the key's: in Redis when
/// replicas share counters, else in this process. Returns the key's room, for headers.
async fn reserve(
    state: &AppState,
    res: &mut Reservation,
    d: &RuntimeDeployment,
    key: Option<&RuntimeKey>,
    ask: Ask,
    now: u64,
) -> std::result::Result<Option<Room>, Denied> {
    if !reserves(d, key) {
        return Ok(None);
    }
    let key_limits = key.and_then(|k| k.limits.as_ref());
    let team_limits = key.and_then(|k| k.team_limits.as_ref());
    if let Some(shared) = &state.shared {
        // The key last: its room goes in the response headers.
        let asks: Vec<_> = d
            .limits
            .iter()
            .chain(team_limits)
            .chain(key_limits)
            .map(|l| (l.clone(), ask))
            .collect();
        // A lease per reserve, not per request: see `Reservation::add_shared`.
        let lease = shared.new_lease();
        match shared.reserve(&asks, &lease, now).await {
            Ok(Ok(room)) => {
                res.add_shared(shared.clone(), lease, asks, now);
                return Ok(key_limits.is_some().then_some(room));
            }
            Ok(Err(r)) if r.scope != Scope::Deployment => return Err(Denied::Final(r.into())),
            Ok(Err(r)) => return Err(Denied::Deployment(r)),
            // Redis failed and the policy is to fail open: this replica's own counters decide.
            Err(_) if shared.failure == FailureMode::Open => {}
            Err(_) => {
                return Err(Denied::Final(ApiError::unavailable(
                    "limits_unavailable",
                    "Rate limits and budgets can't be checked right now (Redis is unreachable); try again shortly.",
                )));
            }
        }
    }
    let mut taken = 0;
    if let Some(l) = &d.limits {
        res.take(l, ask, now).map_err(Denied::Deployment)?;
        taken += 1;
    }
    let mut room = None;
    for (l, is_key) in team_limits
        .map(|l| (l, false))
        .into_iter()
        .chain(key_limits.map(|l| (l, true)))
    {
        match res.take(l, ask, now) {
            Ok(r) => {
                taken += 1;
                if is_key {
                    room = Some(r);
                }
            }
            Err(r) => {
                for _ in 0..taken {
                    res.undo_last(now);
                }
                return Err(Denied::Final(r.into()));
            }
        }
    }
    Ok(room)
}

/// One attempt on one route, which `began` then. The charge is taken from the context and put
/// back when the attempt fails in a way another attempt may fix.
async fn attempt_route(
    ctx: &mut Ctx<'_>,
    route: &Route,
    charge: Charge,
    began: Instant,
) -> Attempt {
    let d = &route.deployment;
    let resp = match &d.target {
        Target::Mock(mock) => {
            if !mock.latency.is_zero() {
                tokio::time::sleep(mock.latency).await;
            }
            let usage = mock.usage(ctx.endpoint, ctx.body.len());
            let request_id = ctx.rid.to_str().unwrap_or("");
            route.stats.success(ctx.started.elapsed());
            if ctx.parsed.stream {
                // Always generate the usage chunk and let the relay drop it, so the mock is
                // accounted for exactly like a real upstream.
                let events =
                    mock.stream_events(ctx.endpoint, &ctx.parsed.model, request_id, Some(usage));
                stream_response(SseRelay::new(
                    mock.stream_body(events),
                    charge,
                    !ctx.parsed.include_usage,
                ))
            } else {
                let out = mock.response(ctx.endpoint, ctx.parsed, request_id, usage);
                let cost = charge
                    .settle(Some(usage), Outcome::Success)
                    .recorded()
                    .await;
                let mut resp = Response::new(Body::from(out));
                let h = resp.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                insert_cost(h, cost);
                resp
            }
        }
        Target::Upstream { .. } => match forward(ctx, route, charge, began).await {
            Attempt::Done(Ok(resp)) => resp,
            other => return other,
        },
    };
    let mut resp = resp;
    resp.headers_mut()
        .insert(DEPLOYMENT_HEADER, d.id_header.clone());
    Attempt::Done(Ok(resp))
}
