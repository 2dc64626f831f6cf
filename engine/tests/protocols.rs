//! Each client protocol path, end to end, against a real node.

mod common;

use common::*;
use tungstenite::Message;

#[test]
fn original_api_publish_and_subscribe() {
    let node = Node::start(&["--shards", "2"]);
    let mut sub = node.ws("/subscribe");
    sub.send(Message::text(r#"{"subscriber_id": "s1", "topic": "news"}"#)).unwrap();
    wait_until("subscription visible", || node.subscribers("news") == 1);
    let (status, body) = node.legacy_publish("news", "hello é");
    assert_eq!(status, 200);
    assert_eq!(body["status"], "message accepted");
    assert_eq!(body["seq"], 1);
    // Exactly the message bytes, as one binary frame.
    assert_eq!(next_data(&mut sub), Message::binary("hello é".as_bytes().to_vec()));
    let (status, body) = node.legacy_publish("news", "second");
    assert_eq!((status, body["seq"].as_u64()), (200, Some(2)));
    assert_eq!(next_data(&mut sub), Message::binary(b"second".to_vec()));
}

#[test]
fn raw_socket_keeps_opcodes_and_is_live_at_101() {
    let node = Node::start(&["--shards", "2"]);
    let mut sub = node.ws("/v1/topics/raw.t/ws?role=sub");
    // Live at 101: a publish right after the handshake must arrive.
    let mut publisher = node.ws("/v1/topics/raw.t/ws?role=pub");
    publisher.send(Message::text("txt")).unwrap();
    publisher.send(Message::binary(vec![0u8, 1, 255])).unwrap();
    assert_eq!(next_data(&mut sub), Message::text("txt"));
    assert_eq!(next_data(&mut sub), Message::binary(vec![0u8, 1, 255]));
    let (status, body) = node.request("POST", "/v1/topics/raw.t", "application/octet-stream", b"\x00body");
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["seq"], 3);
    assert_eq!(next_data(&mut sub), Message::binary(b"\x00body".to_vec()));
    let (status, _) = node.request("POST", "/v1/topics/raw.t", "text/plain", b"plain");
    assert_eq!(status, 200);
    assert_eq!(next_data(&mut sub), Message::text("plain"));
}

#[test]
fn raw_pubsub_echoes_to_itself() {
    let node = Node::start(&[]);
    let mut both = node.ws("/v1/topics/echo/ws");
    both.send(Message::text("me")).unwrap();
    assert_eq!(next_data(&mut both), Message::text("me"));
}

#[test]
fn native_protocol_round_trip() {
    let node = Node::start(&["--shards", "2"]);
    let mut ws = node.ws("/v1/ws");
    let pong = native_call(&mut ws, serde_json::json!({"op": "ping", "id": 1}));
    assert_eq!((pong["ok"].as_bool(), pong["pong"].as_bool()), (Some(true), Some(true)));
    for (i, topic) in ["alpha", "beta", "gamma"].iter().enumerate() {
        let r = native_call(&mut ws, serde_json::json!({"op": "subscribe", "id": 10 + i, "topic": topic}));
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["last_seq"], 0);
    }
    // Publish from a second connection: on a single connection a message may
    // arrive before the publish reply (both are queued as soon as they exist).
    let mut p = node.ws("/v1/ws");
    let r = native_call(&mut p, serde_json::json!({"op": "publish", "id": 20, "topic": "beta", "data": "b\"1"}));
    assert_eq!((r["ok"].as_bool(), r["seq"].as_u64()), (Some(true), Some(1)));
    let m = next_json(&mut ws);
    assert_eq!(
        (m["type"].as_str(), m["topic"].as_str(), m["seq"].as_u64(), m["data"].as_str()),
        (Some("message"), Some("beta"), Some(1), Some("b\"1"))
    );
    assert!(m["ts"].as_u64().unwrap() > 1_600_000_000_000);
    // Binary publish: 0x01 | id | topic_len | topic | payload.
    let mut frame = vec![1u8];
    frame.extend_from_slice(&21u64.to_be_bytes());
    frame.push(5);
    frame.extend_from_slice(b"gamma");
    frame.extend_from_slice(&[0, 159, 146, 150]);
    p.send(Message::binary(frame)).unwrap();
    let v = next_json(&mut p);
    assert_eq!((v["id"].as_u64(), v["seq"].as_u64()), (Some(21), Some(1)), "{v}");
    match next_data(&mut ws) {
        Message::Binary(b) => {
            assert_eq!(b[0], 1);
            assert_eq!(&b[1..7], b"\x05gamma");
            assert_eq!(u64::from_be_bytes(b[7..15].try_into().unwrap()), 1);
            assert_eq!(&b[23..], &[0, 159, 146, 150]);
        }
        other => panic!("unexpected {other:?}"),
    }
    let r = native_call(&mut ws, serde_json::json!({"op": "unsubscribe", "id": 30, "topic": "beta"}));
    assert_eq!(r["ok"], true);
    let r = native_call(&mut ws, serde_json::json!({"op": "unsubscribe", "id": 31, "topic": "beta"}));
    assert_eq!(r["error"]["code"], "not_subscribed");
    // After unsubscribe, a publish to beta is not delivered; one to alpha is.
    native_call(&mut p, serde_json::json!({"op": "publish", "id": 32, "topic": "beta", "data": "x"}));
    native_call(&mut p, serde_json::json!({"op": "publish", "id": 33, "topic": "alpha", "data": "y"}));
    let m = next_json(&mut ws);
    assert_eq!((m["topic"].as_str(), m["data"].as_str()), (Some("alpha"), Some("y")));
}

#[test]
fn operations_endpoints() {
    let node = Node::start(&["--shards", "2"]);
    assert_eq!(node.get("/healthz").0, 200);
    assert_eq!(node.get("/readyz").0, 200);
    let mut sub = node.ws("/v1/topics/ops/ws?role=sub");
    for _ in 0..3 {
        assert_eq!(node.legacy_publish("ops", "m").0, 200);
    }
    for _ in 0..3 {
        next_data(&mut sub);
    }
    let info = node.get_json("/v1/topics/ops");
    assert_eq!(
        (info["last_seq"].as_u64(), info["first_seq"].as_u64(), info["subscribers"].as_u64()),
        (Some(3), Some(1), Some(1))
    );
    let list = node.get_json("/v1/topics");
    assert!(list["topics"].as_array().unwrap().iter().any(|t| t["topic"] == "ops"));
    assert_eq!(node.get("/v1/topics/none").0, 404);
    wait_until("deliveries counted", || node.metric("fluxnode_messages_delivered_total") >= 3);
    assert_eq!(node.metric("fluxnode_messages_published_total"), 3);
    let (_, metrics) = node.get("/metrics");
    assert!(metrics.contains("fluxnode_delivery_latency_seconds{quantile=\"0.99\"}"), "{metrics}");
}

#[test]
fn envelope_larger_than_the_send_queue_cap_is_still_delivered() {
    // 1 MiB of control characters: JSON escaping makes the native text
    // envelope about 6 MiB, over the default 4 MiB send-queue cap. An idle
    // subscriber must get it, not be closed as a slow consumer.
    let node = Node::start(&["--shards", "2"]);
    let mut sub = node.ws("/v1/ws");
    assert_eq!(native_call(&mut sub, serde_json::json!({"op": "subscribe", "id": 1, "topic": "esc"}))["ok"], true);
    let mut publisher = node.ws("/v1/topics/esc/ws?role=pub");
    let payload = "\u{1}".repeat(1 << 20);
    publisher.send(Message::text(payload.clone())).unwrap();
    let m = next_json(&mut sub);
    assert_eq!(m["seq"], 1);
    assert!(m["data"].as_str() == Some(payload.as_str()), "payload mismatch");
    assert_eq!(node.metric("fluxnode_slow_consumer_disconnects_total"), 0);
}

/// A raw publisher whose publish the topic's owner refuses (no room for
/// another topic, and no idle topic to evict: the one there has a
/// subscriber) is closed with 1013; publishers of existing topics go on.
/// The publishers sit on the shard that does not own the topics, so the
/// refusal crosses between shards.
#[test]
fn a_refused_raw_publish_closes_with_1013_and_spares_others() {
    // Two topics in all: one per shard.
    let node = Node::start(&["--shards", "2", "--topics-max", "2", "--topic-sockets", "accepting"]);
    let addr = node.addr();
    let (a, b) = (topic_on_shard("fa", 2, 1), topic_on_shard("fb", 2, 1));
    let _keeps_a = node.ws(&format!("/v1/topics/{a}/ws?role=sub"));
    let mut first = ws_on_shard(&addr, &format!("/v1/topics/{a}/ws?role=pub"), 0);
    first.send(Message::text("fits")).unwrap();
    wait_until("the first topic's message sequenced", || node.get(&format!("/v1/topics/{a}")).0 == 200);
    let mut second = ws_on_shard(&addr, &format!("/v1/topics/{b}/ws?role=pub"), 0);
    second.send(Message::text("no room")).unwrap();
    let code = loop {
        match second.read() {
            Ok(Message::Close(Some(frame))) => break u16::from(frame.code),
            Ok(_) => continue,
            Err(e) => panic!("expected a close frame, got {e}"),
        }
    };
    assert_eq!(code, 1013);
    for _ in 0..100 {
        first.send(Message::text("still")).unwrap();
    }
    wait_until("the first publisher still publishes", || node.get_json(&format!("/v1/topics/{a}"))["last_seq"] == 101);
}

#[test]
fn a_publish_batch_is_sequenced_in_order_and_answered_once() {
    let node = Node::start(&["--shards", "2"]);
    // Subscribers on the raw socket and the native protocol.
    let mut raw = node.ws("/v1/topics/batched/ws?role=sub");
    let mut native = node.ws("/v1/ws");
    let r = native_call(&mut native, serde_json::json!({"op": "subscribe", "id": 1, "topic": "batched"}));
    assert_eq!(r["ok"], true, "{r}");
    // Two publishers on other connections (other shards, some of them).
    let mut publishers: Vec<_> = (0..4).map(|_| node.ws("/v1/ws")).collect();
    let mut next = 1u64;
    for round in 0..3u64 {
        for (p, ws) in publishers.iter_mut().enumerate() {
            let payloads: Vec<Vec<u8>> = (0..100).map(|i| format!("{round}-{p}-{i}").into_bytes()).collect();
            let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            let id = 100 + round * 10 + p as u64;
            ws.send(Message::binary(proto::native::encode_batch(id, "batched", &refs))).unwrap();
            let reply = next_json(ws);
            assert_eq!((reply["id"].as_u64(), reply["ok"].as_bool()), (Some(id), Some(true)), "{reply}");
            // Alone at a time: its numbers are the next 100.
            let want = serde_json::json!({"first_seq": next, "last_seq": next + 99, "count": 100});
            let got = serde_json::json!({"first_seq": reply["first_seq"], "last_seq": reply["last_seq"], "count": reply["count"]});
            assert_eq!(got, want, "{reply}");
            next += 100;
            for (i, payload) in payloads.iter().enumerate() {
                assert_eq!(next_data(&mut raw), Message::binary(payload.clone()), "raw, message {i}");
                match next_data(&mut native) {
                    Message::Binary(b) => {
                        let seq = u64::from_be_bytes(b[9..17].try_into().unwrap());
                        assert_eq!((seq, &b[25..]), (next - 100 + i as u64, payload.as_slice()));
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    }
    // A malformed batch is refused with its id; the connection goes on.
    let mut cut = proto::native::encode_batch(7, "batched", &[b"abc"]);
    cut.pop();
    publishers[0].send(Message::binary(cut)).unwrap();
    let reply = next_json(&mut publishers[0]);
    assert_eq!((reply["id"].as_u64(), reply["error"]["code"].as_str()), (Some(7), Some("bad_request")), "{reply}");
    let empty = proto::native::encode_batch(8, "batched", &[]);
    publishers[0].send(Message::binary(empty)).unwrap();
    assert_eq!(next_json(&mut publishers[0])["error"]["code"], "bad_request");
    let bad_topic = proto::native::encode_batch(9, "no spaces", &[b"x"]);
    publishers[0].send(Message::binary(bad_topic)).unwrap();
    assert_eq!(next_json(&mut publishers[0])["error"]["code"], "invalid_topic");
    let pong = native_call(&mut publishers[0], serde_json::json!({"op": "ping", "id": 10}));
    assert_eq!(pong["pong"], true);
}

/// What a batched native subscriber got: each delivery as (seq, payload
/// bytes; a text message's `data`), and how many frames carried them.
fn read_batched(ws: &mut Ws, deliveries: usize) -> (Vec<(u64, Vec<u8>)>, usize, usize) {
    let (mut got, mut frames, mut batches) = (Vec::new(), 0, 0);
    let one = |record: &[u8], got: &mut Vec<(u64, Vec<u8>)>| match record.first() {
        Some(&proto::native::SERVER_BINARY_MESSAGE) => {
            let len = record[1] as usize;
            let seq = u64::from_be_bytes(record[2 + len..10 + len].try_into().unwrap());
            got.push((seq, record[18 + len..].to_vec()));
        }
        Some(b'{') => {
            let m: serde_json::Value = serde_json::from_slice(record).unwrap();
            assert_eq!(m["type"], "message", "{m}");
            got.push((m["seq"].as_u64().unwrap(), m["data"].as_str().unwrap().as_bytes().to_vec()));
        }
        other => panic!("unexpected record start {other:?}"),
    };
    while got.len() < deliveries {
        frames += 1;
        match next_data(ws) {
            Message::Text(t) => one(t.as_bytes(), &mut got),
            Message::Binary(b) if b[0] == proto::native::SERVER_BINARY_BATCH => {
                batches += 1;
                let mut rest = &b[1..];
                while !rest.is_empty() {
                    let n = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
                    one(&rest[4..4 + n], &mut got);
                    rest = &rest[4 + n..];
                }
            }
            Message::Binary(b) => one(&b, &mut got),
            other => panic!("unexpected {other:?}"),
        }
    }
    (got, frames, batches)
}

#[test]
fn a_native_subscriber_may_take_its_deliveries_in_batches() {
    let node = Node::start(&["--shards", "2"]);
    // Only the native protocol batches, and only the two values exist.
    for path in ["/v1/topics/packed/ws?role=sub&delivery=batch", "/subscribe?delivery=batch", "/v1/ws?delivery=some"] {
        match ws_connect(&node.addr(), path) {
            Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 400, "{path}"),
            other => panic!("{path}: expected 400, got {:?}", other.map(|_| "a session")),
        }
    }
    let mut single = node.ws("/v1/ws?delivery=single");
    let mut packed = node.ws("/v1/ws?delivery=batch");
    for ws in [&mut single, &mut packed] {
        let r = native_call(ws, serde_json::json!({"op": "subscribe", "id": 1, "topic": "packed"}));
        assert_eq!(r["ok"], true, "{r}");
    }
    let mut publisher = node.ws("/v1/ws");
    let mut want = Vec::new();
    for round in 0..3u64 {
        // A publish batch reaches the fan-out at once, so deliveries queue
        // up together; then a text message, which travels as JSON.
        let payloads: Vec<Vec<u8>> = (0..1000).map(|i| format!("{round}-{i}").into_bytes()).collect();
        let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        publisher.send(Message::binary(proto::native::encode_batch(round, "packed", &refs))).unwrap();
        assert_eq!(next_json(&mut publisher)["ok"], true);
        let text = format!("text \"{round}\"");
        let r = native_call(
            &mut publisher,
            serde_json::json!({"op": "publish", "id": 100 + round, "topic": "packed", "data": text}),
        );
        assert_eq!(r["ok"], true, "{r}");
        want.extend(payloads);
        want.push(text.into_bytes());
    }
    let want: Vec<(u64, Vec<u8>)> = want.into_iter().enumerate().map(|(i, p)| (i as u64 + 1, p)).collect();
    let (got, frames, batches) = read_batched(&mut packed, want.len());
    assert_eq!(got, want, "every delivery once, in order, through batches");
    let (got_single, frames_single, batches_single) = read_batched(&mut single, want.len());
    assert_eq!(got_single, want);
    assert_eq!((frames_single, batches_single), (want.len(), 0), "without the option one frame per message");
    eprintln!("{} deliveries: {frames} frames, {batches} of them batches", want.len());
    assert!(batches > 0 && frames < want.len() / 2, "{frames} frames, {batches} batches");
    // Replies still come as their own frames on a batched connection.
    let pong = native_call(&mut packed, serde_json::json!({"op": "ping", "id": 9}));
    assert_eq!(pong["pong"], true);
}
