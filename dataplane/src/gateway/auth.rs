//! Virtual-key authentication: the key from `Authorization: Bearer` or `x-api-key`, looked up by
//! its SHA-256. Keys are never stored or compared in the clear, and never logged or echoed.

use crate::api::error::ApiError;
use crate::config::snapshot::{RuntimeKey, Snapshot};
use http::HeaderMap;
use std::sync::Arc;
use subtle::ConstantTimeEq;
use tollgate_crds::config::KeyHash;

/// `x-api-key`, the key as Anthropic's SDKs send it.
pub(crate) const API_KEY: http::HeaderName = http::HeaderName::from_static("x-api-key");

/// The key the client sent, if any, as its bytes: they are only hashed, so they aren't checked
/// to be text first (a key that isn't printable ASCII matches no key and gets the same 401).
pub(crate) fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    tollgate_crds::admin::presented_key(
        headers
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
        headers.get(API_KEY).map(|v| v.as_bytes()),
    )
}

/// The virtual key of a request, or a 401.
pub(crate) fn authenticate(
    snapshot: &Snapshot,
    headers: &HeaderMap,
    now_unix: i64,
) -> Result<Arc<RuntimeKey>, ApiError> {
    let Some(presented) = presented_key(headers) else {
        return Err(ApiError::unauthorized(
            "missing_api_key",
            "You didn't provide an API key. Send it as `Authorization: Bearer <key>` (or `x-api-key: <key>`).",
        ));
    };
    let hash = KeyHash::of(presented);
    let key = snapshot
        .keys
        .get(&hash)
        // The map lookup already matched the hash; comparing again in constant time keeps the
        // final decision free of early-exit timing whatever the map does internally.
        .filter(|k| bool::from(k.config.hash.0.ct_eq(&hash.0)))
        .ok_or_else(|| ApiError::unauthorized("invalid_api_key", "Incorrect API key provided."))?;
    if key.config.expires_at.is_some_and(|t| t <= now_unix) {
        return Err(ApiError::unauthorized(
            "key_expired",
            "This API key has expired.",
        ));
    }
    Ok(key.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn reads_bearer_then_x_api_key() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h), None);
        h.insert("x-api-key", HeaderValue::from_static("k2"));
        assert_eq!(presented_key(&h), Some(&b"k2"[..]));
        h.insert("authorization", HeaderValue::from_static("bearer  k1 "));
        assert_eq!(presented_key(&h), Some(&b"k1"[..]));
        h.insert("authorization", HeaderValue::from_static("Basic abc"));
        assert_eq!(presented_key(&h), Some(&b"k2"[..]));
        h.insert("authorization", HeaderValue::from_static("Bearer"));
        assert_eq!(presented_key(&h), Some(&b"k2"[..]));
        h.insert("authorization", HeaderValue::from_static("BEARER\tk3"));
        assert_eq!(
            presented_key(&h),
            Some(&b"k2"[..]),
            "the scheme ends at a space"
        );
        h.remove("x-api-key");
        h.insert("authorization", HeaderValue::from_static("Bearer   "));
        assert_eq!(presented_key(&h), None);
    }
}
