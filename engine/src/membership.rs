//! The cluster's member set from etcd: the shell around `proto::etcd`.
//! One thread (`fluxnode-members`) keeps this node's member key alive on
//! a lease, reads the member keys, watches them, and publishes each new
//! member set (and whether the node is fenced) in [`ClusterShared`], which
//! every shard polls (`Shard::follow_cluster`). Blocking HTTP/1.1 over
//! `std::net`: four kinds of call, one streaming; no runtime.
//!
//! When etcd cannot be reached the set stays as it was and the lease is
//! retried; once a whole TTL passed without a renewal the node fences
//! itself (it takes no publishes for the topics it owns) until it has
//! registered again. A graceful stop revokes the lease, so the others see
//! the node leave at once.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::cluster::Topology;
use proto::etcd::{self, Members, KEEPALIVE_EVERY_MS, MEMBER_LEASE_TTL_S};
use proto::message::unix_time_ms;

/// How long one call to etcd may take.
const ETCD_CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the watch's reader looks up from the stream (to renew the
/// lease and to see a stop).
const WATCH_POLL: Duration = Duration::from_millis(200);
/// Backoff between attempts to reach etcd.
const ETCD_RETRY: Duration = Duration::from_millis(300);
/// Largest answer accepted from etcd (a member list of thousands of nodes).
const ETCD_BODY_BYTES_MAX: usize = 16 << 20;

/// Member sets kept for shards that have not applied them yet: each shard
/// applies every change in order (a hand-off claims from the owner under
/// the set before, so a skipped set could name the wrong one). A shard
/// more than this many changes behind applies the latest.
const TOPOLOGY_HISTORY_MAX: usize = 64;

/// The member set as the shards see it.
#[derive(Debug)]
pub struct ClusterShared {
    topology: Mutex<Arc<Topology>>,
    /// The last `TOPOLOGY_HISTORY_MAX` sets, oldest first, and the version
    /// of the last set dropped from it (0: none).
    history: Mutex<(std::collections::VecDeque<Arc<Topology>>, u64)>,
    /// The version of `topology`, read without the lock.
    version: AtomicU64,
    /// This node's lease lapsed: it must not act as an owner.
    fenced: AtomicBool,
    /// Set by the node's stop: revoke the lease and end.
    stop: AtomicBool,
    /// The lease is revoked and the set without this node published.
    left: AtomicBool,
}

impl ClusterShared {
    /// The current member set and its version.
    pub fn topology(&self) -> Arc<Topology> {
        self.topology.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The sets after version `seen`, oldest first (only the latest when
    /// more changes than the history holds came since).
    pub fn since(&self, seen: u64) -> Vec<Arc<Topology>> {
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let (sets, dropped) = (&history.0, history.1);
        let after: Vec<Arc<Topology>> = sets.iter().filter(|t| t.version() > seen).cloned().collect();
        if seen < dropped {
            // Changes this shard never saw were dropped: jump to the latest.
            return after.last().cloned().into_iter().collect();
        }
        after
    }

    /// The current version.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Whether this node is fenced.
    pub fn fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Asks the membership thread to revoke the lease and end.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Whether the node has left: its lease revoked and the member set
    /// without it published (so its topics are being given up).
    pub fn left(&self) -> bool {
        self.left.load(Ordering::Acquire)
    }

    fn publish(&self, topology: Topology) {
        let version = topology.version();
        let topology = Arc::new(topology);
        {
            let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
            history.0.push_back(topology.clone());
            if history.0.len() > TOPOLOGY_HISTORY_MAX {
                if let Some(old) = history.0.pop_front() {
                    history.1 = old.version();
                }
            }
        }
        *self.topology.lock().unwrap_or_else(|e| e.into_inner()) = topology;
        self.version.store(version, Ordering::Release);
    }
}

/// Registers this node (`me`) in `cluster` at etcd `endpoint` (host:port)
/// and follows the member set on a thread of its own. Returns once the
/// node is registered and the set read, or an error after `wait`.
pub fn start(
    endpoint: String,
    cluster: &str,
    me: String,
    table_size: usize,
    wait: Duration,
) -> Result<Arc<ClusterShared>, String> {
    let prefix = etcd::members_prefix(cluster);
    let mut members = Members::with_table_size(table_size);
    let deadline = Instant::now() + wait;
    // Every node of the cluster builds the same table, or two nodes could
    // both own a topic: the first node's size stands, a different one is
    // refused (the key stays until an operator deletes it).
    let (key, size) = (etcd::table_size_key(cluster), table_size.to_string());
    let standing = loop {
        let answer = call(&endpoint, "/v3/kv/txn", &etcd::put_if_absent_body(&key, &size))
            .and_then(|body| etcd::parse_put_if_absent(&body, &size).map_err(io::Error::other));
        match answer {
            Ok(standing) => break standing,
            Err(e) if Instant::now() >= deadline => return Err(format!("etcd at {endpoint}: {e}")),
            Err(_) => std::thread::sleep(ETCD_RETRY),
        }
    };
    if standing != size {
        return Err(format!(
            "cluster {cluster} uses an ownership table of {standing} slots (etcd key {key}), this node {size}: \
             start it with --table-size {standing}"
        ));
    }
    let (lease, revision) = loop {
        match register(&endpoint, &prefix, &me, &mut members) {
            Ok(registered) => break registered,
            Err(e) if Instant::now() >= deadline => return Err(format!("etcd at {endpoint}: {e}")),
            Err(_) => std::thread::sleep(ETCD_RETRY),
        }
    };
    let topology = members.topology().map_err(|e| e.to_string())?;
    let topology = Arc::new(topology);
    let shared = Arc::new(ClusterShared {
        history: Mutex::new((std::collections::VecDeque::from([topology.clone()]), 0)),
        topology: Mutex::new(topology),
        version: AtomicU64::new(members.version()),
        fenced: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        left: AtomicBool::new(false),
    });
    let thread_shared = shared.clone();
    std::thread::Builder::new()
        .name("fluxnode-members".into())
        .spawn(move || follow(endpoint, prefix, me, members, lease, revision, &thread_shared))
        .map_err(|e| e.to_string())?;
    Ok(shared)
}

/// Grants a lease, puts this node's key on it and reads the set. Returns
/// the lease and the revision read.
fn register(endpoint: &str, prefix: &str, me: &str, members: &mut Members) -> io::Result<(u64, u64)> {
    let lease =
        etcd::parse_lease_grant(&call(endpoint, "/v3/lease/grant", &etcd::lease_grant_body(MEMBER_LEASE_TTL_S))?)
            .map_err(io::Error::other)?;
    call(endpoint, "/v3/kv/put", &etcd::put_member_body(prefix, me, lease))?;
    members.renewed(unix_time_ms());
    let (revision, kvs) =
        etcd::parse_range(&call(endpoint, "/v3/kv/range", &etcd::range_body(prefix))?).map_err(io::Error::other)?;
    members.reset(revision, kvs);
    Ok((lease, revision))
}

/// The thread: watch, renew, re-register, until the node stops.
fn follow(
    endpoint: String,
    prefix: String,
    me: String,
    mut members: Members,
    mut lease: u64,
    mut revision: u64,
    shared: &ClusterShared,
) {
    loop {
        let outcome = watch(&endpoint, &prefix, lease, revision, &mut members, shared);
        if shared.stop.load(Ordering::Acquire) {
            leave(&endpoint, &prefix, lease, &mut members, shared);
            return;
        }
        if let Err(e) = outcome {
            tracing::warn!("etcd membership: {e}; registering again");
        }
        // Registers again (a new lease if the old one lapsed), retrying
        // until etcd answers; fenced meanwhile once a TTL has passed.
        loop {
            if shared.stop.load(Ordering::Acquire) {
                leave(&endpoint, &prefix, lease, &mut members, shared);
                return;
            }
            let before = members.version();
            match register(&endpoint, &prefix, &me, &mut members) {
                Ok((l, r)) => {
                    (lease, revision) = (l, r);
                    if members.version() != before {
                        publish(&members, shared);
                    }
                    shared.fenced.store(false, Ordering::Release);
                    break;
                }
                Err(_) => {
                    if members.fenced(unix_time_ms()) && !shared.fenced.swap(true, Ordering::AcqRel) {
                        tracing::warn!("etcd unreachable for a whole lease TTL: fenced (no topic owned here)");
                    }
                    std::thread::sleep(ETCD_RETRY);
                }
            }
        }
    }
}

/// Revokes the lease and publishes the set without this node (read back
/// from etcd; without it when etcd cannot be read), so that this node gives
/// its topics up to their next owners while it drains.
fn leave(endpoint: &str, prefix: &str, lease: u64, members: &mut Members, shared: &ClusterShared) {
    let revoked = call(endpoint, "/v3/lease/revoke", &etcd::lease_body(lease));
    let read = call(endpoint, "/v3/kv/range", &etcd::range_body(prefix)).ok().and_then(|b| etcd::parse_range(&b).ok());
    if let (Ok(_), Some((revision, kvs))) = (revoked, read) {
        if members.reset(revision, kvs) {
            publish(members, shared);
        }
        tracing::info!("left the cluster (lease revoked)");
    } else {
        tracing::warn!("left the cluster without etcd: the others see it go when its lease expires");
    }
    shared.left.store(true, Ordering::Release);
}

fn publish(members: &Members, shared: &ClusterShared) {
    match members.topology() {
        Ok(topology) => {
            tracing::info!(version = topology.version(), members = ?topology.members(), "member set");
            shared.publish(topology);
        }
        Err(e) => tracing::warn!("member set unusable: {e}"),
    }
}

/// Watches the member keys after `revision` and renews `lease` on the
/// way; returns when the stream or the lease fails, or the node stops.
fn watch(
    endpoint: &str,
    prefix: &str,
    lease: u64,
    revision: u64,
    members: &mut Members,
    shared: &ClusterShared,
) -> io::Result<()> {
    let mut stream = open(endpoint)?;
    let body = etcd::watch_body(prefix, revision + 1);
    stream.write_all(request(endpoint, "/v3/watch", &body).as_bytes())?;
    stream.set_read_timeout(Some(WATCH_POLL))?;
    let mut reader = BufReader::new(stream);
    read_head(&mut reader)?;
    let mut chunks = Chunks::default();
    let mut renewed = Instant::now();
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return Ok(());
        }
        if renewed.elapsed() >= Duration::from_millis(KEEPALIVE_EVERY_MS) {
            let alive = etcd::parse_keepalive(&call(endpoint, "/v3/lease/keepalive", &etcd::lease_body(lease))?)
                .map_err(io::Error::other)?;
            if !alive {
                return Err(io::Error::other("lease expired"));
            }
            members.renewed(unix_time_ms());
            renewed = Instant::now();
        }
        match chunks.read_line(&mut reader) {
            Ok(Some(line)) => {
                let update = etcd::parse_watch(&line).map_err(io::Error::other)?;
                if update.canceled {
                    return Err(io::Error::other("watch cancelled"));
                }
                if members.apply(&update) {
                    publish(members, shared);
                }
            }
            Ok(None) => return Err(io::Error::other("watch stream ended")),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e),
        }
    }
}

/// A chunked response body read line by line (the gateway writes one JSON
/// object per chunk, each ending in a newline). Keeps partial input across
/// read timeouts.
#[derive(Default)]
struct Chunks {
    /// Bytes of the current chunk still to read.
    left: usize,
    /// Body bytes read, not yet a whole line.
    line: Vec<u8>,
    /// A chunk-size line being read.
    size_line: Vec<u8>,
}

impl Chunks {
    /// The next whole line of the body; `None` at its end.
    fn read_line(&mut self, reader: &mut BufReader<TcpStream>) -> io::Result<Option<String>> {
        loop {
            if let Some(at) = self.line.iter().position(|&b| b == b'\n') {
                let rest = self.line.split_off(at + 1);
                let line = std::mem::replace(&mut self.line, rest);
                let text = String::from_utf8_lossy(&line).trim().to_string();
                if text.is_empty() {
                    continue;
                }
                return Ok(Some(text));
            }
            if self.left == 0 {
                reader.read_until(b'\n', &mut self.size_line)?;
                if !self.size_line.ends_with(b"\n") {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                let text = String::from_utf8_lossy(&self.size_line).trim().to_string();
                self.size_line.clear();
                if text.is_empty() {
                    continue; // the CRLF after a chunk's data
                }
                let size = usize::from_str_radix(text.split(';').next().unwrap_or(""), 16)
                    .map_err(|_| io::Error::other(format!("bad chunk size {text:?}")))?;
                if size == 0 {
                    return Ok(None);
                }
                if self.line.len() + size > ETCD_BODY_BYTES_MAX {
                    return Err(io::Error::other("watch message too long"));
                }
                self.left = size;
            }
            let mut buf = vec![0u8; self.left.min(64 << 10)];
            let n = reader.read(&mut buf)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.line.extend_from_slice(&buf[..n]);
            self.left -= n;
        }
    }
}

fn open(endpoint: &str) -> io::Result<TcpStream> {
    let addr = std::net::ToSocketAddrs::to_socket_addrs(endpoint)?
        .next()
        .ok_or_else(|| io::Error::other(format!("{endpoint} resolves to nothing")))?;
    let stream = TcpStream::connect_timeout(&addr, ETCD_CALL_TIMEOUT)?;
    stream.set_write_timeout(Some(ETCD_CALL_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn request(endpoint: &str, path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: {endpoint}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Reads a response head; returns whether the body is chunked, and its
/// length otherwise. A status other than 200 is an error.
fn read_head(reader: &mut BufReader<TcpStream>) -> io::Result<(bool, usize)> {
    let mut status = String::new();
    reader.read_line(&mut status)?;
    if !status.starts_with("HTTP/1.1 200") {
        return Err(io::Error::other(format!("etcd answered {}", status.trim())));
    }
    let (mut chunked, mut length) = (false, 0);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim().to_ascii_lowercase();
        if line.is_empty() {
            return Ok((chunked, length));
        }
        if let Some(v) = line.strip_prefix("content-length:") {
            length = v.trim().parse().map_err(|_| io::Error::other("bad content-length"))?;
        }
        if line.starts_with("transfer-encoding:") && line.contains("chunked") {
            chunked = true;
        }
    }
}

/// One unary call: POST `body` to `path`, the answer's body.
fn call(endpoint: &str, path: &str, body: &str) -> io::Result<String> {
    let mut stream = open(endpoint)?;
    stream.set_read_timeout(Some(ETCD_CALL_TIMEOUT))?;
    stream.write_all(request(endpoint, path, body).as_bytes())?;
    let mut reader = BufReader::new(stream);
    let (chunked, length) = read_head(&mut reader)?;
    if chunked {
        let mut chunks = Chunks::default();
        let mut out = String::new();
        while let Some(line) = chunks.read_line(&mut reader)? {
            out.push_str(&line);
        }
        return Ok(out);
    }
    if length > ETCD_BODY_BYTES_MAX {
        return Err(io::Error::other("answer too long"));
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(String::from_utf8_lossy(&body).to_string())
}

/// How long a stopping node keeps accepting connections (the links of the
/// nodes taking its topics over) and waits for its topics to be claimed
/// before it drains.
const HANDOFF_DRAIN_WAIT: Duration = Duration::from_secs(3);

/// Longest a stopping node waits while a durable topic it gave up still
/// has records to upload (past `HANDOFF_DRAIN_WAIT`): they must be in the
/// object store for the topic's next owner. A store slower than this
/// leaves them on this node's disk (the next owner starts a new epoch).
const DURABLE_DRAIN_WAIT: Duration = Duration::from_secs(15);

/// How often a shard looks for a new member set and drives its claims.
const CLUSTER_POLL: Duration = Duration::from_millis(50);

impl crate::shard::Shard {
    /// Whether a stopping shard may stop accepting connections: at once
    /// outside a cluster; in one, once the node has left the member set and
    /// the nodes taking its topics over have claimed them (or
    /// `HANDOFF_DRAIN_WAIT` passed): they connect to claim.
    pub(crate) fn may_stop_accepting(&self) -> bool {
        if !self.shutting_down() {
            return false;
        }
        let Some(cluster) = self.node.cluster.get() else { return true };
        self.node.ready.store(false, Ordering::Release);
        cluster.stop();
        let since = *self.leaving_since.get_or_init(Instant::now);
        let me = self.config.advertise();
        let broker = self.broker.borrow();
        let member = broker.topology().is_some_and(|t| t.members().iter().any(|m| m == me));
        if cluster.left() && !member && broker.handing_over() == 0 && !self.handed_over.replace(true) {
            self.node.handed_over.fetch_add(1, Ordering::AcqRel);
        }
        // Every shard keeps its links open until all are done: a claim may
        // come in on one shard for a topic of another.
        let done = self.node.handed_over.load(Ordering::Acquire) >= self.shards
            && self.node.claims_unanswered.load(Ordering::Acquire) == 0;
        let waited = since.elapsed();
        let bit = 1u64 << self.id;
        if broker.durable_uploads_pending() {
            self.node.uploading_shards.fetch_or(bit, Ordering::AcqRel);
        } else {
            self.node.uploading_shards.fetch_and(!bit, Ordering::AcqRel);
        }
        let uploading = self.node.uploading_shards.load(Ordering::Acquire) != 0 && waited < DURABLE_DRAIN_WAIT;
        if done || (waited >= HANDOFF_DRAIN_WAIT && !uploading) {
            tracing::info!(shard = self.id, unclaimed = broker.handing_over(), "left the cluster");
            return true;
        }
        false
    }

    /// Follows the member set for the shard's life: hands each new set to
    /// the broker (topics move), fences it while the lease is lapsed, and
    /// ticks its claims.
    pub(crate) async fn follow_cluster(self: std::rc::Rc<Self>, cluster: Arc<ClusterShared>) {
        let mut seen = cluster.version();
        let mut fenced = false;
        // Also while the node drains: it gives its topics up then.
        loop {
            glommio::timer::sleep(CLUSTER_POLL).await;
            let now = proto::message::Now::read();
            let version = cluster.version();
            let is_fenced = cluster.fenced();
            {
                let mut broker = self.broker.borrow_mut();
                if version != seen {
                    // Every change in order, as etcd's watch gave them.
                    for topology in cluster.since(seen) {
                        let topology = (*topology).clone();
                        seen = topology.version();
                        tracing::info!(shard = self.id, version = seen, members = ?topology.members(), "topology changed");
                        broker.set_topology(topology, now);
                    }
                    if self.id == 0 {
                        self.metrics.topology_version.set(seen);
                    }
                }
                if is_fenced != fenced {
                    fenced = is_fenced;
                    broker.set_fenced(fenced);
                }
                broker.cluster_tick(now);
            }
            self.apply();
        }
    }
}
