//! Spend into status: the leader folds the usage records that data-plane pods append to the
//! Redis stream `tollgate:usage` into running totals, and writes them to VirtualKey and
//! LLMModel status.
//!
//! Folding is exactly-once: the totals, the stream position they include (the watermark), the
//! ids of the records folded (to skip a record appended twice) and the trimming of the folded
//! entries from the stream change together, in one `MULTI`/`EXEC` guarded by `WATCH` on the
//! watermark. An operator that
//! dies between reading and committing a batch commits nothing, and the next leader folds the
//! batch again from the same watermark; two operators that both believe they lead can't both
//! commit the same batch.
//!
//! Totals live in Redis hashes (`tollgate:spend:key:<ns/name>`, `tollgate:spend:model:<ns/name>`:
//! `total` pico-dollars, `requests`, `prompt`, `completion`, and per key `p:<period>:<index>`
//! for the budget period a record fell in). Status is a copy of them, written only for objects
//! whose totals changed (plus a full pass every minute, for period roll-overs), so status
//! writes are batched per fold, never one per request.

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use redis::AsyncCommands;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tollgate_crds::config::{BudgetPeriod, Picodollars};
use tollgate_crds::usage::{STREAM, UsageRecord};
use tollgate_crds::{LlmModel, VirtualKey};

/// The stream position folded so far.
pub const WATERMARK: &str = "tollgate:spend:watermark";
/// Records folded per transaction.
const BATCH: usize = 1000;

/// What the spend task shares with the reconcile loop: whether each key's budget is spent.
#[derive(Debug, Default)]
pub struct SpendView {
    exceeded: Mutex<HashMap<String, bool>>,
}

impl SpendView {
    /// Whether key `id` (`namespace/name`) has spent its budget this period, if known.
    pub fn exceeded(&self, id: &str) -> Option<bool> {
        self.exceeded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .copied()
    }

    /// Records `value`; returns whether it changed.
    fn set(&self, id: &str, value: Option<bool>) -> bool {
        let mut m = self.exceeded.lock().unwrap_or_else(|e| e.into_inner());
        let old = match value {
            Some(v) => m.insert(id.to_string(), v),
            None => m.remove(id),
        };
        old != value
    }
}

/// The label of a budget period in the totals' field names.
fn period_label(p: BudgetPeriod) -> String {
    match p {
        BudgetPeriod::Lifetime => "l".into(),
        BudgetPeriod::Daily => "d".into(),
        BudgetPeriod::Weekly => "w".into(),
        BudgetPeriod::Monthly => "m".into(),
        BudgetPeriod::Seconds(s) => format!("s{s}"),
    }
}

/// The budget period of each key, from its spec (`None`: no budget).
fn key_periods(keys: &Store<VirtualKey>) -> HashMap<String, (BudgetPeriod, Picodollars)> {
    keys.state()
        .iter()
        .filter_map(|k| {
            let b = k.spec.budget.as_ref()?;
            let period = match &b.duration {
                Some(d) => tollgate_crds::compile::budget_period(d).ok()?,
                None => BudgetPeriod::Lifetime,
            };
            Some((
                format!("{}/{}", k.namespace().unwrap_or_default(), k.name_any()),
                (period, Picodollars::from_usd(b.max_usd)?),
            ))
        })
        .collect()
}

/// The ids of recently folded records, in Redis (a sorted set, scored by the time of their
/// stream entry), so that a record a data-plane pod appended twice (its write retried after it
/// had in fact succeeded) is folded once, by whichever operator leads: the set changes in the
/// same transaction as the watermark, so it survives an operator's failover with it. Such a
/// duplicate follows the original within seconds; the last [`RECENT`] ids cover that with
/// bounded memory.
pub const SEEN: &str = "tollgate:spend:seen";

/// How many record ids [`SEEN`] keeps.
const RECENT: usize = 200_000;

/// The stream id just after `id` (`<ms>-<seq>`): `XTRIM ... MINID` with it removes `id` and
/// everything before.
fn next_id(id: &str) -> Option<String> {
    let (ms, seq) = id.split_once('-')?;
    let (ms, seq) = (ms.parse::<u64>().ok()?, seq.parse::<u64>().ok()?);
    Some(match seq.checked_add(1) {
        Some(seq) => format!("{ms}-{seq}"),
        None => format!("{}-0", ms.checked_add(1)?),
    })
}

/// Increments of one fold.
#[derive(Debug, Default)]
struct Fold {
    keys: BTreeMap<String, BTreeMap<String, u64>>,
    models: BTreeMap<String, BTreeMap<String, u64>>,
}

impl Fold {
    fn add(&mut self, r: &UsageRecord, periods: &HashMap<String, (BudgetPeriod, Picodollars)>) {
        let k = self.keys.entry(r.key.to_string()).or_default();
        *k.entry("total".into()).or_default() += r.cost_pico;
        *k.entry("requests".into()).or_default() += r.requests;
        *k.entry("prompt".into()).or_default() += r.prompt_tokens;
        *k.entry("completion".into()).or_default() += r.completion_tokens;
        if let Some((p, _)) = periods.get(&*r.key) {
            let field = format!("p:{}:{}", period_label(*p), p.index(r.ts_ms / 1000));
            *k.entry(field).or_default() += r.cost_pico;
        }
        let m = self.models.entry(r.deployment.to_string()).or_default();
        *m.entry("total".into()).or_default() += r.cost_pico;
        *m.entry("requests".into()).or_default() += r.requests;
        *m.entry("prompt".into()).or_default() += r.prompt_tokens;
        *m.entry("completion".into()).or_default() += r.completion_tokens;
    }
}

/// Folds everything new in the stream. Returns the keys and models whose totals changed.
///
/// Each batch commits in one transaction: the totals, the watermark, the ids folded (in
/// [`SEEN`]), and the removal of the folded entries from the stream (which would otherwise grow
/// without end). A batch whose transaction fails (the watermark moved: another operator folded
/// it) is read again.
async fn fold(
    conn: &mut redis::aio::MultiplexedConnection,
    periods: &HashMap<String, (BudgetPeriod, Picodollars)>,
) -> redis::RedisResult<(BTreeSet<String>, BTreeSet<String>)> {
    let mut keys = BTreeSet::new();
    let mut models = BTreeSet::new();
    // Bounded per call: a large backlog is folded over several passes.
    for _ in 0..50 {
        redis::cmd("WATCH")
            .arg(WATERMARK)
            .query_async::<()>(conn)
            .await?;
        let wm: Option<String> = conn.get(WATERMARK).await?;
        let from = wm.map_or_else(|| "-".to_string(), |w| format!("({w}"));
        let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
            .arg(STREAM)
            .arg(&from)
            .arg("+")
            .arg("COUNT")
            .arg(BATCH)
            .query_async(conn)
            .await?;
        let Some((last, _)) = entries.last() else {
            redis::cmd("UNWATCH").query_async::<()>(conn).await?;
            break;
        };
        let records: Vec<(&str, Option<UsageRecord>)> = entries
            .iter()
            .map(|(id, fields)| {
                let r = fields
                    .get("record")
                    .and_then(|j| serde_json::from_str::<UsageRecord>(j).ok());
                (id.as_str(), r)
            })
            .collect();
        // Which of them were folded already (by this operator or another before a failover).
        let ids: Vec<&str> = records
            .iter()
            .filter_map(|(_, r)| r.as_ref().map(|r| r.id.as_str()))
            .collect();
        let seen: Vec<Option<f64>> = if ids.is_empty() {
            Vec::new()
        } else {
            redis::cmd("ZMSCORE")
                .arg(SEEN)
                .arg(&ids)
                .query_async(conn)
                .await?
        };
        let seen: std::collections::HashSet<&str> = ids
            .iter()
            .zip(&seen)
            .filter_map(|(id, s)| s.map(|_| *id))
            .collect();
        let mut f = Fold::default();
        let mut folded: Vec<(u64, &str)> = Vec::new();
        let mut in_batch = std::collections::HashSet::new();
        for (entry, r) in &records {
            match r {
                Some(r) if seen.contains(r.id.as_str()) || !in_batch.insert(r.id.as_str()) => {
                    tracing::debug!(record = r.id, "duplicate usage record skipped");
                }
                Some(r) => {
                    f.add(r, periods);
                    let ms = entry.split('-').next().and_then(|m| m.parse().ok());
                    folded.push((ms.unwrap_or(0), r.id.as_str()));
                }
                None => tracing::warn!(entry, "unreadable usage record skipped"),
            }
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (k, fields) in &f.keys {
            for (field, v) in fields {
                pipe.hincr(format!("tollgate:spend:key:{k}"), field, *v)
                    .ignore();
            }
        }
        for (m, fields) in &f.models {
            for (field, v) in fields {
                pipe.hincr(format!("tollgate:spend:model:{m}"), field, *v)
                    .ignore();
            }
        }
        pipe.set(WATERMARK, last).ignore();
        if !folded.is_empty() {
            pipe.zadd_multiple(SEEN, &folded).ignore();
            pipe.cmd("ZREMRANGEBYRANK")
                .arg(SEEN)
                .arg(0)
                .arg(-(RECENT as i64) - 1)
                .ignore();
        }
        if let Some(next) = next_id(last) {
            pipe.cmd("XTRIM")
                .arg(STREAM)
                .arg("MINID")
                .arg(next)
                .ignore();
        }
        // `None`: the watermark moved under us (another operator folded): start over.
        let committed: Option<()> = pipe.query_async(conn).await?;
        if committed.is_none() {
            tracing::warn!(
                "another replica folded usage concurrently; retrying from its watermark"
            );
            continue;
        }
        keys.extend(f.keys.into_keys());
        models.extend(f.models.into_keys());
        if entries.len() < BATCH {
            break;
        }
    }
    Ok((keys, models))
}

fn usd(pico: u64) -> String {
    Picodollars(pico).to_string()
}

/// Runs the fold-and-report loop for as long as the process runs; acts only while leading.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: Client,
    redis_url: String,
    every: Duration,
    keys: Store<VirtualKey>,
    models: Store<LlmModel>,
    leadership: Arc<crate::leader::Leadership>,
    view: Arc<SpendView>,
    changed: Arc<tokio::sync::Notify>,
) {
    let mut conn = None;
    let mut last_full = Instant::now() - Duration::from_secs(3600);
    loop {
        tokio::time::sleep(every).await;
        if !leadership.is_leader() {
            continue;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match redis::Client::open(redis_url.as_str()) {
                Ok(cl) => match cl.get_multiplexed_async_connection().await {
                    Ok(c) => conn.insert(c),
                    Err(e) => {
                        tracing::warn!("Redis unreachable for spend (retrying): {e}");
                        continue;
                    }
                },
                Err(e) => {
                    tracing::error!("invalid --redis-url: {e}");
                    return;
                }
            },
        };
        let periods = key_periods(&keys);
        let (mut dirty_keys, mut dirty_models) = match fold(c, &periods).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("folding usage failed (retrying): {e}");
                conn = None;
                continue;
            }
        };
        // Every minute, everything: budget periods roll over without new records.
        if last_full.elapsed() > Duration::from_secs(60) {
            last_full = Instant::now();
            dirty_keys.extend(
                keys.state()
                    .iter()
                    .map(|k| format!("{}/{}", k.namespace().unwrap_or_default(), k.name_any())),
            );
            dirty_models.extend(
                models
                    .state()
                    .iter()
                    .map(|m| format!("{}/{}", m.namespace().unwrap_or_default(), m.name_any())),
            );
        }
        let mut conditions_changed = false;
        for id in &dirty_keys {
            match report_key(&client, c, &keys, &periods, id, &view).await {
                Ok(flipped) => conditions_changed |= flipped,
                Err(e) => tracing::warn!(key = id, "spend status not written: {e}"),
            }
        }
        for id in &dirty_models {
            if let Err(e) = report_model(&client, c, &models, id).await {
                tracing::warn!(model = id, "spend status not written: {e}");
            }
        }
        if conditions_changed {
            changed.notify_one();
        }
    }
}

fn split(id: &str) -> (&str, &str) {
    id.split_once('/').unwrap_or(("default", id))
}

/// Writes one key's spend; returns whether its BudgetExceeded state flipped.
async fn report_key(
    client: &Client,
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &Store<VirtualKey>,
    periods: &HashMap<String, (BudgetPeriod, Picodollars)>,
    id: &str,
    view: &SpendView,
) -> anyhow::Result<bool> {
    let (ns, name) = split(id);
    let Some(k) = keys.get(&kube::runtime::reflector::ObjectRef::new(name).within(ns)) else {
        return Ok(false);
    };
    let totals: HashMap<String, u64> = conn.hgetall(format!("tollgate:spend:key:{id}")).await?;
    let total = totals.get("total").copied().unwrap_or(0);
    let now = jiff::Timestamp::now().as_second().max(0) as u64;
    let (current, reset_at, exceeded) = match periods.get(id) {
        Some((p, max)) => {
            let field = format!("p:{}:{}", period_label(*p), p.index(now));
            let current = totals.get(&field).copied().unwrap_or(0);
            (current, p.end(now), Some(current >= max.0))
        }
        None => (total, None, None),
    };
    let spend = tollgate_crds::key::KeySpend {
        current_period_usd: usd(current),
        total_usd: usd(total),
        budget_reset_at: reset_at.and_then(|t| {
            jiff::Timestamp::from_second(t as i64)
                .ok()
                .map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time)
        }),
    };
    let flipped = view.set(id, exceeded);
    if k.status.as_ref().and_then(|s| s.spend.as_ref()) != Some(&spend) {
        let api: Api<VirtualKey> = Api::namespaced(client.clone(), ns);
        let patch = serde_json::json!({"status": {"spend": spend}});
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    Ok(flipped)
}

async fn report_model(
    client: &Client,
    conn: &mut redis::aio::MultiplexedConnection,
    models: &Store<LlmModel>,
    id: &str,
) -> anyhow::Result<()> {
    let (ns, name) = split(id);
    let Some(m) = models.get(&kube::runtime::reflector::ObjectRef::new(name).within(ns)) else {
        return Ok(());
    };
    let t: HashMap<String, u64> = conn.hgetall(format!("tollgate:spend:model:{id}")).await?;
    let spend = tollgate_crds::model::ModelSpend {
        total_usd: usd(t.get("total").copied().unwrap_or(0)),
        requests: t.get("requests").copied().unwrap_or(0),
        prompt_tokens: t.get("prompt").copied().unwrap_or(0),
        completion_tokens: t.get("completion").copied().unwrap_or(0),
    };
    if m.status.as_ref().and_then(|s| s.spend.as_ref()) != Some(&spend) {
        let api: Api<LlmModel> = Api::namespaced(client.clone(), ns);
        let patch = serde_json::json!({"status": {"spend": spend}});
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    Ok(())
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn record(id: &str, cost: u64) -> UsageRecord {
        UsageRecord {
            id: id.into(),
            request_id: String::new(),
            ts_ms: 1,
            key: "ns/k".into(),
            team: None,
            model: "m".into(),
            deployment: "ns/m".into(),
            prompt_tokens: 1,
            completion_tokens: 2,
            cached_tokens: 0,
            cost_pico: cost,
            outcome: "success".into(),
            requests: 1,
            usage_source: Default::default(),
        }
    }

    async fn append(conn: &mut redis::aio::MultiplexedConnection, r: &UsageRecord) {
        redis::cmd("XADD")
            .arg(STREAM)
            .arg("*")
            .arg("id")
            .arg(&r.id)
            .arg("record")
            .arg(serde_json::to_string(r).unwrap())
            .query_async::<String>(conn)
            .await
            .unwrap();
    }

    #[test]
    fn the_id_after_a_stream_id() {
        assert_eq!(next_id("5-0").as_deref(), Some("5-1"));
        assert_eq!(next_id(&format!("5-{}", u64::MAX)).as_deref(), Some("6-0"));
        assert_eq!(next_id("x"), None);
    }

    /// What is folded leaves the stream, in the transaction that moves the watermark; and a
    /// record appended again after it was folded (a data plane's retried append) is skipped by
    /// an operator that never saw the first (a failover: nothing carried over in memory).
    #[tokio::test]
    async fn folded_entries_are_trimmed_and_a_duplicate_after_a_failover_is_skipped() {
        let redis = tollgate_testkit::Redis::start();
        let client = redis::Client::open(redis.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let periods = HashMap::new();
        for r in [record("a", 10), record("b", 20), record("a", 10)] {
            append(&mut conn, &r).await;
        }
        let (keys, models) = fold(&mut conn, &periods).await.unwrap();
        assert_eq!(keys.into_iter().collect::<Vec<_>>(), ["ns/k"]);
        assert_eq!(models.into_iter().collect::<Vec<_>>(), ["ns/m"]);
        async fn total(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
            conn.hget("tollgate:spend:key:ns/k", "total").await.unwrap()
        }
        assert_eq!(total(&mut conn).await, 30, "`a` once");
        let len: u64 = redis::cmd("XLEN")
            .arg(STREAM)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(len, 0, "folded entries are trimmed");
        // The next leader: `b` appended again, and a new record.
        let mut other = client.get_multiplexed_async_connection().await.unwrap();
        append(&mut other, &record("b", 20)).await;
        append(&mut other, &record("c", 5)).await;
        fold(&mut other, &periods).await.unwrap();
        assert_eq!(total(&mut other).await, 35, "`b` once, `c` added");
        let len: u64 = redis::cmd("XLEN")
            .arg(STREAM)
            .query_async(&mut other)
            .await
            .unwrap();
        assert_eq!(len, 0);
        let seen: u64 = other.zcard(SEEN).await.unwrap();
        assert_eq!(seen, 3);
        // Nothing new: nothing changes.
        let (keys, _) = fold(&mut other, &periods).await.unwrap();
        assert!(keys.is_empty());
        assert_eq!(total(&mut other).await, 35);
    }
}
