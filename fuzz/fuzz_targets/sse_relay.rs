//! The SSE relay's event splitting and usage inspection (`sse::fuzz_relay`): never panics,
//! forwards or holds every byte it is given (none dropped, none added, when it isn't dropping
//! the usage chunk), and reads the same usage whether the stream arrives whole or split into
//! frames. The first two bytes choose the split and whether the usage chunk is dropped.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_dataplane::gateway::relay::fuzz_relay;

fuzz_target!(|input: &[u8]| {
    let [seed, flags, stream @ ..] = input else {
        return;
    };
    let drop_usage = flags & 1 == 1;
    // Frame lengths from a small generator seeded by the first byte: 1..=32 bytes each.
    let mut frames = Vec::new();
    let mut rest = stream;
    let mut x = u32::from(*seed) | 1;
    while !rest.is_empty() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let n = (x as usize % 32 + 1).min(rest.len());
        let (frame, tail) = rest.split_at(n);
        frames.push(frame);
        rest = tail;
    }
    let whole = fuzz_relay(&[stream], drop_usage);
    let split = fuzz_relay(&frames, drop_usage);
    // Where a frame ends just after a blank line, a newline that follows it may be held back
    // with the next event rather than forwarded with this one: the same bytes leave, in
    // different writes. So compare what was forwarded and held, together.
    let joined = |(out, held, _): &(Vec<u8>, Vec<u8>, _)| [&out[..], &held[..]].concat();
    if !drop_usage {
        assert_eq!(joined(&whole), stream, "bytes lost or added");
        assert_eq!(joined(&split), stream, "bytes lost or added when framed");
    }
    assert_eq!(whole.2, split.2, "usage differs when framed");
});
