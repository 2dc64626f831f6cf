//! Membership from a real etcd (started on loopback): nodes register under
//! leases and follow the member set; topics move when it changes, handed
//! off from their previous owner (numbers continue, nothing lost or
//! repeated); a node killed with SIGKILL leaves after its lease and its
//! topics start afresh, announced; etcd restarted under traffic changes
//! nothing.

mod common;

use std::collections::BTreeMap;

use common::*;

/// A node of the etcd cluster `name`.
fn etcd_node(etcd: &Etcd, name: &str, port: u16) -> Node {
    let me = format!("127.0.0.1:{port}");
    Node::start_on(port, &["--shards", "2", "--etcd", &etcd.addr(), "--cluster-name", name, "--advertise", &me])
}

/// Waits until every node's view has exactly `members` (on every shard:
/// each request lands on any of them, and each applies a new set within
/// 50 ms of the others).
fn wait_members(nodes: &[&Node], members: &[String]) {
    let mut want = members.to_vec();
    want.sort();
    for node in nodes {
        let mut last = serde_json::Value::Null;
        let agreed = wait_for(|| {
            (0..8).all(|_| {
                last = node.get_json("/v1/cluster");
                last["members"] == serde_json::json!(want)
            })
        });
        assert!(agreed, "node {} sees {last}, not {want:?}", node.addr());
    }
}

/// Publishes `data` to `topic` on a native connection, one at a time,
/// until it is accepted; returns its seq and how many tries failed.
fn publish_until_ok(ws: &mut Ws, id: &mut u64, topic: &str, data: &str) -> (u64, u32) {
    let mut failed = 0;
    loop {
        *id += 1;
        let reply = native_call(ws, serde_json::json!({ "id": *id, "op": "publish", "topic": topic, "data": data }));
        if reply["ok"] == true {
            return (reply["seq"].as_u64().unwrap(), failed);
        }
        let code = reply["error"]["code"].as_str().unwrap_or("").to_string();
        assert!(
            ["owner_unreachable", "not_member", "owned_elsewhere"].contains(&code.as_str()),
            "unexpected refusal {reply}"
        );
        failed += 1;
        std::thread::park_timeout(std::time::Duration::from_millis(20));
    }
}

/// Each topic's owner as `node` sees it.
fn owners(node: &Node, topics: &[String]) -> Vec<String> {
    topics
        .iter()
        .map(|t| node.get_json(&format!("/v1/cluster?topic={t}"))["owner"].as_str().unwrap().to_string())
        .collect()
}

/// What one subscriber saw of one topic.
#[derive(Default, Debug)]
struct Seen {
    /// (seq, data) in arrival order.
    messages: Vec<(u64, String)>,
    /// `lost` notices.
    lost: u32,
}

/// Reads until the subscriber has as many messages of each topic as were
/// accepted (they cross nodes: a reply from the subscriber's node does not
/// mean they arrived), or a read times out.
fn drain(ws: &mut Ws, seen: &mut BTreeMap<String, Seen>, published: &BTreeMap<String, Vec<(u64, String)>>) {
    let behind = |seen: &BTreeMap<String, Seen>| {
        published.iter().any(|(t, sent)| seen.get(t).map_or(0, |s| s.messages.len()) < sent.len())
    };
    while behind(seen) {
        let v = next_json(ws);
        match v["type"].as_str() {
            Some("message") => {
                let topic = v["topic"].as_str().unwrap().to_string();
                let entry = seen.entry(topic).or_default();
                entry.messages.push((v["seq"].as_u64().unwrap(), v["data"].as_str().unwrap().to_string()));
            }
            Some("lost") => seen.entry(v["topic"].as_str().unwrap().to_string()).or_default().lost += 1,
            _ => panic!("unexpected {v}"),
        }
    }
}

#[test]
fn topics_move_when_nodes_join_and_leave_without_loss_or_repeats() {
    let mut etcd = Etcd::start("moves");
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut nodes: Vec<Option<Node>> = ports[..3].iter().map(|&p| Some(etcd_node(&etcd, "moves", p))).collect();
    wait_members(&nodes.iter().flatten().collect::<Vec<_>>(), &addrs[..3]);
    let view = nodes[0].as_ref().unwrap().get_json("/v1/cluster");
    assert_eq!(view["membership"], "etcd", "{view}");
    const TOPICS: usize = 16;
    let topics: Vec<String> = (0..TOPICS).map(|t| format!("moving.{t}")).collect();
    // Subscribers on node 1 (all topics), publisher on node 0.
    let mut sub = nodes[1].as_ref().unwrap().ws("/v1/ws");
    for (i, t) in topics.iter().enumerate() {
        let reply = native_call(&mut sub, serde_json::json!({ "id": i, "op": "subscribe", "topic": t }));
        assert_eq!(reply["ok"], true, "{reply}");
    }
    let mut publisher = nodes[0].as_ref().unwrap().ws("/v1/ws");
    let mut pub_id = 1000u64;
    let mut seen: BTreeMap<String, Seen> = BTreeMap::new();
    let mut published: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    let mut failures = 0;
    let mut round = 0;
    let mut publish_round = |publisher: &mut Ws, published: &mut BTreeMap<String, Vec<(u64, String)>>| {
        round += 1;
        let mut failed = 0;
        for t in &topics {
            let data = format!("{t}-{round}");
            let (seq, f) = publish_until_ok(publisher, &mut pub_id, t, &data);
            failed += f;
            published.entry(t.clone()).or_default().push((seq, data));
        }
        failed
    };
    for _ in 0..5 {
        failures += publish_round(&mut publisher, &mut published);
    }
    drain(&mut sub, &mut seen, &published);
    let owners_before = owners(nodes[0].as_ref().unwrap(), &topics);

    // A fourth node joins under traffic.
    nodes.push(Some(etcd_node(&etcd, "moves", ports[3])));
    for _ in 0..3 {
        failures += publish_round(&mut publisher, &mut published);
    }
    wait_members(&nodes.iter().flatten().collect::<Vec<_>>(), &addrs);
    for _ in 0..5 {
        failures += publish_round(&mut publisher, &mut published);
    }
    let owners_after = owners(nodes[0].as_ref().unwrap(), &topics);
    let moved_in = owners_before.iter().zip(&owners_after).filter(|(a, b)| a != b).count();
    assert!(owners_after.iter().all(|o| *o == addrs[3] || owners_before.contains(o)));

    // etcd restarts under traffic: nothing changes for the clients.
    etcd.restart();
    for _ in 0..5 {
        failures += publish_round(&mut publisher, &mut published);
    }

    // Node 2 leaves gracefully (SIGTERM: its lease is revoked at once).
    let leaving = nodes[2].take().unwrap();
    assert!(nix_term(&leaving));
    drop(leaving);
    let staying: Vec<String> = vec![addrs[0].clone(), addrs[1].clone(), addrs[3].clone()];
    for _ in 0..3 {
        failures += publish_round(&mut publisher, &mut published);
    }
    wait_members(&nodes.iter().flatten().collect::<Vec<_>>(), &staying);
    for _ in 0..5 {
        failures += publish_round(&mut publisher, &mut published);
    }
    drain(&mut sub, &mut seen, &published);

    // Every topic: the subscriber on node 1 got every accepted message, in
    // order, each once, numbered without a gap or a repeat.
    for t in &topics {
        let got = &seen.get(t).map(|s| s.messages.clone()).unwrap_or_default();
        let sent = &published[t];
        let seqs: Vec<u64> = got.iter().map(|m| m.0).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{t}: numbers not contiguous {seqs:?}");
        assert_eq!(got, sent, "{t}: what the subscriber got differs from what was accepted");
        assert_eq!(seen.get(t).map_or(0, |s| s.lost), 0, "{t}: a lost notice on a graceful change");
    }
    let rounds = published[&topics[0]].len();
    eprintln!(
        "{TOPICS} topics x {rounds} rounds through a join (moved {moved_in} topics to the new node), an etcd \
         restart and a graceful leave: every message once, in order, numbers contiguous; {failures} publishes \
         refused and retried during the changes"
    );
}

#[test]
fn a_killed_node_leaves_after_its_lease_and_its_topics_start_afresh_announced() {
    let etcd = Etcd::start("killed");
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut nodes: Vec<Node> = ports.iter().map(|&p| etcd_node(&etcd, "killed", p)).collect();
    wait_members(&nodes.iter().collect::<Vec<_>>(), &addrs);
    let topic = topic_owned_by(&nodes, &addrs, "victim", 2);
    let mut sub = nodes[1].ws("/v1/ws");
    let first = native_call(&mut sub, serde_json::json!({ "id": 1, "op": "subscribe", "topic": topic }));
    assert_eq!(first["ok"], true, "{first}");
    let mut publisher = nodes[0].ws("/v1/ws");
    let mut id = 10;
    for i in 0..5 {
        publish_until_ok(&mut publisher, &mut id, &topic, &format!("before-{i}"));
    }
    let killed_at = std::time::Instant::now();
    drop(nodes.remove(2)); // SIGKILL
                           // Publishes are refused until the lease expires, then the topic starts
                           // afresh on its new owner.
    let (seq, refused) = publish_until_ok(&mut publisher, &mut id, &topic, "after");
    let took = killed_at.elapsed();
    assert_eq!(seq, 1, "a new sequence space starts at 1");
    wait_members(&nodes.iter().collect::<Vec<_>>(), &addrs[..2]);
    // The subscriber gets what the dead owner had sent on before it died
    // (an ephemeral topic: messages acknowledged but not yet relayed die
    // with their owner), then the notice, then the new space's messages.
    let mut got = Vec::new();
    let mut lost = None;
    while got.last().map(String::as_str) != Some("after") {
        let v = next_json(&mut sub);
        match v["type"].as_str() {
            Some("message") => got.push(v["data"].as_str().unwrap().to_string()),
            Some("lost") => lost = Some(v),
            _ => panic!("unexpected {v}"),
        }
    }
    let lost = lost.expect("the subscriber was told the sequence space changed");
    assert_eq!(lost["reason"], "epoch_changed", "{lost}");
    assert_ne!(lost["epoch"], first["epoch"], "{lost}");
    let before = got.len() - 1;
    assert!(got[..before].iter().enumerate().all(|(i, m)| *m == format!("before-{i}")), "{got:?}");
    eprintln!(
        "owner killed: publishes refused {refused} times over {took:?} (lease TTL 5 s), then accepted as seq 1 \
         on the new owner; the subscriber had {before} of 5 earlier messages and was told {lost}"
    );
}

/// A node of the etcd cluster `name` with the durable topic `topic`, its
/// own data directory and the cluster's shared object store (`store`:
/// its flags and environment).
fn durable_node(etcd: &Etcd, name: &str, port: u16, topic: &str, store: &Store) -> Node {
    let me = format!("127.0.0.1:{port}");
    let data = data_dir(name, port);
    let etcd = etcd.addr();
    let mut flags = vec![
        "--shards",
        "2",
        "--etcd",
        &etcd,
        "--cluster-name",
        name,
        "--advertise",
        &me,
        "--durable",
        topic,
        "--upload-interval-ms",
        "20",
        "--data-dir",
        data.to_str().unwrap(),
    ];
    flags.extend(store.flags.iter().map(String::as_str));
    Node::start_on_with_env(port, &flags, &store.env)
}

/// The object store a cluster's nodes share.
struct Store {
    flags: Vec<String>,
    env: Vec<(&'static str, &'static str)>,
}

/// The data directory of node `port` of cluster `name` (see `durable_node`).
fn data_dir(name: &str, port: u16) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("fluxnode-test-{name}-{port}-{}", std::process::id()))
}

/// Publishes `n` messages `tag-i` to `topic` through `ws` at `ack`, each
/// retried until accepted; returns their (seq, data) and the refusals.
fn publish_n(ws: &mut Ws, id: &mut u64, topic: &str, tag: &str, n: usize, ack: &str) -> (Vec<(u64, String)>, u32) {
    let mut failed = 0;
    let mut accepted = Vec::new();
    for i in 0..n {
        let data = format!("{tag}-{i}");
        loop {
            *id += 1;
            let request = serde_json::json!({ "id": *id, "op": "publish", "topic": topic, "data": data, "ack": ack });
            let reply = native_call(ws, request);
            if reply["ok"] == true {
                accepted.push((reply["seq"].as_u64().unwrap(), data));
                break;
            }
            let code = reply["error"]["code"].as_str().unwrap_or("").to_string();
            assert!(["owner_unreachable", "not_member"].contains(&code.as_str()), "unexpected refusal {reply}");
            failed += 1;
            std::thread::park_timeout(std::time::Duration::from_millis(20));
        }
    }
    (accepted, failed)
}

/// Reads `topic`'s messages on `ws` until one with `data` arrives; returns
/// the messages' (seq, data) and the `lost` notices.
fn read_until(ws: &mut Ws, data: &str) -> (Vec<(u64, String)>, Vec<serde_json::Value>) {
    let (mut got, mut lost) = (Vec::new(), Vec::new());
    while got.last().is_none_or(|(_, d): &(u64, String)| d != data) {
        let v = next_json(ws);
        match v["type"].as_str() {
            Some("message") => got.push((v["seq"].as_u64().unwrap(), v["data"].as_str().unwrap().to_string())),
            Some("lost") => lost.push(v),
            _ => panic!("unexpected {v}"),
        }
    }
    (got, lost)
}

#[test]
fn a_durable_topic_moves_with_its_log_through_a_shared_directory_store() {
    let objects = fresh_dir("durable-moves-objects");
    let store = Store { flags: vec!["--object-store".into(), objects.to_str().unwrap().into()], env: vec![] };
    durable_topic_moves("durable-moves", &store);
    let _ = std::fs::remove_dir_all(&objects);
}

#[test]
fn a_durable_topic_moves_with_its_log_through_a_shared_s3_bucket() {
    let moto = Moto::with_bucket();
    let flags = ["--object-store", "s3://rayflux/cluster", "--s3-endpoint", &moto.endpoint(), "--s3-path-style"];
    let store = Store { flags: flags.iter().map(|f| f.to_string()).collect(), env: MOTO_ENV.to_vec() };
    durable_topic_moves("durable-moves-s3", &store);
}

/// A durable topic moves on a join (hand-off), back on a graceful leave
/// (hand-off to a node following it), and to a survivor when its owner is
/// killed (from the object store), its log whole each time.
fn durable_topic_moves(name: &str, store: &Store) {
    let etcd = Etcd::start(name);
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    // A topic that node 1 owns beside node 0, and node 2 beside node 0.
    let owner_in = |members: [&String; 2]| {
        let mut m: Vec<String> = members.iter().map(|s| s.to_string()).collect();
        m.sort();
        proto::maglev::Table::build(&m, proto::maglev::TABLE_SIZE_DEFAULT).unwrap()
    };
    let (with_1, with_2) = (owner_in([&addrs[0], &addrs[1]]), owner_in([&addrs[0], &addrs[2]]));
    let topic = (0..)
        .map(|i| format!("ledger.{i}"))
        .find(|t| {
            with_1.lookup(t.as_bytes()) == Some(addrs[1].as_str())
                && with_2.lookup(t.as_bytes()) == Some(addrs[2].as_str())
        })
        .unwrap();
    let local_dirs = |port: u16| -> usize {
        let dir = data_dir(name, port).join("topics");
        std::fs::read_dir(dir).map(|d| d.flatten().count()).unwrap_or(0)
    };
    let epoch_on =
        |node: &Node| node.get_json(&format!("/v1/topics/{topic}/messages?from_seq=1&limit=1"))["epoch"].clone();
    let mut nodes = vec![durable_node(&etcd, name, ports[0], &topic, store)];
    wait_members(&[&nodes[0]], &addrs[..1]);
    let mut publisher = nodes[0].ws("/v1/ws");
    let mut id = 0;
    let (mut accepted, _) = publish_n(&mut publisher, &mut id, &topic, "alone", 30, "local");
    let epoch = epoch_on(&nodes[0]);
    assert!(epoch.is_string(), "{epoch}");
    assert_eq!(local_dirs(ports[0]), 1, "node 0 keeps the log");

    // Node 1 joins: the topic's log moves to it (node 0 seals and uploads
    // its last segment first, then hands the list of segments over and
    // deletes its files); publishes on node 0 are forwarded.
    nodes.push(durable_node(&etcd, name, ports[1], &topic, store));
    wait_members(&[&nodes[0], &nodes[1]], &addrs[..2]);
    assert_eq!(owner_index(&nodes, &addrs, &topic), 1);
    let (more, refused_join) = publish_n(&mut publisher, &mut id, &topic, "joined", 30, "local");
    accepted.extend(more);
    assert_eq!(epoch_on(&nodes[1]), epoch, "the sequence space changed with the move");
    let want: BTreeMap<u64, String> = accepted.iter().cloned().collect();
    assert_eq!(want.keys().copied().collect::<Vec<_>>(), (1..=60).collect::<Vec<_>>(), "numbers go on");
    assert_eq!(read_log(&nodes[1], &topic), want, "the new owner's log differs from what was accepted");
    assert_eq!(local_dirs(ports[0]), 0, "node 0 still has the moved log's files");
    // Read through node 0: sent on to the owner, the same log.
    assert_eq!(read_log(&nodes[0], &topic), want, "a read through node 0 differs from the owner's log");

    // A subscriber on node 0; node 1 leaves gracefully: node 0 claims the
    // topic at once (it follows it) and gets the log back with what node 1
    // appended, in the same sequence space.
    let mut sub = nodes[0].ws("/v1/ws");
    let granted = native_call(&mut sub, serde_json::json!({ "id": 1, "op": "subscribe", "topic": topic }));
    assert_eq!(granted["ok"], true, "{granted}");
    let leaving = nodes.pop().unwrap();
    assert!(nix_term(&leaving));
    drop(leaving);
    wait_members(&[&nodes[0]], &addrs[..1]);
    let (more, refused_leave) = publish_n(&mut publisher, &mut id, &topic, "left", 20, "local");
    accepted.extend(more.iter().cloned());
    let (got, lost) = read_until(&mut sub, "left-19");
    assert_eq!((got, lost.len()), (more, 0), "the subscriber on node 0 through the graceful leave");
    assert_eq!(epoch_on(&nodes[0]), epoch, "the sequence space changed with the move back");
    let want: BTreeMap<u64, String> = accepted.iter().cloned().collect();
    assert_eq!(want.keys().copied().collect::<Vec<_>>(), (1..=80).collect::<Vec<_>>(), "numbers go on");
    assert_eq!(read_log(&nodes[0], &topic), want, "the log came back different");

    // Node 2 joins and takes the topic over; 20 messages at ack `stored`;
    // then it is killed. Node 0 takes the topic without a hand-off: it
    // goes on after the last message in the object store, in a new
    // sequence space (announced); nothing acknowledged at `stored` is lost.
    nodes.push(durable_node(&etcd, name, ports[2], &topic, store));
    wait_members(&[&nodes[0], &nodes[1]], &[addrs[0].clone(), addrs[2].clone()]);
    let (more, _) = publish_n(&mut publisher, &mut id, &topic, "stored", 20, "stored");
    accepted.extend(more);
    let (got, _) = read_until(&mut sub, "stored-19");
    assert_eq!(got.last().map(|m| m.0), Some(100), "{got:?}");
    let killed_at = std::time::Instant::now();
    drop(nodes.pop()); // SIGKILL
    let (more, refused_kill) = publish_n(&mut publisher, &mut id, &topic, "after", 10, "local");
    let took = killed_at.elapsed();
    accepted.extend(more.iter().cloned());
    assert_eq!(more.first().map(|m| m.0), Some(101), "numbers go on after the stored log: {more:?}");
    let (got, lost) = read_until(&mut sub, "after-9");
    assert_eq!(lost.len(), 1, "the subscriber is told of the new sequence space: {lost:?}");
    assert_ne!(lost[0]["epoch"], epoch, "{lost:?}");
    assert_eq!(got.iter().filter(|m| m.1.starts_with("after")).cloned().collect::<Vec<_>>(), more);
    let want: BTreeMap<u64, String> = accepted.iter().cloned().collect();
    assert_eq!(want.keys().copied().collect::<Vec<_>>(), (1..=110).collect::<Vec<_>>(), "numbers go on");
    assert_eq!(read_log(&nodes[0], &topic), want, "the log after the kill differs from what was accepted");
    eprintln!(
        "{name}: durable topic {topic}: 30 messages on node 0; moved to joining node 1 ({refused_join} publishes refused \
         meanwhile), 30 more; moved back on its graceful leave ({refused_leave} refused), 20 more, one epoch, the \
         subscriber on node 0 told nothing; moved to joining node 2, 20 at ack stored; node 2 killed: after \
         {took:?} ({refused_kill} refused) numbering went on at 101 in a new epoch (announced); 110 messages in \
         one log, read back whole"
    );
}

/// Two free ports, their addresses, and the ownership table of both
/// nodes as members (for topics that move to the second when it joins).
fn two_ports() -> (Vec<u16>, Vec<String>, proto::maglev::Table) {
    let ports: Vec<u16> = (0..2).map(|_| free_port()).collect();
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut sorted = addrs.clone();
    sorted.sort();
    let table = proto::maglev::Table::build(&sorted, proto::maglev::TABLE_SIZE_DEFAULT).unwrap();
    (ports, addrs, table)
}

#[test]
fn pending_schedules_move_with_their_topic() {
    let name = "schedules-move";
    let etcd = Etcd::start(name);
    let (ports, addrs, table) = two_ports();
    // Two topics node 1 will own: one followed on node 1 after the join
    // (claimed at once), one nobody touches (its due schedule, fired by
    // node 0, is what moves it).
    let mut moving = (0..).map(|i| format!("reminders.{i}")).filter(|t| table.lookup(t.as_bytes()) == Some(&addrs[1]));
    let (hot, cold) = (moving.next().unwrap(), moving.next().unwrap());
    let mut nodes = vec![etcd_node(&etcd, name, ports[0])];
    wait_members(&[&nodes[0]], &addrs[..1]);
    let mut ws = nodes[0].ws("/v1/ws");
    let mut id = 0;
    let mut call = |request: serde_json::Value| {
        id += 1;
        let mut request = request;
        request["id"] = id.into();
        native_call(&mut ws, request)
    };
    let publish = serde_json::json!({ "op": "publish", "topic": hot, "data": "due", "delay_ms": 3_000 });
    assert_eq!(call(publish)["ok"], true);
    let publish = serde_json::json!({
        "op": "publish", "topic": hot, "data": "never", "delay_ms": 600_000, "schedule_id": "cancel-me"
    });
    assert_eq!(call(publish)["ok"], true);
    let publish = serde_json::json!({ "op": "publish", "topic": cold, "data": "cold", "delay_ms": 3_000 });
    assert_eq!(call(publish)["ok"], true);

    // Node 1 joins and subscribes to the hot topic: the topic moves with
    // its schedules, which node 0 then lists and cancels through node 1.
    nodes.push(etcd_node(&etcd, name, ports[1]));
    wait_members(&[&nodes[0], &nodes[1]], &addrs);
    let mut sub = nodes[1].ws("/v1/ws");
    let granted = native_call(&mut sub, serde_json::json!({ "id": 1, "op": "subscribe", "topic": hot }));
    assert_eq!(granted["ok"], true, "{granted}");
    let listed = call(serde_json::json!({ "op": "schedules", "topic": hot }));
    assert_eq!(listed["schedules"].as_array().map(Vec::len), Some(2), "{listed}");
    let cancelled = call(serde_json::json!({ "op": "cancel", "topic": hot, "schedule_id": "cancel-me" }));
    assert_eq!(cancelled["ok"], true, "{cancelled}");
    let fired = next_json(&mut sub);
    assert_eq!((fired["data"].clone(), fired["seq"].clone()), ("due".into(), 1.into()), "{fired}");
    // The cold topic's schedule fires on node 0, goes to node 1 and is
    // sequenced there.
    let cold_path = format!("/v1/topics/{cold}");
    wait_until("the cold topic's schedule sequenced on its new owner", || {
        // 404 until the topic arrives there.
        let (status, body) = nodes[1].get(&cold_path);
        status == 200 && serde_json::from_str::<serde_json::Value>(&body).unwrap()["last_seq"] == 1
    });
    let none = call(serde_json::json!({ "op": "schedules", "topic": cold }));
    assert_eq!(none["schedules"].as_array().map(Vec::len), Some(0), "{none}");
    let listed = call(serde_json::json!({ "op": "schedules", "topic": hot }));
    assert_eq!(listed["schedules"].as_array().map(Vec::len), Some(0), "{listed}");
}

#[test]
fn a_groups_members_are_told_when_its_topic_moves_and_join_it_again_on_the_new_owner() {
    let name = "groups-move";
    let etcd = Etcd::start(name);
    let (ports, addrs, table) = two_ports();
    let topic = (0..).map(|i| format!("work.{i}")).find(|t| table.lookup(t.as_bytes()) == Some(&addrs[1])).unwrap();
    let mut nodes = vec![etcd_node(&etcd, name, ports[0])];
    wait_members(&[&nodes[0]], &addrs[..1]);
    let join = |ws: &mut Ws| {
        let request = serde_json::json!({ "id": 1, "op": "subscribe", "topic": topic, "group": "workers" });
        let reply = native_call(ws, request);
        assert_eq!(reply["ok"], true, "{reply}");
    };
    // Takes `n` deliveries, acknowledging each; returns their data.
    let take = |ws: &mut Ws, n: usize| -> Vec<String> {
        (0..n)
            .map(|_| {
                let v = next_json(ws);
                assert_eq!(v["type"], "message", "{v}");
                let ack = serde_json::json!({ "op": "ack", "topic": topic, "group": "workers", "seq": v["seq"] });
                ws.send(tungstenite::Message::text(ack.to_string())).unwrap();
                v["data"].as_str().unwrap().to_string()
            })
            .collect()
    };
    let mut member = nodes[0].ws("/v1/ws");
    join(&mut member);
    let mut publisher = nodes[0].ws("/v1/ws");
    let mut id = 100;
    for i in 0..3 {
        publish_until_ok(&mut publisher, &mut id, &topic, &format!("before-{i}"));
    }
    assert_eq!(take(&mut member, 3), ["before-0", "before-1", "before-2"]);
    // Two more delivered and not acknowledged when the topic moves.
    for i in 0..2 {
        publish_until_ok(&mut publisher, &mut id, &topic, &format!("unacked-{i}"));
    }
    let held: Vec<String> = (0..2)
        .map(|_| {
            let v = next_json(&mut member);
            assert_eq!(v["type"], "message", "{v}");
            v["data"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(held, ["unacked-0", "unacked-1"]);

    // Node 1 joins and owns the topic: the group ends on node 0 and its
    // member is told; the group goes to node 1 with the topic. Joined again
    // (through node 0), the member gets what it had not acknowledged
    // again, then what is published from then on, from node 1.
    nodes.push(etcd_node(&etcd, name, ports[1]));
    wait_members(&[&nodes[0], &nodes[1]], &addrs);
    let lost = next_json(&mut member);
    assert_eq!((lost["type"].clone(), lost["group"].clone()), ("group_lost".into(), "workers".into()), "{lost}");
    // The join reaches node 1 first: it waits for the topic's hand-off
    // (numbers go on after node 0's).
    join(&mut member);
    assert_eq!(take(&mut member, 2), ["unacked-0", "unacked-1"], "unacknowledged messages come again");
    let seqs: Vec<u64> =
        (0..3).map(|i| publish_until_ok(&mut publisher, &mut id, &topic, &format!("after-{i}")).0).collect();
    assert_eq!(seqs, [6, 7, 8], "the topic's numbers went on through the move");
    assert_eq!(take(&mut member, 3), ["after-0", "after-1", "after-2"]);

    // Node 1 leaves: the member (on node 0, in node 1's group over the
    // link) is told again, joins again, and goes on with node 0.
    // SIGTERM, not waited for: the member joins again while node 1 is
    // still handing its topics over (as a client does at once).
    let leaving = nodes.pop().unwrap();
    let pid = leaving.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let lost = next_json(&mut member);
    assert_eq!(lost["type"], "group_lost", "{lost}");
    wait_members(&[&nodes[0]], &addrs[..1]);
    join(&mut member);
    let seqs: Vec<u64> =
        (0..3).map(|i| publish_until_ok(&mut publisher, &mut id, &topic, &format!("back-{i}")).0).collect();
    assert_eq!(seqs, [9, 10, 11], "the topic's numbers went on through the move back");
    assert_eq!(take(&mut member, 3), ["back-0", "back-1", "back-2"]);
    assert!(nix_term(&leaving), "node 1 stops once its topics are handed over");
}

/// The smallest position (the first message not acknowledged) of durable
/// group `group`'s save under `topics` (a node's data directory's
/// `topics`, or a directory object store's), if there is one.
fn saved_group_min(topics: &std::path::Path, group: &str) -> Option<u64> {
    let file = format!("{:016x}.json", proto::hash::fnv1a(group.as_bytes()));
    std::fs::read_dir(topics).ok()?.flatten().find_map(|dir| {
        let body = std::fs::read(dir.path().join("groups").join(&file)).ok()?;
        let saved: proto::group::SavedGroup = serde_json::from_slice(&body).ok()?;
        saved.positions.iter().copied().min()
    })
}

/// Joins group `workers` of `topic` (prefetch 100).
fn join_workers(ws: &mut Ws, topic: &str) {
    let request =
        serde_json::json!({ "id": 1, "op": "subscribe", "topic": topic, "group": "workers", "prefetch": 100 });
    let reply = native_call(ws, request);
    assert_eq!(reply["ok"], true, "{reply}");
}

/// The next `n` group deliveries' numbers, sorted (anything else fails).
fn take_seqs(ws: &mut Ws, n: usize) -> Vec<u64> {
    let mut seqs: Vec<u64> = (0..n)
        .map(|_| {
            let v = next_json(ws);
            assert_eq!(v["type"], "message", "{v}");
            v["seq"].as_u64().unwrap()
        })
        .collect();
    seqs.sort();
    seqs
}

#[test]
fn a_durable_topics_groups_move_with_its_log_and_go_on_from_where_they_stood() {
    let name = "durable-groups-move";
    let etcd = Etcd::start(name);
    let objects = fresh_dir("durable-groups-objects");
    let store = Store { flags: vec!["--object-store".into(), objects.to_str().unwrap().into()], env: vec![] };
    let (ports, addrs, table) = two_ports();
    let topic = (0..).map(|i| format!("jobs.{i}")).find(|t| table.lookup(t.as_bytes()) == Some(&addrs[1])).unwrap();
    let mut nodes = vec![durable_node(&etcd, name, ports[0], &topic, &store)];
    wait_members(&[&nodes[0]], &addrs[..1]);
    let join = |ws: &mut Ws| join_workers(ws, &topic);
    let take = take_seqs;
    let ack = |ws: &mut Ws, seqs: &[u64]| {
        for seq in seqs {
            let ack = serde_json::json!({ "op": "ack", "topic": topic, "group": "workers", "seq": seq });
            ws.send(tungstenite::Message::text(ack.to_string())).unwrap();
        }
    };
    // Waits until the group's save on node `port` says every message
    // before `first` is done.
    let saved_at = |port: u16, first: u64| {
        let mut last = None;
        let saved = wait_for(|| {
            last = saved_group_min(&data_dir(name, port).join("topics"), "workers");
            last == Some(first)
        });
        assert!(saved, "node {port}: the group's save stands at {last:?}, not {first}");
    };
    // Reads until `group_lost`: nothing else may come first.
    let lost = |ws: &mut Ws| {
        let v = next_json(ws);
        assert_eq!((v["type"].clone(), v["group"].clone()), ("group_lost".into(), "workers".into()), "{v}");
    };

    // On node 0 alone: 10 messages, 6 acknowledged, 4 held.
    let mut member = nodes[0].ws("/v1/ws");
    join(&mut member);
    let mut publisher = nodes[0].ws("/v1/ws");
    let mut id = 100;
    let (first, _) = publish_n(&mut publisher, &mut id, &topic, "first", 10, "local");
    assert_eq!(first.iter().map(|m| m.0).collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>());
    assert_eq!(take(&mut member, 10), (1..=10).collect::<Vec<_>>());
    ack(&mut member, &[1, 2, 3, 4, 5, 6]);
    saved_at(ports[0], 7);

    // Node 1 joins and owns the topic: its log and the group's positions
    // move to it. The member, told, joins again: it gets the 4 it held
    // (again) and what was published since, none of the 6 it acknowledged.
    nodes.push(durable_node(&etcd, name, ports[1], &topic, &store));
    wait_members(&[&nodes[0], &nodes[1]], &addrs);
    lost(&mut member);
    join(&mut member);
    let (after, refused_join) = publish_n(&mut publisher, &mut id, &topic, "after", 5, "local");
    assert_eq!(after.iter().map(|m| m.0).collect::<Vec<_>>(), (11..=15).collect::<Vec<_>>());
    let got = take(&mut member, 9);
    assert_eq!(got, (7..=15).collect::<Vec<_>>(), "after the move to node 1");
    ack(&mut member, &got);
    saved_at(ports[1], 16);
    assert!(nodes[0].metric("fluxnode_topics_handed_over_total") >= 1, "node 0 counted no hand-off");
    assert!(nodes[1].metric("fluxnode_topics_taken_over_total") >= 1, "node 1 counted no take-over");
    assert_eq!(
        saved_group_min(&data_dir(name, ports[0]).join("topics"), "workers"),
        None,
        "node 0 kept the moved group's save"
    );

    // 4 more, 2 acknowledged; node 1 leaves gracefully: the topic, its log
    // and the group go back to node 0, the 2 held delivered again there.
    let (more, _) = publish_n(&mut publisher, &mut id, &topic, "more", 4, "local");
    assert_eq!(more.iter().map(|m| m.0).collect::<Vec<_>>(), (16..=19).collect::<Vec<_>>());
    assert_eq!(take(&mut member, 4), (16..=19).collect::<Vec<_>>());
    ack(&mut member, &[16, 17]);
    saved_at(ports[1], 18);
    // SIGTERM, not waited for: the member joins again at once (as a
    // client does) while node 1 still hands its topics over.
    let leaving = nodes.pop().unwrap();
    let pid = leaving.child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    lost(&mut member);
    wait_members(&[&nodes[0]], &addrs[..1]);
    join(&mut member);
    let (back, refused_leave) = publish_n(&mut publisher, &mut id, &topic, "back", 2, "local");
    assert_eq!(back.iter().map(|m| m.0).collect::<Vec<_>>(), [20, 21]);
    let got = take(&mut member, 4);
    assert_eq!(got, (18..=21).collect::<Vec<_>>(), "after the move back to node 0");
    ack(&mut member, &got);
    saved_at(ports[0], 22);
    // Nothing else was owed: the next delivery is the next message.
    let (end, _) = publish_n(&mut publisher, &mut id, &topic, "end", 1, "local");
    assert_eq!(take(&mut member, 1), [end[0].0]);
    let stopped =
        wait_for(|| std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z ")));
    assert!(stopped, "node 1 stops once its topics are handed over");
    eprintln!(
        "durable group moved with topic {topic}: 10 messages, 6 acked on node 0; after the join of node 1 \
         ({refused_join} publishes refused meanwhile) the member got 7..=15 (4 held again, 5 new); 4 more, 2 acked; \
         after node 1's graceful leave ({refused_leave} refused) it got 18..=21; then the next message, 22; \
         no acknowledged message came again"
    );
    let _ = std::fs::remove_dir_all(&objects);
}

#[test]
fn a_node_with_another_ownership_table_size_than_its_cluster_is_refused() {
    let name = "table-size";
    let etcd = Etcd::start(name);
    let (ports, addrs, _) = two_ports();
    let first = etcd_node(&etcd, name, ports[0]);
    wait_members(&[&first], &addrs[..1]);
    let me = &addrs[1];
    let out = std::process::Command::new(fluxnode_bin())
        .args(["--listen", me, "--advertise", me, "--shards", "1", "--etcd", &etcd.addr(), "--cluster-name", name])
        .args(["--table-size", "655373"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a node with another table joined");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ownership table of 65537 slots") && stderr.contains("--table-size 65537"), "{stderr}");
    // Nothing changed for the cluster: its member set is the first node.
    wait_members(&[&first], &addrs[..1]);
    // The same size joins.
    let second = etcd_node(&etcd, name, ports[1]);
    wait_members(&[&first, &second], &addrs);
}

#[test]
fn a_leaving_node_hands_over_even_the_topics_nobody_uses_meanwhile() {
    let name = "cold-leave";
    let etcd = Etcd::start(name);
    let (ports, addrs, table) = two_ports();
    // Topics node 1 owns beside node 0: published to through node 0, then
    // left alone while node 1 leaves.
    let topics: Vec<String> =
        (0..).map(|i| format!("cold.{i}")).filter(|t| table.lookup(t.as_bytes()) == Some(&addrs[1])).take(5).collect();
    let first = etcd_node(&etcd, name, ports[0]);
    let leaving = etcd_node(&etcd, name, ports[1]);
    wait_members(&[&first, &leaving], &addrs);
    let mut publisher = first.ws("/v1/ws");
    let mut id = 0;
    for t in &topics {
        for i in 0..3 {
            publish_until_ok(&mut publisher, &mut id, t, &format!("{t}-{i}"));
        }
    }
    let epochs: Vec<serde_json::Value> =
        topics.iter().map(|t| leaving.get_json(&format!("/v1/topics/{t}"))["epoch"].clone()).collect();
    assert!(epochs.iter().all(serde_json::Value::is_string), "{epochs:?}");

    // Node 1 leaves and is waited for: nobody asks for the topics
    // meanwhile. It offers each to node 0, which claims it at once.
    assert!(nix_term(&leaving), "node 1 did not stop");
    drop(leaving);
    wait_members(&[&first], &addrs[..1]);
    let mut sub = first.ws("/v1/ws");
    for (i, t) in topics.iter().enumerate() {
        let granted =
            native_call(&mut sub, serde_json::json!({ "id": i, "op": "subscribe", "topic": t, "from_seq": 0 }));
        assert_eq!(granted["ok"], true, "{granted}");
        assert_eq!((granted["epoch"].clone(), granted.get("lost")), (epochs[i].clone(), None), "{t}: {granted}");
        let replay: Vec<String> = (0..3)
            .map(|_| {
                let v = next_json(&mut sub);
                assert_eq!(v["topic"].as_str(), Some(t.as_str()), "{v}");
                v["data"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(replay, (0..3).map(|i| format!("{t}-{i}")).collect::<Vec<_>>());
    }
    eprintln!(
        "{} topics owned by a node that left gracefully, unused while it left: each continued on the survivor in \
         its epoch with its 3 retained messages",
        topics.len()
    );
}

#[test]
fn a_durable_group_goes_on_from_the_object_store_when_its_owner_dies() {
    let name = "durable-groups-kill";
    let etcd = Etcd::start(name);
    let objects = fresh_dir("durable-groups-kill-objects");
    let store = Store { flags: vec!["--object-store".into(), objects.to_str().unwrap().into()], env: vec![] };
    let (ports, addrs, table) = two_ports();
    let topic = (0..).map(|i| format!("tasks.{i}")).find(|t| table.lookup(t.as_bytes()) == Some(&addrs[1])).unwrap();
    let mut nodes: Vec<Node> = ports.iter().map(|&p| durable_node(&etcd, name, p, &topic, &store)).collect();
    wait_members(&[&nodes[0], &nodes[1]], &addrs);
    let join = |ws: &mut Ws| join_workers(ws, &topic);
    let take = take_seqs;
    // The member and the publisher on node 0; the topic and its group on
    // node 1. 10 messages, all in the store (ack `stored`); 6 acknowledged.
    let mut member = nodes[0].ws("/v1/ws");
    join(&mut member);
    let mut publisher = nodes[0].ws("/v1/ws");
    let mut id = 100;
    let (first, _) = publish_n(&mut publisher, &mut id, &topic, "first", 10, "stored");
    assert_eq!(first.iter().map(|m| m.0).collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>());
    assert_eq!(take(&mut member, 10), (1..=10).collect::<Vec<_>>());
    for seq in 1..=6 {
        let ack = serde_json::json!({ "op": "ack", "topic": topic, "group": "workers", "seq": seq });
        member.send(tungstenite::Message::text(ack.to_string())).unwrap();
    }
    // Node 1 sends its groups' positions to the store about once a second.
    let mut last = None;
    let stored = wait_for(|| {
        last = saved_group_min(&objects.join("topics"), "workers");
        last == Some(7)
    });
    assert!(stored, "the store holds the group at {last:?}, not 7");

    // Node 1 is killed. Node 0 takes the topic from the store: numbers go
    // on after the last stored one (a new epoch), and the group from its
    // stored positions: the member, told, joins again and gets the 4 it
    // held and what comes next, none of the 6 it acknowledged.
    drop(nodes.pop()); // SIGKILL
    let lost = next_json(&mut member);
    assert_eq!((lost["type"].clone(), lost["group"].clone()), ("group_lost".into(), "workers".into()), "{lost}");
    wait_members(&[&nodes[0]], &addrs[..1]);
    join(&mut member);
    let (after, refused) = publish_n(&mut publisher, &mut id, &topic, "after", 2, "local");
    assert_eq!(after.iter().map(|m| m.0).collect::<Vec<_>>(), [11, 12], "numbers go on after the stored log");
    assert_eq!(take(&mut member, 6), (7..=12).collect::<Vec<_>>());
    eprintln!(
        "durable group of {topic} on a killed node: 10 messages stored, 6 acked; the survivor restored the group \
         from the store ({refused} publishes refused meanwhile): the member got 7..=10 again and 11, 12; none of \
         1..=6"
    );
    let _ = std::fs::remove_dir_all(&objects);
}
