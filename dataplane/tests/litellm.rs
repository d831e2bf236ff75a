//! `tollgate-dataplane import-litellm`: the mission's LiteLLM config, imported by the real
//! binary, served by the real binary with its vLLM URLs pointed at mock upstreams.
#![expect(clippy::unwrap_used, reason = "tests")]

use serde_json::json;
use tollgate_crds::config::MockConfig;
use tollgate_testkit::{Behavior, Gateway, MockUpstream, chat_request, key_manifest};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate-dataplane");
const CONFIG: &str = include_str!("../../examples/litellm/config.yaml");
const KEY: &str = "sk-litellm-import-test-1";

/// Runs `tollgate-dataplane import-litellm -` with `config` on standard input.
fn import(config: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new(BIN)
        .args(["import-litellm", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(config.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn upstream() -> MockUpstream {
    MockUpstream::start(Behavior::Ok(MockConfig {
        reply: "hi from vllm".into(),
        prompt_tokens: Some(10),
        completion_tokens: Some(5),
        ..Default::default()
    }))
}

#[tokio::test]
async fn the_missions_litellm_config_imports_and_serves() {
    let (a, b) = (upstream(), upstream());
    let config = CONFIG
        .replace("http://vllm-1:8000/v1", &a.base_url())
        .replace("http://vllm-2:8000/v1", &b.base_url());
    let out = import(&config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifests = String::from_utf8(out.stdout).unwrap();
    let warnings = String::from_utf8(out.stderr).unwrap();
    // What has no equivalent is said, with its line; keys from the environment stay there.
    assert!(
        warnings.contains("warning: line 7: model_list[2] (claude-sonnet-4-6)"),
        "{warnings}"
    );
    assert!(
        warnings.contains("general_settings.database_url"),
        "{warnings}"
    );
    assert!(manifests.contains("${OPENAI_API_KEY}"), "{manifests}");
    assert!(!manifests.contains("LITELLM_MASTER_KEY"), "{manifests}");

    // Served as it is, with a key added: the two vLLM entries are one group of two pods.
    let gw = Gateway::start(BIN, &(manifests + &key_manifest("k", KEY, "")), &[]);
    for _ in 0..40 {
        let r = gw.chat(KEY, &chat_request("llama-3.1-8b", false)).await;
        assert_eq!(r.status(), 200);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(
            body["choices"][0]["message"]["content"],
            json!("hi from vllm")
        );
    }
    assert_eq!(a.stats.requests() + b.stats.requests(), 40);
    // Ties between idle pods are broken at random: 40 requests all on one is 2^-39.
    assert!(
        a.stats.requests() > 0 && b.stats.requests() > 0,
        "least-busy uses both pods"
    );
    // The RoutePolicy imported from router_settings is the group's.
    let health = reqwest::get(gw.url("/health")).await.unwrap();
    let health: serde_json::Value = health.json().await.unwrap();
    assert_eq!(
        health["models"]["llama-3.1-8b"]["strategy"], "least-busy",
        "{health}"
    );
}

#[test]
fn a_bad_config_is_an_error_that_says_why() {
    let out = import("model_list: [");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a LiteLLM config"), "{err}");
    let missing = std::process::Command::new(BIN)
        .args(["import-litellm", "/nonexistent/config.yaml"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("reading /nonexistent/config.yaml"));
}
