//! Cost accounting: usage counters per key and per deployment, how a request ended, the usage
//! log, and token counts. The [`crate::gateway::charge::Charge`] each request settles once
//! writes into these.
//!
//! Counters are atomics owned by a [`Ledger`] that outlives config reloads, so a reload never
//! resets spend; the snapshot holds `Arc`s to them so the hot path touches no map and no lock.

pub(crate) mod render;
pub mod tokens;
pub(crate) mod usage_log;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use tollgate_crds::config::{Picodollars, TokenUsage};

/// Usage totals of one key or deployment.
#[derive(Debug, Default)]
pub(crate) struct UsageCounters {
    /// Requests settled.
    pub(crate) requests: AtomicU64,
    /// Prompt tokens.
    pub(crate) prompt_tokens: AtomicU64,
    /// Completion tokens.
    pub(crate) completion_tokens: AtomicU64,
    /// Spend, pico-dollars.
    pub(crate) spend: AtomicU64,
}

impl UsageCounters {
    /// Adds one settled request.
    pub(crate) fn add(&self, usage: Option<TokenUsage>, cost: Picodollars) {
        self.requests.fetch_add(1, Relaxed);
        if let Some(u) = usage {
            self.prompt_tokens.fetch_add(u.prompt, Relaxed);
            self.completion_tokens.fetch_add(u.completion, Relaxed);
        }
        self.spend.fetch_add(cost.0, Relaxed);
    }

    /// Adds `requests` settled requests' usage and cost (read back from the usage log).
    pub(crate) fn add_many(&self, requests: u64, usage: TokenUsage, cost: Picodollars) {
        self.requests.fetch_add(requests, Relaxed);
        self.prompt_tokens.fetch_add(usage.prompt, Relaxed);
        self.completion_tokens.fetch_add(usage.completion, Relaxed);
        self.spend.fetch_add(cost.0, Relaxed);
    }

    /// Spend so far.
    pub(crate) fn spend(&self) -> Picodollars {
        Picodollars(self.spend.load(Relaxed))
    }
}

/// Counters by key id and by deployment id, kept across reloads.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    keys: Mutex<BTreeMap<String, Arc<UsageCounters>>>,
    deployments: Mutex<BTreeMap<(String, String), Arc<UsageCounters>>>,
}

impl Ledger {
    /// The counters of key `id` (created on first use). Called when a snapshot is built.
    pub(crate) fn key(&self, id: &str) -> Arc<UsageCounters> {
        let mut map = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(id.to_string()).or_default().clone()
    }

    /// The counters of deployment `id` of `model`.
    pub(crate) fn deployment(&self, model: &str, id: &str) -> Arc<UsageCounters> {
        let mut map = self.deployments.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((model.to_string(), id.to_string()))
            .or_default()
            .clone()
    }

    /// Every key's counters, by id.
    pub(crate) fn keys(&self) -> Vec<(String, Arc<UsageCounters>)> {
        let map = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Every deployment's counters, by (model, deployment id).
    pub(crate) fn deployments(&self) -> Vec<((String, String), Arc<UsageCounters>)> {
        let map = self.deployments.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// Set once a shutdown has cut the requests still running (see [`cutting`]).
static CUTTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a shutdown of this process has cut the requests still running: a request dropped
/// from then on was cut, not left by its client ([`Outcome::Shutdown`]). Process-wide, as
/// shutdown is.
pub(crate) fn cutting() -> bool {
    CUTTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Marks the requests still running as cut by shutdown (see [`cutting`]).
pub(crate) fn start_cutting() {
    CUTTING.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// How a proxied request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Served.
    Success,
    /// The upstream failed (error status, bad body, broken stream).
    UpstreamError,
    /// The client disconnected before the end.
    ClientGone,
    /// Cut by the gateway's shutdown (the shutdown timeout passed with it still running).
    Shutdown,
    /// The upstream refused the request as the client's error (HTTP 4xx).
    Rejected,
}

impl Outcome {
    /// The outcome of a request dropped before its end: [`Outcome::Shutdown`] once shutdown has
    /// cut the requests still running, else [`Outcome::ClientGone`].
    pub(crate) fn dropped() -> Self {
        if cutting() {
            Outcome::Shutdown
        } else {
            Outcome::ClientGone
        }
    }

    /// Metric label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::UpstreamError => "upstream_error",
            Outcome::ClientGone => "client_gone",
            Outcome::Shutdown => "shutdown",
            Outcome::Rejected => "rejected",
        }
    }
}
