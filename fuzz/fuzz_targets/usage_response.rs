//! Reading usage from upstream answers: `usage::from_response`, `usage::from_chunk` and
//! `usage::generated_text` never panic, and `from_response` (a scan, then serde_json on the
//! `usage` value) agrees with a plain serde_json decode of the whole body when both succeed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use tollgate_dataplane::api::usage;

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Body {
    #[serde(default)]
    usage: Option<Usage>,
}

fuzz_target!(|body: &[u8]| {
    let fast = usage::from_response(body);
    let plain = serde_json::from_slice::<Body>(body);
    if let (Ok(fast), Ok(plain)) = (&fast, &plain) {
        let fast = fast.map(|u| (u.prompt, u.completion, u.cached));
        let plain = plain.usage.as_ref().map(|u| {
            (
                u.prompt_tokens,
                u.completion_tokens,
                u.prompt_tokens_details
                    .as_ref()
                    .and_then(|d| d.cached_tokens)
                    .unwrap_or(0),
            )
        });
        assert_eq!(fast, plain, "from_response disagrees with serde_json");
    }
    let _ = usage::from_chunk(body);
    let mut total = 0;
    usage::generated_text(body, |t| total += t.len());
    assert!(total <= body.len() * 6);
});
