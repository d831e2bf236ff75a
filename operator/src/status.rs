//! The pure middle of a reconcile: from the objects and what [`compile`](tollgate_crds::compile)
//! said about them, the status every object should have. No I/O here; the caller compares
//! with the status the object has and writes only the difference.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use std::collections::HashMap;
use tollgate_crds::ObjectError;
use tollgate_crds::common::condition::{
    ACCEPTED, BACKEND_RESOLVED, BUDGET_EXCEEDED, EXPIRED, READY, RESOLVED_REFS,
};

/// What an object's status says now: its conditions and the generation they are about.
pub trait Reported {
    /// `status.conditions` (empty without a status) and `status.observedGeneration`.
    fn reported(&self) -> (&[Condition], Option<i64>);
}

macro_rules! reported {
    ($($kind:ty),*) => {$(
        impl Reported for $kind {
            fn reported(&self) -> (&[Condition], Option<i64>) {
                self.status.as_ref().map_or((&[], None), |s| {
                    (s.conditions.as_slice(), s.observed_generation)
                })
            }
        }
    )*};
}

reported!(
    tollgate_crds::LlmModel,
    tollgate_crds::VirtualKey,
    tollgate_crds::RoutePolicy
);

/// The status fields the operator owns on every Tollgate object.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    /// `metadata.generation` this status describes.
    pub observed_generation: Option<i64>,
    /// Conditions, with `lastTransitionTime` carried over where the status didn't change.
    pub conditions: Vec<Condition>,
}

/// One condition to set: type, status, reason, message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    /// `type`.
    pub kind: &'static str,
    /// `True` / `False`.
    pub ok: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
}

impl Want {
    fn new(kind: &'static str, ok: bool, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            ok,
            reason,
            message: message.into(),
        }
    }
}

/// Errors by (kind, `namespace/name`), each rendered as `field: message`.
pub fn errors_by_object(errors: &[ObjectError]) -> HashMap<(&'static str, String), Vec<String>> {
    let mut out: HashMap<(&'static str, String), Vec<String>> = HashMap::new();
    for e in errors {
        let text = match &e.field {
            Some(f) => format!("{f}: {}", e.message),
            None => e.message.clone(),
        };
        out.entry((e.kind, e.object.clone()))
            .or_default()
            .push(text);
    }
    out
}

/// Conditions of an LLMModel: `Ready`, and `BackendResolved` with how many endpoints its
/// backend resolved to (or why it didn't).
pub fn model_conditions(errors: Option<&Vec<String>>, backend: Result<usize, &str>) -> Vec<Want> {
    let mut out = model_ready(errors);
    out.push(match backend {
        Ok(n) => Want::new(
            BACKEND_RESOLVED,
            true,
            "Resolved",
            format!("{n} endpoint(s)."),
        ),
        Err(e) => Want::new(BACKEND_RESOLVED, false, "Unresolved", e),
    });
    out
}

fn model_ready(errors: Option<&Vec<String>>) -> Vec<Want> {
    match errors {
        None => vec![Want::new(
            READY,
            true,
            "Compiled",
            "Valid and published to the data plane.",
        )],
        Some(e) => vec![Want::new(
            READY,
            false,
            "Invalid",
            format!("Not served: {}", e.join("; ")),
        )],
    }
}

/// Conditions of a VirtualKey; `expired` when `expiresAt` has passed; `exceeded` whether its
/// budget for this period is spent (when it has a budget and spend is known).
pub fn key_conditions(
    errors: Option<&Vec<String>>,
    expired: bool,
    exceeded: Option<bool>,
) -> Vec<Want> {
    let mut out = vec![match errors {
        None if expired => Want::new(READY, false, "Expired", "The key's expiresAt has passed."),
        None => Want::new(
            READY,
            true,
            "Compiled",
            "Valid and accepted by the data plane.",
        ),
        Some(e) => Want::new(
            READY,
            false,
            "Invalid",
            format!("Refused: {}", e.join("; ")),
        ),
    }];
    out.push(if expired {
        Want::new(EXPIRED, true, "Expired", "The key's expiresAt has passed.")
    } else {
        // Never an empty message: the API serializes it as null, which the schema refuses.
        Want::new(EXPIRED, false, "NotExpired", "The key has not expired.")
    });
    match exceeded {
        Some(true) => out.push(Want::new(
            BUDGET_EXCEEDED,
            true,
            "BudgetSpent",
            "The budget for this period is spent: requests get 429 budget_exceeded until status.spend.budgetResetAt.",
        )),
        Some(false) => out.push(Want::new(
            BUDGET_EXCEEDED,
            false,
            "WithinBudget",
            "Spend this period is below the budget.",
        )),
        None => {}
    }
    out
}

/// Conditions of a RoutePolicy: `Accepted`, and `ResolvedRefs` (false when a model it names
/// doesn't exist).
pub fn policy_conditions(errors: Option<&Vec<String>>) -> Vec<Want> {
    match errors {
        None => vec![
            Want::new(
                ACCEPTED,
                true,
                "Accepted",
                "Valid and applied to its models.",
            ),
            Want::new(
                RESOLVED_REFS,
                true,
                "ResolvedRefs",
                "Every model it names exists.",
            ),
        ],
        Some(e) => {
            let unresolved: Vec<&String> =
                e.iter().filter(|m| m.contains("no LLMModel has")).collect();
            vec![
                Want::new(
                    ACCEPTED,
                    false,
                    "Invalid",
                    format!("Not applied: {}", e.join("; ")),
                ),
                if unresolved.is_empty() {
                    Want::new(
                        RESOLVED_REFS,
                        true,
                        "ResolvedRefs",
                        "Every model it names exists.",
                    )
                } else {
                    Want::new(
                        RESOLVED_REFS,
                        false,
                        "ModelNotFound",
                        unresolved
                            .iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join("; "),
                    )
                },
            ]
        }
    }
}

/// The conditions to write: `want`, keeping each current condition's `lastTransitionTime`
/// when its status is unchanged (so it marks real transitions only).
pub fn merge(current: &[Condition], want: &[Want], generation: Option<i64>) -> Vec<Condition> {
    let now = Time(jiff::Timestamp::now());
    want.iter()
        .map(|w| {
            let status = if w.ok { "True" } else { "False" };
            let last = current
                .iter()
                .find(|c| c.type_ == w.kind && c.status == status)
                .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
            Condition {
                last_transition_time: last,
                message: w.message.clone(),
                observed_generation: generation,
                reason: w.reason.to_string(),
                status: status.to_string(),
                type_: w.kind.to_string(),
            }
        })
        .collect()
}

/// Whether the current status already says what `desired` says.
pub fn up_to_date(
    current_generation: Option<i64>,
    current: &[Condition],
    desired: &Desired,
) -> bool {
    current_generation == desired.observed_generation
        && current.len() == desired.conditions.len()
        && current.iter().zip(&desired.conditions).all(|(a, b)| {
            a.type_ == b.type_
                && a.status == b.status
                && a.reason == b.reason
                && a.message == b.message
                && a.observed_generation == b.observed_generation
        })
}

/// The conditions that changed status between `current` and `desired`, for Events.
pub fn transitions<'a>(current: &[Condition], desired: &'a Desired) -> Vec<&'a Condition> {
    desired
        .conditions
        .iter()
        .filter(|d| {
            !current
                .iter()
                .any(|c| c.type_ == d.type_ && c.status == d.status)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_transition_time_moves_only_when_the_status_does() {
        let first = merge(&[], &model_conditions(None, Ok(1)), Some(1));
        let t0 = first[0].last_transition_time.clone();
        std::thread::sleep(std::time::Duration::from_millis(5));
        // Same status, new generation and message: the time stays.
        let again = merge(&first, &model_conditions(None, Ok(1)), Some(2));
        assert_eq!(again[0].last_transition_time, t0);
        assert_eq!(again[0].observed_generation, Some(2));
        // The status flips: a new time.
        let errs = vec!["spec.url: invalid URL".to_string()];
        let flipped = merge(&again, &model_conditions(Some(&errs), Ok(1)), Some(3));
        assert_ne!(flipped[0].last_transition_time, t0);
        assert_eq!(flipped[0].status, "False");
        assert_eq!(flipped[0].message, "Not served: spec.url: invalid URL");
        let d = Desired {
            observed_generation: Some(3),
            conditions: flipped.clone(),
        };
        assert!(up_to_date(Some(3), &flipped, &d));
        assert!(!up_to_date(Some(2), &flipped, &d));
        assert_eq!(transitions(&again, &d).len(), 1);
        assert_eq!(flipped[1].type_, "BackendResolved");
    }

    #[test]
    fn a_policy_naming_a_missing_model_has_unresolved_refs() {
        let errs = vec![r#"spec.fallbacks[0]: no LLMModel has modelName "x""#.to_string()];
        let c = policy_conditions(Some(&errs));
        assert!(!c[0].ok && !c[1].ok);
        assert_eq!(c[1].reason, "ModelNotFound");
        let errs = vec!["spec.fallbacks: fallback loop: a -> b -> a".to_string()];
        let c = policy_conditions(Some(&errs));
        assert!(!c[0].ok && c[1].ok);
    }
}
