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
