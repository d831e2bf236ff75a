//! `tollgate-operator`: reconciles LLMModel, VirtualKey and RoutePolicy into data-plane config.
//!
//! Not built yet: until it is, run the data plane standalone from manifests on disk (see the
//! README). This binary says so rather than pretending to run.

fn main() -> std::process::ExitCode {
    eprintln!(
        "tollgate-operator {}: the operator is not implemented yet; run `tollgate-dataplane \
         --manifests <dir>` with the same LLMModel/VirtualKey/RoutePolicy manifests instead",
        env!("CARGO_PKG_VERSION")
    );
    std::process::ExitCode::from(2)
}
