//! Busy-polling: a worker that just did work keeps polling its sockets for a short window
//! before it sleeps, so that the next event (the upstream's answer, the client's next request)
//! is picked up at once instead of after the CPU wakes from idle.
//!
//! Waking an idle CPU is slow on virtual machines: the guest halts the vCPU, the host
//! deschedules it, and the wake-up goes through the host's scheduler, tens to hundreds of
//! microseconds. Linux's `cpuidle-haltpoll` driver hides this inside the guest by polling for a
//! while before halting (`guest_halt_poll_ns`, 200 µs by default), but many VMs run with it off
//! (the benchmark machine has `haltpoll.guest_halt_poll_ns=0`), and then a proxy pays the wake-up
//! twice per request, once for each hop it adds. This module does the same for the gateway's own
//! threads only, in user space, in the spirit of Go's scheduler, which spins before parking.
//!
//! How: on each per-core runtime, a [`spin`] task sleeps until the thread wakes from a real park
//! ([`unparked`], tokio's `on_thread_unpark` hook). Then, until `window` has passed with no work,
//! it yields: a yielded task makes tokio's current-thread scheduler poll the I/O driver without
//! blocking (`epoll_wait` with a zero timeout) before running it again, so the thread checks its
//! sockets in a loop instead of sleeping. Work is what [`tracked`] futures (the client
//! connections' tasks, which also drive their upstream requests, and HTTP/2 streams' tasks)
//! count when they are polled; any since the spinner's last look starts the window again.
//!
//! This leans on how tokio's current-thread scheduler runs a yielded task: only after the run
//! queue is empty and the I/O driver was polled without blocking (tokio 1.54). Tokio doesn't
//! promise that order; the tests below fail if it changes.
//!
//! The cost is CPU: a thread keeps a core busy for up to `window` after its last work. An idle
//! gateway costs nothing (it wakes for its timers a few times a second); a gateway whose threads
//! see an event at least every `window` keeps them at 100 % (that is when the latency matters).
//! Under CPU limits that time counts against the quota. `--busy-poll 0` turns it off.

use std::cell::Cell;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Polling windows ended, by all threads (`tollgate_busy_poll_windows_total`).
static WINDOWS_TOTAL: AtomicU64 = AtomicU64::new(0);
/// Time spent in polling windows, by all threads, in µs (`tollgate_busy_poll_seconds_total`):
/// an upper bound of the CPU that busy-polling costs (less when it gave the CPU away).
static POLLED_US: AtomicU64 = AtomicU64::new(0);

/// The busy-polling series, in Prometheus text format.
pub(crate) fn render(out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP tollgate_busy_poll_windows_total Polling windows a worker thread ended: times it kept polling after work instead of sleeping (--busy-poll).\n\
         # TYPE tollgate_busy_poll_windows_total counter\n\
         tollgate_busy_poll_windows_total {}\n\
         # HELP tollgate_busy_poll_seconds_total Time worker threads spent polling after work instead of sleeping (--busy-poll).\n\
         # TYPE tollgate_busy_poll_seconds_total counter\n\
         tollgate_busy_poll_seconds_total {}",
        WINDOWS_TOTAL.load(Relaxed),
        POLLED_US.load(Relaxed) as f64 / 1e6
    );
}

thread_local! {
    /// The sleeping [`spin`] task of this thread's runtime, if any.
    static SLEEPING: Cell<Option<Waker>> = const { Cell::new(None) };
    /// Polls of [`tracked`] futures on this thread.
    static WORK: Cell<u64> = const { Cell::new(0) };
    /// Polling windows this thread's [`spin`] task started.
    #[cfg(test)]
    static WINDOWS: Cell<u64> = const { Cell::new(0) };
    /// Rounds of polling (yields) of this thread's [`spin`] task.
    #[cfg(test)]
    static POLLS: Cell<u64> = const { Cell::new(0) };
    /// Times this thread parked (tests count them with an `on_thread_park` hook).
    #[cfg(test)]
    static PARKS: Cell<u64> = const { Cell::new(0) };
}

/// `f`, counting its polls as work for this thread's [`spin`] task. Costs a thread-local
/// increment per poll.
pub(crate) fn tracked<F: std::future::Future>(f: F) -> Tracked<F> {
    Tracked { f }
}

pin_project_lite::pin_project! {
    /// See [`tracked`]. A struct rather than an `async fn`: an `async fn` that pins its argument
    /// keeps it twice in its state (the argument and the pinned local), which doubled the size
    /// of every connection's task (28 KB, against 14 KB for what it wraps).
    pub(crate) struct Tracked<F> {
        #[pin]
        f: F,
    }
}

impl<F: std::future::Future> std::future::Future for Tracked<F> {
    type Output = F::Output;

    #[inline]
    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<F::Output> {
        WORK.set(WORK.get().wrapping_add(1));
        self.project().f.poll(cx)
    }
}

/// The runtime's `on_thread_unpark` hook: the thread woke from a park because it has work, so
/// the spinning task (if this thread has one) starts a window.
pub(crate) fn unparked() {
    if let Some(w) = SLEEPING.take() {
        w.wake();
    }
}

/// Runs forever on a current-thread runtime whose `on_thread_unpark` hook calls [`unparked`]:
/// after a wake-up that led to work, keeps the thread polling its sockets until `window` passes
/// with no work. A wake-up that did none (a background timer: the reload check, the idle sweep)
/// costs no polling.
pub(crate) async fn spin(window: Duration) {
    let mut seen = WORK.get();
    loop {
        // Asleep until the thread wakes from a park and does work. Before looking, a yield lets
        // everything the wake-up readied run first: tasks woken by the I/O driver, and those
        // they wake in turn (a deferred wake comes back only once the run queue is empty).
        loop {
            sleep_until_unparked().await;
            tokio::task::yield_now().await;
            let work = WORK.get();
            if work != seen {
                seen = work;
                break;
            }
        }
        #[cfg(test)]
        WINDOWS.set(WINDOWS.get() + 1);
        let started = Instant::now();
        let mut until = started + window;
        loop {
            let work = WORK.get();
            let now = Instant::now();
            if work != seen {
                seen = work;
                until = now + window;
            } else if now >= until {
                WINDOWS_TOTAL.fetch_add(1, Relaxed);
                let polled = now.duration_since(started).as_micros();
                POLLED_US.fetch_add(u64::try_from(polled).unwrap_or(u64::MAX), Relaxed);
                break;
            }
            // Let a thread queued on this CPU (the load generator, the mock, a neighbour pod's
            // process) run first. It only helps those: the host doesn't see it, and the time
            // still counts as this process's CPU (and against its quota).
            std::thread::yield_now();
            #[cfg(test)]
            POLLS.set(POLLS.get() + 1);
            // Back after tokio has polled the I/O driver without blocking.
            tokio::task::yield_now().await;
        }
    }
}

/// Resolves once [`unparked`] is called on this thread (after this future first waits).
async fn sleep_until_unparked() {
    let mut waiting = false;
    std::future::poll_fn(|cx| {
        if waiting
            && SLEEPING.with(|s| {
                let w = s.take();
                let woken = w.is_none();
                s.set(w);
                woken
            })
        {
            return Poll::Ready(());
        }
        waiting = true;
        SLEEPING.set(Some(cx.waker().clone()));
        Poll::Pending
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(|| PARKS.set(PARKS.get() + 1))
            .on_thread_unpark(unparked)
            .build()
            .expect("runtime")
    }

    /// This thread's CPU time: what shows polling, which wall time can't tell from sleeping.
    fn thread_cpu_ms() -> u64 {
        tollgate_testkit::cpu_ms("/proc/thread-self/stat")
    }

    /// Lets the runtime run everything ready, then a little more.
    async fn settle() {
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
    }

    /// Every connection's task is a `tracked` future: wrapping must not keep the wrapped
    /// future twice (as an `async fn` that pins its argument does).
    #[test]
    fn tracking_adds_nothing_to_a_future_s_size() {
        let big = async {
            let held = [7u8; 4096];
            tokio::task::yield_now().await;
            held.iter().map(|&b| u64::from(b)).sum::<u64>()
        };
        let alone = std::mem::size_of_val(&big);
        let wrapped = tracked(big);
        assert!(
            std::mem::size_of_val(&wrapped) <= alone + 16,
            "{} against {alone}",
            std::mem::size_of_val(&wrapped)
        );
        assert_eq!(runtime().block_on(wrapped), 7 * 4096);
    }

    #[test]
    fn wake_ups_without_work_cost_no_polling() {
        let rt = runtime();
        rt.block_on(async {
            tokio::spawn(spin(Duration::from_millis(50)));
            settle().await;
            let cpu = thread_cpu_ms();
            // Timers wake the thread from its park ten times; nothing tracked runs.
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            assert_eq!(WINDOWS.get(), 0, "an untracked wake-up started a window");
            assert_eq!(POLLS.get(), 0);
            let used = thread_cpu_ms() - cpu;
            assert!(used <= 100, "idle, the thread used {used} ms of CPU in 300");
        });
    }

    #[test]
    fn work_after_a_wake_up_polls_for_the_window_then_sleeps() {
        let rt = runtime();
        rt.block_on(async {
            // Windows here are long next to the sleeps inside them, so that a loaded machine
            // preempting the thread for a while doesn't end one early.
            tokio::spawn(spin(Duration::from_millis(300)));
            settle().await;
            // Work after a wake-up from a park (the sleep's timer).
            tracked(tokio::time::sleep(Duration::from_millis(10))).await;
            settle().await;
            assert_eq!(WINDOWS.get(), 1, "the work should start a window");
            // The window: the thread polls instead of parking for this sleep's timer.
            let parks = PARKS.get();
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(PARKS.get(), parks, "the thread parked inside the window");
            assert!(POLLS.get() > 0);
            // Past the window, nothing more: the thread sleeps.
            tokio::time::sleep(Duration::from_millis(400)).await;
            let (polls, parks, cpu) = (POLLS.get(), PARKS.get(), thread_cpu_ms());
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(POLLS.get(), polls, "still polling past the window");
            assert!(
                PARKS.get() > parks,
                "the thread should park past the window"
            );
            let used = thread_cpu_ms() - cpu;
            assert!(
                used <= 100,
                "asleep, the thread used {used} ms of CPU in 200"
            );
        });
    }

    #[test]
    fn work_woken_by_another_task_starts_a_window() {
        let rt = runtime();
        rt.block_on(async {
            tokio::spawn(spin(Duration::from_millis(20)));
            settle().await;
            // The timer wakes an untracked task, which wakes a tracked one (as an HTTP/2
            // connection's task wakes a stream's): the tracked work is queued behind the
            // spinner, woken by the same wake-up, and still counts.
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let worker = tokio::spawn(tracked(rx));
            // The worker's first poll is work the spinner sees at the next wake-up: a window,
            // over after 20 ms.
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(WINDOWS.get(), 1);
            let relay = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                tx.send(()).expect("the worker waits");
            });
            relay.await.expect("relay");
            worker.await.expect("worker").expect("sent");
            settle().await;
            assert_eq!(WINDOWS.get(), 2, "the tracked work should start a window");
        });
    }

    #[test]
    fn tracked_work_keeps_the_window_open() {
        let rt = runtime();
        rt.block_on(async {
            tokio::spawn(spin(Duration::from_millis(200)));
            settle().await;
            // Work, then a wake-up from a park (the sleep's timer): the first window.
            tracked(tokio::task::yield_now()).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
            settle().await;
            assert_eq!(WINDOWS.get(), 1);
            // Tracked work every 20 ms for 600 ms: each restarts the 200 ms window, so the
            // thread never parks. Untracked, the window would close 200 ms in, and the thread
            // would park between the timers.
            let parks = PARKS.get();
            tracked(async {
                for _ in 0..30 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            assert_eq!(PARKS.get(), parks, "the thread parked between tracked work");
            assert_eq!(WINDOWS.get(), 1, "the window closed between tracked work");
        });
    }
}
