//! Reading what the gateway needs from a request body without decoding the rest, and rewriting
//! it only when something must change.
//!
//! The body is split once into its top-level fields, each kept as raw JSON text borrowed from
//! the request (by [`crate::json::members`]; serde_json decides on bodies that scan refuses, and
//! words the error). Routing reads `model`, `stream` and `stream_options`; every other field (the
//! messages, tools, images) is never decoded. When nothing must change the original bytes go
//! upstream untouched; otherwise the fields are re-joined, copying raw slices, with only the
//! changed values written anew.

use crate::error::ApiError;
use bytes::Bytes;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

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
    /// Path below the deployment's base URL.
    pub fn upstream_path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/chat/completions",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
        }
    }

    /// Position in per-API tables (chat, completions, embeddings).
    pub fn index(self) -> usize {
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
    pub fn as_str(self) -> &'static str {
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
    pub model: Cow<'a, str>,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Whether the client asked for `stream_options.include_usage`.
    pub include_usage: bool,
    /// `max_completion_tokens` (or the older `max_tokens`), when set.
    pub max_tokens: Option<u64>,
}

struct Fields<'a>(Vec<(Cow<'a, str>, &'a str)>);

impl<'de> serde::Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(CowStr(key)) = map.next_key::<CowStr<'de>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    fields.push((key, value.get()));
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(V)
    }
}

/// A string borrowed from the body when it has no escapes (serde's own `Cow<str>` always
/// allocates).
struct CowStr<'a>(Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for CowStr<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CowStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

#[derive(serde::Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

impl<'a> ParsedRequest<'a> {
    /// The raw JSON of top-level field `name`, if present.
    pub fn field(&self, name: &str) -> Option<&'a str> {
        self.fields.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }

    /// Splits `body` and checks the fields the gateway relies on.
    pub fn parse(body: &'a [u8], endpoint: Endpoint) -> Result<Self, ApiError> {
        let mut fields = Vec::with_capacity(8);
        if crate::json::members(body, |k, v| fields.push((k, v))).is_err() {
            fields = serde_json::from_slice::<Fields<'a>>(body)
                .map_err(|e| {
                    ApiError::bad_request(
                        "invalid_json",
                        format!("The request body is not valid JSON ({e}). Send a JSON object with `model` and `{}`.", endpoint.required_field()),
                    )
                })?
                .0;
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
        let max_tokens = get("max_completion_tokens")
            .or_else(|| get("max_tokens"))
            .and_then(|v| v.parse::<u64>().ok());
        Ok(Self {
            max_tokens,
            fields,
            model,
            stream,
            include_usage,
        })
    }

    /// The texts of an embeddings request's `input` (a string, or an array of strings); token
    /// arrays count as one input each.
    pub fn embedding_inputs(&self) -> Vec<String> {
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
    pub fn upstream_body(&self, original: &Bytes, upstream_model: &str) -> Bytes {
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
}
