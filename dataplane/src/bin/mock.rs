//! `tollgate-mock`: the built-in mock provider as a standalone OpenAI-compatible HTTP server, the
//! upstream for benchmarks and tests.

use clap::Parser;
use std::net::SocketAddr;
use std::sync::Arc;
use tollgate_crds::common::parse_duration;
use tollgate_crds::config::{DEFAULT_MOCK_REPLY, MockConfig};
use tollgate_dataplane::upstream::mock::{Mock, router};

/// A deterministic OpenAI-compatible server.
#[derive(Debug, Parser)]
#[command(name = "tollgate-mock", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Reply text.
    #[arg(long, default_value = DEFAULT_MOCK_REPLY)]
    reply: String,
    /// Reported prompt tokens (default: request bytes / 4).
    #[arg(long)]
    prompt_tokens: Option<u32>,
    /// Reported completion tokens (default: words in the reply).
    #[arg(long)]
    completion_tokens: Option<u32>,
    /// Streamed chunks (default: one per word).
    #[arg(long)]
    chunks: Option<u32>,
    /// Delay before each response.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    latency: std::time::Duration,
    /// Delay between streamed chunks.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    chunk_delay: std::time::Duration,
    /// Worker threads; 1 uses a single-threaded runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = MockConfig {
        reply: args.reply.clone(),
        prompt_tokens: args.prompt_tokens,
        completion_tokens: args.completion_tokens,
        latency_ms: args.latency.as_millis() as u64,
        chunks: args.chunks,
        chunk_delay_ms: args.chunk_delay.as_millis() as u64,
    };
    let rt = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()?
    };
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        println!("tollgate-mock listening on {}", listener.local_addr()?);
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, router(Arc::new(Mock::new(&cfg))))
            .with_graceful_shutdown(tollgate_dataplane::app::shutdown_signal())
            .await?;
        Ok(())
    })
}
