//! The closing handshake under load (RFC 6455 5.5.1): on a client's close
//! the node stops queuing data, discards queued frames that have not
//! started, finishes at most the frame being written, and answers at once.
//! Before the fix it first sent everything queued: a subscriber that closed
//! with 48 MiB queued for it received those 48 MiB before the answer.

mod common;

use std::io::Write;
use std::time::Instant;

use common::*;
use tungstenite::Message;

/// Messages queued for the stalled subscriber before it closes.
const QUEUED_MESSAGES: u64 = 48 * 1024;
/// Each message's payload.
const PAYLOAD_BYTES: usize = 1024;
/// What may still arrive after the client's close: the socket buffers on
/// both sides (Linux's autotuning maxima are 6 MiB receive and 4 MiB send by
/// default) and the frame in progress. The queue the node held was 48 MiB.
const AFTER_CLOSE_BYTES_MAX: usize = 16 << 20;

#[test]
fn a_clients_close_is_answered_before_queued_data() {
    let node = Node::start(&["--send-queue-bytes-max", "67108864"]);
    let mut subscriber = node.ws("/v1/topics/flood/ws?role=sub");
    let mut publisher = node.ws("/v1/topics/flood/ws?role=pub");
    let payload = "f".repeat(PAYLOAD_BYTES);
    for _ in 0..QUEUED_MESSAGES {
        publisher.send(Message::text(payload.clone())).expect("publish");
    }
    // Every message is sequenced, so the subscriber (which has read
    // nothing) has them all queued or in its socket buffers.
    wait_until("all published", || node.metric("fluxnode_messages_published_total") >= QUEUED_MESSAGES);
    // The client's close, written on the socket as any client would send it
    // (masked, code 1000), while tungstenite still reads as usual.
    let closed_at = Instant::now();
    subscriber.get_mut().write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8]).expect("send close");
    let mut after_close = 0;
    let code = loop {
        match subscriber.read().expect("read until the node's close") {
            Message::Close(frame) => break frame.map(|f| u16::from(f.code)),
            other => after_close += other.len(),
        }
    };
    let took = closed_at.elapsed();
    eprintln!("after the client's close: {after_close} bytes of data, then close {code:?} after {took:?}");
    assert_eq!(code, Some(1000), "the node echoes the client's code");
    assert!(
        after_close <= AFTER_CLOSE_BYTES_MAX,
        "{after_close} bytes arrived after the client's close: the node sent its queue first"
    );
}
