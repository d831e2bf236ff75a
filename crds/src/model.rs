//! `LLMModel`: one deployment of a model behind a public model name.

use crate::common::{Limits, SecretKeyRef};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One deployment of a model. Several LLMModels with the same `modelName` form a load-balanced
/// group that clients address by that name.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "tollgate.dev",
    version = "v1alpha1",
    kind = "LLMModel",
    root = "LlmModel",
    plural = "llmmodels",
    singular = "llmmodel",
    shortname = "llm",
    shortname = "llms",
    category = "tollgate",
    namespaced,
    status = "LlmModelStatus",
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".spec.modelName"}"#,
    printcolumn = r#"{"name":"Provider","type":"string","jsonPath":".spec.provider"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Spend","type":"string","jsonPath":".status.spend.totalUsd"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LlmModelSpec {
    /// The public model name clients send in `"model"`. LLMModels sharing it are one group.
    #[schemars(length(min = 1, max = 253))]
    pub model_name: String,
    /// Wire protocol of the backend.
    pub provider: Provider,
    /// Model name sent upstream. Defaults to `modelName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_model: Option<String>,
    /// Base URL of the upstream API, up to and including the version path, e.g.
    /// `https://api.openai.com/v1` or `http://vllm.ml.svc:8000/v1`. Exactly one of `url`,
    /// `serviceRef` and `inferenceServiceRef` is required, except for the `mock` provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A Kubernetes Service whose ready endpoints are balanced one by one (cluster mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_ref: Option<ServiceRef>,
    /// A KServe `InferenceService` whose address is followed as it changes (cluster mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_service_ref: Option<InferenceServiceRef>,
    /// The Secret key holding the provider API key (default key: `apiKey`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_ref: Option<SecretKeyRef>,
    /// Relative share of traffic within the group for weighted routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000000))]
    pub weight: Option<u32>,
    /// Limits of this deployment (e.g. the provider account's quota).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// Prices in USD per million tokens, used for cost tracking and budgets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing: Option<Pricing>,
    /// Maximum prompt + completion tokens the model accepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub context_window: Option<u32>,
    /// Upstream timeouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    /// An active health probe: each endpoint is checked on its own, between requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// Behaviour of the built-in `mock` provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mock: Option<MockSpec>,
}

/// The wire protocol a deployment speaks.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    /// api.openai.com.
    Openai,
    /// Any OpenAI-compatible server: vLLM, KServe, Ollama, TGI, LM Studio.
    OpenaiCompatible,
    /// Anthropic's Messages API.
    Anthropic,
    /// Azure OpenAI.
    Azure,
    /// Built into the data plane: a deterministic reply with settable usage, latency and chunks.
    Mock,
}

impl Provider {
    /// The name used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Openai => "openai",
            Provider::OpenaiCompatible => "openai-compatible",
            Provider::Anthropic => "anthropic",
            Provider::Azure => "azure",
            Provider::Mock => "mock",
        }
    }
}

/// A Service backend.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceRef {
    /// Service name, in the LLMModel's namespace.
    pub name: String,
    /// Service port.
    pub port: u16,
    /// Path prefix of the OpenAI-compatible API (default `/v1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// A KServe InferenceService backend.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InferenceServiceRef {
    /// InferenceService name, in the LLMModel's namespace.
    pub name: String,
    /// Path prefix of the OpenAI-compatible API (default `/openai/v1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// Token prices in USD per million tokens. Up to six decimal places are kept exactly.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Pricing {
    /// USD per million prompt tokens.
    #[serde(default)]
    #[schemars(range(min = 0.0))]
    pub input_per_million: f64,
    /// USD per million completion tokens.
    #[serde(default)]
    #[schemars(range(min = 0.0))]
    pub output_per_million: f64,
    /// USD per million cached prompt tokens. Defaults to `inputPerMillion`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub cached_input_per_million: Option<f64>,
}

/// An active health probe of every endpoint of a deployment: `GET <url><path>` (by default the
/// OpenAI-compatible model list, which costs no tokens). A failed probe counts as a failure for
/// cooldowns; a successful one puts a cooling-down endpoint back in rotation.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheck {
    /// How often each endpoint is probed, e.g. `30s`. Required.
    pub interval: String,
    /// Path below the deployment's URL. Default `/models`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// How long a probe may take. Default `5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// Upstream timeouts, as durations (`500ms`, `30s`, `10m`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// Establishing the TCP (and TLS) connection. Default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect: Option<String>,
    /// From sending the request to the response headers. Default `600s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_byte: Option<String>,
    /// The whole request, including a streamed body. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<String>,
    /// Longest gap between two chunks of a streamed response (an upstream that stalls
    /// mid-stream): the stream is cut and charged for what it relayed. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<String>,
}

/// Behaviour of the built-in `mock` provider: deterministic, for quickstarts, tests and benchmarks.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MockSpec {
    /// The reply text. Default: `"Hello from Tollgate's mock model!"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// Reported prompt tokens. Default: an estimate from the request size (bytes / 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u32>,
    /// Reported completion tokens. Default: the number of words in the reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u32>,
    /// Delay before the response starts, e.g. `20ms`. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<String>,
    /// Number of content chunks a streamed reply is split into. Default: one per word.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub chunks: Option<u32>,
    /// Delay between streamed chunks, e.g. `5ms`. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_delay: Option<String>,
}

/// Observed state of an LLMModel.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LlmModelStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions: `Ready`, `BackendResolved`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Number of resolved backend endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<u32>,
    /// Usage and spend served by this deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend: Option<ModelSpend>,
}

/// Usage totals of one deployment.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpend {
    /// Total spend in USD, as a decimal string (exact).
    pub total_usd: String,
    /// Requests served.
    pub requests: u64,
    /// Prompt tokens served.
    pub prompt_tokens: u64,
    /// Completion tokens served.
    pub completion_tokens: u64,
}
