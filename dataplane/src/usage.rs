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

/// Usage of a complete response body; `Err` when the body isn't a JSON object. The whole body
/// is checked (a 2xx that isn't JSON is the upstream's failure), but only `usage` is decoded:
/// the choices are skipped over.
pub fn from_response(body: &[u8]) -> Result<Option<TokenUsage>, serde_json::Error> {
    /// Everything but `usage` is skipped as it is read (and so still checked to be JSON).
    #[derive(Deserialize)]
    struct UsageOnly {
        #[serde(default)]
        usage: Option<UsageJson>,
    }
    serde_json::from_slice::<UsageOnly>(body).map(|w| w.usage.map(Into::into))
}

/// Usage of one stream chunk's JSON, and whether the chunk carries nothing else (its `choices`
/// are empty, as in the extra chunk `stream_options.include_usage` adds).
pub fn from_chunk(json: &[u8]) -> Option<(TokenUsage, bool)> {
    let w: WithUsage = serde_json::from_slice(json).ok()?;
    let only_usage = w.choices.is_none_or(|c| c.is_empty());
    w.usage.map(|u| (u.into(), only_usage))
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn usage_of_a_response_and_garbage_refused() {
        let at_end = br#"{"id":"x","choices":[{"message":{"content":"say \"usage\": {}"}}],"usage":{"prompt_tokens":3,"completion_tokens":4,"prompt_tokens_details":{"cached_tokens":1}}}"#;
        let u = from_response(at_end).unwrap().unwrap();
        assert_eq!((u.prompt, u.completion, u.cached), (3, 4, 1));
        let first = br#"{"usage":{"prompt_tokens":5,"completion_tokens":6},"choices":[]}"#;
        let u = from_response(first).unwrap().unwrap();
        assert_eq!((u.prompt, u.completion), (5, 6));
        assert_eq!(from_response(br#"{"usage":null}"#).unwrap(), None);
        assert_eq!(from_response(br#"{"choices":[]}"#).unwrap(), None);
        assert!(from_response(b"<html>bad gateway</html>").is_err());
        assert!(from_response(b"{not json}").is_err());
        assert!(from_response(br#"{garbage,"usage":{"prompt_tokens":1}}"#).is_err());
    }
}
