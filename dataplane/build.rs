//! Turns the tiktoken vocabularies in `data/` (`cl100k_base`, `o200k_base`: one base64 token and
//! its rank per line, gzipped) into two flat files each in `OUT_DIR`, which `src/accounting/tokens.rs`
//! embeds: `NAME.bytes`, every token's bytes in rank order, one after the other, and
//! `NAME.ends`, where each ends (little-endian u32). No parsing at run time, and the tables sit
//! in the binary's read-only pages until a count needs them.

use std::io::Read;
use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
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
        std::fs::write(out.join(format!("{name}.bytes")), bytes).expect("writing OUT_DIR");
        std::fs::write(out.join(format!("{name}.ends")), ends).expect("writing OUT_DIR");
    }
    println!("cargo::rerun-if-changed=build.rs");
}
