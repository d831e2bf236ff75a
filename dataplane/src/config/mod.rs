//! The config the gateway serves: compiled into an immutable [`snapshot::Snapshot`], loaded from
//! manifests on disk ([`loader`]) or from the operator's Secrets ([`cluster`]).

pub(crate) mod cluster;
pub mod loader;
pub(crate) mod snapshot;

/// What a config source ([`loader::watch`], [`cluster::ConfigSource::follow`]) hands each new
/// config to: the gateway's state, which compiles it and swaps it in.
pub(crate) trait Install: Send + Sync + 'static {
    /// Compiles and swaps in `config`; the running one stays if it doesn't build.
    fn install(&self, config: &tollgate_crds::GatewayConfig) -> Result<(), snapshot::BuildError>;
}
