//! The pooled HTTP client for upstreams: keep-alive connections, TCP_NODELAY, rustls for https
//! (the system's roots, or Mozilla's when the system has none), HTTP/2 where the server offers
//! it through ALPN.
//!
//! Plain-HTTP upstreams (vLLM and KServe pods, Ollama, the mock) are the common case inside a
//! cluster and take the fast path: [`crate::upstream::h1`], an HTTP/1.1 client driven by the request's
//! own task, with a pool of connections per thread kept here. A connection goes back to the
//! pool when its response body has been read to the end, and a request that a reused
//! connection turned out to be closed for (no answer, or a `408` the upstream wrote as it closed
//! the idle connection) is sent again on a new one. `https` upstreams go through hyper-util's
//! pooling client, which adds TLS and HTTP/2.

pub mod h1;
pub mod mock;
pub(crate) mod provider;

use bytes::Bytes;
use http::header::HOST;
use http::uri::Scheme;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::net::TcpStream;

/// The pooling client for `https` upstreams.
pub(crate) type Client = HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A plain-HTTP upstream connection.
type Conn = h1::Conn<TcpStream>;

/// How long an idle upstream connection is kept. Below the 60-120 s that providers' and
/// proxies' idle timeouts usually are, so we don't reuse a connection the far end is closing.
const POOL_IDLE: Duration = Duration::from_secs(50);
const POOL_IDLE_MS: u64 = POOL_IDLE.as_millis() as u64;
/// Most idle connections kept per upstream (per thread).
const POOL_MAX_IDLE: usize = 1024;
/// Idle connections per upstream (per thread) that keep their read buffer (16 KiB) for the
/// next request; those pooled beyond it let go of theirs and make a new one when reused.
const POOL_KEEP_BUFFERED: usize = 8;
/// TCP keepalive on upstream connections.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// An idle plain-HTTP connection, and when it became idle.
struct Idle {
    conn: Conn,
    /// When it went idle ([`crate::rt::clock::mono_ms`]).
    since_ms: u64,
}

thread_local! {
    /// `https` clients by connect timeout (ms): deployments that set the same timeout share a pool.
    static CLIENTS: RefCell<Vec<(u64, Client)>> = const { RefCell::new(Vec::new()) };
    /// Idle plain-HTTP connections by `host:port`, most recently used last.
    static POOL: RefCell<HashMap<Arc<str>, VecDeque<Idle>>> = RefCell::new(HashMap::new());
    /// Whether this thread's pool has its sweeper task.
    static SWEEPER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Why a request got no response.
#[derive(Debug)]
pub(crate) struct SendError {
    connect: bool,
    timeout: bool,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl SendError {
    /// Whether no connection could be made (nothing was sent).
    pub(crate) fn is_connect(&self) -> bool {
        self.connect
    }

    /// Whether the response head didn't arrive by the deadline given.
    pub(crate) fn is_timeout(&self) -> bool {
        self.timeout
    }

    fn connect(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self {
            connect: true,
            timeout: false,
            source: e.into(),
        }
    }

    /// No response head by the deadline.
    pub(crate) fn timed_out() -> Self {
        Self {
            connect: false,
            timeout: true,
            source: h1::Error::TimedOut.into(),
        }
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.source)
    }
}

impl std::error::Error for SendError {}

/// Where a plain-HTTP upstream's connections go, worked out once per configured URL.
#[derive(Clone, Debug)]
pub(crate) struct Origin {
    /// `host:port`: what is connected to, and the pool's key.
    addr: Arc<str>,
    /// The `Host` header.
    host: HeaderValue,
}

impl Origin {
    /// The origin of an absolute `http://` URI; `None` for other schemes (https goes through
    /// the pooling client) and URIs without a host.
    pub(crate) fn of(uri: &Uri) -> Option<Origin> {
        if uri.scheme() != Some(&Scheme::HTTP) {
            return None;
        }
        // Host and port only: user info in the URL is neither connected to nor sent.
        let host = uri.host()?;
        let addr: Arc<str> = format!("{host}:{}", uri.port_u16().unwrap_or(80)).into();
        let host = match uri.port() {
            Some(p) => HeaderValue::from_str(&format!("{host}:{p}")),
            None => HeaderValue::from_str(host),
        };
        Some(Origin {
            addr,
            host: host.ok()?,
        })
    }

    /// The `Host` header for this origin.
    pub(crate) fn host(&self) -> &HeaderValue {
        &self.host
    }
}

/// Sends `req` (an absolute URI) and returns the response once its head has arrived.
///
/// Connections are pooled per thread and driven by the request that uses them, so with the
/// per-core runtime (see [`crate::app`]) a request never hops threads on its way upstream and
/// back.
pub(crate) async fn send(
    connect_timeout: Duration,
    req: Request<Bytes>,
) -> Result<Response<UpstreamBody>, SendError> {
    let origin = Origin::of(req.uri());
    let copy = || {
        let mut r = Request::new(req.body().clone());
        *r.method_mut() = req.method().clone();
        *r.uri_mut() = req.uri().clone();
        *r.headers_mut() = req.headers().clone();
        r
    };
    send_to(origin.as_ref(), connect_timeout, copy).await
}

/// [`send`], with the origin of the request's URI worked out beforehand (`None` for https),
/// and the request built by `make`: once, or twice when a pooled connection was closed by the
/// upstream under the request.
///
/// That race is what a keep-alive connection meets when the upstream's idle timeout ends it
/// just as a request goes out (uvicorn, which serves vLLM, closes after 5 s idle). A request
/// whose write on a reused connection failed because the connection had ended, or whose
/// connection ended with no answer at once after the write (see `h1::RACE_MS`), is sent again,
/// once, on a new connection (counted in `tollgate_upstream_resends_total`). One whose
/// connection ended later is not: the upstream may have started on it (and a provider may bill
/// it), so it fails, and whether another attempt is made is the route policy's call.
pub(crate) async fn send_to(
    origin: Option<&Origin>,
    connect_timeout: Duration,
    make: impl Fn() -> Request<Bytes>,
) -> Result<Response<UpstreamBody>, SendError> {
    let Some(origin) = origin else {
        let resp = legacy(connect_timeout, make().map(Full::new))
            .await
            .map_err(|e| SendError {
                connect: e.is_connect(),
                timeout: false,
                source: e.into(),
            })?;
        return Ok(resp.map(|inner| UpstreamBody {
            inner: Inner::Hyper(inner),
        }));
    };
    let with_host = |mut req: Request<Bytes>| {
        req.headers_mut()
            .entry(HOST)
            .or_insert_with(|| origin.host.clone());
        req
    };
    send_h1(origin, connect_timeout, None, |conn| {
        conn.send(with_host(make()))
    })
    .await
}

/// [`send_to`] for a plain-HTTP origin, with the request's head written beforehand (see
/// [`crate::upstream::h1::RequestHead`], which must carry `Host`), and the response head due `by`
/// (connecting included): after that the error [`is_timeout`](SendError::is_timeout).
pub(crate) async fn send_with_head(
    origin: &Origin,
    connect_timeout: Duration,
    head: &crate::upstream::h1::RequestHead,
    body: Bytes,
    by: tokio::time::Instant,
) -> Result<Response<UpstreamBody>, SendError> {
    send_h1(origin, connect_timeout, Some(by), |conn| {
        conn.send_with_head(head, body.clone(), Some(by))
    })
    .await
}

/// Sends over a pooled connection to `origin` with `send`, and once more over a new
/// connection when a reused one turns out closed under the request (see [`send_to`]).
async fn send_h1<F, Fut>(
    origin: &Origin,
    connect_timeout: Duration,
    by: Option<tokio::time::Instant>,
    send: F,
) -> Result<Response<UpstreamBody>, SendError>
where
    F: Fn(Conn) -> Fut,
    Fut: std::future::Future<Output = Result<Response<h1::Body<TcpStream>>, h1::Error>>,
{
    let mut fresh_only = false;
    loop {
        let (conn, reused) = match (!fresh_only).then(|| checkout(&origin.addr)).flatten() {
            Some(c) => (c, true),
            None => {
                let connecting = connect(&origin.addr, connect_timeout);
                let conn = match by {
                    // A timer of its own: connecting is rare next to reusing.
                    Some(by) => tokio::time::timeout_at(by, connecting)
                        .await
                        .map_err(|_| SendError::timed_out())??,
                    None => connecting.await?,
                };
                (conn, false)
            }
        };
        match send(conn).await {
            // A 408 on a reused connection is the upstream closing it for idleness, written
            // before our request arrived (HAProxy does this; Go's client special-cases it too):
            // not an answer to this request. The connection is closing; send again once.
            Ok(resp) if reused && resp.status() == http::StatusCode::REQUEST_TIMEOUT => {
                tracing::debug!(
                    upstream = &*origin.addr,
                    "pooled connection answered 408 (closed for idleness); sending it again"
                );
                fresh_only = true;
            }
            Ok(resp) => {
                return Ok(resp.map(|body| UpstreamBody {
                    inner: Inner::H1 {
                        body,
                        pool: origin.addr.clone(),
                    },
                }));
            }
            Err(e) if reused && e.is_closed() => {
                tracing::debug!(
                    upstream = &*origin.addr,
                    "pooled connection closed before the request was written; sending it again"
                );
                metrics::counter!(crate::telemetry::RESENDS).increment(1);
                fresh_only = true;
            }
            Err(h1::Error::TimedOut) => return Err(SendError::timed_out()),
            Err(e) => {
                return Err(SendError {
                    connect: false,
                    timeout: false,
                    source: e.into(),
                });
            }
        }
    }
}

/// Whether an idle connection is still open, as far as is known without waiting: a close or
/// stray bytes from the upstream are seen here once the reactor has reported them. Costs no
/// system call while the socket has reported nothing.
fn still_open(conn: &Conn) -> bool {
    matches!(
        conn.io().try_read(&mut [0u8; 1]),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
    )
}

/// The most recently used idle connection to `key` that is still open.
fn checkout(key: &str) -> Option<Conn> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let idle = p.get_mut(key)?;
        while let Some(i) = idle.pop_back() {
            if crate::rt::clock::mono_ms().saturating_sub(i.since_ms) > POOL_IDLE_MS {
                // The rest are older still.
                idle.clear();
                break;
            }
            if still_open(&i.conn) {
                return Some(i.conn);
            }
        }
        None
    })
}

/// Puts a connection whose response was read to the end back in the pool.
fn release(key: Arc<str>, mut conn: Conn) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let idle = p.entry(key).or_default();
        if idle.len() >= POOL_MAX_IDLE {
            idle.pop_front();
        }
        if idle.len() >= POOL_KEEP_BUFFERED {
            // A burst left more connections than steady traffic reuses: these may stay idle.
            conn.release_buffer();
        }
        idle.push_back(Idle {
            conn,
            since_ms: crate::rt::clock::mono_ms(),
        });
    });
    if !SWEEPER.with(|s| s.replace(true))
        && let Ok(rt) = tokio::runtime::Handle::try_current()
    {
        rt.spawn(sweep_idle());
    }
}

/// Closes this thread's connections that have been idle longer than [`POOL_IDLE`], and the
/// ones the upstream closed, every few seconds: an upstream that gets no more requests (a
/// model removed from the config, a pod gone) doesn't keep its sockets open. (On the per-core
/// runtime the task runs on the thread whose pool it sweeps; on the work-stealing one, on
/// whichever thread it lands.)
async fn sweep_idle() {
    let mut tick = tokio::time::interval(POOL_IDLE / 5);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = crate::rt::clock::mono_ms();
        POOL.with(|p| {
            p.borrow_mut().retain(|_, idle| {
                idle.retain(|i| {
                    now.saturating_sub(i.since_ms) <= POOL_IDLE_MS && still_open(&i.conn)
                });
                !idle.is_empty()
            })
        });
    }
}

/// A new plain-HTTP connection to `addr` (`host:port`).
async fn connect(addr: &str, timeout: Duration) -> Result<Conn, SendError> {
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(SendError::connect(e)),
        Err(_) => {
            return Err(SendError::connect(format!(
                "connecting to {addr} timed out"
            )));
        }
    };
    let _ = tcp.set_nodelay(true);
    let _ = socket2::SockRef::from(&tcp)
        .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE));
    Ok(h1::Conn::new(tcp))
}

/// Sends `req` with this thread's pooling client for `connect_timeout` (built on first use).
fn legacy(
    connect_timeout: Duration,
    req: Request<Full<Bytes>>,
) -> hyper_util::client::legacy::ResponseFuture {
    let ms = connect_timeout.as_millis() as u64;
    CLIENTS.with(|c| {
        let mut clients = c.borrow_mut();
        let client = match clients.iter().position(|(t, _)| *t == ms) {
            Some(i) => &clients[i].1,
            None => {
                clients.push((ms, client(connect_timeout)));
                &clients[clients.len() - 1].1
            }
        };
        client.request(req)
    })
}

/// Builds the pooling client. `connect_timeout` bounds TCP + TLS set-up.
pub(crate) fn client(connect_timeout: Duration) -> Client {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(TCP_KEEPALIVE));
    let builder = HttpsConnectorBuilder::new();
    let builder = match builder.with_native_roots() {
        Ok(b) => b,
        Err(_) => HttpsConnectorBuilder::new().with_webpki_roots(),
    };
    let https = builder
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    HyperClient::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_max_idle_per_host(POOL_MAX_IDLE)
        .build(https)
}

/// An upstream response body. A plain-HTTP connection goes back to the pool once the body has
/// been read to the end; a body dropped before that closes its connection.
pub(crate) struct UpstreamBody {
    inner: Inner,
}

enum Inner {
    H1 {
        body: h1::Body<TcpStream>,
        pool: Arc<str>,
    },
    Hyper(Incoming),
}

impl UpstreamBody {
    /// Whether each frame holds everything the upstream had sent when it was polled (so a
    /// relay gains nothing by waiting for more before writing). hyper's client hands a body
    /// over one chunk per poll; [`crate::upstream::h1`] hands over all that one read brought.
    pub(crate) fn frames_are_whole_reads(&self) -> bool {
        matches!(self.inner, Inner::H1 { .. })
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        match &mut self.inner {
            Inner::H1 { body, pool } => {
                let frame = ready!(std::pin::Pin::new(&mut *body).poll_frame(cx));
                if body.is_end_stream()
                    && let Some(conn) = body.take_reusable()
                {
                    release(pool.clone(), conn);
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Inner::Hyper(b) => std::pin::Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::H1 { body, .. } => body.is_end_stream(),
            Inner::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.inner {
            Inner::H1 { body, .. } => body.size_hint(),
            Inner::Hyper(b) => b.size_hint(),
        }
    }
}

/// A response body that fails once `deadline` passes (a deployment's total timeout), so a
/// stream that runs too long ends as an upstream error and is settled with what it used.
pub(crate) struct Deadline<B> {
    inner: B,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// The deadline passed while the body was flowing: the next poll fails.
    expired: bool,
    /// The longest gap allowed between frames, and its timer (moved forward per frame).
    idle: Option<(Duration, std::pin::Pin<Box<tokio::time::Sleep>>)>,
}

impl<B> Deadline<B> {
    /// `inner`, limited to `deadline` when there is one.
    pub(crate) fn new(inner: B, deadline: Option<tokio::time::Instant>) -> Self {
        Self {
            inner,
            sleep: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            expired: false,
            idle: None,
        }
    }

    /// Also fails the body when no frame arrives for `idle` (a stream that stalls mid-way).
    pub(crate) fn idle(mut self, idle: Option<Duration>) -> Self {
        self.idle = idle.map(|d| (d, Box::pin(tokio::time::sleep(d))));
        self
    }
}

fn timed_out() -> Box<dyn std::error::Error + Send + Sync> {
    "the deployment's total timeout passed".into()
}

fn went_idle() -> Box<dyn std::error::Error + Send + Sync> {
    "the deployment sent nothing for its idle timeout".into()
}

impl<B> http_body::Body for Deadline<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        if this.expired {
            return Poll::Ready(Some(Err(timed_out())));
        }
        // A body that stalls wakes on the timer; one that keeps delivering (each frame is a
        // whole read, so an upstream faster than the client may never leave it pending) is
        // checked against the clock once per frame.
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {}
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(s) = &this.sleep
                    && tokio::time::Instant::now() >= s.deadline()
                {
                    this.expired = true;
                }
                if let Some((d, s)) = this.idle.as_mut() {
                    s.as_mut().reset(tokio::time::Instant::now() + *d);
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            ready => return ready.map(|f| f.map(|r| r.map_err(Into::into))),
        }
        if let Some(s) = this.sleep.as_mut()
            && s.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Some(Err(timed_out())));
        }
        if let Some((_, s)) = this.idle.as_mut()
            && s.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Some(Err(went_idle())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        !self.expired && self.inner.is_end_stream()
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::{Deadline, Origin};
    use bytes::Bytes;
    use http_body_util::BodyExt;

    /// A body that always has another frame ready, like an upstream faster than its client.
    struct Endless;

    impl http_body::Body for Endless {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
                b"data: {}\n\n",
            )))))
        }
    }

    #[tokio::test]
    async fn the_total_timeout_ends_a_body_that_never_pauses() {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(50);
        let mut body = Deadline::new(Endless, Some(deadline));
        for _ in 0..3 {
            assert!(body.frame().await.unwrap().is_ok());
        }
        tokio::time::sleep(std::time::Duration::from_millis(60)).await;
        // The frame read as the deadline passed is still delivered; the next poll fails.
        assert!(body.frame().await.unwrap().is_ok());
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("total timeout"), "{err}");
    }

    fn origin(url: &str) -> Option<(String, String)> {
        Origin::of(&url.parse().unwrap())
            .map(|o| (o.addr.to_string(), o.host.to_str().unwrap().to_string()))
    }

    #[test]
    fn origins_connect_to_host_and_port_only() {
        let o = |a: &str, h: &str| Some((a.to_string(), h.to_string()));
        assert_eq!(
            origin("http://vllm.ns.svc:8000/v1"),
            o("vllm.ns.svc:8000", "vllm.ns.svc:8000")
        );
        assert_eq!(origin("http://ollama/v1"), o("ollama:80", "ollama"));
        assert_eq!(
            origin("http://[::1]:9000/v1"),
            o("[::1]:9000", "[::1]:9000")
        );
        // User info is neither connected to nor sent as Host.
        assert_eq!(
            origin("http://user:secret@up:8000/v1"),
            o("up:8000", "up:8000")
        );
        // https goes through the pooling client.
        assert_eq!(origin("https://api.openai.com/v1"), None);
    }
}
