//! The request path, from an authenticated HTTP request to a response streaming back:
//!
//! ```text
//! authenticate (hash lookup) -> read body (size limit) -> parse (model, stream)
//!  -> authorize model -> for each group (requested, then fallbacks):
//!       for each attempt (policy.attempts): pick route (strategy) -> admit (limits)
//!         -> mock | upstream (pooled HTTP) -> on a retryable failure: back off, next route
//!  -> relay (SSE chunk by chunk, or whole body) -> settle the charge once, with real usage
//! ```
//!
//! A request is retried only while nothing has reached the client: a stream is committed once
//! the upstream answered 2xx. The key's reservation and the usage record belong to the
//! request, not the attempt, so a retried or re-routed request is counted once.
//!
//! Nothing here knows about axum's routing; the handlers in [`crate::http::server`] call
//! [`handle`] and add the request id.

pub(crate) mod auth;
pub(crate) mod charge;
pub(crate) mod ingress;
pub mod relay;
pub(crate) mod state;

use crate::accounting::Outcome;
use crate::api::error::{ApiError, Result};
use crate::api::request::{Endpoint, ParsedRequest};
use crate::config::snapshot::RuntimeKey;
use crate::gateway::auth::authenticate;
use crate::gateway::charge::Charge;
use crate::gateway::relay::SseRelay;
use crate::gateway::state::AppState;
use crate::limits::redis::FailureMode;
use crate::limits::{Ask, Refused, Reservation, Room, Scope};
use crate::routing::Route;
use crate::routing::{Group, RuntimeDeployment, Target};
use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, header};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_crds::config::TokenUsage;
use tollgate_crds::policy::RetryOn;

/// Largest upstream body read whole (non-streamed responses, error bodies).
const MAX_UPSTREAM_BODY: usize = 64 << 20;

/// `x-tollgate-deployment`.
pub(crate) const DEPLOYMENT_HEADER: HeaderName = HeaderName::from_static("x-tollgate-deployment");
/// `x-tollgate-cost-usd`.
pub(crate) const COST_HEADER: HeaderName = HeaderName::from_static("x-tollgate-cost-usd");

/// The answer to a request whose body didn't arrive within the body-read timeout.
pub(crate) fn body_timed_out() -> ApiError {
    crate::telemetry::timed_out("body_read");
    ApiError::request_timeout(
        "The request body did not arrive within the gateway's body-read timeout.",
    )
}

/// Reads the request body, refusing more than `limit` bytes, or one that takes longer than
/// `timeout` (counted from the first time the body has nothing ready, so a body that is there
/// whole, as the HTTP/1.1 server gives it, costs no timer).
async fn read_body<B>(
    headers: &HeaderMap,
    body: B,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Bytes>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    match read_all(body, limit, Some(timeout)).await {
        Ok(bytes) => Ok(bytes),
        Err(ReadError::TooLarge) => Err(ApiError::too_large(limit)),
        Err(ReadError::TimedOut) => Err(body_timed_out()),
        Err(ReadError::Read) => Err(ApiError::bad_request(
            "body_read_error",
            "The request body could not be read.",
        )),
    }
}

/// Why a body could not be read whole.
#[derive(Debug, PartialEq, Eq)]
enum ReadError {
    /// It is longer than the limit.
    TooLarge,
    /// The body failed (the connection broke, a timeout, bad framing).
    Read,
    /// It took longer than the body-read timeout.
    TimedOut,
}

/// Reads a whole body of at most `limit` bytes.
///
/// A body that arrives as one data frame (the usual case: it came in the same read as its
/// head) is returned as that frame, without a copy; more frames are joined into one buffer.
/// `http_body_util`'s `collect` queues every frame and keeps trailers, which neither body the
/// gateway reads whole needs: that was an allocation and a pass over the frames per request.
async fn read_all<B>(
    body: B,
    limit: usize,
    timeout: Option<std::time::Duration>,
) -> Result<Bytes, ReadError>
where
    B: http_body::Body<Data = Bytes>,
{
    let mut body = std::pin::pin!(body);
    let mut first: Option<Bytes> = None;
    let mut joined: Option<bytes::BytesMut> = None;
    let mut total = 0usize;
    // Armed the first time the body has nothing ready, never disarmed: a total.
    let mut deadline = crate::rt::deadline::Deadline::default();
    loop {
        let frame = std::future::poll_fn(|cx| {
            let polled = body.as_mut().poll_frame(cx);
            if let (true, Some(timeout)) = (polled.is_pending(), timeout) {
                deadline.arm(timeout);
                if deadline.poll_passed(cx) {
                    return std::task::Poll::Ready(Err(ReadError::TimedOut));
                }
            }
            polled.map(Ok)
        })
        .await?;
        let Some(frame) = frame else { break };
        let Ok(data) = frame.map_err(|_| ReadError::Read)?.into_data() else {
            continue; // trailers: not needed
        };
        total += data.len();
        if total > limit {
            return Err(ReadError::TooLarge);
        }
        if let Some(buf) = joined.as_mut() {
            buf.extend_from_slice(&data);
        } else if let Some(head) = first.take() {
            let mut buf = bytes::BytesMut::with_capacity(total.max(2 * head.len()));
            buf.extend_from_slice(&head);
            buf.extend_from_slice(&data);
            joined = Some(buf);
        } else {
            first = Some(data);
        }
    }
    Ok(joined
        .map(bytes::BytesMut::freeze)
        .or(first)
        .unwrap_or_default())
}

/// `x-tollgate-model-group`: the model group that served the request (differs from the
/// requested model after a fallback).
pub(crate) const MODEL_GROUP_HEADER: HeaderName = HeaderName::from_static("x-tollgate-model-group");
/// `x-tollgate-attempted-retries`: retries made before the answer (absent when none).
pub(crate) const RETRIES_HEADER: HeaderName =
    HeaderName::from_static("x-tollgate-attempted-retries");
/// `x-tollgate-attempted-fallbacks`: fallback groups tried (absent when none).
pub(crate) const FALLBACKS_HEADER: HeaderName =
    HeaderName::from_static("x-tollgate-attempted-fallbacks");

/// Longest upstream `retry-after` waited for before retrying the same endpoint; a longer one
/// ends the group's attempts (fallbacks are tried instead).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// What one request carries through its attempts.
struct Ctx<'a> {
    state: &'a AppState,
    endpoint: Endpoint,
    parsed: &'a ParsedRequest<'a>,
    body: &'a Bytes,
    key: &'a Arc<RuntimeKey>,
    rid: &'a HeaderValue,
    started: Instant,
    /// Estimated prompt tokens, per tokenizer family, computed when first needed.
    est_tokens: [Option<u64>; 3],
    /// Opened at the first admission, settled once at the end, whatever the attempts.
    charge: Option<Charge>,
    room: Option<Room>,
    retries: u32,
}

impl Ctx<'_> {
    /// Prompt tokens before the call, as `d`'s model counts them (see [`crate::accounting::tokens`]).
    fn prompt_tokens(&mut self, family: crate::accounting::tokens::Family) -> u64 {
        let slot = &mut self.est_tokens[family.index()];
        *slot.get_or_insert_with(|| {
            crate::accounting::tokens::estimate(family, self.endpoint, self.parsed, self.body)
        })
    }

    /// What a request reserves on `d`'s limits: its estimated prompt tokens, corrected on
    /// settlement, and their cost plus max_tokens at the output price when the request sets it.
    fn ask_for(&mut self, d: &RuntimeDeployment) -> Ask {
        let tokens = self.prompt_tokens(d.tokens);
        Ask {
            tokens,
            cost: d.pricing.cost(TokenUsage {
                prompt: tokens,
                completion: self
                    .parsed
                    .max_tokens
                    .unwrap_or(0)
                    .saturating_mul(self.parsed.choices),
                cached: 0,
            }),
        }
    }
}

/// A failure class: what is retried, or sent to a context-window fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Retry(RetryOn),
    ContextWindow,
}

/// An attempt that failed before anything reached the client, so another may be made.
struct Failure {
    /// What the client gets if no other attempt is made.
    answer: Result<Response>,
    outcome: Outcome,
    class: Class,
    retry_after: Option<Duration>,
}

/// How an attempt ended.
enum Attempt {
    /// Answered (served, or refused for a reason retrying can't fix); the charge is settled or
    /// travels with the response body.
    Done(Result<Response>),
    /// Failed; the charge is still open in the context.
    Failed(Failure),
}

/// How serving one group ended.
enum GroupEnd {
    Done(Result<Response>),
    /// Every attempt failed (or nothing was available): fallbacks may be tried.
    Failed(Option<Failure>),
    /// The prompt was too long for the group: context-window fallbacks may be tried.
    TooLong(Failure),
}

/// Serves one OpenAI API request.
pub(crate) async fn handle<B>(
    state: &AppState,
    ingress: ingress::Ingress,
    req: Request<B>,
    rid: &HeaderValue,
) -> Result<Response>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let started = Instant::now();
    let snapshot = state.snapshot.load_full();
    let (parts, body) = req.into_parts();
    let now = crate::rt::clock::unix_secs();
    let key = authenticate(&snapshot, &parts.headers, now as i64)?;
    let body = read_body(
        &parts.headers,
        body,
        state.settings.max_body_bytes,
        state.settings.bounds.body_read,
    )
    .await?;
    let endpoint = ingress.endpoint();
    let parsed = ingress.parse(&body)?;
    if !key.allows(&parsed.model) {
        return Err(ApiError::forbidden(format!(
            "This API key is not allowed to use the model `{}`. GET /v1/models lists the models it can use.",
            parsed.model
        )));
    }
    let requested = snapshot
        .groups
        .get(parsed.model.as_ref())
        .ok_or_else(|| ApiError::model_not_found(&parsed.model))?;
    let mut ctx = Ctx {
        state,
        endpoint,
        parsed: &parsed,
        body: &body,
        key: &key,
        rid,
        started,
        est_tokens: [None; 3],
        charge: None,
        room: None,
        retries: 0,
    };
    let policy = &requested.policy;
    // Groups tried so far, and the fallbacks still to try, in order.
    let mut tried_groups: Vec<&Group> = Vec::new();
    let mut group = requested;
    let mut fallbacks: &[Arc<str>] = &policy.fallbacks;
    let mut context_fallbacks: &[Arc<str>] = &policy.context_window_fallbacks;
    // A prompt that can't fit the requested model goes straight to a context-window fallback
    // that fits (when there is one; else the upstream has the last word on our estimate).
    let window = requested
        .context_window()
        .filter(|_| !context_fallbacks.is_empty());
    if let Some(window) = window
        && let Some(first) = requested.deployments.first()
        && let needed = ctx.prompt_tokens(first.tokens) + parsed.max_tokens.unwrap_or(0)
        && needed > u64::from(window)
        && let Some((g, rest)) = next_group(&snapshot, &key, context_fallbacks, Some(needed))
    {
        tried_groups.push(requested);
        group = g;
        context_fallbacks = rest;
        fallbacks = &[];
    }
    let mut last: Option<Failure> = None;
    loop {
        let last_resort = fallbacks
            .iter()
            .all(|m| !key.allows(m) || !snapshot.groups.contains_key(m.as_ref()));
        let end = serve_group(&mut ctx, group, last_resort).await;
        let next = match end {
            GroupEnd::Done(result) => {
                return result.map(|mut resp| {
                    let h = resp.headers_mut();
                    h.insert(MODEL_GROUP_HEADER, group.name_header.clone());
                    if ctx.retries > 0 {
                        h.insert(RETRIES_HEADER, HeaderValue::from(ctx.retries));
                    }
                    if !tried_groups.is_empty() {
                        h.insert(FALLBACKS_HEADER, HeaderValue::from(tried_groups.len()));
                    }
                    if let Some(room) = ctx.room {
                        room.write_headers(h);
                    }
                    resp
                });
            }
            GroupEnd::Failed(f) => {
                if f.is_some() {
                    last = f;
                }
                next_group(&snapshot, &key, fallbacks, None).inspect(|(_, rest)| fallbacks = rest)
            }
            GroupEnd::TooLong(f) => {
                last = Some(f);
                next_group(&snapshot, &key, context_fallbacks, None).inspect(|(_, rest)| {
                    context_fallbacks = rest;
                    fallbacks = &[];
                })
            }
        };
        let Some((g, _)) = next else { break };
        metrics::counter!(crate::telemetry::FALLBACKS, "from" => group.name.to_string(), "to" => g.name.to_string()).increment(1);
        tracing::info!(
            from = &*group.name,
            to = &*g.name,
            "falling back to another model"
        );
        tried_groups.push(group);
        group = g;
    }
    // Nothing served it: the last failure's answer, settled once.
    let (answer, outcome) = match last {
        Some(f) => (f.answer, f.outcome),
        None => (
            Err(ApiError::unavailable(
                "no_deployment_available",
                format!(
                    "No deployment of the model `{}` can take the request now (all are cooling down after failures, or at their limits).",
                    parsed.model
                ),
            )),
            Outcome::UpstreamError,
        ),
    };
    if let Some(c) = ctx.charge.take() {
        c.settle(None, outcome);
    }
    answer
}

/// The first model of `list` that exists, that `key` may use and (with `needed`) whose context
/// window fits, and the rest of the list after it.
fn next_group<'s, 'l>(
    snapshot: &'s crate::config::snapshot::Snapshot,
    key: &RuntimeKey,
    list: &'l [Arc<str>],
    needed: Option<u64>,
) -> Option<(&'s Group, &'l [Arc<str>])> {
    list.iter().enumerate().find_map(|(i, m)| {
        let g = snapshot.groups.get(m.as_ref())?;
        let fits = needed.is_none_or(|n| g.context_window().is_none_or(|w| u64::from(w) >= n));
        (key.allows(m) && fits).then(|| (g, &list[i + 1..]))
    })
}

/// Tries the group's deployments under its policy: pick, admit, attempt; on a retryable
/// failure, back off and pick again (another endpoint first).
async fn serve_group(ctx: &mut Ctx<'_>, group: &Group, last_resort: bool) -> GroupEnd {
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

fn insert_cost(h: &mut HeaderMap, cost: tollgate_crds::config::Picodollars) {
    let mut buf = [0u8; 40];
    if let Some(v) = crate::rt::values::header_value(cost.write_usd(&mut buf)) {
        h.insert(COST_HEADER, v);
    }
}

fn stream_response<B>(relay: SseRelay<B>) -> Response
where
    SseRelay<B>: http_body::Body<Data = Bytes, Error = Box<dyn std::error::Error + Send + Sync>>
        + Send
        + 'static,
{
    let mut resp = Response::new(Body::new(relay));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// Sends the request to an HTTP route (the attempt `began` then: its deadlines count from
/// there) and relays the answer. A failure before anything reached the client puts the charge
/// back in `ctx` and reports what kind of failure it was.
async fn forward(ctx: &mut Ctx<'_>, route: &Route, charge: Charge, began: Instant) -> Attempt {
    let d: &RuntimeDeployment = &route.deployment;
    let id = d.id.clone();
    let Some((adapter, upstream, uri, auth)) = d.uri(ctx.endpoint, route.endpoint) else {
        charge.settle(None, Outcome::UpstreamError);
        return Attempt::Done(Err(ApiError::internal("deployment has no upstream URI")));
    };
    // For https: built again only if a pooled connection turns out closed under it (see
    // upstream::send_to).
    let (parsed, body) = (ctx.parsed, ctx.body);
    let make = || {
        let mut req = Request::new(adapter.request_body(parsed, body, &d.upstream_model));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri.clone();
        let h = req.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some((name, value)) = auth {
            h.insert(name.clone(), value.clone());
        }
        req
    };
    let t = d.timeouts;
    let deadline = t
        .total_ms
        .map(|ms| tokio::time::Instant::from_std(began) + Duration::from_millis(ms));
    let first_byte = Duration::from_millis(t.first_byte_ms);
    let fail = |ctx: &mut Ctx<'_>, charge: Charge, class: RetryOn, e: ApiError| {
        ctx.charge = Some(charge);
        Attempt::Failed(Failure {
            answer: Err(e),
            outcome: Outcome::UpstreamError,
            class: Class::Retry(class),
            retry_after: None,
        })
    };
    let connect = Duration::from_millis(t.connect_ms);
    let headers_by = tokio::time::Instant::from_std(began) + first_byte;
    let headers_by = deadline.map_or(headers_by, |dl| dl.min(headers_by));
    // Plain HTTP: the head was written when the config loaded; only the body is per request.
    // `h1` keeps the deadline's timer with the connection (no timer per request).
    let send = match &upstream.plain {
        Some(plain) => futures_util::future::Either::Left(crate::upstream::send_with_head(
            &plain.origin,
            connect,
            &plain.heads[ctx.endpoint.index()],
            adapter.request_body(parsed, body, &d.upstream_model),
            headers_by,
        )),
        // Boxed: hyper's client future would otherwise make every request's state (and so
        // every connection's task, idle or not) 536 bytes larger, plain HTTP included. One
        // allocation per https request, next to a TLS round trip.
        None => futures_util::future::Either::Right(Box::pin(async {
            tokio::time::timeout_at(headers_by, crate::upstream::send_to(None, connect, make))
                .await
                .unwrap_or_else(|_| Err(crate::upstream::SendError::timed_out()))
        })),
    };
    let mut charge = charge;
    charge.sending(|| ctx.ask_for(d));
    let resp = match send.await {
        Err(e) if e.is_timeout() => {
            // The request may be running upstream: the attempt keeps its charge (an estimate),
            // and is retried only where the policy says so (see `RoutePolicy` retryOn).
            let waited = began.elapsed();
            return fail(
                ctx,
                charge,
                RetryOn::Timeout,
                ApiError::timeout(format!(
                    "Deployment {id} did not answer within {waited:.1?}."
                )),
            );
        }
        Err(e) => {
            // No connection, or one that ended before any answer: the upstream did no work
            // it answered for (see docs/limits-and-budgets.md for this bound).
            charge.no_work();
            let e = if e.is_connect() {
                ApiError::unavailable(
                    "upstream_unreachable",
                    format!("Could not connect to deployment {id}; is the upstream running?"),
                )
            } else {
                ApiError::bad_gateway(
                    "upstream_connection_error",
                    format!("The connection to deployment {id} failed before a response."),
                )
            };
            return fail(ctx, charge, RetryOn::ConnectError, e);
        }
        Ok(resp) => resp,
    };
    let status = resp.status();
    if !status.is_success() {
        // An error answer: no work to bill.
        charge.no_work();
    }
    let (parts, incoming) = resp.into_parts();
    if status.is_success() && ctx.parsed.stream {
        route.stats.success(began.elapsed());
        // From here the client gets bytes: no more retries for this request.
        let whole_reads = incoming.frames_are_whole_reads();
        return Attempt::Done(Ok(stream_response(
            SseRelay::new(
                crate::upstream::Deadline::new(incoming, deadline)
                    .idle(t.idle_ms.map(Duration::from_millis)),
                charge,
                !ctx.parsed.include_usage,
            )
            .wait_for_more(!whole_reads),
        )));
    }
    let read = read_all(incoming, MAX_UPSTREAM_BODY, None);
    let read = match deadline {
        Some(dl) => tokio::time::timeout_at(dl, read).await.ok(),
        None => Some(read.await),
    };
    // A 2xx is work the upstream did: whatever goes wrong reading it, it is charged (an
    // estimate when its usage can't be read) and not sent again.
    let unread = |ctx: &mut Ctx<'_>, charge: Charge, class: RetryOn, e: ApiError| {
        if status.is_success() {
            charge.settle(None, Outcome::UpstreamError);
            Attempt::Done(Err(e))
        } else {
            fail(ctx, charge, class, e)
        }
    };
    let bytes = match read {
        Some(Ok(bytes)) => bytes,
        Some(Err(_)) => {
            return unread(
                ctx,
                charge,
                RetryOn::ConnectError,
                ApiError::bad_gateway(
                    "upstream_read_error",
                    format!("Reading the response of deployment {id} failed."),
                ),
            );
        }
        None => {
            let e = ApiError::timeout(format!(
                "Deployment {id} did not finish within its total timeout."
            ));
            return unread(ctx, charge, RetryOn::Timeout, e);
        }
    };
    if status.is_success() {
        let Ok(usage) = crate::api::usage::from_response(&bytes) else {
            charge.settle(None, Outcome::UpstreamError);
            return Attempt::Done(Err(ApiError::bad_gateway(
                "upstream_invalid_response",
                format!("Deployment {id} returned a response that is not JSON."),
            )));
        };
        if usage.is_none() {
            // No usage in a 2xx: charged an estimate from the prompt and the text generated.
            crate::api::usage::generated_text(&bytes, |text| charge.relayed(text));
        }
        route.stats.success(began.elapsed());
        let cost = charge.settle(usage, Outcome::Success).recorded().await;
        let mut out = Response::new(Body::from(bytes));
        *out.status_mut() = status;
        let h = out.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            parts
                .headers
                .get(header::CONTENT_TYPE)
                .cloned()
                .unwrap_or(HeaderValue::from_static("application/json")),
        );
        insert_cost(h, cost);
        return Attempt::Done(Ok(out));
    }
    match upstream_error(status, &parts.headers, bytes, &id) {
        Attempt::Failed(f) => {
            ctx.charge = Some(charge);
            Attempt::Failed(f)
        }
        done => {
            charge.settle(None, Outcome::Rejected);
            done
        }
    }
}

/// Whether an upstream error body says the prompt was too long for the model (OpenAI's
/// `context_length_exceeded`, vLLM's and others' wording).
fn is_context_length_error(body: &[u8]) -> bool {
    const NEEDLES: [&[u8]; 4] = [
        b"context_length_exceeded",
        b"maximum context length",
        b"prompt is too long",
        b"context window",
    ];
    NEEDLES
        .iter()
        .any(|n| memchr::memmem::find(body, n).is_some())
}

/// Maps an upstream error status. Client errors the upstream explains in OpenAI's shape (a bad
/// parameter) reach the client as sent ([`Attempt::Done`]). Everything another attempt may fix comes
/// back as [`Attempt::Failed`] whose answer never echoes the upstream body: auth failures (the
/// gateway's credentials), 429, 5xx; and a prompt too long for the model, which goes to
/// context-window fallbacks when there are any.
fn upstream_error(status: StatusCode, headers: &HeaderMap, body: Bytes, id: &Arc<str>) -> Attempt {
    let openai_shaped = serde_json::from_slice::<serde_json::Value>(&body)
        .is_ok_and(|v| v.get("error").is_some_and(|e| e.is_object()));
    let retry_after = headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let failure = |class: RetryOn, e: ApiError| Failure {
        answer: Err(e),
        outcome: Outcome::UpstreamError,
        class: Class::Retry(class),
        retry_after: retry_after.map(Duration::from_secs),
    };
    let passthrough = |body: Bytes| {
        let mut out = Response::new(Body::from(body));
        *out.status_mut() = status;
        out.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(ra) = headers.get(header::RETRY_AFTER) {
            out.headers_mut().insert(header::RETRY_AFTER, ra.clone());
        }
        out
    };
    match status.as_u16() {
        401 | 403 => Attempt::Failed(failure(
            RetryOn::ServerError,
            ApiError::bad_gateway(
                "upstream_auth_error",
                format!(
                    "Deployment {id} refused the gateway's credentials (HTTP {}). Check the LLMModel's credentialsRef.",
                    status.as_u16()
                ),
            ),
        )),
        429 => {
            let mut e = ApiError::bad_gateway(
                "upstream_rate_limited",
                format!("Deployment {id} is rate limited (HTTP 429)."),
            );
            e.status = StatusCode::TOO_MANY_REQUESTS;
            e.retry_after = retry_after;
            Attempt::Failed(failure(RetryOn::RateLimited, e))
        }
        400..=499 if is_context_length_error(&body) => {
            let answer = if openai_shaped {
                Ok(passthrough(body))
            } else {
                let mut e = ApiError::bad_request(
                    "context_length_exceeded",
                    format!("The prompt is too long for the context window of deployment {id}."),
                );
                e.status = status;
                Err(e)
            };
            Attempt::Failed(Failure {
                answer,
                outcome: Outcome::Rejected,
                class: Class::ContextWindow,
                retry_after: None,
            })
        }
        400..=499 if openai_shaped => Attempt::Done(Ok(passthrough(body))),
        400..=499 => {
            let mut e = ApiError::bad_request(
                "upstream_rejected",
                format!(
                    "Deployment {id} rejected the request (HTTP {}).",
                    status.as_u16()
                ),
            );
            e.status = status;
            Attempt::Done(Err(e))
        }
        _ => Attempt::Failed(failure(
            RetryOn::ServerError,
            ApiError::bad_gateway(
                "upstream_server_error",
                format!("Deployment {id} failed (HTTP {}).", status.as_u16()),
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A body that hands over the given frames, one per poll, each after a `Pending`.
    struct Frames(VecDeque<Result<Bytes, std::io::Error>>, bool);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
            self.1 = !self.1;
            if self.1 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(self.0.pop_front().map(|r| r.map(http_body::Frame::data)))
        }
    }

    fn frames(parts: &[&'static str]) -> Frames {
        Frames(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p.as_bytes())))
                .collect(),
            false,
        )
    }

    #[tokio::test]
    async fn a_body_is_read_whole_and_a_single_frame_is_not_copied() {
        let one = Bytes::from_static(b"{\"model\":\"m\"}");
        let got = read_all(Frames(VecDeque::from([Ok(one.clone())]), false), 100, None)
            .await
            .expect("read");
        assert_eq!(got.as_ptr(), one.as_ptr(), "the frame itself, not a copy");
        let got = read_all(frames(&["ab", "", "cde", "f"]), 6, None).await;
        assert_eq!(got, Ok(Bytes::from_static(b"abcdef")));
        assert_eq!(read_all(frames(&[]), 6, None).await, Ok(Bytes::new()));
    }

    #[tokio::test]
    async fn a_body_over_the_limit_or_broken_is_refused() {
        assert_eq!(
            read_all(frames(&["abc", "defg"]), 6, None).await,
            Err(ReadError::TooLarge)
        );
        let broken = Frames(
            VecDeque::from([
                Ok(Bytes::from_static(b"abc")),
                Err(std::io::Error::other("reset")),
            ]),
            false,
        );
        assert_eq!(read_all(broken, 6, None).await, Err(ReadError::Read));
    }

    /// The size of the future `f` returns, without calling it.
    fn returned_size<A, B, C, D, F>(_: impl Fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn an_attempt_on_plain_http_does_not_carry_the_https_client() {
        let size = returned_size(
            |c: &'static mut Ctx<'static>, r: &'static Route, ch: Charge, b: Instant| {
                forward(c, r, ch, b)
            },
        );
        // Every request's state is in its connection's task, idle or not; hyper's client future,
        // needed only for https, is boxed (2,816 → 2,280 bytes in a release build, 2,880 →
        // 2,344 in a debug one).
        assert!(size < 2600, "forward's future is {size} bytes");
    }
}
