//! The HTTP/1.1 server's request-head parser (`h1_server::fuzz_parse_head`, which also builds
//! the request from a whole head): never panics, whatever the client sends, and a head found
//! in the input is found the same with bytes after it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_dataplane::h1_server::fuzz_parse_head;

fuzz_target!(|bytes: &[u8]| {
    if fuzz_parse_head(bytes) {
        let mut more = bytes.to_vec();
        more.extend_from_slice(b"{\"model\":\"m\"}");
        assert!(
            fuzz_parse_head(&more),
            "a head no longer found with a body after it"
        );
    }
});
