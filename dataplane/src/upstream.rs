//! The pooled HTTP client for upstreams: keep-alive connections, TCP_NODELAY, rustls for https
//! (the system's roots, or Mozilla's when the system has none), HTTP/2 where the server offers
//! it through ALPN.

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// The upstream client.
pub type Client = HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// How long an idle upstream connection is kept. Below the 60-120 s that providers' and
/// proxies' idle timeouts usually are, so we don't reuse a connection the far end is closing.
const POOL_IDLE: Duration = Duration::from_secs(50);

thread_local! {
    static CLIENT: std::cell::OnceCell<Client> = const { std::cell::OnceCell::new() };
}

/// Sends `req` with this thread's client (built on first use).
///
/// One pool per thread: the connection tasks the client spawns then run on the thread that
/// uses them, so with the per-core runtime (see [`crate::cli`]) a request never hops threads
/// on its way upstream and back.
pub fn send(
    connect_timeout: Duration,
    req: http::Request<Full<Bytes>>,
) -> hyper_util::client::legacy::ResponseFuture {
    CLIENT.with(|c| c.get_or_init(|| client(connect_timeout)).request(req))
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
