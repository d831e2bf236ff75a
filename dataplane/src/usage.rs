//! Reading token usage from OpenAI-shaped responses and stream chunks.

use serde::Deserialize;
use tollgate_crds::config::TokenUsage;

#[derive(Deserialize)]
struct UsageJson {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl From<UsageJson> for TokenUsage {
    fn from(u: UsageJson) -> Self {
        TokenUsage {
            prompt: u.prompt_tokens,
            completion: u.completion_tokens,
            cached: u
                .prompt_tokens_details
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0),
        }
    }
}

#[derive(Deserialize)]
struct WithUsage {
    #[serde(default)]
    usage: Option<UsageJson>,
    #[serde(default)]
    choices: Option<Vec<serde::de::IgnoredAny>>,
}

/// Usage of a complete response body; `Err` when the body isn't a JSON object.
pub fn from_response(body: &[u8]) -> Result<Option<TokenUsage>, serde_json::Error> {
    serde_json::from_slice::<WithUsage>(body).map(|w| w.usage.map(Into::into))
}

/// Usage of one stream chunk's JSON, and whether the chunk carries nothing else (its `choices`
/// are empty, as in the extra chunk `stream_options.include_usage` adds).
pub fn from_chunk(json: &[u8]) -> Option<(TokenUsage, bool)> {
    let w: WithUsage = serde_json::from_slice(json).ok()?;
    let only_usage = w.choices.is_none_or(|c| c.is_empty());
    w.usage.map(|u| (u.into(), only_usage))
}
