//! The real `fluxctl` binary against a real node: topics, durable
//! declaration, publish, reads by key and sequence, stats, errors and exit
//! codes.

#[path = "../../engine/tests/common/mod.rs"]
mod common;

use std::process::Command;

use common::Node;

/// Runs fluxctl against `node`; returns (exit code, stdout, stderr).
fn fluxctl(node: &Node, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fluxctl"))
        .args(["--node", &node.addr()])
        .args(args)
        .output()
        .expect("run fluxctl");
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
}

#[test]
fn an_operator_session() {
    let dir = std::env::temp_dir().join(format!("fluxctl-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let node = Node::start(&["--shards", "2", "--data-dir", dir.to_str().unwrap()]);

    let (code, out, err) = fluxctl(&node, &["topics", "create", "orders", "--max-messages", "1000000"]);
    assert_eq!(code, 0, "{out}{err}");
    for i in 1..=6 {
        let (code, out, err) =
            fluxctl(&node, &["pub", "orders", &format!("event {i}"), "--key", &format!("order-{}", i % 2)]);
        assert_eq!((code, out.trim()), (0, format!("orders seq {i}").as_str()), "{err}");
    }
    let (code, out, _) = fluxctl(&node, &["pub", "chat", "hi"]);
    assert_eq!(code, 0, "{out}");

    let (code, out, _) = fluxctl(&node, &["-o", "json", "topics", "list"]);
    assert_eq!(code, 0);
    let page: serde_json::Value = serde_json::from_str(&out).expect("json");
    let names: Vec<&str> = page["topics"].as_array().unwrap().iter().map(|t| t["topic"].as_str().unwrap()).collect();
    assert_eq!(names, ["chat", "orders"]);
    assert_eq!(page["topics"][1]["durable"]["log_messages"], 6);
    assert!(page["topics"][0].get("durable").is_none());

    let (code, out, _) = fluxctl(&node, &["topics", "show", "orders"]);
    assert_eq!(code, 0);
    assert!(out.contains("durable ack=local") && out.contains("keys              2"), "{out}");

    let (code, out, _) = fluxctl(&node, &["sub", "orders", "--key", "order-1"]);
    assert_eq!(code, 0);
    let seqs: Vec<&str> = out.lines().map(|l| l.split('\t').next().unwrap()).collect();
    assert_eq!(seqs, ["1", "3", "5"], "{out}");

    let (code, out, _) = fluxctl(&node, &["-o", "json", "sub", "orders", "--from", "2", "--count", "4"]);
    assert_eq!(code, 0);
    let got: Vec<u64> =
        out.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"].as_u64().unwrap()).collect();
    assert_eq!(got, [3, 4, 5, 6]);

    let (code, out, _) = fluxctl(&node, &["-o", "json", "stats", "--once"]);
    assert_eq!(code, 0);
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["published"], 7.0, "{out}");

    let hgrm = dir.with_extension("hgrm");
    let svg = dir.with_extension("svg");
    let (code, out, err) =
        fluxctl(&node, &["latency", "--hgrm", hgrm.to_str().unwrap(), "--plot", svg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("p99") && out.contains("deliveries"), "{out}");
    let text = std::fs::read_to_string(&hgrm).unwrap();
    assert!(text.contains("Percentile") && text.contains("#[Max ="), "{text}");
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<polyline"));
    let _ = (std::fs::remove_file(&hgrm), std::fs::remove_file(&svg));

    // Errors: the server's code and a non-zero exit.
    let (code, _, err) = fluxctl(&node, &["topics", "delete", "chat"]);
    assert_eq!(code, 1);
    assert!(err.contains("404 not_durable"), "{err}");
    let (code, _, err) = fluxctl(&node, &["topics", "create", "orders", "--ack", "eventually"]);
    assert_eq!(code, 1, "{err}");
    // A snapshot (the node's default object store: a directory).
    let (code, out, err) = fluxctl(&node, &["-o", "json", "snapshot", "create"]);
    assert_eq!(code, 0, "{err}");
    let made: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(made["topics"], 1, "{out}");
    let (code, out, _) = fluxctl(&node, &["snapshot", "list"]);
    assert!(code == 0 && out.contains(made["id"].as_str().unwrap()), "{out}");
    let (code, out, _) = fluxctl(&node, &["snapshot", "show", "latest"]);
    assert!(code == 0 && out.contains("orders") && out.contains("1..6"), "{out}");
    // Restored offline into an empty data directory, then served by a
    // second node.
    let restored = dir.with_extension("restored");
    let _ = std::fs::remove_dir_all(&restored);
    let objects = dir.join("objects");
    let args = [
        "snapshot",
        "restore",
        "latest",
        "--data-dir",
        restored.to_str().unwrap(),
        "--object-store",
        objects.to_str().unwrap(),
    ];
    let (code, out, err) = fluxctl(&node, &args);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("1 topics") && out.contains("segments"), "{out}");
    let (code, _, err) = fluxctl(&node, &args);
    assert_eq!(code, 1, "a second restore into the same directory is refused: {err}");
    assert!(err.contains("restore only into an empty data directory"), "{err}");
    let second = Node::start(&["--data-dir", restored.to_str().unwrap(), "--object-store", objects.to_str().unwrap()]);
    let (code, out, _) = fluxctl(&second, &["-o", "json", "sub", "orders", "--from", "0", "--count", "6"]);
    assert_eq!(code, 0);
    let got: Vec<String> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["data"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, (1..=6).map(|i| format!("event {i}")).collect::<Vec<_>>());
    drop(second);
    let _ = std::fs::remove_dir_all(&restored);
    let (code, _, _) = fluxctl(&node, &["topics", "delete", "orders"]);
    assert_eq!(code, 0);
    let (code, _, err) = fluxctl(&node, &["--balancer", "127.0.0.1:1", "topology", "show"]);
    assert_eq!(code, 3, "{err}");
    let (code, out, _) = fluxctl(&node, &["completions", "bash"]);
    assert!(code == 0 && out.contains("fluxctl"), "{out}");
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `fluxctl topology cluster` against a cluster of three nodes, one of them
/// killed: the members, their health, the version, a topic's owner and the
/// traffic between nodes.
#[test]
fn topology_cluster_shows_members_health_version_and_owners() {
    let (mut nodes, addrs) = common::start_cluster(3, &["--shards", "1"]);
    let topic = common::topic_owned_by(&nodes, &addrs, "shown", 2);
    // One forwarded publish: node 0 does not own the topic.
    let (code, out, err) = fluxctl(&nodes[0], &["pub", &topic, "hello"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = fluxctl(&nodes[0], &["topology", "cluster", "--topic", &topic]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("membership static, version 1") && out.contains(&format!("owned by {}", addrs[2])), "{out}");
    assert_eq!(out.matches(" ready ").count(), 3, "{out}");
    drop(nodes.remove(1));
    let (code, out, _) = fluxctl(&nodes[0], &["-o", "json", "topology", "cluster"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let health: Vec<&str> = v["members"].as_array().unwrap().iter().map(|m| m["health"].as_str().unwrap()).collect();
    assert_eq!(health.iter().filter(|h| **h == "unreachable").count(), 1, "{out}");
    let forwarded =
        v["members"].as_array().unwrap().iter().find(|m| m["addr"] == addrs[0].as_str()).unwrap()["forwarded"].clone();
    assert_eq!(forwarded, 1, "{out}");
}
