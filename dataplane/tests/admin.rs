//! End-to-end: the LiteLLM-compatible admin API through the real binary.

#![expect(clippy::unwrap_used, reason = "tests")]

use serde_json::{Value, json};
use tollgate_testkit::{Gateway, chat_request};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate-dataplane");
const MASTER: &str = "sk-master-key-for-tests-0001";

const MANIFESTS: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: LLMModel
metadata: {name: m}
spec: {modelName: m, provider: mock, mock: {promptTokens: 10, completionTokens: 10}, pricing: {inputPerMillion: 1, outputPerMillion: 3}}
---
apiVersion: tollgate.dev/v1alpha1
kind: LLMModel
metadata: {name: other}
spec: {modelName: other, provider: mock}
"#;

async fn admin(
    gw: &Gateway,
    method: &str,
    path: &str,
    key: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let c = reqwest::Client::new();
    let mut req = if method == "POST" {
        c.post(gw.url(path))
    } else {
        c.get(gw.url(path))
    };
    req = req.bearer_auth(key);
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn chat(gw: &Gateway, key: &str, model: &str) -> u16 {
    gw.chat(key, &chat_request(model, false))
        .await
        .status()
        .as_u16()
}

#[tokio::test]
async fn litellm_key_generate_request_works_and_the_key_persists() {
    let mut gw = Gateway::start(BIN, MANIFESTS, &["--master-key", MASTER]);
    // The request from LiteLLM's docs, as sent.
    let litellm_request = json!({
        "models": ["m"],
        "max_budget": 10.0,
        "budget_duration": "30d",
        "duration": "30d",
        "key_alias": "prod-app",
        "team_id": "search",
        "rpm_limit": 100,
        "tpm_limit": 100000,
        "metadata": {"environment": "production"}
    });
    let (s, v) = admin(
        &gw,
        "POST",
        "/key/generate",
        MASTER,
        Some(litellm_request.clone()),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let key = v["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("sk-") && key.len() > 30, "{v}");
    assert_eq!(v["key_name"], format!("sk-...{}", &key[key.len() - 4..]));
    assert!(v["expires"].as_str().is_some());
    // The key works at once, for its models only.
    assert_eq!(chat(&gw, &key, "m").await, 200);
    assert_eq!(chat(&gw, &key, "other").await, 403);

    // The master key is required.
    assert_eq!(
        admin(&gw, "POST", "/key/generate", &key, Some(json!({})))
            .await
            .0,
        401
    );
    assert_eq!(
        admin(&gw, "GET", "/key/list", "sk-wrong-master-key-000", None)
            .await
            .0,
        401
    );

    // Info and spend: 10 × $1/M + 10 × $3/M = $0.00004.
    let (s, info) = admin(&gw, "GET", &format!("/key/info?key={key}"), MASTER, None).await;
    assert_eq!(s, 200);
    assert_eq!(info["info"]["key_alias"], "prod-app");
    assert_eq!(info["info"]["team_id"], "search");
    assert_eq!(info["info"]["spend"], 0.00004);
    assert_eq!(info["info"]["rpm_limit"], 100);
    let token = info["info"]["token"].as_str().unwrap().to_string();
    let (_, list) = admin(&gw, "GET", "/key/list", MASTER, None).await;
    assert!(
        list["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == &json!(token))
    );
    let (_, teams) = admin(&gw, "GET", "/spend/teams", MASTER, None).await;
    assert_eq!(teams, json!([{"team_id": "search", "spend": 0.00004}]));
    let (_, models) = admin(&gw, "GET", "/spend/models", MASTER, None).await;
    assert_eq!(models[0]["model"], "m");
    assert_eq!(models[0]["requests"], 1);

    // Only the hash is stored.
    let stored = std::fs::read_to_string(gw.manifest_dir().join("generated-keys.yaml")).unwrap();
    assert!(
        !stored.contains(&key) && stored.contains(&token),
        "{stored}"
    );
    assert!(!gw.logs().contains(&key), "the key was logged");

    // It survives a restart, and deleting it revokes it.
    gw.restart();
    assert_eq!(chat(&gw, &key, "m").await, 200);
    let (s, v) = admin(
        &gw,
        "POST",
        "/key/delete",
        MASTER,
        Some(json!({"keys": [key]})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(chat(&gw, &key, "m").await, 401);
}

#[tokio::test]
async fn bad_admin_requests_are_refused_and_change_nothing() {
    let gw = Gateway::start(BIN, MANIFESTS, &["--master-key", MASTER]);
    let (s, v) = admin(
        &gw,
        "POST",
        "/key/generate",
        MASTER,
        Some(json!({"budget_duration": "fortnightly", "max_budget": 1})),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("spec.budget.duration"),
        "{v}"
    );
    let (_, list) = admin(&gw, "GET", "/key/list", MASTER, None).await;
    assert_eq!(list["total_count"], 0);
    let (s, _) = admin(
        &gw,
        "POST",
        "/key/generate",
        MASTER,
        Some(json!({"key": "short"})),
    )
    .await;
    assert_eq!(s, 400);
    let (s, v) = admin(
        &gw,
        "POST",
        "/key/delete",
        MASTER,
        Some(json!({"keys": ["sk-no-such-key-000000"]})),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("key_not_found"))
    );

    // Without a master key the admin API is off.
    let off = Gateway::start(BIN, MANIFESTS, &[]);
    let (s, v) = admin(&off, "GET", "/key/list", MASTER, None).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("admin_disabled"))
    );
}

/// A keys file that can't be read whole stops key changes: `/key/generate` must never rewrite
/// it from a partial read, dropping the keys already in it.
#[tokio::test]
async fn an_unreadable_keys_file_is_never_rewritten_without_its_keys() {
    let gw = Gateway::start(BIN, MANIFESTS, &["--master-key", MASTER]);
    let (s, v) = admin(
        &gw,
        "POST",
        "/key/generate",
        MASTER,
        Some(json!({"models": ["m"]})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let first = v["key"].as_str().unwrap().to_string();
    let path = gw
        .manifest_dir()
        .join(tollgate_dataplane::config::loader::GENERATED_KEYS_FILE);
    let mut text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("VirtualKey"), "{text}");
    // A hand edit gone wrong.
    text.push_str("---\n{\"kind\": \"VirtualKey\", broken\n");
    std::fs::write(&path, &text).unwrap();
    let (s, v) = admin(
        &gw,
        "POST",
        "/key/generate",
        MASTER,
        Some(json!({"models": ["m"]})),
    )
    .await;
    assert_eq!(s, 500, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("can't be read"),
        "{v}"
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        text,
        "the file was rewritten"
    );
    // The key made before still works.
    assert_eq!(chat(&gw, &first, "m").await, 200);
}
