//! The life of client connections: the idle timeout, and closing them on shutdown, both kept
//! per connection rather than per request.
//!
//! hyper and hyper-util offer both per request. `header_read_timeout` creates a timer for every
//! request head (an allocation, a timer-wheel insert and removal, a clock read), and
//! `GracefulShutdown` wraps each connection in a future that registers with a `watch` channel
//! every time the connection is polled. Together they were about 1,100 instructions per
//! proxied request (callgrind), some 2.5 % of the gateway's own work. Here:
//!
//! - every connection has a [`ConnState`]: a close flag, the requests it started and finished,
//!   and its task's waker (registered once, when the connection is first polled);
//! - [`Connections::sweep_forever`] looks at every connection of its listener four times per
//!   idle timeout, and closes those that had no request in flight and started none for a whole
//!   idle timeout: idle keep-alive connections, and clients that never finish a request head;
//! - [`Connections::shutdown`] closes them all and waits until they are gone.
//!
//! A connection with no request in flight (idle, or still reading a head) is dropped at once;
//! one with a request in flight gets hyper's graceful shutdown: it finishes the request, then
//! ends. HTTP/2 connections always get the graceful shutdown, which sends GOAWAY. A closed
//! connection whose client is still sending a head is dropped too: hyper's graceful shutdown
//! would wait for the head, so a client dripping a header now and then could hold a connection,
//! and a shutdown, forever.

use hyper_util::server::graceful::GracefulConnection;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::Duration;

/// Sweeps per idle timeout: a connection is closed after between one idle timeout and one and
/// a quarter of idleness.
const TICKS: u8 = 4;

/// [`ConnState::close`]: keep the connection.
const OPEN: u8 = 0;
/// Close it: idle for the idle timeout (unless a request started since).
const IDLE: u8 = 1;
/// Close it: the server is shutting down.
const SHUTDOWN: u8 = 2;

/// What a connection shares with its listener's [`Connections`].
#[derive(Debug, Default)]
pub struct ConnState {
    /// [`OPEN`], [`IDLE`] or [`SHUTDOWN`].
    close: AtomicU8,
    started: AtomicU64,
    finished: AtomicU64,
    waker: Mutex<Option<Waker>>,
}

impl ConnState {
    /// Counts a request that started; [`ConnState::finished`] when its response is done.
    pub fn started(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request whose response was sent (or dropped).
    pub fn finished(&self) {
        self.finished.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether no request is in flight.
    fn is_idle(&self) -> bool {
        self.started.load(Ordering::Relaxed) == self.finished.load(Ordering::Relaxed)
    }

    /// Asks the connection's task to close it, for `why` ([`IDLE`] or [`SHUTDOWN`]).
    fn close(&self, why: u8) {
        self.close.fetch_max(why, Ordering::Release);
        let waker = self.waker.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The open connections of one listener.
#[derive(Debug)]
pub struct Connections {
    idle_timeout: Duration,
    open: Mutex<Open>,
    emptied: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Open {
    next_id: u64,
    conns: HashMap<u64, Entry>,
}

#[derive(Debug)]
struct Entry {
    state: Arc<ConnState>,
    /// `started` at the last sweep.
    seen_started: u64,
    /// Sweeps in a row that found the connection idle.
    idle_sweeps: u8,
}

/// A connection's place in [`Connections`], given up when dropped.
#[derive(Debug)]
pub struct Registration {
    id: u64,
    /// The connection's state, for its service and its [`Connections::serve`].
    pub state: Arc<ConnState>,
    owner: Arc<Connections>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut open = self.owner.lock();
        open.conns.remove(&self.id);
        if open.conns.is_empty() {
            self.owner.emptied.notify_waiters();
        }
    }
}

impl Connections {
    /// Connections that are closed after `idle_timeout` without a request.
    pub fn new(idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            idle_timeout,
            open: Mutex::default(),
            emptied: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new connection.
    pub fn open(self: &Arc<Self>) -> Registration {
        let state = Arc::new(ConnState::default());
        let mut open = self.lock();
        let id = open.next_id;
        open.next_id += 1;
        open.conns.insert(
            id,
            Entry {
                state: state.clone(),
                seen_started: 0,
                idle_sweeps: 0,
            },
        );
        Registration {
            id,
            state,
            owner: self.clone(),
        }
    }

    /// Drives `conn` until it ends, closing it when its state says so (see the module docs).
    /// With `goaway` (HTTP/2) an idle connection is closed gracefully too.
    pub async fn serve<C: GracefulConnection>(
        state: &ConnState,
        conn: C,
        goaway: bool,
    ) -> Result<(), C::Error> {
        let mut conn = std::pin::pin!(conn);
        let mut registered: Option<Waker> = None;
        let mut closing = false;
        std::future::poll_fn(|cx| {
            // The waker first, then the flag: a close between the two still wakes this task.
            // A task's waker doesn't change, so this stores it once.
            if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                let w = cx.waker().clone();
                *state.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(w.clone());
                registered = Some(w);
            }
            if !closing {
                let why = state.close.load(Ordering::Acquire);
                if why != OPEN {
                    let idle = state.is_idle();
                    if why == IDLE && !idle {
                        // A request started after the sweep: it is not idle after all.
                        let _ = state.close.compare_exchange(
                            IDLE,
                            OPEN,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        );
                    } else if idle && !goaway {
                        return std::task::Poll::Ready(Ok(()));
                    } else {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            conn.as_mut().poll(cx)
        })
        .await
    }

    /// Closes the connections that have been idle for the idle timeout, forever (a quarter of
    /// the timeout between looks).
    pub async fn sweep_forever(self: Arc<Self>) {
        let every = (self.idle_timeout / u32::from(TICKS)).max(Duration::from_millis(10));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sweep();
        }
    }

    fn sweep(&self) {
        let mut open = self.lock();
        for e in open.conns.values_mut() {
            let started = e.state.started.load(Ordering::Relaxed);
            if !e.state.is_idle() || started != e.seen_started {
                e.seen_started = started;
                e.idle_sweeps = 0;
                continue;
            }
            e.idle_sweeps = e.idle_sweeps.saturating_add(1);
            if e.idle_sweeps == TICKS {
                e.state.close(IDLE);
            }
        }
    }

    /// Closes every connection (each finishes the request it is serving) and waits until all
    /// have ended.
    pub async fn shutdown(&self) {
        for e in self.lock().conns.values() {
            e.state.close(SHUTDOWN);
        }
        loop {
            let emptied = self.emptied.notified();
            let mut emptied = std::pin::pin!(emptied);
            emptied.as_mut().enable();
            if self.lock().conns.is_empty() {
                return;
            }
            emptied.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_closed_after_a_whole_idle_timeout_without_requests() {
        let conns = Connections::new(Duration::from_secs(4));
        let idle = conns.open();
        let busy = conns.open();
        let active = conns.open();
        busy.state.started();
        for sweep in 1..=TICKS {
            active.state.started();
            active.state.finished();
            conns.sweep();
            let closed = idle.state.close.load(Ordering::Relaxed) == IDLE;
            assert_eq!(closed, sweep == TICKS, "idle closed after sweep {sweep}");
        }
        // A request in flight (a long stream) keeps its connection open, and so do new requests.
        assert_eq!(busy.state.close.load(Ordering::Relaxed), OPEN);
        assert_eq!(active.state.close.load(Ordering::Relaxed), OPEN);
        // Once the response is done, the idle clock starts.
        busy.state.finished();
        for _ in 0..TICKS + 1 {
            conns.sweep();
        }
        assert_eq!(busy.state.close.load(Ordering::Relaxed), IDLE);
        // Shutdown overrides, and a later sweep doesn't undo it.
        busy.state.close(SHUTDOWN);
        busy.state.close(IDLE);
        assert_eq!(busy.state.close.load(Ordering::Relaxed), SHUTDOWN);
    }

    #[test]
    fn registrations_leave_when_dropped() {
        let conns = Connections::new(Duration::from_secs(1));
        let a = conns.open();
        let b = conns.open();
        assert_eq!(conns.lock().conns.len(), 2);
        drop(a);
        drop(b);
        assert!(conns.lock().conns.is_empty());
    }
}
