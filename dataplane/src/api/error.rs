//! The one place errors become HTTP responses: OpenAI's error body
//! `{"error":{"message","type","param","code"}}` with the right status.
//!
//! An error knows where it came from ([`ErrorSource`]), which routing will use to decide on
//! retries and fallbacks; it never decides on message text.

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use std::borrow::Cow;

/// Where a failure came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ErrorSource {
    /// The client's request is wrong; retrying elsewhere won't help.
    Client,
    /// The upstream failed or misbehaved; another deployment may succeed.
    Upstream,
    /// Tollgate itself.
    Internal,
}

/// An error returned to the client.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub(crate) status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, ...
    pub(crate) kind: &'static str,
    /// Machine-readable `code`; also the metric label.
    pub(crate) code: &'static str,
    /// What happened and, where it helps, what to do.
    pub(crate) message: Cow<'static, str>,
    /// Where it came from.
    pub(crate) source: ErrorSource,
    /// Seconds for a `retry-after` header.
    pub(crate) retry_after: Option<u64>,
}

/// Result with [`ApiError`].
pub(crate) type Result<T, E = ApiError> = std::result::Result<T, E>;

impl ApiError {
    fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<Cow<'static, str>>,
        source: ErrorSource,
    ) -> Self {
        Self {
            status,
            kind,
            code,
            message: message.into(),
            source,
            retry_after: None,
        }
    }

    /// 400: the request is malformed.
    pub(crate) fn bad_request(code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
            ErrorSource::Client,
        )
    }

    /// 401: no key, or a key we don't know.
    pub(crate) fn unauthorized(code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            code,
            message,
            ErrorSource::Client,
        )
    }

    /// 403: the key may not use this model.
    pub(crate) fn forbidden(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "model_not_allowed",
            message,
            ErrorSource::Client,
        )
    }

    /// 404: no such model.
    pub(crate) fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!(
                "The model `{model}` does not exist or you do not have access to it. GET /v1/models lists the models this key can use."
            ),
            ErrorSource::Client,
        )
    }

    /// 408: the client took longer than the gateway waits to send its request.
    pub(crate) fn request_timeout(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            message,
            ErrorSource::Client,
        )
    }

    /// 413: the body is larger than the limit.
    pub(crate) fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("The request body is larger than the gateway's limit of {limit} bytes."),
            ErrorSource::Client,
        )
    }

    /// 502: the upstream answered, but not usefully.
    pub(crate) fn bad_gateway(code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            code,
            message,
            ErrorSource::Upstream,
        )
    }

    /// 503: no upstream could be reached.
    pub(crate) fn unavailable(code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_error",
            code,
            message,
            ErrorSource::Upstream,
        )
    }

    /// 504: the upstream took too long.
    pub(crate) fn timeout(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_error",
            "upstream_timeout",
            message,
            ErrorSource::Upstream,
        )
    }

    /// 500: a bug or an unexpected state in Tollgate.
    pub(crate) fn internal(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal_error",
            message,
            ErrorSource::Internal,
        )
    }

    /// The OpenAI-shaped JSON body.
    pub(crate) fn body(&self) -> Bytes {
        #[derive(serde::Serialize)]
        struct Inner<'a> {
            message: &'a str,
            #[serde(rename = "type")]
            kind: &'a str,
            param: Option<()>,
            code: &'a str,
        }
        #[derive(serde::Serialize)]
        struct Outer<'a> {
            error: Inner<'a>,
        }
        let body = Outer {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                param: None,
                code: self.code,
            },
        };
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, self.body()).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_openai_shaped() {
        let e = ApiError::model_not_found("gpt-9");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).expect("json");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(
            v["error"]["message"]
                .as_str()
                .expect("message")
                .contains("gpt-9")
        );
        assert!(v["error"]["param"].is_null());
    }
}
