//! Builds, from the tiktoken vocabularies in `data/` (`cl100k_base`, `o200k_base`: one base64
//! token and its rank per line, gzipped), the tables `src/accounting/tokens.rs` embeds, five
//! files an encoding in `OUT_DIR`:
//!
//! - `NAME.bytes`: every token's bytes in rank order, one after the other;
//! - `NAME.ends`: where each token ends in `NAME.bytes` (little-endian u32);
//! - `NAME.tags` and `NAME.ranks`: a hash table from a token's bytes to its rank (see
//!   [`slot_table`]), so that no table is built at run time;
//! - `NAME.dfa`: the encoding's splitting regex as a dense DFA, serialized by regex-automata in
//!   the target's byte order, so that no regex is compiled at run time.
//!
//! All four sit in the binary's read-only pages: nothing is copied to the heap, and a page is
//! read in only when a count touches it (see the memory section of docs/benchmarks.md).

use regex_automata::dfa::{StartKind, dense};
use regex_automata::{MatchKind, nfa::thompson, util::syntax};
use std::io::Read;
use std::path::PathBuf;

/// tiktoken's splitting regexes, as bpe-openai writes them: the look-ahead `\s+(?!\S)` becomes
/// a second pattern (`\s+\s`) whose last character tokens.rs drops from the match. Pattern 0 is
/// the encoding's own, 1 the look-ahead one, 2 `\s+`; leftmost-first, in that order.
fn patterns(name: &str) -> [String; 3] {
    let words = match name {
        "cl100k_base" => "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+$".to_string(),
        "o200k_base" => [
            "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
            "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
            "\\p{N}{1,3}",
            " ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*",
            "\\s*[\\r\\n]+",
            "\\s+$",
        ]
        .join("|"),
        _ => unreachable!("an encoding of data/"),
    };
    [words, "\\s+\\s".to_string(), "\\s+".to_string()]
}

/// The token hash shared with `src/accounting/tokens.rs` (`Vocab::hash`), which must compute the
/// same: the length, then the bytes as little-endian words (the last two overlapping), each
/// folded in with a 128-bit multiply.
fn hash(token: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let fold = |h: u64, word: u64| {
        let m = u128::from(h ^ word) * u128::from(K);
        (m as u64) ^ ((m >> 64) as u64)
    };
    let le8 = |b: &[u8]| {
        let mut word = [0; 8];
        word.copy_from_slice(&b[..8]);
        u64::from_le_bytes(word)
    };
    let le4 = |b: &[u8]| {
        let mut word = [0; 4];
        word.copy_from_slice(&b[..4]);
        u64::from(u32::from_le_bytes(word))
    };
    let n = token.len();
    let h = (n as u64).wrapping_mul(K);
    if n > 8 {
        let mut h = h;
        let mut rest = token;
        while rest.len() > 8 {
            h = fold(h, le8(rest));
            rest = &rest[8..];
        }
        fold(h, le8(&token[n - 8..]))
    } else if n >= 4 {
        fold(h, le4(token) | le4(&token[n - 4..]) << 32)
    } else if n > 0 {
        let b = |i: usize| u64::from(token[i]);
        fold(h, b(0) | b(n / 2) << 8 | b(n - 1) << 16)
    } else {
        h
    }
}

/// An open-addressing table of `2^k` slots, k the least with `2^k >= 8/7 * tokens`, in two
/// arrays: a tag byte a slot (0: free; else 0x80 and the hash's top 7 bits) and a rank a slot
/// (little-endian u32). Each token sits at the first free slot from `hash & (2^k - 1)` on,
/// wrapping. A lookup reads the compact tags and reads a rank and its token's bytes only where
/// the tag agrees, as hashbrown's control bytes do.
fn slot_table(tokens: &[Vec<u8>]) -> (Vec<u8>, Vec<u8>) {
    let size = (tokens.len() * 8 / 7).next_power_of_two();
    let mask = size - 1;
    let mut tags = vec![0u8; size];
    let mut ranks = vec![0u8; size * 4];
    for (rank, t) in tokens.iter().enumerate() {
        let h = hash(t);
        let mut i = h as usize & mask;
        while tags[i] != 0 {
            i = (i + 1) & mask;
        }
        tags[i] = (h >> 57) as u8 | 0x80;
        let rank = u32::try_from(rank).expect("fewer than 2^32 tokens");
        ranks[i * 4..i * 4 + 4].copy_from_slice(&rank.to_le_bytes());
    }
    (tags, ranks)
}

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let big_endian = std::env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() == Ok("big");
    for name in ["cl100k_base", "o200k_base"] {
        let path = format!("data/{name}.tiktoken.gz");
        println!("cargo::rerun-if-changed={path}");
        let gz = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        let mut text = String::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_string(&mut text)
            .unwrap_or_else(|e| panic!("decompressing {path}: {e}"));
        // In rank order: the rank of a token is its index.
        let tokens = bpe::byte_pair_encoding::read_tiktoken(&text)
            .unwrap_or_else(|e| panic!("reading {path}: {e}"));
        let mut bytes = Vec::new();
        let mut ends = Vec::with_capacity(tokens.len() * 4);
        for t in &tokens {
            bytes.extend_from_slice(t);
            let end = u32::try_from(bytes.len()).expect("a vocabulary under 4 GiB");
            ends.extend_from_slice(&end.to_le_bytes());
        }
        let (tags, ranks) = slot_table(&tokens);

        // Anchored searches only (tokens.rs matches each piece where the last one ended), and
        // leftmost-first among the patterns, as the meta regex tokens.rs used before did. Dense:
        // a sparse DFA is 20 times smaller but splits 3-6 times slower. Not minimized: that
        // takes most of a minute in a debug build script and saves a quarter of o200k's DFA.
        let dfa = dense::Builder::new()
            .configure(
                dense::Config::new()
                    .start_kind(StartKind::Anchored)
                    .match_kind(MatchKind::LeftmostFirst),
            )
            .syntax(syntax::Config::new())
            .thompson(thompson::Config::new())
            .build_many(&patterns(name))
            .unwrap_or_else(|e| panic!("{name}'s splitting regex: {e}"));
        // The padding aligns the DFA in this Vec; tokens.rs aligns the file's bytes instead.
        let (dfa, padding) = if big_endian {
            dfa.to_bytes_big_endian()
        } else {
            dfa.to_bytes_little_endian()
        };
        let dfa = dfa[padding..].to_vec();

        for (ext, data) in [
            ("bytes", &bytes),
            ("ends", &ends),
            ("tags", &tags),
            ("ranks", &ranks),
            ("dfa", &dfa),
        ] {
            std::fs::write(out.join(format!("{name}.{ext}")), data).expect("writing OUT_DIR");
        }
    }
    println!("cargo::rerun-if-changed=build.rs");
}
