//! A cluster of real nodes on 127.0.0.1 with static membership: the nodes
//! agree on every topic's owner (the balancer's Maglev choice); any node
//! serves any topic (publishes forwarded to the owner, one copy of each
//! message per subscribing node), in order, with the owner's numbers;
//! resumes, groups, requests, schedules and group deletion work through
//! another node; a durable topic's admin API is sent on to its owner
//! (once; refused with `owned_elsewhere` where views differ); a dead owner fails forwarded publishes with
//! `owner_unreachable`, and when it comes back its topics' followers are
//! told the sequence space changed and go on.

mod common;

use common::*;
use tungstenite::Message;

#[test]
fn peers_agree_on_every_topics_owner_and_it_is_the_balancers_choice() {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let nodes: Vec<Node> = ports
        .iter()
        .zip(&addrs)
        .map(|(port, me)| {
            let mut flags = vec!["--shards", "1", "--advertise", me];
            for a in &addrs {
                flags.extend(["--peer", a]);
            }
            Node::start_on(*port, &flags)
        })
        .collect();
    let table = proto::maglev::Table::build(&addrs, proto::maglev::TABLE_SIZE_DEFAULT).unwrap();
    let mut owners = std::collections::BTreeMap::new();
    for t in 0..30 {
        let topic = format!("orders.{t}");
        let views: Vec<serde_json::Value> =
            nodes.iter().map(|n| n.get_json(&format!("/v1/cluster?topic={topic}"))).collect();
        for (v, me) in views.iter().zip(&addrs) {
            assert_eq!(v["membership"], "static", "{v}");
            assert_eq!(v["version"], 1, "{v}");
            assert_eq!(v["node"], me.as_str(), "{v}");
            assert_eq!(v["forwarding"], true, "{v}");
            assert_eq!(v["owner"], views[0]["owner"], "nodes disagree on {topic}: {views:?}");
        }
        let owner = views[0]["owner"].as_str().unwrap().to_string();
        assert_eq!(Some(owner.as_str()), table.lookup(topic.as_bytes()), "the balancer routes {topic} elsewhere");
        *owners.entry(owner).or_insert(0) += 1;
    }
    assert_eq!(owners.len(), 3, "30 topics spread over the 3 nodes: {owners:?}");
    let mut sorted = addrs.clone();
    sorted.sort();
    assert_eq!(nodes[0].get_json("/v1/cluster")["members"], serde_json::json!(sorted));
    eprintln!("30 topics, owners per node: {owners:?}");
}

#[test]
fn a_node_alone_is_its_own_cluster_and_a_node_outside_its_peers_refuses_to_start() {
    let node = Node::start(&["--shards", "1"]);
    let v = node.get_json("/v1/cluster?topic=orders");
    assert_eq!(v["membership"], "single", "{v}");
    assert_eq!(v["members"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["owner"], v["node"], "{v}");
    assert_eq!(node.get("/v1/cluster?topic=bad%20name").0, 400);
    let out = std::process::Command::new(fluxnode_bin())
        .args(["--listen", "127.0.0.1:0", "--peer", "10.0.0.1:8080", "--peer", "10.0.0.2:8080"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not among the peers"), "{stderr}");
}

/// Subscribes a native connection to `topic`; returns the reply.
fn native_subscribe(ws: &mut Ws, topic: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut request = serde_json::json!({ "id": 1, "op": "subscribe", "topic": topic });
    if let (Some(r), Some(e)) = (request.as_object_mut(), extra.as_object()) {
        r.extend(e.clone());
    }
    let reply = native_call(ws, request);
    assert_eq!(reply["ok"], true, "{reply}");
    reply
}

/// Reads `n` native messages of `topic`: (seq, data) in arrival order.
fn native_messages(ws: &mut Ws, n: usize) -> Vec<(u64, String)> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let v = next_json(ws);
        assert_eq!(v["type"], "message", "{v}");
        got.push((v["seq"].as_u64().unwrap(), v["data"].as_str().unwrap().to_string()));
    }
    got
}

/// Publishes `count` messages `m{from}..` to `topic` on one native
/// connection, pipelined; returns their sequence numbers in reply order.
fn native_publish(ws: &mut Ws, topic: &str, from: usize, count: usize) -> Vec<u64> {
    for i in from..from + count {
        let request = serde_json::json!({ "id": i, "op": "publish", "topic": topic, "data": format!("m{i}") });
        ws.send(Message::text(request.to_string())).unwrap();
    }
    let mut seqs = Vec::with_capacity(count);
    for i in from..from + count {
        let v = next_json(ws);
        assert_eq!(
            (v["type"].as_str(), v["id"].as_u64(), v["ok"].as_bool()),
            (Some("reply"), Some(i as u64), Some(true)),
            "{v}"
        );
        seqs.push(v["seq"].as_u64().unwrap());
    }
    seqs
}

#[test]
fn a_publish_on_one_node_reaches_subscribers_on_every_node_in_order_once_per_node() {
    // Sockets stay on the shard that accepted them (native ones would move
    // to the topic's owner shard at their subscribe): a delivery then also
    // crosses shards on node 1.
    let (nodes, addrs) = start_cluster(3, &["--shards", "2", "--topic-sockets", "accepting"]);
    let topic = topic_owned_by(&nodes, &addrs, "orders", 2);
    // Subscribers on node 1 (two native, one on each shard, and a raw topic
    // socket) and on the owner, node 2; the publisher on node 0.
    let mut subs: Vec<(usize, Ws)> = Vec::new();
    let mut epochs = Vec::new();
    for (node, shard) in [(1, 0), (1, 1), (2, 0)] {
        let mut ws = ws_on_shard(&nodes[node].addr(), "/v1/ws", shard);
        epochs.push(native_subscribe(&mut ws, &topic, serde_json::json!({}))["epoch"].clone());
        subs.push((node, ws));
    }
    assert!(epochs.iter().all(|e| *e == epochs[0]), "one sequence space on every node: {epochs:?}");
    let mut raw = nodes[1].ws(&format!("/v1/topics/{topic}/ws?role=sub"));
    wait_until("the raw subscriber is live", || nodes[1].subscribers(&topic) == 3);
    let mut publisher = nodes[0].ws("/v1/ws");
    const N: usize = 300;
    let seqs = native_publish(&mut publisher, &topic, 1, N);
    assert_eq!(seqs, (1..=N as u64).collect::<Vec<_>>(), "the owner numbers forwarded publishes in order");
    let want: Vec<(u64, String)> = (1..=N).map(|i| (i as u64, format!("m{i}"))).collect();
    for (node, ws) in &mut subs {
        assert_eq!(native_messages(ws, N), want, "subscriber on node {node}");
    }
    for i in 1..=N {
        match next_data(&mut raw) {
            Message::Text(t) => assert_eq!(t.as_str(), format!("m{i}")),
            other => panic!("raw subscriber: {other:?}"),
        }
    }
    // One copy per subscribing node, not per subscriber: node 1's three
    // subscribers cost the owner N messages on one link.
    let forwarded = nodes[0].metric("fluxnode_messages_forwarded_total");
    let followed: Vec<u64> = nodes.iter().map(|n| n.metric("fluxnode_messages_followed_total")).collect();
    assert_eq!(forwarded, N as u64);
    assert_eq!(followed, vec![0, N as u64, 0], "messages followed per node");
    assert_eq!(nodes[2].metric("fluxnode_messages_published_total"), N as u64);
    eprintln!(
        "{N} publishes on node 0: forwarded {forwarded}, followed per node {followed:?}; \
         3 native + 1 raw subscribers on 2 nodes got all {N} in order"
    );

    // A resume through a node that never followed the topic: the owner
    // replays what it missed there, with the same numbers and epoch.
    native_publish(&mut publisher, &topic, N + 1, 20);
    let mut late = nodes[0].ws("/v1/ws");
    let epoch = epochs[0].clone();
    let reply = native_subscribe(&mut late, &topic, serde_json::json!({ "from_seq": N, "epoch": epoch }));
    assert!(reply.get("gap").is_none() && reply.get("lost").is_none(), "{reply}");
    let replayed = native_messages(&mut late, 20);
    assert_eq!(replayed, (N + 1..=N + 20).map(|i| (i as u64, format!("m{i}"))).collect::<Vec<_>>());
    native_publish(&mut publisher, &topic, N + 21, 5);
    let live = native_messages(&mut late, 5);
    assert_eq!(live.first().map(|m| m.0), Some(N as u64 + 21));
    eprintln!("a resume from {N} on node 0 replayed 20 and went live");
}

#[test]
fn a_durable_declaration_elsewhere_is_sent_on_to_the_owner_once() {
    // Each node with a data directory of its own (durable topics are kept
    // there; the default is shared by every node started here).
    let ports: Vec<u16> = (0..2).map(|_| free_port()).collect();
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let dirs: Vec<_> = ports.iter().map(|p| fresh_dir(&format!("declare-elsewhere-{p}"))).collect();
    let nodes: Vec<Node> = (0..2)
        .map(|i| {
            let dir = dirs[i].to_str().unwrap();
            let (me, a, b) = (addrs[i].as_str(), addrs[0].as_str(), addrs[1].as_str());
            let flags = ["--shards", "1", "--advertise", me, "--peer", a, "--peer", b, "--data-dir", dir];
            Node::start_on(ports[i], &flags)
        })
        .collect();
    let topic = topic_owned_by(&nodes, &addrs, "jobs", 1);
    let mut ws = nodes[0].ws("/v1/ws");
    // A request goes to the owner, which has no responder for it.
    let ask = native_call(&mut ws, serde_json::json!({ "id": 2, "op": "request", "topic": topic, "data": "q" }));
    assert_eq!(ask["error"]["code"], "no_responders", "{ask}");
    // The admin API on node 0 answers with the owner's answer.
    let path = format!("/v1/topics/{topic}");
    let direct = nodes[1].request("PUT", &path, "application/json", b"{}");
    let sent_on = nodes[0].request("PUT", &path, "application/json", b"{}");
    assert_eq!(sent_on, direct, "node 0 did not pass node 1's answer on");
    // A request already sent on by a node is never sent on again: where
    // views differ it is refused.
    let mut stream = std::net::TcpStream::connect(nodes[0].addr()).unwrap();
    let marked = format!(
        "PUT {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\nx-rayflux-forwarded: 1\r\nconnection: close\r\n\r\n{{}}"
    );
    std::io::Write::write_all(&mut stream, marked.as_bytes()).unwrap();
    let (status, body) = read_response(&mut stream);
    assert_eq!(status, 421, "{body}");
    assert!(body.contains("owned_elsewhere") && body.contains(&addrs[1]), "{body}");
    eprintln!("admin API through node 0: the owner's answer ({} {}); a marked request: 421", direct.0, direct.1);
    // On the owner they work.
    let mut on_owner = nodes[1].ws("/v1/ws");
    let ask = native_call(&mut on_owner, serde_json::json!({ "id": 2, "op": "request", "topic": topic, "data": "q" }));
    assert_eq!(ask["error"]["code"], "no_responders", "{ask}");
    drop(nodes);
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Schedules (add, replace, list, cancel) and a group's deletion asked on
/// a node that does not own the topic: answered by the owner over the
/// link, and the schedule fires there, reaching a subscriber on the asking
/// node.
#[test]
fn schedules_and_group_deletion_work_through_any_node() {
    let (nodes, addrs) = start_cluster(2, &["--shards", "2"]);
    let topic = topic_owned_by(&nodes, &addrs, "reminders", 1);
    let mut sub = nodes[0].ws("/v1/ws");
    let granted = native_call(&mut sub, serde_json::json!({ "id": 1, "op": "subscribe", "topic": topic }));
    assert_eq!(granted["ok"], true, "{granted}");
    let mut ws = nodes[0].ws("/v1/ws");
    let mut call = |request: serde_json::Value| native_call(&mut ws, request);
    let later = call(serde_json::json!({
        "id": 2, "op": "publish", "topic": topic, "data": "later", "delay_ms": 60_000, "schedule_id": "call-2"
    }));
    assert_eq!((later["ok"].clone(), later["schedule_id"].clone()), (true.into(), "call-2".into()), "{later}");
    let again = call(serde_json::json!({
        "id": 3, "op": "publish", "topic": topic, "data": "later", "delay_ms": 60_000, "schedule_id": "call-2",
        "if_absent": true
    }));
    assert_eq!(again["present"], true, "{again}");
    let soon = call(serde_json::json!({ "id": 4, "op": "publish", "topic": topic, "data": "soon", "delay_ms": 300 }));
    assert_eq!(soon["ok"], true, "{soon}");
    let listed = call(serde_json::json!({ "id": 5, "op": "schedules", "topic": topic }));
    let ids: Vec<&str> =
        listed["schedules"].as_array().unwrap().iter().filter_map(|s| s["schedule_id"].as_str()).collect();
    assert!(ids.contains(&"call-2") && ids.len() == 2, "{listed}");
    let cancelled = call(serde_json::json!({ "id": 6, "op": "cancel", "topic": topic, "schedule_id": "call-2" }));
    assert_eq!(cancelled["ok"], true, "{cancelled}");
    let missing = call(serde_json::json!({ "id": 7, "op": "cancel", "topic": topic, "schedule_id": "call-2" }));
    assert_eq!(missing["error"]["code"], "not_found", "{missing}");
    // The owner fires the schedule; the subscriber on node 0 gets it.
    let fired = next_json(&mut sub);
    assert_eq!((fired["type"].clone(), fired["data"].clone()), ("message".into(), "soon".into()), "{fired}");
    // A group made through node 0, its member gone, deleted through node 0.
    let mut member = nodes[0].ws("/v1/ws");
    let joined =
        native_call(&mut member, serde_json::json!({ "id": 1, "op": "subscribe", "topic": topic, "group": "billing" }));
    assert_eq!(joined["ok"], true, "{joined}");
    let busy =
        native_call(&mut ws, serde_json::json!({ "id": 8, "op": "delete_group", "topic": topic, "group": "billing" }));
    assert_eq!(busy["error"]["code"], "busy", "{busy}");
    drop(member);
    let mut id = 9;
    let deleted = loop {
        // The member's leave reaches the owner over the link; until then
        // the group is busy.
        let reply = native_call(
            &mut ws,
            serde_json::json!({ "id": id, "op": "delete_group", "topic": topic, "group": "billing" }),
        );
        id += 1;
        if reply["error"]["code"] != "busy" {
            break reply;
        }
        std::thread::park_timeout(std::time::Duration::from_millis(10));
    };
    assert_eq!(deleted["ok"], true, "{deleted}");
    let gone =
        native_call(&mut ws, serde_json::json!({ "id": id, "op": "delete_group", "topic": topic, "group": "billing" }));
    assert_eq!(gone["error"]["code"], "not_found", "{gone}");
}

/// A consumer group whose members connect to different nodes: one on the
/// topic's owner, two on another node (two shards, so the join crosses
/// shards there too), one on a third. Every message is delivered to one
/// member, acknowledged, and none twice; a member that leaves without
/// acknowledging gives its messages to the others; the members on other
/// nodes are told when the owner goes away.
#[test]
fn a_group_spans_nodes_and_each_message_goes_to_one_member() {
    let (mut nodes, addrs) = start_cluster(3, &["--shards", "2"]);
    let topic = topic_owned_by(&nodes, &addrs, "work", 2);
    let join = |ws: &mut Ws| {
        let reply = native_call(
            ws,
            serde_json::json!({ "id": 1, "op": "subscribe", "topic": topic, "group": "workers", "prefetch": 4 }),
        );
        assert_eq!(reply["ok"], true, "{reply}");
    };
    let mut members: Vec<(usize, Ws)> = [2, 0, 0, 1].iter().map(|&n| (n, nodes[n].ws("/v1/ws"))).collect();
    for (_, ws) in members.iter_mut() {
        join(ws);
    }
    const N: usize = 200;
    let mut publisher = nodes[1].ws("/v1/ws");
    native_publish(&mut publisher, &topic, 1, N);
    // Each member takes what comes to it and acknowledges; members are
    // read in turn (prefetch 4 bounds what each holds).
    let mut got: Vec<Vec<u64>> = vec![Vec::new(); members.len()];
    let mut total = 0;
    while total < N {
        for (i, (_, ws)) in members.iter_mut().enumerate() {
            let Some(v) = try_next_json(ws, std::time::Duration::from_millis(20)) else { continue };
            assert_eq!(v["type"], "message", "{v}");
            assert_eq!(v["group"], "workers", "{v}");
            let seq = v["seq"].as_u64().unwrap();
            got[i].push(seq);
            total += 1;
            let ack = serde_json::json!({ "op": "ack", "topic": topic, "group": "workers", "seq": seq });
            ws.send(Message::text(ack.to_string())).unwrap();
        }
    }
    let mut all: Vec<u64> = got.iter().flatten().copied().collect();
    all.sort_unstable();
    assert_eq!(all, (1..=N as u64).collect::<Vec<_>>(), "every message once");
    let per: Vec<usize> = got.iter().map(Vec::len).collect();
    assert!(per.iter().all(|&n| n > 0), "every member got some: {per:?}");
    eprintln!("{N} messages to a group with members on nodes {:?}: {per:?}", [2, 0, 0, 1]);
    // A member on node 0 takes messages without acknowledging them and
    // leaves (its connection closes): they go to the others.
    native_publish(&mut publisher, &topic, N + 1, 20);
    let mut held = Vec::new();
    let mut acked = std::collections::BTreeSet::new();
    let mut quitter = Some(members.remove(1));
    while acked.len() < 20 {
        if let Some((_, ws)) = quitter.as_mut() {
            if let Some(v) = try_next_json(ws, std::time::Duration::from_millis(20)) {
                held.push(v["seq"].as_u64().unwrap());
                quitter = None; // closes: what it holds goes to the others
            }
        }
        for (_, ws) in members.iter_mut() {
            let Some(v) = try_next_json(ws, std::time::Duration::from_millis(20)) else { continue };
            let seq = v["seq"].as_u64().unwrap();
            acked.insert(seq);
            let ack = serde_json::json!({ "op": "ack", "topic": topic, "group": "workers", "seq": seq });
            ws.send(Message::text(ack.to_string())).unwrap();
        }
    }
    assert_eq!(acked, (N as u64 + 1..=N as u64 + 20).collect(), "held {held:?} went to the others");
    // The owner goes away: the members elsewhere are told.
    drop(nodes.remove(2));
    for (i, (node, ws)) in members.iter_mut().enumerate().filter(|(_, (node, _))| *node != 2) {
        let v = next_json(ws);
        assert_eq!(
            (v["type"].as_str(), v["reason"].as_str()),
            (Some("group_lost"), Some("owner_unreachable")),
            "member {i} on node {node}: {v}"
        );
    }
}

#[test]
fn a_dead_owner_fails_forwarded_publishes_and_its_followers_go_on_when_it_returns() {
    let (mut nodes, addrs) = start_cluster(3, &["--shards", "1"]);
    let topic = topic_owned_by(&nodes, &addrs, "ticks", 2);
    let mut sub = nodes[1].ws("/v1/ws");
    let first = native_subscribe(&mut sub, &topic, serde_json::json!({}));
    let mut legacy = nodes[1].ws("/subscribe");
    legacy.send(Message::text(format!(r#"{{"subscriber_id":"s","topic":"{topic}"}}"#))).unwrap();
    wait_until("both subscribers live", || nodes[1].subscribers(&topic) == 2);
    let mut publisher = nodes[0].ws("/v1/ws");
    native_publish(&mut publisher, &topic, 1, 10);
    assert_eq!(native_messages(&mut sub, 10).last().map(|m| m.0), Some(10));
    // kill -9 the owner: publishes forwarded to it fail, none hangs.
    let port = nodes[2].port;
    drop(nodes.remove(2));
    wait_until("a publish through node 0 is refused as owner_unreachable", || {
        let (status, body) = nodes[0].request("POST", &format!("/v1/topics/{topic}"), "text/plain", b"lost?");
        status == 503 && body.contains("owner_unreachable")
    });
    // It comes back (an ephemeral topic starts a new sequence space): the
    // native follower is told, then gets the new messages; the original
    // API's subscriber, which has no numbers, just goes on.
    let mut flags = vec!["--shards", "1", "--advertise", addrs[2].as_str()];
    for a in &addrs {
        flags.extend(["--peer", a.as_str()]);
    }
    nodes.push(Node::start_on(port, &flags));
    let mut delivered = 0;
    wait_until("a publish through node 0 reaches the returned owner", || {
        let (status, _) = nodes[0].request("POST", &format!("/v1/topics/{topic}"), "text/plain", b"back");
        delivered += usize::from(status == 200);
        status == 200
    });
    let lost = next_json(&mut sub);
    assert_eq!((lost["type"].as_str(), lost["reason"].as_str()), (Some("lost"), Some("epoch_changed")), "{lost}");
    assert_ne!(lost["epoch"], first["epoch"], "{lost}");
    let message = next_json(&mut sub);
    assert_eq!((message["type"].as_str(), message["data"].as_str()), (Some("message"), Some("back")), "{message}");
    for _ in 0..10 {
        next_data(&mut legacy);
    }
    assert_eq!(next_data(&mut legacy), Message::Binary(b"back".to_vec()));
    eprintln!("owner killed: publishes refused owner_unreachable; back: follower told {lost}, then got {message}");
}

/// The next native JSON frame if one comes within `wait` (to read several
/// connections in turn); pings and pongs are skipped.
fn try_next_json(ws: &mut Ws, wait: std::time::Duration) -> Option<serde_json::Value> {
    ws.get_mut().set_read_timeout(Some(wait)).unwrap();
    let read = loop {
        match ws.read() {
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            other => break other,
        }
    };
    ws.get_mut().set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    match read {
        Ok(Message::Text(t)) => Some(serde_json::from_str(&t).unwrap()),
        Ok(other) => panic!("expected a text frame, got {other:?}"),
        Err(tungstenite::Error::Io(e))
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
        {
            None
        }
        Err(e) => panic!("read: {e}"),
    }
}

/// Requests made on the topic's owner and on another node are answered by a
/// responder whose connection is on another node than the owner (a group
/// member joined through it): the request, the answer and a responder's
/// error travel over the node links (requester's node to owner, owner to
/// responder's node, and back).
#[test]
fn a_responder_on_another_node_answers_requests_made_on_any_node() {
    let (nodes, addrs) = start_cluster(3, &["--shards", "2"]);
    let topic = topic_owned_by(&nodes, &addrs, "billing", 1);
    let mut responder = nodes[0].ws("/v1/ws");
    let join = native_call(
        &mut responder,
        serde_json::json!({ "id": 1, "op": "subscribe", "topic": topic, "group": "workers" }),
    );
    assert_eq!(join["ok"], true, "{join}");
    let mut on_owner = nodes[1].ws("/v1/ws");
    let mut on_third = nodes[2].ws("/v1/ws");
    let mut on_responders = nodes[0].ws("/v1/ws");
    let cases = [(2, "charged"), (4, ""), (6, "charged"), (8, ""), (10, "charged")];
    for (n, (i, answer)) in cases.into_iter().enumerate() {
        let requester = match n % 3 {
            0 => &mut on_owner,
            1 => &mut on_third,
            _ => &mut on_responders,
        };
        let ask = serde_json::json!({ "op": "request", "id": i, "topic": topic, "data": format!("charge {i}"), "timeout_ms": 10000 });
        requester.send(Message::text(ask.to_string())).unwrap();
        let m = next_json(&mut responder);
        assert_eq!(m["data"], format!("charge {i}"), "{m}");
        let to = m["reply_to"].as_str().expect("reply_to").to_string();
        let mut reply = serde_json::json!({ "op": "reply", "id": i + 1, "to": to, "topic": topic, "group": "workers", "seq": m["seq"] });
        if answer.is_empty() {
            reply["error"] = serde_json::json!({ "code": "declined", "message": "card expired" });
        } else {
            reply["data"] = serde_json::json!(answer);
        }
        let done = native_call(&mut responder, reply);
        assert_eq!(done["ok"], true, "{done}");
        let r = next_json(requester);
        assert_eq!(r["id"].as_u64(), Some(i), "{r}");
        if answer.is_empty() {
            assert_eq!(r["error"]["code"], "responder_error", "{r}");
            assert!(r["error"]["message"].as_str().unwrap().contains("card expired"), "{r}");
        } else {
            assert_eq!((r["ok"].as_bool(), r["data"].as_str()), (Some(true), Some(answer)), "{r}");
        }
    }
}

#[test]
fn a_cluster_may_use_a_larger_ownership_table_and_a_size_that_is_not_prime_is_refused() {
    let (nodes, addrs) = start_cluster(3, &["--shards", "1", "--table-size", "655373"]);
    let table = proto::maglev::Table::build(&addrs, 655_373).unwrap();
    for t in 0..30 {
        let topic = format!("orders.{t}");
        let owner = nodes[t % 3].get_json(&format!("/v1/cluster?topic={topic}"))["owner"].clone();
        assert_eq!(owner.as_str(), table.lookup(topic.as_bytes()), "{topic}: the nodes use another table");
    }
    let out = std::process::Command::new(fluxnode_bin())
        .args(["--listen", "127.0.0.1:0", "--table-size", "65536"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("table_size"), "{stderr}");
}
