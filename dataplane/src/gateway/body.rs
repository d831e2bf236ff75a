//! Reading the client's request body: bounded in size and in time, and not copied when it
//! arrived in one piece.

use crate::api::error::{ApiError, Result};
use bytes::Bytes;
use http::{HeaderMap, header};

/// The answer to a request whose body didn't arrive within the body-read timeout.
pub(crate) fn body_timed_out() -> ApiError {
    crate::telemetry::timed_out("body_read");
    ApiError::request_timeout(
        "The request body did not arrive within the gateway's body-read timeout.",
    )
}

/// Reads the request body, refusing more than `limit` bytes, or one that takes longer than
/// `timeout` (counted from the first time the body has nothing ready, so a body that is there
/// whole, as the HTTP/1.1 server gives it, costs no timer).
pub(super) async fn read_body<B>(
    headers: &HeaderMap,
    body: B,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Bytes>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    match read_all(body, limit, Some(timeout)).await {
        Ok(bytes) => Ok(bytes),
        Err(ReadError::TooLarge) => Err(ApiError::too_large(limit)),
        Err(ReadError::TimedOut) => Err(body_timed_out()),
        Err(ReadError::Read) => Err(ApiError::bad_request(
            "body_read_error",
            "The request body could not be read.",
        )),
    }
}

/// Why a body could not be read whole.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ReadError {
    /// It is longer than the limit.
    TooLarge,
    /// The body failed (the connection broke, a timeout, bad framing).
    Read,
    /// It took longer than the body-read timeout.
    TimedOut,
}

/// Reads a whole body of at most `limit` bytes.
///
/// A body that arrives as one data frame (the usual case: it came in the same read as its
/// head) is returned as that frame, without a copy; more frames are joined into one buffer.
/// `http_body_util`'s `collect` queues every frame and keeps trailers, which neither body the
/// gateway reads whole needs: that was an allocation and a pass over the frames per request.
pub(super) async fn read_all<B>(
    body: B,
    limit: usize,
    timeout: Option<std::time::Duration>,
) -> Result<Bytes, ReadError>
where
    B: http_body::Body<Data = Bytes>,
{
    let mut body = std::pin::pin!(body);
    let mut first: Option<Bytes> = None;
    let mut joined: Option<bytes::BytesMut> = None;
    let mut total = 0usize;
    // Armed the first time the body has nothing ready, never disarmed: a total.
    let mut deadline = crate::rt::deadline::Deadline::default();
    loop {
        let frame = std::future::poll_fn(|cx| {
            let polled = body.as_mut().poll_frame(cx);
            if let (true, Some(timeout)) = (polled.is_pending(), timeout) {
                deadline.arm(timeout);
                if deadline.poll_passed(cx) {
                    return std::task::Poll::Ready(Err(ReadError::TimedOut));
                }
            }
            polled.map(Ok)
        })
        .await?;
        let Some(frame) = frame else { break };
        let Ok(data) = frame.map_err(|_| ReadError::Read)?.into_data() else {
            continue; // trailers: not needed
        };
        total += data.len();
        if total > limit {
            return Err(ReadError::TooLarge);
        }
        if let Some(buf) = joined.as_mut() {
            buf.extend_from_slice(&data);
        } else if let Some(head) = first.take() {
            let mut buf = bytes::BytesMut::with_capacity(total.max(2 * head.len()));
            buf.extend_from_slice(&head);
            buf.extend_from_slice(&data);
            joined = Some(buf);
        } else {
            first = Some(data);
        }
    }
    Ok(joined
        .map(bytes::BytesMut::freeze)
        .or(first)
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A body that hands over the given frames, one per poll, each after a `Pending`.
    struct Frames(VecDeque<Result<Bytes, std::io::Error>>, bool);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
            self.1 = !self.1;
            if self.1 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(self.0.pop_front().map(|r| r.map(http_body::Frame::data)))
        }
    }

    fn frames(parts: &[&'static str]) -> Frames {
        Frames(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p.as_bytes())))
                .collect(),
            false,
        )
    }

    #[tokio::test]
    async fn a_body_is_read_whole_and_a_single_frame_is_not_copied() {
        let one = Bytes::from_static(b"{\"model\":\"m\"}");
        let got = read_all(Frames(VecDeque::from([Ok(one.clone())]), false), 100, None)
            .await
            .expect("read");
        assert_eq!(got.as_ptr(), one.as_ptr(), "the frame itself, not a copy");
        let got = read_all(frames(&["ab", "", "cde", "f"]), 6, None).await;
        assert_eq!(got, Ok(Bytes::from_static(b"abcdef")));
        assert_eq!(read_all(frames(&[]), 6, None).await, Ok(Bytes::new()));
    }

    #[tokio::test]
    async fn a_body_over_the_limit_or_broken_is_refused() {
        assert_eq!(
            read_all(frames(&["abc", "defg"]), 6, None).await,
            Err(ReadError::TooLarge)
        );
        let broken = Frames(
            VecDeque::from([
                Ok(Bytes::from_static(b"abc")),
                Err(std::io::Error::other("reset")),
            ]),
            false,
        );
        assert_eq!(read_all(broken, 6, None).await, Err(ReadError::Read));
    }
}
