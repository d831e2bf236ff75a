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
/// is checked (a 2xx that isn't JSON is the upstream's failure), but only `usage` is decoded.
///
/// The body is scanned by [`crate::api::json::members`]; what the scan refuses goes to serde_json,
/// which decides (and may still accept it: a body the scan leaves to it, like one nested too
/// deeply, or a top-level array, which serde reads as the struct's fields in order).
pub fn from_response(body: &[u8]) -> Result<Option<TokenUsage>, serde_json::Error> {
    let mut usage = None;
    let mut seen = 0;
    let scanned = crate::api::json::members(body, |key, value| {
        if key == "usage" {
            usage = Some(value);
            seen += 1;
        }
    });
    // serde refuses a duplicate `usage`, so the scan leaves that to it too.
    if scanned.is_ok() && seen <= 1 {
        match usage {
            None => return Ok(None),
            Some(raw) => {
                if let Ok(u) = serde_json::from_str::<Option<UsageJson>>(raw) {
                    return Ok(u.map(Into::into));
                }
            }
        }
    }
    /// Everything but `usage` is skipped as it is read (and so still checked to be JSON).
    #[derive(Deserialize)]
    struct UsageOnly {
        #[serde(default)]
        usage: Option<UsageJson>,
    }
    serde_json::from_slice::<UsageOnly>(body).map(|w| w.usage.map(Into::into))
}

/// The names whose string values are generated text: a chat message's or delta's `content`,
/// `refusal` and reasoning, a tool call's `arguments`, a completion's `text`.
static TEXT_KEYS: std::sync::LazyLock<[memchr::memmem::Finder<'static>; 6]> =
    std::sync::LazyLock::new(|| {
        [
            &b"\"content\":"[..],
            b"\"arguments\":",
            b"\"text\":",
            b"\"reasoning_content\":",
            b"\"reasoning\":",
            b"\"refusal\":",
        ]
        .map(memchr::memmem::Finder::new)
    });

/// Calls `each` with the raw text (escapes not decoded) of every generated-text string in
/// `json` (a response body, or stream events), for estimating completion tokens when the
/// upstream reports none. A fast approximation: names are found by their bytes, so text that
/// itself contains `\"content\":` is not double counted (its quotes are escaped there).
pub fn generated_text(json: &[u8], mut each: impl FnMut(&[u8])) {
    for finder in TEXT_KEYS.iter() {
        for at in finder.find_iter(json) {
            // A name inside a string has an escaped quote before it.
            if at > 0 && json[at - 1] == b'\\' {
                continue;
            }
            let mut i = at + finder.needle().len();
            while json.get(i).is_some_and(u8::is_ascii_whitespace) {
                i += 1;
            }
            if json.get(i) != Some(&b'"') {
                continue;
            }
            let start = i + 1;
            let mut j = start;
            while let Some(&c) = json.get(j) {
                match c {
                    b'"' => break,
                    b'\\' => j += 2,
                    _ => j += 1,
                }
            }
            each(&json[start..j.min(json.len())]);
        }
    }
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
    fn generated_text_is_found_in_messages_deltas_tool_calls_and_completions() {
        let mut got = Vec::new();
        let events = br#"data: {"choices":[{"delta":{"role":"assistant","content":"He said \"content\": no"}}]}

data: {"choices":[{"delta":{"tool_calls":[{"function":{"name":"f","arguments": "{\"a\":1}"}}]}}]}

data: {"choices":[{"text":"done","delta":{"content":null,"reasoning_content":"hm"}}]}

"#;
        generated_text(events, |t| {
            got.push(String::from_utf8_lossy(t).into_owned())
        });
        got.sort();
        assert_eq!(
            got,
            [r#"He said \"content\": no"#, "done", "hm", r#"{\"a\":1}"#]
        );
    }

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
        assert!(from_response(br#"{"usage":{"prompt_tokens":"x"}}"#).is_err());
        assert!(from_response(br#"{"usage":null,"usage":null}"#).is_err());
    }

    /// What the scan leaves to serde_json still gets serde's answer.
    #[test]
    fn bodies_the_scan_refuses_get_serde_json_answer() {
        let deep = format!(
            r#"{{"choices":{}{},"usage":{{"prompt_tokens":2}}}}"#,
            "[".repeat(110),
            "]".repeat(110)
        );
        assert_eq!(from_response(deep.as_bytes()).unwrap().unwrap().prompt, 2);
        let array = br#"[{"prompt_tokens":7,"completion_tokens":1}]"#;
        assert_eq!(from_response(array).unwrap().unwrap().prompt, 7);
        let escaped_key = br#"{"us\u0061ge":{"prompt_tokens":4}}"#;
        assert_eq!(from_response(escaped_key).unwrap().unwrap().prompt, 4);
    }

    /// The scan's answer is serde_json's on mutated responses: the same usage, the same
    /// refusals.
    #[test]
    fn agrees_with_serde_json_on_mutated_responses() {
        fn serde_only(body: &[u8]) -> Result<Option<TokenUsage>, String> {
            #[derive(Deserialize)]
            struct UsageOnly {
                #[serde(default)]
                usage: Option<UsageJson>,
            }
            serde_json::from_slice::<UsageOnly>(body)
                .map(|w| w.usage.map(Into::into))
                .map_err(|e| e.to_string())
        }
        let seeds: &[&[u8]] = &[
            br#"{"id":"x","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":12,"completion_tokens":25,"total_tokens":37}}"#,
            br#"{"usage":{"prompt_tokens":3,"completion_tokens":4,"prompt_tokens_details":{"cached_tokens":1,"audio_tokens":0},"completion_tokens_details":null}}"#,
            br#"{"usage":{"prompt_tokens_details":{"cached_tokens":null},"prompt_tokens":18446744073709551615}}"#,
            br#"{"usage":null,"data":[{"embedding":[0.1,-2e-3]}]}"#,
        ];
        let mut with_usage = 0;
        for body in (0..2).flat_map(|seed| crate::api::json::mutations(seeds, 20_000, seed)) {
            // The same usage, or the same error, word for word.
            let fast = from_response(&body).map_err(|e| e.to_string());
            assert_eq!(
                fast,
                serde_only(&body),
                "{}",
                String::from_utf8_lossy(&body)
            );
            with_usage += usize::from(matches!(fast, Ok(Some(_))));
        }
        assert!(with_usage > 5_000, "{with_usage}");
    }
}
