//! `VirtualKey`: a client's API key, with the models it may use, its team, budget and limits.

use crate::common::{Limits, SecretKeyRef};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A virtual API key. The key itself lives in a Secret; only its SHA-256 hash is ever compared
/// or stored anywhere else.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "tollgate.dev",
    version = "v1alpha1",
    kind = "VirtualKey",
    plural = "virtualkeys",
    singular = "virtualkey",
    shortname = "vk",
    shortname = "vkey",
    category = "tollgate",
    namespaced,
    status = "VirtualKeyStatus",
    printcolumn = r#"{"name":"Team","type":"string","jsonPath":".spec.team"}"#,
    printcolumn = r#"{"name":"Spend","type":"string","jsonPath":".status.spend.currentPeriodUsd"}"#,
    printcolumn = r#"{"name":"Budget","type":"number","jsonPath":".spec.budget.maxUsd"}"#,
    printcolumn = r#"{"name":"Period","type":"string","jsonPath":".spec.budget.duration"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualKeySpec {
    /// The Secret key holding the API key clients send (default key: `key`). When absent, the
    /// operator generates a key into a Secret named after the VirtualKey.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
    /// Public model names this key may use. Empty: every model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// Team the key belongs to; keys of a team share the team's spend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// A human-readable name for the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Spend limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    /// Spend limit shared by every key of `team` (their spend adds up against it). Keys of one
    /// team that set it must set the same; it is enough that one key does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team_budget: Option<Budget>,
    /// Rate limits of this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// After this time (RFC 3339) the key is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
}

/// A spend limit that resets every period.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Budget {
    /// Maximum spend in USD per period.
    #[schemars(range(min = 0.0))]
    pub max_usd: f64,
    /// Period: `daily`, `weekly`, `monthly`, or a duration such as `30d` or `12h`. Absent: the
    /// budget never resets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
}

/// Observed state of a VirtualKey.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VirtualKeyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions: `Ready`, `BudgetExceeded`, `Expired`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The first characters of the SHA-256 of the key, to tell keys apart. Never the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Spend of this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend: Option<KeySpend>,
}

/// Spend of one key.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KeySpend {
    /// Spend in the current budget period, USD, as a decimal string (exact).
    pub current_period_usd: String,
    /// Spend since the key was created, USD, as a decimal string (exact).
    pub total_usd: String,
    /// When the current budget period ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_reset_at: Option<Time>,
}
