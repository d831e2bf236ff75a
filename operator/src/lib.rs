//! `tollgate-operator`: turns the cluster's LLMModels, VirtualKeys and RoutePolicies (and the
//! Secrets they reference) into the data plane's config, and reports on every object.
//!
//! The config is global (a model group spans LLMModels, a fallback spans RoutePolicies), so
//! instead of one controller per kind the operator keeps a reflector (a watched, in-memory
//! copy) of each kind and runs one reconcile over all of them whenever anything changes,
//! after a short quiet time that batches bursts (`kubectl apply -f dir/`):
//!
//! ```text
//! stores ──► fetch (referenced Secrets; generate missing key Secrets)
//!        ──► compile()            pure: GatewayConfig + one error list per object
//!        ──► publish              sharded, gzipped Secrets, head written last (changed hash only)
//!        ──► status               pure desired status ► patch only what differs, Events on flips
//! ```
//!
//! One object's error is reported on that object and leaves it out of the config; the rest
//! keep serving. Nothing is published until every store has listed once, so a restarting
//! operator never publishes a half-seen cluster. With several replicas, a Lease elects the one
//! that writes ([`leader`]); the others keep their watches warm to take over at once.

pub mod admin;
pub mod backends;
pub mod keys;
pub mod leader;
pub mod publish;
pub mod spend;
pub mod status;

use anyhow::Context as _;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::DynamicObject;
use kube::api::{Api, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tollgate_crds::compile::{DEFAULT_NAMESPACE, Objects};
use tollgate_crds::{LlmModel, RoutePolicy, VirtualKey};

/// Command-line flags (each with an environment variable).
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "tollgate-operator", version, about)]
pub struct Args {
    /// Namespace the config Secrets are published in: where the data-plane pods run.
    #[arg(
        long,
        env = "TOLLGATE_CONFIG_NAMESPACE",
        default_value = "tollgate-system"
    )]
    pub config_namespace: String,
    /// Name of the head config Secret (shards are named after it).
    #[arg(long, env = "TOLLGATE_CONFIG_NAME", default_value = tollgate_crds::publish::DEFAULT_NAME)]
    pub config_name: String,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "TOLLGATE_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, env = "TOLLGATE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Quiet time after a change before reconciling (batches bursts of changes).
    #[arg(long, env = "TOLLGATE_DEBOUNCE", default_value = "50ms", value_parser = duration)]
    pub debounce: Duration,
    /// Name of the Lease (in `--config-namespace`) that elects the one replica that writes.
    #[arg(long, env = "TOLLGATE_LEASE_NAME", default_value = "tollgate-operator")]
    pub lease_name: String,
    /// How long the leader's lease lasts without renewal: a standby takes over within it.
    #[arg(long, env = "TOLLGATE_LEASE_DURATION", default_value = "15s", value_parser = duration)]
    pub lease_duration: Duration,
    /// This replica's identity in the Lease (default: `$POD_NAME`, else host name and pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Redis holding the usage stream the data-plane pods write (`--redis-url` of the data
    /// plane): spend is folded from it into VirtualKey and LLMModel status. Without it, status
    /// has no spend.
    #[arg(long, env = "TOLLGATE_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// How often new usage is folded into status.
    #[arg(long, env = "TOLLGATE_SPEND_INTERVAL", default_value = "1s", value_parser = duration)]
    pub spend_interval: Duration,
    /// Master key of the LiteLLM-compatible admin API (`/key/generate`, ...). Without it the
    /// admin API is off.
    #[arg(long, env = "TOLLGATE_MASTER_KEY", hide_env_values = true)]
    pub master_key: Option<String>,
    /// Address of the admin API.
    #[arg(long, env = "TOLLGATE_ADMIN_ADDR", default_value = "0.0.0.0:4001")]
    pub admin_addr: SocketAddr,
    /// Namespace keys made through the admin API are created in (default: `--config-namespace`).
    #[arg(long, env = "TOLLGATE_ADMIN_NAMESPACE")]
    pub admin_namespace: Option<String>,
    /// Log format: `text` or `json`.
    #[arg(long, env = "TOLLGATE_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

fn duration(s: &str) -> Result<Duration, String> {
    tollgate_crds::common::parse_duration(s)
}

/// The watched copies of everything the config is made of.
#[derive(Clone)]
struct Stores {
    models: Store<LlmModel>,
    keys: Store<VirtualKey>,
    policies: Store<RoutePolicy>,
    secrets: Store<Secret>,
    services: Store<Service>,
    /// EndpointSlices, and whether the cluster serves their API (v1: Kubernetes 1.21+).
    slices: (Store<EndpointSlice>, Arc<AtomicBool>),
    /// KServe InferenceServices, and whether KServe is installed.
    inference_services: (Store<DynamicObject>, Arc<AtomicBool>),
}

/// What a kind needs to be watched into a store.
trait Watched:
    kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static
{
}

impl<K> Watched for K where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

/// Watches an API that may not be served (a CRD not installed, an API version too new): the
/// flag says whether it is, and the watch keeps retrying so it is picked up once installed.
fn watch_optional<K>(
    api: Api<K>,
    dyntype: K::DynamicType,
    changed: Arc<Notify>,
) -> (Store<K>, Arc<AtomicBool>)
where
    K: Watched,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let writer = reflector::store::Writer::new(dyntype.clone());
    let store = writer.as_reader();
    let available = Arc::new(AtomicBool::new(false));
    let flag = available.clone();
    let kind = K::kind(&dyntype).to_string();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(strip_managed_fields)
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                // A (re)list under way: nothing to act on until it is done. (A watch of an API
                // that isn't served starts a list on every retry; waking on those cost two
                // idle passes per retry.)
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Ok(_) => {
                    flag.store(true, Ordering::Relaxed);
                    changed.notify_one();
                }
                Err(e) => {
                    let missing = matches!(
                        &e,
                        watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404
                    );
                    if missing {
                        if flag.swap(false, Ordering::Relaxed) {
                            changed.notify_one();
                        }
                        tracing::debug!(
                            kind,
                            "API not served by this cluster (checked again later)"
                        );
                    } else {
                        tracing::warn!(kind, "watch error (retrying): {e}");
                    }
                }
            }
        }
    });
    (store, available)
}

/// Watches `api` into a store, waking `changed` on every event.
fn watch<K>(api: Api<K>, changed: Arc<Notify>) -> Store<K>
where
    K: Watched,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    watch_filtered(api, changed, |_| true)
}

/// Like [`watch`], waking `changed` only for objects `relevant` says matter (the operator's
/// own config Secrets, for one, change only because it wrote them).
fn watch_filtered<K>(
    api: Api<K>,
    changed: Arc<Notify>,
    relevant: impl Fn(&K) -> bool + Send + 'static,
) -> Store<K>
where
    K: Watched,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    watch_with(api, changed, move |ev| match ev {
        watcher::Event::Apply(o) | watcher::Event::Delete(o) => relevant(o),
        _ => true,
    })
}

/// Like [`watch`] for the operator's own kinds (which have a status subresource): an update
/// that changed only the status wakes nothing. Those are mostly the operator's own status
/// writes; without this each change cost a second, idle pass (a full compile at 10k keys).
/// A change of spec (the generation), labels, annotations or deletion state wakes as before.
fn watch_spec<K>(api: Api<K>, changed: Arc<Notify>) -> Store<K>
where
    K: Watched,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let mut seen: HashMap<String, u64> = HashMap::new();
    watch_with(api, changed, move |ev| match ev {
        watcher::Event::Apply(o) => {
            let (uid, fp) = spec_fingerprint(o.meta());
            seen.insert(uid, fp) != Some(fp)
        }
        watcher::Event::InitApply(o) => {
            let (uid, fp) = spec_fingerprint(o.meta());
            seen.insert(uid, fp);
            false
        }
        watcher::Event::Delete(o) => {
            seen.remove(o.meta().uid.as_deref().unwrap_or_default());
            true
        }
        watcher::Event::Init => {
            seen.clear();
            false
        }
        watcher::Event::InitDone => true,
    })
}

/// Watches `api` into a store (without managedFields), waking `changed` on the events `wakes`
/// says matter.
fn watch_with<K>(
    api: Api<K>,
    changed: Arc<Notify>,
    mut wakes: impl FnMut(&watcher::Event<K>) -> bool + Send + 'static,
) -> Store<K>
where
    K: Watched,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store();
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(strip_managed_fields)
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(ev) => {
                    if wakes(&ev) {
                        changed.notify_one();
                    }
                }
                Err(e) => tracing::warn!(kind, "watch error (retrying): {e}"),
            }
        }
    });
    store
}

/// Drops `metadata.managedFields` before an object is stored: nothing here reads them, and they
/// are often the largest part of an object, copied on every pass (see [`owned`]).
fn strip_managed_fields<K: kube::Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
}

/// An object's uid, and a hash of what a status-only update leaves alone.
fn spec_fingerprint(meta: &kube::api::ObjectMeta) -> (String, u64) {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    meta.generation.hash(&mut h);
    meta.labels.hash(&mut h);
    meta.annotations.hash(&mut h);
    meta.deletion_timestamp.as_ref().map(|t| t.0).hash(&mut h);
    meta.owner_references
        .as_ref()
        .map(|o| o.iter().map(|r| &r.uid).collect::<Vec<_>>())
        .hash(&mut h);
    (meta.uid.clone().unwrap_or_default(), h.finish())
}

fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Operator metrics.
mod metric {
    pub const RECONCILES: &str = "tollgate_operator_reconciles_total";
    pub const DURATION: &str = "tollgate_operator_reconcile_duration_seconds";
    pub const PUBLISHED: &str = "tollgate_operator_config_publishes_total";
    pub const INVALID: &str = "tollgate_operator_invalid_objects";
    pub const STATUS_WRITES: &str = "tollgate_operator_status_writes_total";
}

/// Runs the operator until the process is stopped.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    serve_health(args.metrics_addr, prometheus, ready.clone()).await?;

    let changed = Arc::new(Notify::new());
    let ns = args.watch_namespace.as_deref();
    let stores = Stores {
        models: watch_spec(api::<LlmModel>(&client, ns), changed.clone()),
        keys: watch_spec(api::<VirtualKey>(&client, ns), changed.clone()),
        policies: watch_spec(api::<RoutePolicy>(&client, ns), changed.clone()),
        secrets: watch_filtered(api::<Secret>(&client, ns), changed.clone(), |s: &Secret| {
            !s.labels().contains_key(tollgate_crds::publish::LABEL)
        }),
        services: watch(api::<Service>(&client, ns), changed.clone()),
        slices: watch_optional(api::<EndpointSlice>(&client, ns), (), changed.clone()),
        inference_services: {
            let ar = ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("serving.kserve.io", "v1beta1", "InferenceService"),
                "inferenceservices",
            );
            let api = match ns {
                Some(ns) => Api::<DynamicObject>::namespaced_with(client.clone(), ns, &ar),
                None => Api::<DynamicObject>::all_with(client.clone(), &ar),
            };
            watch_optional(api, ar, changed.clone())
        },
    };
    for (kind, fut) in [
        (
            "LLMModel",
            Box::pin(stores.models.wait_until_ready())
                as std::pin::Pin<Box<dyn Future<Output = _> + Send>>,
        ),
        ("VirtualKey", Box::pin(stores.keys.wait_until_ready())),
        ("RoutePolicy", Box::pin(stores.policies.wait_until_ready())),
        ("Secret", Box::pin(stores.secrets.wait_until_ready())),
        ("Service", Box::pin(stores.services.wait_until_ready())),
    ] {
        fut.await.with_context(|| format!("watching {kind}"))?;
    }
    tracing::info!("watches synced; reconciling");
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "tollgate-operator".into(),
            instance: std::env::var("POD_NAME").ok(),
        },
    );
    let mut ctx = Ctx {
        client,
        args,
        stores,
        recorder,
        published: None,
        spend: Arc::new(spend::SpendView::default()),
        compiled: Arc::default(),
    };
    if let Some(master) = ctx.args.master_key.clone() {
        let state = admin::AdminState {
            client: ctx.client.clone(),
            master: tollgate_crds::config::KeyHash::of(master.trim()),
            namespace: ctx
                .args
                .admin_namespace
                .clone()
                .unwrap_or_else(|| ctx.args.config_namespace.clone()),
            config: ctx.compiled.clone(),
            keys: ctx.stores.keys.clone(),
            models: ctx.stores.models.clone(),
        };
        let listener = tokio::net::TcpListener::bind(ctx.args.admin_addr)
            .await
            .with_context(|| format!("binding the admin API to {}", ctx.args.admin_addr))?;
        tracing::info!(addr = %listener.local_addr()?, "admin API listening");
        tokio::spawn(async move {
            let _ = axum::serve(listener, admin::router(state)).await;
        });
    }
    let leadership = Arc::new(leader::Leadership::default());
    let election = leader::Election {
        name: ctx.args.lease_name.clone(),
        namespace: ctx.args.config_namespace.clone(),
        identity: ctx.args.identity.clone().unwrap_or_else(default_identity),
        duration: ctx.args.lease_duration,
        renew: (ctx.args.lease_duration / 5).max(Duration::from_millis(200)),
    };
    tokio::spawn(leader::run(
        ctx.client.clone(),
        election,
        leadership.clone(),
    ));
    if let Some(url) = ctx.args.redis_url.clone() {
        tokio::spawn(spend::run(
            ctx.client.clone(),
            url,
            ctx.args.spend_interval,
            ctx.stores.keys.clone(),
            ctx.stores.models.clone(),
            leadership.clone(),
            ctx.spend.clone(),
            changed.clone(),
        ));
    }
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    let resync = Duration::from_secs(60);
    let mut was_leader = false;
    loop {
        // A change, leadership gained, or the periodic resync (which retries what failed).
        tokio::select! {
            _ = changed.notified() => {}
            _ = leadership.gained.notified() => {}
            _ = tokio::time::sleep(resync) => {}
        }
        tokio::time::sleep(ctx.args.debounce).await;
        if !leadership.is_leader() {
            was_leader = false;
            continue;
        }
        if !was_leader {
            // Another replica may have published since this one last looked.
            ctx.published = publish::current_hash(
                &ctx.client,
                &ctx.args.config_namespace,
                &ctx.args.config_name,
            )
            .await
            .unwrap_or(None);
            was_leader = true;
        }
        let started = Instant::now();
        let result = reconcile(&mut ctx).await;
        metrics::histogram!(metric::DURATION).record(started.elapsed().as_secs_f64());
        tracing::debug!(
            took_ms = started.elapsed().as_millis() as u64,
            ok = result.is_ok(),
            "reconcile pass"
        );
        match result {
            Ok(()) => metrics::counter!(metric::RECONCILES, "result" => "ok").increment(1),
            Err(e) => {
                metrics::counter!(metric::RECONCILES, "result" => "error").increment(1);
                tracing::error!("reconcile failed (retrying in 1s): {e:#}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                changed.notify_one();
            }
        }
    }
}

struct Ctx {
    client: Client,
    args: Args,
    stores: Stores,
    recorder: Recorder,
    /// Hash of the config last published (or found published at start).
    published: Option<String>,
    /// Budget state from the folded spend.
    spend: Arc<spend::SpendView>,
    /// The last compiled config, for the admin API's key lookups.
    compiled: Arc<std::sync::RwLock<Arc<tollgate_crds::GatewayConfig>>>,
}

/// Copies of everything in `store` (compile() takes owned objects).
fn owned<K>(store: &Store<K>) -> Vec<K>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store.state().iter().map(|o| (**o).clone()).collect()
}

/// One pass: fetch → compile → publish → status.
async fn reconcile(ctx: &mut Ctx) -> anyhow::Result<()> {
    let models = owned(&ctx.stores.models);
    let keys = owned(&ctx.stores.keys);
    let policies = owned(&ctx.stores.policies);

    // Keys with no Secret of their own get a generated one.
    let generated = keys::ensure_generated(&ctx.client, &keys, &ctx.stores.secrets).await?;

    // Only the Secrets the objects reference are read (and published, for credentials).
    let mut wanted: BTreeSet<(String, String)> = BTreeSet::new();
    for m in &models {
        if let Some(r) = &m.spec.credentials_ref {
            wanted.insert((ns_of(m), r.name.clone()));
        }
    }
    for k in &keys {
        let name = match &k.spec.secret_ref {
            Some(r) => r.name.clone(),
            None => tollgate_crds::compile::generated_key_secret_name(&k.name_any()),
        };
        wanted.insert((ns_of(k), name));
    }
    let mut secrets: Vec<Secret> = wanted
        .iter()
        .filter_map(|(ns, name)| {
            ctx.stores
                .secrets
                .get(&ObjectRef::new(name).within(ns))
                .map(|s| (*s).clone())
        })
        .collect();
    for s in generated {
        if !secrets.iter().any(|x| {
            x.metadata.name == s.metadata.name && x.metadata.namespace == s.metadata.namespace
        }) {
            secrets.push(s);
        }
    }
    let services = ctx.stores.services.state();
    let slices = ctx.stores.slices.0.state();
    let isvcs = ctx.stores.inference_services.0.state();
    let seen = backends::Seen {
        services: services.iter().map(|s| &**s).collect(),
        slices: ctx
            .stores
            .slices
            .1
            .load(Ordering::Relaxed)
            .then(|| slices.iter().map(|s| &**s).collect()),
        inference_services: ctx
            .stores
            .inference_services
            .1
            .load(Ordering::Relaxed)
            .then(|| isvcs.iter().map(|s| &**s).collect()),
    };
    let (resolved_backends, backend_errors) = backends::resolve(&models, &seen);
    let objects = Objects {
        models,
        keys,
        policies,
        secrets,
        resolved_backends,
        backend_errors,
    };
    let (config, errors) = tollgate_crds::compile(&objects);
    let config = Arc::new(config);
    *ctx.compiled.write().unwrap_or_else(|e| e.into_inner()) = config.clone();
    metrics::gauge!(metric::INVALID).set(errors.len() as f64);

    let hash = config.content_hash();
    if ctx.published.as_deref() != Some(hash.as_str()) {
        let p = tollgate_crds::publish::encode(&config);
        publish::publish(
            &ctx.client,
            &ctx.args.config_namespace,
            &ctx.args.config_name,
            &p,
        )
        .await
        .context("publishing the config")?;
        metrics::counter!(metric::PUBLISHED).increment(1);
        tracing::info!(
            hash,
            models = config.models.len(),
            keys = config.keys.len(),
            shards = p.shards.len(),
            invalid = errors.len(),
            "published config"
        );
        ctx.published = Some(hash);
    }

    write_statuses(ctx, &objects, &errors).await;
    Ok(())
}

/// `host-pid`: unique enough for a replica that has no pod name.
fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "operator".into());
    format!("{host}-{}", std::process::id())
}

fn ns_of<K: Resource>(o: &K) -> String {
    o.meta()
        .namespace
        .clone()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string())
}

fn id_of<K: Resource>(o: &K) -> String {
    format!("{}/{}", ns_of(o), o.meta().name.as_deref().unwrap_or(""))
}

/// Writes each object's status where it differs from what it should be. A failed write is
/// logged and retried by the next resync; it never stops the others.
async fn write_statuses(ctx: &Ctx, objects: &Objects, errors: &[tollgate_crds::ObjectError]) {
    let by_object = status::errors_by_object(errors);
    let now = jiff::Timestamp::now().as_second();
    // Written concurrently (a bounded number at a time): after a bulk import, thousands of
    // first-time status writes must not hold up the next publish for long.
    let mut writes: Vec<std::pin::Pin<Box<dyn Future<Output = ()> + '_>>> = Vec::new();
    for m in &objects.models {
        let id = id_of(m);
        let e = by_object.get(&("LLMModel", id.clone()));
        let backend = match (
            objects.resolved_backends.get(&id),
            objects.backend_errors.get(&id),
        ) {
            (_, Some(err)) => Err(err.as_str()),
            (Some(urls), None) => Ok(urls.len()),
            (None, None)
                if m.spec.service_ref.is_some() || m.spec.inference_service_ref.is_some() =>
            {
                Err("not resolved yet")
            }
            (None, None) => Ok(1),
        };
        writes.push(Box::pin(update(
            ctx,
            m,
            status::model_conditions(e, backend),
        )));
    }
    for k in &objects.keys {
        let e = by_object.get(&("VirtualKey", id_of(k)));
        let expired = k
            .spec
            .expires_at
            .as_ref()
            .is_some_and(|t| t.0.as_second() <= now);
        writes.push(Box::pin(update(
            ctx,
            k,
            status::key_conditions(e, expired, ctx.spend.exceeded(&id_of(k))),
        )));
    }
    for p in &objects.policies {
        let e = by_object.get(&("RoutePolicy", id_of(p)));
        writes.push(Box::pin(update(ctx, p, status::policy_conditions(e))));
    }
    futures_util::stream::iter(writes)
        .buffer_unordered(STATUS_WRITES_IN_FLIGHT)
        .collect::<Vec<()>>()
        .await;
}

/// Status writes in flight at once.
const STATUS_WRITES_IN_FLIGHT: usize = 16;

/// Patches `obj`'s status to `want` (merged into its current conditions) unless it already
/// says that, and records an Event per condition that changed.
async fn update<K>(ctx: &Ctx, obj: &K, want: Vec<status::Want>)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + status::Reported
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let (current, observed) = obj.reported();
    let generation = obj.meta().generation;
    let desired = status::Desired {
        observed_generation: generation,
        conditions: status::merge(current, &want, generation),
    };
    if status::up_to_date(observed, current, &desired) {
        return;
    }
    let name = obj.meta().name.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns_of(obj));
    let patch = serde_json::json!({
        "status": {
            "observedGeneration": desired.observed_generation,
            "conditions": desired.conditions,
        }
    });
    match api
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            metrics::counter!(metric::STATUS_WRITES, "result" => "ok").increment(1);
            for c in status::transitions(current, &desired) {
                let ev = Event {
                    type_: if c.status == "True" || c.type_ == "Expired" {
                        EventType::Normal
                    } else {
                        EventType::Warning
                    },
                    reason: c.reason.clone(),
                    note: Some(format!("{} is {}: {}", c.type_, c.status, c.message)),
                    action: "Reconcile".into(),
                    secondary: None,
                };
                if let Err(e) = ctx
                    .recorder
                    .publish(&ev, &obj.object_ref(&Default::default()))
                    .await
                {
                    tracing::debug!(object = %id_of(obj), "event not recorded: {e}");
                }
            }
        }
        Err(e) => {
            metrics::counter!(metric::STATUS_WRITES, "result" => "error").increment(1);
            tracing::warn!(object = %id_of(obj), "status not written (retried on the next pass): {e}");
        }
    }
}

/// Serves `/healthz`, `/readyz` (once the watches synced) and `/metrics`.
async fn serve_health(
    addr: SocketAddr,
    prometheus: metrics_exporter_prometheus::PrometheusHandle,
    ready: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(std::sync::atomic::Ordering::Relaxed);
                async move {
                    if ready {
                        (axum::http::StatusCode::OK, "ready")
                    } else {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "syncing")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let text = prometheus.render();
                async move { text }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, "health and metrics listening");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(())
}
