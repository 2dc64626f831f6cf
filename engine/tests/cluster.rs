//! Static cluster membership against real nodes: three nodes given the
//! same `--peer` set agree on every topic's owner, and it is the node the
//! balancer's Maglev table routes the topic to; a node alone is its own
//! cluster; a node whose address is not among its peers refuses to start.
//! (Forwarding between nodes is not built yet: `forwarding` is false.)

mod common;

use common::*;

/// A port free at the time of asking (the nodes are started right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

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
            assert_eq!(v["forwarding"], false, "{v}");
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
