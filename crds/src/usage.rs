//! The usage record: one per settled request, written by data-plane pods (to a local JSONL
//! file and to the Redis stream [`STREAM`]) and read back by the data plane at start-up and by
//! the operator, which folds it into the CRDs' status. It is the contract between the two.

use crate::config::TokenUsage;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The Redis stream usage records are appended to (`XADD`, fields `id` and `record`).
pub const STREAM: &str = "tollgate:usage";

/// One settled request.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct UsageRecord {
    /// Unique record id (not the client's request id, which clients may reuse).
    pub id: String,
    /// The request id (`x-request-id`).
    pub request_id: String,
    /// Unix time, milliseconds.
    pub ts_ms: u64,
    /// VirtualKey `namespace/name`.
    pub key: Arc<str>,
    /// The key's team.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// Public model name.
    pub model: Arc<str>,
    /// Deployment (LLMModel `namespace/name`).
    pub deployment: Arc<str>,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Cached prompt tokens.
    pub cached_tokens: u64,
    /// Cost in picodollars.
    pub cost_pico: u64,
    /// `success`, `upstream_error`, `client_gone`, `rejected`, `shutdown`.
    pub outcome: String,
    /// Where the token counts come from: the upstream's report, or the gateway's estimate (the
    /// upstream did work and reported no usage: a stream cut before its usage chunk, a client
    /// that left, a timeout after the request was sent).
    #[serde(default)]
    pub usage_source: UsageSource,
    /// How many requests this record stands for: 1, except in the rows a compaction of the
    /// usage log writes, each the sum of one subject's records in a time bucket (their
    /// `outcome` is `compacted`). Left out when 1.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub requests: u64,
}

fn one() -> u64 {
    1
}

fn is_one(n: &u64) -> bool {
    *n == 1
}

/// Where a record's token counts come from.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    /// The upstream's usage.
    #[default]
    Reported,
    /// The gateway's estimate: prompt tokens from its tokenizer, completion tokens from the
    /// text it relayed.
    Estimated,
}

impl UsageSource {
    /// The name used in records, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Reported => "reported",
            UsageSource::Estimated => "estimated",
        }
    }
}

impl UsageRecord {
    /// The usage of this record.
    pub fn usage(&self) -> TokenUsage {
        TokenUsage {
            prompt: self.prompt_tokens,
            completion: self.completion_tokens,
            cached: self.cached_tokens,
        }
    }
}
