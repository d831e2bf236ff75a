//! The HTTP/1.1 server side of client connections, for the requests clients send all day; hyper
//! takes over a connection for anything else.
//!
//! hyper's server was most of what the data plane's HTTP stack cost per request: about 11,000
//! of the bare pass-through proxy's 22,000 instructions (callgrind), in its dispatcher's state
//! machines, the channel that carries a request body to the handler, and its header map and
//! encoder. Here one loop per connection reads a request head and its whole body, calls the
//! handler, and writes the response, in the connection's own task:
//!
//! - **What is served here**: `GET`, `POST` and `DELETE` in HTTP/1.1, origin-form target, no
//!   `Transfer-Encoding`, `Expect` or `Upgrade`, a body of at most [`MAX_BODY`] bytes by
//!   `Content-Length`, a head of at most [`MAX_HEAD`] bytes and [`MAX_HEADERS`] headers.
//!   Anything else (HTTP/1.0, `HEAD`, chunked or larger bodies, `100-continue`, a malformed
//!   head, HTTP/2's preface) ends this loop with [`Ended::HandOver`]: the bytes read so far go
//!   back in front of the socket ([`Rewound`]) and hyper's HTTP/1.1 or HTTP/2 server serves the
//!   connection from there on, as it served every connection before. So the rare and the
//!   malformed keep hyper's handling (and its 400s), and the loop here stays small.
//! - **The body is read before the handler runs**, so the handler gets it as one `Bytes` (no
//!   copy when it came with the head), with no channel. Bodies over [`MAX_BODY`] go to hyper,
//!   whose handler reads the body after the key was checked: a client without a key can't make
//!   the gateway hold more than that per connection.
//! - **A client that leaves is noticed** while the handler runs and while the response is
//!   written: the socket is read (without blocking; a read after a short read costs no system
//!   call, tokio knows the socket is drained) and end-of-stream drops the handler's future and
//!   the response body, which cancels the upstream request. What such a read brings (a
//!   pipelined request) is kept for the next turn of the loop, up to [`MAX_AHEAD`] bytes.
//! - **Writes are coalesced**: the head and what the body has ready go out in one write; the
//!   loop writes when the body has nothing more for now. A streamed body is sent chunked, a
//!   body of known length with `Content-Length`. `Date` is added, cached per second per thread,
//!   as hyper does.
//! - **Idle timeout and shutdown**: a request counts as in flight ([`ConnState::start`]) from
//!   when it has arrived whole until its response has been handed to the socket but for the
//!   last write. Outside that the loop asks the connection's [`ConnState`] whether to close: a
//!   request that has started to arrive, or a last write the client hasn't taken, gets
//!   [`CLOSE_GRACE`] (once, however the bytes drip) and then the connection is dropped. So a
//!   client can't hold a connection by sending a head or a body slowly, or by not reading. A
//!   response written after shutdown began says `Connection: close`. The shutdown timeout's
//!   abort is [`ConnState::unless_aborted`] around this loop.
//! - **Bounds** ([`Bounds`]): a request head must arrive within the header-read timeout of its
//!   first byte (of the accept, for the first request: a silent connection is closed without an
//!   answer, a partial head gets a `408`), its body within the body-read timeout of the head's
//!   end (a JSON `408`; the handler never runs, so nothing goes upstream), and each write must
//!   make progress within the write-stall timeout (else the connection is dropped with the
//!   response body, which settles its request as a client that left). One timer per connection
//!   ([`Deadline`]), armed only when a read or write has to wait: a request that arrives in one
//!   read and an answer the socket takes at once never touch it. `Content-Length` with
//!   `Transfer-Encoding`, and a second `Host`, get a `400` and the connection is closed; a head
//!   over [`MAX_ANY_HEAD`] a `431` (heads between [`MAX_HEAD`] and it are handed over).
//! - **Memory**: what a request or response grows past [`KEEP_CAPACITY`] is let go between
//!   requests, and a response that keeps coming is written every [`KEEP_CAPACITY`] bytes. A
//!   connection that waits for its next request first lets go of its read buffer (and of a
//!   write buffer over [`IDLE_KEEP`]): it waits for readiness, not in a read.

use crate::connections::{Bounds, CLOSE_GRACE, ConnState, Deadline, timed_out};
use crate::error::ApiError;
use axum::response::IntoResponse;
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, header};
use http_body::Body;
use http_body_util::Full;
use std::future::{Future, poll_fn};
use std::io;
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

/// Most headers a request served here may have (hyper allows 100).
pub const MAX_HEADERS: usize = 64;
/// Largest request head served here (hyper allows about 400 KiB).
pub const MAX_HEAD: usize = 16 << 10;
/// Largest request head accepted at all, here or by hyper after a hand-over: past it, `431`
/// and the connection is closed. (hyper's own limit is its read buffer's, about 400 KiB, and
/// soft: a read that brings more is parsed whole.)
pub const MAX_ANY_HEAD: usize = 64 << 10;
/// Largest request body read here before the handler runs.
pub const MAX_BODY: usize = 1 << 20;
/// Most bytes of what follows a request (a pipelined one) read while it is served. Reading
/// stops there, and so does noticing that the client left, until the response is written.
pub const MAX_AHEAD: usize = 64 << 10;
/// Room made for each read.
const READ_SIZE: usize = 16 << 10;
/// A write buffer up to this size is kept while the connection waits for its next request (a
/// typical answer's head and body fit; it would otherwise grow again, step by step, for each).
const IDLE_KEEP: usize = 4 << 10;
/// Body data frames at least this large are written from their own buffer, not copied.
const COPY_MAX: usize = 16 << 10;
/// HTTP/2's connection preface starts with this (RFC 9113, 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// How a connection's loop ended.
#[derive(Debug)]
pub enum Ended {
    /// The connection is done: either side closed it, it broke, or it was told to close.
    Done,
    /// hyper serves the connection from here, starting with `read` (read, not yet served).
    HandOver {
        read: Bytes,
        /// It starts with HTTP/2's preface.
        h2: bool,
    },
}

/// Which of a request's headers its handler is given.
#[derive(Clone, Copy, Debug)]
pub enum Reads {
    /// All of them.
    All,
    /// Only these, the ones the handler reads: a header map of every header a client sends
    /// costs about 600 instructions a header, more for names that aren't standard (the OpenAI
    /// SDKs send some fifteen headers, eight of them `x-stainless-*`).
    Only(&'static [HeaderName]),
}

/// Serves requests on `tcp` with `handle` until the connection ends or hyper must take it over
/// (see the module docs). `reads` says, by method and path, which headers `handle` is given.
pub async fn serve<R, H, F, B>(
    tcp: &mut TcpStream,
    conn: &Arc<ConnState>,
    bounds: Bounds,
    reads: R,
    handle: H,
) -> Ended
where
    R: Fn(&Method, &str) -> Reads,
    H: Fn(Request<Full<Bytes>>) -> F,
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes>,
{
    let (mut rd, mut wr) = tcp.split();
    let mut io = Io::new(bounds);
    let mut head = Head::default();
    loop {
        // A whole request, head and body, before the handler runs; each within its bound.
        io.deadline.disarm();
        io.limit = Some((bounds.header_read, "header_read"));
        loop {
            match parse(&io.buf, &mut head) {
                Parse::Head => break,
                // Framing or `Host` a request can't be trusted with (RFC 9112, 6.3 and RFC
                // 9110, 7.2), or a head too large: the answer, and the connection is closed.
                refused @ (Parse::Refuse | Parse::TooLarge) => {
                    let mut out = Vec::with_capacity(128);
                    out.extend_from_slice(if matches!(refused, Parse::Refuse) {
                        BAD_REQUEST_STATUS
                    } else {
                        TOO_LARGE_STATUS
                    });
                    date(&mut out);
                    out.extend_from_slice(BAD_REQUEST_REST);
                    let _ = write_all(&mut wr, &out, &mut io.deadline, bounds.write_stall).await;
                    return Ended::Done;
                }
                Parse::HandOver => {
                    // HTTP/2 only at the start of a connection, as its preface may only come
                    // there. The preface may still be cut short (a read that ended inside it).
                    let n = io.buf.len().min(H2_PREFACE.len());
                    let h2 = !io.served && io.buf[..n] == H2_PREFACE[..n];
                    return Ended::HandOver {
                        read: io.buf.freeze(),
                        h2,
                    };
                }
                Parse::Partial => {}
            }
            match read_more(&mut rd, &mut io, conn, READ_SIZE).await {
                Read::More => {}
                Read::Done => return Ended::Done,
                // A connection that sent nothing is closed without an answer.
                Read::TimedOut if io.buf.is_empty() => return Ended::Done,
                Read::TimedOut => {
                    let e = ApiError::request_timeout(
                        "The request head did not arrive within the gateway's header-read timeout.",
                    );
                    return refuse(&mut rd, &mut wr, &mut io, conn, e).await;
                }
            }
        }
        let whole = head.len + head.body_len;
        io.deadline.disarm();
        io.limit = Some((bounds.body_read, "body_read"));
        while io.buf.len() < whole {
            let want = whole - io.buf.len();
            match read_more(&mut rd, &mut io, conn, want).await {
                Read::More => {}
                Read::Done => return Ended::Done,
                Read::TimedOut => {
                    let e = ApiError::request_timeout(
                        "The request body did not arrive within the gateway's body-read timeout.",
                    );
                    return refuse(&mut rd, &mut wr, &mut io, conn, e).await;
                }
            }
        }
        io.limit = None;
        io.deadline.disarm();
        io.grace = None;
        let in_flight = conn.start();
        let head_bytes = io.buf.split_to(head.len).freeze();
        let body = io.buf.split_to(head.body_len).freeze();
        let Some(req) = head.request(&head_bytes, body, &reads) else {
            let mut out = Vec::with_capacity(128);
            out.extend_from_slice(BAD_REQUEST_STATUS);
            date(&mut out);
            out.extend_from_slice(BAD_REQUEST_REST);
            let _ = write_all(&mut wr, &out, &mut io.deadline, bounds.write_stall).await;
            return Ended::Done;
        };
        drop(head_bytes);
        io.served = true;

        // The handler, while watching for the client to leave.
        let resp = {
            let mut handler = pin!(handle(req));
            let resp = poll_fn(|cx| {
                if let Poll::Ready(resp) = handler.as_mut().poll(cx) {
                    return Poll::Ready(Some(resp));
                }
                if io.poll_gone(&mut rd, cx) {
                    return Poll::Ready(None);
                }
                Poll::Pending
            })
            .await;
            match resp {
                Some(resp) => resp,
                None => return Ended::Done,
            }
        };
        let close = head.close || conn.should_close();
        let keep = respond(&mut rd, &mut wr, &mut io, resp, close).await;
        // The response is whole (or cut): what is left is to write its last bytes, which a
        // client that doesn't read may hold up. As with hyper, the request counts as done, so
        // that the idle timeout and shutdown close such a connection.
        drop(in_flight);
        if !io.write_last(&mut wr, conn).await || !keep {
            return Ended::Done;
        }
        io.shrink();
    }
}

/// A connection's buffers and read state, between the steps of [`serve`].
struct Io {
    /// Read, not yet served.
    buf: BytesMut,
    /// To write.
    out: Vec<u8>,
    /// The task's waker, as the connection's state last stored it.
    registered: Option<Waker>,
    /// Set when the connection was told to close while a request was arriving or its last bytes
    /// were being written: when it is closed anyway. Kept across reads, so that a client
    /// dripping bytes can't extend it.
    grace: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The client closed its side: nothing more will be read.
    read_closed: bool,
    /// A request has been served on this connection.
    served: bool,
    /// The bound of what is being read (the head's, the body's), if any.
    limit: Option<(std::time::Duration, &'static str)>,
    /// The timer of the bounds: armed when a read of a head or body, or a write, has to wait.
    deadline: Deadline,
    bounds: Bounds,
}

/// Buffers larger than this are let go between requests rather than kept for the connection's
/// life (a large request or response would otherwise pin its memory to an idle connection).
pub const KEEP_CAPACITY: usize = 64 << 10;

impl Io {
    fn new(bounds: Bounds) -> Self {
        Self {
            buf: BytesMut::new(),
            out: Vec::new(),
            registered: None,
            grace: None,
            read_closed: false,
            served: false,
            limit: None,
            deadline: Deadline::default(),
            bounds,
        }
    }

    /// Makes room in `buf` for a read of up to `want` bytes: at least a quarter of
    /// [`READ_SIZE`], at most [`KEEP_CAPACITY`] at a time (a large body grows the buffer as it
    /// arrives, not all at once because a head said so).
    fn reserve(&mut self, want: usize) {
        let want = want.clamp(READ_SIZE / 4, KEEP_CAPACITY);
        if self.buf.capacity() - self.buf.len() < want {
            self.buf.reserve(want.max(READ_SIZE));
        }
    }

    /// Reads what the client sent since, without waiting: whether it has gone (end of stream
    /// with nothing left to serve, or a broken connection). Keeps what it read (a next
    /// request), up to [`MAX_AHEAD`] bytes. A client that sent requests and then closed its
    /// side still gets their answers, as from hyper.
    fn poll_gone(&mut self, rd: &mut ReadHalf<'_>, cx: &mut Context<'_>) -> bool {
        loop {
            if self.read_closed || self.buf.len() >= MAX_AHEAD {
                return false;
            }
            self.reserve(READ_SIZE);
            match pin!(rd.read_buf(&mut self.buf)).poll(cx) {
                Poll::Ready(Ok(0)) if !self.buf.is_empty() => {
                    self.read_closed = true;
                    return false;
                }
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return true,
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => return false,
            }
        }
    }

    /// Writes what is left in `out` when the request is done. `false` if the connection is
    /// done: the write failed, or the client didn't take it within [`CLOSE_GRACE`] of the
    /// connection being told to close.
    async fn write_last(&mut self, wr: &mut WriteHalf<'_>, conn: &ConnState) -> bool {
        if self.out.is_empty() {
            return true;
        }
        let Self {
            out,
            registered,
            grace,
            deadline,
            bounds,
            ..
        } = self;
        let mut at = 0;
        let written = poll_fn(|cx| {
            if let Poll::Ready(ok) =
                poll_write_all(wr, out, &mut at, deadline, bounds.write_stall, cx)
            {
                return Poll::Ready(ok);
            }
            if must_end(grace, registered, conn, true, cx) {
                return Poll::Ready(false);
            }
            Poll::Pending
        })
        .await;
        self.out.clear();
        self.grace = None;
        written
    }

    /// Lets go of the read buffer (empty now) and of a write buffer larger than
    /// [`IDLE_KEEP`], for a connection that waits for its next request: 16 KiB or more a
    /// connection otherwise, for as long as the client keeps it open.
    fn release_idle(&mut self) {
        if self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
        if self.out.capacity() > IDLE_KEEP {
            self.out = Vec::new();
        }
    }

    /// Lets go of buffers a large request or response grew.
    fn shrink(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > KEEP_CAPACITY {
            self.buf = BytesMut::new();
        }
        if self.out.capacity() > KEEP_CAPACITY {
            self.out = Vec::new();
        }
    }
}

/// What [`read_more`] did.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    /// Read some bytes.
    More,
    /// The connection is done: the client closed it, it broke, or it was told to close.
    Done,
    /// `io.limit` passed (armed when a read first had to wait).
    TimedOut,
}

/// Reads more of a request into `io.buf` (see [`Io::reserve`] for `want`). [`Read::Done`] when
/// the connection is done: the client closed it, it broke, or it was told to close: at once if
/// no byte of a next request came, else after [`CLOSE_GRACE`] (kept across reads), as hyper's
/// graceful shutdown waits for a request that started. [`Read::TimedOut`] when `io.limit`
/// passed, counted from the first read that had to wait (from the accept for the first head).
async fn read_more(rd: &mut ReadHalf<'_>, io: &mut Io, conn: &ConnState, want: usize) -> Read {
    if io.read_closed {
        return Read::Done;
    }
    let started = !io.buf.is_empty();
    if !started {
        let next = next_request(rd, io, conn).await;
        if next != Read::More {
            return next;
        }
    }
    io.reserve(want);
    let Io {
        buf,
        registered,
        grace,
        limit,
        deadline,
        ..
    } = io;
    let mut read = pin!(rd.read_buf(buf));
    poll_fn(|cx| {
        if must_end(grace, registered, conn, started, cx) {
            return Poll::Ready(Read::Done);
        }
        match read.as_mut().poll(cx) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(Read::Done),
            Poll::Ready(Ok(_)) => Poll::Ready(Read::More),
            Poll::Pending => match limit {
                Some((limit, which)) => {
                    deadline.arm(*limit);
                    if deadline.poll_passed(cx) {
                        timed_out(which);
                        Poll::Ready(Read::TimedOut)
                    } else {
                        Poll::Pending
                    }
                }
                None => Poll::Pending,
            },
        }
    })
    .await
}

/// Whether the connection must end now because it was told to close: at once if nothing of a
/// request or answer is under way (`!busy`), else once [`CLOSE_GRACE`] has passed, started the
/// first time the close is seen and kept in `grace` across calls.
fn must_end(
    grace: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    registered: &mut Option<Waker>,
    conn: &ConnState,
    busy: bool,
    cx: &mut Context<'_>,
) -> bool {
    if grace.is_none() && conn.poll_close(registered, cx) {
        if !busy {
            return true;
        }
        *grace = Some(Box::pin(tokio::time::sleep(CLOSE_GRACE)));
    }
    grace
        .as_mut()
        .is_some_and(|g| g.as_mut().poll(cx).is_ready())
}

/// Waits for a next request's first bytes to be readable, without a read buffer: a connection
/// that has to wait lets go of its buffers first ([`Io::release_idle`]), so an idle keep-alive
/// connection holds little more than its task. `false` if the connection is told to close
/// meanwhile ([`Read::Done`]). A connection's first request is bounded from the accept: a
/// client that connects and sends nothing is [`Read::TimedOut`] after the header-read timeout
/// (later ones wait under the idle timeout).
async fn next_request(rd: &ReadHalf<'_>, io: &mut Io, conn: &ConnState) -> Read {
    let mut waiting = false;
    poll_fn(|cx| {
        if conn.poll_close(&mut io.registered, cx) {
            return Poll::Ready(Read::Done);
        }
        match rd.as_ref().poll_read_ready(cx) {
            // An error is the read's to report.
            Poll::Ready(_) => Poll::Ready(Read::More),
            Poll::Pending => {
                if !waiting {
                    waiting = true;
                    io.release_idle();
                }
                if !io.served {
                    io.deadline.arm(io.bounds.header_read);
                    if io.deadline.poll_passed(cx) {
                        timed_out("header_read");
                        return Poll::Ready(Read::TimedOut);
                    }
                }
                Poll::Pending
            }
        }
    })
    .await
}

/// Answers `e` to a request that couldn't be read whole in time, and ends the connection.
async fn refuse(
    rd: &mut ReadHalf<'_>,
    wr: &mut WriteHalf<'_>,
    io: &mut Io,
    conn: &ConnState,
    e: ApiError,
) -> Ended {
    io.limit = None;
    io.deadline.disarm();
    // What was read of the request is of no use now, and must not be taken for a next one.
    io.buf.clear();
    io.read_closed = true;
    // Whole or not, a response with `connection: close` leaves its last bytes to write_last.
    respond(rd, wr, io, e.into_response(), true).await;
    let _ = io.write_last(wr, conn).await;
    Ended::Done
}

/// Writes `buf` whole, from `*at`: `false` if the write failed, or made no progress for
/// `stall` (a client that stopped reading).
fn poll_write_all(
    wr: &mut WriteHalf<'_>,
    buf: &[u8],
    at: &mut usize,
    deadline: &mut Deadline,
    stall: std::time::Duration,
    cx: &mut Context<'_>,
) -> Poll<bool> {
    while *at < buf.len() {
        match Pin::new(&mut *wr).poll_write(cx, &buf[*at..]) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(false),
            Poll::Ready(Ok(n)) => {
                *at += n;
                deadline.disarm();
            }
            Poll::Pending => {
                deadline.arm(stall);
                if deadline.poll_passed(cx) {
                    timed_out("write_stall");
                    return Poll::Ready(false);
                }
                return Poll::Pending;
            }
        }
    }
    Poll::Ready(true)
}

/// [`poll_write_all`] from the start of `buf`.
async fn write_all(
    wr: &mut WriteHalf<'_>,
    buf: &[u8],
    deadline: &mut Deadline,
    stall: std::time::Duration,
) -> bool {
    let mut at = 0;
    poll_fn(|cx| poll_write_all(wr, buf, &mut at, deadline, stall, cx)).await
}

/// hyper's answer to a head it can't make a request of (a target `http::Uri` refuses, say),
/// around the `Date`.
const BAD_REQUEST_STATUS: &[u8] = b"HTTP/1.1 400 Bad Request\r\ndate: ";
const TOO_LARGE_STATUS: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\ndate: ";
const BAD_REQUEST_REST: &[u8] = b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// A request head parsed from the start of the buffer: where its parts are, by offset.
struct Head {
    /// The head's length, up to and including its blank line.
    len: usize,
    method: Method,
    path: (u16, u16),
    /// Name and value of each header, by offset.
    headers: [(u16, u16, u16, u16); MAX_HEADERS],
    count: usize,
    body_len: usize,
    /// The client asked to close the connection after this request.
    close: bool,
}

impl Default for Head {
    fn default() -> Self {
        Self {
            len: 0,
            method: Method::GET,
            path: (0, 0),
            headers: [(0, 0, 0, 0); MAX_HEADERS],
            count: 0,
            body_len: 0,
            close: false,
        }
    }
}

/// What [`parse`] found.
enum Parse {
    /// A whole head, now in the [`Head`] passed.
    Head,
    Partial,
    HandOver,
    /// A head to answer `400` and close: `Content-Length` with `Transfer-Encoding` (a request
    /// smuggling vector), or more than one `Host`.
    Refuse,
    /// A head over [`MAX_ANY_HEAD`]: `431`, and the connection is closed.
    TooLarge,
}

/// Parses the request head at the start of `buf` into `head`.
fn parse(buf: &[u8], head: &mut Head) -> Parse {
    if buf.is_empty() {
        return Parse::Partial;
    }
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_ANY_HEAD => return Parse::Partial,
        Ok(httparse::Status::Partial) => return Parse::TooLarge,
        Err(_) => return Parse::HandOver,
    };
    if len > MAX_ANY_HEAD {
        return Parse::TooLarge;
    }
    if len > MAX_HEAD || req.version != Some(1) {
        return Parse::HandOver;
    }
    let method = match req.method {
        Some("POST") => Method::POST,
        Some("GET") => Method::GET,
        Some("DELETE") => Method::DELETE,
        _ => return Parse::HandOver,
    };
    let Some(path) = req.path.filter(|p| p.starts_with('/')) else {
        return Parse::HandOver;
    };
    let base = buf.as_ptr() as usize;
    // Offsets fit u16: the head is at most MAX_HEAD bytes.
    let span = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        (start as u16, (start + s.len()) as u16)
    };
    head.len = len;
    head.method = method;
    head.path = span(path.as_bytes());
    head.count = 0;
    head.close = false;
    let mut length: Option<usize> = None;
    let (mut chunked, mut hosts) = (false, 0u8);
    for (i, h) in req.headers.iter().enumerate() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let Some(n) = parse_length(h.value).filter(|n| length.is_none_or(|l| l == *n)) else {
                // Not a number, or two that differ: hyper answers 400.
                return Parse::HandOver;
            };
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = true;
        } else if name.eq_ignore_ascii_case(b"expect") || name.eq_ignore_ascii_case(b"upgrade") {
            return Parse::HandOver;
        } else if name.eq_ignore_ascii_case(b"connection") {
            head.close |= has_close(h.value);
        }
        let (ns, ne) = span(name);
        let (vs, ve) = span(h.value);
        head.headers[i] = (ns, ne, vs, ve);
        head.count = i + 1;
    }
    if hosts > 1 || (chunked && length.is_some()) {
        return Parse::Refuse;
    }
    if chunked {
        return Parse::HandOver;
    }
    head.body_len = length.unwrap_or(0);
    if head.body_len > MAX_BODY {
        return Parse::HandOver;
    }
    Parse::Head
}

impl Head {
    /// The request, from the head's bytes (split off the buffer) and the body, with the
    /// headers `reads` asks for. `None` if its target or a header is not one `http` accepts.
    fn request(
        &self,
        bytes: &Bytes,
        body: Bytes,
        reads: &impl Fn(&Method, &str) -> Reads,
    ) -> Option<Request<Full<Bytes>>> {
        let at = |(s, e): (u16, u16)| bytes.slice(usize::from(s)..usize::from(e));
        let uri = http::Uri::from_maybe_shared(at(self.path)).ok()?;
        let reads = reads(&self.method, uri.path());
        let mut headers = HeaderMap::with_capacity(match reads {
            Reads::All => self.count,
            Reads::Only(names) => names.len(),
        });
        for &(ns, ne, vs, ve) in &self.headers[..self.count] {
            let raw = &bytes[usize::from(ns)..usize::from(ne)];
            let name = match reads {
                Reads::All => HeaderName::from_bytes(raw).ok()?,
                Reads::Only(names) => {
                    match names
                        .iter()
                        .find(|n| n.as_str().as_bytes().eq_ignore_ascii_case(raw))
                    {
                        Some(n) => n.clone(),
                        None => continue,
                    }
                }
            };
            let value = HeaderValue::from_maybe_shared(at((vs, ve))).ok()?;
            headers.append(name, value);
        }
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        Some(req)
    }
}

/// For the fuzz target `h1_request_head` (fuzz/): runs [`parse`] on `bytes` and, for a whole
/// head, builds the request from it as the server loop does. Returns whether a head was found.
/// Panics if a parsed head points outside `bytes`.
#[doc(hidden)]
pub fn fuzz_parse_head(bytes: &[u8]) -> bool {
    let mut head = Head::default();
    if !matches!(parse(bytes, &mut head), Parse::Head) {
        return false;
    }
    assert!(head.len <= bytes.len() && head.count <= MAX_HEADERS);
    let head_bytes = Bytes::copy_from_slice(&bytes[..head.len]);
    let _ = head.request(&head_bytes, Bytes::new(), &|_: &Method, _: &str| Reads::All);
    true
}

/// A `Content-Length` value: digits only.
fn parse_length(v: &[u8]) -> Option<usize> {
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0, |n, d| n * 10 + usize::from(d - b'0')))
}

/// Whether a `Connection` value lists `close`.
fn has_close(v: &[u8]) -> bool {
    v.split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
}

/// How the response body is framed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (`204`, `304`, a body known to be empty needs `Content-Length: 0`).
    None,
    /// `Content-Length`: this many bytes are left.
    Length(u64),
    Chunked,
}

/// What happened while waiting for the response body.
enum Next<E> {
    Frame(Option<Result<http_body::Frame<Bytes>, E>>),
    /// The body has nothing for now and some output waits: write it.
    Flush,
    /// The client left.
    Gone,
}

/// Writes `resp`, all but what is left in `io.out` at the end (see [`Io::write_last`]).
/// Whether the connection can carry another request.
async fn respond<B: Body<Data = Bytes>>(
    rd: &mut ReadHalf<'_>,
    wr: &mut WriteHalf<'_>,
    io: &mut Io,
    resp: Response<B>,
    mut close: bool,
) -> bool {
    let (parts, body) = resp.into_parts();
    let mut body = pin!(body);
    let out = &mut io.out;
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut dated = false;
    // A length the handler set, for a body that doesn't know its own.
    let mut declared = None;
    for (name, value) in &parts.headers {
        // This hop's framing is decided here.
        if name == header::CONTENT_LENGTH {
            declared = parse_length(value.as_bytes());
            continue;
        }
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        if name == header::CONNECTION {
            close |= has_close(value.as_bytes());
            continue;
        }
        dated |= name == header::DATE;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !dated {
        out.extend_from_slice(b"date: ");
        date(out);
        out.extend_from_slice(b"\r\n");
    }
    let status = parts.status.as_u16();
    let mut framing = if status < 200 || status == 204 || status == 304 {
        Framing::None
    } else if body.is_end_stream() {
        out.extend_from_slice(b"content-length: 0\r\n");
        Framing::None
    } else if let Some(n) = body.size_hint().exact().or(declared.map(|n| n as u64)) {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        out.extend_from_slice(b"\r\n");
        Framing::Length(n)
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if framing == Framing::None {
        return !close;
    }
    loop {
        let next = poll_fn(|cx| {
            if let Poll::Ready(frame) = body.as_mut().poll_frame(cx) {
                return Poll::Ready(Next::Frame(frame));
            }
            if !io.out.is_empty() {
                return Poll::Ready(Next::Flush);
            }
            if io.poll_gone(rd, cx) {
                return Poll::Ready(Next::Gone);
            }
            Poll::Pending
        })
        .await;
        let out = &mut io.out;
        let data = match next {
            Next::Flush => {
                if !write_all(wr, out, &mut io.deadline, io.bounds.write_stall).await {
                    out.clear();
                    return false;
                }
                out.clear();
                continue;
            }
            Next::Gone => {
                out.clear();
                return false;
            }
            Next::Frame(None) => {
                if framing == Framing::Chunked {
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                // A body shorter than its length leaves the client waiting: close.
                let whole = matches!(framing, Framing::Chunked | Framing::Length(0));
                return whole && !close;
            }
            // Cut short: what was sent stays incomplete (no last chunk), so the client sees the
            // break.
            Next::Frame(Some(Err(_))) => return false,
            Next::Frame(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                // Trailers are not sent; empty frames say nothing.
                _ => continue,
            },
        };
        match &mut framing {
            Framing::Length(left) => {
                let Some(rest) = left.checked_sub(data.len() as u64) else {
                    // Longer than its length: the connection can't be trusted after it.
                    return false;
                };
                *left = rest;
            }
            Framing::Chunked => {
                write_hex(out, data.len());
                out.extend_from_slice(b"\r\n");
            }
            Framing::None => {}
        }
        if data.len() >= COPY_MAX {
            let stall = io.bounds.write_stall;
            if !write_all(wr, out, &mut io.deadline, stall).await
                || !write_all(wr, &data, &mut io.deadline, stall).await
            {
                out.clear();
                return false;
            }
            out.clear();
        } else {
            out.extend_from_slice(&data);
        }
        if framing == Framing::Chunked {
            out.extend_from_slice(b"\r\n");
        }
        // A body that keeps having more (a fast upstream) is written as it goes, not gathered
        // whole.
        if out.len() >= KEEP_CAPACITY {
            if !write_all(wr, out, &mut io.deadline, io.bounds.write_stall).await {
                out.clear();
                return false;
            }
            out.clear();
        }
    }
}

fn write_hex(out: &mut Vec<u8>, n: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Writes the current time as an HTTP date, formatted once a second per thread.
fn date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let secs = crate::clock::unix_secs();
    DATE.with_borrow_mut(|(at, text)| {
        if *at != secs || text.is_empty() {
            *at = secs;
            *text = httpdate::fmt_http_date(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs),
            );
        }
        out.extend_from_slice(text.as_bytes());
    });
}

/// A socket with bytes already read from it put back in front: how hyper takes over a
/// connection from this server (see [`Ended::HandOver`]).
#[derive(Debug)]
pub struct Rewound<T> {
    read: Bytes,
    io: T,
}

impl<T> Rewound<T> {
    pub fn new(read: Bytes, io: T) -> Self {
        Self { read, io }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewound<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(dst.remaining());
            dst.put_slice(&self.read[..n]);
            self.read.advance(n);
            if self.read.is_empty() {
                // Let go of the buffer it was a view of, for the rest of the connection.
                self.read = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, dst)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewound<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        src: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, src)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
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

#[cfg(test)]
mod tests {
    #![expect(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use crate::connections::Connections;
    use axum::body::Body as AxumBody;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A connection waiting for its next request holds no read buffer, and no large write
    /// buffer: memory per idle keep-alive connection.
    #[tokio::test]
    async fn an_idle_connection_lets_go_of_its_buffers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut tcp, _) = listener.accept().await.unwrap();
        let conns = Connections::new(Duration::from_secs(60));
        let reg = conns.open();
        let mut io = Io::new(Bounds::default());
        let (mut rd, _wr) = tcp.split();
        // A request came and was served: its buffers are still there.
        client.write_all(b"GET / HTTP/1.1").await.unwrap();
        assert_eq!(
            read_more(&mut rd, &mut io, &reg.state, READ_SIZE).await,
            Read::More
        );
        assert_eq!(&io.buf[..], b"GET / HTTP/1.1");
        io.buf.clear();
        io.out = Vec::with_capacity(IDLE_KEEP * 4);
        assert!(io.buf.capacity() >= READ_SIZE);
        // Waiting for the next one lets go of them.
        {
            let mut waiting = pin!(read_more(&mut rd, &mut io, &reg.state, READ_SIZE));
            let polled = poll_fn(|cx| Poll::Ready(waiting.as_mut().poll(cx))).await;
            assert!(polled.is_pending(), "nothing more was sent");
        }
        assert_eq!((io.buf.capacity(), io.out.capacity()), (0, 0));
        // A small write buffer is kept; the next request gets a read buffer when it comes.
        io.out = Vec::with_capacity(IDLE_KEEP);
        client.write_all(b"GET /next HTTP/1.1").await.unwrap();
        assert_eq!(
            read_more(&mut rd, &mut io, &reg.state, READ_SIZE).await,
            Read::More
        );
        assert_eq!(&io.buf[..], b"GET /next HTTP/1.1");
        assert_eq!(io.out.capacity(), IDLE_KEEP);
    }

    /// A handler that answers with what it was given: method, path, header names, body.
    async fn echo(req: Request<Full<Bytes>>) -> Response<AxumBody> {
        use http_body_util::BodyExt;
        let (parts, body) = req.into_parts();
        let names: Vec<&str> = parts.headers.keys().map(|n| n.as_str()).collect();
        let body = body.collect().await.unwrap().to_bytes();
        let text = format!(
            "{} {} {} [{}]",
            parts.method,
            parts.uri.path(),
            names.join(","),
            String::from_utf8_lossy(&body)
        );
        Response::new(AxumBody::from(text))
    }

    /// Serves one connection with `handle`, the client writing `pieces` (20 ms apart) and then
    /// reading until it has `until` (or for 2 s). Returns what the client read and how the
    /// server's loop ended.
    async fn exchange<H, F>(
        reads: Reads,
        pieces: &[&[u8]],
        until: &str,
        handle: H,
    ) -> (String, Ended)
    where
        H: Fn(Request<Full<Bytes>>) -> F + Send + 'static,
        F: Future<Output = Response<AxumBody>> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let conns = Connections::new(Duration::from_secs(60));
            let reg = conns.open();
            serve(
                &mut tcp,
                &reg.state,
                Bounds::default(),
                move |_: &Method, _: &str| reads,
                handle,
            )
            .await
        });
        let mut client = TcpStream::connect(addr).await.unwrap();
        for (i, p) in pieces.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            client.write_all(p).await.unwrap();
        }
        let mut got = Vec::new();
        let end = tokio::time::Instant::now() + Duration::from_secs(2);
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains(until) {
            match tokio::time::timeout_at(end, client.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&chunk[..n]),
                _ => break,
            }
        }
        drop(client);
        let ended = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server's loop ends when the client goes")
            .unwrap();
        (String::from_utf8(got).unwrap(), ended)
    }

    const POST_A: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer k\r\nX-Stainless-Lang: python\r\nContent-Length: 1\r\n\r\na";
    const POST_BB: &[u8] =
        b"POST /v1/embeddings?x=1 HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\nbb";

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order() {
        let both = [POST_A, POST_BB].concat();
        let (out, ended) = exchange(Reads::All, &[&both], "[bb]", echo).await;
        let a = out.find(
            "POST /v1/chat/completions host,authorization,x-stainless-lang,content-length [a]",
        );
        let b = out.find("POST /v1/embeddings host,content-length [bb]");
        assert!(a.is_some() && b.is_some() && a < b, "{out}");
        assert_eq!(out.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{out}");
        assert_eq!(out.matches("content-length: ").count(), 2, "{out}");
        assert_eq!(out.matches("\r\ndate: ").count(), 2, "{out}");
        assert!(matches!(ended, Ended::Done), "{ended:?}");
    }

    #[tokio::test]
    async fn a_request_in_pieces_is_read_whole() {
        let (head, body) = POST_BB.split_at(POST_BB.len() - 2);
        let (head1, head2) = head.split_at(9);
        let pieces: [&[u8]; 4] = [head1, head2, &body[..1], &body[1..]];
        let (out, _) = exchange(Reads::All, &pieces, "[bb]", echo).await;
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(
            out.ends_with("POST /v1/embeddings host,content-length [bb]"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn only_the_headers_the_handler_reads_reach_it() {
        static AUTH: [HeaderName; 2] = [header::AUTHORIZATION, header::CONTENT_LENGTH];
        let (out, _) = exchange(Reads::Only(&AUTH), &[POST_A], "[a]", echo).await;
        assert!(
            out.ends_with("POST /v1/chat/completions authorization,content-length [a]"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn requests_served_elsewhere_are_handed_over_with_every_byte_read() {
        let cases: [(&str, &[u8], bool); 11] = [
            (
                "HTTP/1.0",
                b"POST /v1/embeddings HTTP/1.0\r\ncontent-length: 2\r\n\r\nbb",
                false,
            ),
            ("HEAD", b"HEAD /health HTTP/1.1\r\nhost: t\r\n\r\n", false),
            (
                "chunked",
                b"POST /x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n2\r\nbb\r\n0\r\n\r\n",
                false,
            ),
            (
                "expect",
                b"POST /x HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n",
                false,
            ),
            (
                "upgrade",
                b"GET /x HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
                false,
            ),
            (
                "lengths that differ",
                b"POST /x HTTP/1.1\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nbbb",
                false,
            ),
            (
                "a length that isn't a number",
                b"POST /x HTTP/1.1\r\ncontent-length: +2\r\n\r\nbb",
                false,
            ),
            (
                "a body over the limit",
                b"POST /x HTTP/1.1\r\ncontent-length: 1048577\r\n\r\n",
                false,
            ),
            (
                "absolute form",
                b"GET http://t/x HTTP/1.1\r\nhost: t\r\n\r\n",
                false,
            ),
            ("garbage", b"\x01\x02 nonsense\r\n\r\n", false),
            // HTTP/2's preface only counts at the start of a connection.
            (
                "h2c after a request",
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                false,
            ),
        ];
        for (what, bytes, h2) in cases {
            // One request served first: the hand-over carries only what follows it.
            let sent = [POST_BB, bytes].concat();
            let (out, ended) = exchange(Reads::All, &[&sent], "[bb]", echo).await;
            assert!(out.ends_with("[bb]"), "{what}: {out}");
            match ended {
                Ended::HandOver { read, h2: is_h2 } => {
                    assert_eq!(&read[..], bytes, "{what}");
                    assert_eq!(is_h2, h2, "{what}");
                }
                Ended::Done => panic!("{what}: not handed over"),
            }
        }
        // Too many headers, and a head too long, also go to hyper.
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("x-h{i}: 1\r\n"))
            .collect();
        let long = format!("x-long: {}\r\n", "a".repeat(MAX_HEAD));
        for extra in [many, long] {
            let sent = format!("GET /x HTTP/1.1\r\n{extra}\r\n");
            let (_, ended) = exchange(Reads::All, &[sent.as_bytes()], "never", echo).await;
            let Ended::HandOver { read, .. } = ended else {
                panic!("not handed over")
            };
            assert!(read.starts_with(b"GET /x HTTP/1.1\r\n"));
        }
    }

    #[tokio::test]
    async fn http2s_preface_is_handed_over_even_when_cut_short() {
        let preface: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        for cut in [3, 12, 13, preface.len()] {
            let (first, rest) = preface.split_at(cut);
            let (_, ended) = exchange(Reads::All, &[first, rest], "never", echo).await;
            let Ended::HandOver { read, h2 } = ended else {
                panic!("not handed over")
            };
            assert!(h2, "cut at {cut}");
            assert!(preface.starts_with(&read), "cut at {cut}");
        }
    }

    #[tokio::test]
    async fn requests_sent_before_the_client_closed_its_side_are_answered() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let conns = Connections::new(Duration::from_secs(60));
            let reg = conns.open();
            serve(
                &mut tcp,
                &reg.state,
                Bounds::default(),
                |_: &Method, _: &str| Reads::All,
                echo,
            )
            .await
        });
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(&[POST_A, POST_BB].concat()).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = String::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_string(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.matches("HTTP/1.1 200 OK").count(), 2, "{got}");
        assert!(got.ends_with("[bb]"), "{got}");
        let ended = tokio::time::timeout(Duration::from_secs(5), server).await;
        assert!(matches!(ended, Ok(Ok(Ended::Done))), "{ended:?}");
    }

    #[tokio::test]
    async fn a_streamed_body_is_sent_chunked_and_a_failed_one_is_cut() {
        let (out, _) = exchange(Reads::All, &[POST_BB], "0\r\n\r\n", |_| async {
            let frames = futures_util::stream::iter([
                Ok::<_, std::io::Error>(Bytes::from_static(b"hello")),
                Ok(Bytes::from(vec![b'x'; 20 << 10])),
                Ok(Bytes::new()),
                Ok(Bytes::from_static(b"!")),
            ]);
            Response::new(AxumBody::from_stream(frames))
        })
        .await;
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.contains("\r\ntransfer-encoding: chunked"), "{head}");
        assert!(!head.contains("content-length"), "{head}");
        let big = "x".repeat(20 << 10);
        assert_eq!(
            body,
            format!("5\r\nhello\r\n5000\r\n{big}\r\n1\r\n!\r\n0\r\n\r\n")
        );

        let (out, ended) = exchange(Reads::All, &[POST_BB, POST_BB], "never", |_| async {
            let frames = futures_util::stream::iter([
                Ok(Bytes::from_static(b"part")),
                Err(std::io::Error::other("upstream broke")),
            ]);
            Response::new(AxumBody::from_stream(frames))
        })
        .await;
        assert!(out.ends_with("\r\n\r\n4\r\npart\r\n"), "{out}");
        assert!(matches!(ended, Ended::Done), "the connection is closed");
    }

    /// A body that says it has `len` bytes and has `data`.
    struct Sized {
        data: Option<Bytes>,
        len: u64,
    }

    impl Body for Sized {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.data.take().map(|d| Ok(http_body::Frame::data(d))))
        }

        fn size_hint(&self) -> http_body::SizeHint {
            http_body::SizeHint::with_exact(self.len)
        }
    }

    #[tokio::test]
    async fn a_body_that_breaks_its_length_ends_the_connection() {
        for (data, len) in [("short", 10), ("longer than said", 4)] {
            let (out, ended) = exchange(
                Reads::All,
                &[POST_BB, POST_BB],
                "never",
                move |_| async move {
                    let body = Sized {
                        data: Some(Bytes::from_static(data.as_bytes())),
                        len,
                    };
                    Response::new(AxumBody::new(body))
                },
            )
            .await;
            assert!(out.contains(&format!("content-length: {len}\r\n")), "{out}");
            assert_eq!(out.matches("HTTP/1.1 200").count(), 1, "{out}");
            assert!(matches!(ended, Ended::Done), "{data}");
        }
        // Exactly its length: the connection carries the next request.
        let (out, _) = exchange(Reads::All, &[POST_BB, POST_BB], "never", |_| async {
            let body = Sized {
                data: Some(Bytes::from_static(b"12345")),
                len: 5,
            };
            Response::new(AxumBody::new(body))
        })
        .await;
        assert_eq!(out.matches("\r\n\r\n12345").count(), 2, "{out}");
    }

    #[tokio::test]
    async fn no_content_has_no_body_and_no_length() {
        let (out, ended) = exchange(Reads::All, &[POST_BB, POST_BB], "never", |_| async {
            let mut resp = Response::new(AxumBody::from("ignored"));
            *resp.status_mut() = http::StatusCode::NO_CONTENT;
            resp
        })
        .await;
        assert_eq!(
            out.matches("HTTP/1.1 204 No Content\r\n").count(),
            2,
            "{out}"
        );
        assert!(
            !out.contains("content-length") && !out.contains("ignored"),
            "{out}"
        );
        assert!(matches!(ended, Ended::Done));
    }

    /// httparse takes `<` in a target; `http::Uri` doesn't. That 400 is ours, and
    /// carries a `Date` like every other answer.
    #[tokio::test]
    async fn a_target_the_uri_type_refuses_gets_a_dated_400() {
        let (out, ended) = exchange(
            Reads::All,
            &[b"GET /a<b HTTP/1.1\r\nhost: t\r\n\r\n"],
            "\r\n\r\n",
            |_| async { Response::new(AxumBody::from("not a request: never called")) },
        )
        .await;
        assert!(
            out.starts_with("HTTP/1.1 400 Bad Request\r\ndate: "),
            "{out}"
        );
        assert!(
            out.ends_with(" GMT\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"),
            "{out}"
        );
        assert!(matches!(ended, Ended::Done));
    }

    #[tokio::test]
    async fn connection_close_is_answered_and_done() {
        let req = b"GET /health HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n";
        let (out, ended) = exchange(Reads::All, &[req], "[]", echo).await;
        assert!(out.contains("\r\nconnection: close\r\n"), "{out}");
        assert!(matches!(ended, Ended::Done));
    }

    #[tokio::test]
    async fn a_client_that_leaves_drops_its_handler() {
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let d = dropped.clone();
        let (out, ended) = exchange(Reads::All, &[POST_BB], "never", move |_| {
            let flag = Flag(d.clone());
            async move {
                std::future::pending::<()>().await;
                drop(flag);
                Response::new(AxumBody::empty())
            }
        })
        .await;
        assert_eq!(out, "");
        assert!(matches!(ended, Ended::Done));
        assert!(dropped.load(Ordering::SeqCst), "the handler still runs");
    }

    #[tokio::test]
    async fn rewound_reads_the_bytes_put_back_first() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut r = Rewound::new(Bytes::from_static(b"head "), a);
        b.write_all(b"tail").await.unwrap();
        drop(b);
        let mut all = String::new();
        r.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "head tail");
    }

    #[test]
    fn framing_helpers() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"1048576"), Some(1 << 20));
        for bad in [&b""[..], b"-1", b" 1", b"1a", b"9999999999999999999"] {
            assert_eq!(parse_length(bad), None, "{bad:?}");
        }
        assert!(has_close(b"close"));
        assert!(has_close(b"keep-alive, CLOSE "));
        assert!(!has_close(b"keep-alive"));
        assert!(!has_close(b"closed"));
        let mut out = Vec::new();
        for n in [0, 9, 10, 255, 0x5000] {
            write_hex(&mut out, n);
            out.push(b' ');
        }
        assert_eq!(out, b"0 9 a ff 5000 ");
    }
}
