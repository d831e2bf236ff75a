//! The HTTP/1.1 client side of one upstream connection, driven by the request that uses it.
//!
//! Plain-HTTP upstreams (vLLM and KServe pods, Ollama, TGI, the mock) are the common case in a
//! cluster and the gateway's hot path. hyper's client runs each connection as a task of its own
//! and passes the request to it, the response head back and every body chunk across through
//! channels: about three task wake-ups and as many channel operations per proxied request, and
//! a stream's body handed over one chunk per poll. Here the request's own task writes the
//! request and reads the answer, so there is no connection task and no channel; a read that
//! brings many chunks of a chunked body yields them as one frame (decoded in place).
//!
//! Parsing is httparse's (as in hyper); this module only frames: `Content-Length`, `chunked`
//! (with extensions and trailers, which are skipped), read-to-close, and the bodiless statuses.
//! What it does not do, because the gateway never asks for it: pipelining, `Expect:
//! 100-continue`, upgrades, HEAD. 1xx interim responses are skipped. Anything malformed is an
//! error and the connection is not reused. The request is written whole before the answer is
//! read; an upstream that answers early (a 413 to a body larger than the socket buffers) and
//! closes while the body is still going out makes that write fail, and its answer is then read
//! from what the socket still holds (hyper reads while it writes instead).
//!
//! Of the response's headers, only those the gateway reads are kept: `Content-Type`, and
//! `Retry-After` (see [`KEPT_HEADERS`]). The ones that frame this hop (`Content-Length`,
//! `Transfer-Encoding`, `Connection`) are read for the framing; the body's size hint carries the
//! length.
//!
//! A deadline for the response head is kept with the connection: one tokio timer per connection,
//! moved forward for each request (a compare-and-swap while it is still pending), instead of a
//! timer created, registered and removed for every request (about 1,000 instructions of the
//! gateway's 40,000 per request, with the timer wheel's work when the thread parks).
//!
//! A connection is reusable when its response was read to the end, the upstream did not ask to
//! close it (`Connection: close`, HTTP/1.0 without keep-alive) and nothing followed the
//! response. [`crate::upstream`] pools such connections per thread.

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep};

/// The response headers passed on: those the gateway reads. A header-map entry for every other
/// header (a name lookup, a hash, a copy of the value) cost about 500 instructions per header
/// per request (the benchmark's mock sends one such header, `date`; OpenAI sends a dozen or
/// more), for headers nothing read. A feature that needs another upstream header adds it here.
pub(crate) const KEPT_HEADERS: [HeaderName; 2] =
    [http::header::CONTENT_TYPE, http::header::RETRY_AFTER];

/// Largest response head (status line and headers).
const MAX_HEAD: usize = 64 << 10;
/// Most response headers.
const MAX_HEADERS: usize = 100;
/// Most 1xx responses skipped before the real one (an upstream that sends them forever is
/// broken).
const MAX_INTERIM: usize = 16;
/// Largest chunk-size line or trailer line of a chunked body.
const MAX_LINE: usize = 4 << 10;
/// Bytes a read asks the socket for at least.
const READ_SIZE: usize = 16 << 10;
/// Request bodies up to this size are copied behind the head and sent in one write.
const COPY_BODY: usize = 16 << 10;

/// A connection that ends with no answer within this many milliseconds (coarse clock, so up
/// to about 4 ms more) of the request being written ended as the request arrived: the
/// upstream closed it for idleness (its FIN was on the way), and no upstream does billable work
/// in that time. Later, it may have started on the request: [`Error::ClosedAfterWrite`].
const RACE_MS: u64 = 10;

/// Why a request got no (complete) answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection had ended (closed or reset) when the request was written, or ended at
    /// once after it (within [`RACE_MS`]), and no answer came: on a reused connection, the
    /// upstream's idle timeout. Safe to send again.
    #[error("the upstream closed the connection before reading the request")]
    Closed(#[source] Option<std::io::Error>),
    /// The request was written whole, then the connection ended before any byte of an answer:
    /// the upstream may have started on it, so it is not sent again here (another attempt is
    /// the route policy's call).
    #[error("the upstream closed the connection before answering")]
    ClosedAfterWrite(#[source] Option<std::io::Error>),
    /// Reading or writing failed after part of the answer arrived.
    #[error("upstream connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The upstream's answer is not HTTP/1.1 the way it should be.
    #[error("invalid HTTP response from the upstream: {0}")]
    Parse(&'static str),
    /// No complete response head by the deadline given.
    #[error("no response from the upstream by the deadline")]
    TimedOut,
}

impl Error {
    /// Whether the request may be sent again on a new connection: the upstream never had it
    /// whole, and nothing came back.
    pub(crate) fn is_closed(&self) -> bool {
        matches!(self, Error::Closed(_))
    }
}

fn closed_kind(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
    )
}

/// One upstream connection: the socket and what has been read from it but not used yet.
pub struct Conn<T> {
    io: T,
    buf: BytesMut,
    /// The request head being written, kept to reuse its allocation.
    head: Vec<u8>,
    /// The response-head deadline's timer, made on the first request that has a deadline and
    /// reset for each later one. Between requests it may still be pending, and then fires once,
    /// waking the last task that polled it for nothing (which keeps that task's allocation
    /// until then); or it has fired.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Conn<T> {
    /// A connection over `io`, nothing sent yet.
    pub fn new(io: T) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            head: Vec::new(),
            timer: None,
        }
    }

    /// The socket, e.g. to check whether the upstream closed an idle connection.
    pub(crate) fn io(&self) -> &T {
        &self.io
    }

    /// Lets go of the read buffer if nothing unread is in it (the next request makes a new
    /// one): for a connection that may stay idle in a pool a while.
    pub(crate) fn release_buffer(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }

    /// Sends `req` (origin-form URI, `Host` among its headers) and reads the response head. The
    /// body is read through the returned response, which owns the connection.
    pub async fn send(mut self, req: Request<Bytes>) -> Result<Response<Body<T>>, Error> {
        let (parts, body) = req.into_parts();
        self.head.clear();
        write_head(&mut self.head, &parts, body.len());
        self.exchange(body, None).await
    }

    /// [`send`](Self::send) with a request line and headers written beforehand (see
    /// [`RequestHead`]): only `Content-Length` is added per request. With `by`, the response
    /// head must have arrived by then, or the answer is [`Error::TimedOut`] (and the
    /// connection is dropped).
    pub(crate) async fn send_with_head(
        mut self,
        head: &RequestHead,
        body: Bytes,
        by: Option<Instant>,
    ) -> Result<Response<Body<T>>, Error> {
        self.head.clear();
        self.head.extend_from_slice(&head.0);
        write_content_length(&mut self.head, body.len());
        self.head.extend_from_slice(b"\r\n");
        self.exchange(body, by).await
    }

    /// Writes the head in `self.head` and `body`, then reads the response head, by `by` if
    /// given. The connection's timer, set to `by`, is polled only while the socket makes the
    /// request wait (a whole-request wrapper future cost twice as much), and goes on with the
    /// connection in the response's body.
    async fn exchange(
        mut self,
        body: Bytes,
        by: Option<Instant>,
    ) -> Result<Response<Body<T>>, Error> {
        let mut timer = match (by, self.timer.take()) {
            (None, kept) => {
                self.timer = kept;
                None
            }
            (Some(by), Some(mut t)) => {
                t.as_mut().reset(by);
                Some(t)
            }
            (Some(by), None) => Some(Box::pin(tokio::time::sleep_until(by))),
        };
        let sent = if body.len() <= COPY_BODY {
            self.head.extend_from_slice(&body);
            before(&mut timer, self.io.write_all(&self.head)).await?
        } else {
            match before(&mut timer, self.io.write_all(&self.head)).await? {
                Ok(()) => before(&mut timer, self.io.write_all(&body)).await?,
                Err(e) => Err(e),
            }
        };
        if self.head.capacity() > 2 * COPY_BODY {
            // Don't keep a large request (prompt text) in an idle pooled connection.
            self.head = Vec::new();
        }
        match sent {
            Ok(()) => {}
            Err(e) if closed_kind(&e) => {
                return match self.early_answer(timer).await {
                    Some(resp) => Ok(resp),
                    None => Err(Error::Closed(Some(e))),
                };
            }
            Err(e) => return Err(Error::Io(e)),
        }
        // When the request went out whole: a connection that ends at once after that (see
        // `RACE_MS`) ended as the request arrived, not while the upstream worked on it.
        let written_ms = crate::rt::clock::mono_ms();
        let ended = |e: Option<std::io::Error>| {
            if crate::rt::clock::mono_ms().saturating_sub(written_ms) <= RACE_MS {
                Error::Closed(e)
            } else {
                Error::ClosedAfterWrite(e)
            }
        };
        let mut any = false;
        let mut interim = 0;
        loop {
            if let Some(head) = self.parse_head()? {
                if head.status.is_informational() {
                    if head.status == StatusCode::SWITCHING_PROTOCOLS {
                        return Err(Error::Parse("unexpected 101 Switching Protocols"));
                    }
                    interim += 1;
                    if interim > MAX_INTERIM {
                        return Err(Error::Parse("too many interim (1xx) responses"));
                    }
                    // 100 Continue, 103 Early Hints: the real answer follows.
                    continue;
                }
                if timer.is_some() {
                    self.timer = timer;
                }
                return Ok(self.into_response(head));
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(Error::Parse("response head too large"));
            }
            reserve(&mut self.buf);
            match before(&mut timer, self.io.read_buf(&mut self.buf)).await? {
                Ok(0) if !any => return Err(ended(None)),
                Ok(0) => return Err(Error::Parse("connection closed inside the response head")),
                Ok(_) => any = true,
                Err(e) if !any && closed_kind(&e) => return Err(ended(Some(e))),
                Err(e) => return Err(Error::Io(e)),
            }
        }
    }

    /// The answer an upstream sent before it closed the connection on a request it stopped
    /// reading (a 413 to a body too large for it, sent as soon as the head arrived): after a
    /// failed write, whatever the socket still holds, read until it ends. The connection is
    /// closed (reset) by then, so the reads end at once; it is not reused. `None` if no complete
    /// response head is there (a pooled connection the upstream had closed while idle: the
    /// caller may then send the request again on a new one).
    async fn early_answer(
        mut self,
        mut timer: Option<Pin<Box<Sleep>>>,
    ) -> Option<Response<Body<T>>> {
        for _ in 0..=MAX_INTERIM {
            loop {
                match self.parse_head() {
                    Ok(Some(head)) if head.status.is_informational() => break,
                    Ok(Some(mut head)) => {
                        head.close = true;
                        return Some(self.into_response(head));
                    }
                    Ok(None) if self.buf.len() < MAX_HEAD => {}
                    _ => return None,
                }
                reserve(&mut self.buf);
                match before(&mut timer, self.io.read_buf(&mut self.buf)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return None,
                }
            }
        }
        None
    }

    /// A complete response head at the start of the buffer, consumed; `None` when more bytes
    /// are needed.
    fn parse_head(&mut self) -> Result<Option<Head>, Error> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let len = match resp.parse(&self.buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Error::Parse("too many response headers"));
            }
            Err(_) => return Err(Error::Parse("malformed response head")),
        };
        let status = resp
            .code
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or(Error::Parse("invalid status code"))?;
        let version = if resp.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let mut map = HeaderMap::new();
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut encoded = false;
        let mut close = version == Version::HTTP_10;
        for h in resp.headers.iter() {
            // The framing headers are read here and not passed on: they describe this hop.
            let raw = h.name.as_bytes();
            if raw.eq_ignore_ascii_case(b"content-length") {
                let digits = h.value.trim_ascii();
                if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                    return Err(Error::Parse("invalid content-length"));
                }
                let n = std::str::from_utf8(digits)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or(Error::Parse("invalid content-length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(Error::Parse("conflicting content-length headers"));
                }
                length = Some(n);
            } else if raw.eq_ignore_ascii_case(b"transfer-encoding") {
                encoded = true;
                // Chunked must be the last coding; anything else is read to the close.
                chunked = h
                    .value
                    .rsplit(|b| *b == b',')
                    .next()
                    .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if raw.eq_ignore_ascii_case(b"connection") {
                for token in h.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive")
                        && version == Version::HTTP_10
                    {
                        close = false;
                    }
                }
            } else if let Some(name) = KEPT_HEADERS
                .iter()
                .find(|k| raw.eq_ignore_ascii_case(k.as_str().as_bytes()))
            {
                let value = HeaderValue::from_bytes(h.value)
                    .map_err(|_| Error::Parse("invalid header value"))?;
                map.append(name.clone(), value);
            }
        }
        self.buf.advance(len);
        if encoded && (length.is_some() || version == Version::HTTP_10) {
            // Both framings, or chunking in HTTP/1.0: read it, but don't trust the connection
            // with another request (RFC 9112 6.1, 6.3).
            close = true;
        }
        let framing = if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            Framing::Length(0)
        } else if encoded {
            // Transfer-Encoding wins over Content-Length (RFC 9112 6.3).
            if chunked {
                Framing::Chunked(Chunked::Size)
            } else {
                Framing::Close
            }
        } else {
            match length {
                Some(n) => Framing::Length(n),
                None => Framing::Close,
            }
        };
        Ok(Some(Head {
            status,
            version,
            headers: map,
            framing,
            close,
        }))
    }

    fn into_response(self, head: Head) -> Response<Body<T>> {
        let keep_alive = !head.close && !matches!(head.framing, Framing::Close);
        let mut body = Body {
            conn: Some(self),
            framing: head.framing,
            keep_alive,
            done: false,
        };
        body.check_done();
        let mut resp = Response::new(body);
        *resp.status_mut() = head.status;
        *resp.version_mut() = head.version;
        *resp.headers_mut() = head.headers;
        resp
    }
}

/// `io`'s output, or [`Error::TimedOut`] once `timer` (if any) has fired first. The timer is
/// polled only when `io` isn't ready.
async fn before<F: Future>(timer: &mut Option<Pin<Box<Sleep>>>, io: F) -> Result<F::Output, Error> {
    let mut io = std::pin::pin!(io);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = io.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        match timer {
            // Outside tokio's cooperative budget: a socket that stays ready spends the budget,
            // and a budgeted timer would then not see its deadline until the socket waits (as
            // `tokio::time::Timeout` also does it).
            Some(t) => Pin::new(&mut tokio::task::unconstrained(t.as_mut()))
                .poll(cx)
                .map(|()| Err(Error::TimedOut)),
            None => Poll::Pending,
        }
    })
    .await
}

/// Writes the request line and headers, with `Content-Length` for `body_len`.
fn write_head(out: &mut Vec<u8>, parts: &http::request::Parts, body_len: usize) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        // The framing is this module's to say.
        if name == http::header::CONTENT_LENGTH
            || name == http::header::TRANSFER_ENCODING
            || name == http::header::CONNECTION
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let bodiless = matches!(
        parts.method,
        http::Method::GET | http::Method::HEAD | http::Method::DELETE | http::Method::OPTIONS
    );
    if body_len > 0 || !bodiless {
        write_content_length(out, body_len);
    }
    out.extend_from_slice(b"\r\n");
}

fn write_content_length(out: &mut Vec<u8>, len: usize) {
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The request line and headers of a `POST`, written once (per deployment endpoint and API, when
/// a config is loaded) instead of per request: no header map is built, filled and walked for
/// every request. It can hold a credential (`Authorization`), so `Debug` shows none of it.
#[derive(Clone)]
pub(crate) struct RequestHead(Bytes);

impl RequestHead {
    /// `POST path_and_query HTTP/1.1` and `headers`, without `Content-Length` (added per
    /// request) and without the blank line that ends the head.
    pub(crate) fn post<'a>(
        path_and_query: &str,
        headers: impl IntoIterator<Item = (&'a HeaderName, &'a HeaderValue)>,
    ) -> Self {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(b"POST ");
        out.extend_from_slice(path_and_query.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in headers {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Self(Bytes::from(out))
    }
}

impl std::fmt::Debug for RequestHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestHead(..)")
    }
}

/// Makes room for a read.
fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_SIZE / 4 {
        buf.reserve(READ_SIZE);
    }
}

struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    close: bool,
}

/// How the body's end is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// This many bytes are left.
    Length(u64),
    /// Chunked, in this state.
    Chunked(Chunked),
    /// Until the upstream closes the connection.
    Close,
}

/// Where a chunked body's decoder is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk, expecting trailer lines or the final empty line.
    Trailers,
    /// The body is complete.
    Done,
}

/// Decodes as much of a chunked body from the start of `buf` as is there, moving the data
/// bytes to the front of `buf` in place. Returns how many bytes of `buf` were consumed and
/// how many data bytes now start it (`data <= consumed`).
fn decode_chunked(buf: &mut [u8], state: &mut Chunked) -> Result<(usize, usize), Error> {
    let mut pos = 0;
    let mut data = 0;
    loop {
        match *state {
            Chunked::Done => break,
            Chunked::Size => {
                let Some(lf) = memchr::memchr(b'\n', &buf[pos..]) else {
                    if buf.len() - pos > MAX_LINE {
                        return Err(Error::Parse("chunk size line too long"));
                    }
                    break;
                };
                let line = &buf[pos..pos + lf];
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                // Extensions (`;name=value`) are ignored.
                let hex = line
                    .split(|b| *b == b';')
                    .next()
                    .unwrap_or_default()
                    .trim_ascii();
                if hex.is_empty() || hex.len() > 15 {
                    return Err(Error::Parse("invalid chunk size"));
                }
                let mut size = 0u64;
                for &b in hex {
                    let d = (b as char)
                        .to_digit(16)
                        .ok_or(Error::Parse("invalid chunk size"))?;
                    size = size * 16 + u64::from(d);
                }
                pos += lf + 1;
                *state = if size == 0 {
                    Chunked::Trailers
                } else {
                    Chunked::Data(size)
                };
            }
            Chunked::Data(left) => {
                let n = (buf.len() - pos).min(usize::try_from(left).unwrap_or(usize::MAX));
                if n == 0 {
                    break;
                }
                if pos != data {
                    buf.copy_within(pos..pos + n, data);
                }
                pos += n;
                data += n;
                let left = left - n as u64;
                *state = if left == 0 {
                    Chunked::DataEnd
                } else {
                    Chunked::Data(left)
                };
            }
            Chunked::DataEnd => {
                let rest = &buf[pos..];
                if rest.starts_with(b"\r\n") {
                    pos += 2;
                } else if rest.starts_with(b"\n") {
                    pos += 1;
                } else if rest.is_empty() || rest == b"\r" {
                    break;
                } else {
                    return Err(Error::Parse("chunk data not followed by CRLF"));
                }
                *state = Chunked::Size;
            }
            Chunked::Trailers => {
                let Some(lf) = memchr::memchr(b'\n', &buf[pos..]) else {
                    if buf.len() - pos > MAX_LINE {
                        return Err(Error::Parse("trailer line too long"));
                    }
                    break;
                };
                let line = &buf[pos..pos + lf];
                pos += lf + 1;
                if line.is_empty() || line == b"\r" {
                    *state = Chunked::Done;
                }
            }
        }
    }
    Ok((pos, data))
}

/// A response body read straight from its connection. Dropped before its end, it closes the
/// connection (which is how an upstream learns the client went away).
pub struct Body<T> {
    conn: Option<Conn<T>>,
    framing: Framing,
    keep_alive: bool,
    done: bool,
}

impl<T> Body<T> {
    fn check_done(&mut self) {
        if matches!(
            self.framing,
            Framing::Length(0) | Framing::Chunked(Chunked::Done)
        ) {
            self.done = true;
        }
    }

    /// The connection, once the body has been read to the end, when it can carry another
    /// request.
    pub fn take_reusable(&mut self) -> Option<Conn<T>> {
        if !self.done || !self.keep_alive {
            return None;
        }
        self.conn.take().filter(|c| c.buf.is_empty())
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Body<T> {
    /// Reads more from the socket into the buffer; `Ok(0)` at the end of the stream.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        reserve(&mut conn.buf);
        let read = std::pin::pin!(conn.io.read_buf(&mut conn.buf));
        read.poll(cx)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> http_body::Body for Body<T> {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let buf = &mut conn.buf;
            match &mut this.framing {
                Framing::Length(left) => {
                    if !buf.is_empty() {
                        let n = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                        *left -= n as u64;
                        let data = buf.split_to(n).freeze();
                        this.check_done();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Framing::Chunked(state) => {
                    if !buf.is_empty() {
                        let (used, data) = match decode_chunked(buf, state) {
                            Ok(r) => r,
                            Err(e) => {
                                this.conn = None;
                                return Poll::Ready(Some(Err(e)));
                            }
                        };
                        let out = if data > 0 {
                            let mut out = buf.split_to(used);
                            out.truncate(data);
                            Some(out.freeze())
                        } else {
                            buf.advance(used);
                            None
                        };
                        this.check_done();
                        if let Some(out) = out {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                        if this.done {
                            return Poll::Ready(None);
                        }
                    }
                }
                Framing::Close => {
                    if !buf.is_empty() {
                        let data = buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
            }
            match ready!(this.poll_read(cx)) {
                Ok(0) => {
                    this.conn = None;
                    if this.framing == Framing::Close {
                        this.done = true;
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(Error::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the upstream closed the connection inside the response body",
                    )))));
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(Error::Io(e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn decode_all(input: &[u8], step: usize) -> Result<(Vec<u8>, usize), Error> {
        // Feeds `input` `step` bytes at a time, as reads would, keeping what wasn't consumed.
        let mut state = Chunked::Size;
        let mut pending: Vec<u8> = Vec::new();
        let mut out = Vec::new();
        let mut fed = 0;
        while fed < input.len() && state != Chunked::Done {
            let end = (fed + step).min(input.len());
            pending.extend_from_slice(&input[fed..end]);
            fed = end;
            let (used, data) = decode_chunked(&mut pending, &mut state)?;
            out.extend_from_slice(&pending[..data]);
            pending.drain(..used);
        }
        assert_eq!(state, Chunked::Done, "body incomplete");
        Ok((out, pending.len() + input.len() - fed))
    }

    #[test]
    fn chunked_bodies_decode_however_they_are_split() {
        let body =
            b"5\r\nhello\r\n1;ext=1\r\n \r\nB\r\nworld, wide\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for step in 1..body.len() {
            let (data, rest) = decode_all(body, step).unwrap();
            assert_eq!(data, b"hello world, wide", "step {step}");
            // What follows the body is left alone.
            assert!(rest <= 4, "step {step}");
        }
        let (data, rest) = decode_all(b"0\r\n\r\n", 64).unwrap();
        assert!(data.is_empty());
        assert_eq!(rest, 0);
        // Bare LF line ends are accepted.
        let (data, _) = decode_all(b"3\nabc\n0\n\n", 64).unwrap();
        assert_eq!(data, b"abc");
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for bad in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"ffffffffffffffff\r\n",
        ] {
            let mut state = Chunked::Size;
            let mut buf = bad.to_vec();
            assert!(
                decode_chunked(&mut buf, &mut state).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut state = Chunked::Size;
        let mut long = vec![b'1'; MAX_LINE + 10];
        assert!(decode_chunked(&mut long, &mut state).is_err());
    }

    /// An upstream that reads the request, works on it and then ends the connection without an
    /// answer: the request is not one to send again (the upstream may have billed it); one that
    /// ends the connection at once is (it closed for idleness as the request arrived).
    #[tokio::test]
    async fn a_connection_that_ends_while_the_upstream_works_is_not_sent_again() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let mut got = vec![0u8; 4096];
            let _ = server.read(&mut got).await;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        });
        let Err(e) = Conn::new(client).send(post("{}")).await else {
            panic!("an answer from an upstream that sent none");
        };
        assert!(
            matches!(e, Error::ClosedAfterWrite(_)) && !e.is_closed(),
            "{e:?}"
        );
    }

    /// Sends a request over an in-memory pipe whose other end answers `answer`; returns what
    /// the upstream received, the response and its body (or the error), and whether the
    /// connection came back reusable.
    async fn exchange(
        req: Request<Bytes>,
        answer: &'static [u8],
        close_after: bool,
    ) -> (
        Vec<u8>,
        Result<(Response<()>, Result<Bytes, Error>, bool), Error>,
    ) {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let upstream = tokio::spawn(async move {
            let mut got = vec![0u8; 4096];
            let n = server.read(&mut got).await.unwrap();
            got.truncate(n);
            server.write_all(answer).await.unwrap();
            (got, (!close_after).then_some(server))
        });
        let result = Conn::new(client).send(req).await;
        let result = match result {
            Ok(resp) => {
                let (parts, mut body) = resp.into_parts();
                let mut data = BytesMut::new();
                let mut err = None;
                while let Some(f) = body.frame().await {
                    match f {
                        Ok(f) => data.extend_from_slice(&f.into_data().unwrap()),
                        Err(e) => {
                            err = Some(e);
                            break;
                        }
                    }
                }
                let reusable = body.take_reusable().is_some();
                let body = match err {
                    Some(e) => Err(e),
                    None => Ok(data.freeze()),
                };
                Ok((Response::from_parts(parts, ()), body, reusable))
            }
            Err(e) => Err(e),
        };
        let (got, _server) = upstream.await.unwrap();
        (got, result)
    }

    fn post(body: &'static str) -> Request<Bytes> {
        let mut req = Request::new(Bytes::from_static(body.as_bytes()));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = "/v1/chat/completions?x=1".parse().unwrap();
        req.headers_mut()
            .insert(http::header::HOST, HeaderValue::from_static("up:8000"));
        req.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        req
    }

    /// A connection that goes idle in a pool can let go of its read buffer; one with unread
    /// bytes keeps them.
    #[tokio::test]
    async fn an_idle_connection_lets_go_of_its_read_buffer() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let conn = Conn::new(client);
        let upstream = tokio::spawn(async move {
            let mut got = vec![0u8; 4096];
            let _ = server.read(&mut got).await.unwrap();
            server
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            server
        });
        let resp = conn.send(post("{}")).await.unwrap();
        let mut body = resp.into_body();
        while let Some(f) = body.frame().await {
            f.unwrap();
        }
        let mut conn = body.take_reusable().expect("reusable");
        assert!(conn.buf.is_empty() && conn.buf.capacity() > 0);
        conn.release_buffer();
        assert_eq!(conn.buf.capacity(), 0);
        conn.buf.extend_from_slice(b"HTTP/1.1");
        conn.release_buffer();
        assert_eq!(&conn.buf[..], b"HTTP/1.1");
        drop(upstream.await.unwrap());
    }

    #[tokio::test]
    async fn a_prebuilt_head_goes_out_as_send_would_write_it_and_hides_its_credential() {
        let req = post("{\"a\":1}");
        let head = RequestHead::post("/v1/chat/completions?x=1", req.headers());
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let upstream = tokio::spawn(async move {
            let mut got = vec![0u8; 4096];
            let n = server.read(&mut got).await.unwrap();
            got.truncate(n);
            server
                .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .unwrap();
            got
        });
        let resp = Conn::new(client)
            .send_with_head(&head, req.body().clone(), None)
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        let (via_send, _) =
            exchange(post("{\"a\":1}"), b"HTTP/1.1 204 No Content\r\n\r\n", true).await;
        assert_eq!(upstream.await.unwrap(), via_send);

        let secret = HeaderValue::from_static("Bearer sk-upstream-secret");
        let head = RequestHead::post("/x", [(&http::header::AUTHORIZATION, &secret)]);
        assert!(!format!("{head:?}").contains("sk-upstream"));
    }

    #[tokio::test]
    async fn a_request_goes_out_as_http_1_1_with_its_length() {
        let (got, result) = exchange(
            post("{\"a\":1}"),
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            false,
        )
        .await;
        assert_eq!(
            String::from_utf8(got).unwrap(),
            "POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: up:8000\r\ncontent-type: application/json\r\ncontent-length: 7\r\n\r\n{\"a\":1}"
        );
        let (resp, body, reusable) = result.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(&body.unwrap()[..], b"ok");
        assert!(reusable);
    }

    #[tokio::test]
    async fn only_the_headers_the_gateway_reads_are_kept() {
        let (_, r) = exchange(
            post("{}"),
            b"HTTP/1.1 429 Too Many Requests\r\nDate: Tue, 01 Dec 2026 10:00:00 GMT\r\nContent-Type: application/json\r\nRetry-After: 3\r\nX-Request-Id: req-1\r\nopenai-processing-ms: 7\r\nContent-Length: 2\r\n\r\n{}",
            false,
        )
        .await;
        let (resp, body, _) = r.unwrap();
        let names: Vec<&str> = resp.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type", "retry-after"]);
        assert_eq!(resp.headers()["retry-after"], "3");
        assert_eq!(&body.unwrap()[..], b"{}");
    }

    #[tokio::test]
    async fn responses_are_framed_by_length_chunks_or_close() {
        // Chunked, with a 100 Continue before it and headers kept.
        let (_, r) = exchange(
            post("{}"),
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n6\r\ndata: \r\n2\r\nx\n\r\n0\r\n\r\n",
            false,
        )
        .await;
        let (resp, body, reusable) = r.unwrap();
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        // This hop's framing is not passed on.
        assert!(!resp.headers().contains_key("transfer-encoding"));
        assert_eq!(&body.unwrap()[..], b"data: x\n");
        assert!(reusable);
        // Read to the close: never reused.
        let (_, r) = exchange(post("{}"), b"HTTP/1.1 200 OK\r\n\r\nuntil close", true).await;
        let (_, body, reusable) = r.unwrap();
        assert_eq!(&body.unwrap()[..], b"until close");
        assert!(!reusable);
        // Connection: close is honoured; HTTP/1.0 closes unless it says keep-alive.
        let (_, r) = exchange(
            post("{}"),
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\nx",
            false,
        )
        .await;
        assert!(!r.unwrap().2);
        let (_, r) = exchange(
            post("{}"),
            b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\nx",
            false,
        )
        .await;
        assert!(!r.unwrap().2);
        let (_, r) = exchange(
            post("{}"),
            b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\ncontent-length: 1\r\n\r\nx",
            false,
        )
        .await;
        assert!(r.unwrap().2);
        // Chunked with a Content-Length too: read as chunked, never reused.
        let (_, r) = exchange(
            post("{}"),
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 99\r\n\r\n1\r\nx\r\n0\r\n\r\n",
            false,
        )
        .await;
        let (_, body, reusable) = r.unwrap();
        assert_eq!(&body.unwrap()[..], b"x");
        assert!(!reusable);
        // 204 has no body whatever it says.
        let (_, r) = exchange(
            post("{}"),
            b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n",
            false,
        )
        .await;
        let (resp, body, reusable) = r.unwrap();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        assert!(body.unwrap().is_empty());
        assert!(reusable);
    }

    #[tokio::test]
    async fn broken_answers_are_errors_of_their_kind() {
        // Nothing at all, at once after the request was written: closed as it arrived, so a
        // reused connection's request may go out again.
        let (_, r) = exchange(post("{}"), b"", true).await;
        assert!(r.unwrap_err().is_closed());
        // Garbage is a parse error, not "closed".
        let (_, r) = exchange(post("{}"), b"SSH-2.0-OpenSSH\r\n\r\n", true).await;
        assert!(matches!(r.unwrap_err(), Error::Parse(_)));
        let (_, r) = exchange(post("{}"), b"HTTP/1.1 200 OK\r\ncontent-le", true).await;
        assert!(matches!(r.unwrap_err(), Error::Parse(_)));
        let (_, r) = exchange(
            post("{}"),
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nxx",
            true,
        )
        .await;
        assert!(matches!(r.unwrap_err(), Error::Parse(_)));
        let (_, r) = exchange(
            post("{}"),
            b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nxx",
            true,
        )
        .await;
        assert!(matches!(r.unwrap_err(), Error::Parse(_)));
        // A body cut short is an error, and the connection is gone.
        let (_, r) = exchange(
            post("{}"),
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
            true,
        )
        .await;
        let (_, body, reusable) = r.unwrap();
        assert!(body.is_err());
        assert!(!reusable);
        let (_, r) = exchange(
            post("{}"),
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
            true,
        )
        .await;
        assert!(r.unwrap().1.is_err());
    }

    /// A connection's first request (answered, deadline `first` s), `idle` s without a
    /// request, and its second (never answered, deadline `second` s; all from the start):
    /// when the second timed out.
    async fn second_request_times_out_at(
        first: u64,
        idle: u64,
        second: u64,
    ) -> std::time::Duration {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let host = HeaderValue::from_static("up");
        let head = RequestHead::post("/x", [(&http::header::HOST, &host)]);
        let upstream = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            assert!(server.read(&mut buf).await.unwrap() > 0);
            server
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            // Reads the second request and never answers it.
            while server.read(&mut buf).await.unwrap() > 0 {}
        });
        let t0 = Instant::now();
        let secs = std::time::Duration::from_secs;
        let resp = Conn::new(client)
            .send_with_head(&head, Bytes::from_static(b"{}"), Some(t0 + secs(first)))
            .await
            .unwrap();
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            frame.unwrap();
        }
        let conn = body.take_reusable().expect("the connection is reusable");
        assert!(
            conn.timer.is_some(),
            "the timer comes back with the connection"
        );
        tokio::time::sleep(secs(idle)).await;
        let err = conn
            .send_with_head(&head, Bytes::from_static(b"{}"), Some(t0 + secs(second)))
            .await
            .err()
            .expect("the second request is never answered");
        assert!(matches!(err, Error::TimedOut), "{err:?}");
        let at = t0.elapsed();
        upstream.await.unwrap();
        at
    }

    #[tokio::test(start_paused = true)]
    async fn the_head_deadline_moves_with_each_request_on_a_connection() {
        let secs = std::time::Duration::from_secs;
        let ms = std::time::Duration::from_millis;
        let near = |at: std::time::Duration, want: u64| at >= secs(want) && at < secs(want) + ms(5);
        // Later than the first request's deadline: not at the first's 10 s, but at 20 s.
        let at = second_request_times_out_at(10, 0, 20).await;
        assert!(near(at, 20), "{at:?}");
        // Earlier than the first's: at 5 s, not at 30 s.
        let at = second_request_times_out_at(30, 0, 5).await;
        assert!(near(at, 5), "{at:?}");
        // The first's timer fired while the connection was idle: the second still gets its
        // whole time.
        let at = second_request_times_out_at(10, 15, 35).await;
        assert!(near(at, 35), "{at:?}");
    }

    /// A request without a deadline on a connection that keeps an earlier request's timer:
    /// the timer fires during it and is not looked at.
    #[tokio::test(start_paused = true)]
    async fn a_request_without_a_deadline_ignores_the_kept_timer() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let host = HeaderValue::from_static("up");
        let head = RequestHead::post("/x", [(&http::header::HOST, &host)]);
        let upstream = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            for wait in [0, 5] {
                assert!(server.read(&mut buf).await.unwrap() > 0);
                tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
                server
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .unwrap();
            }
        });
        let by = Instant::now() + std::time::Duration::from_secs(1);
        let resp = Conn::new(client)
            .send_with_head(&head, Bytes::from_static(b"{}"), Some(by))
            .await
            .unwrap();
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            frame.unwrap();
        }
        let conn = body.take_reusable().expect("reusable");
        let resp = conn.send(post("{}")).await.expect("answered after 5 s");
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(Instant::now() >= by + std::time::Duration::from_secs(4));
        upstream.await.unwrap();
    }

    /// `100 Continue` then nothing: the deadline still holds; and an endless run of 1xx
    /// responses is refused.
    #[tokio::test(start_paused = true)]
    async fn interim_responses_neither_stop_the_deadline_nor_go_on_forever() {
        let host = HeaderValue::from_static("up");
        let head = RequestHead::post("/x", [(&http::header::HOST, &host)]);
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let upstream = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            assert!(server.read(&mut buf).await.unwrap() > 0);
            server
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .unwrap();
            server
        });
        let by = Instant::now() + std::time::Duration::from_secs(2);
        let err = Conn::new(client)
            .send_with_head(&head, Bytes::from_static(b"{}"), Some(by))
            .await
            .err()
            .expect("no real answer");
        assert!(matches!(err, Error::TimedOut), "{err:?}");
        assert_eq!(Instant::now(), by);
        drop(upstream.await.unwrap());

        let flood = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(MAX_INTERIM + 1);
        let (client, mut server) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            assert!(server.read(&mut buf).await.unwrap() > 0);
            server.write_all(&flood).await.unwrap();
            server
        });
        let err = Conn::new(client)
            .send_with_head(
                &head,
                Bytes::from_static(b"{}"),
                Some(by + std::time::Duration::from_secs(60)),
            )
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(err, Error::Parse(m) if m.contains("interim")),
            "{err:?}"
        );
    }

    /// An upstream that doesn't read a large request body: the deadline also bounds the write.
    #[tokio::test(start_paused = true)]
    async fn the_head_deadline_bounds_a_stuck_write() {
        let (client, _server) = tokio::io::duplex(1024);
        let host = HeaderValue::from_static("up");
        let head = RequestHead::post("/x", [(&http::header::HOST, &host)]);
        let by = Instant::now() + std::time::Duration::from_secs(3);
        let err = Conn::new(client)
            .send_with_head(&head, Bytes::from(vec![b'x'; 64 << 10]), Some(by))
            .await
            .err()
            .expect("the body can't be written");
        assert!(matches!(err, Error::TimedOut), "{err:?}");
        assert_eq!(Instant::now(), by);
    }

    /// An upstream on real TCP that reads the request head, answers `answer` (if any) and
    /// closes with the body unread, which makes the kernel reset the connection and the body's
    /// write fail. Returns what sending a 32 MiB body to it gives.
    async fn send_big_body_to_a_closer(
        answer: Option<&'static [u8]>,
    ) -> Result<Response<Body<tokio::net::TcpStream>>, Error> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed before the head");
                head.extend_from_slice(&buf[..n]);
            }
            if let Some(a) = answer {
                s.write_all(a).await.unwrap();
            }
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut req = post("");
        *req.body_mut() = Bytes::from(vec![b'x'; 32 << 20]);
        let result = Conn::new(tcp).send(req).await;
        upstream.await.unwrap();
        result
    }

    #[tokio::test]
    async fn an_early_answer_to_a_body_never_read_comes_back() {
        const ANSWER: &[u8] = b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\ncontent-length: 26\r\n\r\n{\"error\":\"body too large\"}";
        let resp = send_big_body_to_a_closer(Some(ANSWER))
            .await
            .expect("the upstream's answer, not a failed connection");
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let mut body = resp.into_body();
        let mut data = BytesMut::new();
        while let Some(f) = body.frame().await {
            data.extend_from_slice(&f.expect("the answer's body").into_data().unwrap());
        }
        assert_eq!(&data[..], b"{\"error\":\"body too large\"}");
        assert!(
            body.take_reusable().is_none(),
            "a reset connection is not reused"
        );

        // Without an answer it is a closed connection, as before (a pooled one is then sent
        // again on a new connection).
        let err = send_big_body_to_a_closer(None)
            .await
            .err()
            .expect("no answer");
        assert!(err.is_closed(), "{err:?}");
    }

    #[tokio::test]
    async fn a_get_has_no_content_length() {
        let mut req = Request::new(Bytes::new());
        *req.uri_mut() = "/metrics".parse().unwrap();
        req.headers_mut()
            .insert(http::header::HOST, HeaderValue::from_static("up"));
        let (got, r) = exchange(req, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", false).await;
        assert_eq!(
            String::from_utf8(got).unwrap(),
            "GET /metrics HTTP/1.1\r\nhost: up\r\n\r\n"
        );
        assert!(r.unwrap().2);
    }
}
