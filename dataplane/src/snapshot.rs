//! The immutable runtime view of one [`GatewayConfig`]: lookup tables keyed the way the hot path
//! asks (key hash, model name), upstream URIs and auth headers prepared once, metric handles
//! registered once. A request loads one `Arc<Snapshot>` and uses it to the end, so a reload
//! never changes a request mid-flight.

use crate::accounting::{Ledger, Outcome, UsageCounters};
use crate::limits::{Limited, Registry, Rules, Scope};
use crate::mock::Mock;
use crate::request::Endpoint;
use http::{HeaderValue, Uri};
use metrics::{Counter, Histogram};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tollgate_crds::config::{Backend, GatewayConfig, KeyConfig, KeyHash, Prices, TimeoutConfig};
use tollgate_crds::model::Provider;

/// A virtual key, ready for lookups.
#[derive(Debug)]
pub struct RuntimeKey {
    /// `namespace/name`, shared.
    pub id: Arc<str>,
    /// The compiled key.
    pub config: KeyConfig,
    /// Allowed models; `None`: all.
    pub allowed: Option<HashSet<String>>,
    /// Usage of this key (shared across reloads).
    pub usage: Arc<UsageCounters>,
    /// Rate limits and budget, if any.
    pub limits: Option<Arc<Limited>>,
}

impl RuntimeKey {
    /// Whether this key may use `model`.
    pub fn allows(&self, model: &str) -> bool {
        self.allowed.as_ref().is_none_or(|a| a.contains(model))
    }
}

/// Per-deployment metric handles, registered when the snapshot is built.
#[derive(Debug)]
pub struct DeploymentMetrics {
    success: Counter,
    upstream_error: Counter,
    client_gone: Counter,
    rejected: Counter,
    /// Request duration.
    pub duration: Histogram,
    /// Time to first byte.
    pub ttfb: Histogram,
}

impl DeploymentMetrics {
    fn new(model: &str, id: &str) -> Self {
        let counter = |outcome: &'static str| metrics::counter!(crate::metrics::REQUESTS, "model" => model.to_string(), "deployment" => id.to_string(), "outcome" => outcome);
        Self {
            success: counter(Outcome::Success.as_str()),
            upstream_error: counter(Outcome::UpstreamError.as_str()),
            client_gone: counter(Outcome::ClientGone.as_str()),
            rejected: counter(Outcome::Rejected.as_str()),
            duration: metrics::histogram!(crate::metrics::DURATION, "model" => model.to_string(), "deployment" => id.to_string()),
            ttfb: metrics::histogram!(crate::metrics::TTFB, "model" => model.to_string(), "deployment" => id.to_string()),
        }
    }

    /// The request counter for `outcome`.
    pub fn outcome(&self, outcome: Outcome) -> &Counter {
        match outcome {
            Outcome::Success => &self.success,
            Outcome::UpstreamError => &self.upstream_error,
            Outcome::ClientGone => &self.client_gone,
            Outcome::Rejected => &self.rejected,
        }
    }
}

/// Where a deployment's requests go.
#[derive(Debug)]
pub enum Target {
    /// An HTTP upstream.
    Upstream {
        /// Full URIs per endpoint (chat, completions, embeddings).
        uris: Box<[Uri; 3]>,
        /// `Authorization` header, if the deployment has a key.
        auth: Option<HeaderValue>,
    },
    /// The built-in mock.
    Mock(Arc<Mock>),
}

/// One deployment, ready to serve.
#[derive(Debug)]
pub struct RuntimeDeployment {
    /// `namespace/name`.
    pub id: Arc<str>,
    /// As a header value, for `x-tollgate-deployment`.
    pub id_header: HeaderValue,
    /// Public model name.
    pub model: Arc<str>,
    /// Provider.
    pub provider: Provider,
    /// Upstream model name.
    pub upstream_model: String,
    /// Where requests go.
    pub target: Target,
    /// Relative weight.
    pub weight: u32,
    /// Prices.
    pub pricing: Prices,
    /// Timeouts.
    pub timeouts: TimeoutConfig,
    /// Usage (shared across reloads).
    pub usage: Arc<UsageCounters>,
    /// Rate limits, if any.
    pub limits: Option<Arc<Limited>>,
    /// Metric handles.
    pub metrics: DeploymentMetrics,
}

impl RuntimeDeployment {
    /// The upstream URI for `endpoint`, if this is an HTTP deployment.
    pub fn uri(&self, endpoint: Endpoint) -> Option<(&Uri, Option<&HeaderValue>)> {
        match &self.target {
            Target::Upstream { uris, auth } => {
                let i = match endpoint {
                    Endpoint::ChatCompletions => 0,
                    Endpoint::Completions => 1,
                    Endpoint::Embeddings => 2,
                };
                Some((&uris[i], auth.as_ref()))
            }
            Target::Mock(_) => None,
        }
    }
}

/// All deployments of one public model name.
#[derive(Debug)]
pub struct Group {
    /// Deployments.
    pub deployments: Vec<Arc<RuntimeDeployment>>,
    total_weight: u32,
}

impl Group {
    /// Picks a deployment, at random by weight (LiteLLM's `simple-shuffle`).
    pub fn pick(&self) -> Option<&Arc<RuntimeDeployment>> {
        match self.deployments.len() {
            0 => None,
            1 => self.deployments.first(),
            _ if self.total_weight == 0 => self
                .deployments
                .get(fastrand::usize(..self.deployments.len())),
            _ => {
                let mut n = fastrand::u32(..self.total_weight);
                self.deployments.iter().find(|d| {
                    if n < d.weight {
                        true
                    } else {
                        n -= d.weight;
                        false
                    }
                })
            }
        }
    }
}

/// The runtime view of one config.
#[derive(Debug)]
pub struct Snapshot {
    /// Keys by hash.
    pub keys: HashMap<KeyHash, Arc<RuntimeKey>>,
    /// Groups by public model name.
    pub groups: HashMap<String, Group>,
    /// Content hash of the config.
    pub config_hash: String,
}

/// A deployment that can't be turned into a runtime one (a URL that isn't a valid URI).
#[derive(Debug, thiserror::Error)]
#[error("deployment {id}: {message}")]
pub struct BuildError {
    id: String,
    message: String,
}

impl Snapshot {
    /// The snapshot of an empty config (serves nothing).
    pub fn empty() -> Self {
        Self {
            keys: HashMap::new(),
            groups: HashMap::new(),
            config_hash: String::new(),
        }
    }

    /// Builds the runtime view of `config`, taking usage counters from `ledger`.
    pub fn build(
        config: &GatewayConfig,
        ledger: &Ledger,
        registry: &Registry,
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
                        let base = urls.first().ok_or_else(|| err("no backend URL".into()))?;
                        let uri = |path: &str| {
                            format!("{base}{path}")
                                .parse::<Uri>()
                                .map_err(|e| err(format!("invalid URL {base:?}: {e}")))
                        };
                        let auth = match &d.api_key {
                            Some(k) => {
                                let mut v = HeaderValue::try_from(format!("Bearer {}", k.expose()))
                                    .map_err(|_| {
                                        err("the API key has characters not allowed in a header"
                                            .into())
                                    })?;
                                v.set_sensitive(true);
                                Some(v)
                            }
                            None => None,
                        };
                        Target::Upstream {
                            uris: Box::new([
                                uri(Endpoint::ChatCompletions.upstream_path())?,
                                uri(Endpoint::Completions.upstream_path())?,
                                uri(Endpoint::Embeddings.upstream_path())?,
                            ]),
                            auth,
                        }
                    }
                };
                deployments.push(Arc::new(RuntimeDeployment {
                    id: Arc::from(d.id.as_str()),
                    id_header: HeaderValue::try_from(d.id.as_str())
                        .map_err(|_| err("invalid id".into()))?,
                    model: model.clone(),
                    provider: d.provider,
                    upstream_model: d.upstream_model.clone(),
                    target,
                    weight: d.weight,
                    pricing: d.pricing,
                    timeouts: d.timeouts,
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
            let total_weight = deployments.iter().map(|d| d.weight).sum();
            groups.insert(
                name.clone(),
                Group {
                    deployments,
                    total_weight,
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
