//! The request path, from an authenticated HTTP request to a response streaming back:
//!
//! ```text
//! authenticate (hash lookup) -> read body (size limit) -> parse (model, stream)
//!  -> authorize model -> pick deployment -> mock | upstream (pooled HTTP)
//!  -> relay (SSE chunk by chunk, or whole body) -> settle the charge with real usage
//! ```
//!
//! Nothing here knows about axum's routing; the handlers in [`crate::server`] call
//! [`handle`] and add the request id.

use crate::accounting::{Charge, Outcome};
use crate::auth::authenticate;
use crate::error::{ApiError, Result};
use crate::limits::{Ask, Reservation, Room, Scope};
use crate::request::{Endpoint, ParsedRequest};
use crate::shared::FailureMode;
use crate::snapshot::{Group, RuntimeKey};
use crate::snapshot::{RuntimeDeployment, Target};
use crate::sse::SseRelay;
use crate::state::AppState;
use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_crds::config::TokenUsage;

/// Largest upstream body read whole (non-streamed responses, error bodies).
const MAX_UPSTREAM_BODY: usize = 64 << 20;

/// `x-tollgate-deployment`.
pub const DEPLOYMENT_HEADER: &str = "x-tollgate-deployment";
/// `x-tollgate-cost-usd`.
pub const COST_HEADER: &str = "x-tollgate-cost-usd";

/// Reads the request body, refusing more than `limit` bytes.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::too_large(limit))
        }
        Err(_) => Err(ApiError::bad_request(
            "body_read_error",
            "The request body could not be read.",
        )),
    }
}

/// Serves one OpenAI API request.
pub async fn handle(
    state: &AppState,
    endpoint: Endpoint,
    req: Request<Body>,
    rid: &HeaderValue,
) -> Result<Response> {
    let started = Instant::now();
    let request_id = rid.to_str().unwrap_or("");
    let snapshot = state.snapshot.load_full();
    let (parts, body) = req.into_parts();
    let now = crate::limits::unix_now();
    let key = authenticate(&snapshot, &parts.headers, now as i64)?;
    let body = read_body(&parts.headers, body, state.settings.max_body_bytes).await?;
    let parsed = ParsedRequest::parse(&body, endpoint)?;
    if !key.allows(&parsed.model) {
        return Err(ApiError::forbidden(format!(
            "This API key is not allowed to use the model `{}`. GET /v1/models lists the models it can use.",
            parsed.model
        )));
    }
    let group = snapshot
        .groups
        .get(parsed.model.as_ref())
        .ok_or_else(|| ApiError::model_not_found(&parsed.model))?;
    let first = group.pick().ok_or_else(|| {
        ApiError::unavailable(
            "no_deployment",
            format!("The model `{}` has no deployment.", parsed.model),
        )
    })?;
    // Prompt tokens before the call: bytes / 4, an over-estimate for JSON bodies, corrected on
    // settlement. The cost estimate adds max_tokens at the output price when the request sets it.
    let est_tokens = (body.len() as u64 / 4).max(1);
    let ask_for = |d: &RuntimeDeployment| Ask {
        tokens: est_tokens,
        cost: d.pricing.cost(TokenUsage {
            prompt: est_tokens,
            completion: parsed.max_tokens.unwrap_or(0),
            cached: 0,
        }),
    };
    let (deployment, reservation, room) = admit(state, group, first, &key, &ask_for, now).await?;
    let charge = Charge::new(
        rid.clone(),
        key,
        deployment.clone(),
        started,
        reservation,
        state.usage_log.clone(),
    );
    let resp = match &deployment.target {
        Target::Mock(mock) => {
            if !mock.latency.is_zero() {
                tokio::time::sleep(mock.latency).await;
            }
            let usage = mock.usage(endpoint, body.len());
            if parsed.stream {
                // Always generate the usage chunk and let the relay drop it, so the mock is
                // accounted for exactly like a real upstream.
                let events = mock.stream_events(endpoint, &parsed.model, request_id, Some(usage));
                stream_response(SseRelay::new(
                    mock.stream_body(events),
                    charge,
                    !parsed.include_usage,
                ))
            } else {
                let out = mock.response(endpoint, &parsed, request_id, usage);
                let cost = charge.settle(Some(usage), Outcome::Success);
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
        Target::Upstream { .. } => forward(state, endpoint, &parsed, &body, charge).await?,
    };
    let mut resp = resp;
    let h = resp.headers_mut();
    h.insert(DEPLOYMENT_HEADER, deployment.id_header.clone());
    if let Some(room) = room {
        room.write_headers(h);
    }
    Ok(resp)
}

/// Picks the deployment and reserves the request's share of every limit and budget on it and
/// on the key: in Redis when replicas share counters, else in this process. A deployment at its
/// limit is skipped for another of the group with room; the key's refusal is final.
async fn admit(
    state: &AppState,
    group: &Group,
    first: &Arc<RuntimeDeployment>,
    key: &Arc<RuntimeKey>,
    ask_for: &(dyn Fn(&RuntimeDeployment) -> Ask + Sync),
    now: u64,
) -> Result<(Arc<RuntimeDeployment>, Reservation, Option<Room>)> {
    let limited = key.limits.is_some() || group.deployments.iter().any(|d| d.limits.is_some());
    if let Some(shared) = state.shared.as_ref().filter(|_| limited) {
        let candidates = std::iter::once(first)
            .chain(group.deployments.iter().filter(|d| !Arc::ptr_eq(d, first)));
        let mut refused = None;
        for d in candidates {
            let ask = ask_for(d);
            let asks: Vec<_> = d
                .limits
                .iter()
                .chain(key.limits.iter())
                .map(|l| (l.clone(), ask))
                .collect();
            if asks.is_empty() {
                return Ok((d.clone(), Reservation::default(), None));
            }
            let lease = shared.new_lease();
            match shared.reserve(&asks, &lease, now).await {
                Ok(Ok(room)) => {
                    let room = key.limits.is_some().then_some(room);
                    let reservation = Reservation::shared(shared.clone(), lease, asks, now);
                    return Ok((d.clone(), reservation, room));
                }
                Ok(Err(r)) if r.scope == Scope::Key => return Err(r.into()),
                Ok(Err(r)) => refused = Some(r),
                Err(_) if shared.failure == FailureMode::Open => {
                    refused = None;
                    break;
                }
                Err(_) => {
                    return Err(ApiError::unavailable(
                        "limits_unavailable",
                        "Rate limits and budgets can't be checked right now (Redis is unreachable); try again shortly.",
                    ));
                }
            }
        }
        if let Some(r) = refused {
            return Err(r.into());
        }
        // Redis failed and the policy is to fail open: this replica's own counters decide.
    }
    let mut reservation = Reservation::default();
    let deployment = match &first.limits {
        None => first.clone(),
        Some(l) => match reservation.take(l, ask_for(first), now) {
            Ok(_) => first.clone(),
            // A deployment at its limit is skipped for another of the group with room.
            Err(refused) => group
                .deployments
                .iter()
                .find(|d| {
                    !Arc::ptr_eq(d, first)
                        && d.limits
                            .as_ref()
                            .is_none_or(|l| reservation.take(l, ask_for(d), now).is_ok())
                })
                .cloned()
                .ok_or_else(|| ApiError::from(refused))?,
        },
    };
    let room = match &key.limits {
        None => None,
        Some(l) => match reservation.take(l, ask_for(&deployment), now) {
            Ok(room) => Some(room),
            Err(refused) => {
                reservation.undo_last(now);
                return Err(refused.into());
            }
        },
    };
    Ok((deployment, reservation, room))
}

fn insert_cost(h: &mut HeaderMap, cost: tollgate_crds::config::Picodollars) {
    if let Ok(v) = HeaderValue::try_from(cost.to_string()) {
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

/// Sends the request to an HTTP deployment and relays the answer.
async fn forward(
    state: &AppState,
    endpoint: Endpoint,
    parsed: &ParsedRequest<'_>,
    body: &Bytes,
    charge: Charge,
) -> Result<Response> {
    let d: &RuntimeDeployment = charge.deployment();
    let Some((uri, auth)) = d.uri(endpoint) else {
        return Err(ApiError::internal("deployment has no upstream URI"));
    };
    let mut req = Request::new(Full::new(parsed.upstream_body(body, &d.upstream_model)));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri.clone();
    let h = req.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(a) = auth {
        h.insert(header::AUTHORIZATION, a.clone());
    }
    let id = d.id.clone();
    let first_byte = Duration::from_millis(d.timeouts.first_byte_ms);
    let resp = match tokio::time::timeout(
        first_byte,
        crate::upstream::send(state.settings.connect_timeout, req),
    )
    .await
    {
        Err(_) => {
            charge.settle(None, Outcome::UpstreamError);
            return Err(ApiError::timeout(format!(
                "Deployment {id} did not answer within {first_byte:?}."
            )));
        }
        Ok(Err(e)) => {
            charge.settle(None, Outcome::UpstreamError);
            return Err(if e.is_connect() {
                ApiError::unavailable(
                    "upstream_unreachable",
                    format!("Could not connect to deployment {id}; is the upstream running?"),
                )
            } else {
                ApiError::bad_gateway(
                    "upstream_connection_error",
                    format!("The connection to deployment {id} failed before a response."),
                )
            });
        }
        Ok(Ok(resp)) => resp,
    };
    let status = resp.status();
    let (parts, incoming) = resp.into_parts();
    if status.is_success() && parsed.stream {
        return Ok(stream_response(SseRelay::new(
            incoming,
            charge,
            !parsed.include_usage,
        )));
    }
    let bytes = match Limited::new(incoming, MAX_UPSTREAM_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => {
            charge.settle(None, Outcome::UpstreamError);
            return Err(ApiError::bad_gateway(
                "upstream_read_error",
                format!("Reading the response of deployment {id} failed."),
            ));
        }
    };
    if status.is_success() {
        let Ok(usage) = crate::usage::from_response(&bytes) else {
            charge.settle(None, Outcome::UpstreamError);
            return Err(ApiError::bad_gateway(
                "upstream_invalid_response",
                format!("Deployment {id} returned a response that is not JSON."),
            ));
        };
        let cost = charge.settle(usage, Outcome::Success);
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
        return Ok(out);
    }
    upstream_error(status, &parts.headers, bytes, charge, &id)
}

/// Maps an upstream error status. Client errors the upstream explains in OpenAI's shape (a bad
/// parameter, a prompt too long) reach the client as sent; anything else, and anything about
/// the gateway's own credentials, becomes a gateway error that doesn't echo the upstream body.
fn upstream_error(
    status: StatusCode,
    headers: &HeaderMap,
    body: Bytes,
    charge: Charge,
    id: &Arc<str>,
) -> Result<Response> {
    let openai_shaped = serde_json::from_slice::<serde_json::Value>(&body)
        .is_ok_and(|v| v.get("error").is_some_and(|e| e.is_object()));
    match status.as_u16() {
        401 | 403 => {
            charge.settle(None, Outcome::UpstreamError);
            Err(ApiError::bad_gateway(
                "upstream_auth_error",
                format!(
                    "Deployment {id} refused the gateway's credentials (HTTP {}). Check the LLMModel's credentialsRef.",
                    status.as_u16()
                ),
            ))
        }
        429 => {
            charge.settle(None, Outcome::UpstreamError);
            let mut e = ApiError::bad_gateway(
                "upstream_rate_limited",
                format!("Deployment {id} is rate limited (HTTP 429)."),
            );
            e.status = StatusCode::TOO_MANY_REQUESTS;
            e.retry_after = headers
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            Err(e)
        }
        400..=499 if openai_shaped => {
            charge.settle(None, Outcome::Rejected);
            let mut out = Response::new(Body::from(body));
            *out.status_mut() = status;
            out.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if let Some(ra) = headers.get(header::RETRY_AFTER) {
                out.headers_mut().insert(header::RETRY_AFTER, ra.clone());
            }
            Ok(out)
        }
        400..=499 => {
            charge.settle(None, Outcome::Rejected);
            let mut e = ApiError::bad_request(
                "upstream_rejected",
                format!(
                    "Deployment {id} rejected the request (HTTP {}).",
                    status.as_u16()
                ),
            );
            e.status = status;
            Err(e)
        }
        _ => {
            charge.settle(None, Outcome::UpstreamError);
            Err(ApiError::bad_gateway(
                "upstream_server_error",
                format!("Deployment {id} failed (HTTP {}).", status.as_u16()),
            ))
        }
    }
}
