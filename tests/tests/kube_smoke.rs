//! The real Kubernetes API server of `tollgate_testkit::kube` serves the chart's CRDs: objects
//! of them can be created and read back, and the garbage collector deletes what they own.
//! Needs `scripts/kube-test-env.sh` to have built the server.

use std::path::{Path, PathBuf};
use std::time::Duration;
use tollgate_testkit::kube::KubeCluster;
use tollgate_testkit::wait_until;

fn crds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/tollgate/files/crds")
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// Waits until `kubectl get KIND NAME` says NotFound.
fn gone(kube: &KubeCluster, kind: &str, name: &str, timeout: Duration) -> bool {
    wait_until(timeout, || {
        let out = kube.kubectl(&["get", kind, name]);
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("NotFound")
    })
}

#[test]
fn crds_install_and_objects_round_trip_and_are_garbage_collected() {
    let mut kube = KubeCluster::start();

    // The chart's CRDs are accepted and become Established (kubectl apply, kubectl wait).
    kube.install_crds(&crds_dir());

    // An LLMModel round-trips through the server.
    kube.apply_yaml(
        "apiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata:\n  name: demo\n\
         spec:\n  modelName: demo\n  provider: mock\n",
    );
    let list = json(&kube.kubectl_ok(&["get", "llmmodels", "-o", "json"]));
    let items = list["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 1, "{list}");
    let model = &items[0];
    assert_eq!(model["metadata"]["name"], "demo");
    assert_eq!(model["spec"]["modelName"], "demo");
    assert_eq!(model["spec"]["provider"], "mock");
    let uid = model["metadata"]["uid"]
        .as_str()
        .unwrap_or_else(|| panic!("no uid: {model}"))
        .to_string();

    // ownerReferences: a ConfigMap owned by a ConfigMap goes with its owner...
    kube.apply_yaml("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: parent\n");
    let parent = json(&kube.kubectl_ok(&["get", "configmap", "parent", "-o", "json"]));
    let parent_uid = parent["metadata"]["uid"].as_str().unwrap_or_default();
    kube.apply_yaml(&owned(
        "ConfigMap",
        "child",
        "v1",
        "ConfigMap",
        "parent",
        parent_uid,
    ));
    kube.kubectl_ok(&["delete", "configmap", "parent"]);
    assert!(
        gone(&kube, "configmap", "child", Duration::from_secs(30)),
        "the owned ConfigMap outlived its owner\n{}",
        kube.logs_tail(40)
    );

    // ...and a Secret owned by the LLMModel goes with it. The garbage collector picks up new
    // resource types on its 30-second discovery resync (about 40 s here); restarted, it knows
    // them at once.
    kube.restart_controller_manager();
    kube.apply_yaml(&owned(
        "Secret",
        "demo-key",
        "tollgate.dev/v1alpha1",
        "LLMModel",
        "demo",
        &uid,
    ));
    kube.kubectl_ok(&["delete", "llmmodel", "demo"]);
    assert!(
        gone(&kube, "secret", "demo-key", Duration::from_secs(30)),
        "the Secret owned by the LLMModel outlived it\n{}",
        kube.logs_tail(40)
    );
}

/// A `kind` named `name` owned by the object `owner_kind`/`owner` of `api_version`.
fn owned(
    kind: &str,
    name: &str,
    api_version: &str,
    owner_kind: &str,
    owner: &str,
    uid: &str,
) -> String {
    format!(
        "apiVersion: v1\nkind: {kind}\nmetadata:\n  name: {name}\n  ownerReferences:\n  \
         - apiVersion: {api_version}\n    kind: {owner_kind}\n    name: {owner}\n    uid: {uid}\n"
    )
}
