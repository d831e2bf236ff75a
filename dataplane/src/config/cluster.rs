//! Cluster mode (`--kubernetes`): the config comes from the operator, published as Secrets
//! (format: [`tollgate_crds::publish`]) in one namespace. The pod watches just the Secrets
//! labelled as config there, reassembles the current one when its head changes, and swaps it
//! in; an incomplete or corrupt config is logged and the running one kept. Because the config
//! lives in the API server, a pod that (re)starts while the operator is down still serves the
//! last one published.

use super::Install;
use anyhow::Context as _;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use std::sync::Arc;
use tokio::sync::Notify;
use tollgate_crds::GatewayConfig;
use tollgate_crds::publish::{HEAD_HASH, HEAD_SHARDS, LABEL, SHARD_DATA, decode, shard_name};

/// The watched config Secrets.
pub(crate) struct ConfigSource {
    store: Store<Secret>,
    changed: Arc<Notify>,
    namespace: String,
    name: String,
}

impl ConfigSource {
    /// Starts watching the config Secrets in `namespace`.
    pub(crate) async fn start(namespace: String, name: String) -> anyhow::Result<Self> {
        let client = Client::try_default()
            .await
            .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
        let api: Api<Secret> = Api::namespaced(client, &namespace);
        let (store, writer) = reflector::store();
        let changed = Arc::new(Notify::new());
        let notify = changed.clone();
        let stream = watcher(api, watcher::Config::default().labels(LABEL))
            .default_backoff()
            .reflect(writer);
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(_) => notify.notify_one(),
                    Err(e) => tracing::warn!("watching the config Secrets (retrying): {e}"),
                }
            }
        });
        Ok(Self {
            store,
            changed,
            namespace,
            name,
        })
    }

    /// The current config and its hash, if the head and all its shards are here and sound.
    fn current(&self) -> Option<Result<(GatewayConfig, String), String>> {
        let head = self
            .store
            .get(&ObjectRef::new(&self.name).within(&self.namespace))?;
        let data = head.data.as_ref()?;
        let hash = String::from_utf8(data.get(HEAD_HASH)?.0.clone()).ok()?;
        let n: usize = std::str::from_utf8(&data.get(HEAD_SHARDS)?.0)
            .ok()?
            .parse()
            .ok()?;
        let shards: Vec<Option<Arc<Secret>>> = (0..n)
            .map(|i| {
                self.store
                    .get(&ObjectRef::new(&shard_name(&self.name, &hash, i)).within(&self.namespace))
            })
            .collect();
        let parts: Vec<Option<&[u8]>> = shards
            .iter()
            .map(|s| {
                s.as_ref()
                    .and_then(|s| s.data.as_ref()?.get(SHARD_DATA))
                    .map(|b| b.0.as_slice())
            })
            .collect();
        match decode(&hash, &parts) {
            Ok(c) => Some(Ok((c, hash))),
            // Shards arrive as separate watch events: wait for the rest.
            Err(tollgate_crds::publish::DecodeError::MissingShard(_)) => None,
            Err(e) => Some(Err(e.to_string())),
        }
    }

    /// Waits for the first complete config.
    pub(crate) async fn first(&self) -> anyhow::Result<(GatewayConfig, String)> {
        self.store
            .wait_until_ready()
            .await
            .context("watching the config Secrets")?;
        loop {
            match self.current() {
                Some(Ok(c)) => return Ok(c),
                Some(Err(e)) => tracing::error!("the published config can't be read: {e}"),
                None => {}
            }
            self.changed.notified().await;
        }
    }

    /// Installs every new config as it is published, for as long as the process runs.
    pub(crate) async fn follow(self, state: Arc<impl Install>, mut installed: String) {
        loop {
            self.changed.notified().await;
            match self.current() {
                Some(Ok((config, hash))) if hash != installed => match state.install(&config) {
                    Ok(()) => {
                        metrics::counter!(crate::telemetry::RELOADS, "result" => "success")
                            .increment(1);
                        tracing::info!(
                            config_hash = hash,
                            models = config.models.len(),
                            keys = config.keys.len(),
                            "installed the published config"
                        );
                        installed = hash;
                    }
                    Err(e) => {
                        metrics::counter!(crate::telemetry::RELOADS, "result" => "rejected")
                            .increment(1);
                        tracing::error!(
                            "published config not installed; still serving the previous one: {e}"
                        );
                    }
                },
                Some(Err(e)) => {
                    metrics::counter!(crate::telemetry::RELOADS, "result" => "rejected")
                        .increment(1);
                    tracing::error!(
                        "published config can't be read; still serving the previous one: {e}"
                    );
                }
                _ => {}
            }
        }
    }
}
