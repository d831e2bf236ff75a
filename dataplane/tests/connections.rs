//! Client connections: the idle timeout (keep-alive idle, and request heads that never finish)
//! and shutdown, against the real binary over TCP on 127.0.0.1.

#![expect(clippy::unwrap_used, reason = "tests")]

use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate_testkit::{Gateway, eventually};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate-dataplane");
const KEY: &str = "sk-conn-test-000000001";

/// A mock model `slow` whose streamed reply takes 10 × 250 ms, a mock model `wait` that takes a
/// minute to answer, and a key.
fn manifests() -> String {
    let models = r#"
apiVersion: tollgate.dev/v1alpha1
kind: LLMModel
metadata: {name: slow}
spec:
  modelName: slow
  provider: mock
  mock: {reply: "a b c d e f g h i j", chunks: 10, chunkDelay: 250ms}
---
apiVersion: tollgate.dev/v1alpha1
kind: LLMModel
metadata: {name: wait}
spec:
  modelName: wait
  provider: mock
  mock: {latency: 60s}
"#;
    models.to_string() + &tollgate_testkit::key_manifest("k", KEY, "")
}

fn request(stream: bool) -> String {
    let body = format!(
        r#"{{"model":"slow","stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
    );
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Reads until the peer closes the connection (or `within` passes); returns what was read and
/// whether it closed.
async fn read_to_close(sock: &mut TcpStream, within: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let end = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sock.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into(), false),
        }
    }
}

#[tokio::test]
async fn idle_and_unfinished_connections_are_closed_after_the_idle_timeout() {
    let gw = Gateway::start(BIN, &manifests(), &["--idle-timeout", "1s"]);
    let started = Instant::now();

    // Connected, never sent a byte.
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    // A keep-alive connection after one request.
    let mut kept = TcpStream::connect(gw.addr).await.unwrap();
    kept.write_all(request(false).as_bytes()).await.unwrap();
    // A request head sent a header every 200 ms, never finished.
    let mut slow_head = TcpStream::connect(gw.addr).await.unwrap();
    slow_head
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\n")
        .await
        .unwrap();
    let dripping = tokio::spawn(async move {
        for i in 0..75 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if slow_head
                .write_all(format!("x-drip-{i}: 1\r\n").as_bytes())
                .await
                .is_err()
            {
                return Some(started.elapsed());
            }
        }
        let (_, closed) = read_to_close(&mut slow_head, Duration::from_millis(100)).await;
        closed.then(|| started.elapsed())
    });
    // A request whose body never finishes (sent without a key: nothing has checked it yet).
    let mut slow_body = TcpStream::connect(gw.addr).await.unwrap();
    slow_body
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-length: 1000\r\n\r\n{\"model\"")
        .await
        .unwrap();
    // A stream that lasts longer than the idle timeout, on its own connection.
    let mut streaming = TcpStream::connect(gw.addr).await.unwrap();
    streaming.write_all(request(true).as_bytes()).await.unwrap();

    let mut head = [0u8; 12];
    kept.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let answered = Instant::now();
    let (_, kept_closed) = read_to_close(&mut kept, Duration::from_secs(5)).await;
    assert!(kept_closed, "an idle keep-alive connection stays open");
    // Closed for idleness: a whole idle timeout after its last request, not sooner.
    let idle_for = answered.elapsed();
    assert!(
        idle_for >= Duration::from_millis(950),
        "closed after {idle_for:?}"
    );
    let (_, silent_closed) = read_to_close(&mut silent, Duration::from_secs(5)).await;
    assert!(silent_closed, "a silent connection stays open");
    assert!(started.elapsed() >= Duration::from_millis(950));
    // Both get a grace of 5 s once the idle timeout closes them (a request may have been about
    // to finish), and no more: bytes that keep dripping in don't extend it.
    let closed_at = dripping.await.unwrap();
    assert!(
        closed_at.is_some_and(|t| t < Duration::from_secs(9)),
        "a request head that never ends keeps its connection ({closed_at:?})"
    );
    let (_, body_closed) = read_to_close(&mut slow_body, Duration::from_secs(3)).await;
    assert!(
        body_closed,
        "a request body that never ends keeps its connection"
    );

    // The stream (10 × 250 ms) outlives the 1 s timeout and ends whole; then its connection,
    // idle, is closed too.
    let (stream_read, stream_closed) = read_to_close(&mut streaming, Duration::from_secs(8)).await;
    assert!(stream_read.starts_with("HTTP/1.1 200"), "{stream_read}");
    assert!(stream_read.contains("data: [DONE]"), "{stream_read}");
    assert!(
        stream_read.matches("\"content\":").count() >= 10,
        "{stream_read}"
    );
    assert!(stream_closed);
}

#[tokio::test]
async fn shutdown_lets_a_stream_finish_and_closes_idle_connections() {
    let mut gw = Gateway::start(BIN, &manifests(), &[]);
    let mut idle = TcpStream::connect(gw.addr).await.unwrap();
    idle.write_all(request(false).as_bytes()).await.unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");

    let mut streaming = TcpStream::connect(gw.addr).await.unwrap();
    streaming.write_all(request(true).as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    streaming.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");

    // Nor does a client that connected and sent nothing, or one that never finishes its
    // request head.
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    let mut half = TcpStream::connect(gw.addr).await.unwrap();
    half.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\n")
        .await
        .unwrap();

    // SIGTERM mid-stream.
    let stopped = tokio::task::spawn_blocking(move || {
        let clean = gw.terminate();
        (clean, gw.logs())
    });
    let (idle_read, idle_closed) = read_to_close(&mut idle, Duration::from_secs(5)).await;
    assert!(idle_closed, "an idle connection holds up shutdown");
    assert!(!idle_read.contains("HTTP/1.1"), "{idle_read}");
    let (_, half_closed) = read_to_close(&mut half, Duration::from_secs(8)).await;
    assert!(half_closed, "an unfinished request head holds up shutdown");
    let (_, silent_closed) = read_to_close(&mut silent, Duration::from_secs(5)).await;
    assert!(silent_closed, "a silent connection holds up shutdown");
    let (rest, closed) = read_to_close(&mut streaming, Duration::from_secs(8)).await;
    assert!(rest.contains("data: [DONE]"), "the stream was cut: {rest}");
    assert!(closed);
    let (clean, logs) = stopped.await.unwrap();
    assert!(clean, "no clean exit after SIGTERM:\n{logs}");
}

#[test]
fn an_idle_timeout_under_a_second_is_refused() {
    let out = std::process::Command::new(BIN)
        .args(["--manifests", "/nonexistent", "--idle-timeout", "500ms"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("'500ms' for '--idle-timeout"), "{err}");
    assert!(err.contains("must be at least 1s"), "{err}");
}

/// Server-side connections on `port` that are open (ESTABLISHED), from `/proc/net/tcp`.
fn open_connections(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&local) && f[3] == "01"
        })
        .count()
}

#[tokio::test]
async fn an_http2_connection_whose_stream_was_cancelled_is_closed_when_idle() {
    let gw = Gateway::start(BIN, &manifests(), &["--idle-timeout", "1s"]);
    let port = gw.addr.port();
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    // The client gives up after 300 ms: its stream is reset while the handler still waits for
    // the mock, and the handler is dropped.
    let err = client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(r#"{"model":"wait","messages":[{"role":"user","content":"hi"}]}"#)
        .timeout(Duration::from_millis(300))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert_eq!(open_connections(port), 1, "the client's HTTP/2 connection");
    // Nothing is in flight any more, so the connection is idle and closed (GOAWAY) after the
    // timeout, though the client keeps it pooled.
    assert!(
        eventually(Duration::from_secs(6), || open_connections(port) == 0).await,
        "the connection of a cancelled request stays open"
    );
    drop(client);
}

/// Reads responses from `sock` until `n` of them have arrived whole (by `content-length`), or
/// 5 s pass. Returns each one's head and body.
async fn read_responses(sock: &mut TcpStream, n: usize) -> Vec<(String, String)> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let end = Instant::now() + Duration::from_secs(5);
    let mut chunk = [0u8; 8192];
    while out.len() < n {
        // Take every whole response at the front of the buffer.
        loop {
            let text = String::from_utf8_lossy(&buf).into_owned();
            let Some((head, rest)) = text.split_once("\r\n\r\n") else {
                break;
            };
            if head.starts_with("HTTP/1.1 100 ") {
                buf.drain(..head.len() + 4);
                continue;
            }
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_string)
                })
                .map_or(0, |v| v.trim().parse().unwrap());
            if rest.len() < len {
                break;
            }
            out.push((head.to_string(), rest[..len].to_string()));
            buf.drain(..head.len() + 4 + len);
        }
        if out.len() >= n {
            break;
        }
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sock.read(&mut chunk)).await {
            Ok(Ok(k)) if k > 0 => buf.extend_from_slice(&chunk[..k]),
            _ => break,
        }
    }
    out
}

#[tokio::test]
async fn pipelined_and_unusual_requests_are_all_served() {
    let gw = Gateway::start(BIN, &manifests(), &[]);
    let body = r#"{"model":"slow","messages":[{"role":"user","content":"hi"}]}"#;
    let head = |extra: &str| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {KEY}\r\n{extra}"
        )
    };
    let chunked = format!(
        "{}transfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        head(""),
        body.len()
    );
    // Three on one connection, written at once: the plain one, one with a chunked body (which
    // hyper serves from then on), and a plain one again.
    let mut sock = TcpStream::connect(gw.addr).await.unwrap();
    let all = format!("{}{chunked}{}", request(false), request(false));
    sock.write_all(all.as_bytes()).await.unwrap();
    let answers = read_responses(&mut sock, 3).await;
    assert_eq!(answers.len(), 3, "{answers:?}");
    for (head, body) in &answers {
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert!(body.contains("a b c d e f g h i j"), "{body}");
    }

    // HTTP/1.0, and a client that waits for `100 Continue` before its body.
    let mut sock = TcpStream::connect(gw.addr).await.unwrap();
    let old = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nauthorization: Bearer {KEY}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(old.as_bytes()).await.unwrap();
    let (stream_read, closed) = read_to_close(&mut sock, Duration::from_secs(5)).await;
    assert!(stream_read.starts_with("HTTP/1.0 200 OK"), "{stream_read}");
    assert!(
        closed,
        "an HTTP/1.0 connection without keep-alive stays open"
    );
    let mut sock = TcpStream::connect(gw.addr).await.unwrap();
    let expect = head(&format!(
        "expect: 100-continue\r\ncontent-length: {}\r\n\r\n",
        body.len()
    ));
    sock.write_all(expect.as_bytes()).await.unwrap();
    let mut interim = [0u8; 25];
    sock.read_exact(&mut interim).await.unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    sock.write_all(body.as_bytes()).await.unwrap();
    let answers = read_responses(&mut sock, 1).await;
    assert!(answers[0].0.starts_with("HTTP/1.1 200 OK"), "{answers:?}");

    // A malformed head gets hyper's 400, and the connection is closed.
    let mut sock = TcpStream::connect(gw.addr).await.unwrap();
    sock.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nbad header\r\n\r\n")
        .await
        .unwrap();
    let (read, closed) = read_to_close(&mut sock, Duration::from_secs(5)).await;
    assert!(read.starts_with("HTTP/1.1 400 Bad Request"), "{read}");
    assert!(closed);
}

#[tokio::test]
async fn a_client_that_leaves_before_its_answer_is_counted_gone() {
    let gw = Gateway::start(BIN, &manifests(), &[]);
    let body = r#"{"model":"wait","messages":[{"role":"user","content":"hi"}]}"#;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {KEY}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut sock = TcpStream::connect(gw.addr).await.unwrap();
    sock.write_all(req.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(sock);
    // The handler is dropped when the client leaves, not when the mock answers a minute later.
    let metrics = gw.url("/metrics");
    let gone = async || {
        let text = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
        text.lines().any(|l| {
            l.starts_with("tollgate_requests_total{")
                && l.contains(r#"model="wait""#)
                && l.contains(r#"outcome="client_gone""#)
                && l.ends_with(" 1")
        })
    };
    let end = Instant::now() + Duration::from_secs(5);
    while !gone().await {
        assert!(Instant::now() < end, "the request is still served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether `sock` is closed by the gateway within `within`, and what it read before.
async fn closed_within(sock: &mut TcpStream, within: Duration) -> (String, bool, Duration) {
    let t = Instant::now();
    let (read, closed) = read_to_close(sock, within).await;
    (read, closed, t.elapsed())
}

#[tokio::test]
async fn a_request_head_must_arrive_within_the_header_read_timeout() {
    let gw = Gateway::start(BIN, &manifests(), &["--header-read-timeout", "1s"]);
    // Connected, never sent a byte: closed without an answer.
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    // A head dripped a header every 200 ms: closed, without an answer (as hyper's server
    // does; nginx too).
    let mut dripping = TcpStream::connect(gw.addr).await.unwrap();
    dripping
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\n")
        .await
        .unwrap();
    let drip = tokio::spawn(async move {
        let t = Instant::now();
        let mut i = 0;
        while t.elapsed() < Duration::from_secs(6) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if dripping
                .write_all(format!("x-drip-{i}: 1\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
            i += 1;
        }
        closed_within(&mut dripping, Duration::from_millis(500)).await
    });
    let (read, closed, took) = closed_within(&mut silent, Duration::from_secs(5)).await;
    assert!(closed && read.is_empty(), "{closed} {read}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    let (read, closed, _) = drip.await.unwrap();
    assert!(closed, "a dripped head keeps its connection");
    assert!(read.is_empty(), "{read}");

    // Keep-alive: the time between requests is the idle timeout's, not this one's; a next
    // head is bounded from its first byte.
    let mut kept = TcpStream::connect(gw.addr).await.unwrap();
    kept.write_all(request(false).as_bytes()).await.unwrap();
    assert_eq!(read_responses(&mut kept, 1).await.len(), 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    kept.write_all(request(false).as_bytes()).await.unwrap();
    let answers = read_responses(&mut kept, 1).await;
    assert!(answers[0].0.starts_with("HTTP/1.1 200"), "{answers:?}");
    kept.write_all(b"POST /v1/chat/completions HTTP/1.1\r\n")
        .await
        .unwrap();
    let (read, closed, took) = closed_within(&mut kept, Duration::from_secs(5)).await;
    assert!(closed && read.is_empty(), "{read}");
    assert!(took < Duration::from_secs(3), "{took:?}");

    // The same after a chunked request: idle is fine, a dripped head is closed.
    let body = r#"{"model":"slow","messages":[{"role":"user","content":"hi"}]}"#;
    let chunked = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {KEY}\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    let mut handed = TcpStream::connect(gw.addr).await.unwrap();
    handed.write_all(chunked.as_bytes()).await.unwrap();
    assert_eq!(read_responses(&mut handed, 1).await.len(), 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    handed.write_all(chunked.as_bytes()).await.unwrap();
    let answers = read_responses(&mut handed, 1).await;
    assert!(answers[0].0.starts_with("HTTP/1.1 200"), "{answers:?}");
    handed
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\n")
        .await
        .unwrap();
    let (_, closed, took) = closed_within(&mut handed, Duration::from_secs(5)).await;
    assert!(closed, "a connection whose head never ends is kept");
    assert!(took < Duration::from_secs(3), "{took:?}");
    // The silent one, the dripped one, the keep-alive one and the chunked one.
    assert_eq!(timed_out(&gw, "header_read").await, Some(4));
}

/// The value of `tollgate_connections_timed_out_total{timeout="<which>"}`, if there is one.
async fn timed_out(gw: &Gateway, which: &str) -> Option<u64> {
    let text = gw.metrics().await;
    let series = format!("tollgate_connections_timed_out_total{{timeout=\"{which}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .and_then(|v| v.trim().parse().ok())
}

/// `tollgate_requests_total` series for `model`: a request that went upstream has one.
async fn went_upstream(gw: &Gateway, model: &str) -> bool {
    let text = gw.metrics().await;
    // Series are made with the config (at 0): one that counted a request.
    text.lines().any(|l| {
        l.starts_with("tollgate_requests_total{")
            && l.contains(&format!("model=\"{model}\""))
            && !l.ends_with(" 0")
    })
}

#[tokio::test]
async fn a_request_body_must_arrive_within_the_body_read_timeout() {
    let gw = Gateway::start(BIN, &manifests(), &["--body-read-timeout", "1s"]);
    let head =
        format!("POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {KEY}\r\n");
    // The data plane's own server (a body by length), and hyper's (a chunked one).
    let by_length = format!("{head}content-length: 1000\r\n\r\n{{\"model\":\"slow\"");
    let chunked = format!("{head}transfer-encoding: chunked\r\n\r\n100\r\n{{\"model\":\"slow\",");
    for (what, sent) in [("length", by_length), ("chunked", chunked)] {
        let mut sock = TcpStream::connect(gw.addr).await.unwrap();
        sock.write_all(sent.as_bytes()).await.unwrap();
        // Dripping doesn't extend it: the bound is on the whole body.
        let t = Instant::now();
        let mut got = String::new();
        let mut buf = [0u8; 4096];
        let closed = loop {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "{what}: still open: {got}"
            );
            match tokio::time::timeout(Duration::from_millis(200), sock.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(n)) => got.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(_) => {
                    let _ = sock.write_all(b" ").await;
                }
            }
        };
        assert!(closed);
        assert!(
            t.elapsed() >= Duration::from_millis(900),
            "{what}: {:?}",
            t.elapsed()
        );
        assert!(
            got.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{what}: {got}"
        );
        assert!(got.contains("\r\nconnection: close\r\n"), "{what}: {got}");
        assert!(
            got.contains("\"code\":\"request_timeout\""),
            "{what}: {got}"
        );
        assert!(
            got.contains("\"type\":\"invalid_request_error\""),
            "{what}: {got}"
        );
    }
    // h2c: the stream gets the same answer.
    use futures_util::StreamExt;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let stalled = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(
        b"{\"model\":\"slow\",",
    ))])
    .chain(futures_util::stream::pending());
    let resp = client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .body(reqwest::Body::wrap_stream(stalled))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 408);
    assert!(
        resp.text()
            .await
            .unwrap()
            .contains("\"code\":\"request_timeout\"")
    );
    assert!(
        !went_upstream(&gw, "slow").await,
        "a request without its body went upstream"
    );
}

/// A mock model `big` streaming 8 MB (more than the sockets between it and a client that
/// doesn't read can hold) in 1,000 chunks 1 ms apart, and a key.
fn big_stream_manifests() -> String {
    let reply = "word ".repeat(1_600_000);
    format!(
        "{}---\napiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata: {{name: big}}\nspec:\n  modelName: big\n  provider: mock\n  mock: {{reply: \"{reply}\", chunks: 1000, chunkDelay: 1ms}}\n",
        manifests()
    )
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_and_its_request_settled() {
    let gw = Gateway::start(
        BIN,
        &big_stream_manifests(),
        &[
            "--write-stall-timeout",
            "1s",
            "--usage-log",
            "{dir}/usage.jsonl",
        ],
    );
    let body = r#"{"model":"big","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let head =
        format!("POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {KEY}\r\n");
    // The data plane's own server (a body by length), then hyper's (a chunked body).
    let by_length = format!("{head}content-length: {}\r\n\r\n{body}", body.len());
    let chunked = format!(
        "{head}transfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    let log = gw.manifest_dir().join("usage.jsonl");
    let records = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    for (n, (what, req)) in [("length", by_length), ("chunked", chunked)]
        .into_iter()
        .enumerate()
    {
        // A small receive window, and nothing read: the gateway's writes stop making progress.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut sock = socket.connect(gw.addr).await.unwrap();
        sock.write_all(req.as_bytes()).await.unwrap();
        // Without the bound, the gateway's write would wait for the client forever.
        let t = Instant::now();
        assert!(
            eventually(Duration::from_secs(10), || records().len() > n).await,
            "{what}: a stalled stream is never settled"
        );
        assert!(
            t.elapsed() >= Duration::from_millis(900),
            "{what}: {:?}",
            t.elapsed()
        );
        let (_, closed) = read_to_close(&mut sock, Duration::from_secs(5)).await;
        assert!(closed, "{what}: the stalled connection stays open");
        tokio::time::sleep(Duration::from_millis(500)).await;
        // One record per request, of a client that left.
        let all = records();
        assert_eq!(all.len(), n + 1, "{what}: {all:?}");
        assert_eq!(all[n]["outcome"], "client_gone", "{what}: {all:?}");
        assert_eq!(all[n]["model"], "big", "{what}: {all:?}");
    }
    assert_eq!(timed_out(&gw, "write_stall").await, Some(2));
}

#[tokio::test]
async fn past_max_connections_a_new_connection_is_closed_at_once() {
    let gw = Gateway::start(BIN, &manifests(), &["--max-connections", "2"]);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut sock = TcpStream::connect(gw.addr).await.unwrap();
        sock.write_all(request(false).as_bytes()).await.unwrap();
        assert_eq!(read_responses(&mut sock, 1).await.len(), 1);
        held.push(sock);
    }
    let mut third = TcpStream::connect(gw.addr).await.unwrap();
    let _ = third.write_all(request(false).as_bytes()).await;
    let (read, closed) = read_to_close(&mut third, Duration::from_secs(2)).await;
    assert!(closed && read.is_empty(), "{closed} {read}");
    // A place is given back when a connection ends.
    drop(held.pop());
    let metrics = gw.url("/metrics");
    let mut text = String::new();
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        if let Ok(r) = reqwest::get(&metrics).await {
            text = r.text().await.unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The third (and maybe this scrape's first tries, made before the place came back).
    let refused = text
        .lines()
        .find_map(|l| l.strip_prefix("tollgate_connections_refused_total "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(refused.is_some_and(|n| n >= 1), "{text}");
}
