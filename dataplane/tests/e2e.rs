//! End-to-end: the real `tollgate-dataplane` binary, real mock upstreams over HTTP on
//! 127.0.0.1, and a real HTTP client. Every test of the proxied endpoints runs twice, with the
//! client speaking HTTP/1.1 and h2c ([`Transport`]): the gateway serves the two with different
//! servers (its own HTTP/1.1 loop, hyper's HTTP/2), so each must show the same behaviour.

#![expect(clippy::unwrap_used, reason = "tests")]

use Transport::{H2c, Http1};
use serde_json::{Value, json};
use std::time::Duration;
use tollgate_crds::config::MockConfig;
use tollgate_testkit::{Behavior, Gateway, MockUpstream, closed_port, eventually};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate-dataplane");
const KEY: &str = "sk-e2e-all-models-0001";
const LIMITED_KEY: &str = "sk-e2e-only-mock-0002";
const EXPIRED_KEY: &str = "sk-e2e-expired-00003";
const PROVIDER_KEY: &str = "sk-provider-secret-do-not-log";
/// The spend series of the `gpt` deployment.
const GPT_SPEND: &str = r#"tollgate_spend_usd_total{model="gpt",deployment="team-a/gpt"}"#;

/// A model `gpt` served by `upstream` (as `upstream-gpt`, $2.5/$10 per million), a built-in
/// mock model `mock`, and three keys: all models, only `mock`, and expired.
fn manifests(upstream: &str) -> String {
    format!(
        r#"
apiVersion: tollgate.dev/v1alpha1
kind: LLMModel
metadata: {{name: gpt, namespace: team-a}}
spec:
  modelName: gpt
  provider: openai-compatible
  upstreamModel: upstream-gpt
  url: {upstream}
  credentialsRef: {{name: provider}}
  pricing: {{inputPerMillion: 2.5, outputPerMillion: 10}}
---
apiVersion: v1
kind: Secret
metadata: {{name: provider, namespace: team-a}}
stringData: {{apiKey: {PROVIDER_KEY}}}
---
apiVersion: tollgate.dev/v1alpha1
kind: LLMModel
metadata: {{name: mock}}
spec:
  modelName: mock
  provider: mock
  mock: {{promptTokens: 7, completionTokens: 3, reply: "one two three"}}
  pricing: {{inputPerMillion: 1, outputPerMillion: 2}}
---
apiVersion: v1
kind: Secret
metadata: {{name: keys}}
stringData: {{all: {KEY}, limited: {LIMITED_KEY}, expired: {EXPIRED_KEY}}}
---
apiVersion: tollgate.dev/v1alpha1
kind: VirtualKey
metadata: {{name: all}}
spec: {{secretRef: {{name: keys, key: all}}, team: platform}}
---
apiVersion: tollgate.dev/v1alpha1
kind: VirtualKey
metadata: {{name: limited}}
spec: {{secretRef: {{name: keys, key: limited}}, models: [mock]}}
---
apiVersion: tollgate.dev/v1alpha1
kind: VirtualKey
metadata: {{name: expired}}
spec: {{secretRef: {{name: keys, key: expired}}, expiresAt: "2020-01-01T00:00:00Z"}}
"#
    )
}

fn ok_upstream() -> MockUpstream {
    MockUpstream::start(Behavior::Ok(MockConfig {
        reply: "hello from upstream".into(),
        prompt_tokens: Some(1000),
        completion_tokens: Some(500),
        ..Default::default()
    }))
}

/// How the test client speaks to the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Http1,
    /// HTTP/2 in cleartext, with prior knowledge: the client starts with the HTTP/2 preface.
    H2c,
}

/// For each `async fn name(t: Transport)` named, the tests `name::http1` and `name::h2c`, which
/// run it over each transport.
macro_rules! on_both_transports {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn http1() {
                super::$name(super::Http1).await
            }
            #[tokio::test]
            async fn h2c() {
                super::$name(super::H2c).await
            }
        }
    )+};
}

/// A new client (so a new connection) speaking `t`.
fn client(t: Transport) -> reqwest::Client {
    let builder = reqwest::Client::builder().timeout(Duration::from_secs(20));
    match t {
        Http1 => builder.http1_only(),
        H2c => builder.http2_prior_knowledge(),
    }
    .build()
    .unwrap()
}

/// POSTs `body` over `t`, with a client of its own.
async fn post(
    t: Transport,
    gw: &Gateway,
    path: &str,
    key: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    post_on(&client(t), t, gw, path, key, body).await
}

/// POSTs `body` with `client` (of [`client`]`(t)`), checking that the answer came over `t`.
async fn post_on(
    client: &reqwest::Client,
    t: Transport,
    gw: &Gateway,
    path: &str,
    key: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut req = client
        .post(gw.url(path))
        .header("content-type", "application/json")
        .body(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.unwrap();
    let version = match t {
        Http1 => reqwest::Version::HTTP_11,
        H2c => reqwest::Version::HTTP_2,
    };
    assert_eq!(resp.version(), version, "{t:?}");
    resp
}

/// Waits (without blocking the test's runtime) up to `timeout` for `needle` in the log.
async fn logged(gw: &Gateway, needle: &str, timeout: Duration) -> bool {
    eventually(timeout, || gw.logs().contains(needle)).await
}

/// Sends `signal` (`TERM`, `INT`) to the gateway.
fn signal(gw: &Gateway, signal: &str) {
    let sent = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &gw.pid().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Like [`Gateway::wait_exit`] (whether the gateway exited cleanly within `timeout`), without
/// blocking the test's runtime, which drives the client's connections meanwhile.
async fn exited(gw: &mut Gateway, timeout: Duration) -> bool {
    // Once it has exited, `wait_exit` returns its status at once.
    eventually(timeout, || !gw.is_running()).await && gw.wait_exit(Duration::from_secs(1))
}

/// Like [`Gateway::terminate`]: SIGTERM, then up to 10 s for a clean exit.
async fn terminate(gw: &mut Gateway) -> bool {
    signal(gw, "TERM");
    exited(gw, Duration::from_secs(10)).await
}

async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["error"]["message"].is_string() && v["error"]["type"].is_string(),
        "not OpenAI-shaped: {v}"
    );
    (status, v["error"].clone())
}

fn chat(model: &str) -> String {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}).to_string()
}

on_both_transports!(chat_passes_through_with_cost_rename_and_provider_key);
async fn chat_passes_through_with_cost_rename_and_provider_key(t: Transport) {
    let up = ok_upstream();
    let gw = Gateway::start(BIN, &manifests(&up.base_url()), &[]);
    let resp = post(t, &gw, "/v1/chat/completions", Some(KEY), chat("gpt")).await;
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["x-tollgate-deployment"], "team-a/gpt");
    // 1000 × $2.5/M + 500 × $10/M = 0.0025 + 0.005
    assert_eq!(h["x-tollgate-cost-usd"], "0.0075");
    assert!(!h["x-request-id"].is_empty());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "hello from upstream"
    );
    assert_eq!(body["usage"]["prompt_tokens"], 1000);
    // The upstream saw its own model name and the provider key, not the virtual key.
    assert_eq!(up.stats.last_json()["model"], "upstream-gpt");
    assert_eq!(
        up.stats.last_auth.lock().unwrap().as_deref(),
        Some(format!("Bearer {PROVIDER_KEY}").as_str())
    );
    assert_eq!(
        up.stats.last_path.lock().unwrap().as_deref(),
        Some("/v1/chat/completions")
    );
    assert_eq!(gw.metric(GPT_SPEND).await.as_deref(), Some("0.0075"));
    assert!(
        !gw.logs().contains(PROVIDER_KEY),
        "provider key leaked into logs"
    );
    // The access line carries the request id, the key id (never the key), and the cost.
    let rid = h["x-request-id"].to_str().unwrap();
    // Logs arrive through a pipe: give the line a moment.
    logged(&gw, rid, Duration::from_secs(5)).await;
    let line = gw
        .logs()
        .lines()
        .find(|l| l.contains("request settled") && l.contains(rid))
        .map(str::to_string);
    let line = line.unwrap_or_else(|| panic!("no access line for {rid}:\n{}", gw.logs()));
    assert!(
        line.contains("key=\"default/all\"") && line.contains("cost_usd=0.0075"),
        "{line}"
    );
    assert!(!line.contains(KEY), "{line}");
}

on_both_transports!(body_passes_through_byte_for_byte_when_nothing_changes);
async fn body_passes_through_byte_for_byte_when_nothing_changes(t: Transport) {
    let up = ok_upstream();
    let m = manifests(&up.base_url()).replace("upstreamModel: upstream-gpt", "upstreamModel: gpt");
    let gw = Gateway::start(BIN, &m, &[]);
    let body = r#"{ "model":"gpt",  "messages":[{"role":"user","content":"caf\u00e9"}], "temperature": 0.50 }"#;
    let resp = post(t, &gw, "/v1/chat/completions", Some(KEY), body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        up.stats.last_body.lock().unwrap().as_deref(),
        Some(body.as_bytes())
    );
}

async fn read_sse(resp: reqwest::Response) -> Vec<String> {
    let text = resp.text().await.unwrap();
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect()
}

on_both_transports!(streaming_relays_events_and_charges_hidden_usage);
async fn streaming_relays_events_and_charges_hidden_usage(t: Transport) {
    let up = ok_upstream();
    let gw = Gateway::start(BIN, &manifests(&up.base_url()), &[]);
    let body =
        json!({"model": "gpt", "stream": true, "messages": [{"role": "user", "content": "hi"}]})
            .to_string();
    let resp = post(t, &gw, "/v1/chat/completions", Some(KEY), body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = read_sse(resp).await;
    assert_eq!(events.last().map(String::as_str), Some("data: [DONE]"));
    assert!(
        events.iter().all(|e| !e.contains("\"usage\":{")),
        "usage chunk leaked to a client that didn't ask: {events:?}"
    );
    let text: String = events
        .iter()
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text, "hello from upstream");
    // The gateway asked the upstream for usage and charged it.
    assert_eq!(
        up.stats.last_json()["stream_options"]["include_usage"],
        true
    );
    assert_eq!(gw.metric(GPT_SPEND).await.as_deref(), Some("0.0075"));
    assert_eq!(
        gw.metric(
            r#"tollgate_tokens_total{model="gpt",deployment="team-a/gpt",type="completion"}"#
        )
        .await
        .as_deref(),
        Some("500")
    );

    // A client that asks for usage gets the chunk, as the upstream sent it.
    let body = json!({"model": "gpt", "stream": true, "stream_options": {"include_usage": true}, "messages": []}).to_string();
    let events = read_sse(post(t, &gw, "/v1/chat/completions", Some(KEY), body).await).await;
    let usage: Value =
        serde_json::from_str(events[events.len() - 2].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 500);
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(gw.metric(GPT_SPEND).await.as_deref(), Some("0.015"));
}

on_both_transports!(completions_embeddings_and_models);
async fn completions_embeddings_and_models(t: Transport) {
    let up = ok_upstream();
    let gw = Gateway::start(BIN, &manifests(&up.base_url()), &[]);
    let resp = post(
        t,
        &gw,
        "/v1/completions",
        Some(KEY),
        json!({"model": "gpt", "prompt": "say hi"}).to_string(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        up.stats.last_path.lock().unwrap().as_deref(),
        Some("/v1/completions")
    );
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "hello from upstream");

    let resp = post(
        t,
        &gw,
        "/v1/embeddings",
        Some(KEY),
        json!({"model": "gpt", "input": ["a b", "c"]}).to_string(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-tollgate-cost-usd"], "0.0025");
    assert_eq!(
        up.stats.last_path.lock().unwrap().as_deref(),
        Some("/v1/embeddings")
    );
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);

    // The built-in mock serves the same endpoints.
    let resp = post(
        t,
        &gw,
        "/v1/embeddings",
        Some(LIMITED_KEY),
        json!({"model": "mock", "input": "x"}).to_string(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 64);

    let list = |key: &'static str| {
        let url = gw.url("/v1/models");
        async move {
            let v: Value = client(t)
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(list(KEY).await, ["gpt", "mock"]);
    assert_eq!(list(LIMITED_KEY).await, ["mock"]);
}

on_both_transports!(auth_and_request_errors_are_openai_shaped);
async fn auth_and_request_errors_are_openai_shaped(t: Transport) {
    let up = ok_upstream();
    let gw = Gateway::start(
        BIN,
        &manifests(&up.base_url()),
        &["--max-body-bytes", "2048"],
    );
    let cases: Vec<(Option<&str>, String, u16, &str)> = vec![
        (None, chat("gpt"), 401, "missing_api_key"),
        (
            Some("sk-not-a-real-key-000000"),
            chat("gpt"),
            401,
            "invalid_api_key",
        ),
        (Some(EXPIRED_KEY), chat("gpt"), 401, "key_expired"),
        (Some(LIMITED_KEY), chat("gpt"), 403, "model_not_allowed"),
        (Some(KEY), chat("no-such-model"), 404, "model_not_found"),
        (
            Some(KEY),
            "{\"model\": \"gpt\", ".into(),
            400,
            "invalid_json",
        ),
        (
            Some(KEY),
            json!({"model": "gpt"}).to_string(),
            400,
            "missing_field",
        ),
        (
            Some(KEY),
            json!({"model": "gpt", "messages": [], "pad": "x".repeat(4096)}).to_string(),
            413,
            "request_too_large",
        ),
    ];
    for (key, body, status, code) in cases {
        let (s, e) = error_of(post(t, &gw, "/v1/chat/completions", key, body).await).await;
        assert_eq!((s, e["code"].as_str().unwrap()), (status, code), "{e}");
    }
    // x-api-key works as well as Authorization.
    let resp = client(t)
        .post(gw.url("/v1/chat/completions"))
        .header("x-api-key", LIMITED_KEY)
        .header("x-request-id", "req-123")
        .body(chat("mock"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "req-123");
    // A body streamed without content-length is cut off at the limit too.
    let chunks =
        futures_util::stream::iter((0..10).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1024])));
    let resp = post(
        t,
        &gw,
        "/v1/chat/completions",
        Some(KEY),
        reqwest::Body::wrap_stream(chunks),
    )
    .await;
    assert_eq!(error_of(resp).await.0, 413);
    // None of the refused requests reached the upstream.
    assert_eq!(up.stats.requests(), 0);
    let logs = gw.logs();
    for secret in [
        KEY,
        LIMITED_KEY,
        EXPIRED_KEY,
        PROVIDER_KEY,
        "sk-not-a-real-key",
    ] {
        assert!(!logs.contains(secret), "{secret} leaked into logs");
    }
}

on_both_transports!(upstream_failures_become_clear_gateway_errors);
async fn upstream_failures_become_clear_gateway_errors(t: Transport) {
    let cases = [
        (
            Behavior::Status(500, r#"{"error":{"message":"boom","type":"server_error"}}"#),
            502,
            "upstream_server_error",
        ),
        (Behavior::Garbage, 502, "upstream_invalid_response"),
        (
            Behavior::Status(
                401,
                r#"{"error":{"message":"Incorrect API key provided: sk-pro***log"}}"#,
            ),
            502,
            "upstream_auth_error",
        ),
        (
            Behavior::Status(429, r#"{"error":{"message":"slow down"}}"#),
            429,
            "upstream_rate_limited",
        ),
    ];
    for (behavior, status, code) in cases {
        let up = MockUpstream::start(behavior);
        let gw = Gateway::start(BIN, &manifests(&up.base_url()), &[]);
        let (s, e) =
            error_of(post(t, &gw, "/v1/chat/completions", Some(KEY), chat("gpt")).await).await;
        assert_eq!((s, e["code"].as_str().unwrap()), (status, code), "{e}");
        assert!(
            e["message"].as_str().unwrap().contains("team-a/gpt"),
            "the message names the deployment: {e}"
        );
        assert!(
            !e.to_string().contains("sk-pro"),
            "upstream error body echoed: {e}"
        );
        assert_eq!(up.stats.requests(), 1);
        assert_eq!(
            gw.metric(r#"tollgate_requests_total{model="gpt",deployment="team-a/gpt",outcome="upstream_error"}"#).await.as_deref(),
            Some("1")
        );
    }
    // An upstream's own validation error (OpenAI-shaped 400) reaches the client as sent.
    let up = MockUpstream::start(Behavior::Status(
        400,
        r#"{"error":{"message":"max_tokens is too large","type":"invalid_request_error","code":null}}"#,
    ));
    let gw = Gateway::start(BIN, &manifests(&up.base_url()), &[]);
    let (s, e) = error_of(post(t, &gw, "/v1/chat/completions", Some(KEY), chat("gpt")).await).await;
    assert_eq!(
        (s, e["message"].as_str().unwrap()),
        (400, "max_tokens is too large")
    );
    // Nothing listening at all.
    let gw = Gateway::start(
        BIN,
        &manifests(&format!("http://127.0.0.1:{}/v1", closed_port())),
        &[],
    );
    let (s, e) = error_of(post(t, &gw, "/v1/chat/completions", Some(KEY), chat("gpt")).await).await;
    assert_eq!(
        (s, e["code"].as_str().unwrap()),
        (503, "upstream_unreachable")
    );
}

on_both_transports!(client_disconnect_cancels_the_upstream_stream);
async fn client_disconnect_cancels_the_upstream_stream(t: Transport) {
    let up = MockUpstream::start(Behavior::SlowStream {
        chunks: 200,
        delay: Duration::from_millis(50),
    });
    let gw = Gateway::start(BIN, &manifests(&up.base_url()), &[]);
    let body = json!({"model": "gpt", "stream": true, "messages": []}).to_string();
    // Kept to the end: over h2c its connection stays open, and the hang-up is the stream's reset
    // (over HTTP/1.1, the connection's close).
    let client = client(t);
    let mut resp = post_on(&client, t, &gw, "/v1/chat/completions", Some(KEY), body).await;
    // Read a couple of chunks, then hang up.
    let first = resp.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    let _ = resp.chunk().await.unwrap();
    drop(resp);
    assert!(
        eventually(Duration::from_secs(5), || up
            .stats
            .streams_cancelled
            .load(std::sync::atomic::Ordering::SeqCst)
            == 1)
        .await,
        "the upstream stream was not cancelled"
    );
    assert_eq!(
        up.stats
            .streams_completed
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    let gone =
        r#"tollgate_requests_total{model="gpt",deployment="team-a/gpt",outcome="client_gone"}"#;
    assert_eq!(gw.metric(gone).await.as_deref(), Some("1"));
}

on_both_transports!(reload_swaps_good_config_and_keeps_serving_on_a_bad_one);
async fn reload_swaps_good_config_and_keeps_serving_on_a_bad_one(t: Transport) {
    let up = ok_upstream();
    let m = manifests(&up.base_url());
    let gw = Gateway::start(BIN, &m, &[]);
    assert_eq!(
        post(t, &gw, "/v1/chat/completions", Some(KEY), chat("new-model"))
            .await
            .status(),
        404
    );

    // A good edit: a new model appears.
    let added = format!(
        "{m}\n---\napiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata: {{name: new}}\nspec: {{modelName: new-model, provider: mock}}\n"
    );
    gw.write_manifests(&added);
    assert!(
        logged(&gw, "reloaded manifests", Duration::from_secs(10)).await,
        "{}",
        gw.logs()
    );
    assert_eq!(
        post(t, &gw, "/v1/chat/completions", Some(KEY), chat("new-model"))
            .await
            .status(),
        200
    );

    // A bad edit: the old config keeps serving, and the log names the object and field.
    let broken = added.replace(
        "modelName: new-model, provider: mock",
        "modelName: new-model, provider: mock, pricing: {inputPerMillion: -1}",
    );
    gw.write_manifests(&broken);
    let kept = "still serving the previous config";
    assert!(
        logged(&gw, kept, Duration::from_secs(10)).await,
        "{}",
        gw.logs()
    );
    assert!(
        gw.logs()
            .contains("LLMModel default/new: spec.pricing.inputPerMillion"),
        "{}",
        gw.logs()
    );
    assert_eq!(
        post(t, &gw, "/v1/chat/completions", Some(KEY), chat("new-model"))
            .await
            .status(),
        200
    );
    assert_eq!(
        post(t, &gw, "/v1/chat/completions", Some(KEY), chat("gpt"))
            .await
            .status(),
        200
    );
}

on_both_transports!(health_and_metrics_endpoints);
async fn health_and_metrics_endpoints(t: Transport) {
    let gw = Gateway::start(
        BIN,
        &manifests("http://127.0.0.1:9/v1"),
        &["--per-key-metrics"],
    );
    let r = client(t)
        .get(gw.url("/health/liveliness"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = client(t)
        .get(gw.url("/health/readiness"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (
            v["status"].as_str(),
            v["models"].as_u64(),
            v["keys"].as_u64()
        ),
        (Some("ready"), Some(2), Some(3))
    );
    let resp = post(
        t,
        &gw,
        "/v1/chat/completions",
        Some(LIMITED_KEY),
        chat("mock"),
    )
    .await;
    assert_eq!(resp.status(), 200);
    // 7 × $1/M + 3 × $2/M
    assert_eq!(
        gw.metric(r#"tollgate_key_spend_usd_total{key="default/limited"}"#)
            .await
            .as_deref(),
        Some("0.000013")
    );
    assert!(
        gw.metric("tollgate_request_duration_seconds_bucket")
            .await
            .is_some()
    );
    let (s, e) = error_of(client(t).get(gw.url("/v1/nope")).send().await.unwrap()).await;
    assert_eq!((s, e["code"].as_str().unwrap()), (404, "unknown_url"));
}

/// A chat answer and a whole stream from the `ok_upstream` model `gpt`.
async fn serves_a_chat_and_a_stream(t: Transport, gw: &Gateway) {
    let resp = post(t, gw, "/v1/chat/completions", Some(KEY), chat("gpt")).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "hello from upstream");
    let body =
        json!({"model": "gpt", "stream": true, "messages": [{"role": "user", "content": "hi"}]})
            .to_string();
    let events = read_sse(post(t, gw, "/v1/chat/completions", Some(KEY), body).await).await;
    assert_eq!(events.last().map(String::as_str), Some("data: [DONE]"));
}

on_both_transports!(busy_polling_serves_requests_and_sleeps_when_idle);
/// `--busy-poll`: requests are served as without it, the threads poll for the window after
/// their work, and an idle gateway sleeps.
async fn busy_polling_serves_requests_and_sleeps_when_idle(t: Transport) {
    let up = ok_upstream();
    let gw = Gateway::start(BIN, &manifests(&up.base_url()), &["--busy-poll", "10ms"]);
    serves_a_chat_and_a_stream(t, &gw).await;
    // The requests' threads polled for 10 ms after them (windows closed by now).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let windows: u64 = gw
        .metric("tollgate_busy_poll_windows_total ")
        .await
        .unwrap()
        .parse()
        .unwrap();
    let polled: f64 = gw
        .metric("tollgate_busy_poll_seconds_total ")
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(windows >= 1, "no polling window after two requests");
    assert!(
        polled >= 0.01 * windows as f64,
        "{windows} windows of 10 ms polled only {polled} s"
    );
    // Then it sleeps: the reload check (every 100 ms here) wakes a thread without work, which
    // starts no window. (The scrapes above started one; it is long over.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpu = gw.cpu_ms();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = gw.cpu_ms() - cpu;
    assert!(
        idle <= 200,
        "an idle gateway should sleep, but used {idle} ms of CPU in a second"
    );
}

on_both_transports!(an_upstream_answer_sent_before_the_body_was_read_reaches_the_client);
/// An upstream that refuses a large body as soon as it has the request head (a 413, as vLLM or
/// a proxy in front of it may) and closes without reading the rest: the client gets that
/// answer, not a failed connection.
async fn an_upstream_answer_sent_before_the_body_was_read_reaches_the_client(t: Transport) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const ANSWER: &str = r#"{"error":{"message":"request too large for this deployment","type":"invalid_request_error","code":"request_too_large"}}"#;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            let answer = format!(
                "HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{ANSWER}",
                ANSWER.len()
            );
            let _ = s.write_all(answer.as_bytes()).await;
            // Dropped with the body unread: the connection is reset.
        }
    });
    let gw = Gateway::start(BIN, &manifests(&url), &[]);
    let big =
        json!({"model": "gpt", "messages": [{"role": "user", "content": "x".repeat(8 << 20)}]})
            .to_string();
    let resp = post(t, &gw, "/v1/chat/completions", Some(KEY), big).await;
    assert_eq!(resp.status(), 413);
    assert_eq!(resp.text().await.unwrap(), ANSWER);
}

/// An upstream whose streams last 10 s (100 chunks, 100 ms apart), and a gateway on it with a
/// 1 s shutdown timeout and a usage log.
fn slow_streams_and_a_short_shutdown() -> (MockUpstream, Gateway) {
    let up = MockUpstream::start(Behavior::Ok(MockConfig {
        reply: "word ".repeat(100),
        chunks: Some(100),
        chunk_delay_ms: 100,
        prompt_tokens: Some(10),
        completion_tokens: Some(100),
        ..Default::default()
    }));
    let gw = Gateway::start(
        BIN,
        &manifests(&up.base_url()),
        &[
            "--shutdown-timeout",
            "1s",
            "--usage-log",
            "{dir}/usage.jsonl",
        ],
    );
    (up, gw)
}

on_both_transports!(shutdown_cuts_streams_at_its_timeout_and_flushes_their_usage);
/// SIGTERM with a stream in flight: the stream may run for the shutdown timeout, then its
/// connection is closed, its request settled and the usage log flushed before the process
/// exits (on Kubernetes: before the SIGKILL at the end of the grace period).
async fn shutdown_cuts_streams_at_its_timeout_and_flushes_their_usage(t: Transport) {
    let (_up, mut gw) = slow_streams_and_a_short_shutdown();
    let done = post(t, &gw, "/v1/chat/completions", Some(KEY), chat("gpt")).await;
    assert_eq!(done.status(), 200);
    done.bytes().await.unwrap();
    let body =
        json!({"model": "gpt", "stream": true, "messages": [{"role": "user", "content": "hi"}]})
            .to_string();
    let mut streaming = post(t, &gw, "/v1/chat/completions", Some(KEY), body).await;
    assert_eq!(streaming.status(), 200);
    assert!(streaming.chunk().await.unwrap().is_some());

    let asked = std::time::Instant::now();
    assert!(terminate(&mut gw).await, "the gateway should exit cleanly");
    let took = asked.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(6),
        "exit should come at the 1 s shutdown timeout, not at the stream's end (10 s): {took:?}"
    );
    assert!(
        logged(&gw, "shutdown timeout", Duration::from_secs(1)).await,
        "the cut should be logged: {}",
        gw.logs()
    );
    // The client sees its stream end early, without `[DONE]`.
    let mut rest = Vec::new();
    while let Ok(Some(c)) = streaming.chunk().await {
        rest.extend_from_slice(&c);
    }
    assert!(!String::from_utf8_lossy(&rest).contains("[DONE]"));
    // Both requests are in the flushed log: the finished one, and the cut one.
    let log = std::fs::read_to_string(gw.manifest_dir().join("usage.jsonl")).unwrap();
    let outcomes: Vec<String> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["outcome"].to_string())
        .collect();
    assert_eq!(outcomes, [r#""success""#, r#""shutdown""#], "{log}");
}

on_both_transports!(a_second_signal_cuts_the_shutdown_short_and_keeps_the_usage);
/// A second SIGTERM (or Ctrl-C) doesn't wait out the shutdown delay and timeout: the stream in
/// flight is cut at once, and still settled and logged before the process exits.
async fn a_second_signal_cuts_the_shutdown_short_and_keeps_the_usage(t: Transport) {
    let (up, _) = slow_streams_and_a_short_shutdown();
    let mut gw = Gateway::start(
        BIN,
        &manifests(&up.base_url()),
        &[
            "--shutdown-delay",
            "5s",
            "--shutdown-timeout",
            "30s",
            "--usage-log",
            "{dir}/usage.jsonl",
        ],
    );
    let body =
        json!({"model": "gpt", "stream": true, "messages": [{"role": "user", "content": "hi"}]})
            .to_string();
    let mut streaming = post(t, &gw, "/v1/chat/completions", Some(KEY), body).await;
    assert!(streaming.chunk().await.unwrap().is_some());
    signal(&gw, "TERM");
    assert!(logged(&gw, "readiness fails now", Duration::from_secs(2)).await);
    let asked = std::time::Instant::now();
    assert!(
        terminate(&mut gw).await,
        "the gateway should exit cleanly: {}",
        gw.logs()
    );
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "a second signal should cut the 5 s delay and the 30 s timeout short: {took:?}"
    );
    assert!(gw.logs().contains("second signal"), "{}", gw.logs());
    let log = std::fs::read_to_string(gw.manifest_dir().join("usage.jsonl")).unwrap();
    let outcomes: Vec<String> = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["outcome"].to_string())
        .collect();
    assert_eq!(outcomes, [r#""shutdown""#], "{log}");
}

on_both_transports!(after_sigterm_readiness_fails_while_requests_are_served_for_the_delay);
/// SIGTERM with `--shutdown-delay`: readiness fails at once, new connections are still served
/// for the delay (Kubernetes is still removing the pod from its endpoints), then the process
/// exits.
async fn after_sigterm_readiness_fails_while_requests_are_served_for_the_delay(t: Transport) {
    let up = ok_upstream();
    let mut gw = Gateway::start(BIN, &manifests(&up.base_url()), &["--shutdown-delay", "2s"]);
    let ready = || async {
        let r = client(t)
            .get(gw.url("/health/readiness"))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(ready().await.0, 200);
    let resp = post(t, &gw, "/v1/chat/completions", Some(KEY), chat("gpt")).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("connection").is_none());
    let asked = std::time::Instant::now();
    signal(&gw, "TERM");
    assert!(
        logged(&gw, "readiness fails now", Duration::from_secs(1)).await,
        "{}",
        gw.logs()
    );
    let (status, body) = ready().await;
    assert_eq!(
        (status, body["status"].as_str()),
        (503, Some("shutting down"))
    );
    // Still served, on new connections (each request here has its own client); over HTTP/1.1,
    // told to close them after. (HTTP/2 has no `connection` header: an h2c connection gets a
    // GOAWAY, see the next test.)
    let resp = post(t, &gw, "/v1/chat/completions", Some(KEY), chat("gpt")).await;
    assert_eq!(resp.status(), 200);
    match t {
        Http1 => assert_eq!(resp.headers()["connection"], "close"),
        H2c => assert!(resp.headers().get("connection").is_none()),
    }
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "the checks above took longer than the delay; the test can't tell"
    );
    assert!(
        exited(&mut gw, Duration::from_secs(10)).await,
        "the gateway should exit cleanly after the delay"
    );
    let took = asked.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(8),
        "exit should come after the 2 s delay: {took:?}"
    );
}

/// During `--shutdown-delay` an h2c connection that is served a request gets a GOAWAY after it
/// (HTTP/2's `Connection: close`): its client opens its next connection, elsewhere once the
/// pod has left the endpoints, rather than keep this one until the delay ends.
// h2c only: the HTTP/1.1 counterpart (`Connection: close`) is asserted in the test above.
#[tokio::test]
async fn during_the_shutdown_delay_an_h2c_connection_gets_a_goaway() {
    let up = ok_upstream();
    let mut gw = Gateway::start(BIN, &manifests(&up.base_url()), &["--shutdown-delay", "3s"]);
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let mut conn = tokio::spawn(conn);
    let request = || {
        http::Request::post(gw.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {KEY}"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(chat("gpt"))))
            .unwrap()
    };
    let resp = send.send_request(request()).await.unwrap();
    assert_eq!(resp.status(), 200);
    signal(&gw, "TERM");
    assert!(
        logged(&gw, "readiness fails now", Duration::from_secs(1)).await,
        "{}",
        gw.logs()
    );
    // Not closed for being open: the connection stays until it is served a request.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut conn)
            .await
            .is_err()
    );
    let resp = send.send_request(request()).await.unwrap();
    assert_eq!(resp.status(), 200);
    let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
    let asked = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_millis(1500), &mut conn).await;
    assert!(ended.is_ok(), "the connection lasts until the delay ends");
    assert!(asked.elapsed() < Duration::from_millis(1500));
    assert!(
        exited(&mut gw, Duration::from_secs(10)).await,
        "the gateway should exit cleanly after the delay"
    );
}

/// The same over HTTP/2 (h2c), where each stream runs in a task of its own: 20 streams cut at the
/// shutdown timeout are all settled and in the flushed log.
// h2c only: concurrent streams on one connection have no HTTP/1.1 counterpart.
#[tokio::test]
async fn shutdown_settles_every_cut_http2_stream() {
    let (_up, mut gw) = slow_streams_and_a_short_shutdown();
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let body =
        json!({"model": "gpt", "stream": true, "messages": [{"role": "user", "content": "hi"}]})
            .to_string();
    let mut streams = Vec::new();
    for _ in 0..20 {
        let req = h2
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(body.clone());
        streams.push(tokio::spawn(async move {
            let mut resp = req.send().await.unwrap();
            assert_eq!(resp.version(), reqwest::Version::HTTP_2);
            assert!(resp.chunk().await.unwrap().is_some());
            resp
        }));
    }
    let mut open = Vec::new();
    for s in streams {
        open.push(s.await.unwrap());
    }
    assert!(gw.terminate(), "the gateway should exit cleanly");
    drop(open);
    let log = std::fs::read_to_string(gw.manifest_dir().join("usage.jsonl")).unwrap();
    let cut = log
        .lines()
        .filter(|l| serde_json::from_str::<Value>(l).unwrap()["outcome"] == "shutdown")
        .count();
    assert_eq!(cut, 20, "{log}");
}

on_both_transports!(the_work_stealing_runtime_serves_streams_and_keeps_deadlines);
/// `--runtime work-stealing` (one multi-threaded runtime; requests may move between threads, and
/// so do the upstream deadline's timers): answers, streams with their usage charged, and a 504
/// at the first-byte deadline.
async fn the_work_stealing_runtime_serves_streams_and_keeps_deadlines(t: Transport) {
    let up = ok_upstream();
    let slow = MockUpstream::start(Behavior::Ok(MockConfig {
        latency_ms: 5_000,
        ..Default::default()
    }));
    let m = manifests(&up.base_url())
        + &format!(
            "---\napiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata: {{name: slow}}\nspec: {{modelName: slow, provider: openai-compatible, url: '{}'}}\n---\napiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: slow}}\nspec: {{models: [slow], retries: {{attempts: 1}}, timeouts: {{firstByte: 500ms}}}}\n",
            slow.base_url()
        );
    let gw = Gateway::start(BIN, &m, &["--runtime", "work-stealing"]);
    for _ in 0..5 {
        serves_a_chat_and_a_stream(t, &gw).await;
    }
    // 10 x (1000 x $2.5/M + 500 x $10/M).
    assert_eq!(gw.metric(GPT_SPEND).await.as_deref(), Some("0.075"));
    let asked = std::time::Instant::now();
    let resp = post(t, &gw, "/v1/chat/completions", Some(KEY), chat("slow")).await;
    let waited = asked.elapsed();
    assert_eq!(resp.status(), 504);
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
}

/// `--busy-poll` needs the per-core runtime; with the work-stealing one, startup says so.
// No transport: the process refuses to start.
#[test]
fn busy_polling_with_work_stealing_is_refused() {
    let out = std::process::Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--manifests", "/nonexistent"])
        .args(["--runtime", "work-stealing", "--busy-poll", "100us"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--busy-poll needs --runtime per-core"),
        "{err}"
    );
}

// No transport: the process refuses to start.
#[test]
fn invalid_manifests_fail_startup_with_the_reason() {
    let out = std::process::Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--manifests"])
        .arg({
            let dir = std::env::temp_dir().join(format!("tollgate-bad-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("m.yaml"), "apiVersion: tollgate.dev/v1alpha1\nkind: VirtualKey\nmetadata: {name: k}\nspec: {secretRef: {name: missing}}\n").unwrap();
            dir
        })
        // A config error is not a crash: no stack trace, even when backtraces are asked for.
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("VirtualKey default/k: spec.secretRef: Secret default/missing not found"),
        "{err}"
    );
    assert!(
        !err.contains("Stack backtrace") && !err.contains("main.rs"),
        "{err}"
    );
}

on_both_transports!(a_client_leaving_after_the_usage_chunk_is_still_charged_exactly);
async fn a_client_leaving_after_the_usage_chunk_is_still_charged_exactly(t: Transport) {
    let up = MockUpstream::start(Behavior::UsageThenStall {
        prompt: 1000,
        completion: 500,
    });
    let gw = Gateway::start(BIN, &manifests(&up.base_url()), &[]);
    let body = json!({"model": "gpt", "stream": true, "stream_options": {"include_usage": true}, "messages": []}).to_string();
    // Kept to the end, as in `client_disconnect_cancels_the_upstream_stream`.
    let client = client(t);
    let mut resp = post_on(&client, t, &gw, "/v1/chat/completions", Some(KEY), body).await;
    let mut seen = String::new();
    while !seen.contains("\"usage\":{") {
        let chunk = resp
            .chunk()
            .await
            .unwrap()
            .expect("the usage chunk comes before the stall");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    drop(resp);
    let gone =
        r#"tollgate_requests_total{model="gpt",deployment="team-a/gpt",outcome="client_gone"}"#;
    assert!(
        eventually(Duration::from_secs(5), || up
            .stats
            .streams_cancelled
            .load(std::sync::atomic::Ordering::SeqCst)
            == 1)
        .await
    );
    assert_eq!(gw.metric(gone).await.as_deref(), Some("1"));
    // 1000 × $2.5/M + 500 × $10/M, though the stream never finished.
    assert_eq!(gw.metric(GPT_SPEND).await.as_deref(), Some("0.0075"));
}

/// A raw HTTP/1.1 upstream on 127.0.0.1 that answers every request with a fixed chat completion
/// and counts connections and requests. With `close_after_each`, it closes the connection
/// after each response without saying so (as a server whose idle timeout is short does).
struct RawUpstream {
    addr: std::net::SocketAddr,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl RawUpstream {
    fn start(close_after_each: bool) -> Self {
        use std::io::{BufRead, BufReader, Read, Write};
        use std::sync::atomic::Ordering::SeqCst;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (c, r) = (connections.clone(), requests.clone());
        std::thread::spawn(move || {
            for sock in listener.incoming() {
                let Ok(sock) = sock else { return };
                c.fetch_add(1, SeqCst);
                let r = r.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(sock.try_clone().unwrap());
                    let mut sock = sock;
                    loop {
                        let mut len = 0usize;
                        loop {
                            let mut line = String::new();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            if let Some(v) =
                                line.to_ascii_lowercase().strip_prefix("content-length:")
                            {
                                len = v.trim().parse().unwrap();
                            }
                        }
                        let mut body = vec![0; len];
                        reader.read_exact(&mut body).unwrap();
                        r.fetch_add(1, SeqCst);
                        let resp = if String::from_utf8_lossy(&body).contains(r#""stream":true"#) {
                            // SSE framed with CRLF (as sse-starlette does), and the usage event
                            // and [DONE] in one chunk.
                            let content = "data: {\"id\":\"raw\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"raw\"}}]}\r\n\r\n";
                            let last = "data: {\"id\":\"raw\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":5}}\r\n\r\ndata: [DONE]\r\n\r\n";
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{content}\r\n{:x}\r\n{last}\r\n0\r\n\r\n",
                                content.len(),
                                last.len()
                            )
                        } else {
                            let json = r#"{"id":"raw","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"raw"},"finish_reason":"stop"}],"usage":{"prompt_tokens":10,"completion_tokens":5}}"#;
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{json}",
                                json.len()
                            )
                        };
                        sock.write_all(resp.as_bytes()).unwrap();
                        if close_after_each {
                            return;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            connections,
            requests,
        }
    }
}

on_both_transports!(upstream_connections_are_reused_and_a_closed_one_loses_no_request);
async fn upstream_connections_are_reused_and_a_closed_one_loses_no_request(t: Transport) {
    use std::sync::atomic::Ordering::SeqCst;
    for close_after_each in [false, true] {
        let up = RawUpstream::start(close_after_each);
        let gw = Gateway::start(BIN, &manifests(&format!("http://{}/v1", up.addr)), &[]);
        for i in 0..20 {
            let resp = post(t, &gw, "/v1/chat/completions", Some(KEY), chat("gpt")).await;
            assert_eq!(
                resp.status(),
                200,
                "request {i}, closing={close_after_each}"
            );
            assert_eq!(resp.headers()["x-tollgate-cost-usd"], "0.000075");
            // No pause: with the closing upstream the next request often races the close, and
            // must then go out again on a new connection.
        }
        // Every request reached the upstream once; with keep-alive they shared a connection
        // per gateway thread (the test's gateway runs two).
        assert_eq!(up.requests.load(SeqCst), 20);
        let conns = up.connections.load(SeqCst);
        if close_after_each {
            assert_eq!(conns, 20);
        } else {
            assert!(conns <= 2, "upstream connections were not reused: {conns}");
        }
    }
}

on_both_transports!(crlf_framed_stream_is_charged_and_its_usage_event_dropped);
async fn crlf_framed_stream_is_charged_and_its_usage_event_dropped(t: Transport) {
    let up = RawUpstream::start(false);
    let gw = Gateway::start(BIN, &manifests(&format!("http://{}/v1", up.addr)), &[]);
    let body =
        json!({"model": "gpt", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let resp = post(t, &gw, "/v1/chat/completions", Some(KEY), body.to_string()).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    // The client didn't ask for usage: the usage event is gone, the rest is as sent.
    assert!(text.contains(r#""content":"raw""#), "{text}");
    assert!(!text.contains("usage"), "{text}");
    assert!(text.ends_with("data: [DONE]\r\n\r\n"), "{text:?}");
    // 10 x $2.5/M + 5 x $10/M, settled when the stream ended.
    assert_eq!(gw.metric(GPT_SPEND).await.as_deref(), Some("0.000075"));
}

// h2c only, and by curl: another client's h2c than reqwest's, which the cases above use.
#[tokio::test]
async fn http2_prior_knowledge_clients_are_served() {
    let up = ok_upstream();
    let gw = Gateway::start(BIN, &manifests(&up.base_url()), &[]);
    let out = std::process::Command::new("curl")
        .args(["-sS", "--http2-prior-knowledge", "-w", "\n%{http_version}"])
        .args(["-H", &format!("Authorization: Bearer {KEY}")])
        .args(["-H", "content-type: application/json", "-d", &chat("gpt")])
        .arg(gw.url("/v1/chat/completions"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    let (body, version) = out.rsplit_once('\n').unwrap();
    assert_eq!(version, "2", "{out}");
    let v: Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "hello from upstream");
}
