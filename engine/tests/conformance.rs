//! WebSocket conformance as the Autobahn TestSuite judges it: its
//! fuzzingclient cases (framing, pings, reserved bits and opcodes,
//! fragmentation, UTF-8, closing, limits under 1 MiB) against the raw topic
//! socket, run by `tests/conformance.py` through `kosoku`, which drives
//! Autobahn's own case files under Python 3. 0 FAILED cases is the bar. The
//! report stays in `target/conformance/` (`report.json`, and Autobahn's own
//! format under `autobahn/`). `scripts/test` installs `kosoku` in `.venv`
//! and sets FLUXNODE_TEST_PYTHON; without it this test fails with
//! instructions rather than passing vacuously.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

#[test]
fn autobahn_fuzzingclient_cases() {
    let python = std::env::var("FLUXNODE_TEST_PYTHON").unwrap_or_else(|_| {
        let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python");
        if Path::new(venv).exists() {
            venv.to_string()
        } else {
            "python3".to_string()
        }
    });
    let has_kosoku = Command::new(&python).args(["-c", "import kosoku"]).status().map(|s| s.success()).unwrap_or(false);
    assert!(has_kosoku, "{python} has no `kosoku` module: run ./scripts/test, which installs it in .venv");
    // Two shards: the cases' topics land on both, so hand-offs are exercised.
    let node = Node::start(&["--shards", "2"]);
    // target/tmp -> target/conformance, wherever the target directory is.
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("target directory").join("conformance");
    let _ = std::fs::remove_dir_all(&out);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/conformance.py");
    let output = Command::new(&python)
        .arg(script)
        .arg(node.addr())
        .arg("--report")
        .arg(out.join("report.json"))
        .arg("--html")
        .arg(out.join("autobahn"))
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "conformance failed: see the FAILED cases above and {}", out.display());
    assert!(stdout.contains(" 0 FAILED;"), "no summary line: did any case run?");
}
