//! End-to-end routing and resilience: several real mock upstreams on 127.0.0.1 (fast, slow,
//! failing with 500/429, resetting connections, dying mid-stream, reporting vLLM queues),
//! the real gateway binary, and a real HTTP client.

#![expect(clippy::unwrap_used, reason = "tests")]

use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tollgate_crds::config::MockConfig;
use tollgate_testkit::{Behavior, Gateway, MockUpstream, chat_request, closed_port, eventually};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate-dataplane");
const KEY: &str = "sk-routing-test-key-0001";

fn keys() -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData: {{k: {KEY}}}\n---\napiVersion: tollgate.dev/v1alpha1\nkind: VirtualKey\nmetadata: {{name: k}}\nspec: {{secretRef: {{name: keys, key: k}}}}\n"
    )
}

/// An LLMModel `name` in group `model` at `url`, with extra spec fields (YAML flow syntax).
fn deployment(name: &str, model: &str, url: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata: {{name: {name}}}\nspec: {{modelName: {model}, provider: openai-compatible, url: '{url}'{extra}}}\n"
    )
}

fn policy(models: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: p-{}}}\nspec: {{models: [{models}], {spec}}}\n",
        models.replace([',', ' '], "")
    )
}

fn ok() -> MockConfig {
    MockConfig {
        reply: "ok".into(),
        prompt_tokens: Some(10),
        completion_tokens: Some(5),
        ..Default::default()
    }
}

fn slow(ms: u64) -> MockConfig {
    MockConfig {
        latency_ms: ms,
        ..ok()
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn chat(gw: &Gateway, model: &str) -> reqwest::Response {
    gw.chat(KEY, &chat_request(model, false)).await
}

async fn chat_body(gw: &Gateway, body: Value) -> reqwest::Response {
    gw.chat(KEY, &body).await
}

/// A `/metrics` value as a number.
async fn metric(gw: &Gateway, series: &str) -> Option<f64> {
    gw.metric(series).await?.parse().ok()
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Sends `n` requests, `concurrency` at a time; counts responses by `x-tollgate-deployment`.
async fn spread(gw: &Gateway, model: &str, n: usize, concurrency: usize) -> HashMap<String, usize> {
    use futures_util::StreamExt;
    let c = client();
    let url = gw.url("/v1/chat/completions");
    let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    let results: Vec<String> = futures_util::stream::iter(0..n)
        .map(|_| {
            let (c, url, body) = (c.clone(), url.clone(), body.clone());
            async move {
                let r = c
                    .post(url)
                    .bearer_auth(KEY)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                header(&r, "x-tollgate-deployment").unwrap().to_string()
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut out = HashMap::new();
    for d in results {
        *out.entry(d).or_insert(0) += 1;
    }
    out
}

async fn get_json(gw: &Gateway, path: &str) -> (u16, Value) {
    let r = client().get(gw.url(path)).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn endpoint_state(health: &Value, model: &str, deployment: &str) -> String {
    health["models"][model]["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == deployment)
        .map(|d| d["endpoints"][0]["state"].as_str().unwrap().to_string())
        .unwrap()
}

#[tokio::test]
async fn weights_three_to_one_split_traffic_about_three_to_one() {
    let (a, b) = (
        MockUpstream::start(Behavior::Ok(ok())),
        MockUpstream::start(Behavior::Ok(ok())),
    );
    let m = format!(
        "{}{}{}",
        keys(),
        deployment("a", "gpt", &a.base_url(), ", weight: 3"),
        deployment("b", "gpt", &b.base_url(), ", weight: 1"),
    );
    let gw = Gateway::start(BIN, &m, &[]);
    let counts = spread(&gw, "gpt", 1000, 16).await;
    let (na, nb) = (counts["default/a"], counts["default/b"]);
    assert_eq!(na + nb, 1000);
    let ratio = na as f64 / nb as f64;
    // 3:1 over 1,000 draws: the ratio's 5-sigma band is about 2.3..4.0.
    assert!((2.3..4.0).contains(&ratio), "a={na} b={nb}");
    assert_eq!((a.stats.requests(), b.stats.requests()), (na, nb));
}

#[tokio::test]
async fn least_busy_avoids_a_slow_upstream() {
    let fast = MockUpstream::start(Behavior::Ok(slow(5)));
    let sluggish = MockUpstream::start(Behavior::Ok(slow(400)));
    let m = format!(
        "{}{}{}{}",
        keys(),
        deployment("fast", "gpt", &fast.base_url(), ""),
        deployment("slow", "gpt", &sluggish.base_url(), ""),
        policy("gpt", "strategy: least-busy"),
    );
    let gw = Gateway::start(BIN, &m, &[]);
    let counts = spread(&gw, "gpt", 120, 6).await;
    let (f, s) = (
        counts.get("default/fast").copied().unwrap_or(0),
        counts.get("default/slow").copied().unwrap_or(0),
    );
    // The slow one holds a request for 400 ms while the fast one turns over dozens: with six
    // in flight it gets at most a few at a time.
    assert!(f >= 100, "fast={f} slow={s}");
    assert!(s <= 20, "fast={f} slow={s}");
}

#[tokio::test]
async fn latency_based_prefers_the_fast_upstream_but_keeps_measuring() {
    let fast = MockUpstream::start(Behavior::Ok(ok()));
    let sluggish = MockUpstream::start(Behavior::Ok(slow(150)));
    let m = format!(
        "{}{}{}{}",
        keys(),
        deployment("fast", "gpt", &fast.base_url(), ""),
        deployment("slow", "gpt", &sluggish.base_url(), ""),
        policy("gpt", "strategy: latency-based"),
    );
    let gw = Gateway::start(BIN, &m, &[]);
    // 200 requests: the slow one is explored on about one in twenty (a random pick of two, on
    // 10 % of requests), so none in 199 has odds of 4e-5 (0.6 % with 100, which CI hit).
    let counts = spread(&gw, "gpt", 200, 1).await;
    let (f, s) = (
        counts.get("default/fast").copied().unwrap_or(0),
        counts.get("default/slow").copied().unwrap_or(0),
    );
    assert!(f >= 150, "fast={f} slow={s}");
    // Measured once at first, then explored now and then (10%): never starved entirely.
    assert!(s >= 2, "fast={f} slow={s}");
}

#[tokio::test]
async fn cost_based_picks_the_cheapest_with_room() {
    let cheap = MockUpstream::start(Behavior::Ok(ok()));
    let pricey = MockUpstream::start(Behavior::Ok(ok()));
    let m = format!(
        "{}{}{}{}",
        keys(),
        deployment(
            "cheap",
            "gpt",
            &cheap.base_url(),
            ", pricing: {inputPerMillion: 0.1, outputPerMillion: 0.2}, limits: {rpm: 5}"
        ),
        deployment(
            "pricey",
            "gpt",
            &pricey.base_url(),
            ", pricing: {inputPerMillion: 5, outputPerMillion: 15}"
        ),
        policy("gpt", "strategy: cost-based"),
    );
    let gw = Gateway::start(BIN, &m, &[]);
    tollgate_testkit::avoid_minute_boundary().await;
    let counts = spread(&gw, "gpt", 8, 1).await;
    // The cheap one until its 5 requests per minute are used, then the next cheapest.
    assert_eq!(counts.get("default/cheap"), Some(&5), "{counts:?}");
    assert_eq!(counts.get("default/pricey"), Some(&3), "{counts:?}");
}

#[tokio::test]
async fn queue_aware_avoids_the_endpoint_with_a_long_queue() {
    let a = MockUpstream::start(Behavior::Ok(ok()));
    let b = MockUpstream::start(Behavior::Ok(ok()));
    let gauges = |waiting: u32, kv: f64| {
        format!(
            "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{model_name=\"m\"}} {waiting}\nvllm:num_requests_running{{model_name=\"m\"}} 4\nvllm:kv_cache_usage_perc{{model_name=\"m\"}} {kv}\n"
        )
    };
    a.set_metrics(&gauges(25, 0.9));
    b.set_metrics(&gauges(0, 0.2));
    let m = format!(
        "{}{}{}{}",
        keys(),
        deployment("a", "llama", &a.base_url(), ""),
        deployment("b", "llama", &b.base_url(), ""),
        policy("llama", "strategy: queue-aware"),
    );
    let gw = Gateway::start(BIN, &m, &["--queue-scrape-interval", "100ms"]);
    assert!(
        eventually(Duration::from_secs(10), || a
            .stats
            .metrics_scrapes
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 2)
        .await
    );
    let counts = spread(&gw, "llama", 40, 2).await;
    assert_eq!(counts.get("default/b"), Some(&40), "{counts:?}");

    // The queues turn around: traffic follows within a scrape or two.
    a.set_metrics(&gauges(0, 0.1));
    b.set_metrics(&gauges(30, 0.95));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let counts = spread(&gw, "llama", 40, 2).await;
    assert_eq!(counts.get("default/a"), Some(&40), "{counts:?}");
    let (_, health) = get_json(&gw, "/health").await;
    let queue = &health["models"]["llama"]["deployments"][1]["endpoints"][0]["queue"];
    assert_eq!(queue["waiting"], 30.0, "{health}");

    // Metrics gone stale (the endpoint stops serving them): least-busy takes over, so both
    // get traffic again.
    a.set_metrics("");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let counts = spread(&gw, "llama", 60, 4).await;
    assert!(
        counts.contains_key("default/a") && counts.contains_key("default/b"),
        "{counts:?}"
    );
}

#[tokio::test]
async fn a_failed_attempt_is_retried_on_another_deployment_and_counted_once() {
    let bad = MockUpstream::start(Behavior::Status(
        500,
        r#"{"error":{"message":"boom","type":"server_error"}}"#,
    ));
    let good = MockUpstream::start(Behavior::Ok(ok()));
    let m = format!(
        "{}{}{}{}",
        keys(),
        deployment(
            "bad",
            "gpt",
            &bad.base_url(),
            ", pricing: {inputPerMillion: 1, outputPerMillion: 1}"
        ),
        deployment(
            "good",
            "gpt",
            &good.base_url(),
            ", pricing: {inputPerMillion: 1000, outputPerMillion: 1000}"
        ),
        // Cost-based sends every request to `bad` first (the cheaper); a high allowedFails
        // keeps it in rotation for this test.
        policy(
            "gpt",
            "strategy: cost-based, retries: {attempts: 2, backoff: 1ms}, cooldown: {allowedFails: 1000}"
        ),
    );
    let gw = Gateway::start(BIN, &m, &["--master-key", "sk-master-routing-1"]);
    for _ in 0..10 {
        let r = chat(&gw, "gpt").await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-tollgate-deployment"), Some("default/good"));
        assert_eq!(header(&r, "x-tollgate-attempted-retries"), Some("1"));
        // Cost is that of the attempt that served: 15 tokens at $1000/M.
        assert_eq!(header(&r, "x-tollgate-cost-usd"), Some("0.015"));
    }
    assert_eq!((bad.stats.requests(), good.stats.requests()), (10, 10));
    // The key counts ten requests and the spend of ten served ones, not twenty.
    let spend: Value = client()
        .get(gw.url("/spend/keys"))
        .bearer_auth("sk-master-routing-1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let row = spend
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == "default/k")
        .unwrap_or_else(|| panic!("{spend}"))
        .clone();
    assert_eq!(row["spend"].as_f64().unwrap(), 0.15, "{row}");
    assert_eq!(row["requests"], 10, "{row}");
    assert_eq!(
        metric(
            &gw,
            r#"tollgate_requests_total{model="gpt",deployment="default/bad",outcome="upstream_error"}"#
        )
        .await,
        Some(10.0)
    );
    assert_eq!(
        metric(&gw, r#"tollgate_retries_total{model="gpt"}"#).await,
        Some(10.0)
    );
}

#[tokio::test]
async fn retries_stop_at_attempts_and_only_for_the_configured_failures() {
    let up = MockUpstream::start(Behavior::Status(
        500,
        r#"{"error":{"message":"boom","type":"server_error"}}"#,
    ));
    let m = format!(
        "{}{}{}",
        keys(),
        deployment("only", "gpt", &up.base_url(), ""),
        policy(
            "gpt",
            "retries: {attempts: 3, backoff: 1ms}, cooldown: {allowedFails: 1000}"
        ),
    );
    let gw = Gateway::start(BIN, &m, &[]);
    let r = chat(&gw, "gpt").await;
    assert_eq!(r.status(), 502);
    assert_eq!(up.stats.requests(), 3, "three attempts in all");

    // Only rate limits retried: a 500 is not.
    gw.write_manifests(&format!(
        "{}{}{}",
        keys(),
        deployment("only", "gpt", &up.base_url(), ""),
        policy(
            "gpt",
            "retries: {attempts: 3, backoff: 1ms, retryOn: [rate-limited]}, cooldown: {allowedFails: 1000}"
        ),
    ));
    assert!(gw.wait_for_log("reloaded manifests", Duration::from_secs(10)));
    let r = chat(&gw, "gpt").await;
    assert_eq!(r.status(), 502);
    assert_eq!(up.stats.requests(), 4, "no retry for a 500");

    // The client's own mistake (an OpenAI-shaped 400) is never retried.
    up.set_behavior(Behavior::Status(
        400,
        r#"{"error":{"message":"bad temperature","type":"invalid_request_error"}}"#,
    ));
    let r = chat(&gw, "gpt").await;
    assert_eq!(r.status(), 400);
    assert_eq!(up.stats.requests(), 5);
}

#[tokio::test]
async fn a_429_retry_after_is_waited_for_before_retrying_the_same_deployment() {
    let up = MockUpstream::start(Behavior::FailFirst {
        n: 1,
        status: 429,
        retry_after: Some(1),
        then: ok(),
    });
    let m = format!(
        "{}{}{}",
        keys(),
        deployment("only", "gpt", &up.base_url(), ""),
        policy("gpt", "retries: {attempts: 2, backoff: 1ms}"),
    );
    let gw = Gateway::start(BIN, &m, &[]);
    let t = Instant::now();
    let r = chat(&gw, "gpt").await;
    assert_eq!(r.status(), 200);
    assert!(
        t.elapsed() >= Duration::from_millis(950),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(up.stats.requests(), 2);
}

#[tokio::test]
async fn connection_resets_and_timeouts_are_retried_elsewhere() {
    let reset = MockUpstream::start(Behavior::Reset);
    let hung = MockUpstream::start(Behavior::Ok(slow(5_000)));
    let good = MockUpstream::start(Behavior::Ok(ok()));
    let price = |p: u32| format!(", pricing: {{inputPerMillion: {p}, outputPerMillion: {p}}}");
    let m = format!(
        "{}{}{}{}{}",
        keys(),
        deployment("reset", "gpt", &reset.base_url(), &price(1)),
        deployment("hung", "gpt", &hung.base_url(), &price(2)),
        deployment("good", "gpt", &good.base_url(), &price(3)),
        policy(
            "gpt",
            // Timeouts on priced deployments are retried only when `retryOn` names them.
            "strategy: cost-based, retries: {attempts: 3, backoff: 1ms, retryOn: [connect-error, timeout]}, timeouts: {firstByte: 300ms}, cooldown: {allowedFails: 1000}"
        ),
    );
    let gw = Gateway::start(BIN, &m, &[]);
    let t = Instant::now();
    let r = chat(&gw, "gpt").await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tollgate-deployment"), Some("default/good"));
    assert_eq!(header(&r, "x-tollgate-attempted-retries"), Some("2"));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(
        (
            reset.stats.requests(),
            hung.stats.requests(),
            good.stats.requests()
        ),
        (1, 1, 1)
    );
}

/// The first-byte deadline lives with the pooled upstream connection (`h1`'s timer, moved
/// forward per request). On one upstream connection: requests after an idle gap past the
/// earlier deadlines aren't cut short, nor is one that ends after the previous request's
/// deadline but within its own; one the upstream sits on still ends at its deadline.
#[tokio::test]
async fn the_first_byte_deadline_holds_on_a_reused_connection() {
    let up = MockUpstream::start(Behavior::Ok(ok()));
    let m = format!(
        "{}{}{}",
        keys(),
        deployment("one", "gpt", &up.base_url(), ""),
        policy("gpt", "retries: {attempts: 1}, timeouts: {firstByte: 1s}"),
    );
    let gw = Gateway::start(BIN, &m, &[]);
    // One client, so one keep-alive connection to the gateway: one worker (and its thread's
    // upstream pool) serves every request, and they share one upstream connection.
    let c = client();
    let chat = |gw: &Gateway, model: &str| {
        c.post(gw.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    for _ in 0..3 {
        assert_eq!(chat(&gw, "gpt").await.expect("answer").status(), 200);
    }
    assert_eq!(
        up.stats.connections(),
        1,
        "the upstream connection is reused"
    );
    // Past the earlier requests' deadlines: their timer fired while the connection was idle.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(chat(&gw, "gpt").await.expect("answer").status(), 200);
    // Answered 1.3 s after that request's start: past its deadline, within the next one's.
    tokio::time::sleep(Duration::from_millis(500)).await;
    up.set_behavior(Behavior::Ok(slow(800)));
    assert_eq!(chat(&gw, "gpt").await.expect("answer").status(), 200);
    assert_eq!(up.stats.connections(), 1, "still the one connection");
    up.set_behavior(Behavior::Ok(slow(5_000)));
    let t = Instant::now();
    let r = chat(&gw, "gpt").await.expect("answer");
    let waited = t.elapsed();
    assert_eq!(r.status(), 504);
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "upstream_timeout", "{body}");
    assert_eq!(up.stats.requests(), 6);
}

/// The first-byte deadline bounds connecting too, even when the connect timeout is longer: an
/// upstream whose accept queue is full (its SYNs dropped, the connect retried for seconds) gets
/// a 504 at `firstByte`, not at `connect`.
#[tokio::test]
async fn the_first_byte_deadline_bounds_a_connect_that_hangs() {
    // A listener that never accepts, its tiny accept queue filled by this test until a connect
    // times out: the kernel drops the gateway's SYNs after that.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut queued = Vec::new();
    while let Ok(c) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
        queued.push(c);
        assert!(queued.len() < 10, "the accept queue never filled");
    }
    let m = format!(
        "{}{}{}",
        keys(),
        deployment(
            "stuck",
            "gpt",
            &format!("http://{addr}/v1"),
            ", timeouts: {connect: 20s}"
        ),
        policy(
            "gpt",
            "retries: {attempts: 1}, timeouts: {firstByte: 700ms}"
        ),
    );
    let gw = Gateway::start(BIN, &m, &[]);
    let t = Instant::now();
    let r = chat(&gw, "gpt").await;
    let waited = t.elapsed();
    assert_eq!(r.status(), 504);
    assert!(
        waited >= Duration::from_millis(650) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "upstream_timeout", "{body}");
}

/// An upstream that closes idle keep-alive connections with a `408 Request Timeout` (as
/// HAProxy does) answers the next request on such a connection with it: that 408 isn't an
/// answer to the request, which is sent again on a new connection.
#[tokio::test]
async fn a_408_on_a_pooled_connection_is_sent_again_on_a_new_one() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const OK: &str = r#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let connections = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = connections.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            seen.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                // The first request on each connection is answered; the second gets the 408
                // the upstream would have sent for idleness, and the connection closes.
                for n in 0.. {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut chunk).await {
                            Ok(k) if k > 0 => buf.extend_from_slice(&chunk[..k]),
                            _ => return,
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    while buf.len() < head_end + len {
                        match s.read(&mut chunk).await {
                            Ok(k) if k > 0 => buf.extend_from_slice(&chunk[..k]),
                            _ => return,
                        }
                    }
                    if n == 0 {
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{OK}",
                            OK.len()
                        );
                        s.write_all(answer.as_bytes()).await.unwrap();
                    } else {
                        let _ = s
                            .write_all(b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
                            .await;
                        return;
                    }
                }
            });
        }
    });
    let m = format!("{}{}", keys(), deployment("one", "gpt", &url, ""));
    let gw = Gateway::start(BIN, &m, &[]);
    // One client: one connection to the gateway, so one worker and its upstream pool.
    let c = client();
    for _ in 0..3 {
        let r = c
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&json!({"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "ok");
    }
    // Requests 2 and 3 each met a 408 on the pooled connection and were sent on a new one.
    assert_eq!(connections.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_failing_deployment_cools_down_then_is_probed_back_in() {
    let flaky = MockUpstream::start(Behavior::Status(
        503,
        r#"{"error":{"message":"overloaded","type":"server_error"}}"#,
    ));
    let good = MockUpstream::start(Behavior::Ok(ok()));
    let m = format!(
        "{}{}{}{}",
        keys(),
        deployment("flaky", "gpt", &flaky.base_url(), ""),
        deployment("good", "gpt", &good.base_url(), ""),
        policy(
            "gpt",
            "retries: {attempts: 2, backoff: 1ms}, cooldown: {allowedFails: 1, window: 60s, duration: 1500ms}"
        ),
    );
    let gw = Gateway::start(BIN, &m, &[]);
    for _ in 0..30 {
        assert_eq!(chat(&gw, "gpt").await.status(), 200);
    }
    // Two failures open the breaker; after that `flaky` gets nothing while cooling down.
    assert_eq!(flaky.stats.requests(), 2);
    let (_, health) = get_json(&gw, "/health").await;
    assert_eq!(
        endpoint_state(&health, "gpt", "default/flaky"),
        "cooling_down",
        "{health}"
    );
    assert_eq!(health["unhealthy_count"], 1, "{health}");
    assert_eq!(
        metric(
            &gw,
            r#"tollgate_cooldowns_total{model="gpt",deployment="default/flaky"}"#
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(
            &gw,
            r#"tollgate_deployment_endpoints{model="gpt",deployment="default/flaky",state="cooling_down"}"#
        )
        .await,
        Some(1.0)
    );

    // It recovers; once the cooldown is over a probe finds out and it is back in rotation.
    flaky.set_behavior(Behavior::Ok(ok()));
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (_, health) = get_json(&gw, "/health").await;
    assert_eq!(endpoint_state(&health, "gpt", "default/flaky"), "probing");
    let counts = spread(&gw, "gpt", 40, 1).await;
    assert!(
        counts.get("default/flaky").is_some_and(|n| *n >= 5),
        "{counts:?}"
    );
    let (_, health) = get_json(&gw, "/health").await;
    assert_eq!(endpoint_state(&health, "gpt", "default/flaky"), "healthy");
}

#[tokio::test]
async fn readiness_fails_while_no_deployment_is_usable() {
    let down = MockUpstream::start(Behavior::Status(
        500,
        r#"{"error":{"message":"boom","type":"server_error"}}"#,
    ));
    let m = format!(
        "{}{}{}",
        keys(),
        deployment("only", "gpt", &down.base_url(), ""),
        policy("gpt", "cooldown: {allowedFails: 0, duration: 60s}"),
    );
    let gw = Gateway::start(BIN, &m, &[]);
    assert_eq!(get_json(&gw, "/health/readiness").await.0, 200);
    assert_eq!(chat(&gw, "gpt").await.status(), 502);
    let (status, body) = get_json(&gw, "/health/readiness").await;
    assert_eq!(status, 503, "{body}");
    // The last resort: with nothing else to try, a cooling deployment still gets requests.
    assert_eq!(chat(&gw, "gpt").await.status(), 502);
    assert_eq!(down.stats.requests(), 2);
}

#[tokio::test]
async fn a_failed_group_falls_back_to_the_next_model_and_says_so() {
    let down = MockUpstream::start(Behavior::Status(
        500,
        r#"{"error":{"message":"boom","type":"server_error"}}"#,
    ));
    let backup = MockUpstream::start(Behavior::Ok(ok()));
    let m = format!(
        "{}{}{}{}{}",
        keys(),
        deployment("gpt-4o", "gpt-4o", &down.base_url(), ""),
        deployment(
            "unreachable",
            "gpt-4o-mini",
            &format!("http://127.0.0.1:{}/v1", closed_port()),
            ""
        ),
        deployment("claude", "claude-sonnet", &backup.base_url(), ""),
        policy(
            "gpt-4o",
            "retries: {attempts: 2, backoff: 1ms}, fallbacks: [gpt-4o-mini, claude-sonnet]"
        ),
    );
    let gw = Gateway::start(BIN, &m, &[]);
    let r = chat(&gw, "gpt-4o").await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tollgate-deployment"), Some("default/claude"));
    assert_eq!(header(&r, "x-tollgate-model-group"), Some("claude-sonnet"));
    assert_eq!(header(&r, "x-tollgate-attempted-fallbacks"), Some("2"));
    assert_eq!(down.stats.requests(), 2, "the group's own attempts first");
    assert_eq!(backup.stats.last_json()["model"], "claude-sonnet");
    assert_eq!(
        metric(
            &gw,
            r#"tollgate_fallbacks_total{from="gpt-4o-mini",to="claude-sonnet"}"#
        )
        .await,
        Some(1.0)
    );
    // A group that serves needs no fallback.
    let r = chat(&gw, "claude-sonnet").await;
    assert_eq!(header(&r, "x-tollgate-attempted-fallbacks"), None);
}

#[tokio::test]
async fn prompts_too_long_go_to_the_context_window_fallback() {
    let small = MockUpstream::start(Behavior::Ok(ok()));
    let big = MockUpstream::start(Behavior::Ok(ok()));
    let m = format!(
        "{}{}{}{}",
        keys(),
        deployment("small", "small", &small.base_url(), ", contextWindow: 200"),
        deployment("big", "big", &big.base_url(), ", contextWindow: 100000"),
        policy("small", "contextWindowFallbacks: [big]"),
    );
    let gw = Gateway::start(BIN, &m, &[]);
    // Short: served by the small model.
    let r = chat(&gw, "small").await;
    assert_eq!(header(&r, "x-tollgate-deployment"), Some("default/small"));
    // Long (about 1,000 tokens by the estimate): straight to the big one.
    let long = "lorem ipsum ".repeat(350);
    let r = chat_body(
        &gw,
        json!({"model": "small", "messages": [{"role": "user", "content": long}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tollgate-deployment"), Some("default/big"));
    assert_eq!(small.stats.requests(), 1);

    // An upstream that says the prompt is too long (our estimate thought it fit).
    small.set_behavior(Behavior::Status(
        400,
        r#"{"error":{"message":"This model's maximum context length is 200 tokens.","type":"invalid_request_error","code":"context_length_exceeded"}}"#,
    ));
    let r = chat(&gw, "small").await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tollgate-deployment"), Some("default/big"));
    assert_eq!(small.stats.requests(), 2);
    assert_eq!(big.stats.requests(), 2);
}

#[tokio::test]
async fn a_stream_is_never_retried_once_it_started() {
    let dying = MockUpstream::start(Behavior::DieMidStream { chunks: 3 });
    let good = MockUpstream::start(Behavior::Ok(ok()));
    let price = |p: u32| format!(", pricing: {{inputPerMillion: {p}, outputPerMillion: {p}}}");
    let m = format!(
        "{}{}{}{}",
        keys(),
        deployment("dying", "gpt", &dying.base_url(), &price(1)),
        deployment("good", "gpt", &good.base_url(), &price(2)),
        policy(
            "gpt",
            "strategy: cost-based, retries: {attempts: 3, backoff: 1ms}"
        ),
    );
    let gw = Gateway::start(BIN, &m, &[]);
    let r = chat_body(
        &gw,
        json!({"model": "gpt", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tollgate-deployment"), Some("default/dying"));
    // The client gets what was sent, then the stream breaks; nothing is replayed elsewhere.
    let body = r.bytes().await;
    if let Ok(b) = &body {
        let text = String::from_utf8_lossy(b);
        assert!(text.contains("tok2"), "{text}");
        assert!(!text.contains("[DONE]"), "{text}");
    }
    assert_eq!(dying.stats.requests(), 1);
    assert_eq!(good.stats.requests(), 0);
}

#[tokio::test]
async fn the_total_timeout_ends_a_stream_that_runs_too_long() {
    let up = MockUpstream::start(Behavior::SlowStream {
        chunks: 50,
        delay: Duration::from_millis(100),
    });
    let m = format!(
        "{}{}",
        keys(),
        deployment("slow", "gpt", &up.base_url(), ", timeouts: {total: 600ms}"),
    );
    let gw = Gateway::start(BIN, &m, &[]);
    let t = Instant::now();
    let r = chat_body(
        &gw,
        json!({"model": "gpt", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(
        eventually(Duration::from_secs(5), || up
            .stats
            .streams_cancelled
            .load(std::sync::atomic::Ordering::SeqCst)
            == 1)
        .await,
        "the upstream stream is cancelled"
    );
}

#[tokio::test]
async fn an_active_health_probe_takes_a_down_endpoint_out_and_brings_it_back() {
    let down = MockUpstream::start(Behavior::Status(
        503,
        r#"{"error":{"message":"down","type":"server_error"}}"#,
    ));
    let good = MockUpstream::start(Behavior::Ok(ok()));
    let probe = ", healthCheck: {interval: 100ms, timeout: 1s}";
    let m = format!(
        "{}{}{}{}",
        keys(),
        deployment("down", "gpt", &down.base_url(), probe),
        deployment("good", "gpt", &good.base_url(), probe),
        policy("gpt", "cooldown: {allowedFails: 1, duration: 60s}"),
    );
    let gw = Gateway::start(BIN, &m, &[]);
    // No user traffic at all: the probes alone find the down endpoint.
    let health;
    let t = Instant::now();
    loop {
        let (_, h) = get_json(&gw, "/health").await;
        if endpoint_state(&h, "gpt", "default/down") == "cooling_down" {
            health = h;
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        health["models"]["gpt"]["deployments"][0]["endpoints"][0]["probe"], "failed",
        "{health}"
    );
    assert_eq!(
        down.stats.requests(),
        0,
        "found out without a single request"
    );
    let counts = spread(&gw, "gpt", 20, 1).await;
    assert_eq!(counts.get("default/good"), Some(&20), "{counts:?}");

    // It recovers: the next probe puts it back, well before its 60 s cooldown would end.
    down.set_behavior(Behavior::Ok(ok()));
    let t = Instant::now();
    loop {
        let (_, h) = get_json(&gw, "/health").await;
        if endpoint_state(&h, "gpt", "default/down") == "healthy" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counts = spread(&gw, "gpt", 40, 1).await;
    assert!(counts.contains_key("default/down"), "{counts:?}");
    assert!(good.stats.probes.load(std::sync::atomic::Ordering::SeqCst) >= 2);
}
