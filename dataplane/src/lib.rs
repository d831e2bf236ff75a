//! Tollgate's data plane: an OpenAI-compatible gateway in front of OpenAI, vLLM, KServe and the
//! built-in mock, with virtual keys, cost accounting and Prometheus metrics.
//!
//! Module map, in request order:
//! - [`server`]: the listener (hyper's HTTP/1.1 and h2c servers), routes and thin handlers;
//!   request ids. [`connections`]: idle timeout, shutdown, per-connection bounds.
//! - [`auth`]: virtual key lookup by hash.
//! - [`request`]: reading `model`/`stream` without decoding the rest; minimal body rewrites.
//! - [`proxy`]: the request path, from parsed request to relayed response.
//! - [`upstream`]: the pooled HTTP client, [`h1`] its HTTP/1.1 connections. [`mock`]: the built-in provider and mock server.
//! - [`sse`]: chunk-by-chunk stream relay that reads the usage chunk on the way.
//! - [`accounting`], [`usage`]: cost from real usage, per key and deployment.
//! - [`snapshot`], [`state`]: the immutable per-config view and its atomic swap.
//! - [`loader`]: manifests on disk, and reloading them. [`cluster`]: the operator's config.
//!   [`metrics`]: Prometheus.
//! - [`limits`]: rate limits and budgets. [`usage_log`]: records of settled requests.
//! - [`routing`]: strategies, endpoint health, cooldowns, retry policy.
//! - [`admin`]: the LiteLLM-compatible key and spend API.
//! - [`cli`]: flags, and [`cli::run`] which wires it all for the binary.

pub mod accounting;
pub mod admin;
pub mod auth;
pub mod busy_poll;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod connections;
pub mod error;
pub mod h1;
pub mod json;
pub mod limits;
pub mod loader;
pub mod metrics;
pub mod mock;
pub mod proxy;
pub mod request;
pub mod routing;
pub mod server;
pub mod shared;
pub mod snapshot;
pub mod sse;
pub mod state;
pub mod tokens;
pub mod upstream;
pub mod usage;
pub mod usage_log;
pub mod values;
