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
    let second = Command::new(fluxnode_bin())
        .args(["--listen", &first.addr()])
        .env("FLUXNODE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run fluxnode");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "second node: {stderr}");
    assert!(stderr.contains("in use"), "the error names the cause: {stderr}");
    // The first node still serves.
    assert_eq!(first.get("/healthz").0, 200);
}
