//! The admin API, LiteLLM-compatible where it overlaps: `POST /key/generate`, `GET /key/info`,
//! `GET /key/list`, `POST /key/delete`, `GET /spend/keys`, `GET /spend/models`,
//! `GET /spend/teams`, authorized by the master key (`--master-key`).
//!
//! Standalone, a generated key becomes a VirtualKey and a Secret in the generated-keys file the
//! loader reads with the manifests ([`crate::config::loader::keys_file_for`]), so it survives restarts
//! and goes through the same validation as a hand-written key. The Secret holds only the key's
//! SHA-256 (`keySha256`): the key itself is shown once, in the response, and stored nowhere.

use crate::api::error::ApiError;
use crate::config::snapshot::RuntimeKey;
use crate::gateway::state::AppState;
use http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use tollgate_crds::admin;
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
        admin::authorize(&self.master, crate::gateway::auth::presented_key(headers))
            .map_err(refused)
    }
}

/// The shared admin core's refusal as the data plane's error.
fn refused(e: admin::AdminError) -> ApiError {
    let mut out = match e.status {
        401 => ApiError::unauthorized(e.code, e.message),
        500 => ApiError::internal(e.message),
        _ => ApiError::bad_request(e.code, e.message),
    };
    out.status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    out
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
    let req = admin::parse_generate(body).map_err(refused)?;
    let g = admin::build(req, "default", crate::rt::clock::unix_secs() as i64).map_err(refused)?;
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

/// A served key's spend, as the shared `/key/info` shape takes it.
fn key_spend(k: &RuntimeKey) -> admin::KeySpend {
    admin::KeySpend {
        total_usd: admin::usd(k.usage.spend()),
        current_period_usd: k
            .limits
            .as_ref()
            .map(|l| l.period_spend(crate::rt::clock::unix_secs()).to_string()),
        requests: Some(k.usage.requests.load(Relaxed)),
    }
}

/// The served key that is `key_or_token` (see [`admin::find`]).
fn find_key(state: &AppState, key_or_token: &str) -> Option<std::sync::Arc<RuntimeKey>> {
    let snap = state.snapshot.load();
    let c = admin::find(snap.keys.values().map(|k| &k.config), key_or_token)?;
    snap.keys.get(&c.hash).cloned()
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
    Ok(admin::info_response(
        wanted,
        admin::key_info(&k.config, &key_spend(&k)),
    ))
}

/// `GET /key/list`.
pub(crate) fn list(ctx: &Ctx, headers: &HeaderMap) -> Result<Value, ApiError> {
    admin(ctx, headers)?;
    let state = &*ctx.state;
    let snap = state.snapshot.load();
    Ok(admin::list_response(
        snap.keys
            .values()
            .map(|k| admin::key_info(&k.config, &key_spend(k)))
            .collect(),
    ))
}

/// `POST /key/delete`: only keys made through the admin API; manifest keys are edited in the
/// manifests.
pub(crate) async fn delete(ctx: &Ctx, headers: &HeaderMap, body: &[u8]) -> Result<Value, ApiError> {
    let a = admin(ctx, headers)?;
    let state = &*ctx.state;
    let ids = {
        let snap = state.snapshot.load();
        admin::to_delete(snap.keys.values().map(|k| &k.config), body).map_err(refused)?
    };
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
            .map(|(id, c)| json!({"key": id, "team_id": teams.get(id.as_str()), "spend": admin::usd(c.spend()), "requests": c.requests.load(Relaxed), "prompt_tokens": c.prompt_tokens.load(Relaxed), "completion_tokens": c.completion_tokens.load(Relaxed)}))
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
                .map(|(m, (s, r, p, c))| json!({"model": m, "spend": admin::usd(Picodollars(s)), "requests": r, "prompt_tokens": p, "completion_tokens": c}))
                .collect()
        }
        _ => {
            let keys = state.ledger.keys();
            return Ok(admin::spend_by_team(keys.iter().filter_map(|(id, c)| {
                Some((*teams.get(id.as_str())?, c.spend()))
            })));
        }
    };
    Ok(Value::Array(rows))
}
