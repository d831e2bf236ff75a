//! Stopping: signals, and what is flushed once the listeners have stopped.

use crate::gateway::state::{AppState, Stop};
use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;

/// How long a thread that stopped serving waits for the Redis settlements still unanswered (each
/// is one script call, normally a millisecond; a Redis call times out after 250 ms). Together
/// with [`crate::http::connections::ABORT_GRACE`] it fits in the 5 s the Helm chart leaves after the
/// shutdown timeout.
pub(super) const SETTLE_GRACE: Duration = Duration::from_secs(2);

/// After the listeners stopped and in-flight requests finished: flush what is still buffered.
pub(super) async fn close(state: &AppState) {
    if let Some(log) = &state.usage_log {
        log.close().await;
        tracing::info!("usage log flushed");
    }
}

/// Subscribes to SIGTERM and SIGINT now (before any worker thread serves, so that a signal that
/// comes during start-up isn't missed by a thread that subscribes late), and sets `state.stop`
/// when one comes: [`Stop::Stopping`], then [`Stop::Now`] on a second (an operator's second
/// Ctrl-C, or `kill` again, shouldn't have to wait out the shutdown timeout). Call inside the
/// runtime that runs the background tasks.
pub(super) fn stop_on_signal(state: &Arc<AppState>) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("subscribing to SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("subscribing to SIGINT")?;
        let state = state.clone();
        tokio::spawn(async move {
            for stop in [Stop::Stopping, Stop::Now] {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = int.recv() => {},
                }
                if stop == Stop::Now {
                    tracing::warn!(
                        "second signal: cutting the requests still running now (their spend is kept)"
                    );
                }
                state.stop.send_replace(stop);
            }
        });
    }
    #[cfg(not(unix))]
    {
        let state = state.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            state.stop.send_replace(Stop::Stopping);
        });
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
