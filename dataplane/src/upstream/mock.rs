//! The built-in `mock` provider: deterministic OpenAI-shaped replies with settable usage,
//! latency and chunking. The same code serves in-process (provider `mock`) and as a real HTTP
//! server (the `tollgate-mock` binary, used by benchmarks and tests as an upstream).

use crate::api::request::{Endpoint, ParsedRequest};
use axum::body::Body;
use bytes::Bytes;
use futures_util::StreamExt;
use std::convert::Infallible;
use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;
use tollgate_crds::config::{MockConfig, TokenUsage};

/// Dimensions of the mock's embeddings.
pub(crate) const EMBEDDING_DIMS: usize = 64;

/// A configured mock model, with its reply pre-split and pre-escaped.
#[derive(Debug)]
pub struct Mock {
    /// JSON-escaped reply chunks (without quotes).
    chunks: Vec<String>,
    /// JSON-escaped whole reply (without quotes).
    reply: String,
    prompt_tokens: Option<u32>,
    completion_tokens: u32,
    /// Delay before the response.
    pub(crate) latency: Duration,
    /// Delay between streamed chunks.
    pub(crate) chunk_delay: Duration,
}

fn escape(s: &str) -> String {
    let q = serde_json::to_string(s).unwrap_or_default();
    q[1..q.len() - 1].to_string()
}

impl Mock {
    /// Prepares a mock from its config.
    pub fn new(cfg: &MockConfig) -> Self {
        let words: Vec<&str> = cfg.reply.split_inclusive(' ').collect();
        let pieces: Vec<String> = match cfg.chunks {
            None => words.iter().map(|w| w.to_string()).collect(),
            Some(n) => {
                let chars: Vec<char> = cfg.reply.chars().collect();
                let n = n.max(1) as usize;
                (0..n)
                    .map(|i| {
                        chars[i * chars.len() / n..(i + 1) * chars.len() / n]
                            .iter()
                            .collect()
                    })
                    .collect()
            }
        };
        Self {
            chunks: pieces.iter().map(|p| escape(p)).collect(),
            reply: escape(&cfg.reply),
            prompt_tokens: cfg.prompt_tokens,
            completion_tokens: cfg.completion_tokens.unwrap_or(words.len() as u32),
            latency: Duration::from_millis(cfg.latency_ms),
            chunk_delay: Duration::from_millis(cfg.chunk_delay_ms),
        }
    }

    /// The usage this mock reports for a request body of `body_len` bytes.
    pub(crate) fn usage(&self, endpoint: Endpoint, body_len: usize) -> TokenUsage {
        let prompt = self
            .prompt_tokens
            .map(u64::from)
            .unwrap_or((body_len as u64 / 4).max(1));
        let completion = if endpoint == Endpoint::Embeddings {
            0
        } else {
            u64::from(self.completion_tokens)
        };
        TokenUsage {
            prompt,
            completion,
            cached: 0,
        }
    }

    /// A complete (non-streamed) response body.
    pub(crate) fn response(
        &self,
        endpoint: Endpoint,
        req: &ParsedRequest<'_>,
        id: &str,
        usage: TokenUsage,
    ) -> Bytes {
        let model = escape(&req.model);
        let created = now();
        let mut s = String::with_capacity(256 + self.reply.len());
        let _ = match endpoint {
            Endpoint::ChatCompletions => write!(
                s,
                r#"{{"id":"chatcmpl-{id}","object":"chat.completion","created":{created},"model":"{model}","choices":[{{"index":0,"message":{{"role":"assistant","content":"{}"}},"logprobs":null,"finish_reason":"stop"}}],"usage":{}}}"#,
                self.reply,
                usage_json(usage)
            ),
            Endpoint::Completions => write!(
                s,
                r#"{{"id":"cmpl-{id}","object":"text_completion","created":{created},"model":"{model}","choices":[{{"text":"{}","index":0,"logprobs":null,"finish_reason":"stop"}}],"usage":{}}}"#,
                self.reply,
                usage_json(usage)
            ),
            Endpoint::Embeddings => {
                s.push_str(r#"{"object":"list","data":["#);
                for (i, text) in req.embedding_inputs().iter().enumerate() {
                    if i > 0 {
                        s.push(',');
                    }
                    let _ = write!(s, r#"{{"object":"embedding","index":{i},"embedding":["#);
                    for (j, x) in embed(text).iter().enumerate() {
                        if j > 0 {
                            s.push(',');
                        }
                        let _ = write!(s, "{x:.6}");
                    }
                    s.push_str("]}");
                }
                write!(
                    s,
                    r#"],"model":"{model}","usage":{{"prompt_tokens":{},"total_tokens":{}}}}}"#,
                    usage.prompt, usage.prompt
                )
            }
        };
        Bytes::from(s)
    }

    /// The server-sent events of a streamed response, each `data: ...\n\n`, ending with
    /// `data: [DONE]`. The usage chunk is included only when `usage` is given.
    pub(crate) fn stream_events(
        &self,
        endpoint: Endpoint,
        model: &str,
        id: &str,
        usage: Option<TokenUsage>,
    ) -> Vec<Bytes> {
        let model = escape(model);
        let created = now();
        let mut events = Vec::with_capacity(self.chunks.len() + 4);
        let mut ev = |body: String| events.push(Bytes::from(format!("data: {body}\n\n")));
        match endpoint {
            Endpoint::Completions => {
                let head = format!(
                    r#"{{"id":"cmpl-{id}","object":"text_completion","created":{created},"model":"{model}","choices":"#
                );
                for c in &self.chunks {
                    ev(format!(
                        r#"{head}[{{"text":"{c}","index":0,"logprobs":null,"finish_reason":null}}]}}"#
                    ));
                }
                ev(format!(
                    r#"{head}[{{"text":"","index":0,"logprobs":null,"finish_reason":"stop"}}]}}"#
                ));
                if let Some(u) = usage {
                    ev(format!(r#"{head}[],"usage":{}}}"#, usage_json(u)));
                }
            }
            _ => {
                let head = format!(
                    r#"{{"id":"chatcmpl-{id}","object":"chat.completion.chunk","created":{created},"model":"{model}","choices":"#
                );
                ev(format!(
                    r#"{head}[{{"index":0,"delta":{{"role":"assistant","content":""}},"logprobs":null,"finish_reason":null}}]}}"#
                ));
                for c in &self.chunks {
                    ev(format!(
                        r#"{head}[{{"index":0,"delta":{{"content":"{c}"}},"logprobs":null,"finish_reason":null}}]}}"#
                    ));
                }
                ev(format!(
                    r#"{head}[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"stop"}}]}}"#
                ));
                if let Some(u) = usage {
                    ev(format!(r#"{head}[],"usage":{}}}"#, usage_json(u)));
                }
            }
        }
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
        events
    }

    /// A streamed body that sends `events` one by one, `chunk_delay` apart.
    pub(crate) fn stream_body(&self, events: Vec<Bytes>) -> Body {
        let delay = self.chunk_delay;
        let stream = futures_util::stream::iter(events.into_iter().enumerate()).then(
            move |(i, e)| async move {
                if i > 0 && !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Ok::<_, Infallible>(e)
            },
        );
        Body::from_stream(stream)
    }
}

fn usage_json(u: TokenUsage) -> String {
    format!(
        r#"{{"prompt_tokens":{},"completion_tokens":{},"total_tokens":{}}}"#,
        u.prompt,
        u.completion,
        u.prompt + u.completion
    )
}

fn now() -> u64 {
    crate::rt::clock::unix_secs()
}

/// A deterministic embedding in which texts sharing words point the same way: each word is
/// hashed into one of [`EMBEDDING_DIMS`] buckets, and the vector is normalised.
pub(crate) fn embed(text: &str) -> Vec<f32> {
    let mut v = vec![0f32; EMBEDDING_DIMS];
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        // FNV-1a: stable across runs and platforms, unlike std's RandomState.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in word.to_lowercase().bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        v[(h % EMBEDDING_DIMS as u64) as usize] += 1.0;
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// The mock as an HTTP server: `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
/// `/v1/models`. No authentication.
pub fn router(mock: Arc<Mock>) -> axum::Router {
    use axum::routing::{get, post};
    let handler = |endpoint: Endpoint| {
        let mock = mock.clone();
        move |body: Bytes| {
            let mock = mock.clone();
            async move { serve(&mock, endpoint, body).await }
        }
    };
    axum::Router::new()
        .route(
            "/v1/chat/completions",
            post(handler(Endpoint::ChatCompletions)),
        )
        .route("/v1/completions", post(handler(Endpoint::Completions)))
        .route("/v1/embeddings", post(handler(Endpoint::Embeddings)))
        .route(
            "/v1/models",
            get(|| async { r#"{"object":"list","data":[]}"# }),
        )
        .route("/health", get(|| async { "ok" }))
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Serves one request as an upstream would.
pub async fn serve(mock: &Mock, endpoint: Endpoint, body: Bytes) -> axum::response::Response {
    use axum::response::IntoResponse;
    let req = match ParsedRequest::parse(&body, endpoint) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if !mock.latency.is_zero() {
        tokio::time::sleep(mock.latency).await;
    }
    let id = NEXT_ID
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        .to_string();
    let usage = mock.usage(endpoint, body.len());
    if req.stream {
        let events = mock.stream_events(
            endpoint,
            &req.model,
            &id,
            req.include_usage.then_some(usage),
        );
        (
            [(http::header::CONTENT_TYPE, "text/event-stream")],
            mock.stream_body(events),
        )
            .into_response()
    } else {
        (
            [(http::header::CONTENT_TYPE, "application/json")],
            mock.response(endpoint, &req, &id, usage),
        )
            .into_response()
    }
}
