//! The request scan (`json::unique_members`) against its authority (`json::strict_members`,
//! serde_json): when the scan accepts, the strict path accepts with the same members (decoded
//! key, raw value) in the same order; when the strict path finds a repeated name, the scan
//! refused. And `ParsedRequest::parse` never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_dataplane::api::json::{Invalid, strict_members, unique_members};
use tollgate_dataplane::api::request::{Endpoint, ParsedRequest};

fuzz_target!(|body: &[u8]| {
    let mut fast = Vec::new();
    let scanned = unique_members(body, |k, v| fast.push((k.into_owned(), v.to_owned())));
    match (scanned, strict_members(body)) {
        (Ok(()), Ok(strict)) => {
            let strict: Vec<(String, String)> = strict
                .into_iter()
                .map(|(k, v)| (k.into_owned(), v.to_owned()))
                .collect();
            assert_eq!(fast, strict, "members differ");
        }
        (Ok(()), Err(e)) => panic!("the scan accepted what the strict path refuses: {e:?}"),
        (Err(_), _) => {}
    }
    for endpoint in [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
    ] {
        let _ = ParsedRequest::parse(body, endpoint);
    }
    // A repeat found by the strict path must have been refused by the scan (checked above:
    // the scan accepting makes the strict path's refusal a panic). Touch the type so the
    // invariant is named here.
    let _ = |e: Invalid| matches!(e, Invalid::Duplicate(_));
});
