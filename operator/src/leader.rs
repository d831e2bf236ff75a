//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator replicas
//! exactly one publishes config and writes status while the others keep warm watches.
//!
//! The holder renews the Lease every `renew` interval; a standby takes it over once
//! `renewTime + leaseDurationSeconds` has passed without a renewal. Every write uses the
//! Lease's `resourceVersion` (optimistic concurrency), so two candidates can't both win. A
//! leader that fails to renew stops acting as leader when its own lease would have expired,
//! before any standby may take over.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Leader election settings.
#[derive(Clone, Debug)]
pub struct Election {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This replica's identity (pod name, or host and pid).
    pub identity: String,
    /// How long a lease is valid without renewal.
    pub duration: Duration,
    /// How often the holder renews (and a standby retries).
    pub renew: Duration,
}

/// Whether this replica leads, as of now.
#[derive(Debug, Default)]
pub struct Leadership {
    /// Leading until this instant (ms since `base`); 0: not leading.
    until_ms: AtomicU64,
    base: std::sync::OnceLock<Instant>,
    /// Woken when this replica becomes leader.
    pub gained: Notify,
}

impl Leadership {
    fn now_ms(&self) -> u64 {
        self.base.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
    }

    /// Whether this replica may act as leader now.
    pub fn is_leader(&self) -> bool {
        self.until_ms.load(Ordering::Relaxed) > self.now_ms()
    }

    fn lead_until(&self, from: Instant, d: Duration) {
        let base = *self.base.get_or_init(Instant::now);
        let until = (from + d).saturating_duration_since(base).as_millis() as u64;
        self.until_ms.store(until, Ordering::Relaxed);
    }

    fn resign(&self) {
        self.until_ms.store(0, Ordering::Relaxed);
    }
}

fn now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

/// One attempt to acquire or renew. Returns whether this replica holds the lease.
async fn attempt(api: &Api<Lease>, e: &Election) -> kube::Result<bool> {
    let secs = e.duration.as_secs().max(1) as i32;
    let Some(mut lease) = api.get_opt(&e.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(e.name.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(e.identity.clone()),
                lease_duration_seconds: Some(secs),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(err) => Err(err),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let mine = spec.holder_identity.as_deref() == Some(e.identity.as_str());
    if !mine {
        let held_for =
            Duration::from_secs(spec.lease_duration_seconds.unwrap_or(secs).max(1) as u64);
        let expired = spec.renew_time.as_ref().is_none_or(|t| {
            jiff::Timestamp::now().duration_since(t.0).as_millis() > held_for.as_millis() as i128
        }) || spec.holder_identity.as_deref().unwrap_or("").is_empty();
        if !expired {
            return Ok(false);
        }
        spec.holder_identity = Some(e.identity.clone());
        spec.acquire_time = Some(now());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(now());
    spec.lease_duration_seconds = Some(secs);
    // The resourceVersion read above makes this a compare-and-swap.
    match api.replace(&e.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(err) => Err(err),
    }
}

/// Campaigns for, and keeps renewing, the lease for as long as the process runs.
pub async fn run(client: Client, e: Election, leadership: Arc<Leadership>) {
    let api: Api<Lease> = Api::namespaced(client, &e.namespace);
    let mut leading = false;
    loop {
        let started = Instant::now();
        match attempt(&api, &e).await {
            Ok(true) => {
                // Valid for the lease duration from when we asked, less a margin for clock
                // and network: we stop before any standby can start.
                leadership.lead_until(started, e.duration.mul_f64(0.8));
                if !leading {
                    leading = true;
                    tracing::info!(identity = e.identity, lease = e.name, "became leader");
                    metrics::gauge!("tollgate_operator_leader").set(1.0);
                    leadership.gained.notify_one();
                }
            }
            Ok(false) => {
                if leading {
                    tracing::warn!(identity = e.identity, "lost the lease to another replica");
                    metrics::gauge!("tollgate_operator_leader").set(0.0);
                }
                leading = false;
                leadership.resign();
            }
            Err(err) => {
                tracing::warn!("renewing the lease failed: {err}");
                if leading && !leadership.is_leader() {
                    tracing::warn!(
                        identity = e.identity,
                        "lease expired unrenewed; standing down"
                    );
                    metrics::gauge!("tollgate_operator_leader").set(0.0);
                    leading = false;
                }
            }
        }
        tokio::time::sleep(e.renew).await;
    }
}
