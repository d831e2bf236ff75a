//! The admin API, LiteLLM-compatible where it overlaps: `POST /key/generate`, `GET /key/info`,
//! `GET /key/list`, `POST /key/delete`, `GET /spend/keys`, `GET /spend/models`,
//! `GET /spend/teams`, authorized by the master key (`--master-key`).
//!
//! Standalone, a generated key becomes a VirtualKey and a Secret in the generated-keys file the
//! loader reads with the manifests ([`crate::config::loader::keys_file_for`]), so it survives restarts
//! and goes through the same validation as a hand-written key. The Secret holds only the key's
//! SHA-256 (`keySha256`): the key itself is shown once, in the response, and stored nowhere.

use crate::api::error::ApiError;
use crate::gateway::state::AppState;
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use subtle::ConstantTimeEq;
use tollgate_crds::config::{KeyHash, Picodollars};

/// Admin settings.
#[derive(Debug)]
pub(crate) struct Admin {
    master: KeyHash,
    manifests: PathBuf,
    keys_file: PathBuf,
    /// Serializes writes of the keys file.
    write: tokio::sync::Mutex<()>,
}

impl Admin {
    /// Admin API with `master_key`, storing keys beside `manifests`.
    pub(crate) fn new(master_key: &str, manifests: PathBuf) -> Self {
        let keys_file = crate::config::loader::keys_file_for(&manifests);
        Self {
            master: KeyHash::of(master_key),
            manifests,
            keys_file,
            write: tokio::sync::Mutex::new(()),
        }
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let presented = crate::gateway::auth::presented_key(headers).ok_or_else(|| {
            ApiError::unauthorized(
                "missing_api_key",
                "The admin API needs the master key as `Authorization: Bearer <key>`.",
            )
        })?;
        if bool::from(KeyHash::of(presented).0.ct_eq(&self.master.0)) {
            Ok(())
        } else {
            Err(ApiError::unauthorized(
                "invalid_api_key",
                "Only the master key may use the admin API.",
            ))
        }
    }
}

/// What an admin request is served with.
#[derive(Clone)]
pub(crate) struct Ctx {
    /// The gateway's state (its config, ledger and limits).
    pub(crate) state: std::sync::Arc<AppState>,
    /// The admin API's settings, when it is on.
    pub(crate) admin: Option<std::sync::Arc<Admin>>,
}

impl Ctx {
    /// Checks an admin request's master key from its headers alone: handlers call it before
    /// they read a body, so that a client without the key can't make the gateway read (and
    /// hold) one.
    pub(crate) fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        admin(self, headers).map(|_| ())
    }
}

fn admin<'a>(ctx: &'a Ctx, headers: &HeaderMap) -> Result<&'a Admin, ApiError> {
    let a = ctx.admin.as_deref().ok_or_else(|| {
        let mut e = ApiError::bad_request("admin_disabled", "The admin API is off: start the data plane with --master-key (or TOLLGATE_MASTER_KEY).");
        e.status = StatusCode::NOT_FOUND;
        e
    })?;
    a.authorize(headers)?;
    Ok(a)
}

pub(crate) use tollgate_crds::admin::GenerateRequest;

/// The generated keys file as documents (one JSON object each; JSON is YAML). A file that
/// can't be read whole is an error, never an empty list: rewriting it from a partial read would
/// drop the keys already in it.
fn read_docs(path: &std::path::Path) -> Result<Vec<Value>, ApiError> {
    let unreadable = |why: String| {
        ApiError::internal(format!(
            "The generated keys file {} can't be read ({why}); the admin API won't change keys until it is fixed or removed.",
            path.display()
        ))
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(unreadable(e.to_string())),
    };
    text.split("\n---\n")
        .map(str::trim)
        .filter(|d| !d.is_empty() && !d.lines().all(|l| l.trim_start().starts_with('#')))
        .map(|d| serde_json::from_str(d).map_err(|e| unreadable(e.to_string())))
        .collect()
}

fn write_docs(path: &std::path::Path, docs: &[Value]) -> std::io::Result<()> {
    let mut out =
        String::from("# Keys made through the admin API (POST /key/generate). Edit with care.\n");
    for d in docs {
        out.push_str("---\n");
        out.push_str(&d.to_string());
        out.push('\n');
    }
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, out)?;
    std::fs::rename(&tmp, path)
}

/// Writes `docs`, reloads, and restores the previous file if the result doesn't compile.
async fn commit(state: &AppState, a: &Admin, docs: Vec<Value>) -> Result<(), ApiError> {
    let previous = std::fs::read(&a.keys_file).ok();
    write_docs(&a.keys_file, &docs)
        .map_err(|e| ApiError::internal(format!("writing the keys file failed: {e}")))?;
    let manifests = a.manifests.clone();
    let loaded = tokio::task::spawn_blocking(move || crate::config::loader::load(&manifests))
        .await
        .map_err(|_| ApiError::internal("reload failed"))?;
    match loaded {
        Ok(config) => state
            .install(&config)
            .map_err(|e| ApiError::internal(e.to_string())),
        Err(errors) => {
            let _ = match previous {
                Some(p) => std::fs::write(&a.keys_file, p),
                None => std::fs::remove_file(&a.keys_file),
            };
            Err(ApiError::bad_request(
                "invalid_key_request",
                errors.join("; "),
            ))
        }
    }
}

/// `POST /key/generate`.
pub(crate) async fn generate(
    ctx: &Ctx,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Value, ApiError> {
    let a = admin(ctx, headers)?;
    let state = &*ctx.state;
    let req: GenerateRequest = if body.iter().all(u8::is_ascii_whitespace) {
        GenerateRequest::default()
    } else {
        serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(
                "invalid_json",
                format!("Invalid /key/generate request: {e}."),
            )
        })?
    };
    let g = tollgate_crds::admin::build(req, "default", crate::rt::clock::unix_secs() as i64)
        .map_err(|e| ApiError::bad_request(e.code, e.message))?;
    let _guard = a.write.lock().await;
    if state.snapshot.load().keys.contains_key(&g.hash) {
        return Err(ApiError::bad_request(
            "key_exists",
            "That key is already in use.",
        ));
    }
    let mut docs = read_docs(&a.keys_file)?;
    docs.push(g.virtual_key);
    docs.push(g.secret);
    commit(state, a, docs).await?;
    Ok(g.response)
}

use tollgate_crds::admin::abbreviate;

/// Looks a key up by the key itself or its hash (`token`).
fn find_key(
    state: &AppState,
    key_or_token: &str,
) -> Option<std::sync::Arc<crate::config::snapshot::RuntimeKey>> {
    let snap = state.snapshot.load();
    if let Some(k) = snap.keys.get(&KeyHash::of(key_or_token)) {
        return Some(k.clone());
    }
    serde_json::from_value::<KeyHash>(json!(key_or_token))
        .ok()
        .and_then(|h| snap.keys.get(&h).cloned())
}

fn key_info(k: &crate::config::snapshot::RuntimeKey) -> Value {
    let c = &k.config;
    let period_spend = k
        .limits
        .as_ref()
        .map(|l| l.period_spend(crate::rt::clock::unix_secs()).to_string());
    json!({
        "token": serde_json::to_value(c.hash).unwrap_or_default(),
        "tollgate_id": c.id,
        "key_alias": c.alias,
        "team_id": c.team,
        "models": c.models,
        "spend": usd(k.usage.spend()),
        "spend_current_period": period_spend,
        "max_budget": c.budget.as_ref().map(|b| usd(b.max)),
        "rpm_limit": c.limits.rpm,
        "tpm_limit": c.limits.tpm,
        "max_parallel_requests": c.limits.max_parallel,
        "expires": c.expires_at.and_then(|t| jiff::Timestamp::from_second(t).ok()).map(|t| t.to_string()),
        "requests": k.usage.requests.load(Relaxed),
    })
}

fn usd(p: Picodollars) -> f64 {
    p.to_string().parse().unwrap_or(0.0)
}

/// `GET /key/info?key=...`.
pub(crate) fn info(
    ctx: &Ctx,
    headers: &HeaderMap,
    query: &BTreeMap<String, String>,
) -> Result<Value, ApiError> {
    admin(ctx, headers)?;
    let state = &*ctx.state;
    let wanted = query.get("key").ok_or_else(|| {
        ApiError::bad_request("missing_key", "Pass the key (or its token) as ?key=.")
    })?;
    let k = find_key(state, wanted).ok_or_else(|| {
        let mut e = ApiError::bad_request("key_not_found", "No such key.");
        e.status = StatusCode::NOT_FOUND;
        e
    })?;
    Ok(json!({"key": abbreviate(wanted), "info": key_info(&k)}))
}

/// `GET /key/list`.
pub(crate) fn list(ctx: &Ctx, headers: &HeaderMap) -> Result<Value, ApiError> {
    admin(ctx, headers)?;
    let state = &*ctx.state;
    let snap = state.snapshot.load();
    let mut keys: Vec<Value> = snap.keys.values().map(|k| key_info(k)).collect();
    keys.sort_by(|a, b| a["tollgate_id"].as_str().cmp(&b["tollgate_id"].as_str()));
    let tokens: Vec<Value> = keys.iter().map(|k| k["token"].clone()).collect();
    Ok(json!({"keys": tokens, "total_count": tokens.len(), "details": keys}))
}

#[derive(Deserialize)]
struct DeleteRequest {
    #[serde(default)]
    keys: Vec<String>,
    #[serde(default)]
    key_aliases: Vec<String>,
}

/// `POST /key/delete`: only keys made through the admin API; manifest keys are edited in the
/// manifests.
pub(crate) async fn delete(ctx: &Ctx, headers: &HeaderMap, body: &[u8]) -> Result<Value, ApiError> {
    let a = admin(ctx, headers)?;
    let state = &*ctx.state;
    let req: DeleteRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request("invalid_json", format!("Invalid /key/delete request: {e}."))
    })?;
    let mut ids = Vec::new();
    for k in &req.keys {
        let found = find_key(state, k).ok_or_else(|| {
            ApiError::bad_request("key_not_found", format!("No such key: {}.", abbreviate(k)))
        })?;
        ids.push(found.config.id.clone());
    }
    for alias in &req.key_aliases {
        let snap = state.snapshot.load();
        let found = snap
            .keys
            .values()
            .find(|k| k.config.alias.as_deref() == Some(alias))
            .ok_or_else(|| {
                ApiError::bad_request("key_not_found", format!("No key has alias {alias:?}."))
            })?;
        ids.push(found.config.id.clone());
    }
    let _guard = a.write.lock().await;
    let mut docs = read_docs(&a.keys_file)?;
    let mut deleted = Vec::new();
    for id in &ids {
        let name = id.strip_prefix("default/").unwrap_or(id);
        let before = docs.len();
        docs.retain(|d| {
            let n = d["metadata"]["name"].as_str().unwrap_or("");
            n != name && n != format!("{name}-key")
        });
        if docs.len() == before {
            return Err(ApiError::bad_request(
                "key_not_generated",
                format!(
                    "VirtualKey {id} is defined in the manifests, not by the admin API: delete it there."
                ),
            ));
        }
        deleted.push(id.clone());
    }
    commit(state, a, docs).await?;
    Ok(json!({"deleted_keys": deleted}))
}

/// `GET /spend/keys`, `/spend/models`, `/spend/teams`.
pub(crate) fn spend(ctx: &Ctx, headers: &HeaderMap, by: &str) -> Result<Value, ApiError> {
    admin(ctx, headers)?;
    let state = &*ctx.state;
    let snap = state.snapshot.load();
    let teams: BTreeMap<&str, &str> = snap
        .keys
        .values()
        .filter_map(|k| k.config.team.as_deref().map(|t| (k.config.id.as_str(), t)))
        .collect();
    let rows: Vec<Value> = match by {
        "keys" => state
            .ledger
            .keys()
            .into_iter()
            .map(|(id, c)| json!({"key": id, "team_id": teams.get(id.as_str()), "spend": usd(c.spend()), "requests": c.requests.load(Relaxed), "prompt_tokens": c.prompt_tokens.load(Relaxed), "completion_tokens": c.completion_tokens.load(Relaxed)}))
            .collect(),
        "models" => {
            let mut by_model: BTreeMap<String, (u64, u64, u64, u64)> = BTreeMap::new();
            for ((model, _), c) in state.ledger.deployments() {
                let e = by_model.entry(model).or_default();
                e.0 += c.spend.load(Relaxed);
                e.1 += c.requests.load(Relaxed);
                e.2 += c.prompt_tokens.load(Relaxed);
                e.3 += c.completion_tokens.load(Relaxed);
            }
            by_model
                .into_iter()
                .map(|(m, (s, r, p, c))| json!({"model": m, "spend": usd(Picodollars(s)), "requests": r, "prompt_tokens": p, "completion_tokens": c}))
                .collect()
        }
        _ => {
            let mut by_team: BTreeMap<&str, u64> = BTreeMap::new();
            for (id, c) in state.ledger.keys() {
                if let Some(t) = teams.get(id.as_str()) {
                    *by_team.entry(t).or_default() += c.spend.load(Relaxed);
                }
            }
            by_team.into_iter().map(|(t, s)| json!({"team_id": t, "spend": usd(Picodollars(s))})).collect()
        }
    };
    Ok(Value::Array(rows))
}
