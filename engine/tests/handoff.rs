//! Topic sockets handed to the shard that owns the topic (`--topic-sockets
//! owner`, the default): served there, with every byte the client sent
//! along with its upgrade, and counted once in the node's connections.
//! Native sockets move to the owner of the topic their first request names.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;
use tungstenite::Message;

#[test]
fn topic_sockets_are_served_by_the_owner_shard() {
    let node = Node::start(&["--shards", "2"]);
    let addr = node.addr();
    let topic = topic_on_shard("home", 2, 1);
    // SO_REUSEPORT puts about half the connections on shard 0: open
    // subscribers until one of them was handed over.
    let mut subs = Vec::new();
    for _ in 0..200 {
        let (ws, shard) = ws_with_shard(&addr, &format!("/v1/topics/{topic}/ws?role=sub"));
        assert_eq!(shard, 1, "a topic socket is served by the topic's owner");
        subs.push(ws);
        if node.metric("fluxnode_connections_handed_off_total") >= 1 {
            break;
        }
    }
    assert!(node.metric("fluxnode_connections_handed_off_total") >= 1, "no connection was handed over");
    // A native socket that has sent nothing stays where it was accepted.
    let (_native, _) = ws_with_shard(&addr, "/v1/ws");
    let mut publisher = node.ws(&format!("/v1/topics/{topic}/ws?role=pub"));
    publisher.send(Message::text("to every subscriber")).unwrap();
    for ws in &mut subs {
        assert_eq!(next_data(ws), Message::text("to every subscriber"));
    }
    // Each connection counted once, wherever it ended up.
    let open = subs.len() as u64 + 2;
    wait_until("the connection gauge counts each connection once", || {
        node.metric("fluxnode_connections") == open + 1 // + the /metrics request itself
    });
    drop(subs);
    drop(publisher);
    wait_until("handed-over connections leave the count when they close", || {
        node.metric("fluxnode_connections") == 2 // the native socket and the /metrics request
    });
}

#[test]
fn native_sockets_move_to_the_owner_of_their_first_topic() {
    let node = Node::start(&["--shards", "2"]);
    let addr = node.addr();
    let topic = topic_on_shard("native", 2, 1);
    let mut sub = node.ws(&format!("/v1/topics/{topic}/ws?role=sub"));
    for _ in 0..200 {
        let (mut ws, shard) = ws_with_shard(&addr, "/v1/ws");
        if shard != 0 {
            continue; // accepted by the owner: nothing to move
        }
        let moved_before = node.metric("fluxnode_connections_handed_off_total");
        // Two requests in one write: the second is read with the first and
        // must travel with it.
        for (id, data) in [(1, "first"), (2, "second")] {
            let request = serde_json::json!({"op": "publish", "id": id, "topic": topic, "data": data});
            ws.write(Message::text(request.to_string())).unwrap();
        }
        ws.flush().unwrap();
        for id in [1, 2] {
            let reply = next_json(&mut ws);
            assert_eq!((reply["id"].as_u64(), reply["ok"].as_bool()), (Some(id), Some(true)), "{reply}");
            assert_eq!(reply["seq"].as_u64(), Some(id), "{reply}");
        }
        assert_eq!(next_data(&mut sub), Message::text("first"));
        assert_eq!(next_data(&mut sub), Message::text("second"));
        assert_eq!(node.metric("fluxnode_connections_handed_off_total"), moved_before + 1, "the session moved once");
        // The moved session goes on: it subscribes and receives there.
        let r = native_call(&mut ws, serde_json::json!({"op": "subscribe", "id": 3, "topic": topic}));
        assert_eq!(r["ok"], true, "{r}");
        let mut publisher = node.ws(&format!("/v1/topics/{topic}/ws?role=pub"));
        publisher.send(Message::text("third")).unwrap();
        let m = next_json(&mut ws);
        assert_eq!(
            (m["type"].as_str(), m["seq"].as_u64(), m["data"].as_str()),
            (Some("message"), Some(3), Some("third"))
        );
        // Counted once: the subscriber, the native socket, the publisher
        // and the /metrics request.
        wait_until("each connection counted once", || node.metric("fluxnode_connections") == 4);
        return;
    }
    panic!("no native socket landed on shard 0 in 200 tries");
}

#[test]
fn bytes_sent_with_the_upgrade_survive_the_handoff() {
    let node = Node::start(&["--shards", "2"]);
    let addr = node.addr();
    let topic = topic_on_shard("early", 2, 1);
    let mut sub = node.ws(&format!("/v1/topics/{topic}/ws?role=sub"));
    // A publisher that sends its first frame in the same write as its
    // upgrade request, on connections until one lands on shard 0 and is
    // handed over with those bytes already read.
    let frame = masked_text_frame(b"sent before the 101");
    let mut sent = 0;
    for _ in 0..200 {
        let before = node.metric("fluxnode_connections_handed_off_total");
        let mut stream = TcpStream::connect(&addr).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut request = format!(
            "GET /v1/topics/{topic}/ws?role=pub HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .into_bytes();
        request.extend_from_slice(&frame);
        stream.write_all(&request).unwrap();
        let head = read_head(&mut stream);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        sent += 1;
        assert_eq!(next_data(&mut sub), Message::text("sent before the 101"));
        if node.metric("fluxnode_connections_handed_off_total") > before {
            return;
        }
    }
    panic!("no publisher was handed over in {sent} tries");
}

#[test]
fn a_handoff_needs_no_room_beyond_the_connection_limit() {
    // Two connections in all: a handed-over socket counts once, and closing
    // it gives the room back.
    let node = Node::start(&["--shards", "2", "--connections-max", "2"]);
    let addr = node.addr();
    let topic = topic_on_shard("room", 2, 1);
    let path = format!("/v1/topics/{topic}/ws?role=sub");
    // Twenty connections one after another: if a handoff kept or leaked a
    // place in the node's count, the limit would refuse the later ones.
    for _ in 0..20 {
        let mut opened = None;
        wait_until("room for the next topic socket", || {
            opened = ws_connect(&addr, &path).ok();
            opened.is_some()
        });
    }
    assert!(node.metric("fluxnode_connections_handed_off_total") >= 1, "no connection was handed over");
}

/// A client-to-server text frame (masked, as RFC 6455 requires).
fn masked_text_frame(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Reads an HTTP response head byte by byte (nothing past it).
fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "connection closed in the response head");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

/// A native session with replies in flight must not move: its first
/// publish comes while the pongs for a flood of pings are queued or
/// half-written (the client reads nothing and has a tiny window). Moving
/// then would leave the old shard writing to a socket already handed over.
/// The session stays, and the client gets every pong, in order, then the
/// publish's reply. (With both of `native_move_target`'s checks for this,
/// the queue's and the writer's, taken out, the session moved here; the
/// writer's check alone is not isolated: on loopback the node's send
/// buffer, sized from the 64 KiB MSS, takes more pongs than one read of
/// pings makes, and a small MSS makes the pings arrive in pieces, so the
/// queue is never empty while the write is blocked.)
#[test]
fn a_native_session_with_replies_in_flight_does_not_move() {
    const PINGS: usize = 2_000; // 254 KB of pongs: far more than the node's send buffer at this MSS
    let node = Node::start(&["--shards", "2"]);
    let addr = node.addr();
    let topic = topic_on_shard("busy", 2, 1);
    let mut sub = node.ws(&format!("/v1/topics/{topic}/ws?role=sub"));
    for _ in 0..200 {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        // Before connect: a small window, and a small MSS so that the
        // node's send buffer (sized from the MSS on loopback, ~1.3 MB at
        // 64 KiB segments) cannot take all the pongs either.
        socket.set_recv_buffer_size(2048).unwrap();
        socket.set_mss(536).unwrap();
        socket.connect(&addr.parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
        let stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let probe = stream.try_clone().unwrap();
        let (mut ws, response) = tungstenite::client(format!("ws://{addr}/v1/ws"), stream).unwrap();
        if response.headers().get("x-rayflux-shard").and_then(|v| v.to_str().ok()) != Some("0") {
            continue; // accepted by the owner: nothing would move
        }
        let moved_before = node.metric("fluxnode_connections_handed_off_total");
        for i in 0..PINGS {
            let mut payload = format!("{i:06}").into_bytes();
            payload.resize(125, b'.');
            ws.write(Message::Ping(payload)).unwrap();
        }
        ws.flush().unwrap();
        // The first pong bytes mean the writer's turn has begun; with this
        // window it cannot finish until the client reads.
        probe.peek(&mut [0u8; 1]).unwrap();
        let request = serde_json::json!({"op": "publish", "id": 1, "topic": topic, "data": "while writing"});
        ws.send(Message::text(request.to_string())).unwrap();
        for i in 0..PINGS {
            match ws.read().unwrap() {
                Message::Pong(payload) => assert_eq!(&payload[..6], format!("{i:06}").as_bytes(), "pong {i}"),
                other => panic!("expected pong {i}, got {other:?}"),
            }
        }
        let reply = next_json(&mut ws);
        assert_eq!((reply["id"].as_u64(), reply["ok"].as_bool()), (Some(1), Some(true)), "{reply}");
        assert_eq!(next_data(&mut sub), Message::text("while writing"));
        assert_eq!(node.metric("fluxnode_connections_handed_off_total"), moved_before, "the session stayed");
        // It goes on working where it is.
        let r = native_call(&mut ws, serde_json::json!({"op": "publish", "id": 2, "topic": topic, "data": "after"}));
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(next_data(&mut sub), Message::text("after"));
        return;
    }
    panic!("no native socket landed on shard 0 in 200 tries");
}
