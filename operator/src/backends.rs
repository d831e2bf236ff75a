//! Resolving `serviceRef` and `inferenceServiceRef` backends to the URLs the data plane
//! balances over.
//!
//! - `serviceRef` → the Service's ready endpoints from its `discovery.k8s.io/v1`
//!   EndpointSlices, one URL per pod (`http://<pod-ip>:<target-port><path>`), so the data plane
//!   routes pod by pod and queue-aware routing can read each vLLM pod's `/metrics`.
//! - `inferenceServiceRef` → a KServe `serving.kserve.io/v1beta1` InferenceService's
//!   `status.address.url` (in-cluster), else `status.url`, plus the path (`/openai/v1`).
//!
//! Both are followed as they change (the operator watches them). When an API is not served by
//! the cluster (KServe not installed; EndpointSlice v1 before Kubernetes 1.21), the LLMModels
//! that need it say so in their status instead of the operator failing.
//!
//! The resolution itself is a pure function of the objects, tested in-process.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::DynamicObject;
use std::collections::BTreeMap;
use tollgate_crds::LlmModel;
use tollgate_crds::compile::DEFAULT_NAMESPACE;

/// The label EndpointSlices carry with their Service's name.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the resolver can see.
#[derive(Default)]
pub struct Seen<'a> {
    /// Services (for the port name behind `serviceRef.port`), or `None` if not watched.
    pub services: Vec<&'a Service>,
    /// EndpointSlices, or `None` when the API isn't available.
    pub slices: Option<Vec<&'a EndpointSlice>>,
    /// InferenceServices, or `None` when KServe isn't installed.
    pub inference_services: Option<Vec<&'a DynamicObject>>,
}

/// Resolved URLs by LLMModel `namespace/name`, and why the others could not be resolved.
pub type Resolution = (BTreeMap<String, Vec<String>>, BTreeMap<String, String>);

fn ns(meta: &kube::core::ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
}

/// Resolves every LLMModel with a `serviceRef` or `inferenceServiceRef`.
pub fn resolve(models: &[LlmModel], seen: &Seen<'_>) -> Resolution {
    let mut urls = BTreeMap::new();
    let mut errors = BTreeMap::new();
    for m in models {
        let id = format!(
            "{}/{}",
            ns(&m.metadata),
            m.metadata.name.as_deref().unwrap_or("")
        );
        let result = if let Some(r) = &m.spec.service_ref {
            service_urls(ns(&m.metadata), &r.name, r.port, r.path.as_deref(), seen)
        } else if let Some(r) = &m.spec.inference_service_ref {
            inference_service_url(ns(&m.metadata), &r.name, r.path.as_deref(), seen)
                .map(|u| vec![u])
        } else {
            continue;
        };
        match result {
            Ok(u) => {
                urls.insert(id, u);
            }
            Err(e) => {
                errors.insert(id, e);
            }
        }
    }
    (urls, errors)
}

fn service_urls(
    namespace: &str,
    name: &str,
    port: u16,
    path: Option<&str>,
    seen: &Seen<'_>,
) -> Result<Vec<String>, String> {
    let Some(slices) = &seen.slices else {
        return Err(
            "the cluster does not serve discovery.k8s.io/v1 EndpointSlices (Kubernetes 1.21+), so serviceRef can't be resolved; use spec.url"
                .into(),
        );
    };
    let path = path.unwrap_or("/v1").trim_end_matches('/');
    // The Service port's name picks the matching port of each slice (target ports may differ
    // from the Service port).
    let port_name = seen
        .services
        .iter()
        .find(|s| ns(&s.metadata) == namespace && s.metadata.name.as_deref() == Some(name))
        .and_then(|s| s.spec.as_ref()?.ports.as_ref())
        .and_then(|ports| ports.iter().find(|p| p.port == i32::from(port)))
        .map(|p| p.name.clone().unwrap_or_default());
    let mut urls = Vec::new();
    for s in slices.iter().filter(|s| {
        ns(&s.metadata) == namespace
            && s.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .is_some_and(|n| n == name)
            && matches!(s.address_type.as_str(), "IPv4" | "IPv6")
    }) {
        let ports = s.ports.as_deref().unwrap_or(&[]);
        let target = match &port_name {
            Some(n) => ports
                .iter()
                .find(|p| p.name.clone().unwrap_or_default() == *n)
                .and_then(|p| p.port),
            None => ports
                .iter()
                .find(|p| p.port == Some(i32::from(port)))
                .or_else(|| (ports.len() == 1).then(|| &ports[0]))
                .and_then(|p| p.port),
        };
        let Some(target) = target else { continue };
        for e in &s.endpoints {
            // Ready unless it says otherwise (the API's own default).
            if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            for a in &e.addresses {
                let host = if s.address_type == "IPv6" {
                    format!("[{a}]")
                } else {
                    a.clone()
                };
                urls.push(format!("http://{host}:{target}{path}"));
            }
        }
    }
    urls.sort();
    urls.dedup();
    if urls.is_empty() {
        return Err(format!(
            "Service {namespace}/{name} has no ready endpoints on port {port}"
        ));
    }
    Ok(urls)
}

fn inference_service_url(
    namespace: &str,
    name: &str,
    path: Option<&str>,
    seen: &Seen<'_>,
) -> Result<String, String> {
    let Some(list) = &seen.inference_services else {
        return Err(
            "KServe is not installed (no serving.kserve.io/v1beta1 InferenceService API); install it or use spec.url / spec.serviceRef"
                .into(),
        );
    };
    let Some(isvc) = list
        .iter()
        .find(|o| ns(&o.metadata) == namespace && o.metadata.name.as_deref() == Some(name))
    else {
        return Err(format!("InferenceService {namespace}/{name} not found"));
    };
    let status = &isvc.data["status"];
    let base = status["address"]["url"]
        .as_str()
        .or_else(|| status["url"].as_str())
        .filter(|u| !u.is_empty())
        .ok_or_else(|| format!("InferenceService {namespace}/{name} has no URL yet (not ready)"))?;
    let path = path.unwrap_or("/openai/v1").trim_end_matches('/');
    Ok(format!("{}{path}", base.trim_end_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(yaml: &str) -> LlmModel {
        serde_yaml::from_str(yaml).expect("a model")
    }

    fn slice(yaml: &str) -> EndpointSlice {
        serde_yaml::from_str(yaml).expect("a slice")
    }

    #[test]
    fn a_service_resolves_to_its_ready_pods_on_the_target_port() {
        let m = model(
            "apiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata: {name: llama, namespace: ml}\nspec: {modelName: llama, provider: openai-compatible, serviceRef: {name: vllm, port: 80}}\n",
        );
        let svc: Service = serde_yaml::from_str(
            "apiVersion: v1\nkind: Service\nmetadata: {name: vllm, namespace: ml}\nspec: {ports: [{name: http, port: 80, targetPort: 8000}]}\n",
        )
        .expect("a service");
        let a = slice(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: vllm-a, namespace: ml, labels: {kubernetes.io/service-name: vllm}}\naddressType: IPv4\nports: [{name: http, port: 8000}]\nendpoints:\n- {addresses: [10.0.0.1], conditions: {ready: true}}\n- {addresses: [10.0.0.2], conditions: {ready: false}}\n- {addresses: [10.0.0.3]}\n",
        );
        let other = slice(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: other, namespace: ml, labels: {kubernetes.io/service-name: other}}\naddressType: IPv4\nports: [{name: http, port: 9000}]\nendpoints: [{addresses: [10.9.9.9]}]\n",
        );
        let seen = Seen {
            services: vec![&svc],
            slices: Some(vec![&a, &other]),
            inference_services: None,
        };
        let (urls, errors) = resolve(&[m], &seen);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            urls["ml/llama"],
            ["http://10.0.0.1:8000/v1", "http://10.0.0.3:8000/v1"]
        );
    }

    #[test]
    fn unresolvable_backends_say_why() {
        let svc_model = model(
            "apiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata: {name: a}\nspec: {modelName: a, provider: openai-compatible, serviceRef: {name: vllm, port: 8000}}\n",
        );
        let isvc_model = model(
            "apiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata: {name: b}\nspec: {modelName: b, provider: openai-compatible, inferenceServiceRef: {name: llama}}\n",
        );
        let models = [svc_model, isvc_model];
        let (_, errors) = resolve(&models, &Seen::default());
        assert!(errors["default/a"].contains("EndpointSlices"), "{errors:?}");
        assert!(
            errors["default/b"].contains("KServe is not installed"),
            "{errors:?}"
        );
        let empty = Seen {
            slices: Some(vec![]),
            inference_services: Some(vec![]),
            ..Default::default()
        };
        let (_, errors) = resolve(&models, &empty);
        assert!(
            errors["default/a"].contains("no ready endpoints"),
            "{errors:?}"
        );
        assert!(errors["default/b"].contains("not found"), "{errors:?}");
    }

    #[test]
    fn an_inference_service_resolves_to_its_address() {
        let m = model(
            "apiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata: {name: b, namespace: ml}\nspec: {modelName: b, provider: openai-compatible, inferenceServiceRef: {name: llama}}\n",
        );
        let isvc: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": "llama", "namespace": "ml"},
            "status": {"url": "https://llama.ml.example.com", "address": {"url": "http://llama.ml.svc.cluster.local"}}
        }))
        .expect("an isvc");
        let seen = Seen {
            inference_services: Some(vec![&isvc]),
            ..Default::default()
        };
        let (urls, _) = resolve(&[m], &seen);
        assert_eq!(
            urls["ml/b"],
            ["http://llama.ml.svc.cluster.local/openai/v1"]
        );
    }
}
