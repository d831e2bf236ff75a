//! HTTP surface: the listener, routes, thin handlers, request ids.
//!
//! Connections are served by hyper's HTTP/1.1 server, or its HTTP/2 server for clients that
//! open with HTTP/2's preface (h2c), behind the bounds of [`crate::http::connections`] ([`serve`]).
//! (Until December 2026 HTTP/1.1 was served by a loop of the data plane's own; a same-run A/B
//! found it no faster at c=64, see `docs/benchmarks.md`, and it needed a list of the headers
//! each path reads.) The three proxied endpoints (`POST /v1/chat/completions`,
//! `/v1/completions`, `/v1/embeddings`, with or without `/v1`) go straight to
//! [`crate::gateway::handle`]; everything else (models, health, metrics, admin, 404/405) goes
//! through the axum [`router`]. Skipping the router on the hot path saves its matching, boxing
//! and the tower layers: about a tenth of the gateway's own CPU per request (see
//! `docs/benchmarks.md`).
//!
//! Every response carries `x-request-id` (the client's, or a new one), and every error is
//! OpenAI-shaped (see [`crate::api::error`]).

use crate::api::error::{ApiError, ErrorSource};
use crate::api::request::Endpoint;
use crate::gateway::ingress::Ingress;
use crate::gateway::state::AppState;
use crate::http::connections::{Bounded, Connections, InFlight};
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderValue, StatusCode, header};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// `x-request-id`.
pub(crate) const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// What a listener serves: the gateway, and the admin API when it is on.
#[derive(Clone)]
pub(crate) struct Served {
    /// The gateway's state.
    pub(crate) state: Arc<AppState>,
    /// The admin API (`--master-key`), if on.
    pub(crate) admin: Option<Arc<crate::admin::Admin>>,
}

/// The data plane's routes. Paths work with and without the `/v1` prefix, as in OpenAI's SDKs
/// configured with either base URL.
pub(crate) fn router(served: &Served) -> Router {
    let admin = Router::new()
        .route(
            "/key/generate",
            post(|State(c), r| admin_write(c, r, AdminWrite::Generate)),
        )
        .route("/key/info", get(key_info))
        .route("/key/list", get(key_list))
        .route(
            "/key/delete",
            post(|State(c), r| admin_write(c, r, AdminWrite::Delete)),
        )
        .route("/spend/keys", get(|s, r| spend(s, r, "keys")))
        .route("/spend/models", get(|s, r| spend(s, r, "models")))
        .route("/spend/teams", get(|s, r| spend(s, r, "teams")))
        .with_state(crate::admin::Ctx {
            state: served.state.clone(),
            admin: served.admin.clone(),
        });
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/models", get(models))
        .route("/health", get(health))
        .route("/health/liveliness", get(live))
        .route("/health/liveness", get(live))
        .route("/health/readiness", get(ready))
        .route("/metrics", get(metrics))
        .merge(admin)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(served.state.clone())
}

/// Serves connections from `listener` until `shutdown` resolves, then lets the open ones finish
/// their requests (keep-alive connections are closed after their current request).
///
/// HTTP/1.1, and HTTP/2 for clients that start with its preface (h2c, as meshes and
/// `appProtocol: h2c` backends do). Connections idle for the idle timeout are closed (see
/// [`crate::http::connections`]).
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    served: Served,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let state = served.state.clone();
    let conns = Connections::new(state.settings.idle_timeout);
    // Aborted when dropped, as serve() ends or is dropped.
    let mut background = tokio::task::JoinSet::new();
    background.spawn(conns.clone().sweep_forever());
    let shared = Arc::new(Shared {
        router: router(&served),
        state,
    });
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Past --max-connections: closed at once (the client sees the connection end before
        // any answer), counted.
        let Some(slot) = Slot::take(&shared.state) else {
            metrics::counter!(crate::telemetry::CONNECTIONS_REFUSED).increment(1);
            drop(tcp);
            continue;
        };
        // Without TCP_NODELAY the last small write of a response waits for the client's
        // delayed ACK: ~40 ms at the end of every stream.
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let registration = conns.open();
        let streams = Streams(conns.clone());
        // Tracked: its polls are the work that keeps a busy-polling thread polling.
        tokio::spawn(crate::rt::busy_poll::tracked(async move {
            let _slot = slot;
            let state = &registration.state;
            let bounds = shared.state.settings.bounds;
            // The first request's head counts from the accept: a client that sends nothing is
            // closed without an answer.
            // Closed unanswered by the idle timeout or shutdown too, whichever comes first.
            let first = tokio::time::timeout(bounds.header_read, starts_with_h2_preface(&tcp));
            let h2 = tokio::select! {
                first = first => match first {
                    Ok(Ok(h2)) => h2,
                    Ok(Err(_)) => return,
                    Err(_) => {
                        crate::telemetry::timed_out("header_read");
                        return;
                    }
                },
                () = state.closing() => return,
            };
            let conn = state.clone();
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                let in_flight = conn.start();
                // Only h2c connections are closed from here (below).
                let h2_conn = h2.then(|| conn.clone());
                async move {
                    let resp = dispatch(&shared, req).await;
                    // Shutting down: an HTTP/1.1 answer says `Connection: close` (see
                    // `proxied`); an h2c connection gets a GOAWAY, so that its client, too,
                    // opens its next connection (elsewhere, once the pod has left the
                    // Service's endpoints) while this one finishes its streams.
                    if let Some(conn) = h2_conn
                        && shared.state.draining.load(Ordering::Relaxed)
                    {
                        conn.close_gracefully();
                    }
                    Ok::<_, std::convert::Infallible>(resp.map(|body| Tracked { body, in_flight }))
                }
            });
            let io = Bounded::new(tcp, state.clone(), bounds, !h2);
            let io = hyper_util::rt::TokioIo::new(io);
            let ended = if h2 {
                let conn =
                    hyper::server::conn::http2::Builder::new(streams).serve_connection(io, svc);
                Connections::serve(state, conn).await
            } else {
                let conn = hyper::server::conn::http1::Builder::new()
                    .max_header_size(MAX_HEAD)
                    .serve_connection(io, svc);
                Connections::serve(state, conn).await
            };
            if let Err(e) = ended {
                tracing::trace!("connection ended: {e}");
            }
        }));
    }
    drop(listener);
    let mut stop = shared.state.stop.subscribe();
    let now = async move {
        let _ = stop
            .wait_for(|s| *s == crate::gateway::state::Stop::Now)
            .await;
    };
    conns
        .shutdown(shared.state.settings.shutdown_timeout, now)
        .await;
}

/// Runs HTTP/2 streams' tasks (hyper spawns one per request), counted so that shutdown waits
/// for them, and tracked as work for busy-polling.
#[derive(Clone)]
struct Streams(Arc<Connections>);

impl<F> hyper::rt::Executor<F> for Streams
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        let task = self.0.task();
        tokio::spawn(crate::rt::busy_poll::tracked(async move {
            fut.await;
            drop(task);
        }));
    }
}

/// A response body that counts its request finished when it is dropped (sent, or abandoned by
/// a client that went away), for the idle timeout (see [`crate::http::connections`]).
struct Tracked {
    body: Body,
    #[expect(dead_code, reason = "held for its Drop")]
    in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A client connection's place under `--max-connections`, given back when dropped.
struct Slot(Arc<AppState>);

impl Slot {
    /// A place, unless `max_connections` are open (0: no limit).
    fn take(state: &Arc<AppState>) -> Option<Self> {
        let max = state.settings.max_connections;
        let open = state.open_connections.fetch_add(1, Ordering::Relaxed);
        if max != 0 && open >= max {
            state.open_connections.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Self(state.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What every connection of a listener shares.
struct Shared {
    state: Arc<AppState>,
    router: Router,
}

/// Accept errors: a connection that went away before it was accepted is nothing; running out
/// of file descriptors (or similar) is waited out rather than spun on.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!("accepting a connection failed: {e}");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}

/// The largest HTTP/1.1 request head read (hyper answers a larger one `431` and closes the
/// connection).
const MAX_HEAD: usize = 64 << 10;

/// HTTP/2's connection preface, which h2c clients (prior knowledge) open with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether the client opens with HTTP/2's preface, by peeking at its first bytes (they stay
/// in the socket for the server that then reads them). A request line differs from the preface
/// by its second byte at the latest (`POST`, `PUT`, `PATCH` vs `PRI`); a client that sends
/// fewer bytes than that in its first segment is looked at again shortly after. Errs if the
/// client closes before sending anything.
async fn starts_with_h2_preface(tcp: &tokio::net::TcpStream) -> std::io::Result<bool> {
    let mut buf = [0u8; 3];
    loop {
        let n = tcp.peek(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if buf[..n] != H2_PREFACE[..n] {
            return Ok(false);
        }
        if n == buf.len() {
            return Ok(true);
        }
        // `peek` answers at once while those bytes are all there is: wait for more.
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

async fn dispatch<B>(shared: &Shared, req: http::Request<B>) -> Response
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Two `Host` headers: which one names the target is ambiguous (RFC 9112 §3.2).
    if req.version() < http::Version::HTTP_2
        && req.headers().get_all(header::HOST).iter().nth(1).is_some()
    {
        let mut resp = ApiError::bad_request(
            "duplicate_host",
            "The request has more than one Host header.",
        )
        .into_response();
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    if req.method() == http::Method::POST
        && let Some(ingress) = Ingress::for_path(req.uri().path())
    {
        return proxied(&shared.state, ingress, req).await;
    }
    use tower_service::Service;
    match shared.router.clone().call(req).await {
        Ok(resp) => resp,
        Err(e) => match e {},
    }
}

async fn chat(State(s): State<Arc<AppState>>, req: Request) -> Response {
    proxied(&s, Ingress::OpenAi(Endpoint::ChatCompletions), req).await
}

async fn completions(State(s): State<Arc<AppState>>, req: Request) -> Response {
    proxied(&s, Ingress::OpenAi(Endpoint::Completions), req).await
}

async fn embeddings(State(s): State<Arc<AppState>>, req: Request) -> Response {
    proxied(&s, Ingress::OpenAi(Endpoint::Embeddings), req).await
}

static REQUEST_SEQ: AtomicU64 = AtomicU64::new(0);

/// The client's `x-request-id` if it sent a usable one, else a new id: a per-process prefix
/// and a sequence number, unique without a random source per request.
fn request_id<B>(req: &http::Request<B>) -> HeaderValue {
    if let Some(v) = req.headers().get(REQUEST_ID)
        && !v.is_empty()
        && v.len() <= 128
    {
        // Copied: the client's value is a slice of the buffer its request was read into, which
        // the id would otherwise keep for as long as the request's stream lasts.
        return HeaderValue::from_bytes(v.as_bytes()).unwrap_or_else(|_| v.clone());
    }
    static PREFIX: std::sync::LazyLock<u32> = std::sync::LazyLock::new(|| fastrand::u32(..));
    let n = REQUEST_SEQ.fetch_add(1, Ordering::Relaxed);
    // 8 hex digits of prefix, 12 of sequence.
    let id = (u128::from(*PREFIX) << 48) | u128::from(n & 0xffff_ffff_ffff);
    let mut hex = [0u8; 20];
    for (i, b) in hex.iter_mut().enumerate() {
        *b = b"0123456789abcdef"[((id >> (4 * (19 - i))) & 0xf) as usize];
    }
    crate::rt::values::header_value(&hex).unwrap_or(HeaderValue::from_static("0"))
}

async fn proxied<B>(state: &AppState, ingress: Ingress, req: http::Request<B>) -> Response
where
    B: http_body::Body<Data = bytes::Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let rid = request_id(&req);
    let rid_str = rid.to_str().unwrap_or("");
    let http1 = req.version() < http::Version::HTTP_2;
    let mut resp = match crate::gateway::handle(state, ingress, req, &rid).await {
        Ok(r) => r,
        Err(e) => {
            log_error(&e, rid_str, ingress.endpoint());
            let unread = matches!(
                e.status,
                StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT
            );
            let mut resp = e.into_response();
            if unread {
                // The rest of the body was never read, so the connection can't carry another
                // request: say so, rather than let a pooling client find out by a reset.
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            resp
        }
    };
    resp.headers_mut().insert(REQUEST_ID, rid);
    // Shutting down: this client should open its next connection elsewhere (hyper closes an
    // HTTP/1.1 connection after a response that says so). Read after the request was served,
    // so that one in flight at SIGTERM is told too.
    if http1 && state.draining.load(Ordering::Relaxed) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

fn log_error(e: &ApiError, request_id: &str, endpoint: Endpoint) {
    metrics::counter!(crate::telemetry::REJECTED, "code" => e.code).increment(1);
    match e.source {
        ErrorSource::Client => {
            tracing::debug!(
                request_id,
                endpoint = endpoint.as_str(),
                status = e.status.as_u16(),
                code = e.code,
                "{}",
                e.message
            )
        }
        ErrorSource::Upstream | ErrorSource::Internal => {
            tracing::warn!(
                request_id,
                endpoint = endpoint.as_str(),
                status = e.status.as_u16(),
                code = e.code,
                "{}",
                e.message
            )
        }
    }
}

fn json(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `GET /v1/models`: the models the key may use.
async fn models(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let rid = request_id(&req);
    let snapshot = state.snapshot.load();
    let now = crate::rt::clock::unix_secs() as i64;
    let mut resp = match crate::gateway::auth::authenticate(&snapshot, req.headers(), now) {
        Ok(key) => {
            let mut names: Vec<&String> =
                snapshot.groups.keys().filter(|m| key.allows(m)).collect();
            names.sort();
            let data: Vec<serde_json::Value> = names
                .into_iter()
                .map(|m| serde_json::json!({"id": m, "object": "model", "created": 0, "owned_by": "tollgate"}))
                .collect();
            json(
                StatusCode::OK,
                serde_json::json!({"object": "list", "data": data}).to_string(),
            )
        }
        Err(e) => e.into_response(),
    };
    resp.headers_mut().insert(REQUEST_ID, rid);
    resp
}

async fn live() -> Response {
    json(StatusCode::OK, "\"I'm alive!\"".into())
}

/// Ready while some deployment of some model can serve (not all cooling down).
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Ordering::Relaxed) {
        let body = serde_json::json!({"status": "shutting down"});
        return json(StatusCode::SERVICE_UNAVAILABLE, body.to_string());
    }
    let s = state.snapshot.load();
    let (_, usable) = crate::routing::report::health_report(&s.groups);
    let body = serde_json::json!({
        "status": if usable { "ready" } else { "no deployment is usable" },
        "config_hash": s.config_hash,
        "models": s.groups.len(),
        "keys": s.keys.len(),
    });
    let status = if usable {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, body.to_string())
}

/// Each deployment endpoint's state: healthy, failing, cooling_down or probing.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    let (report, _) = crate::routing::report::health_report(&state.snapshot.load().groups);
    json(StatusCode::OK, report.to_string())
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut out = state
        .prometheus
        .as_ref()
        .map(|p| p.render())
        .unwrap_or_default();
    crate::accounting::render::render_ledger(
        &state.ledger,
        state.settings.per_key_metrics,
        &mut out,
    );
    crate::routing::report::render_routes(&state.snapshot.load().groups, &mut out);
    crate::rt::busy_poll::render(&mut out);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        Body::from(out),
    )
        .into_response()
}

async fn not_found(req: Request) -> Response {
    let mut e = ApiError::bad_request(
        "unknown_url",
        format!(
            "Unknown request URL: {} {}.",
            req.method(),
            req.uri().path()
        ),
    );
    e.status = StatusCode::NOT_FOUND;
    with_request_id(&req, e.into_response())
}

async fn method_not_allowed(req: Request) -> Response {
    let mut e = ApiError::bad_request(
        "method_not_allowed",
        format!("{} is not allowed on {}.", req.method(), req.uri().path()),
    );
    e.status = StatusCode::METHOD_NOT_ALLOWED;
    with_request_id(&req, e.into_response())
}

fn with_request_id(req: &Request, mut resp: Response) -> Response {
    resp.headers_mut().insert(REQUEST_ID, request_id(req));
    resp
}

/// Largest admin request body.
const MAX_ADMIN_BODY: usize = 1 << 20;

fn admin_response(req_id: HeaderValue, result: Result<serde_json::Value, ApiError>) -> Response {
    let mut resp = match result {
        Ok(v) => json(StatusCode::OK, v.to_string()),
        Err(e) => e.into_response(),
    };
    resp.headers_mut().insert(REQUEST_ID, req_id);
    resp
}

/// An admin request's body, once its key was checked ([`crate::admin::Ctx::authorize`]): at most
/// [`MAX_ADMIN_BODY`] bytes, within the body-read timeout.
async fn admin_body(
    state: &AppState,
    req: Request,
) -> Result<(http::HeaderMap, bytes::Bytes), ApiError> {
    let (parts, body) = req.into_parts();
    let read = axum::body::to_bytes(body, MAX_ADMIN_BODY);
    let bytes = tokio::time::timeout(state.settings.bounds.body_read, read)
        .await
        .map_err(|_| crate::gateway::body::body_timed_out())?
        .map_err(|_| ApiError::too_large(MAX_ADMIN_BODY))?;
    Ok((parts.headers, bytes))
}

/// The admin API's writes, whose bodies are read once the master key was checked.
#[derive(Clone, Copy)]
enum AdminWrite {
    Generate,
    Delete,
}

async fn admin_write(ctx: crate::admin::Ctx, req: Request, what: AdminWrite) -> Response {
    let rid = request_id(&req);
    if let Err(e) = ctx.authorize(req.headers()) {
        return admin_response(rid, Err(e));
    }
    let result = match admin_body(&ctx.state, req).await {
        Ok((h, b)) => match what {
            AdminWrite::Generate => crate::admin::generate(&ctx, &h, &b).await,
            AdminWrite::Delete => crate::admin::delete(&ctx, &h, &b).await,
        },
        Err(e) => Err(e),
    };
    admin_response(rid, result)
}

fn query(req: &Request) -> std::collections::BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn key_info(State(ctx): State<crate::admin::Ctx>, req: Request) -> Response {
    let rid = request_id(&req);
    admin_response(rid, crate::admin::info(&ctx, req.headers(), &query(&req)))
}

async fn key_list(State(ctx): State<crate::admin::Ctx>, req: Request) -> Response {
    let rid = request_id(&req);
    admin_response(rid, crate::admin::list(&ctx, req.headers()))
}

async fn spend(State(ctx): State<crate::admin::Ctx>, req: Request, by: &'static str) -> Response {
    let rid = request_id(&req);
    admin_response(rid, crate::admin::spend(&ctx, req.headers(), by))
}
