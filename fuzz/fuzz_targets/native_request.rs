//! Native protocol requests, text and binary: never panic.
#![no_main]

use bytes::Bytes;
use proto::native;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = native::parse_text(data);
    let _ = native::parse_binary(&Bytes::copy_from_slice(data));
});
