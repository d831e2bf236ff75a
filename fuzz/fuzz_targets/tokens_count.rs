//! The data plane's compact tokenizer (`tokens::vocab`) against bpe-openai's (itself tested
//! against tiktoken): the same count of any UTF-8 text up to 4 KiB, in both encodings (the
//! first byte picks one).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_dataplane::accounting::tokens::{Family, vocab};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    if text.len() > 4096 {
        return;
    }
    let (family, reference) = if pick % 2 == 0 {
        (Family::O200k, bpe_openai::o200k_base())
    } else {
        (Family::Cl100k, bpe_openai::cl100k_base())
    };
    let ours = vocab(family).expect("a BPE family").count(text);
    assert_eq!(ours, reference.count(text), "{family:?} {text:?}");
});
