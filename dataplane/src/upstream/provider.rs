//! Provider adapters: the one place that knows an upstream's wire format.
//!
//! The gateway's internal request is OpenAI's shape ([`ParsedRequest`] over the client's body,
//! see [`crate::gateway::ingress`]). An adapter turns it into what one kind of upstream reads
//! (the path under the deployment's base URL, the header carrying its API key, the body), and
//! is where that upstream's answer (body, stream events, usage, errors) would be turned back
//! into the internal shape before the gateway reads usage from it and relays it.
//!
//! - [`Adapter::OpenAiCompatible`]: OpenAI and every server that speaks its API (vLLM, KServe,
//!   Ollama, TGI). Pass-through: the body goes as the client sent it (the model renamed and
//!   usage asked for only when needed, [`ParsedRequest::upstream_body`]), the answer comes back
//!   untouched, so nothing here costs the hot path anything.
//! - The built-in mock (`provider: mock`) has no adapter: it is served in process
//!   ([`crate::upstream::mock`]), in the internal shape.
//!
//! A provider that translates (Anthropic's Messages API, Bedrock's Converse, Gemini) is a new
//! variant here and a module beside this one: its request built from the internal one, and
//! its answer wrapped (a whole body converted, a stream's events converted chunk by chunk)
//! into OpenAI's shape before the relay, which then reads usage and settles as it does today.

use crate::api::request::{Endpoint, ParsedRequest};
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use tollgate_crds::model::Provider;

/// The header carrying a deployment's API key, and its value.
pub(crate) type Auth = (HeaderName, HeaderValue);

/// How to talk to one kind of upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Adapter {
    /// OpenAI's API, as OpenAI and OpenAI-compatible servers serve it.
    OpenAiCompatible,
}

impl Adapter {
    /// The adapter of `provider`'s HTTP upstreams (`None` for the mock, served in process, and
    /// for providers this build has no adapter for; the config compiler refuses those).
    pub(crate) fn of(provider: Provider) -> Option<Self> {
        match provider {
            Provider::Openai | Provider::OpenaiCompatible => Some(Adapter::OpenAiCompatible),
            Provider::Anthropic | Provider::Azure | Provider::Mock => None,
        }
    }

    /// The path of `endpoint` under a deployment's base URL.
    pub(crate) fn path(self, endpoint: Endpoint) -> &'static str {
        match self {
            Adapter::OpenAiCompatible => match endpoint {
                Endpoint::ChatCompletions => "/chat/completions",
                Endpoint::Completions => "/completions",
                Endpoint::Embeddings => "/embeddings",
            },
        }
    }

    /// The header that carries a deployment's API key, and its value for `key` (marked
    /// sensitive, so it is never logged); `None` if `key` can't be a header value.
    pub(crate) fn auth(self, key: &str) -> Option<Auth> {
        match self {
            Adapter::OpenAiCompatible => {
                let mut v = HeaderValue::try_from(format!("Bearer {key}")).ok()?;
                v.set_sensitive(true);
                Some((http::header::AUTHORIZATION, v))
            }
        }
    }

    /// The body the upstream reads for `parsed` (whose body is `original`), sent to the
    /// deployment's `upstream_model`.
    #[inline]
    pub(crate) fn request_body(
        self,
        parsed: &ParsedRequest<'_>,
        original: &Bytes,
        upstream_model: &str,
    ) -> Bytes {
        match self {
            Adapter::OpenAiCompatible => parsed.upstream_body(original, upstream_model),
        }
    }
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn openai_compatible_upstreams_get_the_openai_wire_format() {
        for p in [Provider::Openai, Provider::OpenaiCompatible] {
            assert_eq!(Adapter::of(p), Some(Adapter::OpenAiCompatible));
        }
        assert_eq!(Adapter::of(Provider::Mock), None);
        let a = Adapter::OpenAiCompatible;
        assert_eq!(a.path(Endpoint::ChatCompletions), "/chat/completions");
        let (name, value) = a.auth("sk-x").unwrap();
        assert_eq!(name, http::header::AUTHORIZATION);
        assert_eq!(value, "Bearer sk-x");
        assert!(value.is_sensitive());
        assert!(a.auth("bad\nkey").is_none());
        // Pass-through: the client's bytes when nothing changes.
        let body = Bytes::from_static(br#"{"model":"m","messages":[]}"#);
        let parsed = ParsedRequest::parse(&body, Endpoint::ChatCompletions).unwrap();
        assert_eq!(a.request_body(&parsed, &body, "m").as_ptr(), body.as_ptr());
    }
}
