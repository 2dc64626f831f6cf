//! Shared helpers for integration tests: start a real `fluxnode` on
//! 127.0.0.1 with an ephemeral port, speak HTTP over std sockets and
//! WebSocket with `tungstenite` (a client library we did not write).
#![allow(dead_code, clippy::result_large_err)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tungstenite::protocol::WebSocket;
use tungstenite::Message;

/// How long any single wait in a test may take before it fails. Generous:
/// the box is a loaded 2-core machine.
pub const WAIT: Duration = Duration::from_secs(20);

pub type Ws = WebSocket<TcpStream>;

/// A running fluxnode, killed on drop.
pub struct Node {
    pub child: Child,
    pub port: u16,
}

impl Node {
    /// Starts fluxnode with extra flags and waits until /readyz says ready.
    pub fn start(extra: &[&str]) -> Node {
        Node::start_listening("127.0.0.1:0", extra)
    }

    /// Starts fluxnode on a given port (a restart where the last one was).
    pub fn start_on(port: u16, extra: &[&str]) -> Node {
        Node::start_listening(&format!("127.0.0.1:{port}"), extra)
    }

    /// Starts fluxnode on a given port with extra flags and environment
    /// variables.
    pub fn start_on_with_env(port: u16, extra: &[&str], env: &[(&str, &str)]) -> Node {
        Node::start_listening_env(&format!("127.0.0.1:{port}"), extra, env)
    }

    /// Starts fluxnode with extra flags and environment variables.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Node {
        Node::start_listening_env("127.0.0.1:0", extra, env)
    }

    fn start_listening(listen: &str, extra: &[&str]) -> Node {
        Node::start_listening_env(listen, extra, &[])
    }

    fn start_listening_env(listen: &str, extra: &[&str], env: &[(&str, &str)]) -> Node {
        let mut command = Command::new(fluxnode_bin());
        // FLUXNODE_TEST_LOG=info shows the nodes' logs when a test is read.
        let log = std::env::var("FLUXNODE_TEST_LOG").unwrap_or_else(|_| "warn".into());
        command.args(["--listen", listen]).args(extra).env("FLUXNODE_LOG", log);
        for (k, v) in env {
            command.env(k, v);
        }
        let (child, line) = spawn_announced(&mut command);
        let port = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("127.0.0.1:"))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        let node = Node { child, port };
        if extra.contains(&"--proxy-protocol") {
            // Such a node answers only connections that start with a header;
            // probe as FluxBalancer's health checks do (the LOCAL command).
            wait_until("node ready", || {
                let mut stream = TcpStream::connect(node.addr()).expect("connect");
                stream.set_read_timeout(Some(WAIT)).unwrap();
                stream.write_all(b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00GET /readyz HTTP/1.1\r\n\r\n").unwrap();
                read_response(&mut stream).0 == 200
            });
        } else {
            wait_until("node ready", || node.get("/readyz").0 == 200);
        }
        node
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// One HTTP request on a fresh connection; returns status and body.
    pub fn request(&self, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
        http_request(&self.addr(), method, path, content_type, body)
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        self.request("GET", path, "text/plain", b"")
    }

    pub fn get_json(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Original RayFlux publish.
    pub fn legacy_publish(&self, topic: &str, message: &str) -> (u16, serde_json::Value) {
        let body = serde_json::json!({ "topic": topic, "message": message }).to_string();
        let (status, body) = self.request("POST", "/publish", "application/json", body.as_bytes());
        (status, serde_json::from_str(&body).unwrap_or(serde_json::Value::Null))
    }

    /// Subscriber count of a topic as the node reports it (0 if unknown).
    pub fn subscribers(&self, topic: &str) -> u64 {
        let (status, body) = self.get(&format!("/v1/topics/{topic}"));
        if status != 200 {
            return 0;
        }
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["subscribers"].as_u64().unwrap_or(0)
    }

    /// A counter from /metrics.
    pub fn metric(&self, name: &str) -> u64 {
        let (_, body) = self.get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }

    /// Resident memory of the node, KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    pub fn ws(&self, path: &str) -> Ws {
        ws_connect(&self.addr(), path).unwrap_or_else(|e| panic!("connect {path}: {e}"))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns a server that prints one line once it accepts connections (its
/// addresses) and returns it with that line.
pub fn spawn_announced(command: &mut Command) -> (Child, String) {
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn server");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(WAIT).expect("the server printed its address");
    (child, line)
}

/// The fluxnode binary. Inside the engine's tests cargo names it; the
/// balancer's tests find the one built beside them (`cargo test
/// --workspace` builds every package's binaries before running tests).
pub fn fluxnode_bin() -> std::path::PathBuf {
    if let Some(path) = option_env!("CARGO_BIN_EXE_fluxnode") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/fluxnode
    let path = exe.parent().and_then(|deps| deps.parent()).expect("target dir").join("fluxnode");
    assert!(path.exists(), "{} is missing: build it first (cargo build --bin fluxnode, same profile)", path.display());
    path
}

/// One HTTP/1.1 request on a fresh connection; returns status and body.
pub fn http_request(addr: &str, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    read_response(&mut stream)
}

/// Connects a WebSocket client with a read timeout so no test hangs.
pub fn ws_connect(addr: &str, path: &str) -> Result<Ws, tungstenite::Error> {
    let stream = TcpStream::connect(addr).map_err(tungstenite::Error::Io)?;
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_nodelay(true).unwrap();
    let (ws, _) = tungstenite::client(format!("ws://{addr}{path}"), stream).map_err(|e| match e {
        tungstenite::HandshakeError::Failure(e) => e,
        tungstenite::HandshakeError::Interrupted(_) => tungstenite::Error::ConnectionClosed,
    })?;
    Ok(ws)
}

/// Connects a WebSocket client that FluxBalancer relays for `client`: the
/// connection starts with a PROXY v2 header naming it (the node must run
/// with `--proxy-protocol`). The HTTP status when the upgrade is refused.
pub fn ws_connect_as(addr: &str, path: &str, client: std::net::Ipv4Addr) -> Result<Ws, u16> {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut header = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    header.extend_from_slice(&client.octets());
    header.extend_from_slice(&[127, 0, 0, 1, 0xc3, 0x50, 0x1f, 0x90]);
    stream.write_all(&header).unwrap();
    match tungstenite::client(format!("ws://{addr}{path}"), stream) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("upgrade failed without an HTTP answer: {e}"),
    }
}

/// Reads an HTTP response (status and body) until the server closes or
/// the content-length is satisfied.
pub fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut data = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_string();
            let length: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if data.len() >= end + 4 + length {
                let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                let body = String::from_utf8_lossy(&data[end + 4..end + 4 + length]).to_string();
                return (status, body);
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return (0, String::from_utf8_lossy(&data).to_string()),
            Ok(n) => data.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Polls `check` until it holds, failing the test after WAIT.
pub fn wait_until(what: &str, check: impl FnMut() -> bool) {
    assert!(wait_for(check), "timed out waiting for: {what}");
}

/// Polls `check` until it holds (true) or WAIT passes (false), for callers
/// that report more than a message when it does not.
pub fn wait_for(mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + WAIT;
    while !check() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::yield_now();
        std::thread::park_timeout(Duration::from_millis(10));
    }
    true
}

/// SIGTERM (a graceful stop), and waits for the node to exit.
pub fn nix_term(node: &Node) -> bool {
    let pid = node.child.id();
    let sent = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid}");
    wait_for(|| std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z ")))
}

/// Next data message (skips pings/pongs).
pub fn next_data(ws: &mut Ws) -> Message {
    loop {
        match ws.read().expect("read message") {
            Message::Ping(_) | Message::Pong(_) => continue,
            m => return m,
        }
    }
}

/// Next native JSON text frame.
pub fn next_json(ws: &mut Ws) -> serde_json::Value {
    match next_data(ws) {
        Message::Text(t) => serde_json::from_str(&t).unwrap(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// Sends a native request and returns its reply, checking the id.
pub fn native_call(ws: &mut Ws, request: serde_json::Value) -> serde_json::Value {
    let id = request["id"].clone();
    ws.send(Message::text(request.to_string())).unwrap();
    loop {
        let v = next_json(ws);
        if v["type"] == "reply" {
            assert_eq!(v["id"], id, "reply to another request: {v}");
            return v;
        }
    }
}

/// Reads until the server's close frame; returns its code and reason.
pub fn expect_close(ws: &mut Ws) -> (u16, String) {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(frame))) => return (frame.code.into(), frame.reason.to_string()),
            Ok(Message::Close(None)) => return (1005, String::new()),
            Ok(_) => continue,
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
    }
}

/// A topic name that shard `want` of `shards` owns (the node's own hash).
pub fn topic_on_shard(prefix: &str, shards: u64, want: u64) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|t| proto::topic::TopicName::new(t).unwrap().owner_shard(shards as usize) as u64 == want)
        .unwrap()
}

/// Connects a WebSocket and reports the shard that serves it.
pub fn ws_with_shard(addr: &str, path: &str) -> (Ws, u64) {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let (ws, response) = tungstenite::client(format!("ws://{addr}{path}"), stream).map_err(|e| e.to_string()).unwrap();
    let shard =
        response.headers().get("x-rayflux-shard").and_then(|v| v.to_str().ok()?.parse().ok()).expect("shard header");
    (ws, shard)
}

/// Opens WebSockets on `path` until one is served by shard `want`
/// (SO_REUSEPORT spreads connections by hash, so this takes a few tries).
pub fn ws_on_shard(addr: &str, path: &str, want: u64) -> Ws {
    for _ in 0..200 {
        let (ws, shard) = ws_with_shard(addr, path);
        if shard == want {
            return ws;
        }
    }
    panic!("no connection landed on shard {want} in 200 tries");
}

/// A fresh, empty temporary directory for one test (`name` keeps tests
/// apart, the process id keeps runs apart).
pub fn fresh_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fluxnode-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Every message of a durable topic's log (seq -> text data), read page by
/// page through `/messages`; a sequence seen twice fails the test.
pub fn read_log(node: &Node, topic: &str) -> std::collections::BTreeMap<u64, String> {
    let mut all = std::collections::BTreeMap::new();
    let mut from = 0;
    loop {
        let page = node.get_json(&format!("/v1/topics/{topic}/messages?from_seq={from}&limit=10000"));
        for m in page["messages"].as_array().expect("messages") {
            let seq = m["seq"].as_u64().unwrap();
            assert!(all.insert(seq, m["data"].as_str().unwrap_or_default().to_string()).is_none(), "seq {seq} twice");
        }
        match page["next_seq"].as_u64() {
            Some(next) => from = next,
            None => return all,
        }
    }
}

/// A port free at the time of asking (a node is started on it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `n` nodes on 127.0.0.1 that are each other's static peers, each
/// started with `extra` too. The nodes' addresses are in their order.
pub fn start_cluster(n: usize, extra: &[&str]) -> (Vec<Node>, Vec<String>) {
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let nodes = ports
        .iter()
        .zip(&addrs)
        .map(|(port, me)| {
            let mut flags = vec!["--advertise", me.as_str()];
            for a in &addrs {
                flags.extend(["--peer", a.as_str()]);
            }
            flags.extend(extra);
            Node::start_on(*port, &flags)
        })
        .collect();
    (nodes, addrs)
}

/// Which node owns `topic`, as the nodes' `GET /v1/cluster` says.
pub fn owner_index(nodes: &[Node], addrs: &[String], topic: &str) -> usize {
    let owner = nodes[0].get_json(&format!("/v1/cluster?topic={topic}"))["owner"].as_str().unwrap().to_string();
    addrs.iter().position(|a| *a == owner).unwrap()
}

/// A topic named `prefix.N` owned by node `want` of the cluster.
pub fn topic_owned_by(nodes: &[Node], addrs: &[String], prefix: &str, want: usize) -> String {
    let table = proto::maglev::Table::build(addrs, proto::maglev::TABLE_SIZE_DEFAULT).unwrap();
    let topic = (0..)
        .map(|i| format!("{prefix}.{i}"))
        .find(|t| table.lookup(t.as_bytes()) == Some(addrs[want].as_str()))
        .unwrap();
    assert_eq!(owner_index(nodes, addrs, &topic), want, "the nodes and the table disagree on {topic}");
    topic
}

/// A real etcd (Debian's `etcd-server`, 3.4) on loopback with a fresh data
/// directory, killed on drop.
pub struct Etcd {
    pub child: Child,
    pub client_port: u16,
    peer_port: u16,
    pub dir: std::path::PathBuf,
}

impl Etcd {
    /// Starts etcd and waits until it answers.
    pub fn start(name: &str) -> Etcd {
        // A free port can be taken by another test between the check and
        // etcd's bind (tests start many processes at once): etcd then exits,
        // and is started again on other ports.
        for _ in 0..4 {
            let dir = fresh_dir(&format!("etcd-{name}"));
            let (client_port, peer_port) = (free_port(), free_port());
            if let Some(etcd) = Etcd::try_start_in(dir, client_port, peer_port) {
                return etcd;
            }
        }
        panic!("etcd did not start on four pairs of free ports");
    }

    fn start_in(dir: std::path::PathBuf, client_port: u16, peer_port: u16) -> Etcd {
        Etcd::try_start_in(dir, client_port, peer_port).expect("etcd exited at start")
    }

    /// Starts etcd and waits until it answers; `None` if it exited first.
    fn try_start_in(dir: std::path::PathBuf, client_port: u16, peer_port: u16) -> Option<Etcd> {
        let bin = std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let child = Command::new(&bin)
            .args(["--data-dir", dir.to_str().unwrap(), "--name", "test"])
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin} (Debian package etcd-server; .ci/run installs it): {e}"));
        let mut etcd = Etcd { child, client_port, peer_port, dir };
        let mut exited = false;
        wait_until("etcd answers", || {
            exited = etcd.child.try_wait().ok().flatten().is_some();
            exited
                || (TcpStream::connect(etcd.addr()).is_ok()
                    && http_request(&etcd.addr(), "POST", "/v3/kv/range", "application/json", br#"{"key":"AA=="}"#).0
                        == 200)
        });
        (!exited).then_some(etcd)
    }

    /// Its client address, `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// Kills it and starts it again on the same ports and data.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let restarted = Etcd::start_in(self.dir.clone(), self.client_port, self.peer_port);
        let old = std::mem::replace(self, restarted);
        std::mem::forget(old); // its process is gone; its dir is ours now
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Its write-ahead log preallocates 128 MB: gone with the test.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The AWS chain's settings for `moto_server` (any credentials do).
pub const MOTO_ENV: [(&str, &str); 4] = [
    ("AWS_ACCESS_KEY_ID", "test"),
    ("AWS_SECRET_ACCESS_KEY", "test"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

/// A `moto_server` on a free loopback port, killed on drop.
pub struct Moto {
    pub child: Child,
    pub port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    pub fn start() -> Moto {
        let python = std::env::var("FLUXNODE_TEST_PYTHON").expect(
            "FLUXNODE_TEST_PYTHON names the virtualenv's python with moto[server] (./scripts/test prepares it)",
        );
        let server = std::path::PathBuf::from(python).parent().unwrap().join("moto_server");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let moto = Moto { child, port };
        wait_until("moto_server answers", || TcpStream::connect(("127.0.0.1", port)).is_ok());
        moto
    }

    /// A `moto_server` with the bucket `rayflux`.
    pub fn with_bucket() -> Moto {
        let moto = Moto::start();
        // Its port may answer before its application does (a loaded
        // machine): asked until it makes the bucket.
        let mut last = String::new();
        let made = wait_for(|| {
            let (status, body) = http_request(&format!("127.0.0.1:{}", moto.port), "PUT", "/rayflux", "", b"");
            last = format!("{status} {body}");
            // 409: made by an earlier try whose answer was lost.
            status == 200 || status == 409
        });
        assert!(made, "bucket: {last}");
        moto
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig}");
    }
}
