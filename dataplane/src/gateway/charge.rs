//! The [`Charge`] every proxied request settles exactly once: with the usage the upstream
//! reported, or, when the upstream did work it reported no usage for, with an estimate (see
//! [`Charge::sending`]). It holds what the request reserved (limits), its route's in-flight
//! guard, and the usage log's open record, and gives them all back when it settles.

use crate::accounting::Outcome;
use crate::config::snapshot::RuntimeKey;
use crate::routing::RuntimeDeployment;
use std::sync::Arc;
use std::time::Instant;
use tollgate_crds::config::{Picodollars, TokenUsage};
use tollgate_crds::usage::UsageSource;

/// What one request owes, settled once with its real usage, or, when the upstream did work
/// it reported no usage for, with an estimate (see [`Charge::sending`]).
#[derive(Debug)]
pub(crate) struct Charge {
    request_id: http::HeaderValue,
    /// The request as the client sent it, for the estimate.
    request: Option<(bytes::Bytes, crate::api::request::Endpoint)>,
    /// The current attempt's request went upstream and no answer says it did no work.
    sent: bool,
    /// The sequence number of the usage log's open record (see
    /// [`crate::accounting::usage_log::UsageLog::next_seq`]) once the request first went upstream, else 0.
    opened: u64,
    /// Earlier attempts that went upstream and timed out: estimated tokens and cost.
    unbilled: (TokenUsage, Picodollars),
    /// Text relayed to the client so far (stream content), for the completion estimate.
    relayed: Relayed,
    key: Arc<RuntimeKey>,
    deployment: Arc<RuntimeDeployment>,
    started: Instant,
    first_byte: Option<Instant>,
    reservation: crate::limits::Reservation,
    log: Option<crate::accounting::usage_log::UsageLog>,
    in_flight: Option<crate::routing::InFlight>,
    /// The current deployment's failed attempt is already counted in its metrics.
    attempt_counted: bool,
    settled: bool,
}

impl Charge {
    /// Opens a charge for a request by `key` served by `deployment`.
    pub(crate) fn new(
        request_id: http::HeaderValue,
        key: Arc<RuntimeKey>,
        deployment: Arc<RuntimeDeployment>,
        started: Instant,
        reservation: crate::limits::Reservation,
        log: Option<crate::accounting::usage_log::UsageLog>,
    ) -> Self {
        Self {
            request_id,
            request: None,
            sent: false,
            opened: 0,
            unbilled: (TokenUsage::default(), Picodollars(0)),
            relayed: Relayed::default(),
            key,
            deployment,
            started,
            first_byte: None,
            reservation,
            log,
            in_flight: None,
            attempt_counted: false,
            settled: false,
        }
    }

    /// Keeps the request's body, from which the prompt is estimated should the upstream do work
    /// and report no usage.
    pub(crate) fn with_request(
        mut self,
        body: bytes::Bytes,
        endpoint: crate::api::request::Endpoint,
    ) -> Self {
        self.request = Some((body, endpoint));
        self
    }

    /// The current attempt's request is going upstream: from here the upstream may do work
    /// it bills. Unless [`Charge::no_work`] says otherwise, the attempt is charged: with the
    /// usage the upstream reports, else with an estimate (the prompt from the tokenizer, the
    /// completion from the text relayed) marked `usage_source: estimated`.
    ///
    /// With a usage log file, the first attempt sent also writes an open record at the cost
    /// `reserved` gives (the prompt estimate, and `max_tokens` at the output price): should the
    /// process be killed before the request settles, the next start charges that (see
    /// [`crate::accounting::usage_log::replay`]).
    pub(crate) fn sending(&mut self, reserved: impl FnOnce() -> crate::limits::Ask) {
        self.sent = true;
        if self.opened == 0
            && let Some(log) = self.log.as_ref().filter(|l| l.has_file())
        {
            let ask = reserved();
            self.opened = crate::accounting::usage_log::UsageLog::next_seq();
            log.open_record(self.record(
                crate::accounting::usage_log::UsageLog::id_of(self.opened),
                TokenUsage {
                    prompt: ask.tokens,
                    completion: 0,
                    cached: 0,
                },
                ask.cost,
                crate::accounting::usage_log::OPEN,
                UsageSource::Estimated,
            ));
        }
    }

    /// A usage record of this request, on its current deployment.
    fn record(
        &self,
        id: String,
        u: TokenUsage,
        cost: Picodollars,
        outcome: &str,
        usage_source: UsageSource,
    ) -> crate::accounting::usage_log::UsageRecord {
        let d = &self.deployment;
        crate::accounting::usage_log::UsageRecord {
            id,
            request_id: self.request_id.to_str().unwrap_or("").to_string(),
            ts_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            key: self.key.id.clone(),
            team: self.key.config.team.clone(),
            model: d.model.clone(),
            deployment: d.id.clone(),
            prompt_tokens: u.prompt,
            completion_tokens: u.completion,
            cached_tokens: u.cached,
            cost_pico: cost.0,
            outcome: outcome.to_string(),
            requests: 1,
            usage_source,
        }
    }

    /// The current attempt did no billable work: it never reached the upstream (no
    /// connection), or the upstream answered with an error status or ended the connection
    /// before answering.
    pub(crate) fn no_work(&mut self) {
        self.sent = false;
    }

    /// Text the client received (a stream's content, tool-call arguments), counted as
    /// completion tokens if the upstream reports no usage.
    pub(crate) fn relayed(&mut self, text: &[u8]) {
        self.relayed.push(text);
    }

    /// The estimated usage of the current attempt on its deployment.
    fn estimate(&self) -> TokenUsage {
        let family = self.deployment.tokens;
        let prompt = match &self.request {
            Some((body, endpoint)) => {
                match crate::api::request::ParsedRequest::parse(body, *endpoint) {
                    Ok(parsed) => {
                        crate::accounting::tokens::estimate(family, *endpoint, &parsed, body)
                    }
                    Err(_) => (body.len() as u64 / 4).max(1),
                }
            }
            None => 0,
        };
        TokenUsage {
            prompt,
            completion: self.relayed.tokens(family),
            cached: 0,
        }
    }

    /// Counts the request in flight on its endpoint until it settles.
    pub(crate) fn set_in_flight(&mut self, guard: crate::routing::InFlight) {
        self.in_flight = Some(guard);
    }

    /// The reservations, for adding the next deployment's on a retry.
    pub(crate) fn reservation_mut(&mut self) -> &mut crate::limits::Reservation {
        &mut self.reservation
    }

    /// Ends a failed attempt on the current deployment: counted in its metrics, its
    /// reservations released with no usage. The key's reservation, the usage record and the
    /// key's counters stay with the request, which is settled once at the end.
    pub(crate) fn attempt_failed(&mut self) {
        self.deployment
            .metrics
            .outcome(Outcome::UpstreamError)
            .increment(1);
        self.attempt_counted = true;
        self.in_flight = None;
        if self.sent {
            // A timed-out attempt the upstream may have run (and billed): charged its estimate
            // with the request, whatever the next attempt does.
            let u = self.estimate();
            let (tokens, cost) = &mut self.unbilled;
            tokens.prompt = tokens.prompt.saturating_add(u.prompt);
            tokens.completion = tokens.completion.saturating_add(u.completion);
            *cost = Picodollars(cost.0.saturating_add(self.deployment.pricing.cost(u).0));
            self.sent = false;
            self.relayed = Relayed::default();
        }
        self.reservation.release(
            crate::limits::Scope::Deployment,
            crate::rt::clock::unix_secs(),
        );
    }

    /// Moves the request to `next` for its next attempt.
    pub(crate) fn set_deployment(&mut self, next: Arc<RuntimeDeployment>) {
        self.deployment = next;
        self.attempt_counted = false;
    }

    /// Marks the first response byte on its way to the client.
    pub(crate) fn first_byte(&mut self) {
        if self.first_byte.is_none() {
            self.first_byte = Some(Instant::now());
        }
    }

    /// Records usage, cost and metrics, and settles the rate-limit and budget reservations.
    pub(crate) fn settle(mut self, usage: Option<TokenUsage>, outcome: Outcome) -> Settled {
        self.settle_once(usage, outcome)
    }

    fn settle_once(&mut self, usage: Option<TokenUsage>, outcome: Outcome) -> Settled {
        if self.settled {
            return Settled::default();
        }
        self.settled = true;
        self.in_flight = None;
        let (usage, source) = match usage {
            Some(u) => (Some(u), UsageSource::Reported),
            None if self.sent => (Some(self.estimate()), UsageSource::Estimated),
            None => (None, UsageSource::Reported),
        };
        let d = &self.deployment;
        let mut cost = usage.map(|u| d.pricing.cost(u)).unwrap_or_default();
        let (extra, source) = match self.unbilled {
            (_, Picodollars(0)) if self.unbilled.0 == TokenUsage::default() => (None, source),
            (tokens, extra) => {
                cost = Picodollars(cost.0.saturating_add(extra.0));
                (Some(tokens), UsageSource::Estimated)
            }
        };
        let usage = match (usage, extra) {
            (Some(u), Some(e)) => Some(TokenUsage {
                prompt: u.prompt.saturating_add(e.prompt),
                completion: u.completion.saturating_add(e.completion),
                cached: u.cached,
            }),
            (u, e) => u.or(e),
        };

        self.key.usage.add(usage, cost);
        d.usage.add(usage, cost);
        let m = &d.metrics;
        if source == UsageSource::Estimated {
            m.estimated.increment(1);
        }
        if !self.attempt_counted {
            m.outcome(outcome).increment(1);
        }
        let now = Instant::now();
        m.duration
            .record(now.duration_since(self.started).as_secs_f64());
        if let Some(fb) = self.first_byte {
            m.ttfb.record(fb.duration_since(self.started).as_secs_f64());
        }
        let u = usage.unwrap_or_default();
        let recorded = self.reservation.settle(
            u.prompt.saturating_add(u.completion),
            cost,
            crate::rt::clock::unix_secs(),
        );
        if let Some(log) = &self.log {
            let id = match self.opened {
                0 => String::new(),
                seq => crate::accounting::usage_log::UsageLog::id_of(seq),
            };
            log.record(self.record(id, u, cost, outcome.as_str(), source));
        }
        tracing::debug!(
            target: "tollgate::access",
            request_id = self.request_id.to_str().unwrap_or(""),
            key = self.key.config.id,
            model = &*d.model,
            deployment = &*d.id,
            outcome = outcome.as_str(),
            usage_source = source.as_str(),
            prompt_tokens = u.prompt,
            completion_tokens = u.completion,
            cost_usd = %cost,
            duration_ms = now.duration_since(self.started).as_millis() as u64,
            "request settled"
        );
        Settled { cost, recorded }
    }
}

/// A settled charge: its cost, and the budget spend still on its way to Redis, if any.
#[derive(Debug, Default)]
pub(crate) struct Settled {
    /// What the request cost.
    pub(crate) cost: Picodollars,
    recorded: Option<crate::limits::redis::Recorded>,
}

impl Settled {
    /// The cost, once the spend is recorded where every replica's budget check sees it. A
    /// served response waits for this before it ends; failures don't (they spent nothing, so
    /// until Redis has it their reservation only over-counts).
    pub(crate) async fn recorded(self) -> Picodollars {
        if let Some(r) = self.recorded {
            r.await;
        }
        self.cost
    }

    /// The spend still on its way to Redis, if any.
    pub(crate) fn pending(self) -> Option<crate::limits::redis::Recorded> {
        self.recorded
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        // Dropped unsettled: the request's future was dropped (the client went away while the
        // upstream was working, or shutdown cut it). Release its reservations and count it.
        self.settle_once(None, Outcome::dropped());
    }
}

/// Most relayed text kept for the completion estimate; past it only the length is counted
/// (at 4 bytes a token).
const RELAYED_MAX: usize = 1 << 20;

/// The text relayed to the client, for estimating completion tokens.
#[derive(Debug, Default)]
struct Relayed {
    text: Vec<u8>,
    overflow: u64,
}

impl Relayed {
    fn push(&mut self, text: &[u8]) {
        let room = RELAYED_MAX.saturating_sub(self.text.len()).min(text.len());
        self.text.extend_from_slice(&text[..room]);
        self.overflow += (text.len() - room) as u64;
    }

    /// Completion tokens of the text, as a model of `family` counts them.
    fn tokens(&self, family: crate::accounting::tokens::Family) -> u64 {
        if self.text.is_empty() && self.overflow == 0 {
            return 0;
        }
        crate::accounting::tokens::count_text(family, &String::from_utf8_lossy(&self.text))
            .saturating_add(self.overflow.div_ceil(4))
    }
}
