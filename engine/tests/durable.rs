//! Durable topics against a real node: acknowledged messages survive
//! `kill -9` with the same sequence and bytes, a torn tail is cut, numbers
//! are never reused, reads by sequence, time and key, declaration over the
//! admin API, and a subscriber resuming across a restart is never left
//! with a silent gap.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use tungstenite::Message;

/// What publishers were told: sequence -> payload, per topic.
type Acked = Arc<Mutex<BTreeMap<(String, u64), String>>>;

/// Publishes on `topic` over the native protocol at ack `local`, 16
/// requests in flight, until the connection fails; records every ok.
fn publisher(addr: String, topic: String, run: usize, acked: Acked, count: Arc<AtomicUsize>, stop: Arc<AtomicBool>) {
    let Ok(mut ws) = ws_connect(&addr, "/v1/ws") else { return };
    let mut next = 0u64;
    let mut payloads: BTreeMap<u64, String> = BTreeMap::new();
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..16 {
            next += 1;
            let data = format!("{topic}-run{run}-{next}-{}", "x".repeat((next % 50) as usize));
            let request =
                serde_json::json!({"op": "publish", "id": next, "topic": topic, "data": data, "ack": "local"});
            if ws.send(Message::text(request.to_string())).is_err() {
                return;
            }
            payloads.insert(next, data);
        }
        for _ in 0..16 {
            let v = match ws.read() {
                Ok(Message::Text(t)) => serde_json::from_str::<serde_json::Value>(&t).unwrap(),
                Ok(_) => continue,
                Err(_) => return,
            };
            if v["ok"] == true {
                let id = v["id"].as_u64().unwrap();
                let seq = v["seq"].as_u64().unwrap();
                let data = payloads.remove(&id).expect("a reply to a publish sent");
                acked.lock().unwrap().insert((topic.clone(), seq), data);
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Runs `iterations` of: start, publish from two connections on two
/// topics, `kill -9` once `per_run` more acks arrived, restart, check.
/// Returns (iterations, acknowledged messages checked).
fn crash_loop(iterations: usize, per_run: usize) -> (usize, usize) {
    let dir = fresh_dir("crash");
    let dir_arg = dir.to_str().unwrap().to_string();
    let topics = ["crash-a", "crash-b"];
    let flags = ["--shards", "2", "--durable", topics[0], "--durable", topics[1], "--data-dir", &dir_arg];
    let acked: Acked = Arc::default();
    let mut last_seq: BTreeMap<&str, u64> = BTreeMap::new();
    for run in 0..iterations {
        let node = Node::start(&flags);
        // Everything acknowledged so far is there, same sequence, same bytes.
        for topic in topics {
            let log = read_log(&node, topic);
            let mine: Vec<_> = acked
                .lock()
                .unwrap()
                .iter()
                .filter(|((t, _), _)| t == topic)
                .map(|((_, s), d)| (*s, d.clone()))
                .collect();
            for (seq, data) in &mine {
                assert_eq!(log.get(seq), Some(data), "run {run}: {topic} acked seq {seq} lost or changed");
            }
            // Sequences go up in the log, and every acked one is in it.
            let top = log.keys().next_back().copied().unwrap_or(0);
            assert!(top >= last_seq.get(topic).copied().unwrap_or(0), "run {run}: {topic} went back");
            last_seq.insert(topic, top);
        }
        let count = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = topics
            .iter()
            .map(|topic| {
                let (addr, topic, acked, count, stop) =
                    (node.addr(), topic.to_string(), acked.clone(), count.clone(), stop.clone());
                std::thread::spawn(move || publisher(addr, topic, run, acked, count, stop))
            })
            .collect();
        wait_until("acks before the kill", || count.load(Ordering::Relaxed) >= per_run);
        drop(node); // SIGKILL, mid-traffic
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        // No number was given twice: each (topic, seq) acked once with one
        // payload (a reuse would have replaced an entry of an earlier run).
        let runs_seen = acked.lock().unwrap().values().filter(|d| d.contains(&format!("-run{run}-"))).count();
        assert!(runs_seen >= per_run.min(1), "run {run}: nothing acked");
    }
    let node = Node::start(&flags);
    let mut checked = 0;
    for topic in topics {
        let log = read_log(&node, topic);
        for ((t, seq), data) in acked.lock().unwrap().iter().filter(|((t, _), _)| t == topic) {
            assert_eq!(log.get(seq), Some(data), "{t} acked seq {seq} lost at the end");
            checked += 1;
        }
    }
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
    (iterations, checked)
}

#[test]
fn acknowledged_messages_survive_kill_9() {
    let (runs, checked) = crash_loop(4, 200);
    eprintln!("crash loop: {runs} kills, {checked} acknowledged messages checked, none lost");
}

/// The long loop: `CRASH_ITERATIONS` (default 1000) kills.
#[test]
#[ignore]
fn acknowledged_messages_survive_kill_9_many_times() {
    let n = std::env::var("CRASH_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let (runs, checked) = crash_loop(n, 100);
    eprintln!("crash loop: {runs} kills, {checked} acknowledged messages checked, none lost");
}

#[test]
fn a_torn_tail_is_cut_and_numbers_are_not_reused() {
    let dir = fresh_dir("torn");
    let dir_arg = dir.to_str().unwrap().to_string();
    let flags = ["--shards", "1", "--durable", "torn", "--data-dir", &dir_arg];
    let node = Node::start(&flags);
    for i in 1..=5 {
        let (status, _) = node.request("POST", "/v1/topics/torn", "text/plain", format!("m{i}").as_bytes());
        assert_eq!(status, 200);
    }
    drop(node);
    // Half a record at the end of the segment, as a crash mid-write leaves it.
    let seg_dir = std::fs::read_dir(dir.join("topics")).unwrap().next().unwrap().unwrap().path();
    let seg = seg_dir.join(format!("{:020}.log", 1));
    let mut bytes = std::fs::read(&seg).unwrap();
    let whole = bytes.iter().rposition(|&b| b != 0).unwrap() + 1;
    bytes.truncate(whole);
    bytes.extend_from_slice(&[40, 0, 0, 0, 1, 2, 3]);
    std::fs::write(&seg, &bytes).unwrap();
    let node = Node::start(&flags);
    let log = read_log(&node, "torn");
    assert_eq!(log.values().cloned().collect::<Vec<_>>(), ["m1", "m2", "m3", "m4", "m5"]);
    let (_, body) = node.request("POST", "/v1/topics/torn", "text/plain", b"m6");
    let seq = serde_json::from_str::<serde_json::Value>(&body).unwrap()["seq"].as_u64().unwrap();
    assert!(seq > 5, "a number was reused: {seq}");
    // A clean stop continues without a skip.
    let _ = nix_term(&node);
    let node = Node::start(&flags);
    let (_, body) = node.request("POST", "/v1/topics/torn", "text/plain", b"m7");
    let next = serde_json::from_str::<serde_json::Value>(&body).unwrap()["seq"].as_u64().unwrap();
    assert_eq!(next, seq + 1, "after a clean stop the sequence continues");
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn declared_over_the_api_read_by_sequence_time_and_key_and_resumed_across_a_restart() {
    let dir = fresh_dir("api");
    let dir_arg = dir.to_str().unwrap().to_string();
    let flags = ["--shards", "2", "--data-dir", &dir_arg];
    let node = Node::start(&flags);
    let (status, body) = node.request(
        "PUT",
        "/v1/topics/orders",
        "application/json",
        br#"{"ack":"local","retention":{"max_messages":100000}}"#,
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = node.request("PUT", "/v1/topics/orders", "application/json", br#"{"ack":"eventually"}"#);
    assert_eq!(status, 400, "{body}");
    let mut ws = node.ws("/v1/ws");
    let mut epoch = String::new();
    for i in 1..=30u64 {
        let key = format!("order-{}", i % 3);
        let r = native_call(
            &mut ws,
            serde_json::json!({"op":"publish","id":i,"topic":"orders","data":format!("e{i}"),"key":key}),
        );
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["seq"], i);
    }
    let info = node.get_json("/v1/topics/orders");
    assert_eq!(info["durable"]["log_messages"], 30, "{info}");
    assert_eq!(info["durable"]["keys"], 3, "{info}");
    epoch.push_str(info["epoch"].as_str().unwrap());
    let by_key = node.get_json("/v1/topics/orders/messages?key=order-1&limit=5");
    let seqs: Vec<u64> = by_key["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 4, 7, 10, 13]);
    assert_eq!(by_key["next_seq"], 14);
    let rest = node.get_json("/v1/topics/orders/messages?key=order-1&from_seq=14");
    assert_eq!(rest["messages"].as_array().unwrap().len(), 5);
    assert!(rest["next_seq"].is_null());
    let from = node.get_json("/v1/topics/orders/messages?from_seq=28");
    assert_eq!(from["messages"].as_array().unwrap().len(), 3);
    let ts = from["messages"][0]["ts"].as_u64().unwrap();
    let since = node.get_json(&format!("/v1/topics/orders/messages?since_ms={ts}&limit=1"));
    assert!(since["messages"][0]["seq"].as_u64().unwrap() <= 28);
    assert_eq!(node.get("/v1/topics/orders/messages?key=a&since_ms=1").0, 400);
    assert_eq!(node.get("/v1/topics/nothing/messages").0, 404);
    drop(ws);
    drop(node); // kill -9
    let node = Node::start(&flags);
    // Same epoch after the restart; a resume from 25 gets 26.. from the
    // log, and is told exactly what it cannot get: never a silent gap.
    let info = node.get_json("/v1/topics/orders");
    assert_eq!(info["epoch"].as_str(), Some(epoch.as_str()), "{info}");
    let mut ws = node.ws("/v1/ws");
    let r =
        native_call(&mut ws, serde_json::json!({"op":"subscribe","id":1,"topic":"orders","from_seq":25,"epoch":epoch}));
    assert_eq!(r["ok"], true, "{r}");
    assert!(r.get("lost").is_none(), "{r}");
    // 26..30 come from the log; the numbers the crash skipped after 30
    // are told as a gap.
    assert_eq!(r["gap"]["from_seq"], 31, "{r}");
    for want in 26..=30 {
        let m = next_json(&mut ws);
        assert_eq!(m["seq"], want, "{m}");
    }
    let (status, _) = node.request("DELETE", "/v1/topics/orders", "", b"");
    assert_eq!(status, 200);
    assert_eq!(node.get("/v1/topics/orders/messages").0, 404);
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Publishes `n` text messages `m1..mn` (after `start`) over one native
/// connection, 32 in flight.
fn publish_many(node: &Node, topic: &str, start: u64, n: u64) {
    let mut ws = node.ws("/v1/ws");
    let mut sent = 0;
    while sent < n {
        let window = (n - sent).min(32);
        for i in 0..window {
            let k = start + sent + i + 1;
            let request = serde_json::json!({"op":"publish","id":k,"topic":topic,"data":format!("m{k}")});
            ws.send(Message::text(request.to_string())).unwrap();
        }
        for _ in 0..window {
            assert_eq!(next_json(&mut ws)["ok"], true);
        }
        sent += window;
    }
}

#[test]
fn a_subscriber_catches_up_from_the_log_beyond_the_history_and_across_a_crash() {
    let dir = fresh_dir("catch-up");
    let dir_arg = dir.to_str().unwrap().to_string();
    // A small history and send queue: the catch-up goes in many batches.
    let flags = [
        "--shards",
        "2",
        "--durable",
        "big",
        "--history-messages-max",
        "16",
        "--history-bytes-max",
        "4096",
        "--message-bytes-max",
        "4096",
        "--send-queue-bytes-max",
        "16384",
        "--data-dir",
        &dir_arg,
    ];
    let node = Node::start(&flags);
    publish_many(&node, "big", 0, 3000);
    let mut ws = node.ws("/v1/ws");
    let r = native_call(&mut ws, serde_json::json!({"op":"subscribe","id":1,"topic":"big","from_seq":0}));
    assert_eq!(r["ok"], true, "{r}");
    assert!(r.get("gap").is_none() && r.get("lost").is_none(), "everything is in the log: {r}");
    let epoch = r["epoch"].as_str().unwrap().to_string();
    for want in 1..=3000u64 {
        let m = next_json(&mut ws);
        assert_eq!((m["seq"].as_u64(), m["data"].as_str()), (Some(want), Some(format!("m{want}").as_str())), "{m}");
    }
    publish_many(&node, "big", 3000, 10);
    for want in 3001..=3010u64 {
        assert_eq!(next_json(&mut ws)["seq"], want, "live after the catch-up");
    }
    // From a time: the first message at or after it, from the log.
    let log = node.get_json("/v1/topics/big/messages?from_seq=1500&limit=1");
    let ts = log["messages"][0]["ts"].as_u64().unwrap();
    let first = node.get_json(&format!("/v1/topics/big/messages?since_ms={ts}&limit=1"))["messages"][0]["seq"]
        .as_u64()
        .unwrap();
    let mut since = node.ws("/v1/ws");
    let r = native_call(&mut since, serde_json::json!({"op":"subscribe","id":1,"topic":"big","since_ms":ts}));
    assert_eq!(r["ok"], true, "{r}");
    for want in first..=3010u64 {
        let m = next_json(&mut since);
        assert_eq!(m["seq"], want, "{m}");
        assert!(m["ts"].as_u64().unwrap() >= ts);
    }
    drop(since);
    // The raw socket catches up the same way.
    let mut raw = node.ws("/v1/topics/big/ws?role=sub&from=2990");
    for want in 2991..=3010u64 {
        match next_data(&mut raw) {
            Message::Text(t) => assert_eq!(t.as_str(), format!("m{want}")),
            other => panic!("expected m{want}, got {other:?}"),
        }
    }
    drop((ws, raw));
    drop(node); // kill -9
    let node = Node::start(&flags);
    let mut ws = node.ws("/v1/ws");
    let r =
        native_call(&mut ws, serde_json::json!({"op":"subscribe","id":1,"topic":"big","from_seq":100,"epoch":epoch}));
    assert_eq!(r["ok"], true, "{r}");
    assert!(r.get("lost").is_none(), "same epoch across the restart: {r}");
    for want in 101..=3010u64 {
        assert_eq!(next_json(&mut ws)["seq"], want);
    }
    // The numbers the crash skipped are told, never silent: in the reply
    // when the catch-up took one batch, else in a notice after the batches.
    let gap = match r.get("gap") {
        Some(gap) => gap.clone(),
        None => next_json(&mut ws),
    };
    assert_eq!(gap["from_seq"].as_u64(), Some(3011), "{gap}");
    publish_many(&node, "big", 0, 1);
    let m = next_json(&mut ws);
    let resumed_at = gap["to_seq"].as_u64().unwrap() + 1;
    assert_eq!(m["seq"].as_u64(), Some(resumed_at), "{m}");
    // A later reader whose catch-up spans the skip (the history holds 16,
    // so the log serves both sides of it) is told the skipped range where
    // it falls, between the last number before it and the first after.
    publish_many(&node, "big", 1, 40);
    let mut late = node.ws("/v1/ws");
    let r = native_call(
        &mut late,
        serde_json::json!({"op":"subscribe","id":1,"topic":"big","from_seq":3000,"epoch":epoch}),
    );
    assert_eq!(r["ok"], true, "{r}");
    let mut seen = Vec::new();
    let mut told = r.get("gap").cloned();
    while seen.last() != Some(&(resumed_at + 40)) {
        let m = next_json(&mut late);
        match m["type"].as_str() {
            Some("gap") => told = Some(m),
            _ => seen.push(m["seq"].as_u64().unwrap()),
        }
    }
    let told = told.expect("the skipped numbers are told");
    assert_eq!((told["from_seq"].as_u64(), told["to_seq"].as_u64()), (Some(3011), Some(resumed_at - 1)), "{told}");
    let want: Vec<u64> = (3001..=3010).chain(resumed_at..=resumed_at + 40).collect();
    assert_eq!(seen, want);
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}
