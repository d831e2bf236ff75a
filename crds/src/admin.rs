//! The LiteLLM-compatible `/key/generate` request, and the VirtualKey and Secret it becomes:
//! shared by the standalone data plane (which writes them to its generated-keys file) and the
//! operator (which creates them in the cluster), so both accept the same requests and produce
//! the same objects. The Secret holds only the key's SHA-256 (`keySha256`); the key itself is in
//! the response, once.

use crate::compile::{KEY_SHA256, MIN_VIRTUAL_KEY_LEN};
use crate::config::KeyHash;
use serde::Deserialize;
use serde_json::{Value, json};

/// Annotation marking objects the admin API wrote.
pub const GENERATED_BY: &str = "tollgate.dev/generated-by";

/// A refused admin request: an error code and a message for the client.
#[derive(Debug)]
pub struct AdminError {
    /// OpenAI-style error code.
    pub code: &'static str,
    /// What is wrong.
    pub message: String,
}

fn err(code: &'static str, message: impl Into<String>) -> AdminError {
    AdminError {
        code,
        message: message.into(),
    }
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
