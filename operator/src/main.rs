//! `tollgate-operator`: see the library docs.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = tollgate_operator::Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    if args.log_format == "json" {
        fmt.json().init();
    } else {
        fmt.init();
    }
    match tollgate_operator::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
