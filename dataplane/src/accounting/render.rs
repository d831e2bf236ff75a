//! The ledger's totals as Prometheus text, rendered at scrape time from the exact counters.

use super::Ledger;
use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

/// Token and spend series from the ledger, in Prometheus text format.
pub(crate) fn render_ledger(ledger: &Ledger, per_key: bool, out: &mut String) {
    let deployments = ledger.deployments();
    let _ = writeln!(
        out,
        "# HELP tollgate_tokens_total Tokens reported by upstreams.\n# TYPE tollgate_tokens_total counter"
    );
    for ((model, id), c) in &deployments {
        let (m, d) = (crate::telemetry::label(model), crate::telemetry::label(id));
        let _ = writeln!(
            out,
            "tollgate_tokens_total{{model=\"{m}\",deployment=\"{d}\",type=\"prompt\"}} {}",
            c.prompt_tokens.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "tollgate_tokens_total{{model=\"{m}\",deployment=\"{d}\",type=\"completion\"}} {}",
            c.completion_tokens.load(Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP tollgate_spend_usd_total Spend from real usage and LLMModel prices.\n# TYPE tollgate_spend_usd_total counter"
    );
    for ((model, id), c) in &deployments {
        let _ = writeln!(
            out,
            "tollgate_spend_usd_total{{model=\"{}\",deployment=\"{}\"}} {}",
            crate::telemetry::label(model),
            crate::telemetry::label(id),
            c.spend()
        );
    }
    if per_key {
        let _ = writeln!(
            out,
            "# HELP tollgate_key_spend_usd_total Spend per virtual key.\n# TYPE tollgate_key_spend_usd_total counter"
        );
        for (id, c) in ledger.keys() {
            let _ = writeln!(
                out,
                "tollgate_key_spend_usd_total{{key=\"{}\"}} {}",
                crate::telemetry::label(&id),
                c.spend()
            );
        }
        let _ = writeln!(
            out,
            "# HELP tollgate_key_requests_total Requests per virtual key.\n# TYPE tollgate_key_requests_total counter"
        );
        for (id, c) in ledger.keys() {
            let _ = writeln!(
                out,
                "tollgate_key_requests_total{{key=\"{}\"}} {}",
                crate::telemetry::label(&id),
                c.requests.load(Relaxed)
            );
        }
    }
}
