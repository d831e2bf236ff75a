//! Tollgate's API: the three custom resources (`LLMModel`, `VirtualKey`, `RoutePolicy`,
//! group `tollgate.dev`, version `v1alpha1`), and the compiled [`GatewayConfig`] that data-plane
//! pods run on.
//!
//! Data flows one way through this crate:
//!
//! ```text
//! manifests on disk / objects in the cluster
//!   -> [`manifest::parse_manifests`] / the operator's watches -> [`compile::Objects`]
//!   -> [`compile::compile`] (validation that a schema can't express; secrets resolved)
//!   -> [`GatewayConfig`] (plain data: no Kubernetes I/O, no HTTP)
//! ```
//!
//! The crate has no Kubernetes client and no runtime: both the operator and the data plane
//! depend on it, and neither depends on the other.

pub mod admin;
pub mod common;
pub mod compile;
pub mod config;
pub mod crdgen;
pub mod key;
pub mod litellm;
pub mod manifest;
pub mod model;
pub mod policy;
pub mod publish;
pub mod secret;
pub mod usage;

pub use compile::{ObjectError, Objects, compile};
pub use config::GatewayConfig;
pub use key::{VirtualKey, VirtualKeySpec, VirtualKeyStatus};
pub use model::{LlmModel, LlmModelSpec, LlmModelStatus};
pub use policy::{RoutePolicy, RoutePolicySpec, RoutePolicyStatus};

/// The API group of every Tollgate resource.
pub const GROUP: &str = "tollgate.dev";
/// The API version this crate defines.
pub const VERSION: &str = "v1alpha1";
