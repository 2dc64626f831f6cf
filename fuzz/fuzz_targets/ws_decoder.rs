//! WebSocket client-frame decoder: any bytes, fed in two pieces split where
//! the first input byte says, must decode or fail with a close code, never
//! panic, and must make progress.
#![no_main]

use bytes::BytesMut;
use proto::ws::Decoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let split = (split as usize).min(rest.len());
    let mut decoder = Decoder::new(4096);
    let mut buf = BytesMut::new();
    for piece in [&rest[..split], &rest[split..]] {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match decoder.decode(&mut buf) {
                Ok(Some(_)) => assert!(buf.len() < before, "an event must consume bytes"),
                Ok(None) => break,
                Err(e) => {
                    let _ = e.close_code();
                    return;
                }
            }
        }
    }
});
