//! Prompt tokens estimated before the call, for rate limits (`tpm`), budget reservations and
//! context-window checks. Settlement always uses the upstream's real usage; the estimate only
//! decides admission.
//!
//! - **OpenAI models** (by upstream model name: `gpt-4o*`, `gpt-4.1*`, `gpt-5*`, `o1*`/`o3*`/`o4*`
//!   use `o200k_base`; `gpt-4*`, `gpt-3.5*`, `text-embedding-*` use `cl100k_base`): the text of
//!   the messages (or prompt, or input) counted with the model's BPE, as tiktoken does, plus
//!   OpenAI's documented chat overhead (3 tokens per message, 1 per name, 3 to prime the reply).
//! - **Every other model**: request bytes / 4, a documented over-estimate for JSON bodies (the
//!   JSON syntax and field names count too), so limits err on the safe side.
//!
//! Counting costs CPU, so it is done only when something needs the estimate (a limit, a
//! budget, a context window with fallbacks), and at most once per tokenizer per request.

use crate::request::{Endpoint, ParsedRequest};
use serde_json::Value;

/// Which tokenizer a model uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `o200k_base`: GPT-4o, GPT-4.1, GPT-5, o-series.
    O200k,
    /// `cl100k_base`: GPT-4, GPT-3.5, the text-embedding models.
    Cl100k,
    /// Anything else: bytes / 4.
    Other,
}

impl Family {
    /// The family of an upstream model name.
    pub fn of(upstream_model: &str) -> Self {
        let m = upstream_model.to_ascii_lowercase();
        // A provider prefix (`openai/gpt-4o`) or a dated suffix doesn't change the tokenizer.
        let m = m.rsplit('/').next().unwrap_or(&m);
        let starts = |p: &[&str]| p.iter().any(|p| m.starts_with(p));
        if starts(&[
            "gpt-4o",
            "gpt-4.1",
            "gpt-4.5",
            "gpt-5",
            "o1",
            "o3",
            "o4",
            "chatgpt-4o",
        ]) {
            Family::O200k
        } else if starts(&["gpt-4", "gpt-3.5", "text-embedding-", "davinci", "babbage"]) {
            Family::Cl100k
        } else {
            Family::Other
        }
    }

    /// Index for per-request caches.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Estimated prompt tokens of a request to a model of `family`.
pub fn estimate(family: Family, endpoint: Endpoint, req: &ParsedRequest<'_>, body: &[u8]) -> u64 {
    let bytes_estimate = (body.len() as u64 / 4).max(1);
    let tokenizer = match family {
        Family::O200k => bpe_openai::o200k_base(),
        Family::Cl100k => bpe_openai::cl100k_base(),
        Family::Other => return bytes_estimate,
    };
    let count = |s: &str| tokenizer.count(s) as u64;
    let parse = |name: &str| {
        req.field(name)
            .and_then(|raw| serde_json::from_str::<Value>(raw).ok())
    };
    let counted = match endpoint {
        Endpoint::ChatCompletions => parse("messages").map(|messages| {
            let mut n = 3; // every reply is primed with <|start|>assistant<|message|>
            for m in messages.as_array().into_iter().flatten() {
                n += 3;
                if let Some(role) = m.get("role").and_then(Value::as_str) {
                    n += count(role);
                }
                if let Some(name) = m.get("name").and_then(Value::as_str) {
                    n += 1 + count(name);
                }
                n += text_tokens(m.get("content"), &count);
                if let Some(calls) = m.get("tool_calls") {
                    n += count(&calls.to_string());
                }
            }
            if let Some(tools) = req.field("tools") {
                n += count(tools);
            }
            n
        }),
        Endpoint::Completions => parse("prompt").map(|p| text_tokens(Some(&p), &count)),
        Endpoint::Embeddings => parse("input").map(|p| text_tokens(Some(&p), &count)),
    };
    counted.unwrap_or(bytes_estimate).max(1)
}

/// Tokens of plain text (a completion relayed to the client) for a model of `family`: its BPE
/// count, or bytes / 4 for other models.
pub fn count_text(family: Family, text: &str) -> u64 {
    match family {
        Family::O200k => bpe_openai::o200k_base().count(text) as u64,
        Family::Cl100k => bpe_openai::cl100k_base().count(text) as u64,
        Family::Other => (text.len() as u64).div_ceil(4),
    }
}

/// Tokens of a content value: a string, an array of strings, or of content parts
/// (`{"type":"text","text":...}`; images and audio are not counted here).
fn text_tokens(v: Option<&Value>, count: &dyn Fn(&str) -> u64) -> u64 {
    match v {
        Some(Value::String(s)) => count(s),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| match p {
                Value::String(s) => count(s),
                Value::Object(o) => o.get("text").and_then(Value::as_str).map_or(0, count),
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn est(model: &str, body: &str) -> u64 {
        let req =
            ParsedRequest::parse(body.as_bytes(), Endpoint::ChatCompletions).expect("a request");
        estimate(
            Family::of(model),
            Endpoint::ChatCompletions,
            &req,
            body.as_bytes(),
        )
    }

    #[test]
    fn families_follow_the_model_name() {
        assert_eq!(Family::of("gpt-4o-mini-2024-07-18"), Family::O200k);
        assert_eq!(Family::of("openai/o3-mini"), Family::O200k);
        assert_eq!(Family::of("gpt-4-turbo"), Family::Cl100k);
        assert_eq!(Family::of("text-embedding-3-small"), Family::Cl100k);
        assert_eq!(
            Family::of("meta-llama/Llama-3.1-8B-Instruct"),
            Family::Other
        );
    }

    #[test]
    fn openai_chat_is_counted_like_tiktoken() {
        // By OpenAI's cookbook formula: 3 + (3 + 1 + 6) + (3 + 1 + 12) = 29 for gpt-4o.
        let body = r#"{"model":"gpt-4o","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"What is the capital of France? Answer in one word."}]}"#;
        assert_eq!(est("gpt-4o", body), 29);
        // Far below the bytes / 4 rule, which counts the JSON too.
        assert!(29 < body.len() as u64 / 4);
        // Long prompts scale with the text, not the JSON.
        let long = "word ".repeat(1000);
        let body =
            format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{long}"}}]}}"#);
        let n = est("gpt-4o", &body);
        assert!((1000..=1010).contains(&n), "{n}");
    }

    #[test]
    fn other_models_use_bytes_over_four() {
        let body = r#"{"model":"llama","messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(est("llama", body), body.len() as u64 / 4);
    }
}
