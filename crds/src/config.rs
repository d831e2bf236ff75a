//! The compiled, validated configuration a data-plane pod runs on.
//!
//! Everything here is plain data in the units the hot path wants (milliseconds, micro-dollar
//! prices, key hashes): no Kubernetes types, no I/O. The operator publishes it; the standalone
//! data plane builds it from manifests on disk; both through [`crate::compile`].

use crate::common::Limits;
use crate::model::Provider;
use crate::policy::{CacheMode, RetryOn, Strategy};
use crate::secret::SecretString;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;

/// The whole served configuration: model groups by public name, and virtual keys.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayConfig {
    /// Model groups by public model name.
    pub models: BTreeMap<String, ModelGroup>,
    /// Virtual keys, sorted by id.
    pub keys: Vec<KeyConfig>,
    /// Team budgets by team name (from the keys' `teamBudget`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub teams: BTreeMap<String, BudgetConfig>,
}

impl GatewayConfig {
    /// A hash of the content, to tell whether two configs differ.
    pub fn content_hash(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        hex(&Sha256::digest(&json)[..16])
    }
}

/// All deployments serving one public model name, and the policy that routes between them.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelGroup {
    /// Deployments, sorted by id.
    pub deployments: Vec<Deployment>,
    /// The RoutePolicy naming this model, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyConfig>,
}

/// One deployment (one LLMModel).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Deployment {
    /// `namespace/name` of the LLMModel.
    pub id: String,
    /// Wire protocol.
    pub provider: Provider,
    /// Model name sent upstream.
    pub upstream_model: String,
    /// Where requests go.
    pub backend: Backend,
    /// Provider API key, sent as `Authorization: Bearer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<SecretString>,
    /// Relative weight in the group.
    pub weight: u32,
    /// Deployment limits.
    #[serde(default)]
    pub limits: Limits,
    /// Prices.
    #[serde(default)]
    pub pricing: Prices,
    /// Context window in tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_window: Option<u32>,
    /// Timeouts.
    pub timeouts: TimeoutConfig,
    /// Active health probe, if configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckConfig>,
}

/// An active health probe.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheckConfig {
    /// Interval, ms.
    pub interval_ms: u64,
    /// Path below the base URL (`/models`).
    pub path: String,
    /// Timeout, ms.
    pub timeout_ms: u64,
}

/// Where a deployment's requests go.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub enum Backend {
    /// Base URLs of the API (one per resolved endpoint), without a trailing slash.
    Urls(Vec<String>),
    /// Served inside the data plane.
    Mock(MockConfig),
}

/// The built-in mock provider's behaviour.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MockConfig {
    /// Reply text.
    pub reply: String,
    /// Reported prompt tokens; `None`: request bytes / 4.
    pub prompt_tokens: Option<u32>,
    /// Reported completion tokens; `None`: words in the reply.
    pub completion_tokens: Option<u32>,
    /// Delay before the response, ms.
    pub latency_ms: u64,
    /// Content chunks in a streamed reply; `None`: one per word.
    pub chunks: Option<u32>,
    /// Delay between streamed chunks, ms.
    pub chunk_delay_ms: u64,
}

/// The mock reply when none is configured.
pub const DEFAULT_MOCK_REPLY: &str = "Hello from Tollgate's mock model!";

/// Timeouts in milliseconds.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TimeoutConfig {
    /// Connect timeout.
    pub connect_ms: u64,
    /// Time to response headers.
    pub first_byte_ms: u64,
    /// Whole request; `None`: unlimited.
    pub total_ms: Option<u64>,
    /// Longest gap between two chunks of a streamed response; `None`: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_ms: Option<u64>,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        // Generous first-byte default: large prompts on busy self-hosted models can queue for
        // minutes, and a gateway that gives up first only wastes the work already done.
        Self {
            connect_ms: 10_000,
            first_byte_ms: 600_000,
            total_ms: None,
            idle_ms: None,
        }
    }
}

/// Timeouts a RoutePolicy sets, each overriding the deployment's own when present.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TimeoutOverrides {
    /// Connect timeout, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_ms: Option<u64>,
    /// Time to response headers, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_byte_ms: Option<u64>,
    /// Whole request, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<u64>,
    /// Longest gap between two chunks of a streamed response, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_ms: Option<u64>,
}

impl TimeoutConfig {
    /// These timeouts with `o`'s set fields in their place.
    pub fn overridden(self, o: &TimeoutOverrides) -> Self {
        Self {
            connect_ms: o.connect_ms.unwrap_or(self.connect_ms),
            first_byte_ms: o.first_byte_ms.unwrap_or(self.first_byte_ms),
            total_ms: o.total_ms.or(self.total_ms),
            idle_ms: o.idle_ms.or(self.idle_ms),
        }
    }
}

/// Token prices in micro-dollars per million tokens, so that a cost in pico-dollars is
/// `tokens × price`, exactly, in integers.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Prices {
    /// Prompt tokens.
    pub input: u64,
    /// Completion tokens.
    pub output: u64,
    /// Cached prompt tokens.
    pub cached_input: u64,
}

/// Token counts of one request, as the upstream reported them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenUsage {
    /// Prompt tokens, including cached ones.
    pub prompt: u64,
    /// Completion tokens.
    pub completion: u64,
    /// Of the prompt tokens, how many were served from the provider's prompt cache.
    pub cached: u64,
}

impl Prices {
    /// Cost of `usage` in pico-dollars (1e-12 USD). Saturates rather than wrapping.
    pub fn cost(&self, usage: TokenUsage) -> Picodollars {
        let cached = usage.cached.min(usage.prompt);
        let uncached = usage.prompt - cached;
        Picodollars(
            uncached
                .saturating_mul(self.input)
                .saturating_add(cached.saturating_mul(self.cached_input))
                .saturating_add(usage.completion.saturating_mul(self.output)),
        )
    }
}

/// An amount of money in pico-dollars (1e-12 USD): integer, so sums are exact. A `u64` holds up
/// to about 18 million USD.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize,
)]
#[serde(transparent)]
pub struct Picodollars(pub u64);

impl Picodollars {
    /// Converts a USD amount (as written in a manifest) to pico-dollars, rounding to the nearest.
    pub fn from_usd(usd: f64) -> Option<Self> {
        if !usd.is_finite() || !(0.0..=1.8e7).contains(&usd) {
            return None;
        }
        Some(Self((usd * 1e12).round() as u64))
    }
}

impl Picodollars {
    /// The amount as a decimal USD string with no trailing zeros (`0.0001234`, `12`, `0`),
    /// written into `buf` without `fmt` or an allocation: it goes into every response's cost
    /// header. Returns the written bytes.
    pub fn write_usd(self, buf: &mut [u8; 40]) -> &[u8] {
        let whole = self.0 / 1_000_000_000_000;
        let frac = self.0 % 1_000_000_000_000;
        // Digits are written backwards from the end of `buf`: the fraction (trailing zeros
        // dropped), the point, then the whole part.
        let mut at = buf.len();
        if frac != 0 {
            let mut n = frac;
            let mut trailing = true;
            for _ in 0..12 {
                let d = (n % 10) as u8;
                n /= 10;
                if trailing && d == 0 {
                    continue;
                }
                trailing = false;
                at -= 1;
                buf[at] = b'0' + d;
            }
            at -= 1;
            buf[at] = b'.';
        }
        let mut n = whole;
        loop {
            at -= 1;
            buf[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        &buf[at..]
    }
}

impl fmt::Display for Picodollars {
    /// A decimal USD string with no trailing zeros: `0.0001234`, `12`, `0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 40];
        f.write_str(std::str::from_utf8(self.write_usd(&mut buf)).map_err(|_| fmt::Error)?)
    }
}

/// A virtual key, by the hash of its secret.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KeyConfig {
    /// `namespace/name` of the VirtualKey.
    pub id: String,
    /// SHA-256 of the key.
    pub hash: KeyHash,
    /// Team.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// Alias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Allowed public model names; empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// Budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetConfig>,
    /// Limits.
    #[serde(default)]
    pub limits: Limits,
    /// Expiry, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

/// A budget: max spend per period.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BudgetConfig {
    /// Max spend per period.
    pub max: Picodollars,
    /// The period.
    pub period: BudgetPeriod,
}

/// How often a budget resets.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum BudgetPeriod {
    /// Never.
    Lifetime,
    /// At 00:00 UTC.
    Daily,
    /// Mondays 00:00 UTC.
    Weekly,
    /// The 1st of the month, 00:00 UTC.
    Monthly,
    /// Every so many seconds from the Unix epoch.
    Seconds(u64),
}

impl BudgetPeriod {
    /// Index of the budget period containing `now` (Unix seconds). Periods are in UTC: days start
    /// at 00:00, weeks on Monday, months on the 1st; fixed durations count from the Unix epoch.
    pub fn index(self, now: u64) -> u64 {
        match self {
            BudgetPeriod::Lifetime => 0,
            BudgetPeriod::Daily => now / DAY,
            // 1970-01-01 was a Thursday: shift by 3 days so weeks start on Monday.
            BudgetPeriod::Weekly => (now / DAY + 3) / 7,
            BudgetPeriod::Monthly => {
                let (y, m, _) = civil_from_days((now / DAY) as i64);
                (y as u64) * 12 + (m as u64 - 1)
            }
            BudgetPeriod::Seconds(s) => now / s.max(1),
        }
    }

    /// When the period containing `now` ends, or `None` for a lifetime budget.
    pub fn end(self, now: u64) -> Option<u64> {
        Some(match self {
            BudgetPeriod::Lifetime => return None,
            BudgetPeriod::Daily => (now / DAY + 1) * DAY,
            BudgetPeriod::Weekly => ((now / DAY + 3) / 7 + 1) * 7 * DAY - 3 * DAY,
            BudgetPeriod::Monthly => {
                let (y, m, _) = civil_from_days((now / DAY) as i64);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                days_from_civil(ny, nm, 1) as u64 * DAY
            }
            BudgetPeriod::Seconds(s) => (now / s.max(1) + 1) * s.max(1),
        })
    }
}

const DAY: u64 = 86_400;

// Howard Hinnant's civil-date algorithms: days since 1970-01-01 <-> (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// SHA-256 of a virtual key; serialized as hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    /// Hashes a key as a client sends it.
    pub fn of(key: impl AsRef<[u8]>) -> Self {
        Self(Sha256::digest(key.as_ref()).into())
    }

    /// A short, safe identifier: the first 12 hex digits of the hash.
    pub fn short_id(&self) -> String {
        hex(&self.0[..6])
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({})", self.short_id())
    }
}

impl Serialize for KeyHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex(&self.0))
    }
}

impl<'de> Deserialize<'de> for KeyHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        if s.len() != 64 {
            return Err(serde::de::Error::custom("key hash must be 64 hex digits"));
        }
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let pair = std::str::from_utf8(chunk).map_err(serde::de::Error::custom)?;
            out[i] = u8::from_str_radix(pair, 16).map_err(serde::de::Error::custom)?;
        }
        Ok(Self(out))
    }
}

/// A compiled RoutePolicy.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyConfig {
    /// `namespace/name` of the RoutePolicy.
    pub id: String,
    /// Routing strategy.
    pub strategy: Strategy,
    /// Attempts in all (>= 1).
    pub attempts: u32,
    /// Backoff base, ms.
    pub backoff_ms: u64,
    /// Retried failure classes (all when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on: Vec<RetryOn>,
    /// Fallback model names, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<String>,
    /// Context-window fallback model names, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub context_window_fallbacks: Vec<String>,
    /// Cooldown.
    pub cooldown: CooldownConfig,
    /// Timeout overrides, already merged into each deployment's `timeouts` by compile().
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<TimeoutOverrides>,
    /// Cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheConfig>,
}

/// Cooldown settings.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CooldownConfig {
    /// Failures allowed in the window.
    pub allowed_fails: u32,
    /// Window, ms.
    pub window_ms: u64,
    /// Cooldown, ms.
    pub duration_ms: u64,
}

impl Default for CooldownConfig {
    fn default() -> Self {
        Self {
            allowed_fails: 3,
            window_ms: 60_000,
            duration_ms: 30_000,
        }
    }
}

/// Cache settings.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CacheConfig {
    /// Mode.
    pub mode: CacheMode,
    /// Entry lifetime, ms.
    pub ttl_ms: u64,
    /// Semantic similarity threshold.
    pub similarity_threshold: f64,
    /// Embedding model name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_model: Option<String>,
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_is_exact_in_picodollars() {
        // $2.50 / $10.00 per million, $1.25 cached: gpt-4o's list prices.
        let p = Prices {
            input: 2_500_000,
            output: 10_000_000,
            cached_input: 1_250_000,
        };
        let c = p.cost(TokenUsage {
            prompt: 1000,
            completion: 500,
            cached: 200,
        });
        // 800 × 2.5e-6 + 200 × 1.25e-6 + 500 × 1e-5 = 0.002 + 0.00025 + 0.005
        assert_eq!(c.to_string(), "0.00725");
        assert_eq!(Picodollars(0).to_string(), "0");
        assert_eq!(Picodollars(u64::MAX).to_string(), "18446744.073709551615");
        assert_eq!(Picodollars(75_000_000).to_string(), "0.000075");
        assert_eq!(Picodollars(10_000_000_000_000).to_string(), "10");
        assert_eq!(Picodollars(100_000_000_000).to_string(), "0.1");
        assert_eq!(Picodollars(3_000_000_000_000).to_string(), "3");
        assert_eq!(Picodollars(1).to_string(), "0.000000000001");
        assert_eq!(
            Picodollars(12_500_000_000_010).to_string(),
            "12.50000000001"
        );
        assert_eq!(
            Picodollars::from_usd(0.1),
            Some(Picodollars(100_000_000_000))
        );
        assert_eq!(Picodollars::from_usd(-1.0), None);
    }

    #[test]
    fn key_hash_round_trips_as_hex() {
        let h = KeyHash::of("sk-tollgate-demo");
        let json = serde_json::to_string(&h).expect("serialize");
        assert_eq!(json.len(), 66);
        let back: KeyHash = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, h);
        assert_eq!(h.short_id().len(), 12);
    }
}
