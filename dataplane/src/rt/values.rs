//! Response header values made per request (request ids, costs, rate-limit counts), cut from a
//! per-thread buffer.
//!
//! A `HeaderValue` holds `Bytes`. Made the usual way (`from_bytes`, `From<u64>`), every value is
//! an allocation of its own, and its first clone (the request id is also kept for the usage
//! record) another. Cut from a per-thread 4 KiB chunk, a value costs a copy and a reference
//! count on the chunk (only this thread touches it while it is current), and a clone another
//! count. A chunk is freed when the last value cut from it is dropped, so a value kept long (a
//! long stream's request id) keeps its chunk alive: 4 KiB at most per such request.

use bytes::BytesMut;
use http::HeaderValue;
use std::cell::RefCell;

/// Size of the chunks values are cut from.
const CHUNK: usize = 4 << 10;

thread_local! {
    static CURRENT: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// A header value of `bytes`; `None` if they aren't one (control characters).
pub(crate) fn header_value(bytes: &[u8]) -> Option<HeaderValue> {
    let cut = CURRENT.with_borrow_mut(|chunk| {
        if chunk.capacity() < bytes.len() {
            *chunk = BytesMut::with_capacity(CHUNK.max(bytes.len()));
        }
        chunk.extend_from_slice(bytes);
        chunk.split().freeze()
    });
    HeaderValue::from_maybe_shared(cut).ok()
}

/// A header value of the decimal `n`.
pub(crate) fn number(n: u64) -> HeaderValue {
    header_value(itoa::Buffer::new().format(n).as_bytes()).unwrap_or_else(|| HeaderValue::from(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_survive_their_chunk_being_replaced() {
        let values: Vec<(String, HeaderValue)> = (0..3000u64)
            .map(|i| {
                let s = format!("req-{i:016x}");
                let v = header_value(s.as_bytes()).expect("valid");
                (s, v)
            })
            .collect();
        // 3000 × 20 bytes span several 4 KiB chunks.
        for (s, v) in &values {
            assert_eq!(v.as_bytes(), s.as_bytes());
        }
        let copy = values[10].1.clone();
        drop(values);
        assert_eq!(copy, "req-000000000000000a");
    }

    #[test]
    fn numbers_and_invalid_values() {
        assert_eq!(number(0), "0");
        assert_eq!(number(u64::MAX), "18446744073709551615");
        assert!(header_value(b"bad\nvalue").is_none());
        let big = vec![b'x'; 3 * CHUNK];
        assert_eq!(header_value(&big).expect("valid").len(), 3 * CHUNK);
    }
}
