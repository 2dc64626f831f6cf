//! Several publishers and subscribers, topics owned by different shards and
//! subscribers on both shards: every message counted, none lost, none
//! duplicated, none out of order per publisher.

mod common;

use std::collections::HashMap;
use std::thread;

use common::*;
use tungstenite::Message;

const PUBLISHERS: usize = 3;
const MESSAGES_PER_PUBLISHER: usize = 2000;

#[test]
fn ordered_and_complete_across_shards() {
    // Topic sockets stay where they were accepted, so that raw subscribers
    // sit on both shards and receive across the mesh.
    let node = Node::start(&["--shards", "2", "--topic-sockets", "accepting"]);
    let addr = node.addr();
    // One topic owned by each shard.
    let topics: Vec<String> = (0..2).map(|s| topic_on_shard("order", 2, s)).collect();
    let total = PUBLISHERS * MESSAGES_PER_PUBLISHER;
    let mut readers = Vec::new();
    for topic in &topics {
        for shard in 0..2 {
            // A raw subscriber and a native subscriber on each shard.
            let raw = ws_on_shard(&addr, &format!("/v1/topics/{topic}/ws?role=sub"), shard);
            readers.push(thread::spawn(move || check_raw(raw, total)));
            let mut native = ws_on_shard(&addr, "/v1/ws", shard);
            let reply = native_call(&mut native, serde_json::json!({"op": "subscribe", "id": 1, "topic": topic}));
            assert_eq!(reply["ok"], true);
            readers.push(thread::spawn(move || check_native(native, total)));
        }
    }
    let mut writers = Vec::new();
    for topic in &topics {
        for p in 0..PUBLISHERS {
            let (addr, topic) = (addr.clone(), topic.clone());
            writers.push(thread::spawn(move || {
                let mut ws = ws_connect(&addr, &format!("/v1/topics/{topic}/ws?role=pub")).unwrap();
                for i in 0..MESSAGES_PER_PUBLISHER {
                    ws.send(Message::text(format!("{p}:{i}"))).unwrap();
                }
                ws.flush().unwrap();
                // Keep the socket open until the node has sequenced everything.
                ws
            }));
        }
    }
    let writers: Vec<_> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    for r in readers {
        r.join().unwrap();
    }
    drop(writers);
    for topic in &topics {
        assert_eq!(node.get_json(&format!("/v1/topics/{topic}"))["last_seq"], total);
    }
}

/// Per-publisher counters: each publisher's messages must arrive 0, 1, 2, ...
fn check_payload(next: &mut HashMap<String, usize>, payload: &str) {
    let (publisher, i) = payload.split_once(':').expect("payload p:i");
    let i: usize = i.parse().unwrap();
    let expected = next.entry(publisher.to_string()).or_default();
    assert_eq!(i, *expected, "publisher {publisher}: got {i}, expected {expected} (loss, duplicate or inversion)");
    *expected += 1;
}

fn check_raw(mut ws: Ws, total: usize) {
    let mut next = HashMap::new();
    for _ in 0..total {
        match next_data(&mut ws) {
            Message::Text(t) => check_payload(&mut next, &t),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(next.values().all(|&n| n == MESSAGES_PER_PUBLISHER), "{next:?}");
}

fn check_native(mut ws: Ws, total: usize) {
    let mut next = HashMap::new();
    let mut seq = 0u64;
    while seq < total as u64 {
        let m = next_json(&mut ws);
        assert_eq!(m["type"], "message", "{m}");
        // Server sequence numbers: contiguous from 1.
        seq += 1;
        assert_eq!(m["seq"].as_u64(), Some(seq));
        check_payload(&mut next, m["data"].as_str().unwrap());
    }
}

/// A raw publisher on a shard that does not own its topic sends more than
/// the in-flight budget to the owner (32 MiB): the owner's batched
/// acknowledgements must give the budget back, or the publisher would stall.
#[test]
fn a_cross_shard_raw_publisher_gets_its_budget_back() {
    const MESSAGES: u64 = 640;
    let node = Node::start(&["--shards", "2", "--topic-sockets", "accepting"]);
    let topic = topic_on_shard("budget", 2, 1);
    let mut ws = ws_on_shard(&node.addr(), &format!("/v1/topics/{topic}/ws?role=pub"), 0);
    // A node that stopped reading fails the test instead of hanging it.
    ws.get_ref().set_write_timeout(Some(WAIT)).unwrap();
    let payload = "b".repeat(64 << 10);
    for _ in 0..MESSAGES {
        ws.write(Message::text(payload.clone())).unwrap();
    }
    ws.flush().unwrap();
    wait_until("every message sequenced", || {
        node.get(&format!("/v1/topics/{topic}")).0 == 200
            && node.get_json(&format!("/v1/topics/{topic}"))["last_seq"] == MESSAGES
    });
}
