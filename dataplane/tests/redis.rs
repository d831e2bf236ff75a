//! End-to-end: two gateway processes sharing limits and budgets through a real `redis-server`.

#![expect(clippy::unwrap_used, reason = "tests")]

use serde_json::{Value, json};
use std::time::Duration;
use tollgate_testkit::{Gateway, Redis, avoid_minute_boundary};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate-dataplane");
const KEY: &str = "sk-redis-test-key-00001";

/// The request every test sends.
fn body() -> String {
    json!({"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
}

/// What one request costs, in USD, formatted for a manifest: the mock reports what the gateway
/// estimates (prompt = body bytes / 4, completion = max_tokens), at $1 per million tokens, so a
/// request's reservation is exactly its cost and budgets can be asserted exactly.
fn budget_for(requests: u64) -> String {
    format!("0.{:06}", (body().len() as u64 / 4 + 100) * requests)
}

/// Manifests whose key has a daily budget for `requests` requests.
fn with_daily_budget(requests: u64) -> String {
    manifests(&format!(
        ", budget: {{maxUsd: {}, duration: daily}}",
        budget_for(requests)
    ))
}

/// `m` with the mock answering after one second.
fn slow_mock(m: &str) -> String {
    m.replace(
        "mock: {completionTokens: 100}",
        "mock: {completionTokens: 100, latency: 1s}",
    )
}

/// What one request of [`body`] costs, in pico-dollars (see [`budget_for`]).
fn per_request() -> u64 {
    (body().len() as u64 / 4 + 100) * 1_000_000
}

/// An upstream that answers every request with a 500.
fn failing_upstream() -> tollgate_testkit::MockUpstream {
    tollgate_testkit::MockUpstream::start(tollgate_testkit::Behavior::Status(
        500,
        r#"{"error":{"message":"boom","type":"server_error"}}"#,
    ))
}

/// A mock model and a key with `key_spec`.
fn manifests(key_spec: &str) -> String {
    tollgate_testkit::model_manifest(
        "m",
        "modelName: m, provider: mock, mock: {completionTokens: 100}, pricing: {inputPerMillion: 1, outputPerMillion: 1}",
    ) + &tollgate_testkit::key_manifest("k", KEY, key_spec)
}

async fn chat(gw: &Gateway) -> (u16, Value) {
    let r = gw.chat(KEY, &serde_json::from_str(&body()).unwrap()).await;
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn rpm_holds_across_two_replicas() {
    let redis = Redis::start();
    let m = manifests(", limits: {rpm: 4}");
    let a = Gateway::start(BIN, &m, &["--redis-url", &redis.url()]);
    let b = Gateway::start(BIN, &m, &["--redis-url", &redis.url()]);
    avoid_minute_boundary().await;
    for gw in [&a, &b, &a, &b] {
        assert_eq!(chat(gw).await.0, 200);
    }
    // Four in all: each replica alone would still have room for two more.
    let (s, e) = chat(&a).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (429, Some("rate_limit_exceeded")),
        "{e}"
    );
    assert_eq!(chat(&b).await.0, 429);
}

#[tokio::test]
async fn a_budget_holds_across_two_replicas_under_concurrency() {
    let redis = Redis::start();
    // Budget for exactly 10 requests; 20 concurrent requests on each replica, all in flight
    // together. Reservations in Redis are shared, so exactly 10 are served in all.
    let m = manifests(&format!(", budget: {{maxUsd: {}}}", budget_for(10)));
    let a = Gateway::start(BIN, &m, &["--redis-url", &redis.url()]);
    let b = Gateway::start(BIN, &m, &["--redis-url", &redis.url()]);
    let reqs = (0..40).map(|i| {
        let gw = if i % 2 == 0 { &a } else { &b };
        chat(gw)
    });
    let results = futures_util::future::join_all(reqs).await;
    let served = results.iter().filter(|(s, _)| *s == 200).count();
    assert!(results.iter().all(|(s, _)| *s == 200 || *s == 429));
    assert!(
        (10..=20).contains(&served),
        "served {served} of 40 against a budget for 10"
    );
    // Once settled, the shared spend is known to both: neither serves another request.
    assert_eq!(chat(&a).await.0, 429);
    assert_eq!(chat(&b).await.0, 429);
}

#[tokio::test]
async fn redis_outage_follows_the_failure_policy_and_recovers() {
    let mut redis = Redis::start();
    let m = manifests(", limits: {rpm: 1000}");
    let open = Gateway::start(
        BIN,
        &m,
        &["--redis-url", &redis.url(), "--redis-failure", "open"],
    );
    let closed = Gateway::start(
        BIN,
        &m,
        &["--redis-url", &redis.url(), "--redis-failure", "closed"],
    );
    assert_eq!(chat(&open).await.0, 200);
    assert_eq!(chat(&closed).await.0, 200);

    redis.kill();
    assert_eq!(
        chat(&open).await.0,
        200,
        "fail-open keeps serving on local counters"
    );
    let (s, e) = chat(&closed).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (503, Some("limits_unavailable")),
        "{e}"
    );
    assert!(
        open.wait_for_log("failing open", Duration::from_secs(5)),
        "{}",
        open.logs()
    );
    let metrics = open.metrics().await;
    assert!(metrics.contains("tollgate_redis_up 0"), "{metrics}");

    redis.restart();
    // The connection comes back by itself.
    let mut recovered = false;
    for _ in 0..50 {
        if chat(&closed).await.0 == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        recovered,
        "fail-closed replica did not recover:\n{}",
        closed.logs()
    );
    assert!(closed.wait_for_log("redis reachable again", Duration::from_secs(5)));
}

#[tokio::test]
async fn a_redis_restart_does_not_reset_a_budget() {
    let mut redis = Redis::start();
    // Budget for five requests a day.
    let m = with_daily_budget(5);
    let gw = Gateway::start(BIN, &m, &["--redis-url", &redis.url()]);
    for _ in 0..3 {
        assert_eq!(chat(&gw).await.0, 200);
    }
    // Settlement runs in the background; give it a moment before pulling Redis away.
    tokio::time::sleep(Duration::from_millis(200)).await;
    redis.restart();
    // Redis is empty now; the key's spend is seeded from what the replica knows.
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(chat(&gw).await.0);
    }
    assert_eq!(codes, [200, 200, 429, 429], "{}", gw.logs());
}

fn redis_cli(redis: &Redis, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli (from redis-tools) runs");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test]
async fn every_settled_request_lands_in_the_usage_stream_once() {
    let redis = Redis::start();
    let m = manifests(", limits: {rpm: 1000}");
    let mut a = Gateway::start(BIN, &m, &["--redis-url", &redis.url()]);
    let mut b = Gateway::start(BIN, &m, &["--redis-url", &redis.url()]);
    for gw in [&a, &b, &a, &b, &a] {
        assert_eq!(chat(gw).await.0, 200);
    }
    // SIGTERM drains what each replica still holds.
    assert!(a.terminate() && b.terminate());
    assert_eq!(redis_cli(&redis, &["XLEN", "tollgate:usage"]).trim(), "5");
    let dump = redis_cli(&redis, &["XRANGE", "tollgate:usage", "-", "+"]);
    let records: Vec<Value> = dump
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 5, "{dump}");
    let ids: std::collections::HashSet<_> =
        records.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 5);
    let per_request = per_request();
    assert!(
        records
            .iter()
            .all(|r| r["cost_pico"] == per_request && r["key"] == "default/k"),
        "{dump}"
    );
    assert!(!dump.contains(KEY));
}

#[tokio::test]
async fn tpm_holds_across_two_replicas() {
    // Each request uses body/4 + 100 tokens (about 115): a limit of 200 admits two in all.
    let redis = Redis::start();
    let m = manifests(", limits: {tpm: 200}");
    let a = Gateway::start(BIN, &m, &["--redis-url", &redis.url()]);
    let b = Gateway::start(BIN, &m, &["--redis-url", &redis.url()]);
    avoid_minute_boundary().await;
    assert_eq!(chat(&a).await.0, 200);
    assert_eq!(chat(&b).await.0, 200);
    // Settlement (real usage replacing the estimate) runs in the background.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (s, e) = chat(&a).await;
    assert_eq!(s, 429, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("200 tokens per minute"),
        "{e}"
    );
}

#[tokio::test]
async fn a_crashed_replicas_reservations_end_with_their_lease() {
    use tollgate_testkit::{Behavior, MockUpstream};
    let redis = Redis::start();
    let up = MockUpstream::start(Behavior::SlowStream {
        chunks: 400,
        delay: Duration::from_millis(50),
    });
    let m = format!(
        "{}---\napiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata: {{name: slow}}\nspec: {{modelName: slow, provider: openai-compatible, url: '{}'}}\n",
        manifests(", limits: {maxParallel: 1}"),
        up.base_url()
    );
    let flags = ["--redis-url", &redis.url(), "--redis-lease", "2s"];
    let mut a = Gateway::start(BIN, &m, &flags);
    let b = Gateway::start(BIN, &m, &flags);
    let stream = |gw: &Gateway| {
        reqwest::Client::new()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .body(json!({"model": "slow", "stream": true, "messages": []}).to_string())
            .send()
    };
    // A holds the key's only slot, then crashes without settling.
    let mut held = stream(&a).await.unwrap();
    assert_eq!(held.status(), 200);
    let _ = held.chunk().await.unwrap();
    assert_eq!(
        stream(&b).await.unwrap().status(),
        429,
        "one in flight across both replicas"
    );
    a.kill();
    assert_eq!(
        stream(&b).await.unwrap().status(),
        429,
        "the lease still holds the slot"
    );
    // After the lease, the slot is free again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(stream(&b).await.unwrap().status(), 200);
}

/// A replica killed (SIGKILL) mid-request: the request may have run upstream and been billed,
/// so when its lease ends its reserved cost is charged to the key's budget as spent, not given
/// back.
#[tokio::test]
async fn a_killed_replicas_reserved_cost_is_charged_when_its_lease_ends() {
    use tollgate_testkit::{Behavior, MockUpstream};
    let redis = Redis::start();
    let up = MockUpstream::start(Behavior::SlowStream {
        chunks: 400,
        delay: Duration::from_millis(50),
    });
    let m = format!(
        "{}---\napiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata: {{name: slow}}\nspec: {{modelName: slow, provider: openai-compatible, url: '{}', pricing: {{inputPerMillion: 1, outputPerMillion: 1}}}}\n",
        with_daily_budget(1000),
        up.base_url()
    );
    let flags = ["--redis-url", &redis.url(), "--redis-lease", "2s"];
    let mut a = Gateway::start(BIN, &m, &flags);
    let b = Gateway::start(BIN, &m, &flags);
    let mut held = reqwest::Client::new()
        .post(a.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .body(
            json!({"model": "slow", "stream": true, "max_tokens": 1000, "messages": []})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(held.status(), 200);
    let _ = held.chunk().await.unwrap();
    let field = |f: &str| {
        hash_field(&redis, "key:default/k", f)
            .parse::<u64>()
            .unwrap_or(0)
    };
    let reserved = field("reserved");
    assert!(
        reserved >= 1000 * 1_000_000,
        "max_tokens at $1/M: {reserved}"
    );
    assert_eq!(field("spend"), 0);
    a.kill();
    drop(held);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // The next request on the key ends the lease: the dead request's reservation is spent.
    assert_eq!(chat(&b).await.0, 200);
    assert_eq!(field("spend"), reserved + per_request(), "{}", b.logs());
    assert_eq!(field("reserved"), 0);
    assert_eq!(field("inflight"), 0);
}

#[tokio::test]
async fn a_retried_request_is_counted_once() {
    let redis = Redis::start();
    let bad = failing_upstream();
    // The key: rpm 1000 and a budget (so it lives in Redis); the failing deployment is the
    // cheaper, so cost-based routing tries it first every time, then retries on the mock.
    let m = format!(
        "{}---\napiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata: {{name: bad}}\nspec: {{modelName: m, provider: openai-compatible, url: '{}', limits: {{rpm: 1000, maxParallel: 50}}, pricing: {{inputPerMillion: 0.5, outputPerMillion: 0.5}}}}\n---\napiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: p}}\nspec: {{models: [m], strategy: cost-based, retries: {{attempts: 2, backoff: 1ms}}, cooldown: {{allowedFails: 1000}}}}\n",
        manifests(", limits: {rpm: 1000}, budget: {maxUsd: 100, duration: 30d}"),
        bad.base_url()
    );
    let mut a = Gateway::start(BIN, &m, &["--redis-url", &redis.url()]);
    let mut b = Gateway::start(BIN, &m, &["--redis-url", &redis.url()]);
    avoid_minute_boundary().await;
    for gw in [&a, &b, &a, &b, &a, &b] {
        let (s, v) = chat(gw).await;
        assert_eq!(s, 200, "{v}");
    }
    assert_eq!(
        bad.stats.requests(),
        6,
        "every request was tried on `bad` first"
    );
    assert!(a.terminate() && b.terminate());
    // The key: six requests, the spend of six served ones, nothing left in flight.
    let key = redis_cli(&redis, &["HGETALL", "tollgate:limits:key:default/k"]);
    let fields: std::collections::HashMap<&str, &str> = key
        .lines()
        .collect::<Vec<_>>()
        .chunks(2)
        .filter_map(|c| Some((*c.first()?, *c.get(1)?)))
        .collect();
    let per_request = per_request();
    assert_eq!(fields.get("requests"), Some(&"6"), "{key}");
    assert_eq!(fields.get("inflight"), Some(&"0"), "{key}");
    assert_eq!(fields.get("reserved"), Some(&"0"), "{key}");
    assert_eq!(
        fields.get("spend"),
        Some(&(6 * per_request).to_string().as_str()),
        "{key}"
    );
    // The failing deployment: six attempts, none left in flight.
    let dep = redis_cli(
        &redis,
        &["HGET", "tollgate:limits:deployment:default/bad", "inflight"],
    );
    assert_eq!(dep.trim(), "0");
    // One usage record per request, each for the deployment that served it.
    assert_eq!(redis_cli(&redis, &["XLEN", "tollgate:usage"]).trim(), "6");
    let dump = redis_cli(&redis, &["XRANGE", "tollgate:usage", "-", "+"]);
    assert!(!dump.contains("default/bad"), "{dump}");
}

/// A served response ends only once its spend is in Redis, so the next request of a client that
/// waits for each answer sees it, whichever replica it reaches. Redis is made to hold writes
/// back just as the request settles (`CLIENT PAUSE ... WRITE`, shorter than the gateway's Redis
/// timeout): a settlement sent in the background would land after the response ended. (A late
/// pause only makes the test pass without testing; it can't make it fail.)
#[tokio::test]
async fn a_response_ends_only_once_its_spend_is_in_redis() {
    let redis = Redis::start();
    let m = slow_mock(&with_daily_budget(10));
    let gw = Gateway::start(BIN, &m, &["--redis-url", &redis.url()]);
    let spend = || {
        redis_cli(&redis, &["HGET", "tollgate:limits:key:default/k", "spend"])
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
    };
    for stream in [false, true] {
        let before = spend();
        let mut req: Value = serde_json::from_str(&body()).unwrap();
        req["stream"] = json!(stream);
        let send = reqwest::Client::new()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&req)
            .send();
        let request = tokio::spawn(async move {
            let r = send.await.unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            (status, text)
        });
        // The mock answers after 1 s; Redis holds writes from 0.9 s for 150 ms, and lifts a
        // pause on its next 100 ms tick: until 1.05-1.15 s. A settlement sent at 1 s waits at
        // most 150 ms, well within the gateway's 250 ms Redis timeout.
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(
            redis_cli(&redis, &["CLIENT", "PAUSE", "150", "WRITE"]).trim(),
            "OK"
        );
        let (status, text) = request.await.unwrap();
        let after = spend();
        assert_eq!(status, 200, "{text}");
        if stream {
            assert!(text.contains("data: [DONE]"), "{text}");
            assert!(
                after > before,
                "stream: spend {after} after, {before} before"
            );
        } else {
            let tokens = serde_json::from_str::<Value>(&text).unwrap()["usage"]["total_tokens"]
                .as_u64()
                .unwrap();
            assert_eq!(after, before + tokens * 1_000_000, "{text}");
        }
    }
}

/// Reservations left behind by a replica that died are charged as spent when their lease
/// ends (the requests may have run upstream), in the lease format of this release
/// (`<id>|<cost>`) and in the older one (the cost in a hash of its own), which a rolling
/// upgrade can leave in Redis; their slots come back.
#[tokio::test]
async fn expired_leases_of_either_format_charge_their_reserved_budget() {
    let redis = Redis::start();
    let m = with_daily_budget(4);
    let gw = Gateway::start(BIN, &m, &["--redis-url", &redis.url()]);
    assert_eq!(chat(&gw).await.0, 200);
    let per_request = per_request();
    let cost = per_request.to_string();
    let k = "tollgate:limits:key:default/k";
    let leases = format!("{k}:leases");
    let lease_cost = format!("{k}:lease-cost");
    let twice = (2 * per_request).to_string();
    // Two requests of a dead replica, one lease in each format, both past their deadline.
    for cmd in [
        vec!["HINCRBY", k, "reserved", twice.as_str()],
        vec!["HINCRBY", k, "inflight", "2"],
        vec!["ZADD", &leases, "1", "dead.1"],
        vec!["HSET", &lease_cost, "dead.1", &cost],
        vec!["ZADD", &leases, "1", &format!("dead.2|{cost}")],
    ] {
        assert!(!redis_cli(&redis, &cmd).contains("ERR"), "{cmd:?}");
    }
    // Spend of one request plus two charged: room for one more of the four.
    let (s, v) = chat(&gw).await;
    assert_eq!(s, 200, "{v}");
    let field = |f: &str| redis_cli(&redis, &["HGET", k, f]).trim().to_string();
    assert_eq!(field("reserved"), "0");
    assert_eq!(field("inflight"), "0");
    assert_eq!(field("spend"), (4 * per_request).to_string());
    assert_eq!(redis_cli(&redis, &["ZCARD", &leases]).trim(), "0");
    assert_eq!(redis_cli(&redis, &["HLEN", &lease_cost]).trim(), "0");
    assert_eq!(chat(&gw).await.0, 429, "the budget, for four, is spent");
}

/// A free model under a team budget: every reservation holds nothing, and settling gives back
/// nothing. Each settlement still completes for every subject, so the key's `maxParallel` slot
/// comes back and Redis reports no error.
#[tokio::test]
async fn requests_that_cost_nothing_settle_on_every_subject() {
    let redis = Redis::start();
    let m =
        manifests(", team: t, teamBudget: {maxUsd: 1, duration: daily}, limits: {maxParallel: 1}")
            .replace(
                "pricing: {inputPerMillion: 1, outputPerMillion: 1}",
                "pricing: {inputPerMillion: 0, outputPerMillion: 0}",
            );
    let gw = Gateway::start(BIN, &m, &["--redis-url", &redis.url()]);
    for i in 0..3 {
        let (s, v) = chat(&gw).await;
        assert_eq!(s, 200, "request {i}: {v}\n{}", gw.logs());
    }
    let k = "tollgate:limits:key:default/k";
    assert_eq!(redis_cli(&redis, &["HGET", k, "inflight"]).trim(), "0");
    assert_eq!(
        redis_cli(&redis, &["ZCARD", &format!("{k}:leases")]).trim(),
        "0"
    );
    let metrics = gw.metrics().await;
    assert!(
        !metrics.contains("tollgate_redis_errors_total{"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("redis"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A client may ask for any `max_tokens`; its reservation's cost saturates. It is capped before
/// it reaches Redis, so the reserve script can't stop halfway and leave a slot held for good.
#[tokio::test]
async fn an_absurd_max_tokens_holds_no_slot_for_good() {
    let redis = Redis::start();
    let m = manifests(", budget: {maxUsd: 1000, duration: daily}, limits: {maxParallel: 1}");
    let gw = Gateway::start(BIN, &m, &["--redis-url", &redis.url()]);
    let huge = json!({"model": "m", "max_tokens": u64::MAX, "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..2 {
        let r = reqwest::Client::new()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&huge)
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert!(s == 200 || s == 429, "{s} {v}");
    }
    let k = "tollgate:limits:key:default/k";
    assert_eq!(redis_cli(&redis, &["HGET", k, "inflight"]).trim(), "0");
    assert_eq!(redis_cli(&redis, &["HGET", k, "reserved"]).trim(), "0");
    // The slot is free: an ordinary request is served.
    let (s, v) = chat(&gw).await;
    assert_eq!(s, 200, "{v}");
}

/// Retries without backoff on the only deployment: each attempt reserves under a lease of its
/// own, so the release of a failed attempt (sent in the background) can't take the next
/// attempt's reservation with it, and nothing stays held once the request is over.
#[tokio::test]
async fn immediate_retries_on_one_deployment_leave_nothing_held() {
    let redis = Redis::start();
    let bad = failing_upstream();
    let m = format!(
        "{}---\napiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata: {{name: bad}}\nspec: {{modelName: bad, provider: openai-compatible, url: '{}', limits: {{maxParallel: 50}}}}\n---\napiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {{name: p}}\nspec: {{models: [bad], retries: {{attempts: 4, backoff: 0ms}}, cooldown: {{allowedFails: 1000}}}}\n",
        manifests(""),
        bad.base_url()
    );
    let gw = Gateway::start(BIN, &m, &["--redis-url", &redis.url()]);
    for _ in 0..3 {
        let r = reqwest::Client::new()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .body(json!({"model": "bad", "messages": []}).to_string())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_server_error(), "{}", r.status());
    }
    assert_eq!(bad.stats.requests(), 12, "four attempts a request");
    assert_nothing_held(&redis, "deployment:default/bad").await;
}

/// A budget period that ends while a request runs: the request's spend counts in the new
/// period (as the replica's own counters count it), not in the old one, which the next
/// request's reserve would reset.
#[tokio::test]
async fn spend_settled_after_a_period_ended_counts_in_the_new_period() {
    let redis = Redis::start();
    let m = slow_mock(&with_daily_budget(10));
    let gw = Gateway::start(BIN, &m, &["--redis-url", &redis.url()]);
    let k = "tollgate:limits:key:default/k";
    let per_request = per_request();
    let request = tokio::spawn({
        let url = gw.url("/v1/chat/completions");
        async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth(KEY)
                .body(body())
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    // While the mock takes its second: as if the hash were still in an earlier period, with
    // that period's spend.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        redis_cli(&redis, &["HSET", k, "period", "1", "spend", "999"]).trim(),
        "0"
    );
    assert_eq!(request.await.unwrap(), 200);
    let spend = || redis_cli(&redis, &["HGET", k, "spend"]).trim().to_string();
    assert_eq!(
        spend(),
        per_request.to_string(),
        "the old period's 999 is gone"
    );
    assert_eq!(chat(&gw).await.0, 200);
    assert_eq!(
        spend(),
        (2 * per_request).to_string(),
        "and nothing was lost"
    );
}

/// Budget periods only move forward in Redis: a replica whose clock is a little behind at a
/// period's boundary (here: a hash already in a far later period) counts in the period another
/// replica began, rather than resetting it to its own.
#[tokio::test]
async fn a_replica_behind_the_period_does_not_reset_it() {
    let redis = Redis::start();
    let m = with_daily_budget(10);
    let gw = Gateway::start(BIN, &m, &["--redis-url", &redis.url()]);
    assert_eq!(chat(&gw).await.0, 200);
    let k = "tollgate:limits:key:default/k";
    redis_cli(
        &redis,
        &["HSET", k, "period", "99999999", "spend", "5000000"],
    );
    assert_eq!(chat(&gw).await.0, 200);
    let per_request = per_request();
    assert_eq!(redis_cli(&redis, &["HGET", k, "period"]).trim(), "99999999");
    assert_eq!(
        redis_cli(&redis, &["HGET", k, "spend"]).trim(),
        (5_000_000 + per_request).to_string()
    );
}

/// `field` of the hash `tollgate:limits:{id}` (`id`: `key:<ns>/<name>`, `deployment:...`).
fn hash_field(redis: &Redis, id: &str, field: &str) -> String {
    redis_cli(redis, &["HGET", &format!("tollgate:limits:{id}"), field])
        .trim()
        .to_string()
}

/// Waits (up to 3 s: releases are sent in the background) until `id` has no request in flight
/// and no lease left.
async fn assert_nothing_held(redis: &Redis, id: &str) {
    let held = || {
        (
            hash_field(redis, id, "inflight"),
            redis_cli(redis, &["ZCARD", &format!("tollgate:limits:{id}:leases")])
                .trim()
                .to_string(),
        )
    };
    let nothing = ("0".to_string(), "0".to_string());
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while held() != nothing && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(held(), nothing, "(inflight, leases) of {id}");
}

/// How many times Redis has run the command `name` (scripts' nested commands included).
fn calls(redis: &Redis, name: &str) -> u64 {
    redis_cli(redis, &["INFO", "commandstats"])
        .lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// A reserve that Redis answers only after the gateway stopped waiting (a paused Redis, past the
/// gateway's 250 ms timeout): the request is served on the replica's own counters, and the
/// reserve Redis runs later is given back, rather than holding the key's slot until its lease
/// ends.
#[tokio::test]
async fn a_reserve_answered_too_late_holds_nothing() {
    let redis = Redis::start();
    let m = manifests(", limits: {maxParallel: 5}");
    let gw = Gateway::start(
        BIN,
        &m,
        &["--redis-url", &redis.url(), "--redis-failure", "open"],
    );
    assert_eq!(chat(&gw).await.0, 200);
    assert_eq!(
        redis_cli(&redis, &["CLIENT", "PAUSE", "600", "ALL"]).trim(),
        "OK"
    );
    assert_eq!(chat(&gw).await.0, 200, "served on local counters");
    assert!(
        gw.wait_for_log("failing open", Duration::from_secs(2)),
        "the reserve timed out: {}",
        gw.logs()
    );
    // The paused reserve runs once the pause ends; its release follows it.
    assert_nothing_held(&redis, "key:default/k").await;
}

/// Tests that drive the Redis limits through the library, to choose the clock readings and the
/// moment requests queue.
mod library {
    use super::{Duration, Redis, assert_nothing_held, calls, hash_field, redis_cli};
    use std::sync::Arc;
    use tollgate_crds::common::Limits;
    use tollgate_crds::config::{BudgetConfig, BudgetPeriod, Picodollars};
    use tollgate_dataplane::limits::redis::{FailureMode, SharedLimits};
    use tollgate_dataplane::limits::{Ask, Limited, Refusal, Registry, Reservation, Rules, Scope};

    /// A minute boundary.
    const T: u64 = 6_000_000;

    async fn shared_limits(redis: &Redis, lease_secs: u64) -> Arc<SharedLimits> {
        Arc::new(
            SharedLimits::connect(
                &redis.url(),
                FailureMode::Closed,
                Duration::from_secs(lease_secs),
            )
            .await
            .unwrap(),
        )
    }

    fn subject(scope: Scope, limits: Limits, budget: Option<BudgetConfig>) -> Arc<Limited> {
        let id = if scope == Scope::Key { "ns/k" } else { "ns/d" };
        Registry::default()
            .limited(scope, id, Rules { limits, budget })
            .unwrap()
    }

    /// The key `ns/k` with a budget of `max` pico-dollars per `period`.
    fn key_with_budget(max: u64, period: BudgetPeriod) -> Arc<Limited> {
        subject(
            Scope::Key,
            Limits::default(),
            Some(BudgetConfig {
                max: Picodollars(max),
                period,
            }),
        )
    }

    fn ask(tokens: u64, cost: u64) -> Ask {
        Ask {
            tokens,
            cost: Picodollars(cost),
        }
    }

    /// Reserves `asks` at `now` into `into`, as the proxy does.
    async fn reserve_into(
        shared: &Arc<SharedLimits>,
        into: &mut Reservation,
        asks: Vec<(Arc<Limited>, Ask)>,
        now: u64,
    ) {
        let lease = shared.new_lease();
        shared
            .reserve(&asks, &lease, now)
            .await
            .unwrap()
            .expect("room");
        into.add_shared(shared.clone(), lease, asks, now);
    }

    /// A new request's reservation of `asks` at `now`.
    async fn reserved(
        shared: &Arc<SharedLimits>,
        asks: Vec<(Arc<Limited>, Ask)>,
        now: u64,
    ) -> Reservation {
        let mut r = Reservation::default();
        reserve_into(shared, &mut r, asks, now).await;
        r
    }

    /// Settles each of `requests` with its `(tokens, cost)`, all before this task yields (so in
    /// one batch), and waits until Redis has them.
    async fn settle_together(requests: &mut [Reservation], usage: (u64, u64), now: u64) {
        let recorded: Vec<_> = requests
            .iter_mut()
            .map(|r| {
                r.settle(usage.0, Picodollars(usage.1), now)
                    .expect("a budget to wait for")
            })
            .collect();
        for r in recorded {
            r.await;
        }
    }

    /// The Redis side of a retry that crosses a minute: the key was reserved in the minute
    /// before its deployment, and settling corrects each subject's tokens in the minute that
    /// counted them.
    #[tokio::test]
    async fn a_retry_in_the_next_minute_settles_each_subject_in_its_own_minute() {
        let redis = Redis::start();
        let shared = shared_limits(&redis, 60).await;
        let tpm = || Limits {
            tpm: Some(1_000),
            ..Default::default()
        };
        let key = subject(Scope::Key, tpm(), None);
        let deployment = subject(Scope::Deployment, tpm(), None);
        // Admitted in the last second of a minute; its retry reserves a deployment in the next.
        let mut a = reserved(&shared, vec![(key.clone(), ask(10, 0))], T - 1).await;
        // Another request of the key, in the new minute.
        let _b = reserved(&shared, vec![(key, ask(10, 0))], T).await;
        reserve_into(&shared, &mut a, vec![(deployment, ask(10, 0))], T + 1).await;
        assert!(
            a.settle(5, Picodollars(0), T + 1).is_none(),
            "no budget to wait for"
        );
        shared.settled(Duration::from_secs(2)).await;
        // `a`'s ask was counted in the old minute: only its 5 tokens used go in the new one,
        // next to `b`'s 10 still reserved.
        assert_eq!(hash_field(&redis, "key:ns/k", "tokens"), "15");
        assert_eq!(hash_field(&redis, "deployment:ns/d", "tokens"), "5");
    }

    /// Settlements queued together go to Redis as one script call, which reads and writes each
    /// subject's hash once for all of them, and still counts each request once: its real tokens
    /// in the right minute, its spend, and its slot and reserved cost given back, unless its
    /// lease had already expired: a reserve then charged its reserved cost, and its settlement
    /// changes nothing.
    #[tokio::test]
    async fn settlements_sent_in_one_batch_count_each_request_once() {
        let redis = Redis::start();
        let shared = shared_limits(&redis, 60).await;
        let parallel = Limits {
            tpm: Some(1_000_000),
            max_parallel: Some(100),
            ..Default::default()
        };
        let budget = BudgetConfig {
            max: Picodollars(1_000_000_000),
            period: BudgetPeriod::Lifetime,
        };
        let key = subject(Scope::Key, parallel.clone(), Some(budget));
        let deployment = subject(Scope::Deployment, parallel, None);
        let t = T + 5;
        let mut requests = Vec::new();
        // Two requests reserved 100 s ago, whose 60 s leases have ended; then eighteen now (the
        // first of which releases the two expired leases).
        for now in [t - 100, t - 100].into_iter().chain([t; 18]) {
            let asks = vec![
                (key.clone(), ask(10, 1_000)),
                (deployment.clone(), ask(10, 1_000)),
            ];
            requests.push(reserved(&shared, asks, now).await);
        }
        assert_eq!(calls(&redis, "zmscore"), 0);
        settle_together(&mut requests, (7, 700), t).await;
        assert_eq!(calls(&redis, "zmscore"), 2, "one lease check per subject");
        // The old minute's counts were reset by the first reserve this minute: eighteen asks
        // of 10, corrected to 7 each; the two expired ones change nothing.
        for id in ["key:ns/k", "deployment:ns/d"] {
            assert_eq!(hash_field(&redis, id, "tokens"), (18 * 7).to_string());
            assert_nothing_held(&redis, id).await;
        }
        assert_eq!(hash_field(&redis, "key:ns/k", "reserved"), "0");
        // Eighteen settled at their cost, two charged their reservation when their lease ended.
        assert_eq!(
            hash_field(&redis, "key:ns/k", "spend"),
            (18 * 700 + 2 * 1_000).to_string()
        );
    }

    /// A batch whose spend reaches 2^53 pico-dollars (from where Lua's doubles stop counting
    /// exactly) adds each request's spend with its own exact increment instead.
    #[tokio::test]
    async fn a_batch_of_huge_costs_is_summed_exactly() {
        let redis = Redis::start();
        let shared = shared_limits(&redis, 60).await;
        let key = key_with_budget(u64::MAX / 2, BudgetPeriod::Lifetime);
        let huge = (1u64 << 53) + 1;
        let mut two = Vec::new();
        for _ in 0..2 {
            two.push(reserved(&shared, vec![(key.clone(), ask(1, 3))], T).await);
        }
        settle_together(&mut two, (1, huge), T).await;
        // And a sum of exactly 2^53 + 1 (2^53 and 1), which a double rounds to 2^53.
        let mut a = reserved(&shared, vec![(key.clone(), ask(1, 3))], T).await;
        let mut b = reserved(&shared, vec![(key, ask(1, 3))], T).await;
        let (ra, rb) = (
            a.settle(1, Picodollars(1 << 53), T).unwrap(),
            b.settle(1, Picodollars(1), T).unwrap(),
        );
        ra.await;
        rb.await;
        assert_eq!(
            hash_field(&redis, "key:ns/k", "spend"),
            (3 * huge).to_string()
        );
        assert_eq!(hash_field(&redis, "key:ns/k", "reserved"), "0");
    }

    /// Reserves queued together go to Redis as one script call that admits them in order
    /// against counters read and written once per subject: of eight requests for five slots,
    /// the first five are admitted and the rest refused, with one lease write per subject.
    #[tokio::test]
    async fn reserves_sent_in_one_batch_are_admitted_in_order() {
        let redis = Redis::start();
        let shared = shared_limits(&redis, 60).await;
        let parallel = |n| Limits {
            max_parallel: Some(n),
            ..Default::default()
        };
        let asks = vec![
            (subject(Scope::Deployment, parallel(100), None), ask(1, 0)),
            (subject(Scope::Key, parallel(5), None), ask(1, 0)),
        ];
        let leases: Vec<_> = (0..8).map(|_| shared.new_lease()).collect();
        // Polled together before this task yields: all eight queue before the batch goes out.
        let answers =
            futures_util::future::join_all(leases.iter().map(|l| shared.reserve(&asks, l, T)))
                .await;
        let outcomes: Vec<_> = answers
            .into_iter()
            .map(|a| a.unwrap().map(|_| ()).map_err(|r| r.refusal))
            .collect();
        assert_eq!(
            outcomes,
            [
                vec![Ok(()); 5],
                vec![Err(Refusal::Parallel { limit: 5 }); 3]
            ]
            .concat()
        );
        assert_eq!(calls(&redis, "zadd"), 2, "one lease write per subject");
        assert_eq!(calls(&redis, "hmget"), 2, "one read per subject");
        assert_eq!(hash_field(&redis, "key:ns/k", "inflight"), "5");
        assert_eq!(hash_field(&redis, "deployment:ns/d", "inflight"), "5");
    }

    /// A request that leaves while its reserve is out (here: Redis paused for 150 ms, the
    /// request gone after 50): Redis still admits it, and the answer that reaches nobody is
    /// given back.
    #[tokio::test]
    async fn a_reserve_whose_request_left_is_given_back() {
        let redis = Redis::start();
        let shared = shared_limits(&redis, 60).await;
        let one = Limits {
            max_parallel: Some(1),
            ..Default::default()
        };
        let asks = vec![(subject(Scope::Key, one, None), ask(1, 0))];
        assert_eq!(
            redis_cli(&redis, &["CLIENT", "PAUSE", "150", "ALL"]).trim(),
            "OK"
        );
        let lease = shared.new_lease();
        let left =
            tokio::time::timeout(Duration::from_millis(50), shared.reserve(&asks, &lease, T)).await;
        assert!(left.is_err(), "the request left before Redis answered");
        assert_nothing_held(&redis, "key:ns/k").await;
        // The slot is free for the next request.
        let lease = shared.new_lease();
        assert!(shared.reserve(&asks, &lease, T + 1).await.unwrap().is_ok());
    }

    /// A batch that straddles a budget period: the spend settled before the period ended went
    /// to the old period (which the new one resets), as one settlement at a time would have it
    /// and as the replica's own counters count it; only the new period's spend counts in it.
    #[tokio::test]
    async fn a_batch_across_a_budget_period_counts_only_the_new_periods_spend() {
        let redis = Redis::start();
        let shared = shared_limits(&redis, 600).await;
        // Periods of 100 s: 500-599 is period 5, 600-699 period 6.
        let key = key_with_budget(1_000_000, BudgetPeriod::Seconds(100));
        let mut before = reserved(&shared, vec![(key.clone(), ask(1, 1))], 550).await;
        before.settle(1, Picodollars(100), 550).unwrap().await;
        let mut a = reserved(&shared, vec![(key.clone(), ask(1, 1))], 590).await;
        let mut b = reserved(&shared, vec![(key, ask(1, 1))], 599).await;
        // One batch: `a` settled at 599 (period 5), `b` at 650 (period 6).
        let (ra, rb) = (
            a.settle(1, Picodollars(10), 599).unwrap(),
            b.settle(1, Picodollars(20), 650).unwrap(),
        );
        ra.await;
        rb.await;
        let field = |f| hash_field(&redis, "key:ns/k", f);
        assert_eq!((field("period"), field("spend")), ("6".into(), "20".into()));
        assert_eq!(field("reserved"), "0");
    }

    /// A settlement queued behind a batch that timed out (Redis paused past the 250 ms timeout)
    /// is not dropped: its waiter is let go at once, and it is sent once Redis answers again,
    /// so its spend still counts.
    #[tokio::test]
    async fn settlements_queued_behind_a_failed_batch_still_count() {
        let redis = Redis::start();
        let shared = shared_limits(&redis, 600).await;
        let key = key_with_budget(1_000_000, BudgetPeriod::Lifetime);
        let mut requests = Vec::new();
        for _ in 0..3 {
            requests.push(reserved(&shared, vec![(key.clone(), ask(1, 1))], T).await);
        }
        // A first settlement loads the script (a call that times out before Redis has it
        // loaded would find it missing when Redis gets to it).
        requests[2].settle(1, Picodollars(5), T).unwrap().await;
        assert_eq!(
            redis_cli(&redis, &["CLIENT", "PAUSE", "700", "ALL"]).trim(),
            "OK"
        );
        let first = requests[0].settle(1, Picodollars(10), T).unwrap();
        // Let the first batch go out alone; the second settlement queues behind it.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let second = requests[1].settle(1, Picodollars(20), T).unwrap();
        first.await;
        second.await;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while hash_field(&redis, "key:ns/k", "spend") != "35"
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            hash_field(&redis, "key:ns/k", "spend"),
            "35",
            "every settlement counted"
        );
        // The batch that timed out ran once the pause ended, and is sent again (it failed, as
        // far as the replica knows): the second run finds its lease gone and changes nothing.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            hash_field(&redis, "key:ns/k", "spend"),
            "35",
            "counted once"
        );
        assert_eq!(hash_field(&redis, "key:ns/k", "reserved"), "0");
    }

    /// How many calls of the command `name` Redis refused (its ACL, here).
    fn rejected(redis: &Redis, name: &str) -> u64 {
        redis_cli(redis, &["INFO", "commandstats"])
            .lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:")))
            .and_then(|rest| {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix("rejected_calls="))
                    .map(|n| n.trim().parse().unwrap())
            })
            .unwrap_or(0)
    }

    /// Redis refuses the scripts (the ACL takes them away) while the connection stays up, so a
    /// failed settlement never ran. It is kept and sent again, with a growing wait between
    /// tries rather than in a tight loop, until Redis takes it: its spend counts once.
    #[tokio::test]
    async fn a_failed_settlement_is_sent_again_with_backoff_until_redis_takes_it() {
        let redis = Redis::start();
        let shared = shared_limits(&redis, 600).await;
        let key = key_with_budget(1_000_000, BudgetPeriod::Lifetime);
        let mut a = reserved(&shared, vec![(key, ask(1, 100))], T).await;
        let acl = |rule: &str| {
            assert_eq!(
                redis_cli(&redis, &["ACL", "SETUSER", "default", rule]).trim(),
                "OK"
            );
        };
        acl("-@scripting");
        // Its waiter is let go once the first try fails.
        tokio::time::timeout(
            Duration::from_secs(2),
            a.settle(1, Picodollars(10), T).unwrap(),
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let tries = rejected(&redis, "evalsha");
        // 0, 0.1, 0.3, 0.7 and 1.5 s (plus jitter): a handful, not thousands.
        assert!((2..=8).contains(&tries), "{tries} tries in 1.5 s");
        assert_eq!(hash_field(&redis, "key:ns/k", "spend"), "0");
        acl("+@all");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while hash_field(&redis, "key:ns/k", "spend") != "10"
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(hash_field(&redis, "key:ns/k", "spend"), "10");
        assert_eq!(hash_field(&redis, "key:ns/k", "reserved"), "0");
    }

    /// Past the backlog kept while Redis fails (two here), the oldest settlements are dropped;
    /// their leases then end in Redis like a dead replica's, and their reserved cost is charged.
    #[tokio::test]
    async fn settlements_past_the_backlog_are_charged_their_reservation_when_the_lease_ends() {
        let redis = Redis::start();
        let shared = Arc::new(
            SharedLimits::connect_with_backlog(
                &redis.url(),
                FailureMode::Closed,
                Duration::from_secs(1),
                2,
            )
            .await
            .unwrap(),
        );
        let key = key_with_budget(1_000_000, BudgetPeriod::Lifetime);
        let mut four = Vec::new();
        for _ in 0..4 {
            four.push(reserved(&shared, vec![(key.clone(), ask(1, 100))], T).await);
        }
        redis_cli(&redis, &["ACL", "SETUSER", "default", "-@scripting"]);
        // The first fails alone; the other three queue behind it, and the two oldest go.
        four[0].settle(1, Picodollars(10), T).unwrap().await;
        for r in &mut four[1..] {
            r.settle(1, Picodollars(10), T).unwrap().await;
        }
        redis_cli(&redis, &["ACL", "SETUSER", "default", "+@all"]);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while hash_field(&redis, "key:ns/k", "spend") != "20"
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            hash_field(&redis, "key:ns/k", "spend"),
            "20",
            "the two kept"
        );
        assert_eq!(hash_field(&redis, "key:ns/k", "reserved"), "200");
        // A reserve after the leases ended charges the two dropped ones' reservations.
        let _next = reserved(&shared, vec![(key, ask(1, 1))], T + 5).await;
        assert_eq!(hash_field(&redis, "key:ns/k", "spend"), "220");
        assert_eq!(hash_field(&redis, "key:ns/k", "reserved"), "1");
    }

    /// A request whose lease ended before it settled (its replica died, or its settlement
    /// never reached Redis): the next reserve charges its reserved cost as spent, and a
    /// settlement that arrives after that changes nothing.
    #[tokio::test]
    async fn an_expired_lease_is_charged_and_its_late_settlement_changes_nothing() {
        let redis = Redis::start();
        let shared = shared_limits(&redis, 1).await;
        let key = key_with_budget(1_000_000, BudgetPeriod::Lifetime);
        let mut late = reserved(&shared, vec![(key.clone(), ask(1, 1_000))], T).await;
        let mut next = reserved(&shared, vec![(key, ask(1, 10))], T + 5).await;
        let field = |f| hash_field(&redis, "key:ns/k", f);
        assert_eq!(
            (field("spend"), field("reserved")),
            ("1000".into(), "10".into())
        );
        late.settle(1, Picodollars(700), T + 5).unwrap().await;
        assert_eq!(
            (field("spend"), field("reserved")),
            ("1000".into(), "10".into())
        );
        assert_eq!(field("inflight"), "1");
        next.settle(1, Picodollars(7), T + 5).unwrap().await;
        assert_eq!(
            (field("spend"), field("reserved")),
            ("1007".into(), "0".into())
        );
    }

    /// A lease that ends in a later budget period than it began in is charged in the period it
    /// ends in (as a late settlement would be), not in the old one the new period resets.
    #[tokio::test]
    async fn an_expired_lease_is_charged_in_the_period_it_ends_in() {
        let redis = Redis::start();
        let shared = shared_limits(&redis, 1).await;
        // Periods of 100 s: 500-599 is period 5, 600-699 period 6.
        let key = key_with_budget(1_000_000, BudgetPeriod::Seconds(100));
        let _late = reserved(&shared, vec![(key.clone(), ask(1, 1_000))], 550).await;
        let _next = reserved(&shared, vec![(key, ask(1, 10))], 650).await;
        let field = |f| hash_field(&redis, "key:ns/k", f);
        assert_eq!(
            (field("period"), field("spend")),
            ("6".into(), "1000".into())
        );
    }
}
