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
///
/// Providers put `usage` at the end of the object, so it is looked for from the end and only
/// that value is decoded, not the choices before it. (A `"usage"` inside a string can't match:
/// its quotes would be escaped.) A body that doesn't end like that is decoded whole.
pub fn from_response(body: &[u8]) -> Result<Option<TokenUsage>, serde_json::Error> {
    if let Some(u) = usage_near_end(body) {
        return Ok(u);
    }
    serde_json::from_slice::<WithUsage>(body).map(|w| w.usage.map(Into::into))
}

fn usage_near_end(body: &[u8]) -> Option<Option<TokenUsage>> {
    let object = body.trim_ascii();
    if object.first() != Some(&b'{') || object.last() != Some(&b'}') {
        return None;
    }
    let at = memchr::memmem::rfind(object, b"\"usage\"")?;
    let value = object[at + 7..].trim_ascii_start().strip_prefix(b":")?;
    let mut de = serde_json::Deserializer::from_slice(value);
    let usage = Option::<UsageJson>::deserialize(&mut de).ok()?;
    Some(usage.map(Into::into))
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
    fn usage_read_from_the_end_or_the_whole_body() {
        let at_end = br#"{"id":"x","choices":[{"message":{"content":"say \"usage\": {}"}}],"usage":{"prompt_tokens":3,"completion_tokens":4,"prompt_tokens_details":{"cached_tokens":1}}}"#;
        let u = from_response(at_end).unwrap().unwrap();
        assert_eq!((u.prompt, u.completion, u.cached), (3, 4, 1));
        // Not the last field: still read.
        let first = br#"{"usage":{"prompt_tokens":5,"completion_tokens":6},"choices":[]}"#;
        let u = from_response(first).unwrap().unwrap();
        assert_eq!((u.prompt, u.completion), (5, 6));
        assert_eq!(from_response(br#"{"usage":null}"#).unwrap(), None);
        assert_eq!(from_response(br#"{"choices":[]}"#).unwrap(), None);
        assert!(from_response(b"<html>bad gateway</html>").is_err());
        assert!(from_response(b"{not json}").is_err());
    }
}
