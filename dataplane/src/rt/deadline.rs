//! A re-armable timer that costs nothing until something has to wait.

use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

/// A timer for a bound (a connection's, a request body's), armed only when a read or write has to wait: a request
/// that arrives in one read, and a response the socket takes at once, never touch it. Kept for
/// the connection's life once made (one allocation, the first time something waits), and
/// re-armed by resetting it.
#[derive(Debug, Default)]
pub(crate) struct Deadline {
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
}

impl Deadline {
    /// Arms it to pass `after` from now, unless it is armed already.
    pub(crate) fn arm(&mut self, after: Duration) {
        if self.armed {
            return;
        }
        self.armed = true;
        let at = tokio::time::Instant::now() + after;
        match &mut self.sleep {
            Some(s) => s.as_mut().reset(at),
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    /// Disarms it (what it bounded made progress, or ended).
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }

    pub(crate) fn is_armed(&self) -> bool {
        self.armed
    }

    /// Whether it is armed and has passed; the task is woken when it passes otherwise.
    pub(crate) fn poll_passed(&mut self, cx: &mut Context<'_>) -> bool {
        self.armed
            && self
                .sleep
                .as_mut()
                .is_some_and(|s| s.as_mut().poll(cx).is_ready())
    }
}
