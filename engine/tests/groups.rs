//! Consumer groups against a real node: members on both shards share a
//! topic by key, one dies holding messages and they go to the others;
//! deadlines, refusals and the dead-letter topic; and a Python
//! `websockets` worker pool that grows from 4 to 8 members and shrinks to 2
//! under load without losing a command.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::*;
use tungstenite::Message;

/// What a member thread saw: (member, seq, key, delivery), in its order.
type Seen = (usize, u64, String, u64);

/// A member that acknowledges everything it gets, reporting each delivery;
/// with `die_after`, it stops after that many deliveries without
/// acknowledging the last ones it holds and drops its connection.
fn member(
    mut ws: Ws,
    who: usize,
    topic: String,
    die_after: Option<usize>,
    tx: mpsc::Sender<Seen>,
    stop: Arc<AtomicBool>,
) {
    let mut got = 0;
    ws.get_ref().set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    while !stop.load(Ordering::Relaxed) {
        let m = match ws.read() {
            Ok(Message::Text(t)) => serde_json::from_str::<serde_json::Value>(&t).unwrap(),
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                continue
            }
            Err(e) => panic!("member {who}: {e}"),
        };
        assert_eq!(m["group"], "workers", "{m}");
        let seq = m["seq"].as_u64().unwrap();
        got += 1;
        if die_after.is_some_and(|n| got > n) {
            return; // dies holding this one (and whatever else it was sent)
        }
        tx.send((who, seq, m["key"].as_str().unwrap().to_string(), m["delivery"].as_u64().unwrap())).unwrap();
        let ack = serde_json::json!({"op":"ack","topic":topic,"group":"workers","seq":seq});
        ws.send(Message::text(ack.to_string())).unwrap();
    }
}

fn join(ws: &mut Ws, topic: &str, extra: serde_json::Value) {
    let mut request = serde_json::json!({"op":"subscribe","id":1,"topic":topic,"group":"workers"});
    if let (Some(r), serde_json::Value::Object(more)) = (request.as_object_mut(), extra) {
        r.extend(more);
    }
    let r = native_call(ws, request);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["group"], "workers");
}

#[test]
fn a_group_shares_a_topic_by_key_and_a_dead_members_messages_go_to_the_others() {
    let node = Node::start(&["--shards", "2", "--topic-sockets", "accepting"]); // members stay on the shard named
    let topic = topic_on_shard("jobs", 2, 0);
    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    // Members on both shards (the owner's and the other): two live ones,
    // and one that dies after 30 deliveries.
    for (who, shard, die_after) in [(0, 0, None), (1, 1, None), (2, 1, Some(30))] {
        let mut ws = ws_on_shard(&node.addr(), "/v1/ws", shard);
        join(&mut ws, &topic, serde_json::json!({"prefetch": 4}));
        let (tx, stop, topic) = (tx.clone(), stop.clone(), topic.clone());
        threads.push(std::thread::spawn(move || member(ws, who, topic, die_after, tx, stop)));
    }
    // A plain subscriber still gets every message.
    let mut plain = node.ws("/v1/ws");
    assert_eq!(native_call(&mut plain, serde_json::json!({"op":"subscribe","id":1,"topic":topic}))["ok"], true);
    let mut publisher = node.ws("/v1/ws");
    let total = 300u64;
    for i in 1..=total {
        let request = serde_json::json!({"op":"publish","id":i,"topic":topic,"data":format!("job {i}"),"key":format!("k{}", i % 10)});
        assert_eq!(native_call(&mut publisher, request)["ok"], true);
    }
    // Every message processed (acknowledged) at least once.
    let mut processed: BTreeMap<u64, Vec<Seen>> = BTreeMap::new();
    let mut order: Vec<Seen> = Vec::new();
    while processed.len() < total as usize {
        let seen = rx.recv_timeout(WAIT).unwrap_or_else(|_| panic!("only {} of {total} processed", processed.len()));
        processed.entry(seen.1).or_default().push(seen.clone());
        order.push(seen);
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let by_member: Vec<usize> = (0..3).map(|w| order.iter().filter(|s| s.0 == w).count()).collect();
    assert!(by_member.iter().all(|&n| n > 0), "every member took a share: {by_member:?}");
    // Each key in sequence order, one member at a time.
    for k in 0..10 {
        let seqs: Vec<u64> = order.iter().filter(|s| s.2 == format!("k{k}")).map(|s| s.1).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "key k{k} out of order: {seqs:?}");
    }
    // Delivered twice only what the dead member held unacknowledged.
    let again: Vec<&Seen> = order.iter().filter(|s| s.3 > 1).collect();
    assert!(!again.is_empty() && again.len() <= 4 + 4, "redelivered: {again:?}");
    assert!(again.iter().all(|s| s.0 != 2 && processed[&s.1].len() == 1), "{again:?}");
    let plain_seqs: Vec<u64> = (0..total).map(|_| next_json(&mut plain)["seq"].as_u64().unwrap()).collect();
    assert_eq!(plain_seqs, (1..=total).collect::<Vec<_>>());
    eprintln!("{total} jobs: per member {by_member:?}, {} redelivered after a member died", again.len());
}

#[test]
fn deadlines_and_refusals_redeliver_and_the_last_delivery_goes_to_the_dead_letter_topic() {
    let node = Node::start(&["--shards", "2", "--topic-sockets", "accepting"]); // members stay on the shard named
    let topic = topic_on_shard("tasks", 2, 1);
    let mut dead = node.ws("/v1/ws");
    let r = native_call(&mut dead, serde_json::json!({"op":"subscribe","id":1,"topic":"tasks-dead"}));
    assert_eq!(r["ok"], true);
    let mut ws = ws_on_shard(&node.addr(), "/v1/ws", 0);
    let settings = serde_json::json!({"prefetch":1,"ack_timeout_ms":200,"max_deliveries":2,"dead_letter":"tasks-dead"});
    join(&mut ws, &topic, settings);
    let mut publisher = node.ws("/v1/ws");
    for (i, data) in ["never acked", "refused once"].iter().enumerate() {
        let r = native_call(
            &mut publisher,
            serde_json::json!({"op":"publish","id":i,"topic":topic,"data":data,"key":"same"}),
        );
        assert_eq!(r["ok"], true);
    }
    // Prefetch 1: the second waits while the first is held.
    let first = next_json(&mut ws);
    assert_eq!((first["data"].as_str(), first["delivery"].as_u64()), (Some("never acked"), Some(1)), "{first}");
    let again = next_json(&mut ws);
    assert_eq!(
        (again["seq"].clone(), again["delivery"].as_u64()),
        (first["seq"].clone(), Some(2)),
        "after its deadline"
    );
    // Its second deadline: to the dead-letter topic, and the next comes.
    let letter = next_json(&mut dead);
    assert_eq!((letter["data"].as_str(), letter["key"].as_str()), (Some("never acked"), Some("same")), "{letter}");
    let second = next_json(&mut ws);
    assert_eq!((second["data"].as_str(), second["delivery"].as_u64()), (Some("refused once"), Some(1)));
    let nack =
        serde_json::json!({"op":"nack","id":7,"topic":topic,"group":"workers","seq":second["seq"],"delay_ms":50});
    assert_eq!(native_call(&mut ws, nack)["ok"], true);
    let redelivered = next_json(&mut ws);
    assert_eq!((redelivered["seq"].clone(), redelivered["delivery"].as_u64()), (second["seq"].clone(), Some(2)));
    let ack = serde_json::json!({"op":"ack","id":8,"topic":topic,"group":"workers","seq":second["seq"]});
    assert_eq!(native_call(&mut ws, ack)["ok"], true);
    assert_eq!(node.metric("fluxnode_dead_letters_total"), 1);
    // Errors: an ack outside the group, a bad group name, a second join.
    let r = native_call(&mut ws, serde_json::json!({"op":"ack","id":9,"topic":topic,"group":"other","seq":1}));
    assert_eq!(r["error"]["code"], "not_subscribed", "{r}");
    let r = native_call(&mut ws, serde_json::json!({"op":"subscribe","id":10,"topic":topic,"group":"a b"}));
    assert_eq!(r["error"]["code"], "bad_request", "{r}");
    let r = native_call(&mut ws, serde_json::json!({"op":"subscribe","id":11,"topic":topic,"group":"workers"}));
    assert_eq!(r["error"]["code"], "already_subscribed", "{r}");
    let r = native_call(&mut ws, serde_json::json!({"op":"unsubscribe","id":12,"topic":topic,"group":"workers"}));
    assert_eq!(r["ok"], true, "{r}");
}

#[test]
fn a_python_worker_pool_scales_from_4_to_8_to_2_under_load_and_loses_no_command() {
    let python = std::env::var("FLUXNODE_TEST_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let node = Node::start(&["--shards", "2"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/worker_pool.py");
    let output = Command::new(&python).arg(script).arg(node.addr()).arg("3000").output().expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the worker pool lost commands or failed");
    let summary: BTreeSet<&str> = stdout.lines().filter(|l| l.starts_with("lost ")).collect();
    assert_eq!(summary.into_iter().collect::<Vec<_>>(), ["lost 0"]);
}

#[test]
fn requests_reach_one_responder_and_only_the_requester_hears_the_reply() {
    let node = Node::start(&["--shards", "2", "--topic-sockets", "accepting"]); // members stay on the shard named
    let topic = topic_on_shard("billing", 2, 1);
    let mut requester = ws_on_shard(&node.addr(), "/v1/ws", 0);
    // Nobody answers yet.
    let r = native_call(&mut requester, serde_json::json!({"op":"request","id":1,"topic":topic,"data":"charge 10"}));
    assert_eq!(r["error"]["code"], "no_responders", "{r}");
    let mut responder = ws_on_shard(&node.addr(), "/v1/ws", 1);
    join(&mut responder, &topic, serde_json::json!({}));
    let mut plain = node.ws("/v1/ws");
    assert_eq!(native_call(&mut plain, serde_json::json!({"op":"subscribe","id":1,"topic":topic}))["ok"], true);

    // A result, across shards; the reply also acknowledges the request.
    let ask =
        serde_json::json!({"op":"request","id":2,"topic":topic,"data":"charge 10","key":"acct-7","timeout_ms":10000});
    requester.send(Message::text(ask.to_string())).unwrap();
    let m = next_json(&mut responder);
    assert_eq!((m["data"].as_str(), m["key"].as_str()), (Some("charge 10"), Some("acct-7")), "{m}");
    let to = m["reply_to"].as_str().expect("reply_to").to_string();
    let reply = serde_json::json!({"op":"reply","id":3,"to":to,"data":"charged","topic":topic,"group":"workers","seq":m["seq"]});
    assert_eq!(native_call(&mut responder, reply)["ok"], true);
    let r = next_json(&mut requester);
    assert_eq!(
        (r["id"].as_u64(), r["ok"].as_bool(), r["data"].as_str()),
        (Some(2), Some(true), Some("charged")),
        "{r}"
    );
    // The plain subscriber saw the request, never the reply.
    assert_eq!(next_json(&mut plain)["data"], "charge 10");

    // A responder's error.
    let ask = serde_json::json!({"op":"request","id":4,"topic":topic,"data":"charge -1"});
    requester.send(Message::text(ask.to_string())).unwrap();
    let m = next_json(&mut responder);
    let error = serde_json::json!({"code":"invalid_amount","message":"amount must be positive"});
    let reply = serde_json::json!({"op":"reply","id":5,"to":m["reply_to"],"error":error,"topic":topic,"group":"workers","seq":m["seq"]});
    assert_eq!(native_call(&mut responder, reply)["ok"], true);
    let r = next_json(&mut requester);
    assert_eq!(r["error"]["code"], "responder_error", "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("invalid_amount"), "{r}");

    // A timeout; the late reply is told nobody waits.
    let ask = serde_json::json!({"op":"request","id":6,"topic":topic,"data":"slow","timeout_ms":100});
    requester.send(Message::text(ask.to_string())).unwrap();
    let m = next_json(&mut responder);
    let r = next_json(&mut requester);
    assert_eq!((r["id"].as_u64(), r["error"]["code"].as_str()), (Some(6), Some("timeout")), "{r}");
    let reply = serde_json::json!({"op":"reply","id":7,"to":m["reply_to"],"data":"too late","topic":topic,"group":"workers","seq":m["seq"]});
    assert_eq!(native_call(&mut responder, reply)["error"]["code"], "requester_gone");

    // The requester leaves before the reply.
    let mut leaving = ws_on_shard(&node.addr(), "/v1/ws", 1);
    let ask = serde_json::json!({"op":"request","id":8,"topic":topic,"data":"then gone","timeout_ms":10000});
    leaving.send(Message::text(ask.to_string())).unwrap();
    let m = next_json(&mut responder);
    let open = node.metric("fluxnode_connections");
    leaving.close(None).unwrap();
    drop(leaving);
    wait_until("the node saw the requester leave", || node.metric("fluxnode_connections") < open);
    let reply = serde_json::json!({"op":"reply","id":9,"to":m["reply_to"],"data":"x"});
    assert_eq!(native_call(&mut responder, reply)["error"]["code"], "requester_gone");
    // Bad replies.
    let r = native_call(&mut responder, serde_json::json!({"op":"reply","id":10,"to":"nowhere","data":"x"}));
    assert_eq!(r["error"]["code"], "bad_request", "{r}");
    let r = native_call(&mut responder, serde_json::json!({"op":"reply","id":11,"to":"9.1.0","data":"x"}));
    assert_eq!(r["error"]["code"], "bad_request", "{r}");
    // A guessed return address (the right shard and id, not the nonce)
    // answers nothing, and the real reply still goes through.
    let ask = serde_json::json!({"op":"request","id":12,"topic":topic,"data":"mine","timeout_ms":10000});
    requester.send(Message::text(ask.to_string())).unwrap();
    let m = next_json(&mut responder);
    let to = m["reply_to"].as_str().unwrap().to_string();
    let (shard_req, _) = to.rsplit_once('.').unwrap();
    let forged = serde_json::json!({"op":"reply","id":13,"to":format!("{shard_req}.0000000000000001"),"data":"forged"});
    assert_eq!(native_call(&mut responder, forged)["error"]["code"], "requester_gone");
    let reply = serde_json::json!({"op":"reply","id":14,"to":to,"data":"real"});
    assert_eq!(native_call(&mut responder, reply)["ok"], true);
    let r = next_json(&mut requester);
    assert_eq!((r["id"].as_u64(), r["data"].as_str()), (Some(12), Some("real")), "{r}");
}

#[test]
fn scheduled_messages_come_when_due_replaced_by_id_cancelled_and_listed() {
    let node = Node::start(&["--shards", "2", "--topic-sockets", "accepting"]); // members stay on the shard named
    let topic = topic_on_shard("reminders", 2, 1);
    let mut plain = node.ws("/v1/ws");
    assert_eq!(native_call(&mut plain, serde_json::json!({"op":"subscribe","id":1,"topic":topic}))["ok"], true);
    let mut member = ws_on_shard(&node.addr(), "/v1/ws", 0);
    join(&mut member, &topic, serde_json::json!({}));
    let mut ws = ws_on_shard(&node.addr(), "/v1/ws", 0);
    let schedule = |id: u64, data: &str, extra: serde_json::Value| {
        let mut r = serde_json::json!({"op":"publish","id":id,"topic":topic,"data":data});
        if let (Some(r), serde_json::Value::Object(more)) = (r.as_object_mut(), extra) {
            r.extend(more);
        }
        r
    };
    let r = native_call(&mut ws, schedule(1, "first", serde_json::json!({"delay_ms":200,"schedule_id":"remind-1"})));
    assert_eq!((r["ok"].as_bool(), r["replaced"].as_bool()), (Some(true), Some(false)), "{r}");
    // Same id: replaced (a debounce); with if_absent: kept as it is.
    let r = native_call(&mut ws, schedule(2, "second", serde_json::json!({"delay_ms":300,"schedule_id":"remind-1"})));
    assert_eq!(r["replaced"], true, "{r}");
    let due = r["deliver_at"].as_u64().unwrap();
    let r = native_call(
        &mut ws,
        schedule(3, "third", serde_json::json!({"delay_ms":10,"schedule_id":"remind-1","if_absent":true})),
    );
    assert_eq!((r["present"].as_bool(), r["deliver_at"].as_u64()), (Some(true), Some(due)), "{r}");
    // Another, cancelled; one with an id the node makes.
    let r = native_call(&mut ws, schedule(4, "never", serde_json::json!({"delay_ms":100,"schedule_id":"b"})));
    assert_eq!(r["ok"], true);
    let r = native_call(&mut ws, schedule(5, "made id", serde_json::json!({"delay_ms":150})));
    assert!(r["schedule_id"].as_str().unwrap().starts_with('s'), "{r}");
    let list = native_call(&mut ws, serde_json::json!({"op":"schedules","id":6,"topic":topic}));
    assert_eq!(list["pending"], 3, "{list}");
    let ids: Vec<&str> =
        list["schedules"].as_array().unwrap().iter().map(|s| s["schedule_id"].as_str().unwrap()).collect();
    assert_eq!(ids[0], "b", "earliest first: {list}");
    let r = native_call(&mut ws, serde_json::json!({"op":"cancel","id":7,"topic":topic,"schedule_id":"b"}));
    assert_eq!(r["ok"], true, "{r}");
    let r = native_call(&mut ws, serde_json::json!({"op":"cancel","id":8,"topic":topic,"schedule_id":"b"}));
    assert_eq!(r["error"]["code"], "not_found", "{r}");
    let r = native_call(&mut ws, schedule(9, "x", serde_json::json!({"delay_ms":10,"ack":"local"})));
    assert_eq!(r["error"]["code"], "bad_request", "{r}");
    // Due: to plain subscribers and to one group member, not before time.
    let made = next_json(&mut plain);
    assert_eq!(made["data"], "made id");
    let m = next_json(&mut plain);
    assert_eq!(m["data"], "second", "the replacement, once: {m}");
    let late = m["ts"].as_u64().unwrap() as i64 - due as i64;
    assert!(late >= 0, "delivered {late} ms early");
    let got: Vec<String> = (0..2).map(|_| next_json(&mut member)["data"].as_str().unwrap().to_string()).collect();
    assert_eq!(got, ["made id", "second"]);
    let list = native_call(&mut ws, serde_json::json!({"op":"schedules","id":10,"topic":topic}));
    assert_eq!(list["pending"], 0, "{list}");
    eprintln!("scheduled message delivered {late} ms after its time");
}

#[test]
fn kinds_ids_and_headers_travel_with_the_message_and_stay_in_the_log() {
    let dir = fresh_dir("meta");
    let node = Node::start(&["--shards", "2", "--durable", "orders", "--data-dir", dir.to_str().unwrap()]);
    let mut plain = node.ws("/v1/ws");
    assert_eq!(native_call(&mut plain, serde_json::json!({"op":"subscribe","id":1,"topic":"orders"}))["ok"], true);
    let mut member = node.ws("/v1/ws");
    join(&mut member, "orders", serde_json::json!({}));
    let mut ws = node.ws("/v1/ws");
    let publish = serde_json::json!({"op":"publish","id":1,"topic":"orders","data":"place","key":"order-7",
        "kind":"command","message_id":"m-1","headers":{"tenant":"acme","trace":"t-9"}});
    assert_eq!(native_call(&mut ws, publish)["ok"], true);
    for m in [next_json(&mut plain), next_json(&mut member)] {
        assert_eq!((m["kind"].as_str(), m["message_id"].as_str()), (Some("command"), Some("m-1")), "{m}");
        assert_eq!(m["headers"], serde_json::json!({"tenant":"acme","trace":"t-9"}), "{m}");
    }
    let page = node.get_json("/v1/topics/orders/messages?from_seq=0");
    let m = &page["messages"][0];
    assert_eq!(
        (m["kind"].as_str(), m["message_id"].as_str(), m["headers"]["tenant"].as_str()),
        (Some("command"), Some("m-1"), Some("acme")),
        "{page}"
    );
    for bad in [
        serde_json::json!({"op":"publish","id":2,"topic":"orders","data":"x","kind":"gossip"}),
        serde_json::json!({"op":"publish","id":3,"topic":"orders","data":"x","headers":{"rayflux-kind":"event"}}),
        serde_json::json!({"op":"publish","id":4,"topic":"orders","data":"x","headers":{"n":1}}),
    ] {
        assert_eq!(native_call(&mut ws, bad)["error"]["code"], "bad_request");
    }
    // Kept across a restart: the log holds them.
    drop((plain, member, ws));
    drop(node);
    let node = Node::start(&["--shards", "2", "--durable", "orders", "--data-dir", dir.to_str().unwrap()]);
    let page = node.get_json("/v1/topics/orders/messages?from_seq=0");
    assert_eq!(page["messages"][0]["headers"]["trace"], "t-9", "{page}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A delivery a worker processed: (seq, key, delivery).
type Done = (u64, String, u64);

/// Processes `n` group deliveries on `ws`: acknowledges each (with an id)
/// and returns once every ack was answered. Deliveries arriving after the
/// `n`th are left unacknowledged (the worker stopped there). Returns them
/// in arrival order.
fn process(ws: &mut Ws, topic: &str, group: &str, n: usize) -> Vec<Done> {
    process_until(ws, topic, group, |got| got.len() >= n)
}

/// As [`process`], until `enough` says so of what was processed.
fn process_until(ws: &mut Ws, topic: &str, group: &str, enough: impl Fn(&[Done]) -> bool) -> Vec<Done> {
    let mut got = Vec::new();
    let mut answered = 0;
    let mut stopped = false;
    while !stopped || answered < got.len() {
        let m = next_json(ws);
        if m["type"] == "reply" {
            assert_eq!(m["ok"], true, "{m}");
            answered += 1;
            continue;
        }
        if stopped {
            continue;
        }
        assert_eq!(m["group"], group, "{m}");
        let seq = m["seq"].as_u64().unwrap();
        got.push((seq, m["key"].as_str().unwrap().to_string(), m["delivery"].as_u64().unwrap()));
        let ack = serde_json::json!({"op":"ack","id":seq,"topic":topic,"group":group,"seq":seq});
        ws.send(Message::text(ack.to_string())).unwrap();
        stopped = enough(&got);
    }
    got
}

fn join_named(ws: &mut Ws, topic: &str, group: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut request = serde_json::json!({"op":"subscribe","id":1,"topic":topic,"group":group});
    if let (Some(r), serde_json::Value::Object(more)) = (request.as_object_mut(), extra) {
        r.extend(more);
    }
    native_call(ws, request)
}

/// A fresh data directory, a durable topic named from `prefix` owned by
/// shard `shard` of 2, and the node flags that declare it there.
fn durable_node(dir: &str, prefix: &str, shard: u64) -> (std::path::PathBuf, String, Vec<String>) {
    let dir = fresh_dir(dir);
    let topic = topic_on_shard(prefix, 2, shard);
    let data_dir = dir.to_str().unwrap().to_string();
    let flags = ["--shards", "2", "--durable", &topic, "--data-dir", &data_dir].map(str::to_string).to_vec();
    (dir, topic, flags)
}

/// Publishes orders `from..=to` keyed `k0`..`k6` at ack `local`; their
/// sequences.
fn publish_keyed(node: &Node, topic: &str, from: u64, to: u64) -> Vec<u64> {
    let mut publisher = node.ws("/v1/ws");
    let mut seqs = Vec::new();
    for i in from..=to {
        let request = serde_json::json!({"op":"publish","id":i,"topic":topic,"data":format!("order {i}"),
            "key":format!("k{}", i % 7),"ack":"local"});
        let r = native_call(&mut publisher, request);
        assert_eq!(r["ok"], true, "{r}");
        seqs.push(r["seq"].as_u64().unwrap());
    }
    seqs
}

#[test]
fn a_durable_group_keeps_its_position_across_a_clean_stop_and_a_kill_9_and_replays_from_the_beginning() {
    let (dir, topic, flags) = durable_node("durable-group", "orders", 0);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let node = Node::start(&flags);
    assert_eq!(publish_keyed(&node, &topic, 1, 200), (1..=200).collect::<Vec<_>>());
    // Created after the messages: "beginning" replays them from the log.
    // The member is on the owner shard, so its acks are applied in order
    // before the reply to the last one.
    let mut w = ws_on_shard(&node.addr(), "/v1/ws", 0);
    assert_eq!(
        join_named(&mut w, &topic, "billing", serde_json::json!({"prefetch": 50, "start": "beginning"}))["ok"],
        true
    );
    let first = process(&mut w, &topic, "billing", 120);
    for k in 0..7 {
        let seqs: Vec<u64> = first.iter().filter(|d| d.1 == format!("k{k}")).map(|d| d.0).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "key k{k} out of order: {seqs:?}");
    }
    // "beginning" needs a log; "now" on an ephemeral topic is the default.
    let refused = join_named(&mut node.ws("/v1/ws"), "not-durable", "g", serde_json::json!({"start": "beginning"}));
    assert_eq!(refused["error"]["code"], "not_durable", "{refused}");
    // A clean stop saves the positions: nothing acknowledged comes again.
    assert!(nix_term(&node), "the node stops on SIGTERM");
    drop(w);
    let node = Node::start(&flags);
    let mut w = ws_on_shard(&node.addr(), "/v1/ws", 0);
    assert_eq!(join_named(&mut w, &topic, "billing", serde_json::json!({"prefetch": 50}))["ok"], true);
    let done: std::collections::BTreeSet<u64> = first.iter().map(|d| d.0).collect();
    let second = process(&mut w, &topic, "billing", 40);
    let again: Vec<u64> = second.iter().map(|d| d.0).filter(|s| done.contains(s)).collect();
    assert!(again.is_empty(), "acknowledged before a clean stop, delivered again: {again:?}");
    // More orders, then kill -9: at least once, nothing lost.
    assert_eq!(publish_keyed(&node, &topic, 201, 250), (201..=250).collect::<Vec<_>>());
    drop(w);
    drop(node); // kill -9
    let node = Node::start(&flags);
    let mut w = ws_on_shard(&node.addr(), "/v1/ws", 0);
    assert_eq!(join_named(&mut w, &topic, "billing", serde_json::json!({"prefetch": 50}))["ok"], true);
    let mut processed: std::collections::BTreeSet<u64> = done.iter().copied().collect();
    processed.extend(second.iter().map(|d| d.0));
    let before = processed.clone();
    let after = process_until(&mut w, &topic, "billing", |got| {
        got.iter().map(|d| d.0).chain(before.iter().copied()).collect::<std::collections::BTreeSet<_>>().len() == 250
    });
    processed.extend(after.iter().map(|d| d.0));
    let duplicates = after.iter().filter(|d| done.contains(&d.0) || second.iter().any(|s| s.0 == d.0)).count();
    assert_eq!(processed, (1..=250).collect(), "every order processed");
    // Another group from the beginning sees all 250, and one from now
    // only what comes after it joined.
    let mut audit = node.ws("/v1/ws");
    assert_eq!(
        join_named(&mut audit, &topic, "audit", serde_json::json!({"prefetch": 100, "start": "beginning"}))["ok"],
        true
    );
    let mut fresh = node.ws("/v1/ws");
    assert_eq!(join_named(&mut fresh, &topic, "fresh", serde_json::json!({"prefetch": 100}))["ok"], true);
    // (Numbered after the crash's skip.)
    let late = publish_keyed(&node, &topic, 251, 260);
    assert!(late[0] > 250, "{late:?}");
    let all: Vec<u64> = process(&mut audit, &topic, "audit", 260).iter().map(|d| d.0).collect();
    let want: std::collections::BTreeSet<u64> = (1..=250).chain(late.iter().copied()).collect();
    assert_eq!(all.iter().copied().collect::<std::collections::BTreeSet<_>>(), want);
    assert_eq!(all.len(), 260, "each once");
    let new: Vec<u64> = process(&mut fresh, &topic, "fresh", 10).iter().map(|d| d.0).collect();
    assert_eq!(new, late);
    eprintln!(
        "durable group: {} processed before a clean stop (0 again after it), {} more, kill -9, then {} deliveries \
         for the other {} ({duplicates} duplicates of messages acknowledged before the crash); audit replayed 260",
        first.len(),
        second.len(),
        after.len(),
        250 - first.len() - second.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_durable_topics_schedules_survive_a_kill_9_and_a_clean_stop() {
    // Owned by shard 1; asked from shard 0 (across the mesh).
    let (dir, topic, flags) = durable_node("durable-schedules", "reminders-d", 1);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let node = Node::start(&flags);
    let mut ws = ws_on_shard(&node.addr(), "/v1/ws", 0);
    let mut n = 0;
    let mut schedule = |ws: &mut Ws, data: &str, extra: serde_json::Value| {
        n += 1;
        let mut r = serde_json::json!({"op":"publish","id":n,"topic":topic,"data":data});
        if let (Some(r), serde_json::Value::Object(more)) = (r.as_object_mut(), extra) {
            r.extend(more);
        }
        let reply = native_call(ws, r);
        assert_eq!(reply["ok"], true, "{reply}");
        reply
    };
    let mut plain = node.ws("/v1/ws");
    assert_eq!(native_call(&mut plain, serde_json::json!({"op":"subscribe","id":1,"topic":topic}))["ok"], true);
    let soon = schedule(&mut ws, "fired before the crash", serde_json::json!({"delay_ms": 50, "schedule_id": "e"}));
    let a = schedule(
        &mut ws,
        "a",
        serde_json::json!({"delay_ms": 3_000, "schedule_id": "a", "kind": "command", "headers": {"tenant": "acme"}}),
    );
    schedule(&mut ws, "b", serde_json::json!({"delay_ms": 3_600_000, "schedule_id": "b"}));
    schedule(&mut ws, "c", serde_json::json!({"delay_ms": 3_600_000, "schedule_id": "c"}));
    schedule(&mut ws, "d first", serde_json::json!({"delay_ms": 3_600_000, "schedule_id": "d"}));
    let d = schedule(&mut ws, "d second", serde_json::json!({"delay_ms": 2_000, "schedule_id": "d"}));
    assert_eq!(d["replaced"], true, "{d}");
    let r = native_call(&mut ws, serde_json::json!({"op":"cancel","id":100,"topic":topic,"schedule_id":"c"}));
    assert_eq!(r["ok"], true, "{r}");
    let fired = next_json(&mut plain);
    assert_eq!(fired["data"], "fired before the crash", "{fired}");
    assert!(fired["ts"].as_u64() >= soon["deliver_at"].as_u64());
    // Every answer above came after its journal record was written.
    drop(ws);
    drop(plain);
    drop(node); // kill -9
    let node = Node::start(&flags);
    let mut ws = ws_on_shard(&node.addr(), "/v1/ws", 0);
    let list = native_call(&mut ws, serde_json::json!({"op":"schedules","id":1,"topic":topic}));
    let ids: Vec<&str> =
        list["schedules"].as_array().unwrap().iter().map(|s| s["schedule_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["d", "a", "b"], "cancelled, fired and replaced ones gone: {list}");
    // "a" and the replacement of "d" are published when due, with their metadata.
    let mut log = BTreeMap::new();
    wait_until("a and d published after the restart", || {
        log = read_log(&node, &topic);
        log.values().filter(|v| *v == "a" || *v == "d second").count() == 2
    });
    let page = node.get_json(&format!("/v1/topics/{topic}/messages?from_seq=0"));
    let a_logged = page["messages"].as_array().unwrap().iter().find(|m| m["data"] == "a").cloned().unwrap();
    assert_eq!((a_logged["kind"].as_str(), a_logged["headers"]["tenant"].as_str()), (Some("command"), Some("acme")));
    assert!(a_logged["ts"].as_u64() >= a["deliver_at"].as_u64(), "never early: {a_logged}");
    assert_eq!(log.values().filter(|v| v.starts_with("fired")).count(), 1, "fired once: {log:?}");
    // A clean stop keeps what is still pending.
    assert!(nix_term(&node));
    drop(ws);
    let node = Node::start(&flags);
    let mut ws = ws_on_shard(&node.addr(), "/v1/ws", 0);
    let list = native_call(&mut ws, serde_json::json!({"op":"schedules","id":1,"topic":topic}));
    assert_eq!(list["pending"], 1, "{list}");
    assert_eq!(list["schedules"][0]["schedule_id"], "b", "{list}");
    let late = a_logged["ts"].as_u64().unwrap() - a["deliver_at"].as_u64().unwrap();
    eprintln!("durable schedules: 6 kept, 1 fired, 1 cancelled, 1 replaced before kill -9; after it d, a, b pending; a published {late} ms after its time (the restart's)");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_group_without_members_is_deleted_with_its_saved_position() {
    // Owned by shard 1; the deleting connection is on shard 0.
    let (dir, topic, flags) = durable_node("delete-group", "ledger", 1);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let node = Node::start(&flags);
    publish_keyed(&node, &topic, 1, 20);
    let mut w = node.ws("/v1/ws");
    let joined = join_named(&mut w, &topic, "audit", serde_json::json!({"prefetch": 5, "start": "beginning"}));
    assert_eq!(joined["ok"], true, "{joined}");
    assert_eq!(process(&mut w, &topic, "audit", 20).len(), 20);
    let saves = || -> Vec<std::path::PathBuf> {
        let topics = std::fs::read_dir(dir.join("topics")).unwrap();
        let groups = topics.flatten().map(|t| t.path().join("groups")).filter(|g| g.exists());
        groups.flat_map(|g| std::fs::read_dir(g).unwrap().flatten().map(|e| e.path())).collect()
    };
    wait_until("the group's position saved", || saves().iter().any(|p| p.extension().is_some_and(|e| e == "json")));
    let mut admin = ws_on_shard(&node.addr(), "/v1/ws", 0);
    let delete = |ws: &mut Ws, id: u64| {
        native_call(ws, serde_json::json!({"op":"delete_group","id":id,"topic":topic,"group":"audit"}))
    };
    let busy = delete(&mut admin, 1);
    assert_eq!(busy["error"]["code"], "busy", "a member is in it: {busy}");
    let left = native_call(&mut w, serde_json::json!({"op":"unsubscribe","id":50,"topic":topic,"group":"audit"}));
    assert_eq!(left["ok"], true, "{left}");
    let deleted = delete(&mut admin, 2);
    assert_eq!(deleted["ok"], true, "{deleted}");
    assert_eq!(delete(&mut admin, 3)["error"]["code"], "not_found");
    wait_until("the saved position deleted", || saves().is_empty());
    // Made again, it starts afresh: from the beginning it replays all 20.
    let again = join_named(&mut w, &topic, "audit", serde_json::json!({"prefetch": 5, "start": "beginning"}));
    assert_eq!(again["ok"], true, "{again}");
    let replayed: Vec<u64> = process(&mut w, &topic, "audit", 20).iter().map(|d| d.0).collect();
    assert_eq!(replayed.iter().copied().collect::<std::collections::BTreeSet<_>>(), (1..=20).collect());
    let _ = std::fs::remove_dir_all(&dir);
}
