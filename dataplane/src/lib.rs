//! Tollgate's data plane: an OpenAI-compatible gateway in front of OpenAI, vLLM, KServe and the
//! built-in mock, with virtual keys, limits, budgets, routing and cost accounting.
//!
//! Layers, from the top (a module may use its own layer and the ones below it, never one above;
//! `scripts/check-layers.py` holds CI to it, and `docs/architecture.md` says where each kind of
//! change goes):
//! - [`app`]: the composition root: flags, runtimes, background tasks, shutdown.
//! - [`http`]: listener, connections, routes, request ids.
//! - [`admin`]: the LiteLLM-compatible key and spend API.
//! - [`gateway`]: the request path, from an authenticated request to a relayed, settled response.
//! - [`config`]: the compiled config snapshot, and where it comes from (files or the cluster).
//! - [`routing`]: deployments and routes, strategies, endpoint health, retry policy, probes.
//! - [`limits`]: rate limits and budgets, local and in Redis.
//! - [`accounting`]: the usage ledger, usage records and log, token counts.
//! - [`upstream`]: the pooled HTTP client and the built-in mock provider.
//! - [`api`]: the internal request, errors, the JSON scan, usage read from responses.
//! - [`telemetry`]: metric names and the recorder. [`rt`]: clocks, busy-polling, header values.

#![allow(
    rustdoc::private_intra_doc_links,
    reason = "read with --document-private-items: most of the crate is pub(crate)"
)]

pub mod accounting;
pub mod admin;
pub mod api;

pub mod app;
pub mod config;
pub mod gateway;
pub mod http;
pub mod limits;
pub mod routing;
pub mod rt;
pub mod telemetry;
pub mod upstream;
