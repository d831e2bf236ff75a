//! End-to-end: rate limits and budgets through the real binary, with real HTTP upstreams.

#![expect(clippy::unwrap_used, reason = "tests")]

use serde_json::{Value, json};
use std::time::Duration;
use tollgate_crds::config::MockConfig;
use tollgate_testkit::{Behavior, Gateway, MockUpstream, avoid_minute_boundary, chat_request};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate-dataplane");
const KEY: &str = "sk-limits-test-key-0001";

fn key_manifest(spec_extra: &str) -> String {
    tollgate_testkit::key_manifest("k", KEY, spec_extra)
}

fn model(name: &str, model_name: &str, extra: &str) -> String {
    tollgate_testkit::model_manifest(name, &format!("modelName: {model_name}{extra}"))
}

async fn chat(gw: &Gateway, model: &str, stream: bool) -> reqwest::Response {
    gw.chat(KEY, &chat_request(model, stream)).await
}

#[tokio::test]
async fn key_rpm_refuses_with_openai_headers_and_retry_after() {
    let m = key_manifest(", limits: {rpm: 3}") + &model("m", "m", ", provider: mock");
    let gw = Gateway::start(BIN, &m, &[]);
    avoid_minute_boundary().await;
    let first = chat(&gw, "m", false).await;
    assert_eq!(first.status(), 200);
    let h = first.headers();
    assert_eq!(h["x-ratelimit-limit-requests"], "3");
    assert_eq!(h["x-ratelimit-remaining-requests"], "2");
    assert!(
        h["x-ratelimit-reset-requests"]
            .to_str()
            .unwrap()
            .ends_with('s')
    );
    assert_eq!(chat(&gw, "m", false).await.status(), 200);
    assert_eq!(chat(&gw, "m", true).await.status(), 200);
    let refused = chat(&gw, "m", false).await;
    assert_eq!(refused.status(), 429);
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let e: Value = refused.json().await.unwrap();
    assert_eq!(e["error"]["code"], "rate_limit_exceeded");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("3 requests per minute"),
        "{e}"
    );
}

#[tokio::test]
async fn a_full_deployment_is_skipped_for_one_with_room() {
    // Two deployments of `m`; the first allows one request in flight and is held busy by a slow
    // upstream, so every other request must go to the second.
    let slow = MockUpstream::start(Behavior::SlowStream {
        chunks: 50,
        delay: Duration::from_millis(40),
    });
    let fast = MockUpstream::start(Behavior::Ok(MockConfig {
        reply: "fast".into(),
        ..Default::default()
    }));
    let m = key_manifest("")
        + &model(
            "a-slow",
            "m",
            &format!(
                ", provider: openai-compatible, url: '{}', limits: {{maxParallel: 1}}",
                slow.base_url()
            ),
        )
        + &model(
            "b-fast",
            "m",
            &format!(
                ", provider: openai-compatible, url: '{}', weight: 0",
                fast.base_url()
            ),
        );
    let gw = Gateway::start(BIN, &m, &[]);
    // weight 0 on b-fast: the random pick always lands on a-slow first.
    let mut held = chat(&gw, "m", true).await;
    assert_eq!(held.headers()["x-tollgate-deployment"], "default/a-slow");
    let _ = held.chunk().await.unwrap();
    for _ in 0..5 {
        let r = chat(&gw, "m", false).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-tollgate-deployment"], "default/b-fast");
    }
    assert_eq!(fast.stats.requests(), 5);
    assert_eq!(slow.stats.requests(), 1);
    // Once the stream ends, a-slow has room again (it answers a non-streamed request with a
    // stream, so the gateway's answer is a 502: what matters is where the request went).
    while held.chunk().await.unwrap().is_some() {}
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = chat(&gw, "m", false).await;
    assert_eq!(slow.stats.requests(), 2);
    assert_eq!(fast.stats.requests(), 5);
}

#[tokio::test]
async fn budget_stops_the_key_and_counts_streamed_usage() {
    // Each request costs exactly 100 × $1/M + 100 × $1/M = $0.0002; the budget is $0.001.
    let m = key_manifest(", budget: {maxUsd: 0.001, duration: daily}")
        + &model(
            "m",
            "m",
            ", provider: mock, mock: {promptTokens: 100, completionTokens: 100}, pricing: {inputPerMillion: 1, outputPerMillion: 1}",
        );
    let gw = Gateway::start(BIN, &m, &[]);
    let mut served = 0;
    for i in 0..10 {
        // Alternate streamed and whole responses: both must be charged.
        let r = chat(&gw, "m", i % 2 == 1).await;
        if r.status() == 429 {
            let e: Value = r.json().await.unwrap();
            assert_eq!(e["error"]["code"], "budget_exceeded");
            assert_eq!(e["error"]["type"], "budget_exceeded");
            break;
        }
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await.unwrap();
        served += 1;
    }
    assert_eq!(served, 5, "five requests of $0.0002 fill a $0.001 budget");
    let text = gw.metrics().await;
    assert!(
        text.contains(r#"tollgate_spend_usd_total{model="m",deployment="default/m"} 0.001"#),
        "{text}"
    );
}

#[tokio::test]
async fn concurrent_requests_never_overshoot_the_budget() {
    // The mock reports what the gateway estimates (prompt = body bytes / 4, completion =
    // max_tokens), so each request costs exactly its reservation. 200 concurrent requests against
    // a budget for 10: reservations are taken before the call, so no more than 10 are served
    // even though none has finished when the others arrive.
    let body = json!({"model": "m", "max_tokens": 100, "messages": []}).to_string();
    let per_request_micro = (body.len() as u64 / 4) + 100; // at $1 per million tokens
    let budget_usd = format!("0.{:06}", per_request_micro * 10);
    let m = key_manifest(&format!(", budget: {{maxUsd: {budget_usd}}}"))
        + &model(
            "m",
            "m",
            ", provider: mock, mock: {completionTokens: 100, latency: 200ms}, pricing: {inputPerMillion: 1, outputPerMillion: 1}",
        );
    let gw = Gateway::start(BIN, &m, &[]);
    let client = reqwest::Client::new();
    let reqs = (0..200).map(|_| {
        client
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .body(body.clone())
            .send()
    });
    let results = futures_util::future::join_all(reqs).await;
    let ok = results
        .iter()
        .filter(|r| r.as_ref().unwrap().status() == 200)
        .count();
    let refused = results
        .iter()
        .filter(|r| r.as_ref().unwrap().status() == 429)
        .count();
    assert_eq!((ok, refused), (10, 190));
    let text = gw.metrics().await;
    let spend = text
        .lines()
        .find(|l| l.starts_with("tollgate_spend_usd_total{"))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap()
        .to_string();
    assert_eq!(
        spend,
        budget_usd.trim_end_matches('0'),
        "exactly the served requests' cost"
    );
}

#[tokio::test]
async fn spend_and_budgets_survive_a_restart_through_the_usage_log() {
    // $0.0002 a request, a daily budget for five.
    let m = key_manifest(", budget: {maxUsd: 0.001, duration: daily}")
        + &model(
            "m",
            "m",
            ", provider: mock, mock: {promptTokens: 100, completionTokens: 100}, pricing: {inputPerMillion: 1, outputPerMillion: 1}",
        );
    // The log lives beside the manifests but isn't YAML, so the loader ignores it.
    let mut gw = Gateway::start(BIN, &m, &["--usage-log", "{dir}/usage.jsonl"]);
    for i in 0..3 {
        let r = chat(&gw, "m", i == 1).await;
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await.unwrap();
    }
    gw.restart();
    assert!(gw.logs().contains("usage log replayed"), "{}", gw.logs());
    let log = std::fs::read_to_string(gw.manifest_dir().join("usage.jsonl")).unwrap();
    let records: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 3, "{log}");
    assert!(
        records
            .iter()
            .all(|r| r["cost_pico"] == 200_000_000 && r["key"] == "default/k")
    );
    let ids: std::collections::HashSet<_> =
        records.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 3);
    assert!(!log.contains(KEY), "the key itself must never be logged");

    // After the restart: totals are back, and only two more requests fit the budget.
    let text = gw.metrics().await;
    assert!(
        text.contains(r#"tollgate_spend_usd_total{model="m",deployment="default/m"} 0.0006"#),
        "{text}"
    );
    assert_eq!(chat(&gw, "m", false).await.status(), 200);
    assert_eq!(chat(&gw, "m", true).await.status(), 200);
    assert_eq!(chat(&gw, "m", false).await.status(), 429);
}

#[tokio::test]
async fn a_compacted_usage_log_keeps_spend_and_budgets_across_a_restart() {
    // $0.0002 a request, a daily budget for five; a log compacted past 1,000 bytes (about
    // three records).
    let m = key_manifest(", budget: {maxUsd: 0.001, duration: daily}")
        + &model(
            "m",
            "m",
            ", provider: mock, mock: {promptTokens: 100, completionTokens: 100}, pricing: {inputPerMillion: 1, outputPerMillion: 1}",
        );
    let mut gw = Gateway::start(
        BIN,
        &m,
        &[
            "--usage-log",
            "{dir}/usage.jsonl",
            "--usage-log-max-bytes",
            "1000",
            "--per-key-metrics",
        ],
    );
    for i in 0..4 {
        let r = chat(&gw, "m", i % 2 == 1).await;
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await.unwrap();
    }
    gw.restart();
    let log = std::fs::read_to_string(gw.manifest_dir().join("usage.jsonl")).unwrap();
    let rows: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        rows.iter().any(|r| r["outcome"] == "compacted"),
        "compacted: {log}"
    );
    assert!(rows.len() < 4, "{log}");
    let requests: u64 = rows
        .iter()
        .map(|r| r["requests"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(requests, 4, "{log}");
    let cost: u64 = rows.iter().map(|r| r["cost_pico"].as_u64().unwrap()).sum();
    assert_eq!(cost, 4 * 200_000_000, "{log}");

    // After the restart: the totals, and one more request fits the budget.
    let text = gw.metrics().await;
    assert!(
        text.contains(r#"tollgate_spend_usd_total{model="m",deployment="default/m"} 0.0008"#),
        "{text}"
    );
    assert!(
        text.contains(r#"tollgate_key_requests_total{key="default/k"} 4"#),
        "{text}"
    );
    assert_eq!(chat(&gw, "m", false).await.status(), 200);
    assert_eq!(chat(&gw, "m", false).await.status(), 429);
}

#[tokio::test]
async fn tpm_counts_the_real_usage_not_the_estimate() {
    // The estimate of a tiny request is a few tokens; the mock reports 200 (100 + 100). With a
    // limit of 250 tokens a minute the second request still fits (200 < 250), the third can't
    // (400 >= 250): only settlement on real usage gets this right.
    let m = key_manifest(", limits: {tpm: 250}")
        + &model(
            "m",
            "m",
            ", provider: mock, mock: {promptTokens: 100, completionTokens: 100}",
        );
    let gw = Gateway::start(BIN, &m, &[]);
    avoid_minute_boundary().await;
    let first = chat(&gw, "m", false).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-ratelimit-limit-tokens"], "250");
    assert_eq!(
        chat(&gw, "m", true).await.bytes().await.map(|_| ()).ok(),
        Some(())
    );
    let third = chat(&gw, "m", false).await;
    assert_eq!(third.status(), 429);
    let e: Value = third.json().await.unwrap();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("250 tokens per minute"),
        "{e}"
    );
}

#[tokio::test]
async fn a_team_budget_is_shared_by_the_teams_keys_and_survives_a_restart() {
    // Each request costs $0.0002; team `t` has $0.001 a day, set on one of its two keys.
    let keys = [
        (
            "k1",
            "sk-team-t-key-one-0001",
            ", team: t, teamBudget: {maxUsd: 0.001, duration: daily}",
        ),
        ("k2", "sk-team-t-key-two-0002", ", team: t"),
        ("k3", "sk-team-u-key-three-03", ", team: u"),
    ];
    let mut m = model(
        "m",
        "m",
        ", provider: mock, mock: {promptTokens: 100, completionTokens: 100}, pricing: {inputPerMillion: 1, outputPerMillion: 1}",
    );
    for (name, key, extra) in keys {
        m += &format!(
            "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}}}\nstringData: {{key: {key}}}\n---\napiVersion: tollgate.dev/v1alpha1\nkind: VirtualKey\nmetadata: {{name: {name}}}\nspec: {{secretRef: {{name: {name}}}{extra}}}\n"
        );
    }
    let send = |gw: &Gateway, key: &'static str| {
        let req = reqwest::Client::new()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(key)
            .body(
                json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).to_string(),
            );
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let mut gw = Gateway::start(BIN, &m, &["--usage-log", "{dir}/usage.jsonl"]);
    let mut served = 0;
    for i in 0..10 {
        let key = keys[i % 2].1;
        let (s, v) = send(&gw, key).await;
        if s == 429 {
            assert_eq!(v["error"]["code"], "budget_exceeded", "{v}");
            assert!(
                v["error"]["message"].as_str().unwrap().contains("team t"),
                "{v}"
            );
            break;
        }
        assert_eq!(s, 200, "{v}");
        served += 1;
    }
    assert_eq!(
        served, 5,
        "five requests of $0.0002 from two keys fill the team's $0.001"
    );
    // Both of the team's keys are stopped; another team's key is not.
    assert_eq!(send(&gw, keys[0].1).await.0, 429);
    assert_eq!(send(&gw, keys[1].1).await.0, 429);
    assert_eq!(send(&gw, keys[2].1).await.0, 200);
    // The usage log brings the team's spend back after a restart.
    gw.restart();
    assert_eq!(send(&gw, keys[1].1).await.0, 429);
    assert_eq!(send(&gw, keys[2].1).await.0, 200);
}

#[tokio::test]
async fn openai_models_reserve_tokens_counted_with_their_tokenizer() {
    // The same request to two upstream models: gpt-4o (o200k_base counting of the messages)
    // and a self-hosted model (bytes / 4 of the whole body, a documented over-estimate).
    let up = MockUpstream::start(Behavior::Ok(MockConfig {
        prompt_tokens: Some(20),
        completion_tokens: Some(5),
        ..Default::default()
    }));
    let m = key_manifest(", limits: {tpm: 100000}")
        + &model(
            "gpt",
            "gpt",
            &format!(
                ", provider: openai-compatible, upstreamModel: gpt-4o, url: '{}'",
                up.base_url()
            ),
        )
        + &model(
            "llama",
            "llama",
            &format!(
                ", provider: openai-compatible, upstreamModel: meta-llama/Llama-3.1-8B-Instruct, url: '{}'",
                up.base_url()
            ),
        );
    let gw = Gateway::start(BIN, &m, &[]);
    avoid_minute_boundary().await;
    // Much JSON around little text: a long `user` field is sent upstream but is no prompt.
    let body = |model: &str| {
        json!({"model": model, "user": "x".repeat(4000), "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France? Answer in one word."}
        ]})
        .to_string()
    };
    let remaining = |r: &reqwest::Response| -> u64 {
        r.headers()["x-ratelimit-remaining-tokens"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let send = |model: &'static str| {
        let b = body(model);
        let url = gw.url("/v1/chat/completions");
        async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth(KEY)
                .body(b)
                .send()
                .await
                .unwrap()
        }
    };
    let r = send("gpt").await;
    assert_eq!(r.status(), 200);
    // 29 tokens by OpenAI's counting of these two messages.
    assert_eq!(remaining(&r), 100_000 - 29);
    let r = send("llama").await;
    assert_eq!(r.status(), 200);
    // Reserved: body bytes / 4, on top of the gpt request's settled 25 tokens.
    assert_eq!(remaining(&r), 100_000 - 25 - body("llama").len() as u64 / 4);
}
