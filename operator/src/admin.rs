//! The LiteLLM-compatible admin API in cluster mode, served by the operator (`--admin-addr`,
//! authorized by `--master-key`): `POST /key/generate`, `GET /key/info`, `GET /key/list`,
//! `POST /key/delete`, `GET /spend/keys`, `GET /spend/models`, `GET /spend/teams`.
//!
//! Why the operator and not the data plane: a generated key is a VirtualKey object and a
//! Secret, so serving the API means writing to the Kubernetes API, which the operator may do
//! and data-plane pods (whose RBAC is read-only on their own namespace) may not. Keys made here
//! are ordinary VirtualKeys (annotated `tollgate.dev/generated-by: admin-api`), served by the
//! data plane like any other within the usual second, and visible to `kubectl` and GitOps
//! tooling; the Secret holds only the key's SHA-256 and is owned by the VirtualKey.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use tollgate_crds::admin::{self, GENERATED_BY};
use tollgate_crds::config::KeyHash;
use tollgate_crds::{GatewayConfig, LlmModel, VirtualKey};

/// What the admin API reads and writes.
#[derive(Clone)]
pub struct AdminState {
    /// The Kubernetes client.
    pub client: Client,
    /// SHA-256 of the master key.
    pub master: KeyHash,
    /// Namespace generated keys are created in.
    pub namespace: String,
    /// The last compiled config (key hashes → VirtualKey ids).
    pub config: Arc<RwLock<Arc<GatewayConfig>>>,
    /// VirtualKeys, for details and spend.
    pub keys: Store<VirtualKey>,
    /// LLMModels, for spend.
    pub models: Store<LlmModel>,
}

/// A JSON body (axum's `Json` is trimmed out of this build).
struct Json(Value);

impl IntoResponse for Json {
    fn into_response(self) -> Response {
        (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            self.0.to_string(),
        )
            .into_response()
    }
}

/// A refused admin request, as an OpenAI-shaped error.
struct Failure {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST => "invalid_request_error",
            _ => "api_error",
        };
        let body = json!({"error": {"message": self.message, "type": kind, "param": null, "code": self.code}});
        (self.status, Json(body)).into_response()
    }
}

type ApiResult = Result<Json, Failure>;

/// The shared admin core's refusal, in this API's error shape.
fn refused(e: admin::AdminError) -> Failure {
    error(
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
        e.code,
        e.message,
    )
}

fn error(status: StatusCode, code: &'static str, message: impl Into<String>) -> Failure {
    Failure {
        status,
        code,
        message: message.into(),
    }
}

fn bad(code: &'static str, message: impl Into<String>) -> Failure {
    error(StatusCode::BAD_REQUEST, code, message)
}

impl AdminState {
    fn authorize(&self, headers: &HeaderMap) -> Result<(), Failure> {
        let presented = admin::presented_key(
            headers.get("authorization").map(|v| v.as_bytes()),
            headers.get("x-api-key").map(|v| v.as_bytes()),
        );
        admin::authorize(&self.master, presented).map_err(refused)
    }

    fn config(&self) -> Arc<GatewayConfig> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The VirtualKey id of a key or of its token (the hex SHA-256).
    fn find(&self, key_or_token: &str) -> Option<String> {
        let config = self.config();
        admin::find(&config.keys, key_or_token).map(|k| k.id.clone())
    }

    fn object(&self, id: &str) -> Option<Arc<VirtualKey>> {
        let (ns, name) = id.split_once('/')?;
        self.keys.get(&ObjectRef::new(name).within(ns))
    }

    fn info(&self, id: &str) -> Value {
        let config = self.config();
        let spend = self
            .object(id)
            .and_then(|o| o.status.as_ref()?.spend.clone());
        let spend = admin::KeySpend {
            total_usd: spend.as_ref().map_or(0.0, |s| usd(&s.total_usd)),
            current_period_usd: spend.map(|s| s.current_period_usd),
            requests: None,
        };
        match config.keys.iter().find(|k| k.id == id) {
            Some(c) => admin::key_info(c, &spend),
            None => json!({"tollgate_id": id, "spend": spend.total_usd}),
        }
    }
}

/// The admin routes.
pub fn router(state: AdminState) -> axum::Router {
    axum::Router::new()
        .route("/key/generate", post(generate))
        .route("/key/info", get(info))
        .route("/key/list", get(list))
        .route("/key/delete", post(delete))
        .route("/spend/keys", get(|s, h| spend(s, h, "keys")))
        .route("/spend/models", get(|s, h| spend(s, h, "models")))
        .route("/spend/teams", get(|s, h| spend(s, h, "teams")))
        .with_state(state)
}

async fn generate(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult {
    s.authorize(&headers)?;
    let req = admin::parse_generate(&body).map_err(refused)?;
    let now = jiff::Timestamp::now().as_second();
    let g = admin::build(req, &s.namespace, now).map_err(refused)?;
    if s.config().keys.iter().any(|k| k.hash == g.hash) {
        return Err(bad("key_exists", "That key is already in use."));
    }
    let vk: VirtualKey = serde_json::from_value(g.virtual_key).map_err(|e| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            e.to_string(),
        )
    })?;
    let api: Api<VirtualKey> = Api::namespaced(s.client.clone(), &s.namespace);
    let created = api.create(&PostParams::default(), &vk).await.map_err(|e| {
        error(
            StatusCode::BAD_GATEWAY,
            "kubernetes_error",
            format!("Creating the VirtualKey failed: {e}"),
        )
    })?;
    // The Secret is owned by its VirtualKey: deleting the key deletes it.
    let mut secret: Secret = serde_json::from_value(g.secret).map_err(|e| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            e.to_string(),
        )
    })?;
    secret.metadata.owner_references = created.controller_owner_ref(&()).map(|o| vec![o]);
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), &s.namespace);
    if let Err(e) = secrets.create(&PostParams::default(), &secret).await {
        let _ = api
            .delete(&created.name_any(), &DeleteParams::default())
            .await;
        return Err(error(
            StatusCode::BAD_GATEWAY,
            "kubernetes_error",
            format!("Creating the key's Secret failed: {e}"),
        ));
    }
    tracing::info!(virtual_key = g.id, "admin API generated a key");
    Ok(Json(g.response))
}

async fn info(State(s): State<AdminState>, headers: HeaderMap, uri: axum::http::Uri) -> ApiResult {
    s.authorize(&headers)?;
    let q: BTreeMap<&str, &str> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let wanted = q
        .get("key")
        .ok_or_else(|| bad("missing_key", "Pass the key (or its token) as ?key=."))?;
    let id = s
        .find(wanted)
        .ok_or_else(|| error(StatusCode::NOT_FOUND, "key_not_found", "No such key."))?;
    Ok(Json(admin::info_response(wanted, s.info(&id))))
}

async fn list(State(s): State<AdminState>, headers: HeaderMap) -> ApiResult {
    s.authorize(&headers)?;
    let config = s.config();
    Ok(Json(admin::list_response(
        config.keys.iter().map(|k| s.info(&k.id)).collect(),
    )))
}

async fn delete(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult {
    s.authorize(&headers)?;
    let ids = admin::to_delete(&s.config().keys, &body).map_err(refused)?;
    // Only keys made here: the others belong to whoever applied them (kubectl, GitOps).
    for id in &ids {
        let generated = s.object(id).is_some_and(|o| {
            o.meta()
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(GENERATED_BY))
        });
        if !generated {
            return Err(bad(
                "key_not_generated",
                format!(
                    "VirtualKey {id} was not made by the admin API: delete it with kubectl (or in Git)."
                ),
            ));
        }
    }
    for id in &ids {
        let (ns, name) = id.split_once('/').unwrap_or(("default", id));
        let api: Api<VirtualKey> = Api::namespaced(s.client.clone(), ns);
        api.delete(name, &DeleteParams::default())
            .await
            .map_err(|e| {
                error(
                    StatusCode::BAD_GATEWAY,
                    "kubernetes_error",
                    format!("Deleting {id} failed: {e}"),
                )
            })?;
    }
    Ok(Json(json!({"deleted_keys": ids})))
}

fn usd(s: &str) -> f64 {
    s.parse().unwrap_or(0.0)
}

async fn spend(State(s): State<AdminState>, headers: HeaderMap, by: &str) -> ApiResult {
    s.authorize(&headers)?;
    let id_of = |ns: Option<String>, name: String| format!("{}/{name}", ns.unwrap_or_default());
    let rows: Vec<Value> = match by {
        "keys" => s
            .keys
            .state()
            .iter()
            .map(|k| {
                let sp = k.status.as_ref().and_then(|st| st.spend.clone());
                json!({
                    "key": id_of(k.namespace(), k.name_any()),
                    "team_id": k.spec.team,
                    "spend": sp.as_ref().map_or(0.0, |x| usd(&x.total_usd)),
                    "spend_current_period": sp.map(|x| x.current_period_usd),
                })
            })
            .collect(),
        "models" => s
            .models
            .state()
            .iter()
            .map(|m| {
                let sp = m
                    .status
                    .as_ref()
                    .and_then(|st| st.spend.clone())
                    .unwrap_or_default();
                json!({
                    "model": m.spec.model_name,
                    "deployment": id_of(m.namespace(), m.name_any()),
                    "spend": usd(&sp.total_usd),
                    "requests": sp.requests,
                    "prompt_tokens": sp.prompt_tokens,
                    "completion_tokens": sp.completion_tokens,
                })
            })
            .collect(),
        _ => {
            let keys = s.keys.state();
            let spent: Vec<(String, tollgate_crds::config::Picodollars)> = keys
                .iter()
                .filter_map(|k| {
                    let team = k.spec.team.clone()?;
                    let sp = k.status.as_ref()?.spend.as_ref()?;
                    let pico = tollgate_crds::config::Picodollars::from_usd(usd(&sp.total_usd))?;
                    Some((team, pico))
                })
                .collect();
            return Ok(Json(admin::spend_by_team(
                spent.iter().map(|(t, p)| (t.as_str(), *p)),
            )));
        }
    };
    Ok(Json(Value::Array(rows)))
}
