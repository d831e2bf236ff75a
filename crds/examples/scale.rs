//! How the config pipeline scales: generates N VirtualKeys (each with its own key Secret) and M
//! LLMModels in memory and times each step the operator and the data plane run on every change.
//!
//! ```text
//! cargo run --release -p tollgate-crds --example scale -- [--keys 10000] [--models 1000] [--iters 10] [--bare]
//! ```
//!
//! The objects carry the metadata the API server returns after `kubectl apply` and a status
//! write (uid, resourceVersion, the `last-applied-configuration` annotation, `managedFields` for
//! kubectl and the operator), as the operator's watch stores hold them; `--bare` leaves it out.
//!
//! Steps (each run `--iters` times; the median and the max are printed):
//! - `clone objects`: the operator copies every object out of its watch stores each reconcile.
//! - `compile`: [`tollgate_crds::compile`] (validation, Secret lookups, key hashing).
//! - `content_hash`: the operator hashes the config each reconcile to see whether it changed.
//! - `encode`: JSON + gzip + shards ([`tollgate_crds::publish::encode`]), only on a change.
//! - `decode`: what every data-plane pod does with a new config (gunzip, hash check, JSON).
//! - `parse manifests`: the standalone data plane reading the same objects as YAML from disk.
//! - for comparison, not used by Tollgate: the JSON alone, and gzip at level 1 instead of the
//!   default level 6 that `encode` uses.
//!
//! The data plane's last step, building its runtime snapshot (`Snapshot::build`), lives in
//! `tollgate-dataplane`, which depends on this crate; it is not measured here (see
//! `docs/scale.md`), and the propagation benchmark of the operator crate measures it end to end.

use k8s_openapi::api::core::v1::Secret;
use kube::core::ObjectMeta;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tollgate_crds::common::{Limits, SecretKeyRef};
use tollgate_crds::key::Budget;
use tollgate_crds::model::{Pricing, Provider};
use tollgate_crds::policy::{Retries, Strategy};
use tollgate_crds::publish::{SHARD_BYTES, decode, encode};
use tollgate_crds::{
    LlmModel, LlmModelSpec, Objects, RoutePolicy, RoutePolicySpec, VirtualKey, VirtualKeySpec,
    compile,
};

/// Public model names the LLMModels are spread over (fewer if there are fewer models).
const MODEL_NAMES: usize = 100;
/// Namespaces the VirtualKeys are spread over; keys of one namespace are one team.
const TEAMS: usize = 50;
/// RoutePolicies (each routes one model name and falls back to another).
const POLICIES: usize = 10;

struct Args {
    keys: usize,
    models: usize,
    iters: usize,
    bare: bool,
}

fn args() -> Args {
    let mut a = Args {
        keys: 10_000,
        models: 1_000,
        iters: 10,
        bare: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut num = |name: &str| -> usize {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match flag.as_str() {
            "--keys" => a.keys = num("--keys"),
            "--models" => a.models = num("--models"),
            "--iters" => a.iters = num("--iters").max(1),
            "--bare" => a.bare = true,
            "-h" | "--help" => {
                println!("usage: scale [--keys N] [--models M] [--iters I] [--bare]");
                std::process::exit(0);
            }
            other => panic!("unknown flag {other:?} (try --help)"),
        }
    }
    a
}

/// splitmix64: deterministic, distinct key material without a dependency.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn meta(ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(ns.to_string()),
        ..Default::default()
    }
}

fn secret(ns: &str, name: &str, key: &str, value: String) -> Secret {
    Secret {
        metadata: meta(ns, name),
        string_data: Some(BTreeMap::from([(key.to_string(), value)])),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// `managedFields` shape of a JSON object: every key as `f:key`, leaves as `{}`.
fn fields_v1(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => serde_json::Value::Object(
            m.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "apiVersion" | "kind"))
                .map(|(k, v)| (format!("f:{k}"), fields_v1(v)))
                .collect(),
        ),
        _ => serde_json::json!({}),
    }
}

/// Adds what the API server returns for an object created with `kubectl apply` (and, with
/// `status`, whose status the operator wrote): uid, resourceVersion, generation, creation time,
/// the last-applied annotation and managedFields.
fn as_served<K: kube::Resource + serde::Serialize>(obj: &mut K, n: usize, status: bool) {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry, Time};
    let applied = serde_json::to_value(&*obj).expect("objects serialize");
    let t = Time(jiff::Timestamp::from_second(1_764_000_000).expect("a valid time"));
    let entry = |manager: &str, fields: serde_json::Value, sub: Option<&str>| ManagedFieldsEntry {
        api_version: applied["apiVersion"].as_str().map(str::to_string),
        fields_type: Some("FieldsV1".into()),
        fields_v1: Some(FieldsV1(fields)),
        manager: Some(manager.into()),
        operation: Some("Update".into()),
        subresource: sub.map(str::to_string),
        time: Some(t.clone()),
    };
    let mut fields = fields_v1(&applied);
    fields["f:metadata"]["f:annotations"] = serde_json::json!({
        ".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}
    });
    let mut managed = vec![entry("kubectl-client-side-apply", fields, None)];
    if status {
        managed.push(entry(
            "tollgate-operator",
            serde_json::json!({"f:status": {".": {}, "f:conditions": {}, "f:observedGeneration": {}}}),
            Some("status"),
        ));
    }
    let meta = obj.meta_mut();
    meta.uid = Some(format!("{:08x}-0000-4000-8000-{n:012x}", n as u32));
    meta.resource_version = Some((100_000 + n).to_string());
    meta.generation = status.then_some(1);
    meta.creation_timestamp = Some(t);
    meta.annotations = Some(BTreeMap::from([(
        "kubectl.kubernetes.io/last-applied-configuration".to_string(),
        applied.to_string(),
    )]));
    meta.managed_fields = Some(managed);
}

fn model_name(i: usize, names: usize) -> String {
    format!("model-{:03}", i % names)
}

/// The objects of a cluster with `keys` VirtualKeys and `models` LLMModels; with `served`, as
/// the API server returns them.
fn generate(keys: usize, models: usize, served: bool) -> Objects {
    let names = MODEL_NAMES.min(models).max(1);
    let mut o = Objects::default();
    o.secrets.push(secret(
        "models",
        "provider-credentials",
        "apiKey",
        "sk-provider-0123456789abcdef0123456789abcdef".into(),
    ));
    for i in 0..models {
        let mut m = LlmModel::new(
            &format!("deployment-{i:05}"),
            LlmModelSpec {
                model_name: model_name(i, names),
                provider: Provider::OpenaiCompatible,
                upstream_model: Some(format!("org/model-{}-instruct", i % names)),
                url: Some(format!(
                    "http://vllm-{i:05}.inference.svc.cluster.local:8000/v1"
                )),
                service_ref: None,
                inference_service_ref: None,
                credentials_ref: Some(SecretKeyRef {
                    name: "provider-credentials".into(),
                    key: None,
                }),
                weight: Some(1 + (i % 4) as u32),
                limits: (i % 3 == 0).then_some(Limits {
                    rpm: Some(600),
                    tpm: Some(1_000_000),
                    max_parallel: Some(64),
                }),
                pricing: Some(Pricing {
                    input_per_million: 0.15 + (i % 10) as f64 * 0.05,
                    output_per_million: 0.6 + (i % 10) as f64 * 0.1,
                    cached_input_per_million: None,
                }),
                context_window: Some(32_768),
                timeouts: None,
                health_check: None,
                mock: None,
            },
        );
        m.metadata.namespace = Some("models".into());
        o.models.push(m);
    }
    let mut rng = 0x7011_6A7E_u64;
    for i in 0..keys {
        let ns = format!("team-{:02}", i % TEAMS);
        let secret_name = format!("key-{i:05}-secret");
        // The shape of a generated key: "sk-tg-" and 64 hex digits.
        let key: String = (0..4).fold(String::from("sk-tg-"), |mut s, _| {
            s.push_str(&format!("{:016x}", splitmix(&mut rng)));
            s
        });
        o.secrets.push(secret(&ns, &secret_name, "key", key));
        let team = format!("team-{:02}", i % TEAMS);
        let mut k = VirtualKey::new(
            &format!("key-{i:05}"),
            VirtualKeySpec {
                secret_ref: Some(SecretKeyRef {
                    name: secret_name,
                    key: None,
                }),
                models: match i % 4 {
                    0 => Vec::new(),
                    1 => vec![model_name(i, names)],
                    _ => vec![model_name(i, names), model_name(i + 1, names)],
                },
                team: (i % 2 == 0).then(|| team.clone()),
                alias: (i % 3 == 0).then(|| format!("service {i} ({team})")),
                budget: (i % 3 == 0).then(|| Budget {
                    max_usd: 50.0 + (i % 7) as f64,
                    duration: Some("monthly".into()),
                }),
                // The first key of each team sets the team's budget (keys 0, 2, 4, ... have a
                // team; i < 2 * TEAMS covers each team once).
                team_budget: (i % 2 == 0 && i < 2 * TEAMS).then(|| Budget {
                    max_usd: 1_000.0,
                    duration: Some("monthly".into()),
                }),
                limits: (i % 5 == 0).then_some(Limits {
                    rpm: Some(60),
                    tpm: Some(100_000),
                    max_parallel: None,
                }),
                expires_at: None,
            },
        );
        k.metadata.namespace = Some(ns);
        o.keys.push(k);
    }
    // Policy j routes model 2j and falls back to model 2j+1, which no policy routes: no loops.
    for j in 0..POLICIES.min(names / 2) {
        let mut p = RoutePolicy::new(
            &format!("policy-{j:02}"),
            RoutePolicySpec {
                models: vec![model_name(2 * j, names)],
                strategy: Some(if j % 2 == 0 {
                    Strategy::LeastBusy
                } else {
                    Strategy::LatencyBased
                }),
                retries: Some(Retries {
                    attempts: Some(3),
                    backoff: Some("100ms".into()),
                    retry_on: Vec::new(),
                }),
                fallbacks: vec![model_name(2 * j + 1, names)],
                context_window_fallbacks: Vec::new(),
                cooldown: None,
                timeouts: None,
                cache: None,
            },
        );
        p.metadata.namespace = Some("models".into());
        o.policies.push(p);
    }
    if served {
        let mut n = 0;
        for x in &mut o.secrets {
            n += 1;
            as_served(x, n, false);
        }
        for x in &mut o.models {
            n += 1;
            as_served(x, n, true);
        }
        for x in &mut o.keys {
            n += 1;
            as_served(x, n, true);
        }
        for x in &mut o.policies {
            n += 1;
            as_served(x, n, true);
        }
    }
    o
}

/// The objects as one multi-document YAML file, as `kubectl apply -f` (or `--manifests`) reads
/// (names and namespaces only: no metadata the API server adds).
fn to_yaml(o: &Objects) -> String {
    fn doc<K: kube::Resource + Clone + serde::Serialize>(out: &mut String, obj: &K) {
        let mut obj = obj.clone();
        let meta = obj.meta_mut();
        *meta = meta_of(meta);
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&obj).expect("objects serialize to YAML"));
    }
    fn meta_of(m: &ObjectMeta) -> ObjectMeta {
        ObjectMeta {
            name: m.name.clone(),
            namespace: m.namespace.clone(),
            ..Default::default()
        }
    }
    let mut out = String::new();
    o.secrets.iter().for_each(|x| doc(&mut out, x));
    o.models.iter().for_each(|x| doc(&mut out, x));
    o.keys.iter().for_each(|x| doc(&mut out, x));
    o.policies.iter().for_each(|x| doc(&mut out, x));
    out
}

struct Row {
    step: &'static str,
    times: Vec<Duration>,
}

impl Row {
    fn median(&self) -> Duration {
        let mut t = self.times.clone();
        t.sort();
        t[t.len() / 2]
    }
    fn max(&self) -> Duration {
        self.times.iter().copied().max().unwrap_or_default()
    }
}

/// Runs `f` `iters` times, timing each; returns the times and the last result.
fn time<T>(step: &'static str, iters: usize, mut f: impl FnMut() -> T) -> (Row, T) {
    let mut times = Vec::with_capacity(iters);
    let mut last = None;
    for _ in 0..iters {
        let t = Instant::now();
        let out = std::hint::black_box(f());
        times.push(t.elapsed());
        last = Some(out);
    }
    (Row { step, times }, last.expect("iters >= 1"))
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn kib(n: usize) -> String {
    format!("{:.0} KiB", n as f64 / 1024.0)
}

fn main() {
    let a = args();
    let t = Instant::now();
    let objects = generate(a.keys, a.models, !a.bare);
    println!(
        "generated {} LLMModels ({} model names), {} VirtualKeys, {} RoutePolicies, {} Secrets{} in {}",
        objects.models.len(),
        MODEL_NAMES.min(a.models).max(1),
        objects.keys.len(),
        objects.policies.len(),
        objects.secrets.len(),
        if a.bare {
            " (bare: no API-server metadata)"
        } else {
            " with API-server metadata (managedFields, last-applied annotation)"
        },
        ms(t.elapsed())
    );

    let mut rows = Vec::new();
    let (row, _) = time("clone objects (operator, every reconcile)", a.iters, || {
        objects.clone()
    });
    rows.push(row);
    let (row, (config, errors)) = time("compile (operator, every reconcile)", a.iters, || {
        compile(&objects)
    });
    rows.push(row);
    assert!(
        errors.is_empty(),
        "the generated objects should compile cleanly: {:?}",
        &errors[..errors.len().min(5)]
    );
    assert_eq!(config.keys.len(), a.keys);
    assert_eq!(
        config
            .models
            .values()
            .map(|g| g.deployments.len())
            .sum::<usize>(),
        a.models
    );
    let (row, hash) = time("content_hash (operator, every reconcile)", a.iters, || {
        config.content_hash()
    });
    rows.push(row);
    let (row, published) = time("encode: JSON + gzip (operator, on change)", a.iters, || {
        encode(&config)
    });
    rows.push(row);
    assert_eq!(published.hash, hash);
    let parts: Vec<Option<&[u8]>> = published
        .shards
        .iter()
        .map(|s| Some(s.as_slice()))
        .collect();
    let (row, decoded) = time(
        "decode: gunzip + JSON (each pod, on change)",
        a.iters,
        || decode(&published.hash, &parts),
    );
    rows.push(row);
    assert!(
        decoded.expect("the config decodes") == config,
        "the config round-trips"
    );
    let yaml = to_yaml(&objects);
    let (row, parsed) = time(
        "parse manifests as YAML (standalone, on change)",
        a.iters.min(3),
        || {
            let mut o = Objects::default();
            let e = tollgate_crds::manifest::parse_into(&mut o, &yaml, "scale.yaml");
            (o, e)
        },
    );
    rows.push(row);
    assert!(
        parsed.1.is_empty(),
        "{:?}",
        &parsed.1[..parsed.1.len().min(3)]
    );
    assert_eq!(parsed.0.keys.len(), a.keys);
    let (row, json_bytes) = time("comparison: JSON serialization alone", a.iters, || {
        serde_json::to_vec(&config).expect("the config serializes")
    });
    rows.push(row);
    let (row, fast) = time("comparison: gzip level 1 (encode uses 6)", a.iters, || {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &json_bytes).expect("gzip to memory");
        gz.finish().expect("gzip to memory")
    });
    rows.push(row);

    let json = json_bytes.len();
    let zipped: usize = published.shards.iter().map(Vec::len).sum();
    let largest = published.shards.iter().map(Vec::len).max().unwrap_or(0);

    println!();
    println!(
        "| step ({} keys, {} models, {} iterations) | median | max |",
        a.keys, a.models, a.iters
    );
    println!("|---|---:|---:|");
    for r in &rows {
        println!(
            "| {} ({} runs) | {} | {} |",
            r.step,
            r.times.len(),
            ms(r.median()),
            ms(r.max())
        );
    }
    println!();
    println!("| size | value |");
    println!("|---|---:|");
    println!("| manifests as YAML | {} |", kib(yaml.len()));
    println!("| config JSON | {} |", kib(json));
    println!(
        "| gzipped | {} ({:.0}% of the JSON) |",
        kib(zipped),
        100.0 * zipped as f64 / json.max(1) as f64
    );
    println!(
        "| gzipped at level 1 (comparison) | {} ({:.0}% of the JSON) |",
        kib(fast.len()),
        100.0 * fast.len() as f64 / json.max(1) as f64
    );
    println!(
        "| shards (at most {} each) | {} |",
        kib(SHARD_BYTES),
        published.shards.len()
    );
    println!(
        "| largest shard: raw / base64 in a Secret's JSON | {} / {} |",
        kib(largest),
        kib(largest.div_ceil(3) * 4)
    );
    println!(
        "| headroom under the 1 MiB Secret limit (raw bytes) | {} |",
        kib((1 << 20) - largest)
    );
}
