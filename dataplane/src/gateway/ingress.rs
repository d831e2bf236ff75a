//! Ingress: the client APIs the gateway serves, and how a request in each becomes the one
//! internal request the rest of the path reads.
//!
//! The internal request is OpenAI's shape: a [`ParsedRequest`] over the body's top-level
//! members, for one [`Endpoint`] (chat completions, completions, embeddings). OpenAI's own APIs
//! are that shape already, so their ingress is the parse and nothing else: the body goes on
//! untouched (see [`crate::upstream::provider`] for the way out).
//!
//! A client API of another shape (Anthropic's Messages, OpenAI's Responses) is a new
//! [`Ingress`] variant: its paths in [`Ingress::for_path`]; its body turned into the internal
//! shape once, here, in [`Ingress::parse`] (so limits, budgets, routing, retries, fallbacks and
//! spend work on it unchanged); and its answer (body, stream events, errors) shaped back for
//! its client where [`crate::gateway::handle`] returns.

use crate::api::error::ApiError;
use crate::api::request::{Endpoint, ParsedRequest};

/// A client API the gateway serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ingress {
    /// OpenAI's chat completions, completions and embeddings: the internal shape.
    OpenAi(Endpoint),
}

impl Ingress {
    /// The API served at `path` (with or without the `/v1` prefix, as OpenAI's SDKs send it
    /// with either base URL), if it is a proxied one.
    #[inline]
    pub(crate) fn for_path(path: &str) -> Option<Self> {
        let endpoint = match path.strip_prefix("/v1").unwrap_or(path) {
            "/chat/completions" => Endpoint::ChatCompletions,
            "/completions" => Endpoint::Completions,
            "/embeddings" => Endpoint::Embeddings,
            _ => return None,
        };
        Some(Ingress::OpenAi(endpoint))
    }

    /// The internal endpoint the request is served as.
    #[inline]
    pub(crate) fn endpoint(self) -> Endpoint {
        match self {
            Ingress::OpenAi(e) => e,
        }
    }

    /// The internal request of `body`; a body that isn't a valid request of this API gets the
    /// API's own error.
    #[inline]
    pub(crate) fn parse(self, body: &[u8]) -> Result<ParsedRequest<'_>, ApiError> {
        match self {
            Ingress::OpenAi(endpoint) => ParsedRequest::parse(body, endpoint),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_paths_with_and_without_v1() {
        for (path, e) in [
            ("/v1/chat/completions", Endpoint::ChatCompletions),
            ("/chat/completions", Endpoint::ChatCompletions),
            ("/v1/completions", Endpoint::Completions),
            ("/embeddings", Endpoint::Embeddings),
        ] {
            assert_eq!(Ingress::for_path(path), Some(Ingress::OpenAi(e)));
        }
        for path in [
            "/v1/models",
            "/v2/chat/completions",
            "/v1/chat/completions/",
            "",
        ] {
            assert_eq!(Ingress::for_path(path), None, "{path}");
        }
    }
}
