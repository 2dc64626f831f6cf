//! Each shard runs with a descriptor table of its own, so the open-files
//! limit bounds a shard, not the node; topic sockets still reach the shard
//! that owns their topic (the socket crosses tables over the hand-off link).

mod common;

use std::process::Command;

use common::*;
use tungstenite::Message;

/// The open-files limit the node runs under here: small, so that the
/// connections below cannot fit in one table.
const OPEN_FILES: usize = 256;
/// Subscribers per shard: well within one table of `OPEN_FILES`, while both
/// shards' together are not.
const PER_SHARD: usize = 180;
const _: () = assert!(2 * PER_SHARD > OPEN_FILES && PER_SHARD + 64 < OPEN_FILES);

#[test]
fn a_node_holds_more_connections_than_one_descriptor_table() {
    let bin = fluxnode_bin();
    let (child, line) = spawn_announced(
        Command::new("sh")
            .args(["-c", &format!("ulimit -n {OPEN_FILES} && exec \"$0\" \"$@\"")])
            .arg(&bin)
            .args(["--listen", "127.0.0.1:0", "--shards", "2", "--connections-max", "1000"])
            .env("FLUXNODE_LOG", "warn"),
    );
    let port = line.split_whitespace().find_map(|w| w.strip_prefix("127.0.0.1:")).and_then(|p| p.parse().ok());
    let node = Node { child, port: port.unwrap_or_else(|| panic!("no port in {line:?}")) };
    wait_until("node ready", || node.get("/readyz").0 == 200);
    // Topic sockets go to their topic's owner: PER_SHARD on each shard,
    // about half of them handed over from the shard that accepted them.
    let topics = [topic_on_shard("table", 2, 0), topic_on_shard("table", 2, 1)];
    let mut subs = Vec::new();
    for i in 0..2 * PER_SHARD {
        subs.push(node.ws(&format!("/v1/topics/{}/ws?role=sub", topics[i % 2])));
    }
    assert!(node.metric("fluxnode_connections_handed_off_total") >= 1, "no socket crossed tables");
    for topic in &topics {
        node.ws(&format!("/v1/topics/{topic}/ws?role=pub")).send(Message::text(format!("to {topic}"))).unwrap();
    }
    for (i, ws) in subs.iter_mut().enumerate() {
        assert_eq!(next_data(ws), Message::text(format!("to {}", topics[i % 2])), "subscriber {i}");
    }
}
