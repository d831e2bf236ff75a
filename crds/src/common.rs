//! Types shared by more than one CRD: limits, secret references, durations, conditions.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Request and token rate limits. Every field is optional; an absent field means no limit.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Requests per minute.
    #[schemars(range(min = 1))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// Tokens (prompt + completion) per minute.
    #[schemars(range(min = 1))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    #[schemars(range(min = 1))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<u32>,
}

/// A key in a `v1/Secret` in the same namespace as the referring object.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key within the Secret's data. Defaults to the referring field's documented default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// Condition types used on Tollgate resources, defined once.
pub mod condition {
    /// The object compiled and is part of the served configuration.
    pub const READY: &str = "Ready";
    /// The RoutePolicy was accepted.
    pub const ACCEPTED: &str = "Accepted";
    /// Every reference (Secrets, models, Services) resolved.
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
    /// The backend (URL, Service endpoints, InferenceService) resolved.
    pub const BACKEND_RESOLVED: &str = "BackendResolved";
    /// The VirtualKey's budget for the current period is spent.
    pub const BUDGET_EXCEEDED: &str = "BudgetExceeded";
    /// The VirtualKey is past `expiresAt`.
    pub const EXPIRED: &str = "Expired";
}

/// Parses a duration written as Kubernetes users write them (`500ms`, `30s`, `5m`, `1h`).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}"))
}
