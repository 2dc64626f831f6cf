//! Resume from history: `from_seq` (native) and `?from=N` (raw), with no gap
//! and no duplicate, and the explicit answer when N is older than history.

mod common;

use common::*;
use tungstenite::Message;

fn publish_n(node: &Node, topic: &str, n: usize) {
    for i in 1..=n {
        assert_eq!(node.legacy_publish(topic, &format!("m{i}")).0, 200);
    }
}

#[test]
fn native_resume_replays_then_goes_live() {
    let node = Node::start(&["--shards", "2"]);
    publish_n(&node, "hist", 10);
    let mut ws = node.ws("/v1/ws");
    let reply = native_call(&mut ws, serde_json::json!({"op": "subscribe", "id": 1, "topic": "hist", "from_seq": 4}));
    assert_eq!(
        (reply["ok"].as_bool(), reply["last_seq"].as_u64(), reply["first_seq"].as_u64()),
        (Some(true), Some(10), Some(1))
    );
    assert!(reply.get("gap").is_none(), "{reply}");
    for seq in 5..=10u64 {
        let m = next_json(&mut ws);
        assert_eq!((m["seq"].as_u64(), m["data"].as_str()), (Some(seq), Some(format!("m{seq}").as_str())));
    }
    assert_eq!(node.legacy_publish("hist", "m11").0, 200);
    assert_eq!(next_json(&mut ws)["seq"], 11);
}

#[test]
fn raw_resume_replays_then_goes_live() {
    let node = Node::start(&["--shards", "2"]);
    publish_n(&node, "rawhist", 10);
    let mut ws = node.ws("/v1/topics/rawhist/ws?role=sub&from=7");
    for i in 8..=10 {
        assert_eq!(next_data(&mut ws), Message::text(format!("m{i}")));
    }
    assert_eq!(node.legacy_publish("rawhist", "live").0, 200);
    assert_eq!(next_data(&mut ws), Message::text("live"));
}

#[test]
fn too_old_is_said_explicitly() {
    let node = Node::start(&["--shards", "2", "--history-messages-max", "5"]);
    publish_n(&node, "old", 10);
    let mut ws = node.ws("/v1/ws");
    let reply = native_call(&mut ws, serde_json::json!({"op": "subscribe", "id": 1, "topic": "old", "from_seq": 2}));
    assert_eq!(reply["first_seq"], 6);
    assert_eq!(reply["gap"], serde_json::json!({"from_seq": 3, "to_seq": 5}));
    for seq in 6..=10u64 {
        assert_eq!(next_json(&mut ws)["seq"], seq);
    }
    let mut raw = node.ws("/v1/topics/old/ws?role=sub&from=2");
    let (code, reason) = expect_close(&mut raw);
    assert_eq!(code, 4010);
    assert!(reason.contains("first retained seq is 6"), "{reason}");
}

#[test]
fn resume_while_publishing_has_no_gap_or_duplicate() {
    let node = Node::start(&["--shards", "2"]);
    let addr = node.addr();
    let topic = topic_on_shard("busy", 2, 1);
    let total = 600u64;
    let publisher = {
        let (addr, topic) = (addr.clone(), topic.clone());
        std::thread::spawn(move || {
            let mut ws = ws_connect(&addr, &format!("/v1/topics/{topic}/ws?role=pub")).unwrap();
            for i in 1..=total {
                ws.send(Message::text(format!("{i}"))).unwrap();
            }
            ws.flush().unwrap();
            ws
        })
    };
    // Subscribe from the start while messages are still being sequenced, on
    // both shards: history replay and live stream must join exactly.
    let mut subs: Vec<Ws> = (0..2).map(|s| ws_on_shard(&addr, "/v1/ws", s)).collect();
    for ws in subs.iter_mut() {
        let reply = native_call(ws, serde_json::json!({"op": "subscribe", "id": 1, "topic": topic, "from_seq": 0}));
        assert_eq!(reply["ok"], true, "{reply}");
    }
    for ws in subs.iter_mut() {
        for seq in 1..=total {
            let m = next_json(ws);
            assert_eq!(m["seq"].as_u64(), Some(seq), "{m}");
        }
    }
    drop(publisher.join().unwrap());
}
