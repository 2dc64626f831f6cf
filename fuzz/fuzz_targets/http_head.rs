//! HTTP request heads and routing: never panic, and a complete head never
//! claims more bytes than it was given.
#![no_main]

use proto::http;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((head, len))) = http::parse_head(data) {
        assert!(len <= data.len());
        let _ = http::route(&head.method, &head.path);
        let _ = http::query_param(&head.query, "from");
    }
});
