//! Relaying a server-sent-event stream from the upstream to the client, chunk by chunk.
//!
//! Bytes are forwarded as the upstream framed them (no re-encoding, `data: [DONE]` included),
//! as soon as each event is complete. On the way, the relay spots the event that carries
//! `usage`, reads it for cost accounting, and drops it when only the gateway asked for it. When
//! the stream ends, fails, or the client goes away (the body is dropped, which also drops the
//! upstream connection and so cancels the upstream request), the [`Charge`] is settled exactly
//! once.

use crate::accounting::Outcome;
use crate::gateway::charge::Charge;
use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use memchr::memmem;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use tollgate_crds::config::TokenUsage;

/// An event larger than this is forwarded without being inspected, so a stream with no event
/// boundaries can't make the gateway buffer without bound.
const MAX_PENDING: usize = 1 << 20;

static USAGE: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"usage\""));

/// Most bytes gathered into one write to the client.
const COALESCE_MAX: usize = 64 << 10;

/// Most times a write is put off to let more upstream chunks in (bounds the added delay).
const MAX_YIELDS: u32 = 64;

/// Polls in a row that brought nothing before queued data is written anyway.
const IDLE_YIELDS: u32 = 2;

/// The upstream body, relayed.
pub(crate) struct SseRelay<B> {
    inner: B,
    pending: BytesMut,
    ready: VecDeque<Bytes>,
    drop_usage_chunk: bool,
    usage: Option<TokenUsage>,
    ready_bytes: usize,
    charge: Option<Charge>,
    /// The budget spend on its way to Redis: the stream ends once it is recorded.
    recording: Option<crate::limits::redis::Recorded>,
    seen_first_byte: bool,
    failed: Option<Box<dyn std::error::Error + Send + Sync>>,
    yields: u32,
    idle_yields: u32,
    /// Whether to yield once more before writing, to let a body that hands over one chunk per
    /// poll (hyper's client) deliver the rest of a burst.
    wait_for_more: bool,
}

impl<B> SseRelay<B> {
    /// Relays `inner`, settling `charge` at the end. With `drop_usage_chunk`, a usage-only
    /// event is not forwarded (the client didn't ask for it).
    pub(crate) fn new(inner: B, charge: Charge, drop_usage_chunk: bool) -> Self {
        Self::open(inner, Some(charge), drop_usage_chunk)
    }

    /// [`SseRelay::new`], with or without a charge (the fuzz target has none).
    fn open(inner: B, charge: Option<Charge>, drop_usage_chunk: bool) -> Self {
        Self {
            inner,
            pending: BytesMut::new(),
            ready: VecDeque::new(),
            drop_usage_chunk,
            usage: None,
            ready_bytes: 0,
            charge,
            recording: None,
            seen_first_byte: false,
            failed: None,
            yields: 0,
            idle_yields: 0,
            wait_for_more: true,
        }
    }

    /// Whether to put a write off for a poll or two while the upstream body keeps delivering
    /// (on by default). Off for a body whose every frame is all that was read from the upstream
    /// ([`crate::upstream::h1`]): there, nothing more is ready when it says pending, and waiting would
    /// only cost wake-ups.
    pub(crate) fn wait_for_more(mut self, wait: bool) -> Self {
        self.wait_for_more = wait;
        self
    }

    fn queue(&mut self, b: Bytes) {
        self.ready_bytes += b.len();
        self.ready.push_back(b);
    }

    /// Everything queued, as one buffer (copied only when there is more than one piece).
    fn take_ready(&mut self) -> Option<Bytes> {
        let out = match self.ready.len() {
            0 => return None,
            1 => self.ready.pop_front(),
            _ => {
                let mut buf = BytesMut::with_capacity(self.ready_bytes);
                for b in self.ready.drain(..) {
                    buf.extend_from_slice(&b);
                }
                Some(buf.freeze())
            }
        };
        self.ready_bytes = 0;
        out
    }

    fn settle(&mut self, outcome: Outcome) {
        if let Some(charge) = self.charge.take() {
            self.recording = charge.settle(self.usage, outcome).pending();
        }
    }

    /// Splits `data` into complete events (queued for the client) and a partial rest (kept).
    fn push(&mut self, data: Bytes) {
        let buf = if self.pending.is_empty() {
            data
        } else {
            self.pending.extend_from_slice(&data);
            self.pending.split().freeze()
        };
        let Some(end) = last_event_end(&buf) else {
            if buf.len() > MAX_PENDING {
                self.queue(buf);
            } else {
                self.pending.extend_from_slice(&buf);
            }
            return;
        };
        if end < buf.len() {
            self.pending.extend_from_slice(&buf[end..]);
        }
        self.inspect(buf.slice(..end));
    }

    /// Queues complete events, reading (and maybe dropping) the ones carrying usage.
    fn inspect(&mut self, complete: Bytes) {
        if let Some(c) = self.charge.as_mut() {
            // Counted only if the upstream never reports usage (see `Charge::sending`).
            crate::api::usage::generated_text(&complete, |text| c.relayed(text));
        }
        let mut from = 0;
        let mut search = 0;
        while let Some(rel) = USAGE.find(&complete[search..]) {
            let at = search + rel;
            search = at + 7;
            if !followed_by_object(&complete[search..]) {
                continue;
            }
            let start = last_event_end(&complete[..at]).unwrap_or(0).max(from);
            let end = first_event_end(&complete[at..]).map_or(complete.len(), |p| at + p);
            let Some((usage, only_usage)) =
                event_data(&complete[start..end]).and_then(|d| crate::api::usage::from_chunk(&d))
            else {
                continue;
            };
            self.usage = Some(usage);
            if self.drop_usage_chunk && only_usage {
                if start > from {
                    self.queue(complete.slice(from..start));
                }
                from = end;
            }
            search = end;
        }
        if from < complete.len() {
            self.queue(if from == 0 {
                complete
            } else {
                complete.slice(from..)
            });
        }
    }
}

/// For the fuzz target `sse_relay` (fuzz/): feeds `frames` through the relay's event splitting
/// and usage inspection, as [`SseRelay`] does with upstream frames (without a charge to
/// settle). Returns the bytes queued for the client, the partial event still held, and the
/// usage read.
#[doc(hidden)]
pub fn fuzz_relay(
    frames: &[&[u8]],
    drop_usage_chunk: bool,
) -> (Vec<u8>, Vec<u8>, Option<TokenUsage>) {
    let mut relay = SseRelay::open((), None, drop_usage_chunk);
    let mut out = Vec::new();
    for frame in frames {
        relay.push(Bytes::copy_from_slice(frame));
        // As `inspect` would with a charge: the text counted when the upstream reports no usage.
        for b in &relay.ready {
            crate::api::usage::generated_text(b, |_| {});
        }
        if let Some(b) = relay.take_ready() {
            out.extend_from_slice(&b);
        }
    }
    (out, relay.pending.to_vec(), relay.usage)
}

/// Whether `s` (what follows `"usage"`) is `: {` with optional spaces: a usage object rather
/// than `null`.
fn followed_by_object(s: &[u8]) -> bool {
    let mut it = s.iter().copied().skip_while(|b| b.is_ascii_whitespace());
    if it.next() != Some(b':') {
        return false;
    }
    it.find(|b| !b.is_ascii_whitespace()) == Some(b'{')
}

/// The end (exclusive) of the last complete event in `buf`: just after the last blank line
/// (`\n\n` or `\r\n\r\n`). Walks back line by line from the end, so a chunk that ends with an
/// event (the usual case) costs one or two `memrchr`s.
fn last_event_end(buf: &[u8]) -> Option<usize> {
    let mut end = buf.len();
    while let Some(lf) = memchr::memrchr(b'\n', &buf[..end]) {
        let line_end = &buf[..lf];
        if line_end
            .strip_suffix(b"\r")
            .unwrap_or(line_end)
            .ends_with(b"\n")
        {
            return Some(lf + 1);
        }
        end = lf;
    }
    None
}

/// The end (exclusive) of the first complete event in `buf`: just after its first blank line.
fn first_event_end(buf: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', buf).find_map(|lf| {
        let rest = &buf[lf + 1..];
        if rest.starts_with(b"\n") {
            Some(lf + 2)
        } else if rest.starts_with(b"\r\n") {
            Some(lf + 3)
        } else {
            None
        }
    })
}

/// The `data:` payload of one event (lines joined with `\n`, as the SSE spec says).
fn event_data(event: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for line in event.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(rest) = line.strip_prefix(b"data:") {
            if !out.is_empty() {
                out.push(b'\n');
            }
            out.extend_from_slice(rest.strip_prefix(b" ").unwrap_or(rest));
        }
    }
    (!out.is_empty()).then_some(out)
}

impl<B> Body for SseRelay<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        // Take every frame the upstream has ready, and send them as one: a burst of events read
        // in one go from the upstream then leaves in one write, not one write per event.
        //
        // hyper hands the body over one chunk per poll (its connection task decodes the next
        // chunk only after this one is taken), so "ready" is learnt by yielding: while the last
        // poll brought data, let the connection task run once more before writing.
        let mut upstream_pending = false;
        let mut got_data = false;
        while this.charge.is_some() && this.failed.is_none() && this.ready_bytes < COALESCE_MAX {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => {
                    upstream_pending = true;
                    break;
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        got_data = true;
                        this.push(data);
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.settle(Outcome::UpstreamError);
                    this.failed = Some(e.into());
                }
                Poll::Ready(None) => {
                    if !this.pending.is_empty() {
                        let rest = this.pending.split().freeze();
                        this.inspect(rest);
                    }
                    this.settle(Outcome::Success);
                }
            }
        }
        if got_data {
            this.idle_yields = 0;
        }
        if upstream_pending
            && this.wait_for_more
            && !this.ready.is_empty()
            && this.idle_yields < IDLE_YIELDS
            && this.yields < MAX_YIELDS
        {
            this.yields += 1;
            if !got_data {
                this.idle_yields += 1;
            }
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.yields = 0;
        this.idle_yields = 0;
        if let Some(out) = this.take_ready() {
            if !this.seen_first_byte {
                this.seen_first_byte = true;
                if let Some(c) = this.charge.as_mut() {
                    c.first_byte();
                }
            }
            return Poll::Ready(Some(Ok(Frame::data(out))));
        }
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        if upstream_pending {
            return Poll::Pending;
        }
        if let Some(r) = this.recording.as_mut() {
            std::task::ready!(Pin::new(r).poll(cx));
            this.recording = None;
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.charge.is_none()
            && self.recording.is_none()
            && self.ready.is_empty()
            && self.failed.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl<B> Drop for SseRelay<B> {
    fn drop(&mut self) {
        // Dropped before the end: the client went away (or shutdown cut the stream). What the
        // upstream already reported is still charged.
        self.settle(Outcome::dropped());
    }
}

#[cfg(test)]
mod tests {
    use super::{first_event_end, last_event_end};

    #[test]
    fn last_event_end_finds_the_last_blank_line() {
        assert_eq!(last_event_end(b"data: a\n\n"), Some(9));
        assert_eq!(last_event_end(b"data: a\n\ndata: b\n\n"), Some(18));
        assert_eq!(last_event_end(b"data: a\n\ndata: b\n"), Some(9));
        assert_eq!(last_event_end(b"data: a\n\ndata: partial"), Some(9));
        assert_eq!(last_event_end(b"data: a\r\n\r\ndata: b"), Some(11));
        assert_eq!(last_event_end(b"data: a\r\n\r\n"), Some(11));
        assert_eq!(last_event_end(b"\n\n"), Some(2));
        assert_eq!(last_event_end(b"data: a\ndata: b\n"), None);
        assert_eq!(last_event_end(b"data: a\r\n"), None);
        assert_eq!(last_event_end(b""), None);
    }

    #[test]
    fn first_event_end_finds_the_first_blank_line() {
        assert_eq!(first_event_end(b"data: a\n\ndata: b\n\n"), Some(9));
        assert_eq!(first_event_end(b"data: a\r\n\r\ndata: b\r\n\r\n"), Some(11));
        assert_eq!(first_event_end(b"data: a\ndata: b\n\n"), Some(17));
        assert_eq!(first_event_end(b"data: a\n"), None);
        assert_eq!(first_event_end(b"data: a"), None);
    }
}
