//! Importing a LiteLLM proxy `config.yaml` into Tollgate manifests (`tollgate-dataplane
//! import-litellm`): each `model_list` entry an LLMModel (entries sharing a `model_name` make
//! one load-balanced group), `os.environ/NAME` keys a Secret reference plus a Secret template
//! naming the variable, `router_settings` and the cache settings a RoutePolicy per model group.
//! Whatever has no equivalent is returned as a warning with the line it came from: nothing is
//! dropped silently.

use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

/// The Secret that holds the keys a config takes from the environment (`os.environ/NAME`), one
/// entry per variable, named after it.
pub const ENV_SECRET: &str = "litellm-env";

/// An imported config: the manifests (multi-document YAML), and what could not be carried over.
#[derive(Debug, Default)]
pub struct Imported {
    /// LLMModels, RoutePolicies and Secrets, as YAML documents.
    pub manifests: String,
    /// One line per thing left out or changed, with the config's line number where it is known.
    pub warnings: Vec<String>,
}

/// Where `needle` first appears in `text` at or after line `from` (1-based), for warnings.
fn line_of(text: &str, needle: &str, from: usize) -> usize {
    text.lines()
        .enumerate()
        .skip(from.saturating_sub(1))
        .find(|(_, l)| l.contains(needle))
        .map_or(0, |(i, _)| i + 1)
}

/// A Kubernetes object name from `s`: lowercase letters, digits and `-`, at most 63 characters.
fn object_name(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while out.contains("--") {
        out = out.replace("--", "-");
    }
    let out = out.trim_matches('-');
    let out = if out.is_empty() { "model" } else { out };
    out.chars()
        .take(63)
        .collect::<String>()
        .trim_end_matches('-')
        .to_string()
}

/// LiteLLM's duration (`60`, seconds, or a string such as `"5m"`) as a Tollgate duration.
fn seconds(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .map(|s| format!("{}ms", (s * 1000.0).round() as u64)),
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// The line of model_list's entry `i` (its `model_name`), for warnings about it.
fn entry_line(text: &str, i: usize) -> usize {
    let from = line_of(text, "model_list", 1).max(1);
    text.lines()
        .enumerate()
        .skip(from - 1)
        .filter(|(_, l)| l.contains("model_name"))
        .nth(i)
        .map_or(0, |(n, _)| n + 1)
}

struct Importer<'a> {
    text: &'a str,
    out: Imported,
    /// Secrets by name, their keys and values (literal, or a `${NAME}` placeholder).
    secrets: BTreeMap<String, BTreeMap<String, String>>,
    docs: Vec<Value>,
}

impl Importer<'_> {
    fn warn(&mut self, needle: &str, message: String) {
        self.warn_in("", needle, message);
    }

    /// A warning about model_list's entry `i`.
    fn warn_entry(&mut self, i: usize, message: String) {
        let line = entry_line(self.text, i);
        self.out.warnings.push(if line > 0 {
            format!("line {line}: {message}")
        } else {
            message
        });
    }

    /// A warning about `needle`, looked for from the line of `section` on (the config's first
    /// line for `""`).
    fn warn_in(&mut self, section: &str, needle: &str, message: String) {
        let from = if section.is_empty() {
            1
        } else {
            line_of(self.text, section, 1).max(1)
        };
        let line = line_of(self.text, needle, from);
        self.out.warnings.push(if line > 0 {
            format!("line {line}: {message}")
        } else {
            message
        });
    }

    /// A key the config gives as `os.environ/NAME` or literally, as a Secret reference.
    fn secret_ref(&mut self, key: &str, literal_secret: &str) -> Value {
        match key.strip_prefix("os.environ/") {
            Some(var) => {
                self.secrets
                    .entry(ENV_SECRET.into())
                    .or_default()
                    .insert(var.to_string(), format!("${{{var}}}"));
                json!({"name": ENV_SECRET, "key": var})
            }
            None => {
                self.secrets
                    .entry(literal_secret.into())
                    .or_default()
                    .insert("apiKey".into(), key.to_string());
                json!({"name": literal_secret, "key": "apiKey"})
            }
        }
    }

    fn model(&mut self, i: usize, entry: &Value, names: &mut BTreeMap<String, usize>) {
        let Some(model_name) = entry.get("model_name").and_then(Value::as_str) else {
            self.warn_entry(i, format!("model_list[{i}] has no model_name; left out"));
            return;
        };
        let params = entry.get("litellm_params").cloned().unwrap_or(json!({}));
        let Some(model) = params.get("model").and_then(Value::as_str) else {
            self.warn_entry(
                i,
                format!("model_list[{i}] ({model_name}) has no litellm_params.model; left out"),
            );
            return;
        };
        let (prefix, upstream) = model.split_once('/').unwrap_or(("openai", model));
        let api_base = params.get("api_base").and_then(Value::as_str);
        let provider = match (prefix, api_base) {
            ("openai", None) => "openai",
            ("openai" | "hosted_vllm" | "vllm" | "ollama" | "openai_compatible", Some(_)) => {
                "openai-compatible"
            }
            _ => {
                self.warn_entry(i, format!("model_list[{i}] ({model_name}): the provider `{prefix}/` is not served by this version of Tollgate; left out"
                    ),
                );
                return;
            }
        };
        let n = names.entry(model_name.to_string()).or_default();
        *n += 1;
        let name = if *n == 1 {
            object_name(model_name)
        } else {
            object_name(&format!("{model_name}-{n}"))
        };
        let mut spec = Map::new();
        spec.insert("modelName".into(), json!(model_name));
        spec.insert("provider".into(), json!(provider));
        spec.insert("upstreamModel".into(), json!(upstream));
        spec.insert(
            "url".into(),
            json!(api_base.unwrap_or("https://api.openai.com/v1")),
        );
        if let Some(key) = params.get("api_key").and_then(Value::as_str) {
            let literal = format!("{name}-api-key");
            spec.insert("credentialsRef".into(), self.secret_ref(key, &literal));
        }
        let mut limits = Map::new();
        for (from, to) in [
            ("rpm", "rpm"),
            ("tpm", "tpm"),
            ("max_parallel_requests", "maxParallel"),
        ] {
            if let Some(v) = params
                .get(from)
                .or_else(|| entry.get(from))
                .and_then(Value::as_u64)
            {
                limits.insert(to.into(), json!(v));
            }
        }
        if !limits.is_empty() {
            spec.insert("limits".into(), Value::Object(limits));
        }
        let info = entry.get("model_info").cloned().unwrap_or(json!({}));
        let cost = |k: &str| {
            params
                .get(k)
                .or_else(|| info.get(k))
                .and_then(Value::as_f64)
                .map(|per_token| per_token * 1e6)
        };
        if let (Some(input), Some(output)) =
            (cost("input_cost_per_token"), cost("output_cost_per_token"))
        {
            spec.insert(
                "pricing".into(),
                json!({"inputPerMillion": input, "outputPerMillion": output}),
            );
        } else {
            self.warn_entry(i, format!("model_list[{i}] ({model_name}): no input_cost_per_token/output_cost_per_token; set spec.pricing on LLMModel {name}, or its spend is $0"
                ),
            );
        }
        if let Some(w) = params.get("weight").and_then(Value::as_u64) {
            spec.insert("weight".into(), json!(w));
        }
        if let Some(w) = info.get("max_input_tokens").and_then(Value::as_u64) {
            spec.insert("contextWindow".into(), json!(w));
        }
        let known = [
            "model",
            "api_base",
            "api_key",
            "rpm",
            "tpm",
            "max_parallel_requests",
            "weight",
            "input_cost_per_token",
            "output_cost_per_token",
        ];
        if let Some(p) = params.as_object() {
            for k in p.keys().filter(|k| !known.contains(&k.as_str())) {
                self.warn_entry(i, format!("model_list[{i}] ({model_name}): litellm_params.{k} has no equivalent; left out"));
            }
        }
        self.docs.push(json!({
            "apiVersion": "tollgate.dev/v1alpha1",
            "kind": "LLMModel",
            "metadata": {"name": name},
            "spec": spec,
        }));
    }

    /// One RoutePolicy per model group, from `router_settings` and the cache settings.
    fn policies(&mut self, groups: &[String], router: &Value, cache: Option<Value>) {
        let mut base = Map::new();
        if let Some(s) = router.get("routing_strategy").and_then(Value::as_str) {
            let strategy = match s {
                "simple-shuffle" => Some("simple-shuffle"),
                "least-busy" => Some("least-busy"),
                "latency-based-routing" => Some("latency-based"),
                "cost-based-routing" => Some("cost-based"),
                _ => None,
            };
            match strategy {
                Some(st) => {
                    base.insert("strategy".into(), json!(st));
                }
                None => self.warn_in(
                    "router_settings",
                    "routing_strategy",
                    format!("router_settings.routing_strategy `{s}` has no equivalent; simple-shuffle (by weight) is used"),
                ),
            }
        }
        let mut retries = Map::new();
        if let Some(n) = router.get("num_retries").and_then(Value::as_u64) {
            retries.insert("attempts".into(), json!((n + 1).min(10)));
        }
        if let Some(b) = router.get("retry_after").and_then(seconds) {
            retries.insert("backoff".into(), json!(b));
        }
        if !retries.is_empty() {
            base.insert("retries".into(), Value::Object(retries));
        }
        let mut cooldown = Map::new();
        if let Some(n) = router.get("allowed_fails").and_then(Value::as_u64) {
            cooldown.insert("allowedFails".into(), json!(n));
        }
        if let Some(d) = router.get("cooldown_time").and_then(seconds) {
            cooldown.insert("duration".into(), json!(d));
        }
        if !cooldown.is_empty() {
            base.insert("cooldown".into(), Value::Object(cooldown));
        }
        if let Some(c) = cache {
            base.insert("cache".into(), c);
        }
        let lists = |key: &str| -> BTreeMap<String, Vec<String>> {
            let mut out = BTreeMap::new();
            for item in router
                .get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                for (from, to) in item.as_object().into_iter().flatten() {
                    let to: Vec<String> = to
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|m| m.as_str().map(str::to_string))
                        .collect();
                    out.insert(from.clone(), to);
                }
            }
            out
        };
        let fallbacks = lists("fallbacks");
        let context = lists("context_window_fallbacks");
        for from in fallbacks.keys().chain(context.keys()) {
            if !groups.contains(from) {
                self.warn_in("router_settings", from, format!("router_settings: fallbacks from `{from}`, which no imported model serves; left out"));
            }
        }
        for g in groups {
            let mut spec = base.clone();
            spec.insert("models".into(), json!([g]));
            let keep = |l: &Vec<String>| -> Vec<String> {
                l.iter().filter(|m| groups.contains(m)).cloned().collect()
            };
            if let Some(f) = fallbacks.get(g) {
                for m in f.iter().filter(|m| !groups.contains(m)) {
                    self.warn_in("router_settings", m, format!("router_settings: `{g}` falls back to `{m}`, which no imported model serves; left out"));
                }
                spec.insert("fallbacks".into(), json!(keep(f)));
            }
            if let Some(f) = context.get(g) {
                spec.insert("contextWindowFallbacks".into(), json!(keep(f)));
            }
            if spec.len() > 1 {
                self.docs.push(json!({
                    "apiVersion": "tollgate.dev/v1alpha1",
                    "kind": "RoutePolicy",
                    "metadata": {"name": object_name(&format!("{g}-policy"))},
                    "spec": spec,
                }));
            }
        }
        let known = [
            "routing_strategy",
            "num_retries",
            "retry_after",
            "allowed_fails",
            "cooldown_time",
            "fallbacks",
            "context_window_fallbacks",
        ];
        for k in router.as_object().into_iter().flatten().map(|(k, _)| k) {
            if !known.contains(&k.as_str()) {
                self.warn_in(
                    "router_settings",
                    k,
                    format!("router_settings.{k} has no equivalent; left out"),
                );
            }
        }
    }

    /// `litellm_settings.cache` / `cache_params` as a RoutePolicy `cache`.
    fn cache(&mut self, settings: &Value) -> Option<Value> {
        if settings.get("cache").and_then(Value::as_bool) != Some(true) {
            return None;
        }
        let params = settings.get("cache_params").cloned().unwrap_or(json!({}));
        let kind = params
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("local");
        let mut cache = Map::new();
        let semantic = kind.contains("semantic") || params.get("similarity_threshold").is_some();
        cache.insert(
            "mode".into(),
            json!(if semantic { "semantic" } else { "exact" }),
        );
        if let Some(t) = params.get("similarity_threshold").and_then(Value::as_f64) {
            cache.insert("similarityThreshold".into(), json!(t));
        }
        if let Some(t) = params.get("ttl").and_then(seconds) {
            cache.insert("ttl".into(), json!(t));
        }
        if kind.starts_with("redis") {
            self.warn_in(
                "litellm_settings",
                "cache_params",
                "litellm_settings.cache_params: Redis is given to the data plane as --redis-url (host and port are not imported)".into(),
            );
        }
        self.warn_in(
            "litellm_settings",
            "cache:",
            "litellm_settings.cache: imported into each RoutePolicy, but this version of Tollgate does not serve cached responses yet".into(),
        );
        Some(Value::Object(cache))
    }
}

/// Imports a LiteLLM proxy config (YAML).
pub fn import(config: &str) -> Result<Imported, String> {
    let root: Value =
        serde_yaml::from_str(config).map_err(|e| format!("not a LiteLLM config: {e}"))?;
    let Some(obj) = root.as_object() else {
        return Err("not a LiteLLM config: the top level is not a mapping".into());
    };
    let mut im = Importer {
        text: config,
        out: Imported::default(),
        secrets: BTreeMap::new(),
        docs: Vec::new(),
    };
    let mut names = BTreeMap::new();
    for (i, entry) in obj
        .get("model_list")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        im.model(i, entry, &mut names);
    }
    let groups: Vec<String> = im
        .docs
        .iter()
        .filter_map(|d| d["spec"]["modelName"].as_str().map(str::to_string))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let settings = obj.get("litellm_settings").cloned().unwrap_or(json!({}));
    let cache = im.cache(&settings);
    let router = obj.get("router_settings").cloned().unwrap_or(json!({}));
    im.policies(&groups, &router, cache);
    for k in settings
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k.clone())
    {
        if !["cache", "cache_params"].contains(&k.as_str()) {
            im.warn(
                &k,
                format!("litellm_settings.{k} has no equivalent yet; left out"),
            );
        }
    }
    let general = obj.get("general_settings").cloned().unwrap_or(json!({}));
    for (k, v) in general.as_object().into_iter().flatten() {
        let message = match (k.as_str(), v.as_str()) {
            ("master_key", Some(env)) if env.starts_with("os.environ/") => format!(
                "general_settings.master_key: start the data plane with --master-key (or TOLLGATE_MASTER_KEY) set from ${}",
                &env["os.environ/".len()..]
            ),
            ("master_key", _) => {
                "general_settings.master_key: start the data plane with --master-key (or TOLLGATE_MASTER_KEY); the key itself is not written to the manifests".into()
            }
            _ => format!("general_settings.{k} has no equivalent yet; left out"),
        };
        im.warn_in("general_settings", k, message);
    }
    for k in obj.keys() {
        if ![
            "model_list",
            "router_settings",
            "litellm_settings",
            "general_settings",
        ]
        .contains(&k.as_str())
        {
            im.warn(k, format!("{k} has no equivalent; left out"));
        }
    }
    for (name, data) in std::mem::take(&mut im.secrets) {
        let note = if name == ENV_SECRET {
            "Values are the environment variables the LiteLLM config named: fill them in (envsubst) or create this Secret from them."
        } else {
            "The API key the LiteLLM config gave literally."
        };
        im.docs.insert(
            0,
            json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": name, "annotations": {"tollgate.dev/imported-from": "litellm", "tollgate.dev/note": note}},
                "stringData": data,
            }),
        );
    }
    let mut out = String::from(
        "# Imported from a LiteLLM proxy config by `tollgate-dataplane import-litellm`.\n",
    );
    for d in &im.docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(d).map_err(|e| e.to_string())?);
    }
    im.out.manifests = out;
    Ok(im.out)
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    /// The mission's own example config, as LiteLLM users write it.
    const FIXTURE: &str = include_str!("../../examples/litellm/config.yaml");

    #[test]
    fn the_missions_litellm_config_imports_and_compiles() {
        let im = import(FIXTURE).unwrap();
        let mut objects = crate::compile::Objects::default();
        let errors = crate::manifest::parse_into(&mut objects, &im.manifests, "imported.yaml");
        assert!(errors.is_empty(), "{errors:?}\n{}", im.manifests);
        let (config, errors) = crate::compile::compile(&objects);
        assert!(errors.is_empty(), "{errors:?}\n{}", im.manifests);
        // Both gpt-4o entries make one group of two deployments, as do the two vLLM pods.
        let group = |name: &str| config.models.get(name).map_or(0, |g| g.deployments.len());
        assert_eq!(group("gpt-4o"), 2, "{}", im.manifests);
        assert_eq!(group("llama-3.1-8b"), 2);
        assert_eq!(group("gpt-4o-mini"), 1);
        // Keys from the environment are Secret references, never values.
        assert!(
            im.manifests.contains("${OPENAI_API_KEY}"),
            "{}",
            im.manifests
        );
        assert!(!im.manifests.contains("LITELLM_MASTER_KEY"));
        let policy = config.models["gpt-4o"]
            .policy
            .as_ref()
            .expect("a RoutePolicy");
        assert_eq!(policy.attempts, 4);
        // The fallback to the model left out is left out too (and warned about).
        assert!(policy.fallbacks.is_empty(), "{policy:?}");
        // Nothing is dropped silently: each left-out part is a warning with its line.
        let warned = |s: &str| im.warnings.iter().any(|w| w.contains(s));
        for part in [
            "line 7: model_list[2] (claude-sonnet-4-6): the provider `anthropic/`",
            "line 12: router_settings: `gpt-4o` falls back to `claude-sonnet-4-6`",
            "line 12: router_settings: fallbacks from `claude-sonnet-4-6`",
            "litellm_settings.success_callback",
            "litellm_settings.langfuse_public_key",
            "line 16: general_settings.database_url",
            "general_settings.store_model_in_db",
            "--master-key (or TOLLGATE_MASTER_KEY) set from $LITELLM_MASTER_KEY",
            "--redis-url",
            "does not serve cached responses yet",
            "no input_cost_per_token",
        ] {
            assert!(
                warned(part),
                "no warning about {part:?}: {:#?}",
                im.warnings
            );
        }
    }

    #[test]
    fn a_config_that_is_not_yaml_or_a_mapping_is_refused() {
        assert!(import("model_list: [").is_err());
        assert!(import("- a\n- b\n").is_err());
        // An empty config imports to nothing, with nothing to warn about.
        let im = import("{}").unwrap();
        assert!(im.warnings.is_empty());
    }
}
