//! Durable-log segments: reading any bytes never panics, the whole part it
//! reports is within the input, and what it read re-encodes to exactly those
//! bytes (a record is accepted only if it is what a writer would write).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use proto::log;

fuzz_target!(|data: &[u8]| {
    let scan = log::scan(&Bytes::copy_from_slice(data));
    assert!(scan.whole_bytes <= data.len());
    let mut again = Vec::new();
    for (_, record) in &scan.records {
        log::encode(record, &mut again).expect("a record read back encodes");
    }
    assert_eq!(&again[..], &data[..scan.whole_bytes]);
});
