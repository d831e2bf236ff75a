//! The pooled HTTP client for upstreams: keep-alive connections, TCP_NODELAY, rustls for https
//! (the system's roots, or Mozilla's when the system has none), HTTP/2 where the server offers
//! it through ALPN.

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::future::Future;
use std::time::Duration;

/// The upstream client.
pub type Client = HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// How long an idle upstream connection is kept. Below the 60-120 s that providers' and
/// proxies' idle timeouts usually are, so we don't reuse a connection the far end is closing.
const POOL_IDLE: Duration = Duration::from_secs(50);

thread_local! {
    /// Clients by connect timeout (ms): deployments that set the same timeout share a pool.
    static CLIENTS: std::cell::RefCell<Vec<(u64, Client)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Sends `req` with this thread's client for `connect_timeout` (built on first use).
///
/// One pool per thread: the connection tasks the client spawns then run on the thread that
/// uses them, so with the per-core runtime (see [`crate::cli`]) a request never hops threads
/// on its way upstream and back.
pub fn send(
    connect_timeout: Duration,
    req: http::Request<Full<Bytes>>,
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

/// Builds the client. `connect_timeout` bounds TCP + TLS set-up.
pub fn client(connect_timeout: Duration) -> Client {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(30)));
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
        .pool_max_idle_per_host(1024)
        .build(https)
}

/// A response body that fails once `deadline` passes (a deployment's total timeout), so a
/// stream that runs too long ends as an upstream error and is settled with what it used.
pub struct Deadline<B> {
    inner: B,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<B> Deadline<B> {
    /// `inner`, limited to `deadline` when there is one.
    pub fn new(inner: B, deadline: Option<tokio::time::Instant>) -> Self {
        Self {
            inner,
            sleep: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
        }
    }
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
        let this = &mut *self;
        if let Some(s) = this.sleep.as_mut()
            && s.as_mut().poll(cx).is_ready()
        {
            return std::task::Poll::Ready(Some(Err(
                "the deployment's total timeout passed".into()
            )));
        }
        std::pin::Pin::new(&mut this.inner)
            .poll_frame(cx)
            .map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}
