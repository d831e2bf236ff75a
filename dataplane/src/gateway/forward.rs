//! One attempt on an HTTP upstream: the request in the provider's wire format, the deadlines,
//! and the answer, relayed as a stream or read whole, with its usage settled; or a failure
//! classified for the retry and fallback loops.

use super::body::read_all;
use super::{Attempt, COST_HEADER, Class, Ctx, Failure};
use crate::accounting::Outcome;
use crate::api::error::ApiError;
use crate::gateway::charge::Charge;
use crate::gateway::relay::SseRelay;
use crate::routing::Route;
use crate::routing::RuntimeDeployment;
use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_crds::policy::RetryOn;

/// Largest upstream body read whole (non-streamed responses, error bodies).
const MAX_UPSTREAM_BODY: usize = 64 << 20;

pub(super) fn insert_cost(h: &mut HeaderMap, cost: tollgate_crds::config::Picodollars) {
    let mut buf = [0u8; 40];
    if let Some(v) = crate::rt::values::header_value(cost.write_usd(&mut buf)) {
        h.insert(COST_HEADER, v);
    }
}

pub(super) fn stream_response<B>(relay: SseRelay<B>) -> Response
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
pub(super) async fn forward(
    ctx: &mut Ctx<'_>,
    route: &Route,
    charge: Charge,
    began: Instant,
) -> Attempt {
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
