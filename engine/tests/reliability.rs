//! What hostile and unlucky clients found (issue 12): each test here failed
//! before its fix.

mod common;

use std::process::{Command, Stdio};

use common::*;

/// A second node on a port another node already serves must refuse to
/// start: with SO_REUSEPORT alone it joined the port, and the kernel split
/// connections between two sequence spaces (duplicate sequence numbers).
#[test]
fn a_second_node_on_a_served_port_refuses_to_start() {
    let first = Node::start(&[]);
    let mut second = Command::new(fluxnode_bin())
        .args(["--listen", &first.addr()])
        .env("FLUXNODE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run fluxnode");
    if !wait_for(|| second.try_wait().expect("wait").is_some()) {
        let _ = second.kill();
        panic!("a second node started on a port another node serves");
    }
    let second = second.wait_with_output().expect("its output");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "second node: {stderr}");
    assert!(stderr.contains("already accepts connections"), "the error names the cause: {stderr}");
    // The first node still serves.
    assert_eq!(first.get("/healthz").0, 200);
}

/// After `kill -9` and a restart the topic starts a new sequence space. A
/// subscriber resuming from the old one (with its epoch, or from a sequence
/// the new node never assigned) is told its history is lost (4011, native
/// "lost") instead of silently getting the new sequence 1, 2, ... as if they
/// followed what it had.
#[test]
fn a_resume_across_a_restart_is_told_its_history_is_lost() {
    let first = Node::start(&[]);
    let mut sub = first.ws("/v1/ws");
    let reply = native_call(&mut sub, serde_json::json!({"op": "subscribe", "id": 1, "topic": "orders"}));
    let old_epoch = reply["epoch"].as_str().expect("epoch in the reply").to_string();
    for i in 0..20 {
        assert_eq!(first.request("POST", "/v1/topics/orders", "text/plain", format!("m{i}").as_bytes()).0, 200);
    }
    let port = first.port;
    drop(first); // kill -9
    let second = Node::start_on(port, &[]);
    for i in 0..5 {
        assert_eq!(second.request("POST", "/v1/topics/orders", "text/plain", format!("n{i}").as_bytes()).0, 200);
    }
    // Native, with the epoch: history lost, live from now.
    let mut native = second.ws("/v1/ws");
    let r = native_call(
        &mut native,
        serde_json::json!({"op": "subscribe", "id": 1, "topic": "orders", "from_seq": 3, "epoch": old_epoch}),
    );
    assert_eq!(r["lost"]["reason"], "epoch_changed", "{r}");
    assert_ne!(r["epoch"], old_epoch.as_str());
    // Raw, without the epoch, from beyond the new last sequence.
    let mut raw = second.ws("/v1/topics/orders/ws?role=sub&from=18");
    let (code, reason) = expect_close(&mut raw);
    assert_eq!(code, 4011, "{reason}");
    assert!(reason.contains("beyond_last_seq"), "{reason}");
    // Raw, with the old epoch, from a sequence the new space also has.
    let mut raw = second.ws(&format!("/v1/topics/orders/ws?role=sub&from=2&epoch={old_epoch}"));
    assert_eq!(expect_close(&mut raw).0, 4011);
    // With the current epoch, an ordinary resume.
    let epoch = r["epoch"].as_str().unwrap();
    let mut raw = second.ws(&format!("/v1/topics/orders/ws?role=sub&from=3&epoch={epoch}"));
    assert_eq!(next_data(&mut raw), tungstenite::Message::text("n3"));
}

/// Thousands of publishes to distinct topic names filled the topic table
/// for good (topics were never freed), and every path then refused new
/// topics until a restart. Idle topics are now evicted to make room.
#[test]
fn distinct_topics_never_lock_the_node() {
    let node = Node::start(&["--topics-max", "64"]);
    let mut keep = node.ws("/v1/topics/kept/ws?role=sub");
    for i in 0..1000 {
        let (status, body) = node.request("POST", &format!("/v1/topics/spray-{i}"), "text/plain", b"x");
        assert_eq!(status, 200, "topic {i}: {body}");
    }
    // The subscribed topic was never evicted: it still delivers.
    assert_eq!(node.request("POST", "/v1/topics/kept", "text/plain", b"still here").0, 200);
    assert_eq!(next_data(&mut keep), tungstenite::Message::text("still here"));
    assert!(node.metric("fluxnode_topics_evicted_total") >= 900);
}

/// Topics a subscription keeps alive are never evicted, so one client
/// could fill the table by subscribing (over many connections) and lock
/// everyone else out. Each client address may keep at most its share
/// (`--client-topics-share-percent`, of each shard's table) subscribed;
/// past it, its subscribes are refused (native `client_topic_share`, HTTP
/// 429) while other addresses still get topics.
#[test]
fn one_client_address_cannot_lock_everyone_out() {
    // One shard of 8 topics, a quarter each: 2 topics per address.
    let node = Node::start(&["--shards", "1", "--topics-max", "8", "--proxy-protocol"]);
    let (a, b) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
    let subscribe = |ws: &mut Ws, id: u64, topic: &str| {
        native_call(ws, serde_json::json!({"op": "subscribe", "id": id, "topic": topic}))
    };
    let mut a1 = ws_connect_as(&node.addr(), "/v1/ws", a).expect("upgrade");
    let mut a2 = ws_connect_as(&node.addr(), "/v1/ws", a).expect("upgrade");
    assert_eq!(subscribe(&mut a1, 1, "a-1")["ok"], true);
    assert_eq!(subscribe(&mut a2, 1, "a-2")["ok"], true);
    // A third topic from the same address, on any connection, is refused.
    let refused = subscribe(&mut a2, 2, "a-3");
    assert_eq!(refused["error"]["code"], "client_topic_share", "{refused}");
    assert_eq!(ws_connect_as(&node.addr(), "/v1/topics/a-4/ws?role=sub", a).err(), Some(429));
    // Everyone else still gets topics; joining one that is already
    // subscribed costs nothing.
    let mut b1 = ws_connect_as(&node.addr(), "/v1/ws", b).expect("upgrade");
    for (id, topic) in [(1, "b-1"), (2, "b-2"), (3, "a-1")] {
        let reply = subscribe(&mut b1, id, topic);
        assert_eq!(reply["ok"], true, "{reply}");
    }
    let raw = ws_connect_as(&node.addr(), "/v1/topics/a-2/ws?role=sub", a).expect("a topic already kept");
    // The last subscriber leaving a topic gives the share back.
    assert_eq!(native_call(&mut a2, serde_json::json!({"op": "unsubscribe", "id": 3, "topic": "a-2"}))["ok"], true);
    drop(raw);
    let mut id = 10;
    wait_until("a's share given back", || {
        id += 1;
        subscribe(&mut a1, id, "a-3")["ok"] == true
    });
}

/// `GET /v1/topics` answered every topic in one body (29 MB and 1.5 to
/// 2.6 s at 200,000 topics, stalling the data plane). It is now paginated:
/// at most `limit` (default 100, at most 1000) topics a page, sorted, with
/// the cursor of the next page, filterable by prefix.
#[test]
fn the_topic_listing_is_paginated() {
    let node = Node::start(&["--topics-max", "8192", "--history-bytes-max", "65536"]);
    for i in 0..2500 {
        let topic = if i % 5 == 0 { format!("b-{i:05}") } else { format!("a-{i:05}") };
        assert_eq!(node.request("POST", &format!("/v1/topics/{topic}"), "text/plain", b"x").0, 200);
    }
    let first = node.get_json("/v1/topics");
    assert_eq!(first["topics"].as_array().unwrap().len(), 100, "the default page");
    let mut seen = Vec::new();
    let mut path = "/v1/topics?limit=1000".to_string();
    loop {
        let page = node.get_json(&path);
        let topics = page["topics"].as_array().unwrap();
        assert!(topics.len() <= 1000);
        seen.extend(topics.iter().map(|t| t["topic"].as_str().unwrap().to_string()));
        match page["next"].as_str() {
            Some(next) => path = format!("/v1/topics?limit=1000&after={next}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 2500, "every topic once");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicates");
    let b = node.get_json("/v1/topics?prefix=b-&limit=1000");
    assert_eq!(b["topics"].as_array().unwrap().len(), 500);
    assert!(b["next"].is_null());
    assert_eq!(node.get("/v1/topics?limit=1001").0, 400);
    assert_eq!(node.get("/v1/topics?limit=0").0, 400);
}
