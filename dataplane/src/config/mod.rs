//! The config the gateway serves: compiled into an immutable [`snapshot::Snapshot`], loaded from
//! manifests on disk ([`loader`]) or from the operator's Secrets ([`cluster`]).

pub mod cluster;
pub mod loader;
pub mod snapshot;
