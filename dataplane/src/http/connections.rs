//! The life of client connections: the idle timeout, and closing them on shutdown, both kept
//! per connection rather than per request.
//!
//! hyper and hyper-util offer both per request. `header_read_timeout` creates a timer for every
//! request head (an allocation, a timer-wheel insert and removal, a clock read), and
//! `GracefulShutdown` wraps each connection in a future that registers with a `watch` channel
//! every time the connection is polled. Together they were about 1,100 instructions per
//! proxied request (callgrind), some 2.5 % of the gateway's own work. Here:
//!
//! - every connection has a [`ConnState`]: a close flag, the requests it started and finished
//!   (an [`InFlight`] guard per request, dropped with the response body, or with the handler
//!   if the client cancelled first), and its task's waker (registered once);
//! - [`Connections::sweep_forever`] looks at every connection of its listener four times per
//!   idle timeout, and closes those that had no request in flight and started none for a whole
//!   idle timeout (between one and one and a quarter): idle keep-alive connections, clients that
//!   connected and sent nothing, and clients that never finish a request head;
//! - [`Connections::shutdown`] closes them all and waits until they are gone, for at most the
//!   shutdown timeout: then the connections still serving a request (a long stream) are dropped,
//!   which settles their requests as if the clients had gone, so that what the process holds
//!   (the usage log) is flushed before Kubernetes' `SIGKILL` at the end of the grace period.
//!
//! The [`Bounds`] (header-read, body-read and write-stall timeouts) are kept by [`Bounded`]
//! around each connection's socket (and the body-read one where a handler reads a body).
//!
//! Closing a connection lets it finish the request it serves (and flush it) and ends it, an idle
//! one at once; HTTP/2 gets a GOAWAY. A request that has started to arrive, or a last response
//! the client hasn't taken yet, gets [`CLOSE_GRACE`] more, and then the connection is dropped
//! (a client dripping a header, or not reading). [`Connections::serve`] does this through
//! hyper's graceful shutdown.

use crate::gateway::state::Bounds;
use crate::rt::deadline::Deadline;
use crate::telemetry::timed_out;
use hyper_util::server::graceful::GracefulConnection;
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::task::{Context, Poll};
use std::time::Duration;

/// Sweeps per idle timeout: a connection is closed after between one idle timeout and one and
/// a quarter of idleness.
const TICKS: u8 = 4;

/// How long a connection told to close may take to end before it is dropped, if it has no
/// request in flight: time to flush a response already written.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// How long shutdown waits, after cutting the requests still served at the shutdown timeout, for
/// their tasks to end (milliseconds, normally).
pub(crate) const ABORT_GRACE: Duration = Duration::from_secs(2);

/// The socket of a connection hyper serves, with the [`Bounds`] hyper doesn't keep as the data
/// plane wants them:
///
/// - a write that makes no progress for the write-stall timeout fails, which ends the
///   connection (and drops the responses it was sending, cancelling their upstream requests);
/// - HTTP/1.1 only: bytes read while no request is in flight start the header-read timeout,
///   which the next request's start (its head parsed) stops; if it passes first, the read
///   fails. hyper's own `header_read_timeout` would run from the end of the previous response,
///   closing idle keep-alive connections after it, which is the idle timeout's job.
#[derive(Debug)]
pub(crate) struct Bounded<T> {
    io: T,
    conn: Arc<ConnState>,
    bounds: Bounds,
    h1: bool,
    head: Deadline,
    /// `started` when `head` was armed.
    head_of: u64,
    write: Deadline,
}

impl<T> Bounded<T> {
    pub(crate) fn new(io: T, conn: Arc<ConnState>, bounds: Bounds, h1: bool) -> Self {
        Self {
            io,
            conn,
            bounds,
            h1,
            head: Deadline::default(),
            head_of: 0,
            write: Deadline::default(),
        }
    }

    fn wrote(
        &mut self,
        r: Poll<io::Result<usize>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        if r.is_ready() {
            self.write.disarm();
            return r;
        }
        self.write.arm(self.bounds.write_stall);
        if self.write.poll_passed(cx) {
            timed_out("write_stall");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took nothing for the write-stall timeout",
            )));
        }
        Poll::Pending
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Bounded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = dst.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, dst);
        if !self.h1 {
            return r;
        }
        let this = &mut *self;
        let started = this.conn.started.load(Ordering::Acquire);
        if this.head.is_armed() && started != this.head_of {
            this.head.disarm();
        }
        match r {
            // Bytes while no request is in flight: a head has begun.
            Poll::Ready(Ok(()))
                if dst.filled().len() > before && !this.head.is_armed() && this.conn.is_idle() =>
            {
                this.head_of = started;
                this.head.arm(this.bounds.header_read);
            }
            Poll::Pending if this.head.poll_passed(cx) => {
                timed_out("header_read");
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the request head took longer than the header-read timeout",
                )));
            }
            _ => {}
        }
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Bounded<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        src: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, src);
        self.wrote(r, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.wrote(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// [`ConnState::close`]: keep the connection.
const OPEN: u8 = 0;
/// Close it: idle for the idle timeout (unless a request started since).
const IDLE: u8 = 1;
/// Close it: the server is shutting down.
const SHUTDOWN: u8 = 2;
/// Drop it now, even mid-request: the shutdown timeout has passed.
const ABORT: u8 = 3;

/// What a connection shares with its listener's [`Connections`].
#[derive(Debug, Default)]
pub(crate) struct ConnState {
    /// [`OPEN`], [`IDLE`] or [`SHUTDOWN`].
    close: AtomicU8,
    /// `started` when the sweeper found the connection idle: a request since cancels [`IDLE`].
    idle_at: AtomicU64,
    started: AtomicU64,
    finished: AtomicU64,
    waker: Mutex<Option<Waker>>,
}

/// A request in flight on a connection, until dropped: with the response body once it is sent
/// (or abandoned), or with the handler's future if that is dropped first (an HTTP/2 client
/// cancelled the stream).
#[derive(Debug)]
pub(crate) struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::Release);
    }
}

impl ConnState {
    /// Counts a request that started, until the guard is dropped.
    pub(crate) fn start(self: &Arc<Self>) -> InFlight {
        self.started.fetch_add(1, Ordering::Release);
        InFlight(self.clone())
    }

    /// Stores the calling task's waker, once per task (a task's waker doesn't change). Called
    /// before the close flag is read, so that a close in between still wakes the task.
    fn register(&self, registered: &mut Option<Waker>, cx: &std::task::Context<'_>) {
        if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            let w = cx.waker().clone();
            *self.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(w.clone());
            *registered = Some(w);
        }
    }

    /// Whether the connection should close now: `IDLE` with no request since the sweep, or
    /// `SHUTDOWN`. An `IDLE` overtaken by a request is withdrawn.
    pub(crate) fn should_close(&self) -> bool {
        match self.close.load(Ordering::Acquire) {
            OPEN => false,
            IDLE if self.started.load(Ordering::Relaxed)
                != self.idle_at.load(Ordering::Relaxed) =>
            {
                let _ =
                    self.close
                        .compare_exchange(IDLE, OPEN, Ordering::AcqRel, Ordering::Acquire);
                false
            }
            _ => true,
        }
    }

    /// Resolves when the connection should close (see [`Self::should_close`]): for a
    /// connection not yet handed to a server (waiting for its first bytes).
    pub(crate) async fn closing(&self) {
        let mut registered = None;
        std::future::poll_fn(|cx| {
            self.register(&mut registered, cx);
            if self.should_close() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Whether no request is in flight.
    ///
    /// `finished` is read first: a request counts as started before it counts as finished, so
    /// a request that starts or ends between the two reads makes the answer "busy", never
    /// "idle" while one is in flight.
    fn is_idle(&self) -> bool {
        let finished = self.finished.load(Ordering::Acquire);
        self.started.load(Ordering::Acquire) == finished
    }

    /// Asks the connection's task to close it, for `why` ([`IDLE`], [`SHUTDOWN`] or [`ABORT`]).
    /// Closes this connection as shutdown closes them all: its requests in flight finish, then
    /// it ends (HTTP/2: a GOAWAY).
    pub(crate) fn close_gracefully(&self) {
        self.close(SHUTDOWN);
    }

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
pub(crate) struct Connections {
    idle_timeout: Duration,
    open: Mutex<Open>,
    /// Tasks that serve a connection's requests apart from it (HTTP/2 streams, see
    /// [`Connections::task`]), still running.
    tasks: AtomicUsize,
    emptied: tokio::sync::Notify,
}

/// A task serving one of a connection's requests (an HTTP/2 stream), counted until dropped:
/// shutdown waits for these too, since they settle their requests after the connection is gone.
#[derive(Debug)]
pub(crate) struct Task(Arc<Connections>);

impl Drop for Task {
    fn drop(&mut self) {
        if self.0.tasks.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.emptied.notify_waiters();
        }
    }
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
    /// Whether the last sweep found no request in flight.
    was_idle: bool,
    /// Sweeps in a row that found the connection idle since the sweep before.
    idle_sweeps: u8,
}

/// A connection's place in [`Connections`], given up when dropped.
#[derive(Debug)]
pub(crate) struct Registration {
    id: u64,
    /// The connection's state, for its service and its [`Connections::serve`].
    pub(crate) state: Arc<ConnState>,
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
    pub(crate) fn new(idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            idle_timeout,
            open: Mutex::default(),
            tasks: AtomicUsize::new(0),
            emptied: tokio::sync::Notify::new(),
        })
    }

    /// Counts a task serving a request apart from its connection, until the guard is dropped.
    pub(crate) fn task(self: &Arc<Self>) -> Task {
        self.tasks.fetch_add(1, Ordering::AcqRel);
        Task(self.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new connection.
    pub(crate) fn open(self: &Arc<Self>) -> Registration {
        let state = Arc::new(ConnState::default());
        let mut open = self.lock();
        let id = open.next_id;
        open.next_id += 1;
        open.conns.insert(
            id,
            Entry {
                state: state.clone(),
                seen_started: 0,
                was_idle: false,
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
    pub(crate) async fn serve<C: GracefulConnection>(
        state: &ConnState,
        conn: C,
    ) -> Result<(), C::Error> {
        let mut conn = std::pin::pin!(conn);
        let mut registered: Option<Waker> = None;
        // Set once the connection was told to close: when it may be dropped if still idle.
        let mut grace: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        std::future::poll_fn(|cx| {
            state.register(&mut registered, cx);
            if grace.is_none() && state.should_close() {
                conn.as_mut().graceful_shutdown();
                grace = Some(Box::pin(tokio::time::sleep(CLOSE_GRACE)));
            }
            if grace.is_some() && state.close.load(Ordering::Acquire) == ABORT {
                // Dropped with whatever it was serving (the shutdown timeout passed).
                return std::task::Poll::Ready(Ok(()));
            }
            if let std::task::Poll::Ready(ended) = conn.as_mut().poll(cx) {
                return std::task::Poll::Ready(ended);
            }
            if let Some(g) = grace.as_mut()
                && g.as_mut().poll(cx).is_ready()
            {
                if state.is_idle() {
                    return std::task::Poll::Ready(Ok(()));
                }
                // Serving a request: hyper ends the connection after it.
                g.as_mut().reset(tokio::time::Instant::now() + CLOSE_GRACE);
            }
            std::task::Poll::Pending
        })
        .await
    }

    /// Closes the connections that have been idle for the idle timeout, forever (a quarter of
    /// the timeout between looks).
    pub(crate) async fn sweep_forever(self: Arc<Self>) {
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
            let idle = e.state.is_idle();
            // A sweep counts only when the whole interval before it was idle: idle now and at
            // the last sweep, and nothing started in between.
            if idle && e.was_idle && started == e.seen_started {
                e.idle_sweeps = e.idle_sweeps.saturating_add(1);
                if e.idle_sweeps == TICKS {
                    e.state.idle_at.store(started, Ordering::Relaxed);
                    e.state.close(IDLE);
                }
            } else {
                e.idle_sweeps = 0;
            }
            e.was_idle = idle;
            e.seen_started = started;
        }
    }

    /// Closes every connection (each finishes the request it is serving) and waits until all
    /// have ended, or until `timeout` or `now`: then those still open are dropped mid-request,
    /// and this returns once their tasks have ended.
    pub(crate) async fn shutdown(
        &self,
        timeout: Duration,
        now: impl std::future::Future<Output = ()>,
    ) {
        self.close_all(SHUTDOWN);
        let ended = tokio::select! {
            ended = tokio::time::timeout(timeout, self.emptied()) => ended.is_ok(),
            () = now => false,
        };
        if !ended {
            let (n, tasks) = (self.lock().conns.len(), self.tasks.load(Ordering::Acquire));
            tracing::warn!(
                "shutdown timeout ({timeout:?}) passed, or a second signal came, with {n} connection(s) and {tasks} HTTP/2 stream(s) still serving: closing them mid-request"
            );
            crate::accounting::start_cutting();
            self.close_all(ABORT);
            // Dropped connections end at their next poll; HTTP/2 streams' tasks see the
            // connection gone and end too, settling their requests. Bounded all the same.
            if tokio::time::timeout(ABORT_GRACE, self.emptied())
                .await
                .is_err()
            {
                tracing::warn!(
                    "some requests were still being served {ABORT_GRACE:?} after they were cut"
                );
            }
        }
    }

    fn close_all(&self, why: u8) {
        for e in self.lock().conns.values() {
            e.state.close(why);
        }
    }

    /// Resolves when no connection is open and no [`Task`] runs.
    async fn emptied(&self) {
        loop {
            let emptied = self.emptied.notified();
            let mut emptied = std::pin::pin!(emptied);
            emptied.as_mut().enable();
            if self.lock().conns.is_empty() && self.tasks.load(Ordering::Acquire) == 0 {
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
        let request = busy.state.start();
        // The first sweep sees them for the first time: the interval before it doesn't count.
        for sweep in 0..=TICKS {
            drop(active.state.start());
            conns.sweep();
            let closed = idle.state.close.load(Ordering::Relaxed) == IDLE;
            assert_eq!(closed, sweep == TICKS, "idle closed after sweep {sweep}");
        }
        assert!(idle.state.should_close());
        // A request in flight (a long stream) keeps its connection open, and so do new requests.
        assert_eq!(busy.state.close.load(Ordering::Relaxed), OPEN);
        assert_eq!(active.state.close.load(Ordering::Relaxed), OPEN);
        // Once the response is done, a whole timeout of idleness starts at the next sweep.
        drop(request);
        for _ in 0..TICKS {
            conns.sweep();
        }
        assert_eq!(busy.state.close.load(Ordering::Relaxed), OPEN);
        conns.sweep();
        assert_eq!(busy.state.close.load(Ordering::Relaxed), IDLE);
        // Shutdown overrides, and a later sweep doesn't undo it.
        busy.state.close(SHUTDOWN);
        busy.state.close(IDLE);
        assert_eq!(busy.state.close.load(Ordering::Relaxed), SHUTDOWN);
    }

    #[test]
    fn a_request_after_the_sweep_withdraws_the_idle_close() {
        let conns = Connections::new(Duration::from_secs(4));
        let c = conns.open();
        for _ in 0..=TICKS {
            conns.sweep();
        }
        assert_eq!(c.state.close.load(Ordering::Relaxed), IDLE);
        // A request started (and even finished) before the connection's task saw the flag.
        drop(c.state.start());
        assert!(!c.state.should_close());
        assert_eq!(c.state.close.load(Ordering::Relaxed), OPEN);
    }

    #[test]
    fn a_dropped_guard_counts_its_request_finished() {
        let conns = Connections::new(Duration::from_secs(4));
        let c = conns.open();
        let guard = c.state.start();
        assert!(!c.state.is_idle());
        // As when an HTTP/2 client cancels a stream and hyper drops the handler's future.
        drop(guard);
        assert!(c.state.is_idle());
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
