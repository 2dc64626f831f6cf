//! Bad input: each case is answered with its documented status, close code
//! or error reply, and none of them crashes or stalls the node.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;
use tungstenite::Message;

/// Completes a WebSocket handshake by hand, so the test can then send
/// frames no client library would produce.
fn handshake(node: &Node, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(node.addr()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

/// A client frame: masked unless `mask` is false.
fn frame(opcode: u8, payload: &[u8], mask: bool) -> Vec<u8> {
    let key = [1u8, 2, 3, 4];
    let mut out = vec![0x80 | opcode];
    let m = if mask { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n <= 0xffff => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if mask {
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// Reads server frames until a close frame; returns its code. Pings are
/// recorded in `pings`.
fn read_close(s: &mut TcpStream, pings: &mut usize) -> u16 {
    loop {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).expect("a close frame before the connection ends");
        let mut len = (h[1] & 0x7f) as usize;
        if len == 126 {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).unwrap();
            len = u16::from_be_bytes(b) as usize;
        } else if len == 127 {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).unwrap();
            len = u64::from_be_bytes(b) as usize;
        }
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).unwrap();
        match h[0] & 0x0f {
            0x8 => return u16::from_be_bytes([payload[0], payload[1]]),
            0x9 => *pings += 1,
            _ => {}
        }
    }
}

fn close_code_for(node: &Node, path: &str, wire: &[u8]) -> u16 {
    let mut s = handshake(node, path);
    s.write_all(wire).unwrap();
    read_close(&mut s, &mut 0)
}

#[test]
fn websocket_violations_get_their_close_codes() {
    let node = Node::start(&["--shards", "2", "--message-bytes-max", "1024"]);
    let raw = "/v1/topics/bad/ws";
    assert_eq!(close_code_for(&node, raw, &frame(0x2, &[0; 2000], true)), 1009, "oversized frame");
    assert_eq!(close_code_for(&node, raw, &frame(0x1, &[0xff, 0xfe], true)), 1007, "invalid UTF-8");
    assert_eq!(close_code_for(&node, raw, &frame(0x2, b"x", false)), 1002, "unmasked frame");
    assert_eq!(close_code_for(&node, raw, &frame(0x3, b"", true)), 1002, "reserved opcode");
    assert_eq!(close_code_for(&node, raw, &frame(0x0, b"x", true)), 1002, "stray continuation");
    assert_eq!(
        close_code_for(&node, "/v1/topics/bad/ws?role=sub", &frame(0x1, b"x", true)),
        1008,
        "publish on role=sub"
    );
    assert_eq!(close_code_for(&node, "/subscribe", &frame(0x1, b"not json", true)), 1008, "bad first frame");
    assert_eq!(close_code_for(&node, "/subscribe", &frame(0x1, br#"{"subscriber_id":1,"topic":"a/b"}"#, true)), 1008);
    // A header announcing a huge frame is refused before any payload arrives.
    let mut huge = vec![0x82u8, 0x80 | 127];
    huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
    huge.extend_from_slice(&[1, 2, 3, 4]);
    assert_eq!(close_code_for(&node, raw, &huge), 1009, "1 TiB frame header");
    assert_eq!(node.get("/healthz").0, 200);
    assert!(node.metric("fluxnode_protocol_errors_total") >= 5);
}

#[test]
fn http_bad_input_gets_statuses() {
    let node = Node::start(&["--shards", "2", "--message-bytes-max", "1024"]);
    let (status, body) = node.request("POST", "/publish", "application/json", b"{not json");
    assert_eq!(status, 400, "{body}");
    let (status, body) = node.request("POST", "/publish", "application/json", br#"{"topic":"a b","message":"x"}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid_topic"), "{body}");
    let (status, _) = node.request("POST", "/publish", "application/json", br#"{"topic":"a","message":7}"#);
    assert_eq!(status, 400);
    let (status, _) = node.request("POST", "/v1/topics/x", "text/plain", &[b'a'; 2000]);
    assert_eq!(status, 413);
    let big = serde_json::json!({"topic": "a", "message": "m".repeat(5000)}).to_string();
    assert_eq!(node.request("POST", "/publish", "application/json", big.as_bytes()).0, 413);
    assert_eq!(node.request("POST", "/v1/topics/bad!name", "text/plain", b"x").0, 400);
    assert_eq!(node.request("POST", &format!("/v1/topics/{}", "a".repeat(256)), "text/plain", b"x").0, 400);
    assert_eq!(node.get("/v1/topics/bad!name/ws").0, 426);
    assert_eq!(node.get("/nowhere").0, 404);
    assert_eq!(node.request("DELETE", "/publish", "text/plain", b"").0, 405);
    // Garbage instead of HTTP, and an oversized head.
    for wire in [
        b"\x00\xff\x13garbage\r\n\r\n".to_vec(),
        format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000)).into_bytes(),
    ] {
        let mut s = TcpStream::connect(node.addr()).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let _ = s.write_all(&wire);
        let (status, _) = read_response(&mut s);
        assert!(status == 400 || status == 431, "status {status}");
    }
    // Invalid topic in a raw socket path: refused before the upgrade.
    let err = ws_connect(&node.addr(), "/v1/topics/no%20pe/ws").unwrap_err();
    assert!(err.to_string().contains("400"), "{err}");
    assert_eq!(node.get("/healthz").0, 200);
}

#[test]
fn native_bad_requests_keep_the_connection() {
    let node = Node::start(&["--shards", "2", "--subscriptions-per-connection-max", "2"]);
    let mut ws = node.ws("/v1/ws");
    ws.send(Message::text("{not json")).unwrap();
    let r = next_json(&mut ws);
    assert_eq!((r["ok"].as_bool(), r["error"]["code"].as_str()), (Some(false), Some("bad_request")));
    let r = native_call(&mut ws, serde_json::json!({"op": "teleport", "id": 2}));
    assert_eq!(r["error"]["code"], "unknown_op");
    let r = native_call(&mut ws, serde_json::json!({"op": "subscribe", "id": 3, "topic": "a b"}));
    assert_eq!(r["error"]["code"], "invalid_topic");
    let r = native_call(&mut ws, serde_json::json!({"op": "publish", "id": 4, "topic": "t"}));
    assert_eq!(r["error"]["code"], "bad_request");
    ws.send(Message::binary(vec![9u8, 9, 9])).unwrap();
    assert_eq!(next_json(&mut ws)["error"]["code"], "bad_request");
    for (id, topic) in [(5, "s1"), (6, "s2")] {
        assert_eq!(native_call(&mut ws, serde_json::json!({"op": "subscribe", "id": id, "topic": topic}))["ok"], true);
    }
    let r = native_call(&mut ws, serde_json::json!({"op": "subscribe", "id": 7, "topic": "s1"}));
    assert_eq!(r["error"]["code"], "already_subscribed");
    let r = native_call(&mut ws, serde_json::json!({"op": "subscribe", "id": 8, "topic": "s3"}));
    assert_eq!(r["error"]["code"], "too_many_subscriptions");
    let r = native_call(&mut ws, serde_json::json!({"op": "ping", "id": 9}));
    assert_eq!(r["ok"], true, "the connection is still usable");
}

/// At the connection limit, work is refused with 503, but the node is not
/// taken for dead: health, readiness ("full") and metrics are still
/// answered. Before, every request answered 503, and the balancer moved a
/// full node's topics away from the subscribers still connected to it.
#[test]
fn connection_limit_answers_503_but_health_and_metrics_still_answer() {
    let node = Node::start(&["--shards", "1", "--connections-max", "3"]);
    let held: Vec<Ws> = (0..3).map(|_| node.ws("/v1/ws")).collect();
    let refused = node.request("POST", "/v1/topics/t", "text/plain", b"x");
    assert_eq!(refused.0, 503, "{refused:?}");
    assert!(refused.1.contains("too_many_connections"), "{refused:?}");
    assert!(ws_connect(&node.addr(), "/v1/ws").is_err(), "no fourth session");
    assert_eq!(node.get("/healthz").0, 200, "alive while full");
    let (status, body) = node.get("/readyz");
    assert_eq!((status, body.contains("\"full\"")), (503, true), "{body}");
    assert!(node.metric("fluxnode_connections_rejected_total") >= 1, "metrics answered while full");
    drop(held);
    wait_until("connections free again", || node.get("/readyz").0 == 200);
}

#[test]
fn handshake_timeout_and_idle_peer() {
    let node = Node::start(&["--shards", "1", "--handshake-timeout-ms", "300", "--idle-timeout-ms", "300"]);
    // An upgrade request that never completes: 408, then closed.
    let mut s = TcpStream::connect(node.addr()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n").unwrap();
    assert_eq!(read_response(&mut s).0, 408);
    // A connection that sends nothing at all is closed as well.
    let mut silent = TcpStream::connect(node.addr()).unwrap();
    silent.set_read_timeout(Some(WAIT)).unwrap();
    assert_eq!(read_response(&mut silent).0, 408);
    // An idle WebSocket peer that never answers pings: ping, then 4001.
    let mut idle = handshake(&node, "/v1/ws");
    let mut pings = 0;
    assert_eq!(read_close(&mut idle, &mut pings), 4001);
    assert_eq!(pings, 1);
    assert_eq!(node.get("/healthz").0, 200);
}
