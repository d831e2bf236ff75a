//! A validating scan of a JSON object's top-level members, for the request path.
//!
//! The gateway reads a few fields of every request body (`model`, `stream`) and of every
//! complete response (`usage`), and must still refuse a body that isn't JSON. serde_json does
//! both, through its visitor machinery: splitting a small chat request into `RawValue` fields
//! cost 5,100 instructions, and reading a 289-byte response's usage 5,900 (`bench/instructions.sh`;
//! jiter and sonic-rs measured the same as serde_json for the latter). This scan checks the
//! same grammar in one pass, strings eight bytes at a time, and hands each top-level member to
//! the caller as raw text borrowed from the body: 1,600 for the request, 3,500 for the
//! response (whose `usage` serde_json then decodes, 1,300 more).
//!
//! It is a fast path, not a second authority: whatever it refuses (bad JSON, a top level that
//! isn't an object, deeper nesting than `MAX_DEPTH`, a key with an escape that doesn't
//! decode) the caller hands to serde_json, which decides and says why. So the scan may refuse
//! more than serde_json does, never less; the tests below check that on mutated bodies.
//!
//! Values are checked the way serde_json checks values it skips (`IgnoredAny`, `RawValue`):
//! `\u` escapes must be four hex digits, but a lone surrogate is not an error there.
//!
//! **One meaning per request body.** JSON parsers disagree on an object that repeats a name:
//! serde_json's `Value` and Python's `json` (so vLLM and pydantic) keep the last copy, this
//! scan hands over every copy, others keep the first. A gateway that read `model` or
//! `max_tokens` from one copy while the upstream read the other would authorize, price and
//! reserve a request the upstream never ran. So [`unique_members`], which reads requests, also
//! refuses any object, at any depth, whose members repeat a name. The fast scan compares keys
//! as raw bytes and so refuses any key with an escape (and a body with more names open at once,
//! across its nested objects, than its 64 slots on the stack: pairwise checks, so bounded work
//! per name); the caller's strict serde_json path then decides, comparing
//! names after unescaping (`"mod\u0065l"` is `model`). It also refuses a string with half a
//! surrogate pair (`"\ud800"`), which serde_json can't decode and Python reads as a lone
//! surrogate: the estimate and the upstream would read different text.

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

/// How deeply containers may nest below the top-level object before the scan gives up and
/// leaves the body to serde_json (which walks skipped values to any depth). At most 128: the
/// nesting is kept as bits of a `u128`.
const MAX_DEPTH: u32 = 100;
const _: () = assert!(MAX_DEPTH <= 128);

/// The scan didn't accept the body; serde_json must decide.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused;

type Result<T = (), E = Refused> = std::result::Result<T, E>;

/// Scans `body` as one JSON object and calls `each(key, raw_value)` for each of its members in
/// order (duplicates included), with the key decoded and the value as its raw JSON text.
/// `each` may have been called for some members when the scan refuses.
pub(crate) fn members<'a>(body: &'a [u8], each: impl FnMut(Cow<'a, str>, &'a str)) -> Result {
    scan::<0>(body, each)
}

/// [`members`] for a request body: also refuses an object anywhere in it that repeats a member
/// name, and (so that names compare as bytes) any key with an escape. See the module doc.
pub fn unique_members<'a>(body: &'a [u8], each: impl FnMut(Cow<'a, str>, &'a str)) -> Result {
    scan::<KEY_SLOTS>(body, each)
}

/// How many names [`unique_members`] keeps at once (those of every object still open, a
/// marker each), on the stack; a body that needs more goes to serde_json.
const KEY_SLOTS: usize = 64;

/// Scans with room for `SLOTS` names; with none, repeats are not looked for.
fn scan<'a, const SLOTS: usize>(
    body: &'a [u8],
    mut each: impl FnMut(Cow<'a, str>, &'a str),
) -> Result {
    // Checked once up front (a fast loop over ASCII), so strings need no UTF-8 work below.
    let text = std::str::from_utf8(body).map_err(|_| Refused)?;
    let mut s = Scanner::<SLOTS> {
        b: text.as_bytes(),
        i: 0,
        keys: [(0, 0); SLOTS],
        held: 0,
    };
    s.ws();
    s.eat(b'{')?;
    s.ws();
    if s.peek() == b'}' {
        s.i += 1;
    } else {
        loop {
            let key = s.key(text)?;
            s.ws();
            s.eat(b':')?;
            s.ws();
            let start = s.i;
            s.value()?;
            each(key, text.get(start..s.i).ok_or(Refused)?);
            s.ws();
            match s.next() {
                b',' => s.ws(),
                b'}' => break,
                _ => return Err(Refused),
            }
        }
    }
    s.ws();
    if s.i == s.b.len() {
        Ok(())
    } else {
        Err(Refused)
    }
}

struct Scanner<'a, const SLOTS: usize> {
    b: &'a [u8],
    i: usize,
    /// With `UNIQUE`: the names (byte ranges, quotes excluded) of the members seen so far in
    /// each open object, innermost last, each object's behind a [`OPEN`] marker.
    keys: [(u32, u32); SLOTS],
    /// How many of `keys` are in use.
    held: usize,
}

/// The marker in [`Scanner::keys`] where an object's names begin.
const OPEN: (u32, u32) = (u32::MAX, u32::MAX);

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// A word with the high bit set in each byte that is `"`, `\` or below 0x20 (the bytes a
/// string's scan must stop at). Only the lowest flagged byte is exact (a borrow can flag a
/// byte above it), and only the lowest is used.
#[inline]
fn specials(w: u64) -> u64 {
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    zero(w ^ (ONES * u64::from(b'"')))
        | zero(w ^ (ONES * u64::from(b'\\')))
        | (w.wrapping_sub(ONES * 0x20) & !w & HIGHS)
}

/// How many bytes at the start of `rest` a string's scan can pass over, eight at a time: up to
/// the first special byte (see [`specials`]), or to within 8 of the end.
#[inline(always)]
fn plain_prefix(rest: &[u8]) -> usize {
    let mut n = 0;
    for chunk in rest.chunks_exact(8) {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let found = specials(u64::from_le_bytes(word));
        if found != 0 {
            return n + (found.trailing_zeros() / 8) as usize;
        }
        n += 8;
    }
    n
}

impl<const SLOTS: usize> Scanner<'_, SLOTS> {
    /// Whether repeated names are refused.
    const UNIQUE: bool = SLOTS > 0;

    /// Records a name (or [`OPEN`]); refuses when the slots are full.
    #[inline(always)]
    fn hold(&mut self, key: (u32, u32)) -> Result {
        *self.keys.get_mut(self.held).ok_or(Refused)? = key;
        self.held += 1;
        Ok(())
    }

    /// The current byte, or 0 past the end (0 is never valid where a byte is looked at: the
    /// scan refuses it).
    #[inline(always)]
    fn peek(&self) -> u8 {
        self.b.get(self.i).copied().unwrap_or(0)
    }

    #[inline(always)]
    fn next(&mut self) -> u8 {
        let c = self.peek();
        self.i += 1;
        c
    }

    #[inline(always)]
    fn eat(&mut self, c: u8) -> Result {
        if self.next() == c {
            Ok(())
        } else {
            Err(Refused)
        }
    }

    #[inline(always)]
    fn ws(&mut self) {
        loop {
            // Most JSON has no whitespace between tokens: one compare in the common case.
            let c = self.peek();
            if c > b' ' || !matches!(c, b' ' | b'\n' | b'\r' | b'\t') {
                return;
            }
            self.i += 1;
        }
    }

    /// A member's key, from its opening quote; borrowed unless it has escapes, which
    /// serde_json decodes.
    #[inline(always)]
    fn key<'t>(&mut self, text: &'t str) -> Result<Cow<'t, str>> {
        let start = self.i;
        self.eat(b'"')?;
        let escaped = self.string_rest()?;
        if Self::UNIQUE {
            self.unique_key(start, escaped)?;
        }
        let raw = text.get(start..self.i).ok_or(Refused)?;
        if escaped {
            serde_json::from_str::<String>(raw)
                .map(Cow::Owned)
                .map_err(|_| Refused)
        } else {
            Ok(Cow::Borrowed(&raw[1..raw.len() - 1]))
        }
    }

    /// The rest of a string after its opening quote, through its closing quote; whether it
    /// had escapes.
    #[inline(always)]
    fn string_rest(&mut self) -> Result<bool> {
        let mut escaped = false;
        loop {
            self.i += plain_prefix(self.b.get(self.i..).unwrap_or_default());
            if self.i >= self.b.len() {
                return Err(Refused);
            }
            match self.next() {
                b'"' => return Ok(escaped),
                b'\\' => {
                    escaped = true;
                    match self.next() {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                        b'u' => {
                            let unit = self.hex4()?;
                            // A request's strings must decode (serde_json, which reads the
                            // messages for the estimate, refuses half a surrogate pair).
                            if Self::UNIQUE && (0xD800..0xE000).contains(&unit) {
                                if unit >= 0xDC00
                                    || self.b.get(self.i..self.i + 2) != Some(&b"\\u"[..])
                                {
                                    return Err(Refused);
                                }
                                self.i += 2;
                                if !(0xDC00..0xE000).contains(&self.hex4()?) {
                                    return Err(Refused);
                                }
                            }
                        }
                        _ => return Err(Refused),
                    }
                }
                c if c < 0x20 => return Err(Refused),
                // An ordinary byte in the last few (fewer than 8) of the body.
                _ => {}
            }
        }
    }

    /// Four hex digits (of a `\u` escape), as a UTF-16 code unit.
    #[inline(always)]
    fn hex4(&mut self) -> Result<u32> {
        let hex = self.b.get(self.i..self.i + 4).ok_or(Refused)?;
        let mut unit = 0;
        for &h in hex {
            unit = unit * 16 + char::from(h).to_digit(16).ok_or(Refused)?;
        }
        self.i += 4;
        Ok(unit)
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(&mut self) -> Result {
        let start = self.i;
        if self.peek() == b'-' {
            self.i += 1;
        }
        match self.next() {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return Err(Refused),
        }
        if self.peek() == b'.' {
            self.i += 1;
            self.some_digits()?;
        }
        let mut exponent = false;
        if let b'e' | b'E' = self.peek() {
            exponent = true;
            self.i += 1;
            if let b'+' | b'-' = self.peek() {
                self.i += 1;
            }
            self.some_digits()?;
        }
        // A request's numbers must be numbers serde_json can hold (it refuses `1e400`, which
        // Python reads as infinity). Short ones without an exponent always are.
        if Self::UNIQUE && (exponent || self.i - start > 15) {
            let text = std::str::from_utf8(&self.b[start..self.i]).map_err(|_| Refused)?;
            if !text.parse::<f64>().is_ok_and(f64::is_finite) {
                return Err(Refused);
            }
        }
        Ok(())
    }

    #[inline]
    fn digits(&mut self) {
        while let b'0'..=b'9' = self.peek() {
            self.i += 1;
        }
    }

    fn some_digits(&mut self) -> Result {
        let start = self.i;
        self.digits();
        if self.i > start { Ok(()) } else { Err(Refused) }
    }

    fn literal(&mut self, word: &[u8]) -> Result {
        if self.b.get(self.i..self.i + word.len()) == Some(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(Refused)
        }
    }

    /// One value starting at the current byte (no whitespace before it), through its last
    /// byte. Nested containers are followed with a bit stack (1 = object) instead of
    /// recursion.
    fn value(&mut self) -> Result {
        let mut stack: u128 = 0;
        let mut depth: u32 = 0;
        loop {
            // A value starts here.
            match self.peek() {
                open @ (b'{' | b'[') => {
                    self.i += 1;
                    self.ws();
                    let close = if open == b'{' { b'}' } else { b']' };
                    if self.peek() == close {
                        self.i += 1;
                    } else {
                        depth += 1;
                        if depth > MAX_DEPTH {
                            return Err(Refused);
                        }
                        stack = (stack << 1) | u128::from(open == b'{');
                        if open == b'{' {
                            if Self::UNIQUE {
                                self.hold(OPEN)?;
                            }
                            self.member_key()?;
                        }
                        continue;
                    }
                }
                b'"' => {
                    self.i += 1;
                    self.string_rest()?;
                }
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'n' => self.literal(b"null")?,
                b'-' | b'0'..=b'9' => self.number()?,
                _ => return Err(Refused),
            }
            // A value ended: close what it ends, up to the next value, if any.
            loop {
                if depth == 0 {
                    return Ok(());
                }
                self.ws();
                let in_object = stack & 1 == 1;
                match self.next() {
                    b',' => {
                        self.ws();
                        if in_object {
                            self.member_key()?;
                        }
                        break;
                    }
                    b'}' if in_object => {
                        if Self::UNIQUE {
                            while self.held > 0 {
                                self.held -= 1;
                                if self.keys[self.held] == OPEN {
                                    break;
                                }
                            }
                        }
                    }
                    b']' if !in_object => {}
                    _ => return Err(Refused),
                }
                stack >>= 1;
                depth -= 1;
            }
        }
    }

    /// Checks the name just read (from its opening quote at `start` to the current byte) against
    /// the names before it in its object, and records it.
    #[inline(always)]
    fn unique_key(&mut self, start: usize, escaped: bool) -> Result {
        if escaped {
            return Err(Refused);
        }
        let (from, to) = (start + 1, self.i - 1);
        let name = &self.b[from..to];
        for &(a, b) in self.keys[..self.held].iter().rev() {
            if (a, b) == OPEN {
                break;
            }
            if b - a == name.len() as u32 && &self.b[a as usize..b as usize] == name {
                return Err(Refused);
            }
        }
        // Bodies are at most a few MiB (`--max-body-bytes`); a larger one isn't checked here.
        let from = u32::try_from(from).map_err(|_| Refused)?;
        self.hold((from, to as u32))
    }

    /// A nested object's key and colon, up to its value.
    #[inline(always)]
    fn member_key(&mut self) -> Result {
        let start = self.i;
        self.eat(b'"')?;
        let escaped = self.string_rest()?;
        if Self::UNIQUE {
            self.unique_key(start, escaped)?;
        }
        self.ws();
        self.eat(b':')?;
        self.ws();
        Ok(())
    }
}

/// Why the strict path refused a request body.
#[derive(Debug)]
pub enum Invalid {
    /// Not one JSON object (serde_json's words).
    Json(serde_json::Error),
    /// An object repeats a member name (serde_json's words: the name and where).
    Duplicate(serde_json::Error),
}

/// The authority behind [`unique_members`]: serde_json reads `body` as one object and returns
/// its members (key decoded, raw value), refusing an object at any depth that repeats a name
/// after unescaping, and any string that doesn't decode (half a surrogate pair). Bodies nested
/// deeper than serde_json's limit (128) are refused.
pub fn strict_members(body: &[u8]) -> std::result::Result<Vec<(Cow<'_, str>, &str)>, Invalid> {
    let classify = |e: serde_json::Error| {
        if e.classify() == serde_json::error::Category::Data && e.to_string().contains(REPEATED) {
            Invalid::Duplicate(e)
        } else {
            Invalid::Json(e)
        }
    };
    let fields = serde_json::from_slice::<Fields<'_>>(body)
        .map_err(classify)?
        .0;
    for (_, raw) in &fields {
        if raw.starts_with(['{', '[']) {
            serde_json::from_str::<Unique>(raw).map_err(classify)?;
        }
    }
    Ok(fields)
}

/// A string borrowed from the body when it has no escapes (serde's own `Cow<str>` always
/// allocates).
pub(crate) struct CowStr<'a>(pub Cow<'a, str>);

impl<'de> Deserialize<'de> for CowStr<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CowStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(
                self,
                v: &'de str,
            ) -> std::result::Result<Self::Value, E> {
                Ok(CowStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
                Ok(CowStr(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// How the strict path words a repeated name (and how its caller tells that error apart).
const REPEATED: &str = "appears more than once in one object";

fn duplicate<E: de::Error>(name: &str) -> E {
    let shown: String = name.chars().take(64).collect();
    E::custom(format_args!("the field `{shown}` {REPEATED}"))
}

/// The top-level members, as raw values, refusing a repeated name.
struct Fields<'a>(Vec<(Cow<'a, str>, &'a str)>);

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
                let mut seen = HashSet::new();
                while let Some(CowStr(key)) = map.next_key::<CowStr<'de>>()? {
                    if !seen.insert(key.clone()) {
                        return Err(duplicate(&key));
                    }
                    let value: &'de RawValue = map.next_value()?;
                    fields.push((key, value.get()));
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(V)
    }
}

/// Any JSON value, checked for objects that repeat a name.
struct Unique;

impl<'de> Deserialize<'de> for Unique {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Unique;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> std::result::Result<Unique, E> {
                Ok(Unique)
            }
            fn visit_i64<E>(self, _: i64) -> std::result::Result<Unique, E> {
                Ok(Unique)
            }
            fn visit_u64<E>(self, _: u64) -> std::result::Result<Unique, E> {
                Ok(Unique)
            }
            fn visit_f64<E>(self, _: f64) -> std::result::Result<Unique, E> {
                Ok(Unique)
            }
            fn visit_str<E>(self, _: &str) -> std::result::Result<Unique, E> {
                Ok(Unique)
            }
            fn visit_unit<E>(self) -> std::result::Result<Unique, E> {
                Ok(Unique)
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Unique, A::Error> {
                while seq.next_element::<Unique>()?.is_some() {}
                Ok(Unique)
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Unique, A::Error> {
                let mut seen = HashSet::new();
                while let Some(CowStr(key)) = map.next_key::<CowStr<'de>>()? {
                    if seen.contains(&key) {
                        return Err(duplicate(&key));
                    }
                    seen.insert(key);
                    map.next_value::<Unique>()?;
                }
                Ok(Unique)
            }
        }
        d.deserialize_any(V)
    }
}

/// Bodies made from `seeds` by a few random edits each (bytes replaced, removed, inserted,
/// tokens inserted, spans copied, truncation), for tests that compare a fast path with
/// serde_json. Deterministic for a given `seed` (xorshift).
#[cfg(test)]
pub(crate) fn mutations<'s>(
    seeds: &'s [&'s [u8]],
    rounds: usize,
    seed: u64,
) -> impl Iterator<Item = Vec<u8>> + 's {
    // JSON's own bytes, whitespace JSON has and hasn't (\x0b, \x0c), escapes it has and hasn't
    // (\v, \x), hex digits of both cases, control and non-ASCII bytes.
    let alphabet: &[u8] =
        b"{}[]\":,\\/ \t\n\r\x0b\x0c0123456789-+.eEtrufalsnbvxABCDEFabcdef\x00\x1f\x7f\xc3\xa9\xff";
    // Multi-byte pieces: escapes, a key that decodes to `usage`, a byte-order mark, UTF-8 that
    // isn't (a CESU-8 surrogate, an overlong NUL, a lone continuation byte).
    let tokens: &[&[u8]] = &[
        b"\\u",
        b"\\u00e9",
        b"\\ud800",
        b"\\uDC00",
        b"\"us\\u0061ge\"",
        b"\"usage\":",
        b"\xef\xbb\xbf",
        b"\xed\xa0\x80",
        b"\xc0\x80",
        b"\x80",
        b"\xf4\x90\x80\x80",
        b"1e400",
        b"-0.0E-0",
        b"18446744073709551616",
        b"null",
        b"[[",
        b"]]",
        b"\"model\":\"x\",",
        b",\"role\":1",
        b"\"mod\\u0065l\":",
    ];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(0x2545_F491_4F6C_DD1D);
    let mut rand = move |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    (0..rounds).map(move |round| {
        let mut body = seeds[round % seeds.len()].to_vec();
        for _ in 0..=rand(3) {
            let at = rand(body.len() + 1);
            match rand(7) {
                0 if at < body.len() => body[at] = alphabet[rand(alphabet.len())],
                1 if at < body.len() => body[at] = rand(256) as u8,
                2 if at < body.len() => {
                    body.remove(at);
                }
                3 => body.insert(at, alphabet[rand(alphabet.len())]),
                4 => {
                    let t = tokens[rand(tokens.len())];
                    body.splice(at..at, t.iter().copied());
                }
                5 => body.truncate(at),
                _ => {
                    let end = (at + rand(12)).min(body.len());
                    let span = body[at..end].to_vec();
                    let to = rand(body.len() + 1);
                    body.splice(to..to, span);
                }
            }
        }
        body
    })
}

#[cfg(test)]
#[expect(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    /// What serde_json makes of `body`: its top-level members as (key, raw value), or `None`.
    fn serde_members(body: &[u8]) -> Option<Vec<(String, String)>> {
        struct Members(Vec<(String, String)>);
        impl<'de> serde::Deserialize<'de> for Members {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = Members;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("an object")
                    }
                    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Members, A::Error> {
                        let mut out = Vec::new();
                        while let Some(k) = m.next_key::<String>()? {
                            let v: &RawValue = m.next_value()?;
                            out.push((k, v.get().to_owned()));
                        }
                        Ok(Members(out))
                    }
                }
                d.deserialize_map(V)
            }
        }
        serde_json::from_slice::<Members>(body).ok().map(|m| m.0)
    }

    fn scan(body: &[u8]) -> Option<Vec<(String, String)>> {
        let mut out = Vec::new();
        members(body, |k, v| out.push((k.into_owned(), v.to_owned())))
            .ok()
            .map(|()| out)
    }

    #[test]
    fn members_are_raw_text_and_keys_decoded() {
        let body = br#" { "model" : "m", "n":-1.5e+3, "x\u0041":[ {"a":[]} , null,true,false ] ,"s":"q\"\\\u00e9" } "#;
        let got = scan(body).unwrap();
        assert_eq!(
            got,
            vec![
                ("model".into(), r#""m""#.into()),
                ("n".into(), "-1.5e+3".into()),
                ("xA".into(), r#"[ {"a":[]} , null,true,false ]"#.into()),
                ("s".into(), r#""q\"\\\u00e9""#.into()),
            ]
        );
        assert_eq!(scan(b"{}").unwrap(), vec![]);
        assert_eq!(serde_members(body), Some(got));
    }

    #[test]
    fn refuses_what_is_not_one_object() {
        for bad in [
            &b""[..],
            b"[]",
            b"\"s\"",
            b"{",
            b"{}x",
            b"{} {}",
            b"{\"a\":}",
            b"{\"a\" 1}",
            b"{\"a\":1,}",
            b"{,}",
            b"{\"a\":01}",
            b"{\"a\":1.}",
            b"{\"a\":.5}",
            b"{\"a\":1e}",
            b"{\"a\":-}",
            b"{\"a\":tru}",
            b"{\"a\":[1,]}",
            b"{\"a\":[1}",
            b"{\"a\":{\"b\"}}",
            b"{\"a\":\"\\x\"}",
            b"{\"a\":\"\\u12g4\"}",
            b"{\"a\":\"tab\there\"}",
            b"{\"a\":\"\xff\"}",
            b"{\"a\":\"unterminated}",
            b"<html>bad gateway</html>",
            b"{\"a\":1}\x0c",
            b"{\"a\"\x0c:1}",
            b"\xef\xbb\xbf{}",
            b"{\"a\":\"\\v\"}",
            b"{\"a\":\"\x0b\"}",
            b"{\"\\ud800\":1}",
            b"{\"a\":-01}",
            b"{\"a\":1e+}",
            b"{\"a\":nul}",
            b"{\"a\":\"\\u00\"}",
            b"{\"a\":\"\xed\xa0\x80\"}",
        ] {
            assert_eq!(scan(bad), None, "{}", String::from_utf8_lossy(bad));
            assert_eq!(serde_members(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn deep_nesting_is_left_to_serde() {
        let deep = |n: usize| format!("{{\"a\":{}1{}}}", "[".repeat(n), "]".repeat(n));
        assert!(scan(deep(MAX_DEPTH as usize).as_bytes()).is_some());
        assert!(scan(deep(MAX_DEPTH as usize + 1).as_bytes()).is_none());
        assert!(scan(deep(10_000).as_bytes()).is_none());
    }

    #[test]
    fn long_strings_are_scanned_in_words_to_the_exact_byte() {
        for len in 0..40 {
            for special in ["\"", "\\n", "\u{1}", "é"] {
                let s = format!("{}{special}{}", "a".repeat(len), "b".repeat(len % 9));
                let body = serde_json::to_string(&serde_json::json!({ "k": s })).unwrap();
                assert_eq!(
                    scan(body.as_bytes()),
                    serde_members(body.as_bytes()),
                    "{body}"
                );
                let raw = format!("{{\"k\":\"{}{special}\"}}", "a".repeat(len));
                assert_eq!(scan(raw.as_bytes()), serde_members(raw.as_bytes()), "{raw}");
            }
        }
    }

    /// Mutated bodies: the scan never accepts what serde_json refuses, and when it accepts,
    /// it sees the same members. Deterministic (a fixed xorshift seed).
    #[test]
    fn agrees_with_serde_json_on_mutated_bodies() {
        let seeds: &[&[u8]] = &[
            br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi \"there\"\n"}],"stream":true,"stream_options":{"include_usage":true},"max_tokens":100,"temperature":0.7}"#,
            br#"{"id":"chatcmpl-1","object":"chat.completion","created":1764606000,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Caf\u00e9 \ud83d\ude00 ok"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":25,"total_tokens":37,"prompt_tokens_details":{"cached_tokens":0}}}"#,
            b"{ \"a\" : [ 1 , -2.5E-3 , 0 , 1e9 , [ ] , { } , \"\xc3\xa9\" ] , \"b\" : { \"c\" : null } }\n",
            br#"{"input":["one","two"],"model":"e","encoding_format":"float","k\\ey":"\/"}"#,
        ];
        let (mut accepted, mut refused_both, mut only_serde) = (0, 0, 0);
        for body in (0..3).flat_map(|seed| mutations(seeds, 30_000, seed)) {
            match (scan(&body), serde_members(&body)) {
                (Some(a), Some(b)) => {
                    assert_eq!(a, b, "{}", String::from_utf8_lossy(&body));
                    accepted += 1;
                }
                (Some(_), None) => panic!(
                    "scan accepted what serde_json refuses: {}",
                    String::from_utf8_lossy(&body)
                ),
                (None, Some(_)) => only_serde += 1,
                (None, None) => refused_both += 1,
            }
        }
        // The mutations must exercise both sides, or the test proves little.
        assert!(
            accepted > 5_000 && refused_both > 5_000,
            "{accepted} {refused_both}"
        );
        // serde_json accepts nothing the scan refuses here (only bodies nested deeper than
        // MAX_DEPTH, which these mutations don't reach).
        assert_eq!(only_serde, 0);
    }

    fn unique(body: &[u8]) -> Option<Vec<(String, String)>> {
        let mut out = Vec::new();
        unique_members(body, |k, v| out.push((k.into_owned(), v.to_owned())))
            .ok()
            .map(|()| out)
    }

    fn strict(body: &[u8]) -> Result<Vec<(String, String)>, bool> {
        match strict_members(body) {
            Ok(m) => Ok(m
                .into_iter()
                .map(|(k, v)| (k.into_owned(), v.to_owned()))
                .collect()),
            Err(Invalid::Duplicate(_)) => Err(true),
            Err(Invalid::Json(_)) => Err(false),
        }
    }

    #[test]
    fn a_repeated_name_is_refused_at_any_depth_and_after_unescaping() {
        for body in [
            &br#"{"model":"cheap","messages":[],"model":"premium"}"#[..],
            br#"{"model":"m","stream_options":{"include_usage":true,"include_usage":false}}"#,
            br#"{"model":"m","messages":[{"role":"user","content":"a"},{"role":"user","role":"system","content":"b"}]}"#,
            br#"{"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","type":"x"}}}]}"#,
            br#"{"model":"cheap","mod\u0065l":"premium"}"#,
            br#"{"a":{"b\/":1,"b/":2}}"#,
        ] {
            let text = String::from_utf8_lossy(body);
            assert_eq!(unique(body), None, "fast scan: {text}");
            assert_eq!(strict(body).err(), Some(true), "strict: {text}");
        }
    }

    #[test]
    fn the_same_name_in_different_objects_is_fine() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b","x":{"role":1,"content":{"role":[]}}}],"role":{"model":2},"content":[{},{}]}"#;
        let fast = unique(body).expect("the fast scan accepts it");
        assert_eq!(strict(body), Ok(fast.clone()));
        assert_eq!(scan(body), Some(fast));
    }

    #[test]
    fn escaped_names_and_large_objects_are_left_to_serde() {
        // Not a repeat, but the fast scan can't tell without decoding: serde decides.
        let escaped = br#"{"model":"m","x":{"\u0061":1,"b":2}}"#;
        assert_eq!(unique(escaped), None);
        assert!(strict(escaped).is_ok());
        let names = |n: usize| {
            let members: Vec<String> = (0..n).map(|i| format!("\"k{i}\":{i}")).collect();
            format!("{{\"model\":\"m\",\"o\":{{{}}}}}", members.join(","))
        };
        // `model`, `o`, the marker of `o`'s object, and its names fill the slots.
        assert!(unique(names(KEY_SLOTS - 3).as_bytes()).is_some());
        let big = names(KEY_SLOTS - 2);
        assert_eq!(unique(big.as_bytes()), None);
        assert!(strict(big.as_bytes()).is_ok());
        // A repeat past the fast scan's reach is still found.
        let repeated = big.replace("\"k3\":3", "\"k61\":3");
        assert_eq!(strict(repeated.as_bytes()).err(), Some(true));
    }

    /// The request scan against its authority: never accepts what the strict path refuses,
    /// sees the same members when it accepts, and refuses every repeat the strict path finds.
    #[test]
    fn unique_scan_agrees_with_the_strict_path_on_mutated_bodies() {
        let seeds: &[&[u8]] = &[
            br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi \"there\"\n"},{"role":"assistant","content":"ok"}],"stream":true,"stream_options":{"include_usage":true},"max_tokens":100,"temperature":0.7}"#,
            br#"{"model":"m","tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"a":{"type":"string"}}}}}],"messages":[]}"#,
        ];
        let (mut accepted, mut duplicates) = (0, 0);
        for body in (0..3).flat_map(|seed| mutations(seeds, 30_000, seed)) {
            let text = String::from_utf8_lossy(&body);
            match (unique(&body), strict(&body)) {
                (Some(a), Ok(b)) => {
                    assert_eq!(a, b, "{text}");
                    accepted += 1;
                }
                (Some(_), Err(_)) => panic!("scan accepted what the strict path refuses: {text}"),
                (None, Err(true)) => duplicates += 1,
                (None, _) => {}
            }
        }
        assert!(
            accepted > 5_000 && duplicates > 20,
            "{accepted} {duplicates}"
        );
    }
}
