//! Limits and budgets shared by every replica, in Redis (`--redis-url`).
//!
//! The same rules as [`crate::limits`], kept in one Redis hash per key or deployment
//! (`tollgate:limits:{key|deployment}:{id}`) and checked and reserved by one Lua script for all
//! the subjects of a request at once, so replicas see one truth and a request is admitted by all
//! its limits or by none. Settlement is a second script, sent in the background once the usage
//! is known; a served response with a budget ends only when its settlement is answered
//! ([`Recorded`]), so a client's next request sees its spend. Both go in batches of what is
//! queued ([`reserve_batches`], [`settle_batches`]): Redis's cost is per command, and a batch
//! reads and writes each subject's hash once. A settlement counts only while its request's
//! lease is held (so one sent again after a failure counts once), failed ones are sent again
//! with backoff, and a lease that ends unsettled charges its reserved cost as spent. Increments
//! use `HINCRBY` (exact 64-bit integers on the server); only comparisons, and sums while they
//! are exact, go through Lua's doubles.
//!
//! When a hash does not exist yet (a new key, or a Redis that lost its data), its budget spend is
//! seeded from what this replica knows from its usage log, so a Redis restart doesn't hand a key
//! a fresh budget. When Redis can't be reached, `--redis-failure` decides: `open` falls back to
//! this replica's own counters (limits then hold per replica), `closed` refuses with 503. Either
//! way it is logged and counted in `tollgate_redis_errors_total`, and the next request tries
//! Redis again.

use crate::limits::{Ask, Limited, Refusal, Refused, Room, Scope, period_end, period_index};
use redis::aio::ConnectionManager;
use std::sync::Arc;
use std::time::Duration;
use tollgate_crds::config::Picodollars;

/// How long a Redis call may take before it counts as a failure. Short: a limit check must not
/// hold a request up for long.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);

/// The script that reserves for a batch of requests at once: the hash layout and its
/// arguments are documented at the top of `reserve.lua`.
const RESERVE: &str = include_str!("reserve.lua");

/// The script that settles a batch of requests at once, idempotently: see `settle.lua`.
const SETTLE: &str = include_str!("settle.lua");

/// What to do when Redis can't be reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FailureMode {
    /// Fall back to this replica's own counters.
    Open,
    /// Refuse limited requests with 503.
    Closed,
}

/// The Redis-backed counters.
pub struct SharedLimits {
    conn: ConnectionManager,
    /// What to do when Redis fails.
    pub(crate) failure: FailureMode,
    /// To the task that sends settlements in batches ([`settle_batches`]).
    settlements: SettleQueue,
    /// To the task that sends reserves in batches ([`reserve_batches`]).
    reserves: tokio::sync::mpsc::UnboundedSender<Reserve>,
}

/// One request's reserve, queued for the next batch.
struct Reserve {
    asks: Vec<(Arc<Limited>, Ask)>,
    lease: Arc<str>,
    now: u64,
    /// The script's four numbers for this request (see `RESERVE`).
    answer: tokio::sync::oneshot::Sender<Result<[i64; 4], RedisError>>,
    /// Counted until answered and, if need be, released: shutdown waits for it.
    _pending: Settling,
}

/// Whether Redis answers, as last seen.
struct Health {
    failure: FailureMode,
    up: std::sync::atomic::AtomicBool,
}

/// Reserves and settlements not answered yet (see [`SharedLimits::settled`]).
#[derive(Default)]
struct Pending {
    count: std::sync::atomic::AtomicUsize,
    none: tokio::sync::Notify,
}

/// One request's settlement, queued for the next batch.
struct Settlement {
    held: Vec<Held>,
    tokens: u64,
    cost: Picodollars,
    now: u64,
    /// Told once Redis answered the batch (when a response waits for it: see [`Recorded`]).
    done: Option<tokio::sync::oneshot::Sender<()>>,
    _pending: Settling,
}

/// The most requests settled or reserved in one script call: bounds its arguments and the
/// leases it checks in one `ZMSCORE` or adds in one `ZADD`.
const MAX_BATCH: usize = 128;

/// The most settlements kept to send again while Redis fails (about 300 bytes each, so about
/// 20 MB); past this the oldest are dropped, and counted in
/// `tollgate_redis_settlements_dropped_total`.
const MAX_BACKLOG: usize = 1 << 16;

/// The first wait before a failed batch of settlements is sent again; it doubles with each
/// failure in a row, up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Health {
    /// Notes the outcome of a Redis call: logs only the transitions, counts every failure.
    fn observe<T>(&self, op: &'static str, r: &Result<T, RedisError>) {
        use std::sync::atomic::Ordering::Relaxed;
        match r {
            Ok(_) => {
                if !self.up.swap(true, Relaxed) {
                    metrics::gauge!(crate::telemetry::REDIS_UP).set(1.0);
                    tracing::info!("redis reachable again: limits and budgets are shared again");
                }
            }
            Err(e) => {
                metrics::counter!(crate::telemetry::REDIS_ERRORS, "op" => op).increment(1);
                if self.up.swap(false, Relaxed) {
                    metrics::gauge!(crate::telemetry::REDIS_UP).set(0.0);
                    let policy = match self.failure {
                        FailureMode::Open => {
                            "failing open: this replica's own counters decide until it is back"
                        }
                        FailureMode::Closed => {
                            "failing closed: limited requests get 503 until it is back"
                        }
                    };
                    tracing::warn!("{e}; {policy}");
                }
            }
        }
    }
}

/// One subject's reservation in Redis: what it asked, under which lease.
#[derive(Debug)]
pub(crate) struct Held {
    /// The subject.
    pub(crate) limited: Arc<Limited>,
    /// What was reserved.
    pub(crate) ask: Ask,
    /// The lease of the reserve that took it.
    pub(crate) lease: Arc<str>,
    /// The minute its tokens were counted in (see `limits::Reservation`).
    pub(crate) minute: u64,
}

/// One settlement in flight, until dropped (answered, failed, or dropped with its queue).
struct Settling(Arc<Pending>);

impl Settling {
    fn new(pending: &Arc<Pending>) -> Self {
        pending
            .count
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(pending.clone())
    }
}

impl Drop for Settling {
    fn drop(&mut self) {
        if self
            .0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.0.none.notify_waiters();
        }
    }
}

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimits")
            .field("failure", &self.failure)
            .finish()
    }
}

/// A Redis failure (connection, timeout, script error).
#[derive(Clone, Debug, thiserror::Error)]
#[error("redis: {0}")]
pub struct RedisError(String);

fn hash_key(l: &Limited) -> String {
    let scope = match l.subject().scope() {
        Scope::Key => "key",
        Scope::Deployment => "deployment",
        Scope::Team => "team",
    };
    format!("tollgate:limits:{scope}:{}", l.subject().id())
}

/// The largest cost one request reserves or spends in Redis: 2^60 pico-dollars (about
/// $1.15 million). Costs saturate (a client may ask for any `max_tokens`); past this, one
/// HINCRBY could overflow Redis's 64-bit integers and stop a script halfway. A reservation this
/// large is refused by any budget below it anyway.
const MAX_COST: u64 = 1 << 60;

fn capped(cost: Picodollars) -> u64 {
    cost.0.min(MAX_COST)
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-1".to_string(), |v| v.to_string())
}

impl SharedLimits {
    /// Connects to `url` (the connection is re-established by itself after failures).
    /// `lease` bounds how long a reservation of a replica that died unsettled holds its slot.
    pub async fn connect(url: &str, failure: FailureMode, lease: Duration) -> anyhow::Result<Self> {
        Self::connect_with_backlog(url, failure, lease, MAX_BACKLOG).await
    }

    /// [`Self::connect`], keeping at most `backlog` settlements to send again while Redis fails
    /// (see [`settle_batches`]).
    pub async fn connect_with_backlog(
        url: &str,
        failure: FailureMode,
        lease: Duration,
        backlog: usize,
    ) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_with_config(client, config).await?;
        metrics::gauge!(crate::telemetry::REDIS_UP).set(1.0);
        let health = Arc::new(Health {
            failure,
            up: std::sync::atomic::AtomicBool::new(true),
        });
        let (tx, queue) = tokio::sync::mpsc::unbounded_channel();
        let settlements = SettleQueue {
            tx,
            pending: Arc::default(),
        };
        tokio::spawn(settle_batches(
            conn.clone(),
            health.clone(),
            queue,
            backlog.max(1),
        ));
        let (reserves, queue) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(reserve_batches(
            conn.clone(),
            health.clone(),
            queue,
            lease.as_secs().max(1),
            settlements.clone(),
        ));
        Ok(Self {
            conn,
            failure,
            settlements,
            reserves,
        })
    }

    /// A new lease id: unique across replicas and restarts (this process's random
    /// [`crate::accounting::usage_log::INSTANCE`], then a sequence number).
    pub fn new_lease(&self) -> Arc<str> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        format!(
            "{}.{:x}",
            *crate::accounting::usage_log::INSTANCE,
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )
        .into()
    }

    /// A handle on the connection, for other writers (the usage stream).
    pub(crate) fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Checks and reserves `asks` on all their subjects at once (in the next batch: see
    /// [`reserve_batches`]). `Ok(Err(..))` is a refusal.
    ///
    /// A reserve that ends without an answer (Redis timed out or failed, or the request was
    /// cancelled while it waited) is given back in the background: see [`reserve_batches`].
    pub async fn reserve(
        &self,
        asks: &[(Arc<Limited>, Ask)],
        lease: &Arc<str>,
        now: u64,
    ) -> Result<Result<Room, Refused>, RedisError> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let gone = || RedisError("the Redis task has stopped".to_string());
        self.reserves
            .send(Reserve {
                asks: asks.to_vec(),
                lease: lease.clone(),
                now,
                answer,
                _pending: Settling::new(&self.settlements.pending),
            })
            .map_err(|_| gone())?;
        let mut waiting = Waiting {
            answered,
            settlements: &self.settlements,
            asks,
            lease,
            now,
        };
        let out = (&mut waiting.answered).await.map_err(|_| gone())??;
        let [which, why, requests, tokens] = out;
        if which > 0 {
            let Some((l, _)) = usize::try_from(which - 1).ok().and_then(|i| asks.get(i)) else {
                return Err(RedisError(format!("reserve: no subject {which}")));
            };
            let r = l.rules();
            let to_minute = 60 - now % 60;
            let (refusal, retry_after) = match why {
                1 => (
                    Refusal::Requests {
                        limit: r.limits.rpm.unwrap_or(0),
                    },
                    to_minute,
                ),
                2 => (
                    Refusal::Tokens {
                        limit: r.limits.tpm.unwrap_or(0),
                    },
                    to_minute,
                ),
                3 => (
                    Refusal::Parallel {
                        limit: r.limits.max_parallel.unwrap_or(0),
                    },
                    1,
                ),
                _ => {
                    let b = r.budget.as_ref();
                    let reset_at = b.and_then(|b| period_end(b.period, now));
                    let retry = reset_at.map_or(u64::MAX / 2, |t| t.saturating_sub(now).max(1));
                    (
                        Refusal::Budget {
                            max: b.map_or(Picodollars(0), |b| b.max),
                            reset_at,
                        },
                        retry,
                    )
                }
            };
            return Ok(Err(Refused {
                scope: l.subject().scope(),
                id: l.subject().id_arc(),
                refusal,
                retry_after,
            }));
        }
        // The key is the last subject; its room goes in the response headers.
        let room = asks
            .last()
            .map(|(l, _)| Room::new(l.rules(), requests as u64, tokens as u64, 60 - now % 60));
        Ok(Ok(room.unwrap_or_default()))
    }

    /// Resolves once every settlement sent so far is answered, or after `within`: at shutdown,
    /// before a thread drops its runtime (which would cancel them, leaving their reservations
    /// held in Redis until the lease ends, and then charged their reserved cost).
    pub async fn settled(&self, within: Duration) {
        let all = async {
            loop {
                let notified = self.settlements.pending.none.notified();
                let mut notified = std::pin::pin!(notified);
                notified.as_mut().enable();
                if self
                    .settlements
                    .pending
                    .count
                    .load(std::sync::atomic::Ordering::Acquire)
                    == 0
                {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(within, all).await.is_err() {
            tracing::warn!("Redis settlements still unanswered {within:?} after serving stopped");
        }
    }

    /// Settles `held` with the real usage, in the background (in the next batch: see
    /// [`settle_batches`]). When one of them has a budget, returns a handle that resolves once
    /// Redis has the spend (see [`Recorded`]).
    pub(crate) fn settle(
        &self,
        held: Vec<Held>,
        tokens: u64,
        cost: Picodollars,
        now: u64,
    ) -> Option<Recorded> {
        let budget = held.iter().any(|h| h.limited.rules().budget.is_some());
        let (done, recorded) = if budget {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (Some(tx), Some(Recorded(rx)))
        } else {
            (None, None)
        };
        // Fails only once the batching task is gone with its runtime, at exit: the settlement
        // is dropped, and whoever waits for it stops waiting.
        self.settlements.send(held, tokens, cost, now, done);
        recorded
    }
}

/// The queue of [`settle_batches`], and the count of what is not answered yet.
#[derive(Clone)]
struct SettleQueue {
    tx: tokio::sync::mpsc::UnboundedSender<Settlement>,
    pending: Arc<Pending>,
}

impl SettleQueue {
    fn send(
        &self,
        held: Vec<Held>,
        tokens: u64,
        cost: Picodollars,
        now: u64,
        done: Option<tokio::sync::oneshot::Sender<()>>,
    ) {
        // Fails only once the batching task is gone with its runtime, at exit: the settlement
        // is dropped, and whoever waits for it stops waiting.
        let _ = self.tx.send(Settlement {
            held,
            tokens,
            cost,
            now,
            done,
            _pending: Settling::new(&self.pending),
        });
    }

    /// Gives back a reserve that may have run in Redis but reached no request: sends a release
    /// of its lease (a settlement with no usage). Settlements go on the same multiplexed
    /// connection after the reserve, so Redis runs the release second; when the reserve never
    /// ran, the release finds no live lease and changes nothing. It gives back the slot and the
    /// reserved cost, not the estimated tokens: the request may have been served on this
    /// replica's own counters meanwhile, and the estimate stays counted in its minute, as a
    /// refusal would leave it.
    fn release(&self, asks: &[(Arc<Limited>, Ask)], lease: &Arc<str>, now: u64) {
        let held = asks
            .iter()
            .map(|(limited, ask)| Held {
                limited: limited.clone(),
                ask: Ask {
                    tokens: 0,
                    cost: ask.cost,
                },
                lease: lease.clone(),
                minute: now / 60,
            })
            .collect();
        self.send(held, 0, Picodollars(0), now, None);
    }
}

/// A request waiting for its reserve's answer. Dropped before it read the answer (its request
/// left), it closes the channel and gives back an admitted reserve that was sent meanwhile;
/// once closed, an answer that comes later is released by [`reserve_batches`] instead.
struct Waiting<'a> {
    answered: tokio::sync::oneshot::Receiver<Result<[i64; 4], RedisError>>,
    settlements: &'a SettleQueue,
    asks: &'a [(Arc<Limited>, Ask)],
    lease: &'a Arc<str>,
    now: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.answered.close();
        if let Ok(Ok([0, ..])) = self.answered.try_recv() {
            self.settlements.release(self.asks, self.lease, self.now);
        }
    }
}

/// The subjects of one script call, each one of its `KEYS` once.
#[derive(Default)]
struct KeyIndex(std::collections::HashMap<String, usize>);

impl KeyIndex {
    /// `l`'s index in `KEYS` (from 1, as Lua counts), adding its hash to `inv` when it is new
    /// (then `true`).
    fn index(&mut self, l: &Limited, inv: &mut redis::ScriptInvocation<'_>) -> (usize, bool) {
        let key = hash_key(l);
        if let Some(&i) = self.0.get(&key) {
            return (i, false);
        }
        let i = self.0.len() + 1;
        inv.key(&key);
        self.0.insert(key, i);
        (i, true)
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

/// Sends queued reserves to Redis, as many at a time as are waiting (up to [`MAX_BATCH`]), one
/// script call at a time, like [`settle_batches`]: the script admits them in order against
/// counters it reads and writes once per subject. A reserve whose request stopped waiting
/// before its batch went out is not sent; one whose answer reaches nobody (the request left,
/// or the call failed or timed out, after which Redis may still run it) is released.
async fn reserve_batches(
    mut conn: ConnectionManager,
    health: Arc<Health>,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<Reserve>,
    lease_secs: u64,
    settlements: SettleQueue,
) {
    let script = redis::Script::new(RESERVE);
    let mut batch: Vec<Reserve> = Vec::with_capacity(MAX_BATCH);
    let mut keys = KeyIndex::default();
    let mut subjects: Vec<Arc<Limited>> = Vec::new();
    let mut indices: Vec<usize> = Vec::new();
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        batch.retain(|r| !r.answer.is_closed());
        if batch.is_empty() {
            continue;
        }
        // The time the script counts in: a batch that straddles a minute counts its requests in
        // the later one (their settlement then adds their real tokens there too: an over-count
        // of at most the estimate, for that minute), and one that straddles a budget period
        // counts them in the new period.
        let now = batch.iter().map(|r| r.now).max().unwrap_or(0);
        // Each subject once, with what is the same for all its requests; then the requests.
        keys.clear();
        subjects.clear();
        indices.clear();
        let mut inv = script.prepare_invoke();
        for r in &batch {
            for (l, _) in &r.asks {
                let (index, new) = keys.index(l, &mut inv);
                if new {
                    subjects.push(l.clone());
                }
                indices.push(index);
            }
        }
        inv.arg(now).arg(subjects.len()).arg(batch.len());
        for l in &subjects {
            let rules = l.rules();
            let budget = rules.budget.as_ref();
            inv.arg(opt(rules.limits.rpm))
                .arg(opt(rules.limits.tpm))
                .arg(opt(rules.limits.max_parallel))
                .arg(opt(budget.map(|b| b.max.0)))
                .arg(budget.map_or(0, |b| period_index(b.period, now)))
                .arg(l.period_spend(now).0);
        }
        let mut index = indices.iter();
        for r in &batch {
            inv.arg(&*r.lease).arg(r.now + lease_secs).arg(r.asks.len());
            for (_, ask) in &r.asks {
                inv.arg(index.next().copied().unwrap_or(0))
                    .arg(ask.tokens)
                    .arg(capped(ask.cost));
            }
        }
        let result = inv
            .invoke_async::<Vec<i64>>(&mut conn)
            .await
            .map_err(|e| RedisError(e.to_string()))
            .and_then(|out| {
                if out.len() == 4 * batch.len() {
                    Ok(out)
                } else {
                    Err(RedisError(format!(
                        "reserve: {} numbers for {} requests",
                        out.len(),
                        batch.len()
                    )))
                }
            });
        health.observe("reserve", &result);
        match result {
            Ok(out) => {
                for (r, four) in batch.drain(..).zip(out.chunks_exact(4)) {
                    let four = [four[0], four[1], four[2], four[3]];
                    let admitted = four[0] == 0;
                    if let Err(Ok(_)) = r.answer.send(Ok(four))
                        && admitted
                    {
                        // Nobody waits for it any more: give back what it took.
                        settlements.release(&r.asks, &r.lease, r.now);
                    }
                }
            }
            Err(e) => {
                for r in batch.drain(..) {
                    settlements.release(&r.asks, &r.lease, r.now);
                    let _ = r.answer.send(Err(e.clone()));
                }
                // Redis failed or hung for a whole timeout: what queued meanwhile was never sent
                // and fails now too (its requests fall back as `--redis-failure` says), rather
                // than each waiting out a timeout in turn.
                while let Ok(r) = queue.try_recv() {
                    let _ = r.answer.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Sends queued settlements to Redis, as many at a time as are waiting (up to [`MAX_BATCH`]),
/// one script call at a time. An idle replica sends each at once; under load, the settlements
/// that arrive while one call is out go together in the next, and Redis reads and writes each
/// key's and deployment's hash once for all of them instead of once each. Runs until the
/// [`SharedLimits`] that feeds it is dropped and nothing is left to send.
///
/// When a call fails (or times out: Redis may still run it), its settlements and what queued
/// meanwhile are kept and sent again until Redis answers, after a wait that doubles with each
/// failure in a row ([`MIN_BACKOFF`] to [`MAX_BACKOFF`], with jitter): `SETTLE` is idempotent
/// (a settlement whose lease is gone changes nothing), so one that had in fact run is not
/// counted twice. Whoever waits for them stops waiting at once rather than after a timeout
/// each. At most `max_backlog` are kept; past that the oldest are dropped and counted in
/// `tollgate_redis_settlements_dropped_total`: their leases then end in Redis, which charges
/// each its reserved cost.
async fn settle_batches(
    mut conn: ConnectionManager,
    health: Arc<Health>,
    mut queue: tokio::sync::mpsc::UnboundedReceiver<Settlement>,
    max_backlog: usize,
) {
    let script = redis::Script::new(SETTLE);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut keys = KeyIndex::default();
    let mut indices: Vec<usize> = Vec::new();
    let mut backlog = std::collections::VecDeque::new();
    // Zero while Redis answers; after a failure, the wait before the next try.
    let mut backoff = Duration::ZERO;
    let mut open = true;
    loop {
        if backlog.is_empty() {
            if !open || queue.recv_many(&mut batch, MAX_BATCH).await == 0 {
                break;
            }
        } else {
            if !backoff.is_zero() {
                // Redis failed last time: wait, keeping (and letting go of) what queues.
                let jitter = backoff.mul_f64(fastrand::f64() / 4.0);
                let wait = tokio::time::sleep(backoff + jitter);
                let mut wait = std::pin::pin!(wait);
                while open {
                    tokio::select! {
                        () = &mut wait => break,
                        n = queue.recv_many(&mut batch, MAX_BATCH) => {
                            open = n > 0;
                            keep(&mut backlog, batch.drain(..), max_backlog);
                        }
                    }
                }
                if !open {
                    wait.await;
                }
            }
            // The oldest first, topped up with what queued since, so that new settlements
            // don't wait for the whole backlog.
            let n = backlog.len().min(MAX_BATCH);
            batch.extend(backlog.drain(..n));
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(s) => batch.push(s),
                    Err(_) => break,
                }
            }
        }
        let now = batch.iter().map(|s| s.now).max().unwrap_or(0);
        keys.clear();
        indices.clear();
        let mut inv = script.prepare_invoke();
        for s in &batch {
            for h in &s.held {
                indices.push(keys.index(&h.limited, &mut inv).0);
            }
        }
        inv.arg(now).arg(batch.len());
        let mut index = indices.iter();
        for s in &batch {
            inv.arg(s.tokens).arg(capped(s.cost)).arg(s.held.len());
            for h in &s.held {
                inv.arg(index.next().copied().unwrap_or(0))
                    .arg(h.ask.tokens)
                    .arg(capped(h.ask.cost))
                    .arg(u8::from(h.limited.rules().budget.is_some()))
                    .arg(&*h.lease)
                    .arg(h.minute)
                    .arg(
                        h.limited
                            .rules()
                            .budget
                            .as_ref()
                            .map_or(0, |b| period_index(b.period, s.now)),
                    );
            }
        }
        let result = inv
            .invoke_async::<i64>(&mut conn)
            .await
            .map_err(|e| RedisError(e.to_string()));
        health.observe("settle", &result);
        if result.is_ok() {
            backoff = Duration::ZERO;
            // Answered: whoever waits for these stops waiting.
            for s in batch.drain(..) {
                if let Some(done) = s.done {
                    let _ = done.send(());
                }
            }
        } else {
            backoff = (backoff * 2).clamp(MIN_BACKOFF, MAX_BACKOFF);
            // The failed batch goes back in front, in order, then what queued behind it.
            for mut s in batch.drain(..).rev() {
                if let Some(done) = s.done.take() {
                    let _ = done.send(());
                }
                backlog.push_front(s);
            }
            let queued = std::iter::from_fn(|| queue.try_recv().ok());
            keep(&mut backlog, queued, max_backlog);
        }
    }
}

/// Adds `settlements` to the back of `backlog`, letting go of whoever waits for them (Redis is
/// failing: a response doesn't wait for it), and drops the oldest past `max` settlements.
fn keep(
    backlog: &mut std::collections::VecDeque<Settlement>,
    settlements: impl Iterator<Item = Settlement>,
    max: usize,
) {
    for mut s in settlements {
        if let Some(done) = s.done.take() {
            let _ = done.send(());
        }
        backlog.push_back(s);
    }
    let over = backlog.len().saturating_sub(max);
    if over > 0 {
        backlog.drain(..over);
        metrics::counter!(crate::telemetry::REDIS_SETTLEMENTS_DROPPED).increment(over as u64);
        tracing::warn!(
            dropped = over,
            "Redis settlement backlog full: the oldest settlements are dropped; their leases \
             will charge their reserved cost when they end"
        );
    }
}

/// A budget's settlement on its way to Redis: resolves once Redis has answered (or the call
/// failed or timed out). A response ends only after this, so the next request of a client that
/// waits for each response, to any replica, sees the spend. Dropping it leaves the settlement
/// running.
#[derive(Debug)]
pub struct Recorded(tokio::sync::oneshot::Receiver<()>);

impl std::future::Future for Recorded {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}
