//! Never $0 once a request reached an upstream: the real binary, real mock upstreams on
//! 127.0.0.1, and the usage log as the record of what each request was charged.
//!
//! Work an upstream did is charged with the usage it reported, or, when it reported none (a
//! stream cut before its usage chunk, a client that left, a timeout after the request went
//! out, a 2xx that could not be read), with an estimate marked `usage_source: estimated`: the
//! prompt from the tokenizer, the completion from the text relayed. A request that never
//! reached an upstream stays free.

#![expect(clippy::unwrap_used, reason = "tests")]

use serde_json::{Value, json};
use std::time::Duration;
use tollgate_crds::config::MockConfig;
use tollgate_dataplane::accounting::tokens::{Family, count_text};
use tollgate_testkit::{Behavior, Gateway, MockUpstream, closed_port, eventually};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate-dataplane");
const KEY: &str = "sk-money-test-key-0001";
/// $2 per million prompt tokens, $8 per million completion tokens: pico-dollars per token.
const INPUT_PICO: u64 = 2_000_000;
const OUTPUT_PICO: u64 = 8_000_000;

/// A model `gpt` (upstream model `gpt-4o`, so counted with `o200k_base`) served by `url`, with
/// an optional RoutePolicy spec.
fn manifests(url: &str, policy: Option<&str>) -> String {
    let mut m = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData: {{k: {KEY}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: VirtualKey\nmetadata: {{name: k}}\nspec: {{secretRef: {{name: keys, key: k}}}}\n---\n\
         apiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata: {{name: gpt}}\n\
         spec: {{modelName: gpt, provider: openai-compatible, upstreamModel: gpt-4o, url: '{url}', pricing: {{inputPerMillion: 2, outputPerMillion: 8}}}}\n"
    );
    if let Some(p) = policy {
        m += &format!(
            "---\napiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: p}}\nspec: {{models: [gpt], {p}}}\n"
        );
    }
    m
}

fn start(up: &MockUpstream, policy: Option<&str>) -> Gateway {
    Gateway::start(
        BIN,
        &manifests(&up.base_url(), policy),
        &["--usage-log", "{dir}/usage.jsonl"],
    )
}

const PROMPT: &str = "Count slowly from one to two hundred, one number per line.";

fn body(stream: bool) -> String {
    json!({"model": "gpt", "stream": stream, "messages": [{"role": "user", "content": PROMPT}]})
        .to_string()
}

/// The prompt as the gateway estimates it for gpt-4o: the text plus OpenAI's chat overhead
/// (3 to prime the reply, 3 per message, the role).
fn prompt_estimate() -> u64 {
    3 + 3 + count_text(Family::O200k, "user") + count_text(Family::O200k, PROMPT)
}

async fn post(gw: &Gateway, body: String, timeout: Duration) -> reqwest::Result<reqwest::Response> {
    reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .unwrap()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
}

/// The usage records written so far (waiting up to 5 s for `n` of them, with the test's
/// runtime free to run: a dropped response's connection closes there).
async fn records(gw: &Gateway, n: usize) -> Vec<Value> {
    let path = gw.manifest_dir().join("usage.jsonl");
    let read = || {
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    eventually(Duration::from_secs(5), || read().len() >= n).await;
    read()
}

fn cost(prompt: u64, completion: u64) -> u64 {
    prompt * INPUT_PICO + completion * OUTPUT_PICO
}

/// A stream the upstream ends normally but without a usage chunk: charged the prompt estimate
/// and exactly the tokens of the text it relayed.
#[tokio::test]
async fn a_stream_without_usage_is_charged_for_the_text_relayed() {
    let up = MockUpstream::start(Behavior::SlowStream {
        chunks: 4,
        delay: Duration::from_millis(1),
    });
    let gw = start(&up, None);
    let r = post(&gw, body(true), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // What the upstream generated, as it sent it: "tok0 tok1 tok2 tok3 ".
    let generated: String = (0..4).map(|i| format!("tok{i} ")).collect();
    let completion = count_text(Family::O200k, &generated);
    let recs = records(&gw, 1).await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    let r = &recs[0];
    assert_eq!(r["outcome"], "success");
    assert_eq!(r["usage_source"], "estimated");
    assert_eq!(r["prompt_tokens"], prompt_estimate());
    assert_eq!(r["completion_tokens"], completion);
    assert_eq!(r["cost_pico"], cost(prompt_estimate(), completion));
}

/// A client that leaves a stream before its usage chunk: charged for what it was sent, not $0.
#[tokio::test]
async fn a_stream_cut_by_the_client_is_charged_for_what_was_relayed() {
    let up = MockUpstream::start(Behavior::SlowStream {
        chunks: 200,
        delay: Duration::from_millis(30),
    });
    let gw = start(&up, None);
    let mut r = post(&gw, body(true), Duration::from_secs(10))
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        got.push(r.chunk().await.unwrap().unwrap());
    }
    drop(r);
    let recs = records(&gw, 1).await;
    assert_eq!(recs.len(), 1, "{recs:?} {}", gw.logs());
    let rec = &recs[0];
    assert_eq!(rec["outcome"], "client_gone");
    assert_eq!(rec["usage_source"], "estimated");
    assert_eq!(rec["prompt_tokens"], prompt_estimate());
    // At least what the client read; at most what the upstream sent by the time it noticed.
    let sent = up.stats.requests();
    assert_eq!(sent, 1);
    let completion = rec["completion_tokens"].as_u64().unwrap();
    let read: String = got
        .iter()
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    let read_tokens = read.matches("tok").count() as u64;
    assert!(
        completion >= read_tokens && completion < 200 * 3,
        "{completion} tokens charged, {read_tokens} chunks read"
    );
    assert_eq!(
        rec["cost_pico"],
        cost(prompt_estimate(), completion),
        "{rec}"
    );
}

/// A non-streamed request the gateway cuts while the upstream works (shutdown's timeout; a
/// client that resets an HTTP/2 stream is dropped the same way): the prompt is charged.
#[tokio::test]
async fn a_request_cut_while_the_upstream_works_pays_for_the_prompt() {
    let up = MockUpstream::start(Behavior::Ok(MockConfig {
        latency_ms: 10_000,
        prompt_tokens: Some(10),
        completion_tokens: Some(5),
        ..Default::default()
    }));
    let mut gw = Gateway::start(
        BIN,
        &manifests(&up.base_url(), None),
        &[
            "--usage-log",
            "{dir}/usage.jsonl",
            "--shutdown-timeout",
            "300ms",
        ],
    );
    let pending = tokio::spawn({
        let url = gw.url("/v1/chat/completions");
        async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth(KEY)
                .header("content-type", "application/json")
                .body(body(false))
                .send()
                .await
        }
    });
    assert!(eventually(Duration::from_secs(5), || up.stats.requests() == 1).await);
    assert!(gw.terminate(), "{}", gw.logs());
    assert!(
        pending.await.unwrap().is_err(),
        "the cut request got an answer"
    );
    let recs = records(&gw, 1).await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["outcome"], "shutdown");
    assert_eq!(recs[0]["usage_source"], "estimated");
    assert_eq!(recs[0]["prompt_tokens"], prompt_estimate());
    assert_eq!(recs[0]["cost_pico"], cost(prompt_estimate(), 0));
}

/// A client that hangs up on a non-streamed request doesn't make it free: the request runs to
/// the upstream's answer and is charged what it reports.
#[tokio::test]
async fn a_client_that_hangs_up_is_charged_what_the_upstream_reports() {
    let up = MockUpstream::start(Behavior::Ok(MockConfig {
        latency_ms: 1_000,
        prompt_tokens: Some(10),
        completion_tokens: Some(5),
        ..Default::default()
    }));
    let gw = start(&up, None);
    let err = post(&gw, body(false), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    let recs = records(&gw, 1).await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    let r = &recs[0];
    let charged = r["cost_pico"].as_u64().unwrap();
    match r["usage_source"].as_str().unwrap() {
        "reported" => assert_eq!(charged, cost(10, 5), "{r}"),
        _ => assert_eq!(charged, cost(prompt_estimate(), 0), "{r}"),
    }
}

/// A 2xx whose body breaks is work the upstream finished: charged once and not sent again.
#[tokio::test]
async fn a_2xx_whose_body_fails_is_charged_and_not_retried() {
    for behavior in [Behavior::DieMidStream { chunks: 2 }, Behavior::Garbage] {
        let up = MockUpstream::start(behavior);
        let gw = start(&up, Some("retries: {attempts: 3, backoff: 1ms}"));
        let r = post(&gw, body(false), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(r.status(), 502);
        let e: Value = r.json().await.unwrap();
        assert!(
            ["upstream_read_error", "upstream_invalid_response"]
                .contains(&e["error"]["code"].as_str().unwrap()),
            "{e}"
        );
        assert_eq!(
            up.stats.requests(),
            1,
            "a finished 2xx must not be sent again"
        );
        let recs = records(&gw, 1).await;
        assert_eq!(recs.len(), 1, "{recs:?}");
        assert_eq!(recs[0]["usage_source"], "estimated");
        assert_eq!(recs[0]["outcome"], "upstream_error");
        assert!(recs[0]["cost_pico"].as_u64().unwrap() >= cost(prompt_estimate(), 0));
    }
}

/// With no `retryOn`, a timeout on a priced deployment is answered, charged the prompt
/// estimate, and not retried (the upstream may be running it); naming `timeout` opts in, and
/// then every timed-out attempt is charged.
#[tokio::test]
async fn timeouts_on_paid_models_are_charged_and_retried_only_on_request() {
    let up = MockUpstream::start(Behavior::Ok(MockConfig {
        latency_ms: 3_000,
        ..Default::default()
    }));
    let gw = start(
        &up,
        Some("retries: {attempts: 3, backoff: 1ms}, timeouts: {firstByte: 500ms}"),
    );
    let r = post(&gw, body(false), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    // The mock counts a request when its handler runs, which a loaded machine may delay.
    eventually(Duration::from_secs(2), || up.stats.requests() >= 1).await;
    assert_eq!(up.stats.requests(), 1, "not retried by default");
    let recs = records(&gw, 1).await;
    assert_eq!(recs[0]["usage_source"], "estimated");
    assert_eq!(recs[0]["cost_pico"], cost(prompt_estimate(), 0));

    let up = MockUpstream::start(Behavior::Ok(MockConfig {
        latency_ms: 3_000,
        ..Default::default()
    }));
    let gw = start(
        &up,
        Some(
            "retries: {attempts: 3, backoff: 1ms, retryOn: [timeout]}, timeouts: {firstByte: 500ms}",
        ),
    );
    let r = post(&gw, body(false), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    eventually(Duration::from_secs(2), || up.stats.requests() >= 3).await;
    assert_eq!(up.stats.requests(), 3, "retried when retryOn names timeout");
    let recs = records(&gw, 1).await;
    assert_eq!(recs.len(), 1, "one record per request: {recs:?}");
    assert_eq!(recs[0]["prompt_tokens"], 3 * prompt_estimate());
    assert_eq!(recs[0]["cost_pico"], cost(3 * prompt_estimate(), 0));
}

/// What never reached an upstream, or was answered with an error, stays free.
#[tokio::test]
async fn what_no_upstream_worked_on_is_free() {
    let nothing = format!("http://127.0.0.1:{}/v1", closed_port());
    let gw = Gateway::start(
        BIN,
        &manifests(&nothing, None),
        &["--usage-log", "{dir}/usage.jsonl"],
    );
    let r = post(&gw, body(false), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let up = MockUpstream::start(Behavior::Status(
        500,
        r#"{"error":{"message":"boom","type":"server_error"}}"#,
    ));
    let gw2 = start(&up, None);
    let r = post(&gw2, body(false), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    for gw in [&gw, &gw2] {
        let recs = records(gw, 1).await;
        assert_eq!(recs.len(), 1, "{recs:?}");
        assert_eq!(recs[0]["cost_pico"], 0, "{recs:?}");
        assert_eq!(recs[0]["usage_source"], "reported");
    }
}

/// An upstream that stalls mid-stream for longer than `timeouts.idle` is cut there, and the
/// request is charged for what was relayed before the stall.
#[tokio::test]
async fn a_stream_that_stalls_past_its_idle_timeout_is_cut_and_charged() {
    let up = MockUpstream::start(Behavior::SlowStream {
        chunks: 3,
        delay: Duration::from_millis(1_500),
    });
    let gw = start(&up, Some("timeouts: {idle: 300ms}"));
    let started = std::time::Instant::now();
    let mut r = post(&gw, body(true), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The stream ends early (an error for the client: no `[DONE]`), after what came first.
    let mut text = String::new();
    while let Ok(Some(c)) = r.chunk().await {
        text.push_str(&String::from_utf8_lossy(&c));
    }
    assert!(
        started.elapsed() < Duration::from_millis(1_400),
        "{:?}",
        started.elapsed()
    );
    assert!(text.contains("tok0") && !text.contains("tok1"), "{text}");
    let recs = records(&gw, 1).await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    let r = &recs[0];
    assert_eq!(r["outcome"], "upstream_error");
    assert_eq!(r["usage_source"], "estimated");
    let completion = count_text(Family::O200k, "tok0 ");
    assert_eq!(r["completion_tokens"], completion);
    assert_eq!(r["cost_pico"], cost(prompt_estimate(), completion));
}

/// A gateway killed (SIGKILL: nothing flushed, nothing settled) while a stream runs: the next
/// start charges the request what it reserved, once, however often the gateway restarts.
#[tokio::test]
async fn a_request_cut_by_a_killed_gateway_is_charged_at_the_next_start() {
    let up = MockUpstream::start(Behavior::SlowStream {
        chunks: 400,
        delay: Duration::from_millis(25),
    });
    let mut gw = start(&up, None);
    let max_tokens = 50;
    let body = json!({"model": "gpt", "stream": true, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": PROMPT}]})
    .to_string();
    let mut r = post(&gw, body, Duration::from_secs(30)).await.unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.chunk().await.unwrap().unwrap();
    let journal = gw.manifest_dir().join("usage.jsonl.inflight");
    let opened: Vec<Value> = std::fs::read_to_string(&journal)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(opened.len(), 1, "{opened:?}");
    assert_eq!(opened[0]["outcome"], "open");
    gw.kill();
    drop(r);
    assert!(records(&gw, 0).await.is_empty(), "nothing settled");

    // Reserved: the prompt estimate and max_tokens at their prices.
    let reserved = cost(prompt_estimate(), max_tokens);
    let spend = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("tollgate_spend_usd_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
    };
    for round in 0..2 {
        gw.start_again();
        let recs = records(&gw, 1).await;
        assert_eq!(recs.len(), 1, "round {round}: {recs:?}");
        let rec = &recs[0];
        assert_eq!(rec["outcome"], "crashed");
        assert_eq!(rec["usage_source"], "estimated");
        assert_eq!(rec["id"], opened[0]["id"]);
        assert_eq!(rec["cost_pico"], reserved);
        assert_eq!(rec["prompt_tokens"], prompt_estimate());
        let text = gw.metrics().await;
        let want = reserved as f64 / 1e12;
        let got = spend(&text).unwrap_or_else(|| panic!("{text}"));
        assert!((got - want).abs() < 1e-12, "round {round}: {got} != {want}");
        // Charged at the first start, which closed it in the log; the second finds it closed.
        assert_eq!(
            gw.logs().contains("never settled"),
            round == 0,
            "{}",
            gw.logs()
        );
        gw.kill();
    }
}
