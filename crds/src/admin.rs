//! The LiteLLM-compatible `/key/generate` request, and the VirtualKey and Secret it becomes:
//! shared by the standalone data plane (which writes them to its generated-keys file) and the
//! operator (which creates them in the cluster), so both accept the same requests and produce
//! the same objects. The Secret holds only the key's SHA-256 (`keySha256`); the key itself is in
//! the response, once.

use crate::compile::{KEY_SHA256, MIN_VIRTUAL_KEY_LEN};
use crate::config::{KeyConfig, KeyHash, Picodollars};
use serde::Deserialize;
use serde_json::{Value, json};

/// Annotation marking objects the admin API wrote.
pub const GENERATED_BY: &str = "tollgate.dev/generated-by";

/// A refused admin request: an HTTP status, an error code and a message for the client. Each
/// process renders it in OpenAI's error shape.
#[derive(Debug)]
pub struct AdminError {
    /// HTTP status: 400, 401 (no or wrong master key), 404 (`/key/info` of an unknown key),
    /// 500.
    pub status: u16,
    /// OpenAI-style error code.
    pub code: &'static str,
    /// What is wrong.
    pub message: String,
}

fn err(code: &'static str, message: impl Into<String>) -> AdminError {
    AdminError {
        status: 400,
        code,
        message: message.into(),
    }
}

/// What both admin APIs (the standalone data plane's, the operator's) share: the master key
/// check, parsing the requests, finding keys, and the JSON of a key, a list and spend by team.
/// Each process keeps only where keys live (a keys file, or VirtualKey objects) and where spend
/// comes from (its ledger, or the objects' status).
///
/// Checks the key an admin request presents (`Authorization: Bearer`, or `x-api-key`, as the
/// gateway reads a virtual key) against the master key's hash, in constant time.
pub fn authorize(master: &KeyHash, presented: Option<&[u8]>) -> Result<(), AdminError> {
    let Some(presented) = presented else {
        return Err(AdminError {
            status: 401,
            ..err(
                "missing_api_key",
                "The admin API needs the master key as `Authorization: Bearer <key>`.",
            )
        });
    };
    let h = KeyHash::of(presented);
    // Every byte compared, whatever the first difference.
    let diff = h.0.iter().zip(master.0).fold(0u8, |d, (a, b)| d | (a ^ b));
    if diff == 0 {
        Ok(())
    } else {
        Err(AdminError {
            status: 401,
            ..err(
                "invalid_api_key",
                "Only the master key may use the admin API.",
            )
        })
    }
}

/// The key a request presents: `Authorization: Bearer <key>` (the scheme in any case), else
/// `x-api-key` (as Anthropic's clients send it), each trimmed; `None` if neither has one. How
/// the gateway reads a virtual key and both admin APIs the master key.
#[inline]
pub fn presented_key<'a>(
    authorization: Option<&'a [u8]>,
    api_key: Option<&'a [u8]>,
) -> Option<&'a [u8]> {
    if let Some(v) = authorization {
        let v = v.trim_ascii();
        let (scheme, rest) = match v.iter().position(|&b| b == b' ') {
            Some(i) => (&v[..i], v[i + 1..].trim_ascii()),
            None => (v, &[][..]),
        };
        if scheme.eq_ignore_ascii_case(b"bearer") && !rest.is_empty() {
            return Some(rest);
        }
    }
    api_key.map(<[u8]>::trim_ascii).filter(|k| !k.is_empty())
}

/// A `/key/generate` body: empty (all defaults) or LiteLLM's JSON.
pub fn parse_generate(body: &[u8]) -> Result<GenerateRequest, AdminError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(GenerateRequest::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        err(
            "invalid_json",
            format!("Invalid /key/generate request: {e}."),
        )
    })
}

/// The key among `keys` that is `key_or_token`: the key itself, or its token (the hex SHA-256
/// that `/key/generate` and `/key/list` show).
pub fn find<'a>(
    keys: impl IntoIterator<Item = &'a KeyConfig>,
    key_or_token: &str,
) -> Option<&'a KeyConfig> {
    let by_key = KeyHash::of(key_or_token);
    let by_token = serde_json::from_value::<KeyHash>(json!(key_or_token)).ok();
    keys.into_iter()
        .find(|k| k.hash == by_key || Some(k.hash) == by_token)
}

/// LiteLLM's `/key/delete` request.
#[derive(Debug, Default, Deserialize)]
pub struct DeleteRequest {
    /// Keys (or their tokens).
    #[serde(default)]
    pub keys: Vec<String>,
    /// Key aliases.
    #[serde(default)]
    pub key_aliases: Vec<String>,
}

/// The ids (`namespace/name`) of the keys a `/key/delete` body names, all of which must exist.
pub fn to_delete<'a>(
    keys: impl IntoIterator<Item = &'a KeyConfig> + Clone,
    body: &[u8],
) -> Result<Vec<String>, AdminError> {
    let req: DeleteRequest = serde_json::from_slice(body)
        .map_err(|e| err("invalid_json", format!("Invalid /key/delete request: {e}.")))?;
    let mut ids = Vec::new();
    for k in &req.keys {
        let found = find(keys.clone(), k)
            .ok_or_else(|| err("key_not_found", format!("No such key: {}.", abbreviate(k))))?;
        ids.push(found.id.clone());
    }
    for alias in &req.key_aliases {
        let found = keys
            .clone()
            .into_iter()
            .find(|k| k.alias.as_deref() == Some(alias))
            .ok_or_else(|| err("key_not_found", format!("No key has alias {alias:?}.")))?;
        ids.push(found.id.clone());
    }
    Ok(ids)
}

/// What a process knows of a key's spend.
#[derive(Debug, Default)]
pub struct KeySpend {
    /// Total, in USD.
    pub total_usd: f64,
    /// In the budget's current period, in USD as written (exact), when the key has a budget.
    pub current_period_usd: Option<String>,
    /// Requests served, when the process counts them.
    pub requests: Option<u64>,
}

/// A key as `/key/info` and `/key/list` show it (LiteLLM's field names; no secret).
pub fn key_info(c: &KeyConfig, spend: &KeySpend) -> Value {
    let mut info = json!({
        "token": serde_json::to_value(c.hash).unwrap_or_default(),
        "tollgate_id": c.id,
        "key_alias": c.alias,
        "team_id": c.team,
        "models": c.models,
        "spend": spend.total_usd,
        "spend_current_period": spend.current_period_usd,
        "max_budget": c.budget.as_ref().map(|b| usd(b.max)),
        "rpm_limit": c.limits.rpm,
        "tpm_limit": c.limits.tpm,
        "max_parallel_requests": c.limits.max_parallel,
        "expires": c.expires_at.and_then(|t| jiff::Timestamp::from_second(t).ok()).map(|t| t.to_string()),
    });
    if let Some(r) = spend.requests {
        info["requests"] = json!(r);
    }
    info
}

/// The `/key/info` answer for `wanted` (as the client wrote it), whose key is `info`.
pub fn info_response(wanted: &str, info: Value) -> Value {
    json!({"key": abbreviate(wanted), "info": info})
}

/// The `/key/list` answer: the keys' tokens and their details, by id.
pub fn list_response(mut details: Vec<Value>) -> Value {
    details.sort_by(|a, b| a["tollgate_id"].as_str().cmp(&b["tollgate_id"].as_str()));
    let tokens: Vec<Value> = details.iter().map(|k| k["token"].clone()).collect();
    json!({"keys": tokens, "total_count": tokens.len(), "details": details})
}

/// `/spend/teams`: spend summed by team, exact, from `(team, spend)` per key.
pub fn spend_by_team<'a>(keys: impl IntoIterator<Item = (&'a str, Picodollars)>) -> Value {
    let mut teams: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
    for (team, p) in keys {
        let t = teams.entry(team).or_default();
        *t = t.saturating_add(p.0);
    }
    Value::Array(
        teams
            .into_iter()
            .map(|(t, p)| json!({"team_id": t, "spend": usd(Picodollars(p))}))
            .collect(),
    )
}

/// Pico-dollars as a JSON number of USD.
pub fn usd(p: Picodollars) -> f64 {
    p.to_string().parse().unwrap_or(0.0)
}

/// LiteLLM's `/key/generate` request.
#[derive(Debug, Default, Deserialize)]
pub struct GenerateRequest {
    /// A key to use instead of a generated one.
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub key_alias: Option<String>,
    #[serde(default)]
    pub team_id: Option<String>,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub max_budget: Option<f64>,
    #[serde(default)]
    pub budget_duration: Option<String>,
    #[serde(default)]
    pub rpm_limit: Option<u64>,
    #[serde(default)]
    pub tpm_limit: Option<u64>,
    #[serde(default)]
    pub max_parallel_requests: Option<u32>,
    /// Lifetime of the key, e.g. `30d`.
    #[serde(default)]
    pub duration: Option<String>,
    /// Expiry as an RFC 3339 time (alternative to `duration`).
    #[serde(default)]
    pub expires: Option<String>,
    /// Accepted and ignored (LiteLLM clients send them).
    #[serde(default, rename = "metadata")]
    _metadata: Option<Value>,
    #[serde(default, rename = "user_id")]
    _user_id: Option<String>,
}

/// A key ready to store: the objects to create and the response to send.
#[derive(Debug)]
pub struct Generated {
    /// The key's hash.
    pub hash: KeyHash,
    /// `namespace/name` of the VirtualKey.
    pub id: String,
    /// The VirtualKey object (JSON).
    pub virtual_key: Value,
    /// The Secret object (JSON) holding the key's SHA-256 only.
    pub secret: Value,
    /// The `/key/generate` response (the only place the key appears).
    pub response: Value,
}

/// Prefix of generated keys, so that they are recognisable in a leak scan.
pub const GENERATED_PREFIX: &str = "sk-tg-";

/// A new virtual key: [`GENERATED_PREFIX`] and 32 random bytes (256 bits) in hex. The one key
/// generator: the admin API of either process and the operator's keys for VirtualKeys that
/// name no Secret all use it.
pub fn new_key() -> Result<String, AdminError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| err("internal_error", format!("no randomness available: {e}")))?;
    let mut key = String::with_capacity(GENERATED_PREFIX.len() + 64);
    key.push_str(GENERATED_PREFIX);
    for b in bytes {
        key.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        key.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    Ok(key)
}

/// Builds the VirtualKey and Secret for `req` in `namespace` (`now`: Unix seconds), with a
/// [`new_key`] when the request brings none.
pub fn build(req: GenerateRequest, namespace: &str, now: i64) -> Result<Generated, AdminError> {
    let key = match req.key {
        Some(k) if k.len() >= MIN_VIRTUAL_KEY_LEN => k,
        Some(_) => {
            return Err(err(
                "invalid_key",
                format!("`key` must be at least {MIN_VIRTUAL_KEY_LEN} characters."),
            ));
        }
        None => new_key()?,
    };
    let hash = KeyHash::of(&key);
    let expires_at = match (&req.duration, &req.expires) {
        (Some(d), _) => {
            let d = crate::common::parse_duration(d).map_err(|e| err("invalid_duration", e))?;
            Some(now + d.as_secs() as i64)
        }
        (None, Some(t)) => Some(
            t.parse::<jiff::Timestamp>()
                .map_err(|e| {
                    err(
                        "invalid_expires",
                        format!("`expires` must be an RFC 3339 time: {e}."),
                    )
                })?
                .as_second(),
        ),
        (None, None) => None,
    };
    let expires_rfc3339 = expires_at
        .map(|t| jiff::Timestamp::from_second(t).map(|t| t.to_string()))
        .transpose()
        .map_err(|_| err("invalid_duration", "The expiry is out of range."))?;
    let name = format!("generated-{}", hash.short_id());
    let mut spec = serde_json::Map::new();
    spec.insert("secretRef".into(), json!({"name": format!("{name}-key")}));
    if !req.models.is_empty() {
        spec.insert("models".into(), json!(req.models));
    }
    if let Some(t) = &req.team_id {
        spec.insert("team".into(), json!(t));
    }
    if let Some(al) = &req.key_alias {
        spec.insert("alias".into(), json!(al));
    }
    if let Some(max) = req.max_budget {
        let mut b = json!({"maxUsd": max});
        if let Some(d) = &req.budget_duration {
            b["duration"] = json!(d);
        }
        spec.insert("budget".into(), b);
    }
    let mut limits = serde_json::Map::new();
    if let Some(v) = req.rpm_limit {
        limits.insert("rpm".into(), json!(v));
    }
    if let Some(v) = req.tpm_limit {
        limits.insert("tpm".into(), json!(v));
    }
    if let Some(v) = req.max_parallel_requests {
        limits.insert("maxParallel".into(), json!(v));
    }
    if !limits.is_empty() {
        spec.insert("limits".into(), Value::Object(limits));
    }
    if let Some(t) = &expires_rfc3339 {
        spec.insert("expiresAt".into(), json!(t));
    }
    let meta =
        json!({"name": name, "namespace": namespace, "annotations": {GENERATED_BY: "admin-api"}});
    let vk = json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": "VirtualKey", "metadata": meta, "spec": spec});
    let secret_hex = serde_json::to_value(hash).unwrap_or_default();
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": format!("{name}-key"), "namespace": namespace, "annotations": {GENERATED_BY: "admin-api"}},
        "stringData": {(KEY_SHA256): secret_hex},
    });
    let response = json!({
        "key": key,
        "key_name": abbreviate(&key),
        "token": serde_json::to_value(hash).unwrap_or_default(),
        "key_alias": req.key_alias,
        "team_id": req.team_id,
        "models": req.models,
        "max_budget": req.max_budget,
        "budget_duration": req.budget_duration,
        "rpm_limit": req.rpm_limit,
        "tpm_limit": req.tpm_limit,
        "max_parallel_requests": req.max_parallel_requests,
        "expires": expires_rfc3339,
        "tollgate_id": format!("{namespace}/{name}"),
    });
    Ok(Generated {
        hash,
        id: format!("{namespace}/{name}"),
        virtual_key: vk,
        secret,
        response,
    })
}

/// `sk-...` and the last four characters: how a key is shown after its creation.
pub fn abbreviate(key: &str) -> String {
    let tail: String = key
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("sk-...{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_long_hex_and_distinct() {
        let (a, b) = (
            new_key().map_err(|e| e.message),
            new_key().map_err(|e| e.message),
        );
        let (a, b) = (a.unwrap_or_default(), b.unwrap_or_default());
        let hex = a.strip_prefix(GENERATED_PREFIX).unwrap_or_default();
        assert_eq!(hex.len(), 64, "{a}");
        assert!(
            hex.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b);
        // A generated key is long enough to be a VirtualKey's.
        assert!(a.len() >= MIN_VIRTUAL_KEY_LEN);
    }
}
