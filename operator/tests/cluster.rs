//! End-to-end against a real Kubernetes API server (etcd + kube-apiserver 1.20 + controller
//! manager, see `tollgate_testkit::kube`): the operator and a data plane in cluster mode, driven
//! with `kubectl` and HTTP. Needs `scripts/kube-test-env.sh` to have built the server, and the
//! data-plane binary built (`cargo nextest run --workspace` builds it).

#![expect(clippy::unwrap_used, reason = "tests")]

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tollgate_testkit::kube::KubeCluster;
use tollgate_testkit::{Gateway, Operator, chat_request, workspace_bin};

const OPERATOR: &str = env!("CARGO_BIN_EXE_tollgate-operator");
const KEY: &str = "sk-cluster-test-key-0001";
const MASTER: &str = "sk-master-cluster-test-0001";

/// The operator's admin API address, from its log.
fn admin_url(op: &Operator) -> String {
    assert!(
        op.wait_for_log("admin API listening", Duration::from_secs(30)),
        "{}",
        op.logs()
    );
    let logs = op.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("admin API listening"))
        .unwrap();
    let addr = line
        .split("addr=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    format!("http://{addr}")
}

fn crds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/tollgate/files/crds")
}

fn dataplane() -> String {
    let bin = workspace_bin("tollgate-dataplane");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p tollgate-dataplane)",
        bin.display()
    );
    bin.display().to_string()
}

fn model(reply: &str) -> String {
    format!(
        "apiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata: {{name: demo, namespace: team-a}}\nspec: {{modelName: demo, provider: mock, mock: {{reply: '{reply}'}}}}\n"
    )
}

fn key() -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: app-key, namespace: team-a}}\nstringData: {{key: {KEY}}}\n---\napiVersion: tollgate.dev/v1alpha1\nkind: VirtualKey\nmetadata: {{name: app, namespace: team-a}}\nspec: {{secretRef: {{name: app-key}}, team: search}}\n"
    )
}

async fn chat(gw: &Gateway, key: &str) -> (u16, Value) {
    let r = gw.chat(key, &chat_request("demo", false)).await;
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Polls `chat` until `ok` says yes; returns how long that took.
async fn served_within(
    gw: &Gateway,
    key: &str,
    limit: Duration,
    ok: impl Fn(u16, &Value) -> bool,
) -> Duration {
    let t = Instant::now();
    loop {
        let (s, v) = chat(gw, key).await;
        if ok(s, &v) {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < limit,
            "not served as expected within {limit:?}; last answer {s} {v}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Runs the official `openai` Python SDK (from the `.venv` that scripts/test.sh creates)
/// against `gw`: one whole and one streamed completion. Returns what it printed.
fn openai_sdk(gw: &Gateway, key: &str) -> String {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/test.sh once (it creates .venv with the openai SDK)",
        python.display()
    );
    let script = r#"
import sys
from openai import OpenAI
c = OpenAI(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
r = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
print("whole:", r.choices[0].message.content, r.usage.total_tokens)
s = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], stream=True)
print("streamed:", "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices))
"#;
    let out = std::process::Command::new(python)
        .args(["-c", script, &gw.url("/v1"), key])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openai SDK failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn reply_of(v: &Value) -> &str {
    v["choices"][0]["message"]["content"].as_str().unwrap_or("")
}

fn condition(kube: &KubeCluster, kind: &str, ns: &str, name: &str, ty: &str) -> Option<Value> {
    let out = kube.kubectl(&["get", kind, name, "-n", ns, "-o", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == ty)
        .cloned()
}

fn wait_condition(
    kube: &KubeCluster,
    op: &Operator,
    kind: &str,
    ns: &str,
    name: &str,
    ty: &str,
    status: &str,
) -> Value {
    let t = Instant::now();
    loop {
        if let Some(c) = condition(kube, kind, ns, name, ty)
            && c["status"] == status
        {
            return c;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{kind} {ns}/{name}: no {ty}={status}; now {:?}\noperator log:\n{}",
            condition(kube, kind, ns, name, ty),
            op.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test]
async fn kubectl_apply_is_served_reported_and_survives_the_operator() {
    let mut kube = KubeCluster::start();
    kube.install_crds(&crds_dir());
    // The garbage collector of 1.20 sees CRDs created after it started only on a resync.
    kube.restart_controller_manager();
    kube.kubectl_ok(&["create", "namespace", "tollgate-system"]);
    kube.kubectl_ok(&["create", "namespace", "team-a"]);
    let mut op = Operator::start_with(
        OPERATOR,
        kube.kubeconfig_path(),
        &["--master-key", MASTER, "--admin-addr", "127.0.0.1:0"],
    );
    assert!(
        op.wait_for_log("published config", Duration::from_secs(60)),
        "{}",
        op.logs()
    );
    let mut gw = Gateway::start_cluster(&dataplane(), kube.kubeconfig_path(), &[]);

    // kubectl apply a model and a key: served within 2 s.
    kube.apply_yaml(&format!("{}---\n{}", model("first"), key()));
    let took = served_within(&gw, KEY, Duration::from_secs(10), |s, v| {
        s == 200 && reply_of(v) == "first"
    })
    .await;
    eprintln!("model + key served {took:?} after kubectl apply");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    wait_condition(&kube, &op, "llmmodel", "team-a", "demo", "Ready", "True");
    let ready = wait_condition(&kube, &op, "virtualkey", "team-a", "app", "Ready", "True");
    assert_eq!(ready["reason"], "Compiled");

    // The official openai SDK, whole and streamed, through the cluster-mode data plane.
    let sdk = openai_sdk(&gw, KEY);
    assert!(sdk.contains("whole: first"), "{sdk}");
    assert!(sdk.contains("streamed: first"), "{sdk}");

    // Edit the model: the new version is served within 2 s, in one reconcile pass: the
    // statuses that pass writes don't wake another.
    let passes = |op: &Operator| op.logs().matches("reconcile pass").count();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = passes(&op);
    kube.apply_yaml(&model("second"));
    let took = served_within(&gw, KEY, Duration::from_secs(10), |s, v| {
        s == 200 && reply_of(v) == "second"
    })
    .await;
    eprintln!("model edit served {took:?} after kubectl apply");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    wait_condition(&kube, &op, "llmmodel", "team-a", "demo", "Ready", "True");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        passes(&op) - before,
        1,
        "reconcile passes for one edit:\n{}",
        op.logs()
    );

    // An invalid RoutePolicy is reported on itself; everything else keeps serving.
    kube.apply_yaml(
        "apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {name: broken, namespace: team-a}\nspec: {models: [demo], fallbacks: [no-such-model]}\n",
    );
    let c = wait_condition(
        &kube,
        &op,
        "routepolicy",
        "team-a",
        "broken",
        "Accepted",
        "False",
    );
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains(r#"spec.fallbacks[0]: no LLMModel has modelName "no-such-model""#),
        "{c}"
    );
    let refs = wait_condition(
        &kube,
        &op,
        "routepolicy",
        "team-a",
        "broken",
        "ResolvedRefs",
        "False",
    );
    assert_eq!(refs["reason"], "ModelNotFound");
    assert_eq!(chat(&gw, KEY).await.0, 200);
    let events = kube.kubectl_ok(&["get", "events", "-n", "team-a"]);
    assert!(events.contains("broken"), "{events}");

    // A VirtualKey without a Secret gets a generated key, owned by it, that works.
    kube.apply_yaml(
        "apiVersion: tollgate.dev/v1alpha1\nkind: VirtualKey\nmetadata: {name: generated, namespace: team-a}\nspec: {models: [demo]}\n",
    );
    let t = Instant::now();
    let generated = loop {
        let out = kube.kubectl(&[
            "get",
            "secret",
            "generated-key",
            "-n",
            "team-a",
            "-o",
            "jsonpath={.data.key}",
        ]);
        if out.status.success() && !out.stdout.is_empty() {
            break String::from_utf8(out.stdout).unwrap();
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no generated Secret");
        std::thread::sleep(Duration::from_millis(100));
    };
    let generated = String::from_utf8(
        std::process::Command::new("base64")
            .arg("-d")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(generated.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(generated.starts_with("sk-tg-"), "{generated}");
    served_within(&gw, &generated, Duration::from_secs(5), |s, _| s == 200).await;
    let vk = kube.kubectl_ok(&[
        "get",
        "virtualkey",
        "generated",
        "-n",
        "team-a",
        "-o",
        "json",
    ]);
    assert!(
        !vk.contains(&generated),
        "the key leaked into the VirtualKey: {vk}"
    );

    // The LiteLLM-compatible admin API, served by the operator, makes VirtualKeys.
    let admin = admin_url(&op);
    let http = reqwest::Client::new();
    let made: Value = http
        .post(format!("{admin}/key/generate"))
        .bearer_auth(MASTER)
        .json(&json!({"key_alias": "ci-bot", "models": ["demo"], "team_id": "search", "max_budget": 5}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let api_key = made["key"]
        .as_str()
        .unwrap_or_else(|| panic!("{made}"))
        .to_string();
    let took = served_within(&gw, &api_key, Duration::from_secs(10), |s, _| s == 200).await;
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let info: Value = http
        .get(format!("{admin}/key/info?key={api_key}"))
        .bearer_auth(MASTER)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["info"]["key_alias"], "ci-bot", "{info}");
    assert_eq!(info["info"]["team_id"], "search", "{info}");
    let vks = kube.kubectl_ok(&["get", "virtualkeys", "-n", "tollgate-system", "-o", "json"]);
    assert!(vks.contains("ci-bot") && !vks.contains(&api_key), "{vks}");
    let secrets = kube.kubectl_ok(&["get", "secrets", "-n", "tollgate-system", "-o", "json"]);
    assert!(
        !secrets.contains(&api_key),
        "the key itself is stored nowhere"
    );
    // Wrong master key: an OpenAI-shaped 401.
    let r = http
        .get(format!("{admin}/key/list"))
        .bearer_auth("sk-not-the-master-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "invalid_api_key");
    // Keys applied with kubectl are not the admin API's to delete.
    let r = http
        .post(format!("{admin}/key/delete"))
        .bearer_auth(MASTER)
        .json(&json!({"keys": [KEY]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .post(format!("{admin}/key/delete"))
        .bearer_auth(MASTER)
        .json(&json!({"key_aliases": ["ci-bot"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    served_within(&gw, &api_key, Duration::from_secs(10), |s, _| s == 401).await;

    // Delete the key: 401 within 2 s.
    kube.kubectl_ok(&["delete", "virtualkey", "app", "-n", "team-a"]);
    let took = served_within(&gw, KEY, Duration::from_secs(10), |s, _| s == 401).await;
    assert!(took < Duration::from_secs(2), "took {took:?}");

    // The operator goes down: the data plane keeps serving, also after its own restart.
    op.kill();
    assert_eq!(chat(&gw, &generated).await.0, 200);
    gw.kill();
    gw.start_again();
    assert_eq!(chat(&gw, &generated).await.0, 200);
    assert_eq!(chat(&gw, KEY).await.0, 401);

    // Back up, it picks up what changed while it was down.
    kube.apply_yaml(&model("third"));
    op.start_again();
    served_within(&gw, &generated, Duration::from_secs(30), |s, v| {
        s == 200 && reply_of(v) == "third"
    })
    .await;

    // Deleting the generated key's VirtualKey deletes its Secret (owner reference).
    kube.kubectl_ok(&["delete", "virtualkey", "generated", "-n", "team-a"]);
    assert!(tollgate_testkit::wait_until(
        Duration::from_secs(30),
        || {
            !kube
                .kubectl(&["get", "secret", "generated-key", "-n", "team-a"])
                .status
                .success()
        }
    ));
    let logs = op.logs() + &gw.logs();
    assert!(
        !logs.contains(KEY) && !logs.contains(&generated),
        "a key leaked into the logs"
    );
}

#[tokio::test]
async fn two_replicas_elect_one_leader_and_fail_over() {
    let kube = KubeCluster::start();
    kube.install_crds(&crds_dir());
    kube.kubectl_ok(&["create", "namespace", "tollgate-system"]);
    kube.kubectl_ok(&["create", "namespace", "team-a"]);
    let flags = ["--lease-duration", "3s"];
    let mut a = Operator::start_with(
        OPERATOR,
        kube.kubeconfig_path(),
        &[&flags[..], &["--identity", "op-a"]].concat(),
    );
    assert!(
        a.wait_for_log("became leader", Duration::from_secs(60)),
        "{}",
        a.logs()
    );
    let b = Operator::start_with(
        OPERATOR,
        kube.kubeconfig_path(),
        &[&flags[..], &["--identity", "op-b"]].concat(),
    );
    assert!(
        b.wait_for_log("watches synced", Duration::from_secs(60)),
        "{}",
        b.logs()
    );
    let gw = Gateway::start_cluster(&dataplane(), kube.kubeconfig_path(), &[]);
    kube.apply_yaml(&format!("{}---\n{}", model("from-a"), key()));
    served_within(&gw, KEY, Duration::from_secs(10), |s, v| {
        s == 200 && reply_of(v) == "from-a"
    })
    .await;
    // One leader: the standby published nothing.
    assert!(!b.logs().contains("became leader"), "{}", b.logs());
    assert!(!b.logs().contains("published config"), "{}", b.logs());
    let lease = kube.kubectl_ok(&[
        "get",
        "lease",
        "tollgate-operator",
        "-n",
        "tollgate-system",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert_eq!(lease, "op-a");

    // The leader dies: the standby takes over within the lease time and serves changes.
    a.kill();
    let t = Instant::now();
    assert!(
        b.wait_for_log("became leader", Duration::from_secs(10)),
        "{}",
        b.logs()
    );
    let took = t.elapsed();
    eprintln!("standby became leader {took:?} after the leader died");
    assert!(took < Duration::from_secs(6), "took {took:?}");
    kube.apply_yaml(&model("from-b"));
    served_within(&gw, KEY, Duration::from_secs(10), |s, v| {
        s == 200 && reply_of(v) == "from-b"
    })
    .await;
    // A returning replica stays a standby while the new leader renews.
    a.start_again();
    assert!(a.wait_for_log("watches synced", Duration::from_secs(60)));
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!a.logs().contains("became leader"), "{}", a.logs());
}

fn spend_of(kube: &KubeCluster, kind: &str, name: &str) -> Value {
    let out = kube.kubectl(&["get", kind, name, "-n", "team-a", "-o", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["status"]["spend"].clone()
}

#[tokio::test]
async fn spend_from_real_requests_reaches_status_exactly_once_across_an_operator_crash() {
    let redis = tollgate_testkit::Redis::start();
    let kube = KubeCluster::start();
    kube.install_crds(&crds_dir());
    kube.kubectl_ok(&["create", "namespace", "tollgate-system"]);
    kube.kubectl_ok(&["create", "namespace", "team-a"]);
    let mut op = Operator::start_with(
        OPERATOR,
        kube.kubeconfig_path(),
        &["--redis-url", &redis.url(), "--spend-interval", "200ms"],
    );
    assert!(
        op.wait_for_log("published config", Duration::from_secs(60)),
        "{}",
        op.logs()
    );
    let gw = Gateway::start_cluster(
        &dataplane(),
        kube.kubeconfig_path(),
        &["--redis-url", &redis.url()],
    );
    // $0.0002 a request; a budget of $0.009 a day admits 45.
    kube.apply_yaml(&format!(
        "apiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata: {{name: demo, namespace: team-a}}\nspec: {{modelName: demo, provider: mock, mock: {{promptTokens: 100, completionTokens: 100}}, pricing: {{inputPerMillion: 1, outputPerMillion: 1}}}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: app-key, namespace: team-a}}\nstringData: {{key: {KEY}}}\n---\napiVersion: tollgate.dev/v1alpha1\nkind: VirtualKey\nmetadata: {{name: app, namespace: team-a}}\nspec: {{secretRef: {{name: app-key}}, budget: {{maxUsd: 0.009, duration: daily}}}}\n"
    ));
    served_within(&gw, KEY, Duration::from_secs(10), |s, _| s == 200).await;
    let mut served = 1u64;
    // Load, with the operator killed in the middle and back a little later.
    for i in 0..40 {
        if i == 10 {
            op.kill();
        }
        if i == 25 {
            op.start_again();
        }
        let (s, v) = chat(&gw, KEY).await;
        assert_eq!(s, 200, "{v}");
        served += 1;
    }
    assert_eq!(served, 41);
    let want = |n: u64| tollgate_crds::config::Picodollars(n * 200_000_000).to_string();
    let t = Instant::now();
    loop {
        let spend = spend_of(&kube, "virtualkey", "app");
        if spend["totalUsd"] == want(served) {
            assert_eq!(spend["currentPeriodUsd"], want(served), "{spend}");
            assert!(spend["budgetResetAt"].is_string(), "{spend}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "spend in status {spend}, want {}\n{}",
            want(served),
            op.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let model = spend_of(&kube, "llmmodel", "demo");
    assert_eq!(model["requests"], served, "{model}");
    assert_eq!(model["totalUsd"], want(served), "{model}");
    // Folded once, however often the operator (re)started: nothing more appears later.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        spend_of(&kube, "virtualkey", "app")["totalUsd"],
        want(served)
    );

    // Spend the rest of the budget: the data plane refuses, and the key says why.
    loop {
        let (s, v) = chat(&gw, KEY).await;
        if s == 429 {
            assert_eq!(v["error"]["code"], "budget_exceeded", "{v}");
            break;
        }
        served += 1;
        assert!(served <= 45, "served past the budget");
    }
    assert_eq!(served, 45);
    wait_condition(
        &kube,
        &op,
        "virtualkey",
        "team-a",
        "app",
        "BudgetExceeded",
        "True",
    );
    let printed = kube.kubectl_ok(&["get", "virtualkeys", "-n", "team-a"]);
    assert!(printed.contains("0.009"), "{printed}");
}

/// A stand-in for KServe's CRD: just enough schema to hold an InferenceService's status, and
/// no status subresource, so a test can set `status` with `kubectl apply` (there is no KServe
/// controller here to do it).
const KSERVE_CRD: &str = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: inferenceservices.serving.kserve.io}
spec:
  group: serving.kserve.io
  names: {kind: InferenceService, plural: inferenceservices, singular: inferenceservice, shortNames: [isvc]}
  scope: Namespaced
  versions:
  - name: v1beta1
    served: true
    storage: true
    schema:
      openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
"#;

fn isvc(url: &str) -> String {
    format!(
        "apiVersion: serving.kserve.io/v1beta1\nkind: InferenceService\nmetadata: {{name: llama, namespace: team-a}}\nspec: {{predictor: {{model: {{modelFormat: {{name: huggingface}}}}}}}}\nstatus: {{address: {{url: '{url}'}}}}\n"
    )
}

#[tokio::test]
async fn inference_services_are_followed_and_a_missing_kserve_is_reported() {
    use tollgate_testkit::{Behavior, MockUpstream};
    let up1 = MockUpstream::start(Behavior::Ok(Default::default()));
    let up2 = MockUpstream::start(Behavior::Ok(Default::default()));
    let kube = KubeCluster::start();
    kube.install_crds(&crds_dir());
    kube.kubectl_ok(&["create", "namespace", "tollgate-system"]);
    kube.kubectl_ok(&["create", "namespace", "team-a"]);
    let op = Operator::start(OPERATOR, kube.kubeconfig_path());
    assert!(
        op.wait_for_log("published config", Duration::from_secs(60)),
        "{}",
        op.logs()
    );
    let gw = Gateway::start_cluster(&dataplane(), kube.kubeconfig_path(), &[]);
    kube.apply_yaml(&format!(
        "{}---\napiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata: {{name: demo, namespace: team-a}}\nspec: {{modelName: demo, provider: openai-compatible, inferenceServiceRef: {{name: llama, path: /v1}}, credentialsRef: {{name: provider}}}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: provider, namespace: team-a}}\nstringData: {{apiKey: sk-provider-old}}\n---\napiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata: {{name: pods, namespace: team-a}}\nspec: {{modelName: pods, provider: openai-compatible, serviceRef: {{name: vllm, port: 8000}}}}\n",
        key()
    ));
    // No KServe: the model says so, and the operator carries on.
    let c = wait_condition(
        &kube,
        &op,
        "llmmodel",
        "team-a",
        "demo",
        "BackendResolved",
        "False",
    );
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("KServe is not installed"),
        "{c}"
    );
    // 1.20 serves no discovery.k8s.io/v1 EndpointSlices: serviceRef says that too.
    let c = wait_condition(
        &kube,
        &op,
        "llmmodel",
        "team-a",
        "pods",
        "BackendResolved",
        "False",
    );
    assert!(
        c["message"].as_str().unwrap().contains("EndpointSlices"),
        "{c}"
    );
    assert_eq!(chat(&gw, KEY).await.0, 404, "no model is served yet");

    // KServe arrives, with an InferenceService: served through its address.
    kube.apply_yaml(KSERVE_CRD);
    kube.kubectl_ok(&[
        "wait",
        "--for",
        "condition=established",
        "--timeout",
        "30s",
        "crd/inferenceservices.serving.kserve.io",
    ]);
    kube.apply_yaml(&isvc(&format!("http://{}", up1.addr)));
    served_within(&gw, KEY, Duration::from_secs(60), |s, _| s == 200).await;
    assert_eq!(up1.stats.requests(), 1);
    let c = wait_condition(
        &kube,
        &op,
        "llmmodel",
        "team-a",
        "demo",
        "BackendResolved",
        "True",
    );
    assert_eq!(c["message"], "1 endpoint(s).");

    assert_eq!(
        up1.stats.last_auth.lock().unwrap().as_deref(),
        Some("Bearer sk-provider-old")
    );

    // The provider key is rotated: the next requests carry the new one, no restart.
    kube.apply_yaml(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: provider, namespace: team-a}\nstringData: {apiKey: sk-provider-new}\n",
    );
    let t = Instant::now();
    while up1.stats.last_auth.lock().unwrap().as_deref() != Some("Bearer sk-provider-new") {
        assert_eq!(chat(&gw, KEY).await.0, 200);
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the rotated key is not used"
        );
    }

    // Its address changes: followed.
    kube.apply_yaml(&isvc(&format!("http://{}", up2.addr)));
    let t = Instant::now();
    while up2.stats.requests() == 0 {
        assert_eq!(chat(&gw, KEY).await.0, 200);
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the new address is not used"
        );
    }
}
