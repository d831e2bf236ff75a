//! The request path, from an authenticated HTTP request to a response streaming back, one
//! file per phase:
//!
//! ```text
//! authenticate (auth: hash lookup) -> read body (body: size and time bounds)
//!  -> parse (ingress: the client API's body into the internal request) -> authorize model
//!  -> [cache step: a stored answer may be served here, before routing; see below]
//!  -> for each group (requested, then fallbacks; here):
//!       for each attempt (policy.attempts; attempt): pick route (strategy) -> admit (limits)
//!         -> mock in process | upstream (forward: the provider adapter's wire request, pooled
//!            HTTP) -> on a retryable failure: back off, next route
//!  -> relay (relay: SSE chunk by chunk, or the whole body) -> settle the charge once, with
//!     real usage (charge)
//! ```
//!
//! A request is retried only while nothing has reached the client: a stream is committed once
//! the upstream answered 2xx. The key's reservation and the usage record belong to the
//! request, not the attempt, so a retried or re-routed request is counted once.
//!
//! The cache step (issue "Response caching") goes between authorizing the model and the first
//! group: a hit is answered there, before routing, limits and any upstream, and a complete 2xx
//! answer is offered to the cache where [`forward`] and the mock settle it. Nothing is cached
//! today: `RoutePolicy.spec.cache` is validated by the config compiler and not yet served.
//!
//! Nothing here knows about axum's routing; the handlers in [`crate::http::server`] call
//! [`handle`] and add the request id.

pub(crate) mod attempt;
pub(crate) mod auth;
pub(crate) mod body;
pub(crate) mod charge;
pub(crate) mod forward;
pub(crate) mod ingress;
pub mod relay;
pub(crate) mod state;

use crate::accounting::Outcome;
use crate::api::error::{ApiError, Result};
use crate::api::request::{Endpoint, ParsedRequest};
use crate::config::snapshot::RuntimeKey;
use crate::gateway::auth::authenticate;
use crate::gateway::charge::Charge;
use crate::gateway::state::AppState;
use crate::limits::{Ask, Room};
use crate::routing::{Group, RuntimeDeployment};
use attempt::serve_group;
use axum::response::Response;
use body::read_body;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_crds::config::TokenUsage;
use tollgate_crds::policy::RetryOn;

/// `x-tollgate-deployment`.
pub(crate) const DEPLOYMENT_HEADER: HeaderName = HeaderName::from_static("x-tollgate-deployment");
/// `x-tollgate-cost-usd`.
pub(crate) const COST_HEADER: HeaderName = HeaderName::from_static("x-tollgate-cost-usd");

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
