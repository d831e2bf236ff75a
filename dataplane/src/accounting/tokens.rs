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
//!
//! **The tokenizer** ([`Vocab`]) is tiktoken's algorithm on compact tables: the text is split
//! by the encoding's regex (as bpe-openai splits it), and each piece is merged byte pair by
//! byte pair, the pair that makes the lowest-ranked token first (the leftmost of equals), as
//! tiktoken's `byte_pair_merge` does; the count is the parts left. Candidate merges sit in a
//! heap, so a piece of n bytes costs O(n log n) rather than tiktoken's O(n²).
//!
//! `build.rs` makes the tables from `data/*.tiktoken.gz` and the binary embeds them, so they
//! sit in its read-only pages and are read in only as counts touch them: every token's bytes
//! in rank order and where each ends, and the splitting regex compiled to a dense DFA
//! (regex-automata's serialized form, checked when first used), which needs no cache per
//! thread and no regex compilation at run time, whose memory the allocator would keep. The one
//! table built at first use maps a token's bytes to its rank (a `hashbrown::HashTable` of
//! ranks, 4 bytes a token and a control byte). Resident with both encodings used: about 12 MB,
//! 3 of them heap (see docs/benchmarks.md); bpe-openai's own encodings keep search automata
//! over the whole vocabulary, tens of MB each. A piece longer than [`MAX_PIECE`] bytes (no natural text has one) is counted in chunks of that size, which
//! bounds the memory a count takes.
//! The counts equal bpe-openai's (itself tested against tiktoken): see the tests below and the
//! fuzz target `tokens_count`.

use crate::api::request::{Endpoint, ParsedRequest};
use serde_json::Value;
use std::hash::BuildHasher;

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
    pub(crate) fn of(upstream_model: &str) -> Self {
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
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// The longest piece merged whole; longer ones are counted in chunks of this many bytes.
pub(crate) const MAX_PIECE: usize = 64 << 10;

/// A tiktoken encoding: its pre-tokenizer and its vocabulary's ranks (see the module docs), all
/// in tables `build.rs` made, embedded in the binary.
pub struct Vocab {
    /// Every token's bytes, in rank order.
    bytes: &'static [u8],
    /// Where each token ends in `bytes` (little-endian u32s); token `r` starts where token
    /// `r - 1` ends.
    ends: &'static [u8],
    /// Ranks, found by their token's bytes: the one table built at first use, 4 bytes a token
    /// and hashbrown's control bytes (a `HashTable` of ranks, hashed by the token's bytes).
    ranks: hashbrown::HashTable<u32>,
    hasher: hashbrown::DefaultHashBuilder,
    /// The splitting regex, a dense DFA of three patterns, as bpe-openai writes tiktoken's:
    /// the encoding's own (0), its look-ahead `\s+(?!\S)` as `\s+\s` whose last character is
    /// dropped from the match (1), and `\s+` (2).
    pre: regex_automata::dfa::dense::DFA<&'static [u32]>,
}

/// The splitting pattern whose match ends with a look-ahead character (see [`Vocab::pre`]).
const LOOKAHEAD: usize = 1;

impl std::fmt::Debug for Vocab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Vocab({} tokens)", self.ends.len() / 4)
    }
}

/// The little-endian u32 at index `i` of `table`.
fn u32_at(table: &[u8], i: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&table[i * 4..i * 4 + 4]);
    u32::from_le_bytes(word)
}

impl Vocab {
    fn new(bytes: &'static [u8], ends: &'static [u8], dfa: &'static [u8]) -> Self {
        let (pre, _) = regex_automata::dfa::dense::DFA::from_bytes(dfa)
            .expect("build.rs serializes the DFA for this target");
        let mut vocab = Self {
            bytes,
            ends,
            ranks: hashbrown::HashTable::with_capacity(ends.len() / 4),
            hasher: hashbrown::DefaultHashBuilder::default(),
            pre,
        };
        let mut ranks = std::mem::take(&mut vocab.ranks);
        for r in 0..(ends.len() / 4) as u32 {
            let h = vocab.hasher.hash_one(vocab.token(r));
            ranks.insert_unique(h, r, |&r: &u32| vocab.hasher.hash_one(vocab.token(r)));
        }
        vocab.ranks = ranks;
        vocab
    }

    /// The pieces of `text` (tiktoken's pre-tokenization), each matched anchored where the
    /// last one ended.
    fn split<'a>(&'a self, text: &'a str) -> impl Iterator<Item = &'a str> {
        use regex_automata::dfa::Automaton;
        let mut last = 0;
        std::iter::from_fn(move || {
            let input =
                regex_automata::Input::new(&text[last..]).anchored(regex_automata::Anchored::Yes);
            // The DFA has no quit bytes and no size limits to give up on.
            let m = self.pre.try_search_fwd(&input).ok()??;
            let start = last;
            let mut end = last + m.offset();
            if m.pattern().as_usize() == LOOKAHEAD {
                // The look-ahead character is not part of the piece.
                end -= text[start..end]
                    .chars()
                    .next_back()
                    .map_or(0, char::len_utf8);
            }
            if end == start {
                // A look-ahead pattern matches two characters at least; should one ever match
                // one, the piece keeps it.
                end = last + m.offset();
            }
            if end == start {
                return None;
            }
            last = end;
            Some(&text[start..end])
        })
    }

    fn token(&self, r: u32) -> &[u8] {
        let start = r
            .checked_sub(1)
            .map_or(0, |p| u32_at(self.ends, p as usize) as usize);
        &self.bytes[start..u32_at(self.ends, r as usize) as usize]
    }

    /// The rank of `piece` if it is a token.
    fn rank(&self, piece: &[u8]) -> Option<u32> {
        self.ranks
            .find(self.hasher.hash_one(piece), |&r| self.token(r) == piece)
            .copied()
    }

    /// Tokens of `text`, as tiktoken counts them (see the module docs for long pieces).
    pub fn count(&self, text: &str) -> usize {
        thread_local! {
            static MERGE: std::cell::RefCell<Merge> = std::cell::RefCell::new(Merge::default());
        }
        MERGE.with_borrow_mut(|m| {
            self.split(text)
                .map(|piece| {
                    piece
                        .as_bytes()
                        .chunks(MAX_PIECE)
                        .map(|chunk| self.count_piece(chunk, m))
                        .sum::<usize>()
                })
                .sum()
        })
    }

    /// Tokens of one piece: tiktoken's byte-pair merge, the pair of parts whose merge is the
    /// lowest-ranked token first (the leftmost of equals), until no pair merges into a token.
    /// Parts are a linked list by start offset, and candidate merges a heap, so a piece of
    /// n bytes costs O(n log n), not tiktoken's O(n²).
    fn count_piece(&self, piece: &[u8], m: &mut Merge) -> usize {
        let n = piece.len();
        if n <= 1 || self.rank(piece).is_some() {
            return usize::from(n > 0);
        }
        const NONE: u32 = u32::MAX;
        // next[i]: where the part starting at i ends (n for the last); pair[i]: the rank of
        // that part merged with the next one, or NONE; a merged-away part's pair is NONE.
        m.next.clear();
        m.next.extend(1..=n as u32);
        m.prev.clear();
        m.prev.extend((0..n as u32).map(|i| i.wrapping_sub(1)));
        m.pair.clear();
        m.heap.clear();
        let rank = |from: u32, to: u32| self.rank(&piece[from as usize..to as usize]);
        for i in 0..n as u32 - 1 {
            let r = rank(i, i + 2).unwrap_or(NONE);
            m.pair.push(r);
            if r != NONE {
                m.heap.push(std::cmp::Reverse((r, i)));
            }
        }
        m.pair.push(NONE);
        let mut parts = n;
        while let Some(std::cmp::Reverse((r, i))) = m.heap.pop() {
            if m.pair[i as usize] != r {
                continue; // merged away, or its neighbour changed since
            }
            let j = m.next[i as usize]; // the part merged into i
            let k = m.next[j as usize]; // where the merged part ends
            m.next[i as usize] = k;
            m.pair[j as usize] = NONE;
            if (k as usize) < n {
                m.prev[k as usize] = i;
            }
            parts -= 1;
            let after = if (k as usize) < n {
                rank(i, m.next[k as usize]).unwrap_or(NONE)
            } else {
                NONE
            };
            m.pair[i as usize] = after;
            if after != NONE {
                m.heap.push(std::cmp::Reverse((after, i)));
            }
            if i > 0 {
                let p = m.prev[i as usize];
                let before = rank(p, k).unwrap_or(NONE);
                m.pair[p as usize] = before;
                if before != NONE {
                    m.heap.push(std::cmp::Reverse((before, p)));
                }
            }
        }
        parts
    }
}

/// A piece's merge state, kept per thread between counts.
#[derive(Default)]
struct Merge {
    next: Vec<u32>,
    prev: Vec<u32>,
    pair: Vec<u32>,
    heap: std::collections::BinaryHeap<std::cmp::Reverse<(u32, u32)>>,
}

/// The vocabulary of `family`, its DFA and rank table checked at its first use (`None` for
/// [`Family::Other`]).
pub fn vocab(family: Family) -> Option<&'static Vocab> {
    macro_rules! table {
        ($name:literal) => {
            include_bytes!(concat!(env!("OUT_DIR"), "/", $name))
        };
    }
    /// The bytes of a serialized dense DFA, aligned as its u32s need.
    #[repr(C)]
    struct Aligned<B: ?Sized> {
        _align: [u32; 0],
        bytes: B,
    }
    macro_rules! dfa {
        ($name:literal) => {{
            static DFA: &Aligned<[u8]> = &Aligned {
                _align: [],
                bytes: *table!($name),
            };
            &DFA.bytes
        }};
    }
    static CL100K: std::sync::LazyLock<Vocab> = std::sync::LazyLock::new(|| {
        Vocab::new(
            table!("cl100k_base.bytes"),
            table!("cl100k_base.ends"),
            dfa!("cl100k_base.dfa"),
        )
    });
    static O200K: std::sync::LazyLock<Vocab> = std::sync::LazyLock::new(|| {
        Vocab::new(
            table!("o200k_base.bytes"),
            table!("o200k_base.ends"),
            dfa!("o200k_base.dfa"),
        )
    });
    match family {
        Family::O200k => Some(&O200K),
        Family::Cl100k => Some(&CL100K),
        Family::Other => None,
    }
}

/// Estimated prompt tokens of a request to a model of `family`.
pub(crate) fn estimate(
    family: Family,
    endpoint: Endpoint,
    req: &ParsedRequest<'_>,
    body: &[u8],
) -> u64 {
    let bytes_estimate = (body.len() as u64 / 4).max(1);
    let Some(tokenizer) = vocab(family) else {
        return bytes_estimate;
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
    match vocab(family) {
        Some(v) => v.count(text) as u64,
        None => (text.len() as u64).div_ceil(4),
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

    /// Texts of every kind the splitting regexes tell apart: words and contractions in cases,
    /// numbers, punctuation, runs of spaces and newlines, code, JSON, non-Latin scripts, emoji,
    /// combining marks.
    fn samples() -> Vec<String> {
        let mut v: Vec<String> = [
            "Hello, world! How's it going? I'd say we'll see.",
            "THE QUICK brown Fox's JUMPS; 1234567 + 89 = 1234656.",
            "  leading and   inner   spaces \n\n\ttabs\r\n and \u{a0}nbsp   ",
            "fn main() {\n    println!(\"{}\", x[0] /* c */ >> 2);\n}\n",
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"n":2}"#,
            "Ceci n'est pas une pipe. Über straße naïve café — «quotes» …",
            "日本語のテキストと中文字符，한국어 문장입니다.",
            "Привет, мир! Γειά σου Κόσμε! مرحبا بالعالم שלום עולם",
            "emoji 👋🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵 and e\u{301} combining",
            "https://example.com/path?query=1&x=y#frag user@example.org",
            "0x7fffffff 3.14159e-10 1,000,000 12:30:45 2026-12-07",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "",
            " ",
            "\n",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Random mixes of the above's characters.
        let chars: Vec<char> = v.concat().chars().collect();
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..300 {
            let n = rng.usize(0..120);
            v.push((0..n).map(|_| chars[rng.usize(..chars.len())]).collect());
        }
        v
    }

    /// The compact tokenizer counts as bpe-openai's does (itself checked against tiktoken) for
    /// every sample, in both encodings.
    #[test]
    fn counts_match_bpe_openai() {
        for (family, reference) in [
            (Family::O200k, bpe_openai::o200k_base()),
            (Family::Cl100k, bpe_openai::cl100k_base()),
        ] {
            let ours = vocab(family).expect("a BPE family");
            for text in samples() {
                assert_eq!(
                    ours.count(&text),
                    reference.count(text.as_str()),
                    "{family:?}: {text:?}"
                );
            }
        }
    }

    /// Long pieces (a run of one letter, of spaces, a long word) count as bpe-openai counts
    /// them; past MAX_PIECE bytes, a piece is counted in chunks of that size.
    #[test]
    fn long_pieces_are_counted_exactly_then_in_chunks() {
        let o200k = vocab(Family::O200k).expect("a BPE family");
        let reference = bpe_openai::o200k_base();
        for text in [
            "a".repeat(5000),
            " ".repeat(3000),
            "supercalifragilistic".repeat(300),
            "ab".repeat(2000),
        ] {
            assert_eq!(
                o200k.count(&text),
                reference.count(text.as_str()),
                "{}",
                &text[..20]
            );
        }
        let text = "a".repeat(4 * MAX_PIECE);
        let started = std::time::Instant::now();
        let n = o200k.count(&text);
        eprintln!(
            "{} bytes of one letter: {:?}",
            text.len(),
            started.elapsed()
        );
        assert_eq!(n, 4 * o200k.count(&"a".repeat(MAX_PIECE)));
    }

    /// build.rs's rank tables find every token of both encodings by its bytes, at its rank.
    #[test]
    fn every_token_is_found_at_its_rank() {
        for family in [Family::O200k, Family::Cl100k] {
            let v = vocab(family).expect("a BPE family");
            for r in 0..(v.ends.len() / 4) as u32 {
                assert_eq!(v.rank(v.token(r)), Some(r), "{family:?}");
            }
        }
    }

    #[test]
    fn other_models_use_bytes_over_four() {
        let body = r#"{"model":"llama","messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(est("llama", body), body.len() as u64 / 4);
    }
}
