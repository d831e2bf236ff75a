//! The immutable runtime view of one [`GatewayConfig`]: lookup tables keyed the way the hot path
//! asks (key hash, model name), upstream URIs and auth headers prepared once, metric handles
//! registered once. A request loads one `Arc<Snapshot>` and uses it to the end, so a reload
//! never changes a request mid-flight.

use crate::accounting::{Ledger, UsageCounters};
use crate::limits::{Limited, Registry, Rules, Scope};
use crate::routing::deployment::{DeploymentMetrics, upstream_endpoint};
use crate::routing::{Group, Health, Policy, Route, RuntimeDeployment, Target};
use crate::upstream::mock::Mock;
use crate::upstream::provider::Adapter;
use http::HeaderValue;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tollgate_crds::config::{Backend, GatewayConfig, KeyConfig, KeyHash};

/// A virtual key, ready for lookups.
#[derive(Debug)]
pub(crate) struct RuntimeKey {
    /// `namespace/name`, shared.
    pub(crate) id: Arc<str>,
    /// The compiled key.
    pub(crate) config: KeyConfig,
    /// Allowed models; `None`: all.
    pub(crate) allowed: Option<HashSet<String>>,
    /// Usage of this key (shared across reloads).
    pub(crate) usage: Arc<UsageCounters>,
    /// Rate limits and budget, if any.
    pub(crate) limits: Option<Arc<Limited>>,
    /// The team's budget, shared with the team's other keys, if the team has one.
    pub(crate) team_limits: Option<Arc<Limited>>,
}

impl RuntimeKey {
    /// Whether this key may use `model`.
    pub(crate) fn allows(&self, model: &str) -> bool {
        self.allowed.as_ref().is_none_or(|a| a.contains(model))
    }
}

/// The runtime view of one config.
#[derive(Debug)]
pub(crate) struct Snapshot {
    /// Keys by hash.
    pub(crate) keys: HashMap<KeyHash, Arc<RuntimeKey>, KeyHashState>,
    /// Groups by public model name.
    pub(crate) groups: HashMap<String, Group>,
    /// Content hash of the config.
    pub(crate) config_hash: String,
}

/// Hashes a [`KeyHash`] for the key map by taking its first 8 bytes.
///
/// A key hash is already SHA-256 output, uniform and not choosable by a client, so hashing it
/// again (the default SipHash, run on every request's lookup) adds nothing. The map of model
/// names, which clients do choose, keeps the default DoS-resistant hasher.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct KeyHashState;

impl std::hash::BuildHasher for KeyHashState {
    type Hasher = FirstWord;
    fn build_hasher(&self) -> FirstWord {
        FirstWord(0)
    }
}

/// The hasher of [`KeyHashState`]: the first 8 bytes written, ignoring the length prefix.
#[derive(Debug)]
pub(crate) struct FirstWord(u64);

impl std::hash::Hasher for FirstWord {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        if let Some(word) = bytes.first_chunk::<8>() {
            self.0 = u64::from_le_bytes(*word);
        }
    }
    fn write_usize(&mut self, _len: usize) {}
}

/// A deployment that can't be turned into a runtime one (a URL that isn't a valid URI).
#[derive(Debug, thiserror::Error)]
#[error("deployment {id}: {message}")]
pub(crate) struct BuildError {
    id: String,
    message: String,
}

impl Snapshot {
    /// Builds the runtime view of `config`, taking usage counters from `ledger`.
    pub(crate) fn build(
        config: &GatewayConfig,
        ledger: &Ledger,
        registry: &Registry,
        health: &Health,
    ) -> Result<Self, BuildError> {
        let mut groups = HashMap::with_capacity(config.models.len());
        for (name, group) in &config.models {
            let model: Arc<str> = Arc::from(name.as_str());
            let mut deployments = Vec::with_capacity(group.deployments.len());
            for d in &group.deployments {
                let err = |message: String| BuildError {
                    id: d.id.clone(),
                    message,
                };
                let target = match &d.backend {
                    Backend::Mock(m) => Target::Mock(Arc::new(Mock::new(m))),
                    Backend::Urls(urls) => {
                        if urls.is_empty() {
                            return Err(err("no backend URL".into()));
                        }
                        let adapter = Adapter::of(d.provider).ok_or_else(|| {
                            err(format!(
                                "provider {:?} has no adapter in this data plane",
                                d.provider
                            ))
                        })?;
                        let auth = match &d.api_key {
                            Some(k) => Some(adapter.auth(k.expose()).ok_or_else(|| {
                                err("the API key has characters not allowed in a header".into())
                            })?),
                            None => None,
                        };
                        let endpoints = urls
                            .iter()
                            .map(|base| {
                                upstream_endpoint(
                                    adapter,
                                    base,
                                    d.health_check.as_ref(),
                                    auth.as_ref(),
                                )
                                .map_err(&err)
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        Target::Upstream {
                            adapter,
                            endpoints,
                            auth,
                        }
                    }
                };
                deployments.push(Arc::new(RuntimeDeployment {
                    id: Arc::from(d.id.as_str()),
                    id_header: HeaderValue::try_from(d.id.as_str())
                        .map_err(|_| err("invalid id".into()))?,
                    model: model.clone(),
                    upstream_model: d.upstream_model.clone(),
                    target,
                    weight: d.weight,
                    pricing: d.pricing,
                    timeouts: d.timeouts,
                    context_window: d.context_window,
                    tokens: crate::accounting::tokens::Family::of(&d.upstream_model),
                    health_check: d.health_check.clone(),
                    usage: ledger.deployment(name, &d.id),
                    limits: registry.limited(
                        Scope::Deployment,
                        &d.id,
                        Rules {
                            limits: d.limits.clone(),
                            budget: None,
                        },
                    ),
                    metrics: DeploymentMetrics::new(name, &d.id),
                }));
            }
            let mut routes = Vec::new();
            for d in &deployments {
                let n = d.endpoint_count();
                for i in 0..n {
                    let url = match &d.target {
                        Target::Upstream { endpoints, .. } => endpoints[i].base.as_str(),
                        Target::Mock(_) => "mock",
                    };
                    routes.push(Route {
                        deployment: d.clone(),
                        endpoint: i,
                        stats: health.endpoint(&d.id, url),
                        weight: u64::from(d.weight) * 1000 / n as u64,
                    });
                }
            }
            groups.insert(
                name.clone(),
                Group {
                    name_header: HeaderValue::try_from(name.as_str()).map_err(|_| BuildError {
                        id: name.clone(),
                        message: "the model name is not a valid header value".into(),
                    })?,
                    name: model.clone(),
                    deployments,
                    routes,
                    policy: Policy::new(group.policy.as_ref()),
                },
            );
        }
        let keys = config
            .keys
            .iter()
            .map(|k| {
                let rk = RuntimeKey {
                    id: Arc::from(k.id.as_str()),
                    allowed: (!k.models.is_empty()).then(|| k.models.iter().cloned().collect()),
                    usage: ledger.key(&k.id),
                    limits: registry.limited(
                        Scope::Key,
                        &k.id,
                        Rules {
                            limits: k.limits.clone(),
                            budget: k.budget.clone(),
                        },
                    ),
                    team_limits: k
                        .team
                        .as_ref()
                        .and_then(|t| Some((t, config.teams.get(t)?)))
                        .and_then(|(t, b)| {
                            registry.limited(
                                Scope::Team,
                                t,
                                Rules {
                                    limits: Default::default(),
                                    budget: Some(b.clone()),
                                },
                            )
                        }),
                    config: k.clone(),
                };
                (k.hash, Arc::new(rk))
            })
            .collect();
        Ok(Self {
            keys,
            groups,
            config_hash: config.content_hash(),
        })
    }
}

impl AsRef<crate::routing::Groups> for Snapshot {
    fn as_ref(&self) -> &crate::routing::Groups {
        &self.groups
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn a_key_hash_hashes_to_its_first_word() {
        let h = KeyHash::of("sk-some-key");
        let first = u64::from_le_bytes(*h.0.first_chunk::<8>().expect("32 bytes"));
        assert_eq!(KeyHashState.hash_one(h), first);
        assert_ne!(
            KeyHashState.hash_one(KeyHash::of("sk-other-key")),
            first,
            "different keys land in different places"
        );
    }
}
