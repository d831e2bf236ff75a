//! `compile()`: custom resources (+ Secrets, + backends the operator resolved) into a
//! [`GatewayConfig`], with one [`ObjectError`] per offending object.
//!
//! Schemas catch what they can (types, enums, minimums); this catches the rest: duplicate
//! objects, references to Secrets and models that don't exist, fallback loops, bad durations and
//! URLs. An object with an error is left out of the config; callers decide whether a config with
//! errors may replace a good one (the data plane says no).

use crate::common::{Limits, parse_duration};
use crate::config::*;
use crate::key::{Budget, VirtualKey};
use crate::model::{LlmModel, Provider, Timeouts};
use crate::policy::RoutePolicy;
use crate::secret::SecretString;
use k8s_openapi::api::core::v1::Secret;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

/// Everything compile() reads.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    /// LLMModels.
    pub models: Vec<LlmModel>,
    /// VirtualKeys.
    pub keys: Vec<VirtualKey>,
    /// RoutePolicies.
    pub policies: Vec<RoutePolicy>,
    /// Secrets referenced by the above (others are ignored).
    pub secrets: Vec<Secret>,
    /// Backends resolved by the operator for `serviceRef` / `inferenceServiceRef`, by LLMModel
    /// `namespace/name`: base URLs of the ready endpoints.
    pub resolved_backends: BTreeMap<String, Vec<String>>,
    /// Why the operator could not resolve a backend, by LLMModel `namespace/name`.
    pub backend_errors: BTreeMap<String, String>,
}

/// What is wrong with one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectError {
    /// `LLMModel`, `VirtualKey`, `RoutePolicy`, `Secret`, or `Manifest` for a document that isn't
    /// an object of a known kind.
    pub kind: &'static str,
    /// `namespace/name`, or the file and document number for a `Manifest` error.
    pub object: String,
    /// The field at fault, as a path (`spec.pricing.inputPerMillion`), if one is.
    pub field: Option<String>,
    /// What is wrong and, where it helps, what to do.
    pub message: String,
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.object)?;
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ObjectError {}

/// Namespace used for objects that name none (as `kubectl apply` would).
pub const DEFAULT_NAMESPACE: &str = "default";
/// Default Secret key of `LLMModel.spec.credentialsRef`.
pub const DEFAULT_CREDENTIALS_KEY: &str = "apiKey";
/// Default Secret key of `VirtualKey.spec.secretRef`.
pub const DEFAULT_VIRTUAL_KEY_KEY: &str = "key";
/// Secret key holding a virtual key's SHA-256 (hex) instead of the key itself.
pub const KEY_SHA256: &str = "keySha256";
/// Shortest virtual key accepted: shorter keys are guessable.
pub const MIN_VIRTUAL_KEY_LEN: usize = 16;

/// Name of the Secret holding a VirtualKey's key when `spec.secretRef` is absent (the operator
/// generates it).
pub fn generated_key_secret_name(virtual_key: &str) -> String {
    format!("{virtual_key}-key")
}

fn object_id(meta: &kube::core::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE),
        meta.name.as_deref().unwrap_or("")
    )
}

struct Errors {
    list: Vec<ObjectError>,
}

impl Errors {
    fn push(&mut self, kind: &'static str, object: &str, field: &str, message: impl Into<String>) {
        self.list.push(ObjectError {
            kind,
            object: object.to_string(),
            field: (!field.is_empty()).then(|| field.to_string()),
            message: message.into(),
        });
    }
}

struct Secrets<'a> {
    by_id: HashMap<String, &'a Secret>,
}

impl Secrets<'_> {
    /// The string value of `key` in Secret `namespace/name`, or a message saying what's missing.
    fn get(&self, namespace: &str, name: &str, key: &str) -> Result<String, String> {
        let secret = self
            .by_id
            .get(&format!("{namespace}/{name}"))
            .ok_or_else(|| format!("Secret {namespace}/{name} not found"))?;
        if let Some(v) = secret.string_data.as_ref().and_then(|d| d.get(key)) {
            return Ok(v.clone());
        }
        if let Some(v) = secret.data.as_ref().and_then(|d| d.get(key)) {
            return String::from_utf8(v.0.clone())
                .map_err(|_| format!("Secret {namespace}/{name} key {key:?} is not UTF-8"));
        }
        Err(format!("Secret {namespace}/{name} has no key {key:?}"))
    }
}

fn timeouts(t: Option<&Timeouts>) -> Result<TimeoutConfig, (String, String)> {
    Ok(TimeoutConfig::default().overridden(&timeout_overrides(t)?))
}

fn timeout_overrides(t: Option<&Timeouts>) -> Result<TimeoutOverrides, (String, String)> {
    let Some(t) = t else {
        return Ok(TimeoutOverrides::default());
    };
    let ms = |field: &str, v: &Option<String>| {
        v.as_deref()
            .map(|v| {
                parse_duration(v)
                    .map(|d| d.as_millis() as u64)
                    .map_err(|e| (format!("spec.timeouts.{field}"), e))
            })
            .transpose()
    };
    Ok(TimeoutOverrides {
        connect_ms: ms("connect", &t.connect)?,
        first_byte_ms: ms("firstByte", &t.first_byte)?,
        total_ms: ms("total", &t.total)?,
        idle_ms: ms("idle", &t.idle)?,
    })
}

fn price(field: &str, usd_per_million: f64) -> Result<u64, (String, String)> {
    if !usd_per_million.is_finite() || !(0.0..=1e6).contains(&usd_per_million) {
        return Err((
            format!("spec.pricing.{field}"),
            format!("must be between 0 and 1000000 USD per million tokens, got {usd_per_million}"),
        ));
    }
    Ok((usd_per_million * 1e6).round() as u64)
}

fn check_url(url: &str) -> Result<String, String> {
    let trimmed = url.trim_end_matches('/');
    let rest = trimmed
        .strip_prefix("http://")
        .or_else(|| trimmed.strip_prefix("https://"))
        .ok_or_else(|| format!("{url:?} must start with http:// or https://"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("{url:?} has no host"));
    }
    if trimmed.contains(['?', '#', ' ']) {
        return Err(format!(
            "{url:?} must be a base URL without query or fragment"
        ));
    }
    Ok(trimmed.to_string())
}

fn compile_model(
    m: &LlmModel,
    secrets: &Secrets<'_>,
    resolved: &BTreeMap<String, Vec<String>>,
    backend_errors: &BTreeMap<String, String>,
) -> Result<Deployment, (String, String)> {
    let id = object_id(&m.metadata);
    let ns = m.metadata.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
    let s = &m.spec;
    let err = |field: &str, msg: String| (field.to_string(), msg);
    if s.model_name.trim().is_empty() {
        return Err(err("spec.modelName", "must not be empty".into()));
    }
    if s.weight.is_some_and(|w| w > 1_000_000) {
        return Err(err("spec.weight", "must be at most 1000000".into()));
    }
    if s.context_window == Some(0) {
        return Err(err("spec.contextWindow", "must be at least 1".into()));
    }
    if s.mock.as_ref().and_then(|m| m.chunks) == Some(0) {
        return Err(err("spec.mock.chunks", "must be at least 1".into()));
    }
    check_limits("spec.limits", s.limits.as_ref())?;
    let backends = [
        s.url.is_some(),
        s.service_ref.is_some(),
        s.inference_service_ref.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    let backend = match s.provider {
        Provider::Anthropic | Provider::Azure => {
            return Err(err(
                "spec.provider",
                format!(
                    "provider {:?} is not supported by this version yet; use openai, \
                     openai-compatible or mock",
                    s.provider.as_str()
                ),
            ));
        }
        Provider::Mock => {
            if backends > 0 {
                return Err(err(
                    "spec",
                    "the mock provider takes no url, serviceRef or inferenceServiceRef".into(),
                ));
            }
            let mock = s.mock.clone().unwrap_or_default();
            let ms = |field: &str, v: &Option<String>| -> Result<u64, (String, String)> {
                v.as_deref()
                    .map(|v| parse_duration(v).map(|d| d.as_millis() as u64))
                    .transpose()
                    .map(|v| v.unwrap_or(0))
                    .map_err(|e| (format!("spec.mock.{field}"), e))
            };
            Backend::Mock(MockConfig {
                reply: mock.reply.unwrap_or_else(|| DEFAULT_MOCK_REPLY.to_string()),
                prompt_tokens: mock.prompt_tokens,
                completion_tokens: mock.completion_tokens,
                latency_ms: ms("latency", &mock.latency)?,
                chunks: mock.chunks,
                chunk_delay_ms: ms("chunkDelay", &mock.chunk_delay)?,
            })
        }
        Provider::Openai | Provider::OpenaiCompatible => {
            if s.mock.is_some() {
                return Err(err(
                    "spec.mock",
                    "only the mock provider takes mock settings".into(),
                ));
            }
            if backends != 1 {
                return Err(err(
                    "spec",
                    "exactly one of url, serviceRef and inferenceServiceRef is required".into(),
                ));
            }
            if let Some(url) = &s.url {
                Backend::Urls(vec![check_url(url).map_err(|e| err("spec.url", e))?])
            } else {
                let field = if s.service_ref.is_some() {
                    "spec.serviceRef"
                } else {
                    "spec.inferenceServiceRef"
                };
                if let Some(e) = backend_errors.get(&id) {
                    return Err(err(field, e.clone()));
                }
                match resolved.get(&id) {
                    Some(urls) if !urls.is_empty() => Backend::Urls(urls.clone()),
                    Some(_) => return Err(err(field, "no ready endpoints".into())),
                    None => {
                        return Err(err(
                            field,
                            "is resolved by the operator in cluster mode; a standalone data plane \
                             needs spec.url"
                                .into(),
                        ));
                    }
                }
            }
        }
    };
    let api_key = match &s.credentials_ref {
        Some(r) => {
            let key = r.key.as_deref().unwrap_or(DEFAULT_CREDENTIALS_KEY);
            let v = secrets
                .get(ns, &r.name, key)
                .map_err(|e| err("spec.credentialsRef", e))?;
            Some(SecretString::new(v.trim().to_string()))
        }
        None if s.provider == Provider::Openai => {
            return Err(err(
                "spec.credentialsRef",
                "the openai provider needs an API key Secret".into(),
            ));
        }
        None => None,
    };
    let pricing = match &s.pricing {
        Some(p) => Prices {
            input: price("inputPerMillion", p.input_per_million)?,
            output: price("outputPerMillion", p.output_per_million)?,
            cached_input: price(
                "cachedInputPerMillion",
                p.cached_input_per_million.unwrap_or(p.input_per_million),
            )?,
        },
        None => Prices::default(),
    };
    Ok(Deployment {
        id,
        provider: s.provider,
        upstream_model: s
            .upstream_model
            .clone()
            .unwrap_or_else(|| s.model_name.clone()),
        backend,
        api_key,
        weight: s.weight.unwrap_or(1),
        limits: s.limits.clone().unwrap_or_default(),
        pricing,
        context_window: s.context_window,
        timeouts: timeouts(s.timeouts.as_ref())?,
        health_check: s
            .health_check
            .as_ref()
            .map(|h| -> Result<HealthCheckConfig, (String, String)> {
                let ms = |field: &str, v: &str| {
                    parse_duration(v)
                        .map(|d| d.as_millis() as u64)
                        .map_err(|e| (format!("spec.healthCheck.{field}"), e))
                };
                let interval_ms = ms("interval", &h.interval)?;
                if interval_ms < 100 {
                    return Err((
                        "spec.healthCheck.interval".into(),
                        "must be at least 100ms".into(),
                    ));
                }
                let path = h.path.clone().unwrap_or_else(|| "/models".into());
                if !path.starts_with('/') {
                    return Err(("spec.healthCheck.path".into(), "must start with /".into()));
                }
                Ok(HealthCheckConfig {
                    interval_ms,
                    path,
                    timeout_ms: h
                        .timeout
                        .as_deref()
                        .map_or(Ok(5_000), |t| ms("timeout", t))?,
                })
            })
            .transpose()?,
    })
}

/// The schema's minimums, checked again: manifests read from disk never meet the API server.
fn check_limits(field: &str, l: Option<&Limits>) -> Result<(), (String, String)> {
    let Some(l) = l else { return Ok(()) };
    let zero = |name: &str| {
        Err((
            format!("{field}.{name}"),
            "must be at least 1 (leave it out for no limit)".to_string(),
        ))
    };
    if l.rpm == Some(0) {
        return zero("rpm");
    }
    if l.tpm == Some(0) {
        return zero("tpm");
    }
    if l.max_parallel == Some(0) {
        return zero("maxParallel");
    }
    Ok(())
}

/// Parses a budget's `duration` (`daily`, `weekly`, `monthly`, or a duration of a minute or more).
pub fn budget_period(s: &str) -> Result<BudgetPeriod, String> {
    Ok(match s.trim() {
        "daily" | "1d" => BudgetPeriod::Daily,
        "weekly" | "7d" => BudgetPeriod::Weekly,
        "monthly" | "1mo" => BudgetPeriod::Monthly,
        other => {
            let d = parse_duration(other).map_err(|e| {
                format!("{e}; use daily, weekly, monthly or a duration such as 30d")
            })?;
            if d.as_secs() < 60 {
                return Err(format!("budget period {other:?} is shorter than a minute"));
            }
            BudgetPeriod::Seconds(d.as_secs())
        }
    })
}

fn budget_config(field: &str, b: &Budget) -> Result<BudgetConfig, (String, String)> {
    Ok(BudgetConfig {
        max: Picodollars::from_usd(b.max_usd).ok_or_else(|| {
            (
                format!("{field}.maxUsd"),
                format!("invalid amount {}", b.max_usd),
            )
        })?,
        period: match &b.duration {
            Some(d) => budget_period(d).map_err(|e| (format!("{field}.duration"), e))?,
            None => BudgetPeriod::Lifetime,
        },
    })
}

fn compile_key(k: &VirtualKey, secrets: &Secrets<'_>) -> Result<KeyConfig, (String, String)> {
    let ns = k.metadata.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
    let name = k.metadata.name.as_deref().unwrap_or("");
    let s = &k.spec;
    let (secret_name, secret_key) = match &s.secret_ref {
        Some(r) => (
            r.name.clone(),
            r.key
                .clone()
                .unwrap_or_else(|| DEFAULT_VIRTUAL_KEY_KEY.into()),
        ),
        None => (
            generated_key_secret_name(name),
            DEFAULT_VIRTUAL_KEY_KEY.to_string(),
        ),
    };
    // A Secret may hold the key itself, or only its SHA-256 (hex) under `keySha256`: how keys
    // generated through the admin API are stored, so their plaintext is never kept.
    let hash =
        match secrets.get(ns, &secret_name, &secret_key) {
            Ok(key) => {
                let key = key.trim();
                if key.len() < MIN_VIRTUAL_KEY_LEN {
                    return Err((
                        "spec.secretRef".into(),
                        format!("the key must be at least {MIN_VIRTUAL_KEY_LEN} characters"),
                    ));
                }
                KeyHash::of(key)
            }
            Err(e) => match secrets.get(ns, &secret_name, KEY_SHA256) {
                Ok(hex) => serde_json::from_value::<KeyHash>(serde_json::Value::String(
                    hex.trim().to_string(),
                ))
                .map_err(|_| {
                    (
                        "spec.secretRef".to_string(),
                        format!("Secret {ns}/{secret_name} {KEY_SHA256:?} must be 64 hex digits"),
                    )
                })?,
                Err(_) => {
                    let hint = if s.secret_ref.is_none() {
                        " (set spec.secretRef, or let the operator generate the Secret)"
                    } else {
                        ""
                    };
                    return Err(("spec.secretRef".to_string(), format!("{e}{hint}")));
                }
            },
        };
    check_limits("spec.limits", s.limits.as_ref())?;
    let budget = s
        .budget
        .as_ref()
        .map(|b| budget_config("spec.budget", b))
        .transpose()?;
    Ok(KeyConfig {
        id: object_id(&k.metadata),
        hash,
        team: s.team.clone(),
        alias: s.alias.clone(),
        models: s.models.clone(),
        budget,
        limits: s.limits.clone().unwrap_or_default(),
        expires_at: s.expires_at.as_ref().map(|t| t.0.as_second()),
    })
}

fn compile_policy(
    p: &RoutePolicy,
    models: &BTreeMap<String, ModelGroup>,
) -> Result<PolicyConfig, (String, String)> {
    let s = &p.spec;
    let ms = |field: &str, v: &Option<String>, default: u64| -> Result<u64, (String, String)> {
        match v {
            Some(v) => parse_duration(v)
                .map(|d| d.as_millis() as u64)
                .map_err(|e| (field.to_string(), e)),
            None => Ok(default),
        }
    };
    if s.models.is_empty() {
        return Err(("spec.models".into(), "must name at least one model".into()));
    }
    for (i, m) in s.models.iter().enumerate() {
        if !models.contains_key(m) {
            return Err((
                format!("spec.models[{i}]"),
                format!("no LLMModel has modelName {m:?}"),
            ));
        }
    }
    for (field, list) in [
        ("spec.fallbacks", &s.fallbacks),
        ("spec.contextWindowFallbacks", &s.context_window_fallbacks),
    ] {
        for (i, m) in list.iter().enumerate() {
            if !models.contains_key(m) {
                return Err((
                    format!("{field}[{i}]"),
                    format!("no LLMModel has modelName {m:?}"),
                ));
            }
            if s.models.contains(m) {
                return Err((
                    format!("{field}[{i}]"),
                    format!("{m:?} falls back to itself"),
                ));
            }
        }
    }
    let retries = s.retries.clone().unwrap_or_default();
    if retries.attempts.is_some_and(|a| !(1..=10).contains(&a)) {
        return Err((
            "spec.retries.attempts".into(),
            "must be between 1 and 10".into(),
        ));
    }
    if let Some(t) = s.cache.as_ref().and_then(|c| c.similarity_threshold)
        && !(0.0..=1.0).contains(&t)
    {
        return Err((
            "spec.cache.similarityThreshold".into(),
            "must be between 0 and 1".into(),
        ));
    }
    let cooldown = s.cooldown.clone().unwrap_or_default();
    let defaults = CooldownConfig::default();
    let cache = match &s.cache {
        Some(c) => {
            if let Some(m) = &c.embedding_model
                && !models.contains_key(m)
            {
                return Err((
                    "spec.cache.embeddingModel".into(),
                    format!("no LLMModel has modelName {m:?}"),
                ));
            }
            Some(CacheConfig {
                mode: c.mode,
                ttl_ms: ms("spec.cache.ttl", &c.ttl, 600_000)?,
                similarity_threshold: c.similarity_threshold.unwrap_or(0.95),
                embedding_model: c.embedding_model.clone(),
            })
        }
        None => None,
    };
    Ok(PolicyConfig {
        id: object_id(&p.metadata),
        strategy: s.strategy.unwrap_or_default(),
        attempts: retries.attempts.unwrap_or(1).max(1),
        backoff_ms: ms("spec.retries.backoff", &retries.backoff, 100)?,
        retry_on: retries.retry_on,
        fallbacks: s.fallbacks.clone(),
        context_window_fallbacks: s.context_window_fallbacks.clone(),
        cooldown: CooldownConfig {
            allowed_fails: cooldown.allowed_fails.unwrap_or(defaults.allowed_fails),
            window_ms: ms("spec.cooldown.window", &cooldown.window, defaults.window_ms)?,
            duration_ms: ms(
                "spec.cooldown.duration",
                &cooldown.duration,
                defaults.duration_ms,
            )?,
        },
        timeouts: s
            .timeouts
            .as_ref()
            .map(|t| timeout_overrides(Some(t)))
            .transpose()?,
        cache,
    })
}

/// Finds a cycle in the fallback graph reachable from `start`, returning the path if any.
fn fallback_cycle(start: &str, edges: &BTreeMap<String, Vec<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, Vec<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(pos) = path.iter().position(|p| p == node) {
            let mut cycle = path[pos..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    visit(start, edges, &mut Vec::new(), &mut BTreeSet::new())
}

/// Compiles objects into a config. Objects with errors are left out and reported.
pub fn compile(objects: &Objects) -> (GatewayConfig, Vec<ObjectError>) {
    let mut errors = Errors { list: Vec::new() };
    let mut secrets = Secrets {
        by_id: HashMap::new(),
    };
    for s in &objects.secrets {
        let id = object_id(&s.metadata);
        if secrets.by_id.insert(id.clone(), s).is_some() {
            errors.push("Secret", &id, "metadata.name", "defined more than once");
        }
    }

    let mut config = GatewayConfig::default();
    let mut seen = BTreeSet::new();
    let mut models: Vec<&LlmModel> = objects.models.iter().collect();
    models.sort_by_cached_key(|m| object_id(&m.metadata));
    for m in models {
        let id = object_id(&m.metadata);
        if !seen.insert(id.clone()) {
            errors.push("LLMModel", &id, "metadata.name", "defined more than once");
            continue;
        }
        match compile_model(
            m,
            &secrets,
            &objects.resolved_backends,
            &objects.backend_errors,
        ) {
            Ok(d) => config
                .models
                .entry(m.spec.model_name.clone())
                .or_default()
                .deployments
                .push(d),
            Err((field, msg)) => errors.push("LLMModel", &id, &field, msg),
        }
    }

    let mut seen = BTreeSet::new();
    let mut hashes: HashMap<KeyHash, String> = HashMap::new();
    // Team budgets, with the key that set each first.
    let mut teams: BTreeMap<String, (BudgetConfig, String)> = BTreeMap::new();
    let mut keys: Vec<&VirtualKey> = objects.keys.iter().collect();
    keys.sort_by_cached_key(|k| object_id(&k.metadata));
    for k in keys {
        let id = object_id(&k.metadata);
        if !seen.insert(id.clone()) {
            errors.push("VirtualKey", &id, "metadata.name", "defined more than once");
            continue;
        }
        match compile_key(k, &secrets) {
            Ok(kc) => {
                if let Some(other) = hashes.get(&kc.hash) {
                    errors.push(
                        "VirtualKey",
                        &id,
                        "spec.secretRef",
                        format!("uses the same key as VirtualKey {other}"),
                    );
                    continue;
                }
                if let Some(b) = &k.spec.team_budget {
                    let team_budget = match (&kc.team, budget_config("spec.teamBudget", b)) {
                        (_, Err((field, msg))) => Err((field, msg)),
                        (None, _) => Err((
                            "spec.teamBudget".to_string(),
                            "needs spec.team (the team whose keys share it)".to_string(),
                        )),
                        (Some(team), Ok(tb)) => match teams.get(team) {
                            Some((other, by)) if *other != tb => Err((
                                "spec.teamBudget".to_string(),
                                format!(
                                    "differs from the budget of team {team:?} set by VirtualKey {by}"
                                ),
                            )),
                            _ => Ok((team.clone(), tb)),
                        },
                    };
                    match team_budget {
                        Ok((team, tb)) => {
                            teams.entry(team).or_insert((tb, id.clone()));
                        }
                        Err((field, msg)) => {
                            errors.push("VirtualKey", &id, &field, msg);
                            continue;
                        }
                    }
                }
                hashes.insert(kc.hash, id);
                config.keys.push(kc);
            }
            Err((field, msg)) => errors.push("VirtualKey", &id, &field, msg),
        }
    }
    config.teams = teams.into_iter().map(|(t, (b, _))| (t, b)).collect();

    let mut seen = BTreeSet::new();
    let mut claimed: BTreeMap<String, String> = BTreeMap::new();
    let mut compiled = Vec::new();
    let mut policies: Vec<&RoutePolicy> = objects.policies.iter().collect();
    policies.sort_by_cached_key(|p| object_id(&p.metadata));
    for p in policies {
        let id = object_id(&p.metadata);
        if !seen.insert(id.clone()) {
            errors.push(
                "RoutePolicy",
                &id,
                "metadata.name",
                "defined more than once",
            );
            continue;
        }
        match compile_policy(p, &config.models) {
            Ok(pc) => {
                if let Some((m, other)) = p
                    .spec
                    .models
                    .iter()
                    .find_map(|m| claimed.get(m).map(|o| (m, o)))
                {
                    errors.push(
                        "RoutePolicy",
                        &id,
                        "spec.models",
                        format!("model {m:?} is already routed by RoutePolicy {other}"),
                    );
                    continue;
                }
                for m in &p.spec.models {
                    claimed.insert(m.clone(), id.clone());
                }
                compiled.push((p.spec.models.clone(), pc));
            }
            Err((field, msg)) => errors.push("RoutePolicy", &id, &field, msg),
        }
    }
    // Fallback loops span policies (a -> b in one, b -> a in another), so they are checked on
    // the whole graph; every policy on a cycle is rejected.
    let mut edges: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (models, pc) in &compiled {
        for m in models {
            let e = edges.entry(m.clone()).or_default();
            e.extend(pc.fallbacks.iter().cloned());
            e.extend(pc.context_window_fallbacks.iter().cloned());
        }
    }
    for (models, pc) in compiled {
        if let Some(cycle) = models.iter().find_map(|m| fallback_cycle(m, &edges)) {
            errors.push(
                "RoutePolicy",
                &pc.id,
                "spec.fallbacks",
                format!("fallback loop: {}", cycle.join(" -> ")),
            );
            continue;
        }
        for m in models {
            if let Some(group) = config.models.get_mut(&m) {
                if let Some(o) = &pc.timeouts {
                    for d in &mut group.deployments {
                        d.timeouts = d.timeouts.overridden(o);
                    }
                }
                group.policy = Some(pc.clone());
            }
        }
    }
    (config, errors.list)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::parse_into;

    const BASE: &str = r#"
apiVersion: tollgate.dev/v1alpha1
kind: LLMModel
metadata: {name: a}
spec: {modelName: a, provider: mock}
---
apiVersion: tollgate.dev/v1alpha1
kind: LLMModel
metadata: {name: b}
spec: {modelName: b, provider: mock}
---
apiVersion: v1
kind: Secret
metadata: {name: s}
stringData: {key: sk-0123456789abcdef, other: sk-fedcba9876543210, short: abc}
"#;

    fn errors_of(extra: &str) -> Vec<String> {
        let mut o = Objects::default();
        let text = format!("{BASE}---\n{extra}");
        let parse = parse_into(&mut o, &text, "t.yaml");
        assert!(parse.is_empty(), "{parse:?}");
        compile(&o).1.into_iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn duplicate_objects_are_reported_on_the_second() {
        let e = errors_of(
            "apiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata: {name: a}\nspec: {modelName: z, provider: mock}\n",
        );
        assert_eq!(
            e,
            ["LLMModel default/a: metadata.name: defined more than once"]
        );
    }

    #[test]
    fn unknown_references_are_reported() {
        let e = errors_of(
            "apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {name: p}\nspec: {models: [a], fallbacks: [nope]}\n",
        );
        assert_eq!(
            e,
            [r#"RoutePolicy default/p: spec.fallbacks[0]: no LLMModel has modelName "nope""#]
        );
        let e = errors_of(
            "apiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata: {name: o}\nspec: {modelName: o, provider: openai, url: 'https://api.openai.com/v1', credentialsRef: {name: s, key: missing}}\n",
        );
        assert_eq!(
            e,
            [r#"LLMModel default/o: spec.credentialsRef: Secret default/s has no key "missing""#]
        );
    }

    #[test]
    fn team_budgets_are_shared_and_must_agree() {
        let key = |name: &str, k: &str, extra: &str| {
            format!(
                "apiVersion: tollgate.dev/v1alpha1\nkind: VirtualKey\nmetadata: {{name: {name}}}\nspec: {{secretRef: {{name: s, key: {k}}}{extra}}}\n"
            )
        };
        let e = errors_of(&key("k", "key", ", teamBudget: {maxUsd: 5}"));
        assert_eq!(
            e,
            [
                "VirtualKey default/k: spec.teamBudget: needs spec.team (the team whose keys share it)"
            ]
        );
        let e = errors_of(&format!(
            "{}---\n{}",
            key(
                "k1",
                "key",
                ", team: t, teamBudget: {maxUsd: 5, duration: daily}"
            ),
            key(
                "k2",
                "other",
                ", team: t, teamBudget: {maxUsd: 6, duration: daily}"
            )
        ));
        assert_eq!(
            e,
            [
                r#"VirtualKey default/k2: spec.teamBudget: differs from the budget of team "t" set by VirtualKey default/k1"#
            ]
        );
        let mut o = Objects::default();
        let text = format!(
            "{BASE}---\n{}---\n{}",
            key(
                "k1",
                "key",
                ", team: t, teamBudget: {maxUsd: 5, duration: daily}"
            ),
            key("k2", "other", ", team: t")
        );
        assert!(parse_into(&mut o, &text, "t.yaml").is_empty());
        let (config, errors) = compile(&o);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(config.teams["t"].max, Picodollars(5_000_000_000_000));
    }

    #[test]
    fn policy_timeouts_override_only_the_fields_they_set() {
        let mut o = Objects::default();
        let text = "apiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata: {name: a}\nspec: {modelName: a, provider: mock, timeouts: {connect: 2s, total: 60s}}\n---\napiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {name: p}\nspec: {models: [a], timeouts: {firstByte: 5s}}\n";
        assert!(parse_into(&mut o, text, "t.yaml").is_empty());
        let (config, errors) = compile(&o);
        assert!(errors.is_empty(), "{errors:?}");
        let t = config.models["a"].deployments[0].timeouts;
        assert_eq!(
            (t.connect_ms, t.first_byte_ms, t.total_ms),
            (2_000, 5_000, Some(60_000))
        );
    }

    #[test]
    fn fallback_loops_across_policies_are_rejected() {
        let e = errors_of(
            "apiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {name: p1}\nspec: {models: [a], fallbacks: [b]}\n---\napiVersion: tollgate.dev/v1alpha1\nkind: RoutePolicy\nmetadata: {name: p2}\nspec: {models: [b], fallbacks: [a]}\n",
        );
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].contains("fallback loop: a -> b -> a"), "{e:?}");
    }

    #[test]
    fn keys_must_be_long_and_unique() {
        let key = |name: &str, k: &str| {
            format!(
                "apiVersion: tollgate.dev/v1alpha1\nkind: VirtualKey\nmetadata: {{name: {name}}}\nspec: {{secretRef: {{name: s, key: {k}}}}}\n"
            )
        };
        let e = errors_of(&key("k", "short"));
        assert!(e[0].contains("at least 16 characters"), "{e:?}");
        let e = errors_of(&format!("{}---\n{}", key("k1", "key"), key("k2", "key")));
        assert_eq!(
            e,
            ["VirtualKey default/k2: spec.secretRef: uses the same key as VirtualKey default/k1"]
        );
    }

    #[test]
    fn backends_must_be_exactly_one_valid_url() {
        let model = |spec: &str| {
            format!(
                "apiVersion: tollgate.dev/v1alpha1\nkind: LLMModel\nmetadata: {{name: m}}\nspec: {{modelName: m, {spec}}}\n"
            )
        };
        let e = errors_of(&model("provider: openai-compatible"));
        assert!(e[0].contains("exactly one of url"), "{e:?}");
        let e = errors_of(&model("provider: openai-compatible, url: 'ftp://x'"));
        assert!(
            e[0].contains("spec.url") && e[0].contains("http://"),
            "{e:?}"
        );
        let e = errors_of(&model(
            "provider: openai-compatible, serviceRef: {name: vllm, port: 8000}",
        ));
        assert!(e[0].contains("needs spec.url"), "{e:?}");
        let e = errors_of(&model(
            "provider: anthropic, url: 'https://api.anthropic.com'",
        ));
        assert!(e[0].contains("not supported by this version yet"), "{e:?}");
    }
}
