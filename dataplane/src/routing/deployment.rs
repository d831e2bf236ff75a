//! A deployment as routing sees it: where its requests go (the mock, or HTTP endpoints with
//! their URIs and request heads prepared once), its weight, prices, context window, limits and
//! metric handles; and the [`Group`] of deployments behind one public model name. Built by
//! [`crate::config::snapshot`], shared by every request of that config.

use super::{Policy, Route};
use crate::accounting::{Outcome, UsageCounters};
use crate::api::request::Endpoint;
use crate::limits::Limited;
use crate::upstream::mock::Mock;
use crate::upstream::provider::{Adapter, Auth};
use http::{HeaderValue, Uri};
use metrics::{Counter, Histogram};
use std::sync::Arc;
use tollgate_crds::config::{Prices, TimeoutConfig};

/// Per-deployment metric handles, registered when the snapshot is built.
#[derive(Debug)]
pub(crate) struct DeploymentMetrics {
    success: Counter,
    upstream_error: Counter,
    client_gone: Counter,
    shutdown: Counter,
    rejected: Counter,
    /// Requests charged an estimate.
    pub(crate) estimated: Counter,
    /// Request duration.
    pub(crate) duration: Histogram,
    /// Time to first byte.
    pub(crate) ttfb: Histogram,
}

impl DeploymentMetrics {
    pub(crate) fn new(model: &str, id: &str) -> Self {
        let counter = |outcome: &'static str| metrics::counter!(crate::telemetry::REQUESTS, "model" => model.to_string(), "deployment" => id.to_string(), "outcome" => outcome);
        Self {
            success: counter(Outcome::Success.as_str()),
            upstream_error: counter(Outcome::UpstreamError.as_str()),
            client_gone: counter(Outcome::ClientGone.as_str()),
            shutdown: counter(Outcome::Shutdown.as_str()),
            rejected: counter(Outcome::Rejected.as_str()),
            estimated: metrics::counter!(crate::telemetry::ESTIMATED, "model" => model.to_string(), "deployment" => id.to_string()),
            duration: metrics::histogram!(crate::telemetry::DURATION, "model" => model.to_string(), "deployment" => id.to_string()),
            ttfb: metrics::histogram!(crate::telemetry::TTFB, "model" => model.to_string(), "deployment" => id.to_string()),
        }
    }

    /// The request counter for `outcome`.
    pub(crate) fn outcome(&self, outcome: Outcome) -> &Counter {
        match outcome {
            Outcome::Success => &self.success,
            Outcome::UpstreamError => &self.upstream_error,
            Outcome::ClientGone => &self.client_gone,
            Outcome::Shutdown => &self.shutdown,
            Outcome::Rejected => &self.rejected,
        }
    }
}

/// One resolved address of an HTTP deployment (a pod, or the provider's API).
#[derive(Debug)]
pub(crate) struct UpstreamEndpoint {
    /// Base URL, as configured.
    pub(crate) base: String,
    /// Full URIs per API endpoint (chat, completions, embeddings).
    pub(crate) uris: Box<[Uri; 3]>,
    /// For a plain-HTTP URL, where connections go and the prepared request heads (`None` for
    /// https, which goes through hyper's client with a built request).
    pub(crate) plain: Option<PlainHttp>,
    /// The server's Prometheus `/metrics` (same scheme and authority as `base`).
    pub(crate) metrics: Option<Uri>,
    /// The active health probe's URI, if the deployment has one.
    pub(crate) probe: Option<Uri>,
}

/// A plain-HTTP upstream endpoint, served through [`crate::upstream::h1`].
#[derive(Debug)]
pub(crate) struct PlainHttp {
    /// Where the connections go.
    pub(crate) origin: crate::upstream::Origin,
    /// The request head per API endpoint (indexed by [`Endpoint::index`]): request line,
    /// `Host`, `Content-Type` and the deployment's `Authorization`, written once per config.
    pub(crate) heads: [crate::upstream::h1::RequestHead; 3],
}

/// Where a deployment's requests go.
#[derive(Debug)]
pub(crate) enum Target {
    /// An HTTP upstream with one or more endpoints.
    Upstream {
        /// Endpoints.
        endpoints: Vec<UpstreamEndpoint>,
        /// Its wire format.
        adapter: Adapter,
        /// The header carrying the deployment's API key, if it has one.
        auth: Option<Auth>,
    },
    /// The built-in mock.
    Mock(Arc<Mock>),
}

/// One deployment, ready to serve.
#[derive(Debug)]
pub(crate) struct RuntimeDeployment {
    /// `namespace/name`.
    pub(crate) id: Arc<str>,
    /// As a header value, for `x-tollgate-deployment`.
    pub(crate) id_header: HeaderValue,
    /// Public model name.
    pub(crate) model: Arc<str>,
    /// Upstream model name.
    pub(crate) upstream_model: String,
    /// Where requests go.
    pub(crate) target: Target,
    /// Relative weight.
    pub(crate) weight: u32,
    /// Prices.
    pub(crate) pricing: Prices,
    /// Timeouts.
    pub(crate) timeouts: TimeoutConfig,
    /// Context window in tokens, if known.
    pub(crate) context_window: Option<u32>,
    /// How prompt tokens are estimated for this deployment's model.
    pub(crate) tokens: crate::accounting::tokens::Family,
    /// Active health probe settings.
    pub(crate) health_check: Option<tollgate_crds::config::HealthCheckConfig>,
    /// Usage (shared across reloads).
    pub(crate) usage: Arc<UsageCounters>,
    /// Rate limits, if any.
    pub(crate) limits: Option<Arc<Limited>>,
    /// Metric handles.
    pub(crate) metrics: DeploymentMetrics,
}

impl RuntimeDeployment {
    /// The adapter, endpoint `i`, its URI for `endpoint` and the auth header, if this is an
    /// HTTP deployment.
    pub(crate) fn uri(
        &self,
        endpoint: Endpoint,
        i: usize,
    ) -> Option<(Adapter, &UpstreamEndpoint, &Uri, Option<&Auth>)> {
        match &self.target {
            Target::Upstream {
                adapter,
                endpoints,
                auth,
            } => {
                let e = endpoints.get(i)?;
                Some((*adapter, e, &e.uris[endpoint.index()], auth.as_ref()))
            }
            Target::Mock(_) => None,
        }
    }

    /// How many endpoints this deployment has (1 for the mock).
    pub(crate) fn endpoint_count(&self) -> usize {
        match &self.target {
            Target::Upstream { endpoints, .. } => endpoints.len(),
            Target::Mock(_) => 1,
        }
    }
}

/// All deployments of one public model name, and how they are routed.
#[derive(Debug)]
pub(crate) struct Group {
    /// Public model name.
    pub(crate) name: Arc<str>,
    /// The name as a header value, for `x-tollgate-model-group`.
    pub(crate) name_header: HeaderValue,
    /// Deployments.
    pub(crate) deployments: Vec<Arc<RuntimeDeployment>>,
    /// Every endpoint of every deployment.
    pub(crate) routes: Vec<Route>,
    /// The RoutePolicy, or defaults.
    pub(crate) policy: Policy,
}

impl Group {
    /// The largest context window among the deployments; `None` when any has no limit.
    pub(crate) fn context_window(&self) -> Option<u32> {
        self.deployments
            .iter()
            .map(|d| d.context_window)
            .try_fold(0, |acc, w| w.map(|w| acc.max(w)))
    }
}

/// Prepares the URIs (and, for plain HTTP, the request heads) of one upstream base URL.
pub(crate) fn upstream_endpoint(
    adapter: Adapter,
    base: &str,
    health: Option<&tollgate_crds::config::HealthCheckConfig>,
    auth: Option<&Auth>,
) -> Result<UpstreamEndpoint, String> {
    let uri = |path: &str| {
        format!("{base}{path}")
            .parse::<Uri>()
            .map_err(|e| format!("invalid URL {base:?}: {e}"))
    };
    let parsed: Uri = base
        .parse()
        .map_err(|e| format!("invalid URL {base:?}: {e}"))?;
    let metrics = match (parsed.scheme_str(), parsed.authority()) {
        (Some(scheme), Some(auth)) => format!("{scheme}://{auth}/metrics").parse().ok(),
        _ => None,
    };
    let uris = Box::new([
        uri(adapter.path(Endpoint::ChatCompletions))?,
        uri(adapter.path(Endpoint::Completions))?,
        uri(adapter.path(Endpoint::Embeddings))?,
    ]);
    let plain = crate::upstream::Origin::of(&parsed).map(|origin| {
        let json = HeaderValue::from_static("application/json");
        let heads = uris.each_ref().map(|u| {
            let headers = [
                (&http::header::HOST, origin.host()),
                (&http::header::CONTENT_TYPE, &json),
            ];
            let auth = auth.map(|(name, value)| (name, value));
            crate::upstream::h1::RequestHead::post(
                u.path_and_query().map_or("/", |pq| pq.as_str()),
                headers.into_iter().chain(auth),
            )
        });
        PlainHttp { origin, heads }
    });
    Ok(UpstreamEndpoint {
        plain,
        base: base.to_string(),
        uris,
        metrics,
        probe: health
            .map(|h| {
                format!("{base}{}", h.path)
                    .parse()
                    .map_err(|e| format!("invalid health check URL: {e}"))
            })
            .transpose()?,
    })
}
