//! The Argo CD health checks in `examples/argocd/argocd-cm.yaml`, run by a real Lua interpreter
//! (`lua5.4`, or `$TOLLGATE_LUA`) exactly as they are pasted into `argocd-cm`: each script gets
//! the object as the global `obj` and returns `{status, message}`. Every combination of the
//! conditions the operator writes (absent, True, False, Unknown), with the status current or
//! behind `metadata.generation`, is checked against the rules below; a few named cases check
//! the messages. The scripts stay within Lua 5.1 (what Argo CD's gopher-lua runs): checked by
//! refusing 5.2+ syntax.

#![expect(clippy::unwrap_used, reason = "tests")]

use serde_json::{Value, json};
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

fn scripts() -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/argocd/argocd-cm.yaml");
    let cm: Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(cm["kind"], "ConfigMap");
    assert_eq!(cm["metadata"]["name"], "argocd-cm");
    let mut out = Vec::new();
    for (key, script) in cm["data"].as_object().unwrap() {
        let kind = key
            .strip_prefix("resource.customizations.health.tollgate.dev_")
            .unwrap_or_else(|| panic!("unexpected key {key}"));
        out.push((kind.to_string(), script.as_str().unwrap().to_string()));
    }
    out.sort();
    assert_eq!(
        out.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
        ["LLMModel", "RoutePolicy", "VirtualKey"]
    );
    out
}

fn script(kind: &str) -> String {
    scripts().into_iter().find(|(k, _)| k == kind).unwrap().1
}

/// A Lua literal of a JSON value.
fn lua(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) => format!("{{{}}}", a.iter().map(lua).collect::<Vec<_>>().join(", ")),
        Value::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, v)| format!("[{k:?}] = {}", lua(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Runs `script` once per object with one `lua5.4`: `(status, message)` of each.
fn health(script: &str, objects: &[Value]) -> Vec<(String, String)> {
    let mut program = format!("local check = assert(load({script:?}))\n");
    for o in objects {
        writeln!(
            program,
            "obj = {}\nlocal hs = check()\nio.write(hs.status, '\\t', hs.message or '', '\\n')",
            lua(o)
        )
        .unwrap();
    }
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let file = std::env::temp_dir().join(format!(
        "tollgate-health-{}-{}.lua",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::write(&file, program).unwrap();
    let bin = std::env::var("TOLLGATE_LUA").unwrap_or_else(|_| "lua5.4".into());
    let out = Command::new(&bin)
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("running {bin} (apt-get install lua5.4): {e}"));
    assert!(
        out.status.success(),
        "lua failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(&file);
    let text = String::from_utf8(out.stdout).unwrap();
    let results: Vec<(String, String)> = text
        .lines()
        .map(|l| {
            let (s, m) = l.split_once('\t').unwrap();
            (s.to_string(), m.to_string())
        })
        .collect();
    assert_eq!(results.len(), objects.len(), "{text}");
    results
}

const STATES: [Option<&str>; 4] = [None, Some("True"), Some("False"), Some("Unknown")];

fn condition(t: &str, status: &str) -> Value {
    json!({"type": t, "status": status, "reason": format!("{t}{status}"),
           "message": format!("{t} is {status}"), "lastTransitionTime": "2026-12-01T00:00:00Z"})
}

/// Every object of `kind` with each combination of `types`' states, with the status current
/// (observedGeneration 3 of 3) and behind (2 of 3), plus no status at all: the object and the
/// states.
fn combinations(kind: &str, types: &[&str]) -> Vec<(Value, Option<Vec<Option<&'static str>>>)> {
    let base = json!({"apiVersion": "tollgate.dev/v1alpha1", "kind": kind,
                      "metadata": {"name": "x", "namespace": "team-a", "generation": 3}, "spec": {}});
    let mut out = vec![(base.clone(), None)];
    // A status without observedGeneration (written by something else) is not trusted.
    let mut no_gen = base.clone();
    no_gen["status"] =
        json!({"conditions": types.iter().map(|t| condition(t, "True")).collect::<Vec<_>>()});
    out.push((no_gen, None));
    let n = types.len() as u32;
    for observed in [3, 2] {
        for i in 0..4usize.pow(n) {
            let states: Vec<Option<&str>> = (0..n).map(|d| STATES[i / 4usize.pow(d) % 4]).collect();
            let conditions: Vec<Value> = types
                .iter()
                .zip(&states)
                .filter_map(|(t, s)| s.map(|s| condition(t, s)))
                .collect();
            let mut o = base.clone();
            o["status"] = json!({"observedGeneration": observed, "conditions": conditions});
            out.push((o, (observed == 3).then_some(states)));
        }
    }
    out
}

/// Checks every combination of `types` for `kind` against `want` (given the states of
/// `types`, in order; `None` when the status is missing or behind: Progressing).
fn check_all(kind: &str, types: &[&str], want: impl Fn(&[Option<&str>]) -> &'static str) {
    let cases = combinations(kind, types);
    let objects: Vec<Value> = cases.iter().map(|(o, _)| o.clone()).collect();
    let got = health(&script(kind), &objects);
    let mut wrong = Vec::new();
    for ((o, states), (status, message)) in cases.iter().zip(&got) {
        let expected = states.as_deref().map_or("Progressing", &want);
        if status != expected || message.is_empty() {
            wrong.push(format!(
                "{kind} {states:?} (observedGeneration {}): {status} {message:?}, want {expected}",
                o["status"]["observedGeneration"]
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    println!("{kind}: {} cases", cases.len());
}

fn is(s: Option<&str>, v: &str) -> bool {
    s == Some(v)
}

#[test]
fn llmmodel_health_for_every_condition_combination() {
    // Ready decides; a model that is served but whose backend resolved to nothing is Degraded.
    check_all("LLMModel", &["Ready", "BackendResolved"], |s| {
        let (ready, backend) = (s[0], s[1]);
        match ready {
            None | Some("Unknown") => "Progressing",
            Some("False") => "Degraded",
            _ if is(backend, "False") => "Degraded",
            _ => "Healthy",
        }
    });
}

#[test]
fn virtualkey_health_for_every_condition_combination() {
    check_all("VirtualKey", &["Ready", "Expired", "BudgetExceeded"], |s| {
        let (ready, expired, budget) = (s[0], s[1], s[2]);
        if is(expired, "True") {
            return "Degraded";
        }
        match ready {
            None | Some("Unknown") => "Progressing",
            Some("False") => "Degraded",
            _ if is(budget, "True") => "Degraded",
            _ => "Healthy",
        }
    });
}

#[test]
fn routepolicy_health_for_every_condition_combination() {
    check_all("RoutePolicy", &["Accepted", "ResolvedRefs"], |s| {
        let (accepted, refs) = (s[0], s[1]);
        if is(refs, "False") {
            return "Degraded";
        }
        match accepted {
            None | Some("Unknown") => "Progressing",
            Some("False") => "Degraded",
            _ => "Healthy",
        }
    });
}

/// The messages users see, on statuses as the operator writes them (operator/src/status.rs).
#[test]
fn health_messages_say_why() {
    let obj = |kind: &str, conditions: Value| {
        json!({"kind": kind, "metadata": {"name": "x", "generation": 1},
               "status": {"observedGeneration": 1, "conditions": conditions}})
    };
    let got = health(
        &script("LLMModel"),
        &[
            obj(
                "LLMModel",
                json!([
                    {"type": "Ready", "status": "False", "reason": "Invalid",
                     "message": "Not served: spec.provider: provider \"anthropic\" is not supported by this version yet"},
                    {"type": "BackendResolved", "status": "True", "reason": "Resolved", "message": "1 endpoint(s)."}
                ]),
            ),
            obj(
                "LLMModel",
                json!([
                    {"type": "Ready", "status": "True", "reason": "Compiled", "message": "Valid and published to the data plane."},
                    {"type": "BackendResolved", "status": "False", "reason": "Unresolved", "message": "Service team-a/vllm not found"}
                ]),
            ),
            obj(
                "LLMModel",
                json!([
                    {"type": "Ready", "status": "True", "reason": "Compiled", "message": "Valid and published to the data plane."},
                    {"type": "BackendResolved", "status": "True", "reason": "Resolved", "message": "3 endpoint(s)."}
                ]),
            ),
        ],
    );
    assert_eq!(
        got,
        [
            (
                "Degraded".into(),
                "Not served: spec.provider: provider \"anthropic\" is not supported by this version yet".into()
            ),
            (
                "Degraded".into(),
                "Backend unresolved: Service team-a/vllm not found".into()
            ),
            ("Healthy".into(), "Served, 3 endpoint(s).".into()),
        ]
    );
    let got = health(
        &script("VirtualKey"),
        &[obj(
            "VirtualKey",
            json!([
                {"type": "Ready", "status": "True", "reason": "Compiled", "message": "Valid and accepted by the data plane."},
                {"type": "Expired", "status": "False", "reason": "NotExpired", "message": "The key has not expired."},
                {"type": "BudgetExceeded", "status": "True", "reason": "BudgetSpent",
                 "message": "The budget for this period is spent: requests get 429 budget_exceeded until status.spend.budgetResetAt."}
            ]),
        )],
    );
    assert_eq!(got[0].0, "Degraded");
    assert!(
        got[0].1.starts_with("The budget for this period is spent"),
        "{got:?}"
    );
    let got = health(
        &script("RoutePolicy"),
        &[obj(
            "RoutePolicy",
            json!([
                {"type": "Accepted", "status": "False", "reason": "Invalid",
                 "message": "Not applied: spec.fallbacks[0]: no LLMModel has modelName \"nope\""},
                {"type": "ResolvedRefs", "status": "False", "reason": "ModelNotFound",
                 "message": "spec.fallbacks[0]: no LLMModel has modelName \"nope\""}
            ]),
        )],
    );
    assert_eq!(
        got,
        [(
            "Degraded".into(),
            "spec.fallbacks[0]: no LLMModel has modelName \"nope\"".into()
        )]
    );
}

/// Argo CD runs Lua 5.1 (gopher-lua): none of 5.2+'s syntax.
#[test]
fn scripts_are_lua_5_1() {
    for (kind, s) in scripts() {
        for newer in [
            "goto ", "//", "::", " & ", " | ", "~=", "<<", ">>", "<const>", "<close>",
        ] {
            // `~=` (not equal) is 5.1; `~` alone (xor, 5.3) is not.
            if newer == "~=" {
                assert!(
                    !s.replace("~=", "").contains('~'),
                    "{kind}: bitwise ~ is Lua 5.3"
                );
                continue;
            }
            assert!(!s.contains(newer), "{kind}: {newer:?} is not Lua 5.1");
        }
    }
}
