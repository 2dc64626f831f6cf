//! Durable topics in an object store, against real processes: publishes at
//! ack `stored`, snapshots, a fresh node restored from one with every
//! message compared, and the store stopped mid-upload (the previous
//! snapshot stays intact, uploads resume). Once with the embedded
//! directory store, once with `moto_server`, an S3-compatible server
//! nobody here wrote, through the AWS SDK.
//!
//! Tiered reads: a topic whose retention keeps little on disk is read from
//! its first message (pages, key reads, a subscriber catching up) with the
//! older segments fetched back from the store, across a `kill -9` and after
//! a restore that leaves them there.
//!
//! `moto_server` comes from the virtualenv `./scripts/test` prepares
//! (`FLUXNODE_TEST_PYTHON`'s directory).

mod common;

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::Instant;

use common::*;
use tungstenite::Message;

/// A node's flags: two shards, the durable topic `orders`, a 20 ms upload
/// interval, `data` as its data directory, and `store`'s flags.
fn node_flags(data: &std::path::Path, store: &[&str]) -> Vec<String> {
    let base = ["--shards", "2", "--durable", "orders", "--upload-interval-ms", "20", "--data-dir"];
    let mut flags: Vec<String> = base.iter().map(|s| s.to_string()).collect();
    flags.push(data.to_str().unwrap().to_string());
    flags.extend(store.iter().map(|s| s.to_string()));
    flags
}

/// Publishes `n` messages at `ack`, 16 in flight; returns seq -> data and
/// each publish-to-answer time in microseconds.
fn publish(node: &Node, topic: &str, tag: &str, n: u64, ack: &str) -> (BTreeMap<u64, String>, Vec<u64>) {
    let mut ws = node.ws("/v1/ws");
    let (mut acked, mut micros) = (BTreeMap::new(), Vec::new());
    let mut sent: BTreeMap<u64, (String, Instant)> = BTreeMap::new();
    let mut id = 0;
    while id < n {
        let window = (n - id).min(16);
        for _ in 0..window {
            id += 1;
            let data = format!("{tag}-{id}");
            let request = serde_json::json!({"op":"publish","id":id,"topic":topic,"data":data,"ack":ack});
            ws.send(Message::text(request.to_string())).unwrap();
            sent.insert(id, (data, Instant::now()));
        }
        for _ in 0..window {
            let v = next_json(&mut ws);
            assert_eq!(v["ok"], true, "{v}");
            let (data, at) = sent.remove(&v["id"].as_u64().unwrap()).unwrap();
            micros.push(at.elapsed().as_micros() as u64);
            acked.insert(v["seq"].as_u64().unwrap(), data);
        }
    }
    (acked, micros)
}

fn p99(mut micros: Vec<u64>) -> u64 {
    micros.sort_unstable();
    micros[(micros.len() * 99 / 100).min(micros.len() - 1)]
}

/// Snapshot, wipe, restore into a fresh node, compare: the shared part of
/// both tests. Returns the restored node.
fn snapshot_and_restore(node: Node, flags: &[String], env: &[(&str, &str)], expect: &BTreeMap<u64, String>) -> Node {
    let (status, body) = node.request("POST", "/v1/snapshots", "", b"");
    assert_eq!(status, 201, "{body}");
    let made: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(made["segments"].as_u64().unwrap() >= 1, "{made}");
    let epoch = node.get_json("/v1/topics/orders")["epoch"].as_str().unwrap().to_string();
    let list = node.get_json("/v1/snapshots");
    assert!(list["snapshots"].as_array().unwrap().iter().any(|s| s == &made["id"]), "{list}");
    drop(node); // kill -9: the disk is lost below
    let data_dir = flags.iter().position(|f| f == "--data-dir").map(|i| flags[i + 1].clone()).unwrap();
    std::fs::remove_dir_all(&data_dir).unwrap();
    let mut restore: Vec<&str> = flags.iter().map(String::as_str).collect();
    restore.extend(["--restore", "latest"]);
    let node = Node::start_with_env(&restore, env);
    let log = read_log(&node, "orders");
    for (seq, data) in expect {
        assert_eq!(log.get(seq), Some(data), "seq {seq} not restored");
    }
    assert_eq!(log.len(), expect.len(), "restored messages that were never acknowledged");
    let info = node.get_json("/v1/topics/orders");
    assert_ne!(info["epoch"].as_str().unwrap(), epoch, "a restore starts a new epoch");
    eprintln!("restored {} messages from snapshot {}: every one matches", log.len(), made["id"]);
    node
}

#[test]
fn stored_acks_snapshot_and_restore_through_a_directory_store() {
    let data = fresh_dir("dir-data");
    let objects = fresh_dir("dir-objects");
    let flags = node_flags(&data, &["--object-store", objects.to_str().unwrap()]);
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let node = Node::start(&args);
    let (mut expect, micros) = publish(&node, "orders", "stored", 200, "stored");
    eprintln!("ack=stored (directory store, upload interval 20 ms): p99 {} us over 200 publishes", p99(micros));
    let segments = std::fs::read_dir(objects.join("topics")).unwrap().next().unwrap().unwrap().path();
    assert!(std::fs::read_dir(segments).unwrap().count() >= 1, "a sealed segment was uploaded");
    expect.extend(publish(&node, "orders", "local", 50, "local").0);
    // kill -9 and a restart on the same disk: the uploaded segments stay as
    // they are (appends go to new ones), and more is published and stored.
    drop(node);
    let node = Node::start(&args);
    expect.extend(publish(&node, "orders", "after-restart", 50, "stored").0);
    let node = snapshot_and_restore(node, &flags, &[], &expect);
    // The restored topic takes new messages after the restored ones.
    let (more, _) = publish(&node, "orders", "after", 1, "local");
    assert!(*more.keys().next().unwrap() > *expect.keys().last().unwrap());
    drop(node);
    let _ = std::fs::remove_dir_all(&data);
    let _ = std::fs::remove_dir_all(&objects);
}

/// Publishes `n` messages of about 2 KiB to `topic` at ack `local`, each
/// with key `k{seq % 5}`, 16 in flight; returns seq -> data.
fn publish_keyed(node: &Node, topic: &str, n: u64) -> BTreeMap<u64, String> {
    let mut ws = node.ws("/v1/ws");
    let mut acked = BTreeMap::new();
    let mut sent = BTreeMap::new();
    let mut id = 0;
    while id < n {
        let window = (n - id).min(16);
        for _ in 0..window {
            id += 1;
            let data = format!("{id}-{}", "x".repeat(2_000));
            let key = format!("k{}", id % 5);
            let request = serde_json::json!({"op":"publish","id":id,"topic":topic,"data":data,"key":key,"ack":"local"});
            ws.send(Message::text(request.to_string())).unwrap();
            sent.insert(id, data);
        }
        for _ in 0..window {
            let r = next_json(&mut ws);
            assert_eq!(r["ok"], true, "{r}");
            let data = sent.remove(&r["id"].as_u64().unwrap()).unwrap();
            acked.insert(r["seq"].as_u64().unwrap(), data);
        }
    }
    acked
}

/// What a subscriber caught up with: (seq, data) in order, and the gaps
/// it was told.
type CaughtUp = (Vec<(u64, String)>, Vec<(u64, u64)>);

/// Every message of `topic` from its first through `last`, in order, by a
/// subscriber catching up; the gaps it is told.
fn catch_up_all(node: &Node, topic: &str, last: u64) -> CaughtUp {
    let mut ws = node.ws("/v1/ws");
    let r = native_call(&mut ws, serde_json::json!({"op":"subscribe","id":1,"topic":topic,"from_seq":0}));
    assert_eq!(r["ok"], true, "{r}");
    let range = |g: &serde_json::Value| (g["from_seq"].as_u64().unwrap(), g["to_seq"].as_u64().unwrap());
    let mut gaps: Vec<(u64, u64)> = r.get("gap").map(range).into_iter().collect();
    let mut got: Vec<(u64, String)> = Vec::new();
    let reached = |got: &Vec<(u64, String)>, gaps: &Vec<(u64, u64)>| {
        got.last().is_some_and(|(seq, _)| *seq >= last) || gaps.last().is_some_and(|(_, to)| *to >= last)
    };
    while !reached(&got, &gaps) {
        let m = next_json(&mut ws);
        if m["type"] == "gap" {
            gaps.push(range(&m));
            continue;
        }
        got.push((m["seq"].as_u64().unwrap(), m["data"].as_str().unwrap().to_string()));
    }
    (got, gaps)
}

/// Reads of `topic` from its first message: every page, every key, and a
/// subscriber catching up, all equal to `expect`.
fn check_tiered(node: &Node, topic: &str, expect: &BTreeMap<u64, String>) {
    let info = node.get_json(&format!("/v1/topics/{topic}"));
    let d = &info["durable"];
    assert!(d["archived_segments"].as_u64().unwrap() >= 2, "older segments only in the store: {info}");
    assert!(d["local_first_seq"].as_u64().unwrap() > *expect.keys().next().unwrap(), "{info}");
    assert_eq!(d["log_first_seq"].as_u64(), expect.keys().next().copied(), "{info}");
    assert_eq!(&read_log(node, topic), expect, "pages from the store, then the disk");
    let key_seqs: Vec<u64> = expect.keys().copied().filter(|s| s % 5 == 3).collect();
    let mut from = 0;
    let mut got = Vec::new();
    loop {
        let page = node.get_json(&format!("/v1/topics/{topic}/messages?key=k3&from_seq={from}&limit=7"));
        got.extend(page["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()));
        match page["next_seq"].as_u64() {
            Some(next) => from = next,
            None => break,
        }
    }
    assert_eq!(got, key_seqs, "a key's messages, from the store and the disk");
    let last = *expect.keys().last().unwrap();
    let (caught, gaps) = catch_up_all(node, topic, last);
    assert_eq!(gaps, []);
    assert_eq!(caught, expect.iter().map(|(s, d)| (*s, d.clone())).collect::<Vec<_>>(), "catch-up from the store");
}

/// A topic keeping about 64 messages (two 64 KiB segments) on disk, with
/// 300 messages of 2 KiB published: most segments end up only in the store.
fn tiered_topic(node: &Node) -> BTreeMap<u64, String> {
    let spec = br#"{"ack":"local","retention":{"max_messages":64}}"#;
    let (status, body) = node.request("PUT", "/v1/topics/events", "application/json", spec);
    assert!(status == 200 || status == 201, "{status} {body}");
    let expect = publish_keyed(node, "events", 300);
    wait_until("retention moves old segments to the store only", || {
        let d = node.get_json("/v1/topics/events")["durable"].clone();
        d["archived_segments"].as_u64().unwrap_or(0) >= 2
    });
    expect
}

/// Tiered reads, then the same after a kill -9 and after a restore.
fn tiered_reads(flags: &[String], env: &[(&str, &str)]) {
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let node = Node::start_with_env(&args, env);
    let expect = tiered_topic(&node);
    check_tiered(&node, "events", &expect);
    drop(node); // kill -9: the list of archived segments is on disk
    let node = Node::start_with_env(&args, env);
    check_tiered(&node, "events", &expect);
    let (status, body) = node.request("POST", "/v1/snapshots", "", b"");
    assert_eq!(status, 201, "{body}");
    drop(node);
    let data_dir = flags.iter().position(|f| f == "--data-dir").map(|i| flags[i + 1].clone()).unwrap();
    std::fs::remove_dir_all(&data_dir).unwrap();
    let mut restore = args.clone();
    restore.extend(["--restore", "latest"]);
    let node = Node::start_with_env(&restore, env);
    let on_disk = std::fs::read_dir(&data_dir).unwrap().count();
    assert!(on_disk > 0);
    check_tiered(&node, "events", &expect);
    eprintln!("tiered reads: {} messages read back from the store and the disk, three times", expect.len());
}

#[test]
fn tiered_reads_through_a_directory_store_and_a_missing_object_is_a_told_gap() {
    let data = fresh_dir("tiered-data");
    let objects = fresh_dir("tiered-objects");
    let flags = node_flags(&data, &["--object-store", objects.to_str().unwrap(), "--segment-bytes-max", "65536"]);
    tiered_reads(&flags, &[]);
    // An object removed from the store (a lifecycle rule, an operator):
    // its range is told as a gap, the rest still arrives.
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let node = Node::start(&args);
    let info = node.get_json("/v1/topics/events");
    let last = info["last_seq"].as_u64().unwrap();
    let dir = std::fs::read_dir(objects.join("topics")).unwrap().next().unwrap().unwrap().path();
    let mut objects_of_topic: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    objects_of_topic.sort();
    let second = &objects_of_topic[1];
    let name = second.file_stem().unwrap().to_str().unwrap().to_string();
    let (base, end) = name.split_once('-').unwrap();
    let (base, end): (u64, u64) = (base.parse().unwrap(), end.parse().unwrap());
    std::fs::remove_file(second).unwrap();
    let written =
        info["durable"]["log_messages"].as_u64().unwrap() + info["durable"]["local_first_seq"].as_u64().unwrap() - 1;
    let (caught, gaps) = catch_up_all(&node, "events", last);
    // The missing object's exact range, then the numbers the kill -9
    // before this start skipped.
    assert_eq!(gaps, [(base, end), (written + 1, last)], "{info}");
    let seqs: Vec<u64> = caught.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..base).chain(end + 1..=written).collect::<Vec<_>>());
    let (status, body) = node.get(&format!("/v1/topics/events/messages?from_seq={base}"));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("store_unavailable"), "{body}");
    drop(node);
    let _ = std::fs::remove_dir_all(&data);
    let _ = std::fs::remove_dir_all(&objects);
}

#[test]
fn stored_acks_snapshot_and_restore_against_an_s3_compatible_server() {
    let moto = Moto::with_bucket();
    let env = MOTO_ENV;
    let data = fresh_dir("s3-data");
    let endpoint = moto.endpoint();
    let store = ["--object-store", "s3://rayflux/node-a", "--s3-endpoint", &endpoint, "--s3-path-style"];
    let flags = node_flags(&data, &store);
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let node = Node::start_with_env(&args, &env);
    let (mut expect, micros) = publish(&node, "orders", "stored", 200, "stored");
    eprintln!("ack=stored (moto_server, upload interval 20 ms): p99 {} us over 200 publishes", p99(micros));
    let (status, body) = node.request("POST", "/v1/snapshots", "", b"");
    assert_eq!(status, 201, "{body}");
    let first: serde_json::Value = serde_json::from_str(&body).unwrap();
    let first_manifest = node.get(&format!("/v1/snapshots/{}", first["id"].as_str().unwrap())).1;

    // The store stops mid-traffic: `local` still answers, `stored` waits.
    moto.signal("-STOP");
    let (tx, rx) = mpsc::channel();
    let addr = node.addr();
    let waiting = std::thread::spawn(move || {
        let mut ws = ws_connect(&addr, "/v1/ws").unwrap();
        let r = native_call(
            &mut ws,
            serde_json::json!({"op":"publish","id":1,"topic":"orders","data":"while-stopped","ack":"stored"}),
        );
        tx.send(r).unwrap();
    });
    let (local, _) = publish(&node, "orders", "local-while-stopped", 20, "local");
    expect.extend(local);
    assert!(rx.try_recv().is_err(), "a stored ack came back while the store was stopped");
    moto.signal("-CONT");
    let r = rx.recv_timeout(WAIT).expect("the stored publish is answered once the store is back");
    waiting.join().unwrap();
    assert_eq!(r["ok"], true, "{r}");
    expect.insert(r["seq"].as_u64().unwrap(), "while-stopped".to_string());
    // The previous snapshot is intact.
    let again = node.get(&format!("/v1/snapshots/{}", first["id"].as_str().unwrap())).1;
    assert_eq!(again, first_manifest);
    let node = snapshot_and_restore(node, &flags, &env, &expect);
    drop(node);
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn tiered_reads_against_an_s3_compatible_server() {
    let moto = Moto::with_bucket();
    let env = MOTO_ENV;
    let data = fresh_dir("tiered-s3-data");
    let endpoint = moto.endpoint();
    let store = [
        "--object-store",
        "s3://rayflux/tiered",
        "--s3-endpoint",
        &endpoint,
        "--s3-path-style",
        "--segment-bytes-max",
        "65536",
    ];
    tiered_reads(&node_flags(&data, &store), &env);
    let _ = std::fs::remove_dir_all(&data);
}
