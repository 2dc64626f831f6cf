//! Interoperability with a client library from another ecosystem: Python
//! `websockets` drives the original RayFlux API and the raw topic socket.
//! `scripts/test` (and so CI) installs it in `.venv` and sets
//! FLUXNODE_TEST_PYTHON; without it this test fails with instructions
//! rather than passing vacuously.

mod common;

use std::process::Command;

use common::*;

#[test]
fn python_websockets_client() {
    let python = std::env::var("FLUXNODE_TEST_PYTHON").unwrap_or_else(|_| {
        let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python");
        if std::path::Path::new(venv).exists() {
            venv.to_string()
        } else {
            "python3".to_string()
        }
    });
    let has_websockets =
        Command::new(&python).args(["-c", "import websockets"]).status().map(|s| s.success()).unwrap_or(false);
    assert!(has_websockets, "{python} has no `websockets` module: run ./scripts/test, which installs it in .venv");
    let node = Node::start(&["--shards", "2"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop.py");
    let output = Command::new(&python).arg(script).arg(node.addr()).output().expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "python interop failed");
    assert!(stdout.contains("original API: 50 messages") && stdout.contains("raw socket: opcodes kept"));
    assert!(stdout.contains("native batches: 500 deliveries in order"));
}
