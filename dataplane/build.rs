//! Builds, from the tiktoken vocabularies in `data/` (`cl100k_base`, `o200k_base`: one base64
//! token and its rank per line, gzipped), the tables `src/accounting/tokens.rs` embeds, three
//! files an encoding in `OUT_DIR`:
//!
//! - `NAME.bytes`: every token's bytes in rank order, one after the other;
//! - `NAME.ends`: where each token ends in `NAME.bytes` (little-endian u32);
//! - `NAME.dfa`: the encoding's splitting regex as a dense DFA, serialized by regex-automata in
//!   the target's byte order, so that no regex is compiled at run time.
//!
//! All three sit in the binary's read-only pages, read in only when a count touches them; the
//! one table built at run time is the rank lookup (see the memory section of docs/benchmarks.md).

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

        for (ext, data) in [("bytes", &bytes), ("ends", &ends), ("dfa", &dfa)] {
            std::fs::write(out.join(format!("{name}.{ext}")), data).expect("writing OUT_DIR");
        }
    }
    println!("cargo::rerun-if-changed=build.rs");
}
