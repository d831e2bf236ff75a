//! Rate limits (requests and tokens per minute, requests in flight) and budgets (spend per
//! period), per virtual key and per deployment: checked and reserved before a request goes
//! upstream, settled with the real usage after.
//!
//! Each limited key or deployment has a [`Subject`]: a few counters behind a small sync mutex,
//! held only to compare and add (never across an await). A request reserves on its deployment,
//! then on its key's team, then on its key (`gateway::attempt::reserve`; in Redis, the same subjects in one
//! script); a full deployment is skipped for another of the group, and a refusal by the team or
//! the key undoes what was taken. What is reserved:
//!
//! - one request, and one in flight;
//! - the prompt tokens, estimated by [`crate::accounting::tokens`] (the model's tokenizer for OpenAI
//!   models, else bytes / 4, an over-estimate for JSON bodies), corrected to the real prompt +
//!   completion tokens on settlement;
//! - the estimated cost (those prompt tokens at the input price, plus `max_tokens` at the
//!   output price when the request sets it), replaced by the real cost on settlement.
//!
//! A budget refuses once settled spend plus reserved cost reaches it, so concurrent requests
//! can't slip past it; what can still exceed it is bounded by what is in flight. Subjects live
//! in a [`Registry`] that outlives config reloads, so a reload never resets a window or a
//! budget. These counters are per process; with `--redis-url` the limits and budgets are kept
//! in Redis instead, shared by every replica ([`crate::limits::redis`]).

pub mod redis;

use crate::api::error::ApiError;
use http::{HeaderMap, StatusCode};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tollgate_crds::common::Limits;
use tollgate_crds::config::{BudgetConfig, BudgetPeriod, Picodollars};

/// What is limited, for messages and metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// A virtual key.
    Key,
    /// A deployment (LLMModel).
    Deployment,
    /// A team: the keys with the same `team`, sharing its budget.
    Team,
}

impl Scope {
    fn as_str(self) -> &'static str {
        match self {
            Scope::Key => "key",
            Scope::Deployment => "deployment",
            Scope::Team => "team",
        }
    }
}

/// The rules of one subject.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    /// Rate limits.
    pub limits: Limits,
    /// Budget.
    pub budget: Option<BudgetConfig>,
}

impl Rules {
    /// Whether there is anything to enforce.
    pub(crate) fn is_empty(&self) -> bool {
        self.limits.rpm.is_none()
            && self.limits.tpm.is_none()
            && self.limits.max_parallel.is_none()
            && self.budget.is_none()
    }
}

#[derive(Debug, Default)]
struct Counters {
    minute: u64,
    requests: u64,
    tokens: u64,
    in_flight: u32,
    period: u64,
    spend: u64,
    reserved: u64,
}

impl Counters {
    /// Starts a new minute or budget period when `now` is past the current one.
    fn roll(&mut self, now: u64, budget: Option<&BudgetConfig>) {
        let minute = now / 60;
        if minute != self.minute {
            self.minute = minute;
            self.requests = 0;
            self.tokens = 0;
        }
        if let Some(b) = budget {
            let period = period_index(b.period, now);
            if period != self.period {
                self.period = period;
                // Reservations of requests still in flight carry over; they settle later.
                self.spend = 0;
            }
        }
    }
}

/// Counters of one key or deployment, shared across reloads.
#[derive(Debug)]
pub(crate) struct Subject {
    scope: Scope,
    id: Arc<str>,
    counters: Mutex<Counters>,
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Requests per minute.
    Requests { limit: u64 },
    /// Tokens per minute.
    Tokens { limit: u64 },
    /// Requests in flight.
    Parallel { limit: u32 },
    /// Spend this period.
    Budget {
        max: Picodollars,
        reset_at: Option<u64>,
    },
}

/// A refusal and whose it is.
#[derive(Clone, Debug)]
pub struct Refused {
    /// What refused.
    pub(crate) scope: Scope,
    /// Its id.
    pub(crate) id: Arc<str>,
    /// Why.
    pub refusal: Refusal,
    /// Seconds until it may succeed.
    pub(crate) retry_after: u64,
}

impl From<Refused> for ApiError {
    fn from(r: Refused) -> Self {
        let (code, kind, message) = match &r.refusal {
            Refusal::Requests { limit } => (
                "rate_limit_exceeded",
                "requests",
                format!(
                    "Rate limit reached for {} {}: {limit} requests per minute.",
                    r.scope.as_str(),
                    r.id
                ),
            ),
            Refusal::Tokens { limit } => (
                "rate_limit_exceeded",
                "tokens",
                format!(
                    "Rate limit reached for {} {}: {limit} tokens per minute.",
                    r.scope.as_str(),
                    r.id
                ),
            ),
            Refusal::Parallel { limit } => (
                "rate_limit_exceeded",
                "requests",
                format!(
                    "Too many requests in flight for {} {}: at most {limit} at once.",
                    r.scope.as_str(),
                    r.id
                ),
            ),
            Refusal::Budget { max, .. } => (
                "budget_exceeded",
                "budget_exceeded",
                format!(
                    "Budget exceeded for {} {}: the budget of ${max} for this period is spent.",
                    r.scope.as_str(),
                    r.id
                ),
            ),
        };
        let mut e =
            ApiError::bad_request(code, format!("{message} Retry after {}s.", r.retry_after));
        e.status = StatusCode::TOO_MANY_REQUESTS;
        e.kind = kind;
        e.retry_after = Some(r.retry_after);
        e
    }
}

/// What one request asks for.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ask {
    /// Estimated tokens.
    pub tokens: u64,
    /// Estimated cost.
    pub cost: Picodollars,
}

/// Remaining room after a reservation, for `x-ratelimit-*` headers.
#[derive(Clone, Copy, Debug, Default)]
pub struct Room {
    requests: Option<(u64, u64)>,
    tokens: Option<(u64, u64)>,
    reset_secs: u64,
}

impl Room {
    /// Room left under `rules` after `requests` and `tokens` this minute.
    pub(crate) fn new(rules: &Rules, requests: u64, tokens: u64, reset_secs: u64) -> Self {
        let l = &rules.limits;
        Self {
            requests: l.rpm.map(|limit| (limit, limit.saturating_sub(requests))),
            tokens: l.tpm.map(|limit| (limit, limit.saturating_sub(tokens))),
            reset_secs,
        }
    }

    /// Adds OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers.
    pub(crate) fn write_headers(&self, h: &mut HeaderMap) {
        let mut secs = itoa::Buffer::new();
        let mut reset = [0u8; 21];
        let digits = secs.format(self.reset_secs).as_bytes();
        reset[..digits.len()].copy_from_slice(digits);
        reset[digits.len()] = b's';
        let reset = crate::rt::values::header_value(&reset[..=digits.len()]);
        for (what, v) in [("requests", self.requests), ("tokens", self.tokens)] {
            let Some((limit, remaining)) = v else {
                continue;
            };
            let names = match what {
                "requests" => [
                    "x-ratelimit-limit-requests",
                    "x-ratelimit-remaining-requests",
                    "x-ratelimit-reset-requests",
                ],
                _ => [
                    "x-ratelimit-limit-tokens",
                    "x-ratelimit-remaining-tokens",
                    "x-ratelimit-reset-tokens",
                ],
            };
            h.insert(names[0], crate::rt::values::number(limit));
            h.insert(names[1], crate::rt::values::number(remaining));
            if let Some(r) = &reset {
                h.insert(names[2], r.clone());
            }
        }
    }
}

impl Subject {
    /// Checks every rule and, if all pass, reserves `ask`.
    fn reserve(&self, rules: &Rules, ask: Ask, now: u64) -> Result<Room, Refused> {
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        c.roll(now, rules.budget.as_ref());
        let to_minute = 60 - now % 60;
        let refuse = |refusal, retry_after| Refused {
            scope: self.scope,
            id: self.id.clone(),
            refusal,
            retry_after,
        };
        let l = &rules.limits;
        if let Some(limit) = l.rpm
            && c.requests >= limit
        {
            return Err(refuse(Refusal::Requests { limit }, to_minute));
        }
        // A request is admitted while the window has any room, then charged its tokens: one
        // request larger than the whole limit must still be servable.
        if let Some(limit) = l.tpm
            && c.tokens >= limit
        {
            return Err(refuse(Refusal::Tokens { limit }, to_minute));
        }
        if let Some(limit) = l.max_parallel
            && c.in_flight >= limit
        {
            return Err(refuse(Refusal::Parallel { limit }, 1));
        }
        if let Some(b) = &rules.budget
            && c.spend.saturating_add(c.reserved) >= b.max.0
        {
            let reset_at = period_end(b.period, now);
            let retry = reset_at.map_or(u64::MAX / 2, |r| r.saturating_sub(now).max(1));
            return Err(refuse(
                Refusal::Budget {
                    max: b.max,
                    reset_at,
                },
                retry,
            ));
        }
        c.requests += 1;
        c.tokens = c.tokens.saturating_add(ask.tokens);
        c.in_flight += 1;
        if rules.budget.is_some() {
            c.reserved = c.reserved.saturating_add(ask.cost.0);
        }
        Ok(Room {
            requests: l.rpm.map(|limit| (limit, limit.saturating_sub(c.requests))),
            tokens: l.tpm.map(|limit| (limit, limit.saturating_sub(c.tokens))),
            reset_secs: to_minute,
        })
    }

    /// Replaces the reservation of `ask` by what the request really used.
    fn settle(
        &self,
        rules: &Rules,
        ask: Ask,
        tokens: u64,
        cost: Picodollars,
        reserved_minute: u64,
        now: u64,
    ) {
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        c.roll(now, rules.budget.as_ref());
        if c.minute == reserved_minute {
            c.tokens = c.tokens.saturating_sub(ask.tokens).saturating_add(tokens);
        } else {
            c.tokens = c.tokens.saturating_add(tokens);
        }
        c.in_flight = c.in_flight.saturating_sub(1);
        if rules.budget.is_some() {
            c.reserved = c.reserved.saturating_sub(ask.cost.0);
            c.spend = c.spend.saturating_add(cost.0);
        }
    }

    /// What it limits.
    pub(crate) fn scope(&self) -> Scope {
        self.scope
    }

    /// Its id (`namespace/name`).
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// Its id, shared.
    pub(crate) fn id_arc(&self) -> Arc<str> {
        self.id.clone()
    }
}

/// A subject and its rules, as the snapshot holds them.
#[derive(Debug)]
pub struct Limited {
    subject: Arc<Subject>,
    rules: Rules,
}

impl Limited {
    /// The subject's counters.
    pub(crate) fn subject(&self) -> &Subject {
        &self.subject
    }

    /// The rules.
    pub(crate) fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Spend settled in the budget period current at `now` (zero once a new period began,
    /// even before this subject's next request rolls it over).
    pub(crate) fn period_spend(&self, now: u64) -> Picodollars {
        let mut c = self
            .subject
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        c.roll(now, self.rules.budget.as_ref());
        Picodollars(c.spend)
    }
}

/// Reservations of one request, released or settled exactly once.
///
/// A request holds its key's reservation from admission to the end, and one deployment's at a
/// time: a retry on another deployment releases the failed one's ([`Self::release`]) and
/// reserves on the next, so the key counts the request once however often it is retried.
#[derive(Debug, Default)]
pub struct Reservation {
    /// Reserved in this process, each with the minute it was taken in.
    held: Vec<Taken>,
    /// Reserved in Redis, each under the lease of the reserve that took it.
    remote: Vec<crate::limits::redis::Held>,
    shared: Option<Arc<crate::limits::redis::SharedLimits>>,
}

/// One subject's reservation in this process.
#[derive(Debug)]
struct Taken {
    limited: Arc<Limited>,
    ask: Ask,
    /// The minute its tokens were counted in. Each reservation keeps its own: a retry reserves
    /// on its deployment later than the key was reserved, maybe in the next minute, and a
    /// settlement corrects the ask in the minute that counted it.
    minute: u64,
}

impl Reservation {
    /// Adds reservations already taken in Redis under `lease`. Every reserve has a lease of its
    /// own: a retry that reserves again on the same deployment must not take over the lease
    /// of the attempt it replaces, whose release may reach Redis after it.
    pub fn add_shared(
        &mut self,
        shared: Arc<crate::limits::redis::SharedLimits>,
        lease: Arc<str>,
        held: Vec<(Arc<Limited>, Ask)>,
        now: u64,
    ) {
        self.shared = Some(shared);
        self.remote.extend(
            held.into_iter()
                .map(|(limited, ask)| crate::limits::redis::Held {
                    limited,
                    ask,
                    lease: lease.clone(),
                    minute: now / 60,
                }),
        );
    }

    /// Reserves `ask` on `limited`, adding it to this reservation.
    pub(crate) fn take(
        &mut self,
        limited: &Arc<Limited>,
        ask: Ask,
        now: u64,
    ) -> Result<Room, Refused> {
        let room = limited.subject.reserve(&limited.rules, ask, now)?;
        self.held.push(Taken {
            limited: limited.clone(),
            ask,
            minute: now / 60,
        });
        Ok(room)
    }

    /// Undoes the last reservation (its request went elsewhere).
    pub(crate) fn undo_last(&mut self, now: u64) {
        if let Some(t) = self.held.pop() {
            let l = &t.limited;
            l.subject
                .settle(&l.rules, t.ask, 0, Picodollars(0), t.minute, now);
            // Nothing was served: give back the request too.
            let mut c = l.subject.counters.lock().unwrap_or_else(|e| e.into_inner());
            if c.minute == t.minute {
                c.requests = c.requests.saturating_sub(1);
            }
        }
    }

    /// Ends the reservations of `scope` with no usage: an attempt on a deployment failed before
    /// it used anything. Its request still counts (the deployment was asked).
    pub(crate) fn release(&mut self, scope: Scope, now: u64) {
        let (local, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|t| t.limited.subject.scope == scope);
        self.held = rest;
        for t in local {
            let l = &t.limited;
            l.subject
                .settle(&l.rules, t.ask, 0, Picodollars(0), t.minute, now);
        }
        let (remote, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.remote)
            .into_iter()
            .partition(|h| h.limited.subject.scope == scope);
        self.remote = rest;
        if let Some(shared) = &self.shared
            && !remote.is_empty()
        {
            // Nothing was spent: until Redis has it, the reservation only over-counts.
            drop(shared.settle(remote, 0, Picodollars(0), now));
        }
    }

    /// Settles every reservation with the real usage. Returns the Redis settlement to wait for
    /// when a budget is kept there.
    pub fn settle(
        &mut self,
        tokens: u64,
        cost: Picodollars,
        now: u64,
    ) -> Option<crate::limits::redis::Recorded> {
        let mut recorded = None;
        if let Some(shared) = &self.shared
            && !self.remote.is_empty()
        {
            // This replica's own view of the spend follows along: it seeds Redis should Redis
            // lose its data, and decides when Redis is down and the policy is to fail open.
            for h in &self.remote {
                if let Some(b) = &h.limited.rules.budget {
                    let mut c = h
                        .limited
                        .subject
                        .counters
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    c.roll(now, Some(b));
                    c.spend = c.spend.saturating_add(cost.0);
                }
            }
            recorded = shared.settle(std::mem::take(&mut self.remote), tokens, cost, now);
        }
        for t in self.held.drain(..) {
            let l = &t.limited;
            l.subject
                .settle(&l.rules, t.ask, tokens, cost, t.minute, now);
        }
        recorded
    }
}

/// Subjects by scope and id, kept across reloads.
#[derive(Debug, Default)]
pub struct Registry {
    subjects: Mutex<HashMap<(Scope, String), Arc<Subject>>>,
}

impl Registry {
    /// Adds `spend` to the current budget period of `id` (from the usage log, at start-up).
    pub(crate) fn seed_spend(
        &self,
        scope: Scope,
        id: &str,
        period: BudgetPeriod,
        spend: Picodollars,
        now: u64,
    ) {
        let map = self.subjects.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(&(scope, id.to_string())) {
            let mut c = s.counters.lock().unwrap_or_else(|e| e.into_inner());
            c.roll(
                now,
                Some(&BudgetConfig {
                    max: Picodollars(0),
                    period,
                }),
            );
            c.spend = c.spend.saturating_add(spend.0);
        }
    }

    /// The limits of `id` under `rules`, or `None` when there is nothing to enforce.
    pub fn limited(&self, scope: Scope, id: &str, rules: Rules) -> Option<Arc<Limited>> {
        if rules.is_empty() {
            return None;
        }
        let mut map = self.subjects.lock().unwrap_or_else(|e| e.into_inner());
        let subject = map
            .entry((scope, id.to_string()))
            .or_insert_with(|| {
                Arc::new(Subject {
                    scope,
                    id: Arc::from(id),
                    counters: Mutex::new(Counters::default()),
                })
            })
            .clone();
        Some(Arc::new(Limited { subject, rules }))
    }
}

/// Index of the budget period containing `now` (Unix seconds); see [`BudgetPeriod::index`].
pub(crate) fn period_index(period: BudgetPeriod, now: u64) -> u64 {
    period.index(now)
}

/// When the period containing `now` ends; see [`BudgetPeriod::end`].
pub(crate) fn period_end(period: BudgetPeriod, now: u64) -> Option<u64> {
    period.end(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    fn limited(rules: Rules) -> Arc<Limited> {
        Registry::default()
            .limited(Scope::Key, "ns/k", rules)
            .expect("has rules")
    }

    #[test]
    fn rpm_window_refuses_then_resets_next_minute() {
        let l = limited(Rules {
            limits: Limits {
                rpm: Some(2),
                ..Default::default()
            },
            budget: None,
        });
        let t = 6_000_000; // a minute boundary
        let mut r = Reservation::default();
        assert!(r.take(&l, Ask::default(), t).is_ok());
        assert!(r.take(&l, Ask::default(), t + 1).is_ok());
        let e = r
            .take(&l, Ask::default(), t + 2)
            .expect_err("third in the minute");
        assert_eq!(
            (e.refusal, e.retry_after),
            (Refusal::Requests { limit: 2 }, 58)
        );
        assert!(r.take(&l, Ask::default(), t + 60).is_ok());
    }

    #[test]
    fn period_spend_is_zero_once_a_new_period_began() {
        // What seeds a Redis that lost its data, and what the admin API shows: a key that spent
        // its budget yesterday starts today from zero, even before its first request today.
        let l = limited(Rules {
            limits: Limits::default(),
            budget: Some(BudgetConfig {
                max: Picodollars(100),
                period: BudgetPeriod::Daily,
            }),
        });
        let mut r = Reservation::default();
        r.take(&l, Ask::default(), 10).expect("room");
        r.settle(0, Picodollars(100), 20);
        assert_eq!(l.period_spend(30), Picodollars(100));
        assert_eq!(l.period_spend(86_400 + 30), Picodollars(0));
    }

    #[test]
    fn budget_counts_reservations_and_settles_to_real_cost() {
        let budget = BudgetConfig {
            max: Picodollars(100),
            period: BudgetPeriod::Daily,
        };
        let l = limited(Rules {
            limits: Limits::default(),
            budget: Some(budget),
        });
        let ask = Ask {
            tokens: 10,
            cost: Picodollars(60),
        };
        let mut a = Reservation::default();
        a.take(&l, ask, 0).expect("first");
        let mut b = Reservation::default();
        b.take(&l, ask, 0).expect("60 reserved < 100");
        let mut c = Reservation::default();
        assert!(matches!(
            c.take(&l, ask, 0).map_err(|e| e.refusal),
            Err(Refusal::Budget { .. })
        ));
        a.settle(10, Picodollars(30), 1);
        b.settle(10, Picodollars(30), 1);
        assert_eq!(l.period_spend(1), Picodollars(60));
        c.take(&l, ask, 2).expect("60 spent, nothing reserved");
        // The next day starts from zero.
        c.settle(0, Picodollars(50), 3);
        assert!(Reservation::default().take(&l, ask, 3).is_err());
        assert!(Reservation::default().take(&l, ask, DAY).is_ok());
    }

    #[test]
    fn a_retry_in_the_next_minute_corrects_the_key_in_the_minute_that_counted_it() {
        let rules = || Rules {
            limits: Limits {
                tpm: Some(1_000),
                ..Default::default()
            },
            budget: None,
        };
        let registry = Registry::default();
        let key = registry
            .limited(Scope::Key, "ns/k", rules())
            .expect("rules");
        let deployment = registry
            .limited(Scope::Deployment, "ns/d", rules())
            .expect("rules");
        let ask = Ask {
            tokens: 10,
            cost: Picodollars(0),
        };
        let t = 6_000_000; // a minute boundary
        // Admitted in the last second of a minute; its retry reserves a deployment in the next.
        let mut a = Reservation::default();
        a.take(&key, ask, t - 1).expect("key");
        // Another request of the key, in the new minute.
        let mut b = Reservation::default();
        b.take(&key, ask, t).expect("key");
        a.take(&deployment, ask, t + 1).expect("deployment");
        a.settle(5, Picodollars(0), t + 1);
        // `a`'s ask was counted in the old minute: only its 5 tokens used go in the new one,
        // next to `b`'s 10 still reserved.
        let tokens = |l: &Limited| l.subject.counters.lock().expect("lock").tokens;
        assert_eq!(tokens(&key), 15);
        assert_eq!(tokens(&deployment), 5);
    }

    #[test]
    fn parallel_limit_releases_on_settle_and_undo() {
        let l = limited(Rules {
            limits: Limits {
                max_parallel: Some(1),
                ..Default::default()
            },
            budget: None,
        });
        let mut a = Reservation::default();
        a.take(&l, Ask::default(), 0).expect("one");
        assert!(Reservation::default().take(&l, Ask::default(), 0).is_err());
        a.undo_last(0);
        let mut b = Reservation::default();
        b.take(&l, Ask::default(), 0).expect("free again");
        b.settle(0, Picodollars(0), 0);
        assert!(Reservation::default().take(&l, Ask::default(), 0).is_ok());
    }

    #[test]
    fn periods_follow_the_calendar_in_utc() {
        // 2026-11-25T12:00:00Z, a Wednesday.
        let now = 1_795_608_000;
        assert_eq!(period_end(BudgetPeriod::Daily, now), Some(1_795_651_200)); // 11-26 00:00
        assert_eq!(period_end(BudgetPeriod::Weekly, now), Some(1_795_996_800)); // Mon 11-30
        assert_eq!(period_end(BudgetPeriod::Monthly, now), Some(1_796_083_200)); // 12-01
        assert_eq!(period_index(BudgetPeriod::Monthly, now), 2026 * 12 + 10);
        assert_eq!(period_end(BudgetPeriod::Lifetime, now), None);
    }
}
