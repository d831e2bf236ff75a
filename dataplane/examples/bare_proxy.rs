//! The floor of the stack: a pass-through HTTP/1.1 proxy with nothing else (no auth, no JSON,
//! no accounting, no metrics), built the way the data plane is: a current-thread runtime per
//! thread, `SO_REUSEPORT`, hyper's HTTP/1.1 server, the data plane's own upstream client
//! ([`tollgate_dataplane::upstream::h1`]) with a thread-local pool, bodies passed through as they arrive.
//! `bench/run.sh --bare` runs it as the target `hyper-floor`, so the gateway can be compared
//! with what the HTTP stack alone costs.
//!
//! `bare_proxy LISTEN UPSTREAM THREADS [--hyper-client]`, e.g.
//! `bare_proxy 127.0.0.1:0 127.0.0.1:8001 2`; it prints `listening on ADDR`. With
//! `--hyper-client` the upstream leg is hyper's HTTP/1.1 client (a connection task per
//! connection) instead: what the data plane used before `h1`, kept to measure the difference
//! (`docs/benchmarks.md`).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::cell::RefCell;
use std::net::SocketAddr;
use tollgate_dataplane::upstream::h1;

type Conn = h1::Conn<tokio::net::TcpStream>;

thread_local! {
    static POOL: RefCell<Vec<SendRequest<Full<Bytes>>>> = const { RefCell::new(Vec::new()) };
    static H1_POOL: RefCell<Vec<Conn>> = const { RefCell::new(Vec::new()) };
}

/// The upstream's body through the data plane's client; its connection goes back to the pool
/// at the end.
struct H1PassThrough {
    inner: h1::Body<tokio::net::TcpStream>,
}

impl hyper::body::Body for H1PassThrough {
    type Data = Bytes;
    type Error = h1::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, h1::Error>>> {
        let this = &mut *self;
        let frame = std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(conn) = this.inner.take_reusable() {
            H1_POOL.with(|p| p.borrow_mut().push(conn));
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

/// Through the data plane's upstream client.
async fn proxy_h1<B>(
    req: hyper::Request<B>,
    up: SocketAddr,
) -> Result<hyper::Response<H1PassThrough>, Box<dyn std::error::Error + Send + Sync>>
where
    B: hyper::body::Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let mut out = hyper::Request::new(body);
    *out.method_mut() = parts.method;
    *out.uri_mut() = parts.uri;
    out.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    out.headers_mut().insert(
        http::header::HOST,
        http::HeaderValue::from_static("upstream"),
    );
    let conn = match H1_POOL.with(|p| p.borrow_mut().pop()) {
        Some(c) => c,
        None => {
            let tcp = tokio::net::TcpStream::connect(up).await?;
            tcp.set_nodelay(true)?;
            h1::Conn::new(tcp)
        }
    };
    let resp = conn.send(out).await?;
    Ok(resp.map(|inner| H1PassThrough { inner }))
}

async fn upstream(addr: SocketAddr) -> std::io::Result<SendRequest<Full<Bytes>>> {
    if let Some(s) = POOL.with(|p| {
        let mut p = p.borrow_mut();
        while let Some(s) = p.pop() {
            if s.is_ready() {
                return Some(s);
            }
        }
        None
    }) {
        return Ok(s);
    }
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(std::io::Error::other)?;
    tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// The upstream's body, passed through as it arrives; its connection goes back to the pool at
/// the end.
struct PassThrough {
    inner: Incoming,
    back: Option<SendRequest<Full<Bytes>>>,
}

impl hyper::body::Body for PassThrough {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_frame(cx));
        if (frame.is_none() || this.inner.is_end_stream())
            && let Some(send) = this.back.take()
        {
            POOL.with(|p| p.borrow_mut().push(send));
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

async fn proxy(
    req: hyper::Request<Incoming>,
    up: SocketAddr,
) -> Result<hyper::Response<PassThrough>, Box<dyn std::error::Error + Send + Sync>> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let mut out = hyper::Request::new(Full::new(body));
    *out.method_mut() = parts.method;
    *out.uri_mut() = parts.uri;
    out.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    out.headers_mut().insert(
        http::header::HOST,
        http::HeaderValue::from_static("upstream"),
    );
    let mut send = upstream(up).await?;
    let resp = send.send_request(out).await?;
    Ok(resp.map(|inner| PassThrough {
        inner,
        back: Some(send),
    }))
}

fn box_err(
    e: impl std::error::Error + Send + Sync + 'static,
) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let listen: SocketAddr = args
        .get(1)
        .map_or("127.0.0.1:0", |s| s)
        .parse()
        .map_err(std::io::Error::other)?;
    let up: SocketAddr = args
        .get(2)
        .map_or("127.0.0.1:8001", |s| s)
        .parse()
        .map_err(std::io::Error::other)?;
    let threads: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2);
    let hyper_client = args.get(4).is_some_and(|a| a == "--hyper-client");
    let bind = |addr: SocketAddr| -> std::io::Result<std::net::TcpListener> {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.set_reuseaddr(true)?;
        s.set_reuseport(true)?;
        s.bind(addr)?;
        let l = s.listen(1024)?;
        l.into_std()
    };
    let first = {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async { bind(listen) })?
    };
    let addr = first.local_addr()?;
    println!("listening on {addr}");
    let mut listeners = vec![first];
    for _ in 1..threads {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        listeners.push(rt.block_on(async { bind(addr) })?);
    }
    let handles: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            std::thread::spawn(move || -> std::io::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, async move {
                    l.set_nonblocking(true)?;
                    let l = tokio::net::TcpListener::from_std(l)?;
                    loop {
                        let (tcp, _) = l.accept().await?;
                        tcp.set_nodelay(true)?;
                        tokio::task::spawn_local(async move {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(
                                    TokioIo::new(tcp),
                                    service_fn(move |r| {
                                        use http_body_util::BodyExt;
                                        async move {
                                            if hyper_client {
                                                proxy(r, up)
                                                    .await
                                                    .map(|r| r.map(|b| b.map_err(box_err).boxed()))
                                            } else {
                                                proxy_h1(r, up)
                                                    .await
                                                    .map(|r| r.map(|b| b.map_err(box_err).boxed()))
                                            }
                                        }
                                    }),
                                )
                                .await;
                        });
                    }
                })
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}
