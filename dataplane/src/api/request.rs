//! Reading what the gateway needs from a request body without decoding the rest, and rewriting
//! it only when something must change.
//!
//! The gateway decides on exactly the bytes the upstream reads: a body in which any object
//! repeats a member name is refused (`400 duplicate_field`), since parsers disagree on which
//! copy counts (see [`crate::api::json`]); the fields it reads for money (`model`, `stream`,
//! `stream_options`, `max_tokens`, `max_completion_tokens`, `n`) must have the documented type
//! or the request is refused rather than read one way here and another upstream.
//!
//! The body is split once into its top-level fields, each kept as raw JSON text borrowed from
//! the request (by [`crate::api::json::members`]; serde_json decides on bodies that scan refuses, and
//! words the error). Routing reads `model`, `stream` and `stream_options`; every other field (the
//! messages, tools, images) is never decoded. When nothing must change the original bytes go
//! upstream untouched; otherwise the fields are re-joined, copying raw slices, with only the
//! changed values written anew.

use crate::api::error::ApiError;
use crate::api::json::{CowStr, Invalid};
use bytes::Bytes;
use std::borrow::Cow;

/// The API a request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    ChatCompletions,
    /// `POST /v1/completions`
    Completions,
    /// `POST /v1/embeddings`
    Embeddings,
}

impl Endpoint {
    /// Position in per-API tables (chat, completions, embeddings).
    pub(crate) fn index(self) -> usize {
        match self {
            Endpoint::ChatCompletions => 0,
            Endpoint::Completions => 1,
            Endpoint::Embeddings => 2,
        }
    }

    /// The field that must be present.
    fn required_field(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "messages",
            Endpoint::Completions => "prompt",
            Endpoint::Embeddings => "input",
        }
    }

    /// Name for metrics and logs.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
        }
    }
}

/// A request body split into top-level fields.
pub struct ParsedRequest<'a> {
    /// Top-level fields: key and raw JSON value.
    fields: Vec<(Cow<'a, str>, &'a str)>,
    /// The `model` the client asked for.
    pub(crate) model: Cow<'a, str>,
    /// Whether the client asked for a stream.
    pub(crate) stream: bool,
    /// Whether the client asked for `stream_options.include_usage`.
    pub(crate) include_usage: bool,
    /// `max_completion_tokens` (or the older `max_tokens`; the larger when both are set), when
    /// set.
    pub(crate) max_tokens: Option<u64>,
    /// `n`: how many choices to generate (1 when not set).
    pub(crate) choices: u64,
}

#[derive(serde::Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

impl<'a> ParsedRequest<'a> {
    /// The raw JSON of top-level field `name`, if present.
    pub(crate) fn field(&self, name: &str) -> Option<&'a str> {
        self.fields.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }

    /// Splits `body` and checks the fields the gateway relies on.
    pub fn parse(body: &'a [u8], endpoint: Endpoint) -> Result<Self, ApiError> {
        let mut fields = Vec::with_capacity(8);
        if crate::api::json::unique_members(body, |k, v| fields.push((k, v))).is_err() {
            fields = crate::api::json::strict_members(body).map_err(|e| match e {
                Invalid::Json(e) => ApiError::bad_request(
                    "invalid_json",
                    format!("The request body is not valid JSON ({e}). Send a JSON object with `model` and `{}`.", endpoint.required_field()),
                ),
                Invalid::Duplicate(e) => ApiError::bad_request(
                    "duplicate_field",
                    format!("The request body is ambiguous: {e}. JSON parsers disagree on which copy counts, so send each field once."),
                ),
            })?;
        }
        let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
        let model: Cow<'a, str> = match get("model") {
            Some(v) => {
                serde_json::from_str::<CowStr<'a>>(v)
                    .map_err(|_| {
                        ApiError::bad_request("invalid_model", "`model` must be a string.")
                    })?
                    .0
            }
            None => {
                return Err(ApiError::bad_request(
                    "missing_model",
                    "You must provide a model parameter.",
                ));
            }
        };
        let required = endpoint.required_field();
        match get(required) {
            Some(v) if v != "null" => {}
            _ => {
                return Err(ApiError::bad_request(
                    "missing_field",
                    format!("Missing required parameter: `{required}`."),
                ));
            }
        }
        let stream = match get("stream") {
            None => false,
            Some(v) => match v {
                "true" => true,
                "false" | "null" => false,
                _ => {
                    return Err(ApiError::bad_request(
                        "invalid_stream",
                        "`stream` must be a boolean.",
                    ));
                }
            },
        };
        if stream && endpoint == Endpoint::Embeddings {
            return Err(ApiError::bad_request(
                "invalid_stream",
                "Embeddings can't be streamed.",
            ));
        }
        let include_usage = match get("stream_options") {
            Some(v) if v != "null" => serde_json::from_str::<StreamOptions>(v)
                .map_err(|_| {
                    ApiError::bad_request(
                        "invalid_stream_options",
                        "`stream_options` must be an object.",
                    )
                })?
                .include_usage
                .unwrap_or(false),
            _ => false,
        };
        // Upstreams differ on which of the two wins when both are set (vLLM takes
        // `max_completion_tokens` unless it is null): reserve for the larger.
        let mut max_tokens: Option<u64> = None;
        for name in ["max_completion_tokens", "max_tokens"] {
            match get(name) {
                None | Some("null") => {}
                Some(v) => {
                    let n = v.parse::<u64>().map_err(|_| {
                        ApiError::bad_request(
                            "invalid_max_tokens",
                            format!("`{name}` must be a non-negative integer."),
                        )
                    })?;
                    max_tokens = max_tokens.max(Some(n));
                }
            }
        }
        let choices = match get("n") {
            None | Some("null") => 1,
            Some(v) => v.parse::<u64>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                ApiError::bad_request("invalid_n", "`n` must be a positive integer.")
            })?,
        };
        Ok(Self {
            choices,
            max_tokens,
            fields,
            model,
            stream,
            include_usage,
        })
    }

    /// The texts of an embeddings request's `input` (a string, or an array of strings); token
    /// arrays count as one input each.
    pub(crate) fn embedding_inputs(&self) -> Vec<String> {
        let Some((_, raw)) = self.fields.iter().find(|(k, _)| k == "input") else {
            return Vec::new();
        };
        match serde_json::from_str::<serde_json::Value>(raw) {
            Ok(serde_json::Value::String(s)) => vec![s],
            Ok(serde_json::Value::Array(items)) if items.iter().all(|i| i.is_string()) => items
                .into_iter()
                .map(|i| i.as_str().unwrap_or_default().to_string())
                .collect(),
            Ok(serde_json::Value::Array(items)) if items.iter().all(|i| i.is_array()) => {
                items.iter().map(|i| i.to_string()).collect()
            }
            Ok(other) => vec![other.to_string()],
            Err(_) => Vec::new(),
        }
    }

    /// The body to send upstream: the original bytes when neither the model name nor the
    /// stream options change, else the fields re-joined with those two written anew.
    ///
    /// A streamed request always asks the upstream for `include_usage`, so that its cost is
    /// known; the gateway drops that extra chunk again if the client didn't ask for it.
    pub(crate) fn upstream_body(&self, original: &Bytes, upstream_model: &str) -> Bytes {
        let rename = self.model != upstream_model;
        let add_usage = self.stream && !self.include_usage;
        if !rename && !add_usage {
            return original.clone();
        }
        let mut out = Vec::with_capacity(original.len() + 48);
        out.push(b'{');
        let mut first = true;
        let mut push_field = |out: &mut Vec<u8>, key: &str, value: &[u8]| {
            if !first {
                out.push(b',');
            }
            first = false;
            // Keys came from valid JSON; re-quoting them can't fail.
            let _ = serde_json::to_writer(&mut *out, key);
            out.push(b':');
            out.extend_from_slice(value);
        };
        let mut saw_options = false;
        for (k, v) in &self.fields {
            match k.as_ref() {
                "model" if rename => {
                    let quoted = serde_json::to_vec(upstream_model).unwrap_or_default();
                    push_field(&mut out, k, &quoted);
                }
                "stream_options" if add_usage => {
                    saw_options = true;
                    let mut opts: serde_json::Map<String, serde_json::Value> =
                        serde_json::from_str(v).unwrap_or_default();
                    opts.insert("include_usage".into(), serde_json::Value::Bool(true));
                    let bytes = serde_json::to_vec(&opts).unwrap_or_default();
                    push_field(&mut out, k, &bytes);
                }
                _ => push_field(&mut out, k, v.as_bytes()),
            }
        }
        if add_usage && !saw_options {
            push_field(&mut out, "stream_options", br#"{"include_usage":true}"#);
        }
        out.push(b'}');
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<ParsedRequest<'_>, ApiError> {
        ParsedRequest::parse(body.as_bytes(), Endpoint::ChatCompletions)
    }

    #[test]
    fn reads_model_and_stream() {
        let r = parse(
            r#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#,
        )
        .expect("parse");
        assert_eq!(r.model, "m");
        assert!(r.stream && r.include_usage);
    }

    #[test]
    fn passes_body_through_untouched_when_nothing_changes() {
        let body = Bytes::from_static(
            br#"{ "model" : "m", "messages":[{"role":"user","content":"hi"}] }"#,
        );
        let r = ParsedRequest::parse(&body, Endpoint::ChatCompletions).expect("parse");
        let out = r.upstream_body(&body, "m");
        assert_eq!(
            out.as_ptr(),
            body.as_ptr(),
            "must be the same buffer, not a copy"
        );
    }

    #[test]
    fn rewrites_model_and_adds_usage_keeping_other_fields_verbatim() {
        let body = Bytes::from_static(br#"{"model":"pub","messages":[{"role":"user","content":"h\u00e9"}],"stream":true,"stream_options":{"foo":1}}"#);
        let r = ParsedRequest::parse(&body, Endpoint::ChatCompletions).expect("parse");
        let out = r.upstream_body(&body, "up/model");
        let s = std::str::from_utf8(&out).expect("utf8");
        assert!(
            s.contains(r#""messages":[{"role":"user","content":"h\u00e9"}]"#),
            "{s}"
        );
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["model"], "up/model");
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["foo"], 1);
    }

    /// A body the scan refuses is worded by serde_json, as before the scan.
    #[test]
    fn invalid_json_is_explained_where_it_breaks() {
        let e = parse(r#"{"model":"m","messages":[],"n":01}"#)
            .err()
            .expect("refused");
        assert_eq!(
            e.message,
            "The request body is not valid JSON (invalid number at line 1 column 33). Send a JSON object with `model` and `messages`."
        );
    }

    #[test]
    fn rejects_bad_bodies_with_clear_codes() {
        assert_eq!(
            parse("{not json").err().map(|e| e.code),
            Some("invalid_json")
        );
        assert_eq!(parse("[1]").err().map(|e| e.code), Some("invalid_json"));
        assert_eq!(
            parse(r#"{"messages":[]}"#).err().map(|e| e.code),
            Some("missing_model")
        );
        assert_eq!(
            parse(r#"{"model":"m"}"#).err().map(|e| e.code),
            Some("missing_field")
        );
        assert_eq!(
            parse(r#"{"model":1,"messages":[]}"#).err().map(|e| e.code),
            Some("invalid_model")
        );
        assert_eq!(
            parse(r#"{"model":"m","messages":[],"stream":"yes"}"#)
                .err()
                .map(|e| e.code),
            Some("invalid_stream")
        );
    }

    #[test]
    fn a_repeated_field_is_refused_with_its_own_code() {
        for body in [
            r#"{"model":"cheap","messages":[],"model":"premium"}"#,
            r#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true,"include_usage":false}}"#,
            r#"{"model":"m","mod\u0065l":"x","messages":[]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"a","content":"b"}]}"#,
            r#"{"model":"m","messages":[],"max_tokens":1,"max_tokens":100000}"#,
        ] {
            let e = parse(body).err().expect(body);
            assert_eq!(e.code, "duplicate_field", "{body}");
            assert!(
                e.message.contains("appears more than once"),
                "{}",
                e.message
            );
        }
    }

    #[test]
    fn max_tokens_and_n_must_be_what_the_upstream_reads() {
        let r = parse(
            r#"{"model":"m","messages":[],"max_completion_tokens":null,"max_tokens":500,"n":3}"#,
        )
        .expect("parse");
        assert_eq!((r.max_tokens, r.choices), (Some(500), 3));
        let r = parse(r#"{"model":"m","messages":[],"max_completion_tokens":20,"max_tokens":500}"#)
            .expect("parse");
        assert_eq!(r.max_tokens, Some(500), "the larger of the two");
        for (body, code) in [
            (
                r#"{"model":"m","messages":[],"max_tokens":1e9}"#,
                "invalid_max_tokens",
            ),
            (
                r#"{"model":"m","messages":[],"max_tokens":"9"}"#,
                "invalid_max_tokens",
            ),
            (
                r#"{"model":"m","messages":[],"max_completion_tokens":-1}"#,
                "invalid_max_tokens",
            ),
            (r#"{"model":"m","messages":[],"n":0}"#, "invalid_n"),
            (r#"{"model":"m","messages":[],"n":2.5}"#, "invalid_n"),
        ] {
            assert_eq!(parse(body).err().map(|e| e.code), Some(code), "{body}");
        }
    }
}
