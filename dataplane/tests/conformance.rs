//! HTTP/1.1 as raw bytes over TCP against the real binary: framing and head validation (what a
//! request smuggler or a broken client sends), `Expect: 100-continue` without a key, the admin
//! API's key check before its body, the line endings and HTTP/1.0 keep-alive the gateway
//! accepts, and a half-closed request (a client that left), pinned.

#![expect(clippy::unwrap_used, reason = "tests")]

use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate_testkit::Gateway;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate-dataplane");
const KEY: &str = "sk-conformance-0000001";
const MASTER: &str = "sk-master-conformance-1";

fn manifests() -> String {
    let models = r#"
apiVersion: tollgate.dev/v1alpha1
kind: LLMModel
metadata: {name: m}
spec:
  modelName: m
  provider: mock
---
apiVersion: tollgate.dev/v1alpha1
kind: LLMModel
metadata: {name: slow}
spec:
  modelName: slow
  provider: mock
  mock: {latency: 3s}
  pricing: {inputPerMillion: 1, outputPerMillion: 1}
"#;
    models.to_string() + &tollgate_testkit::key_manifest("k", KEY, "")
}

fn gateway() -> Gateway {
    Gateway::start(BIN, &manifests(), &["--master-key", MASTER])
}

/// Sends `bytes` on a new connection and reads until the gateway closes it or `within` passes:
/// what was read, and whether it closed.
async fn exchange(gw: &Gateway, bytes: &[u8], within: Duration) -> (String, bool) {
    let mut sock = TcpStream::connect(gw.addr).await.unwrap();
    sock.write_all(bytes).await.unwrap();
    read_for(&mut sock, within).await
}

async fn read_for(sock: &mut TcpStream, within: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let end = Instant::now() + within;
    let mut buf = [0u8; 8192];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sock.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into(), false),
        }
    }
}

/// Reads until `needle` has arrived, or `within` passes.
async fn read_until(sock: &mut TcpStream, needle: &str, within: Duration) -> String {
    let mut out = Vec::new();
    let end = Instant::now() + within;
    let mut buf = [0u8; 8192];
    while !String::from_utf8_lossy(&out).contains(needle) {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sock.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into()
}

/// `Content-Length` with `Transfer-Encoding: chunked` (a request-smuggling vector): the body is
/// read by its chunks, never by the length, and the connection is closed after the answer, so
/// nothing sent after the request is read as another one (RFC 9112 §6.1, hyper's server).
#[tokio::test]
async fn content_length_with_transfer_encoding_is_read_by_its_chunks_and_closed() {
    let gw = gateway();
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    // What a front proxy that went by the length would take for a second request.
    let smuggled = "GET /health HTTP/1.1\r\nhost: t\r\n\r\n";
    for (what, head) in [
        (
            "CL first",
            "content-length: 5\r\ntransfer-encoding: chunked\r\n",
        ),
        (
            "TE first",
            "transfer-encoding: chunked\r\ncontent-length: 5\r\n",
        ),
    ] {
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {KEY}\r\n{head}\r\n{:x}\r\n{body}\r\n0\r\n\r\n{smuggled}",
            body.len()
        );
        let (read, closed) = exchange(&gw, req.as_bytes(), Duration::from_secs(5)).await;
        assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{what}: {read}");
        assert!(read.contains("\r\nconnection: close\r\n"), "{what}: {read}");
        assert!(read.contains("chat.completion"), "{what}: {read}");
        assert_eq!(read.matches("HTTP/1.1").count(), 1, "{what}: {read}");
        assert!(closed, "{what}");
    }
}

#[tokio::test]
async fn malformed_heads_get_400_and_are_closed() {
    let gw = gateway();
    let cases: [(&str, &[u8]); 5] = [
        (
            "two Host headers",
            b"GET /health HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
        ),
        (
            "obs-fold",
            b"GET /health HTTP/1.1\r\nhost: t\r\nx-a: 1\r\n folded\r\n\r\n",
        ),
        (
            "bare CR",
            b"GET /health HTTP/1.1\r\nhost: t\rx-a: 1\r\n\r\n",
        ),
        (
            "NUL in a value",
            b"GET /health HTTP/1.1\r\nhost: t\r\nx-a: a\0b\r\n\r\n",
        ),
        (
            "NUL in the target",
            b"GET /hea\0lth HTTP/1.1\r\nhost: t\r\n\r\n",
        ),
    ];
    for (what, req) in cases {
        let (read, closed) = exchange(&gw, req, Duration::from_secs(5)).await;
        assert!(
            read.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{what}: {read:?}"
        );
        assert!(closed, "{what}");
    }
}

#[tokio::test]
async fn an_oversized_head_gets_431() {
    let gw = gateway();
    // Past 64 KiB.
    let req = format!(
        "GET /health HTTP/1.1\r\nhost: t\r\nx-big: {}\r\n\r\n",
        "a".repeat(100 << 10)
    );
    let mut sock = TcpStream::connect(gw.addr).await.unwrap();
    // Written alongside: the gateway answers before it has read it all.
    let (mut rd, mut wr) = sock.split();
    let write = async {
        let _ = wr.write_all(req.as_bytes()).await;
    };
    let read = async {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    let ((), read) = tokio::join!(write, read);
    assert!(
        read.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{read:?}"
    );
    let req = format!(
        "GET /health/liveness HTTP/1.1\r\nhost: t\r\nx-big: {}\r\nconnection: close\r\n\r\n",
        "a".repeat(40 << 10)
    );
    let (read, _) = exchange(&gw, req.as_bytes(), Duration::from_secs(5)).await;
    assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{read:?}");
}

#[tokio::test]
async fn expect_100_continue_without_a_valid_key_gets_401_and_no_100() {
    let gw = gateway();
    for (path, key) in [("/v1/chat/completions", "sk-wrong"), ("/key/generate", KEY)] {
        let req = format!(
            "POST {path} HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\nexpect: 100-continue\r\ncontent-length: 20\r\n\r\n"
        );
        let mut sock = TcpStream::connect(gw.addr).await.unwrap();
        sock.write_all(req.as_bytes()).await.unwrap();
        // The body is never sent: the answer comes without it.
        let read = read_until(&mut sock, "}", Duration::from_secs(5)).await;
        assert!(
            read.starts_with("HTTP/1.1 401 Unauthorized\r\n"),
            "{path}: {read}"
        );
        assert!(!read.contains("100 Continue"), "{path}: {read}");
    }
    // With the key, the client is asked for its body.
    let req = format!(
        "POST /key/generate HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {MASTER}\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n"
    );
    let mut sock = TcpStream::connect(gw.addr).await.unwrap();
    sock.write_all(req.as_bytes()).await.unwrap();
    let read = read_until(&mut sock, "\r\n\r\n", Duration::from_secs(5)).await;
    assert_eq!(read, "HTTP/1.1 100 Continue\r\n\r\n");
}

#[tokio::test]
async fn the_admin_api_checks_the_master_key_before_reading_a_body() {
    let gw = gateway();
    // A chunked body that never ends (hyper serves it, reading it as the handler asks).
    for path in ["/key/generate", "/key/delete"] {
        let req = format!(
            "POST {path} HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {KEY}\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{{\"a\":"
        );
        let mut sock = TcpStream::connect(gw.addr).await.unwrap();
        sock.write_all(req.as_bytes()).await.unwrap();
        let t = Instant::now();
        let read = read_until(&mut sock, "}", Duration::from_secs(5)).await;
        assert!(
            read.starts_with("HTTP/1.1 401 Unauthorized\r\n"),
            "{path}: {read}"
        );
        assert!(
            read.contains("\"code\":\"invalid_api_key\""),
            "{path}: {read}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{path}: {:?}",
            t.elapsed()
        );
    }
}

/// httparse takes a bare LF as a line end, and so does the gateway: pinned, so that a change
/// is a decision (RFC 9112, 2.2 lets a server accept it).
#[tokio::test]
async fn bare_lf_line_endings_are_accepted() {
    let gw = gateway();
    let (read, _) = exchange(
        &gw,
        b"GET /health/liveness HTTP/1.1\nhost: t\nconnection: close\n\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(read.starts_with("HTTP/1.1 200 OK\r\n"), "{read:?}");
}

/// HTTP/1.0 (served by hyper): closed after the answer unless the client asks for keep-alive;
/// with it, the answer says `connection: keep-alive` and the connection carries the next one.
#[tokio::test]
async fn http_1_0_keep_alive_is_honoured() {
    let gw = gateway();
    let (read, closed) = exchange(
        &gw,
        b"GET /health/liveness HTTP/1.0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(read.starts_with("HTTP/1.0 200 OK\r\n"), "{read}");
    assert!(closed, "HTTP/1.0 without keep-alive stays open");

    let mut sock = TcpStream::connect(gw.addr).await.unwrap();
    let req = b"GET /health/liveness HTTP/1.0\r\nconnection: keep-alive\r\n\r\n";
    sock.write_all(req).await.unwrap();
    let first = read_until(&mut sock, "alive!\"", Duration::from_secs(5)).await;
    assert!(first.starts_with("HTTP/1.0 200 OK\r\n"), "{first}");
    assert!(
        first
            .to_ascii_lowercase()
            .contains("\r\nconnection: keep-alive\r\n"),
        "{first}"
    );
    sock.write_all(b"GET /health/liveness HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let (second, closed) = read_for(&mut sock, Duration::from_secs(5)).await;
    assert!(second.starts_with("HTTP/1.0 200 OK\r\n"), "{second}");
    assert!(
        closed,
        "the last HTTP/1.0 request, without keep-alive, leaves it open"
    );
}

/// A client that sends a request and then shuts down its side (FIN) has left: HTTP/1.1 is not
/// served half-closed. The request is cut (its upstream call cancelled, and charged what the
/// upstream had done by then, as any client that leaves) and the connection closed without an
/// answer, rather than let the upstream run, and bill, for a client that may be gone.
#[tokio::test]
async fn a_half_closed_request_is_a_client_that_left() {
    let gw = gateway();
    let body = r#"{"model":"slow","messages":[{"role":"user","content":"hi"}]}"#;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut sock = TcpStream::connect(gw.addr).await.unwrap();
    sock.write_all(req.as_bytes()).await.unwrap();
    sock.shutdown().await.unwrap();
    let started = Instant::now();
    let (read, closed) = read_for(&mut sock, Duration::from_secs(5)).await;
    assert!(closed && read.is_empty(), "{closed} {read:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "closed at once, not after the upstream's 3 s: {:?}",
        started.elapsed()
    );
    // Settled as a client that left.
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let text = gw.metrics().await;
        if text.contains(r#"outcome="client_gone"} 1"#) {
            break;
        }
        assert!(Instant::now() < end, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
