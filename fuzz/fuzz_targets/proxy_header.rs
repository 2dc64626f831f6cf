//! PROXY protocol v2 headers: never panic, a complete header never claims
//! more bytes than it was given, and a prefix of an accepted header is
//! "incomplete", never an error.
#![no_main]

use proto::proxy_protocol;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((_, len))) = proxy_protocol::parse(data) {
        assert!(len <= data.len());
        for cut in 0..len {
            assert_eq!(proxy_protocol::parse(&data[..cut]), Ok(None));
        }
    }
});
