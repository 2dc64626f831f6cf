//! Graceful shutdown on SIGTERM: stop accepting, /readyz 503, flush queues,
//! close every client with 1001, exit 0.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use tungstenite::Message;

#[test]
fn sigterm_drains_and_exits_zero() {
    let mut node = Node::start(&["--shards", "2", "--drain-timeout-ms", "8000", "--idle-timeout-ms", "600000"]);
    // A keep-alive HTTP connection opened before the signal.
    let mut keep = TcpStream::connect(node.addr()).unwrap();
    keep.set_read_timeout(Some(WAIT)).unwrap();
    keep.write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut keep).0, 200);
    // A reading subscriber, and a native drop-policy subscriber that never
    // reads, whose full queue holds the drain open until the timeout.
    let mut reader = node.ws("/v1/topics/bye/ws?role=sub");
    let mut stalled = node.ws("/v1/ws?slow=drop");
    native_call(&mut stalled, serde_json::json!({"op": "subscribe", "id": 1, "topic": "bye"}));
    let mut publisher = node.ws("/v1/topics/bye/ws?role=pub");
    let big = "z".repeat(60_000);
    // Lock-step, so the reading subscriber never falls behind.
    for _ in 0..400 {
        publisher.send(Message::text(big.clone())).unwrap();
        assert!(next_data(&mut reader) == Message::text(big.clone()), "payload mismatch");
    }
    wait_until("stalled queue full", || node.metric("fluxnode_messages_dropped_total") > 0);
    let signalled = Instant::now();
    unsafe_kill(node.child.id(), 15);
    // The reading subscriber is flushed and closed with 1001.
    let (code, _) = expect_close(&mut reader);
    assert_eq!(code, 1001);
    // Draining: readiness is gone on the connection we already had.
    keep.write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut keep).0, 503);
    // No new connections are accepted.
    wait_until("listener closed", || TcpStream::connect(node.addr()).is_err());
    // The node exits 0 once the drain timeout passes.
    let status = loop {
        if let Some(status) = node.child.try_wait().unwrap() {
            break status;
        }
        assert!(signalled.elapsed() < Duration::from_secs(60), "node did not exit");
        std::thread::park_timeout(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status:?}");
    drop(stalled);
}

/// Sends a signal with the `kill` command (no libc dependency in tests).
fn unsafe_kill(pid: u32, signal: i32) {
    let ok = std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap();
    assert!(ok.success());
}
