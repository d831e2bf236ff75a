//! The upstream HTTP/1.1 client (`h1::Conn`) reading an answer: the input is all the upstream
//! sends before closing. Sending the request, reading the head and the whole body must never
//! panic or hang (a hang shows up as a timeout panic).
#![no_main]

use bytes::Bytes;
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate_dataplane::upstream::h1::Conn;

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
}

fn post() -> http::Request<Bytes> {
    let mut req = http::Request::new(Bytes::from_static(b"{\"model\":\"m\"}"));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::from_static("/v1/chat/completions");
    req.headers_mut().insert(
        http::header::HOST,
        http::HeaderValue::from_static("up:8000"),
    );
    req
}

fuzz_target!(|answer: &[u8]| {
    let answer = answer.to_vec();
    RT.with(|rt| {
        rt.block_on(async move {
            let (client, mut server) = tokio::io::duplex(1 << 16);
            let upstream = tokio::spawn(async move {
                let mut got = vec![0u8; 4096];
                let _ = server.read(&mut got).await;
                let _ = server.write_all(&answer).await;
                let _ = server.shutdown().await;
            });
            let exchange = async {
                let Ok(resp) = Conn::new(client).send(post()).await else {
                    return;
                };
                let mut body = resp.into_body();
                while let Some(frame) = body.frame().await {
                    if frame.is_err() {
                        break;
                    }
                }
                let _ = body.take_reusable();
            };
            tokio::time::timeout(Duration::from_secs(10), exchange)
                .await
                .expect("the client hung on an answer that had ended");
            let _ = upstream.await;
        });
    });
});
