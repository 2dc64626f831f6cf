//! The data plane: one piper thread per shard, started by the shard on its
//! own core and in its descriptor table, runs an edge-triggered epoll loop
//! (mio) over that shard's listener and every connection it accepted. A
//! connection goes through four stages, each a plain state driven by
//! socket events and deadlines:
//!
//! 1. `Head`: read until [`route::route_key`] names a key (400, 431, or 408
//!    at `head_timeout_ms`).
//! 2. `Connecting`: a non-blocking connect to the node the view's table
//!    picks; on refusal or `connect_timeout_ms`, to the node the table
//!    without the failed ones picks, up to `CONNECT_ATTEMPTS_MAX` (502 when
//!    all fail, 503 with no routable node).
//! 3. `Sending`: the optional PROXY v2 header and the head bytes.
//! 4. `Piping`: a [`Tunnel`] until both sides are done, an error, or a
//!    whole idle period without a byte.
//!
//! Refusals are `Answering`: the error response, then close.
//!
//! Why not glommio for this (ARCHITECTURE.md has the figures): glommio arms
//! a one-shot poll on its ring for every read that finds no data, and parks
//! its executor between bursts with a `membarrier` IPI each time; the
//! balancer entered the kernel 4 times as often as HAProxy's `epoll_wait`
//! for the same chunks, and 16.7 ring entries per short connection. Here
//! each socket is registered once, edge-triggered, and one `epoll_wait`
//! returns every ready socket. The shard's glommio executor keeps the
//! control plane (health checks, DNS, the admin API) and the drain.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use proto::proxy_protocol;

use crate::admin::client_error;
use crate::config::Config;
use crate::limits::{
    ACCEPT_RETRY_MS, CONNECT_ATTEMPTS_MAX, FALLBACK_TABLES_MAX, PIPE_CHUNK_BYTES, PIPE_EVENTS_PER_WAIT,
    PIPE_STATS_FLUSH_MS,
};
use crate::membership::{FallbackTable, View};
use crate::route::{self, HeadError, RouteKey};
use crate::stats::{self, NodeStats, ShardStats};
use crate::tunnel::Tunnel;

/// What the shard tells its piper between events.
#[derive(Debug, Default)]
struct Inbox {
    /// A newer view to route by.
    view: Option<Arc<View>>,
    /// Stop accepting (shutdown began); open connections go on.
    stop_accepting: bool,
}

/// The shard's handle on its piper thread.
#[derive(Debug)]
pub struct Piper {
    inbox: Arc<Mutex<Inbox>>,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Tokens: the waker, the listener, and per connection `8 * index + 2 *
/// attempt + side` (side 0 the client, 1 the node; the attempt keeps a
/// late event of a failed connect off the next one's socket).
const WAKER: Token = Token(usize::MAX);
const LISTENER: Token = Token(usize::MAX - 1);
const _: () = assert!(CONNECT_ATTEMPTS_MAX <= 4, "the attempt takes two bits of a token");

fn token(index: usize, attempt: usize, side: usize) -> Token {
    Token(8 * index + 2 * attempt + side)
}

impl Piper {
    /// Starts the piper of shard `shard` on `listener` (bound, listening).
    /// Call on the shard's thread: the new thread shares its core
    /// (affinity) and its descriptor table.
    pub fn start(
        shard: usize,
        listener: socket2::Socket,
        config: Arc<Config>,
        view: Arc<View>,
        shard_stats: Arc<ShardStats>,
    ) -> io::Result<Piper> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(listener.into());
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let inbox: Arc<Mutex<Inbox>> = Arc::default();
        let stop: Arc<AtomicBool> = Arc::default();
        let mut piping = Piping {
            poll,
            listener: Some(listener),
            conns: Vec::new(),
            free: Vec::new(),
            freed: Vec::new(),
            scratch: vec![0; PIPE_CHUNK_BYTES].into_boxed_slice(),
            per_shard_max: config.connections_per_shard_max() as u64,
            config,
            view,
            fallbacks: VecDeque::new(),
            deadlines: BinaryHeap::new(),
            generation: 0,
            shard,
            shard_stats,
            inbox: inbox.clone(),
            stop: stop.clone(),
            accept_retry_at: None,
        };
        let thread = std::thread::Builder::new().name(format!("fluxbalancer-pipe-{shard}")).spawn(move || {
            // A panic must not leave the shard with a dead data plane that
            // still looks alive: whatever ends the loop, everything closes.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| piping.run())) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(shard, "piper stopped: {e}"),
                Err(_) => tracing::error!(shard, "piper panicked"),
            }
            piping.close_all();
        })?;
        Ok(Piper { inbox, waker, stop, thread: Mutex::new(Some(thread)) })
    }

    /// Routes new connections by `view` from now on (if it is newer).
    pub fn install(&self, view: Arc<View>) {
        let mut inbox = lock(&self.inbox);
        // Two publishes may reach the shard out of order: keep the newer.
        if inbox.view.as_ref().is_none_or(|pending| view.generation > pending.generation) {
            inbox.view = Some(view);
        }
        drop(inbox);
        self.wake();
    }

    /// Closes the listener; open connections go on.
    pub fn stop_accepting(&self) {
        lock(&self.inbox).stop_accepting = true;
        self.wake();
    }

    /// Stops the thread and closes every connection it holds; waits for it.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake();
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }

    fn wake(&self) {
        // mio's eventfd waker handles a full counter itself.
        if let Err(e) = self.waker.wake() {
            tracing::error!("piper wake failed: {e}");
        }
    }
}

impl Drop for Piper {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `now + d`, or a year from now for a `d` too large to add (a timeout
/// the config let through must not panic the data plane).
fn after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d).unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// A poisoned lock only means a panic elsewhere; the data is plain.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A fallback table, by view generation and failed node indices.
type CachedFallback = (u64, Vec<usize>, Arc<FallbackTable>);

/// The piper thread's state.
struct Piping {
    poll: Poll,
    /// None once shutdown began.
    listener: Option<TcpListener>,
    /// Connections by index; a closed one leaves `None`.
    conns: Vec<Option<Conn>>,
    /// Indices free for new connections.
    free: Vec<usize>,
    /// Indices closed during this batch of events: free after it, so that
    /// a late event in the batch cannot reach a new connection.
    freed: Vec<usize>,
    scratch: Box<[u8]>,
    config: Arc<Config>,
    per_shard_max: u64,
    /// The view new connections are routed by.
    view: Arc<View>,
    /// Tables without failed nodes, keyed by view generation and the failed
    /// node indices (sorted); at most `FALLBACK_TABLES_MAX`.
    fallbacks: VecDeque<CachedFallback>,
    /// Head and connect deadlines: (when, index, generation). Stale entries
    /// (the connection moved on or closed) are skipped when they come up,
    /// not removed early, so the heap holds one entry per connection
    /// accepted (and per connect tried) within the last `head_timeout_ms`
    /// (`connect_timeout_ms`): at 6,000 connections/s and the 10 s default,
    /// about 60,000 entries of 32 bytes.
    deadlines: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    /// Numbers connections, so that a deadline finds only its own.
    generation: u64,
    shard: usize,
    shard_stats: Arc<ShardStats>,
    inbox: Arc<Mutex<Inbox>>,
    stop: Arc<AtomicBool>,
    /// When to try `accept` again after it failed (descriptors or memory).
    accept_retry_at: Option<Instant>,
}

/// One accepted connection: its stage holds its sockets.
struct Conn {
    generation: u64,
    stage: Stage,
}

enum Stage {
    /// Reading the request head.
    Head { client: TcpStream, head: Vec<u8>, peer: SocketAddr, deadline: Instant },
    /// Connecting to a node.
    Connecting(Connecting),
    /// Writing the PROXY header and the head to the node.
    Sending(Sending),
    /// Copying both ways.
    Piping(Tunnel),
    /// Writing an error response, then closing.
    Answering { client: TcpStream, response: Vec<u8>, written: usize },
    /// Only while a handler holds the stage's parts.
    Moving,
}

struct Sending {
    client: TcpStream,
    node: TcpStream,
    first: Vec<u8>,
    written: usize,
    node_stats: Arc<NodeStats>,
}

/// What carries from one connect attempt to the next.
struct Attempts {
    client: TcpStream,
    head: Vec<u8>,
    peer: SocketAddr,
    hash_input: Vec<u8>,
    view: Arc<View>,
    /// Node indices (into `view`) that failed, sorted.
    failed: Vec<usize>,
}

struct Connecting {
    attempts: Attempts,
    attempt: usize,
    /// The node tried (index into the view).
    index: usize,
    node: TcpStream,
    deadline: Instant,
}

/// What one event means for a connection's socket.
#[derive(Clone, Copy)]
struct Ready {
    readable: bool,
    writable: bool,
    /// The peer closed or the socket failed: read to the end.
    closed: bool,
}

impl Piping {
    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(PIPE_EVENTS_PER_WAIT);
        let flush_every = Duration::from_millis(PIPE_STATS_FLUSH_MS);
        let idle = self.config.tunnel_idle_timeout();
        let mut next_flush = after(flush_every);
        let mut next_sweep = after(idle);
        loop {
            let now = Instant::now();
            if now >= next_flush {
                self.flush_stats();
                next_flush = now + flush_every;
            }
            if now >= next_sweep {
                self.sweep_idle();
                next_sweep = after(idle);
            }
            self.expire(now);
            if self.accept_retry_at.is_some_and(|at| now >= at) {
                self.accept_retry_at = None;
                self.accept();
            }
            let mut wake_at = next_flush.min(next_sweep);
            if let Some(at) = self.accept_retry_at {
                wake_at = wake_at.min(at);
            }
            if let Some(Reverse((when, _, _))) = self.deadlines.peek() {
                wake_at = wake_at.min(*when);
            }
            // (mio rounds the wait up to whole milliseconds: no spinning
            // just before a deadline.)
            let wait = wake_at.saturating_duration_since(now);
            match self.poll.poll(&mut events, Some(wait)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let mut woken = false;
            for event in events.iter() {
                match event.token() {
                    WAKER => woken = true,
                    LISTENER => self.accept(),
                    Token(t) => {
                        let broken = event.is_error() || event.is_write_closed();
                        let ready = Ready {
                            readable: event.is_readable() || event.is_read_closed() || broken,
                            writable: event.is_writable() || broken,
                            closed: event.is_read_closed() || broken,
                        };
                        self.on_event(t / 8, (t / 2) % 4, t % 2, ready);
                    }
                }
            }
            self.free.append(&mut self.freed);
            if woken {
                if self.stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                self.read_inbox();
            }
        }
    }

    fn read_inbox(&mut self) {
        let (view, stop_accepting) = {
            let mut inbox = lock(&self.inbox);
            (inbox.view.take(), inbox.stop_accepting)
        };
        if let Some(view) = view {
            if view.generation > self.view.generation {
                tracing::debug!(shard = self.shard, generation = view.generation, nodes = view.addrs.len(), "new view");
                self.view = view;
                self.fallbacks.clear();
            }
        }
        if stop_accepting {
            self.listener = None; // closing it takes it out of the epoll set
        }
    }

    /// Accepts every waiting connection (edge-triggered: until none is left).
    fn accept(&mut self) {
        loop {
            let Some(listener) = &self.listener else { return };
            let (mut client, peer) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors or memory: try again shortly (no
                    // new edge comes for connections already queued).
                    tracing::warn!(shard = self.shard, "accept failed: {e}");
                    self.accept_retry_at = Some(after(Duration::from_millis(ACCEPT_RETRY_MS)));
                    return;
                }
            };
            if stats::get(&self.shard_stats.connections_current) >= self.per_shard_max {
                stats::add(&self.shard_stats.connections_rejected, 1);
                // One send into a fresh socket's empty buffer; then closed.
                let refusal = client_error(503, "overloaded", "balancer connection limit reached");
                let _ = (&client).write(&refusal);
                continue;
            }
            stats::add(&self.shard_stats.connections_current, 1);
            stats::add(&self.shard_stats.connections_total, 1);
            let _ = client.set_nodelay(true);
            let index = self.free.pop().unwrap_or(self.conns.len());
            if index == self.conns.len() {
                self.conns.push(None);
            }
            self.generation += 1;
            let deadline = after(self.config.head_timeout());
            let interest = Interest::READABLE | Interest::WRITABLE;
            if let Err(e) = self.poll.registry().register(&mut client, token(index, 0, 0), interest) {
                tracing::warn!(shard = self.shard, "connection not registered: {e}");
                stats::sub(&self.shard_stats.connections_current, 1);
                self.free.push(index);
                continue;
            }
            let stage = Stage::Head { client, head: Vec::new(), peer, deadline };
            self.deadlines.push(Reverse((deadline, index, self.generation)));
            self.conns[index] = Some(Conn { generation: self.generation, stage });
        }
    }

    /// Acts on the head and connect deadlines that have passed.
    fn expire(&mut self, now: Instant) {
        while let Some(&Reverse((when, index, generation))) = self.deadlines.peek() {
            if when > now {
                return;
            }
            self.deadlines.pop();
            let Some(conn) = self.conns.get_mut(index).and_then(Option::take) else { continue };
            if conn.generation != generation {
                self.conns[index] = Some(conn);
                continue;
            }
            let next = self.on_deadline(index, conn, now);
            self.put_back(index, next);
        }
    }

    fn on_deadline(&mut self, index: usize, mut conn: Conn, now: Instant) -> Option<Conn> {
        match std::mem::replace(&mut conn.stage, Stage::Moving) {
            Stage::Head { client, deadline, .. } if deadline <= now => {
                stats::add(&self.shard_stats.head_timeouts, 1);
                self.answer(conn, client, 408, "timeout", "request head not received in time")
            }
            Stage::Connecting(connecting) if connecting.deadline <= now => {
                let addr = connecting.attempts.view.addrs[connecting.index];
                tracing::debug!(shard = self.shard, node = %addr, "connect timed out");
                self.connect_failed(index, conn, connecting)
            }
            stage => {
                conn.stage = stage; // an older deadline of a stage that moved on
                Some(conn)
            }
        }
    }

    fn on_event(&mut self, index: usize, attempt: usize, side: usize, ready: Ready) {
        // The hot path: a tunnel is served where it lies.
        if let Some(Some(Conn { stage: Stage::Piping(tunnel), .. })) = self.conns.get_mut(index) {
            let mut outcome = Ok(());
            if ready.writable {
                // Room on `side`: write what the other side read for it,
                // then let the other side read again.
                outcome = tunnel.resume(1 - side, &mut self.scratch);
            }
            if ready.readable && outcome.is_ok() {
                outcome = tunnel.pump(side, &mut self.scratch, ready.closed);
            }
            if outcome.is_err() {
                tunnel.shut_both();
            } else if !tunnel.done() {
                return;
            }
            if let Some(Conn { stage: Stage::Piping(tunnel), .. }) = self.conns[index].take() {
                self.close_piped(tunnel);
                self.freed.push(index);
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(index).and_then(Option::take) else {
            return; // closed earlier
        };
        let next = self.step(index, attempt, side, ready, conn);
        self.put_back(index, next);
    }

    /// A connection back in its slot, or the slot freed after the batch.
    fn put_back(&mut self, index: usize, conn: Option<Conn>) {
        match conn {
            Some(conn) => self.conns[index] = Some(conn),
            None => self.freed.push(index),
        }
    }

    fn step(&mut self, index: usize, attempt: usize, side: usize, ready: Ready, mut conn: Conn) -> Option<Conn> {
        match std::mem::replace(&mut conn.stage, Stage::Moving) {
            Stage::Head { client, head, peer, deadline } if side == 0 && ready.readable => {
                self.read_head(index, conn, client, head, peer, deadline)
            }
            Stage::Connecting(connecting) if side == 1 && attempt == connecting.attempt && ready.writable => {
                self.connect_ready(index, conn, connecting)
            }
            Stage::Sending(sending) if side == 1 && ready.writable => self.send_first(conn, sending),
            Stage::Answering { client, response, written } if side == 0 && ready.writable => {
                self.write_answer(conn, client, response, written)
            }
            stage => {
                // Nothing to do for this event in this stage: bytes from
                // the client wait in the kernel until piping starts (and
                // reads to the end), a late event of an old attempt is
                // ignored.
                conn.stage = stage;
                Some(conn)
            }
        }
    }

    fn read_head(
        &mut self,
        index: usize,
        mut conn: Conn,
        mut client: TcpStream,
        mut head: Vec<u8>,
        peer: SocketAddr,
        deadline: Instant,
    ) -> Option<Conn> {
        loop {
            let n = match client.read(&mut self.scratch) {
                Ok(0) => {
                    tracing::debug!(shard = self.shard, client = %peer, "client left before its request head ended");
                    return self.close(conn);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.close(conn),
            };
            head.extend_from_slice(&self.scratch[..n]);
            match route::route_key(&head, peer.ip()) {
                Ok(Some(key)) => {
                    let counter = match &key {
                        RouteKey::Topic(_) => &self.shard_stats.routed_topic,
                        RouteKey::Key(_) => &self.shard_stats.routed_key,
                        RouteKey::Client(_) => &self.shard_stats.routed_client,
                    };
                    stats::add(counter, 1);
                    let view = self.view.clone();
                    let connecting =
                        Attempts { client, head, peer, hash_input: key.hash_input(), view, failed: Vec::new() };
                    return self.connect(index, conn, connecting, 0);
                }
                Ok(None) => {}
                Err(e) => {
                    stats::add(&self.shard_stats.head_errors, 1);
                    let (status, code) = match e {
                        HeadError::Malformed => (400, "bad_request"),
                        HeadError::TooLarge => (431, "head_too_large"),
                    };
                    return self.answer(conn, client, status, code, &e.to_string());
                }
            }
        }
        conn.stage = Stage::Head { client, head, peer, deadline };
        Some(conn)
    }

    /// Starts attempt `attempt`: the key's node, or after failures the node
    /// the table without the failed ones picks (which is where the key lands
    /// once health checks take them out).
    fn connect(&mut self, index: usize, mut conn: Conn, mut attempts: Attempts, mut attempt: usize) -> Option<Conn> {
        while attempt < CONNECT_ATTEMPTS_MAX {
            let view = attempts.view.clone();
            let node_index = if attempt == 0 {
                view.table.lookup_index(&attempts.hash_input)
            } else {
                self.fallback(&view, &attempts.failed)
                    .and_then(|f| f.table.lookup_index(&attempts.hash_input).map(|i| f.indices[i]))
            };
            let Some(node_index) = node_index else { break };
            let addr = view.addrs[node_index];
            let started = TcpStream::connect(addr).and_then(|mut node| {
                let interest = Interest::READABLE | Interest::WRITABLE;
                self.poll.registry().register(&mut node, token(index, attempt, 1), interest)?;
                Ok(node)
            });
            match started {
                Ok(node) => {
                    let deadline = after(self.config.connect_timeout());
                    self.deadlines.push(Reverse((deadline, index, conn.generation)));
                    conn.stage = Stage::Connecting(Connecting { attempts, attempt, index: node_index, node, deadline });
                    return Some(conn);
                }
                Err(e) => {
                    tracing::debug!(shard = self.shard, node = %addr, "connect failed: {e}");
                    stats::add(&view.stats[node_index].connect_failures, 1);
                    attempts.failed.push(node_index);
                    attempts.failed.sort_unstable();
                    attempt += 1;
                }
            }
        }
        if attempts.failed.is_empty() {
            stats::add(&self.shard_stats.no_node, 1);
            self.answer(conn, attempts.client, 503, "no_node", "no routable node")
        } else {
            stats::add(&self.shard_stats.node_unreachable, 1);
            self.answer(conn, attempts.client, 502, "node_unreachable", "no node accepted the connection")
        }
    }

    /// The node's socket became writable: connected, or failed.
    fn connect_ready(&mut self, index: usize, mut conn: Conn, connecting: Connecting) -> Option<Conn> {
        let failed = match connecting.node.take_error() {
            Ok(Some(e)) | Err(e) => Some(e),
            Ok(None) => match connecting.node.peer_addr() {
                Ok(_) => None,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    conn.stage = Stage::Connecting(connecting); // not yet
                    return Some(conn);
                }
                Err(e) => Some(e),
            },
        };
        if let Some(e) = failed {
            let addr = connecting.attempts.view.addrs[connecting.index];
            tracing::debug!(shard = self.shard, node = %addr, "connect failed: {e}");
            return self.connect_failed(index, conn, connecting);
        }
        let Connecting { attempts, attempt, index: node_index, node, .. } = connecting;
        let Attempts { client, head, peer, view, .. } = attempts;
        if attempt > 0 {
            stats::add(&self.shard_stats.rerouted, 1);
        }
        let _ = node.set_nodelay(true);
        tracing::debug!(shard = self.shard, client = %peer, node = %view.addrs[node_index], "piping");
        let node_stats = view.stats[node_index].clone();
        stats::add(&node_stats.connections_current, 1);
        stats::add(&node_stats.connections_total, 1);
        stats::add(&node_stats.bytes_to_node, head.len() as u64);
        let mut first = match (self.config.proxy_protocol(), client.local_addr()) {
            (true, Ok(local)) => proxy_protocol::encode_proxy(peer, local),
            (true, Err(_)) => return self.close_counted(conn, &node_stats), // never the head without its header
            (false, _) => Vec::new(),
        };
        first.extend_from_slice(&head);
        self.send_first(conn, Sending { client, node, first, written: 0, node_stats })
    }

    fn connect_failed(&mut self, index: usize, conn: Conn, connecting: Connecting) -> Option<Conn> {
        let Connecting { mut attempts, attempt, index: node_index, node, .. } = connecting;
        drop(node); // closing takes it out of the epoll set
        stats::add(&attempts.view.stats[node_index].connect_failures, 1);
        attempts.failed.push(node_index);
        attempts.failed.sort_unstable();
        self.connect(index, conn, attempts, attempt + 1)
    }

    fn send_first(&mut self, mut conn: Conn, mut sending: Sending) -> Option<Conn> {
        while sending.written < sending.first.len() {
            match sending.node.write(&sending.first[sending.written..]) {
                Ok(0) => return self.close_counted(conn, &sending.node_stats),
                Ok(n) => sending.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.stage = Stage::Sending(sending);
                    return Some(conn);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.close_counted(conn, &sending.node_stats),
            }
        }
        // Both sides read to the end once: their edges while the head was
        // read and the node connected were not acted on.
        let Sending { client, node, node_stats, .. } = sending;
        let mut tunnel = Tunnel::new(client, node, node_stats);
        let mut outcome = tunnel.pump(0, &mut self.scratch, true);
        if outcome.is_ok() {
            outcome = tunnel.pump(1, &mut self.scratch, true);
        }
        self.after_piping(conn, tunnel, outcome)
    }

    fn after_piping(&mut self, mut conn: Conn, tunnel: Tunnel, outcome: io::Result<()>) -> Option<Conn> {
        match outcome {
            Ok(()) if !tunnel.done() => {
                conn.stage = Stage::Piping(tunnel);
                Some(conn)
            }
            Ok(()) => self.close_piped(tunnel),
            Err(_) => {
                tunnel.shut_both();
                self.close_piped(tunnel)
            }
        }
    }

    /// Writes an error response (waiting for room if need be), then closes.
    fn answer(&mut self, conn: Conn, client: TcpStream, status: u16, code: &str, message: &str) -> Option<Conn> {
        self.write_answer(conn, client, client_error(status, code, message), 0)
    }

    fn write_answer(
        &mut self,
        mut conn: Conn,
        client: TcpStream,
        response: Vec<u8>,
        mut written: usize,
    ) -> Option<Conn> {
        while written < response.len() {
            match (&client).write(&response[written..]) {
                Ok(0) => break,
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    conn.stage = Stage::Answering { client, response, written };
                    return Some(conn);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        self.close(conn)
    }

    /// Closes a connection that holds no node count (its sockets leave the
    /// epoll set as they close).
    fn close(&mut self, conn: Conn) -> Option<Conn> {
        drop(conn);
        stats::sub(&self.shard_stats.connections_current, 1);
        None
    }

    /// Closes a connection counted on its node (after the connect).
    fn close_counted(&mut self, conn: Conn, node_stats: &NodeStats) -> Option<Conn> {
        stats::sub(&node_stats.connections_current, 1);
        self.close(conn)
    }

    fn close_piped(&mut self, mut tunnel: Tunnel) -> Option<Conn> {
        tunnel.flush_stats();
        stats::sub(&tunnel.node_stats.connections_current, 1);
        drop(tunnel);
        stats::sub(&self.shard_stats.connections_current, 1);
        None
    }

    /// The view's table with the nodes at `failed` (sorted indices) removed.
    fn fallback(&mut self, view: &View, failed: &[usize]) -> Option<Arc<FallbackTable>> {
        if let Some((_, _, table)) = self.fallbacks.iter().find(|(g, f, _)| *g == view.generation && f == failed) {
            return Some(table.clone());
        }
        let table = Arc::new(view.fallback(failed).ok()?);
        if self.fallbacks.len() >= FALLBACK_TABLES_MAX {
            self.fallbacks.pop_front();
        }
        self.fallbacks.push_back((view.generation, failed.to_vec(), table.clone()));
        Some(table)
    }

    /// Closes tunnels that moved no byte since the last sweep: one sweep
    /// per idle period, so a silent tunnel closes after one to two periods.
    fn sweep_idle(&mut self) {
        for index in 0..self.conns.len() {
            let silent = match self.conns[index].as_mut().map(|conn| &mut conn.stage) {
                Some(Stage::Piping(tunnel)) => !std::mem::replace(&mut tunnel.active, false),
                _ => false,
            };
            if silent {
                if let Some(Conn { stage: Stage::Piping(tunnel), .. }) = self.conns[index].take() {
                    tunnel.shut_both();
                    self.close_piped(tunnel);
                    self.free.push(index);
                }
            }
        }
    }

    /// Adds every tunnel's byte counts to its node's counters: once a
    /// second, not once per read (those counters are shared by every shard).
    fn flush_stats(&mut self) {
        for conn in self.conns.iter_mut().flatten() {
            if let Stage::Piping(tunnel) = &mut conn.stage {
                tunnel.flush_stats();
            }
        }
    }

    fn close_all(&mut self) {
        self.listener = None;
        for index in 0..self.conns.len() {
            let Some(mut conn) = self.conns[index].take() else { continue };
            match std::mem::replace(&mut conn.stage, Stage::Moving) {
                Stage::Piping(tunnel) => {
                    tunnel.shut_both();
                    self.close_piped(tunnel);
                }
                Stage::Sending(sending) => {
                    self.close_counted(conn, &sending.node_stats);
                }
                _ => {
                    self.close(conn);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Args;
    use crate::membership::{Membership, Source};
    use clap::Parser;
    use std::net::{Shutdown, TcpListener as StdListener, TcpStream as StdStream};

    const HEAD: &[u8] = b"GET /v1/topics/bulk HTTP/1.1\r\nHost: x\r\n\r\n";

    /// A piper on 127.0.0.1 routing to one node, the test's listener.
    struct Plane {
        piper: Piper,
        addr: SocketAddr,
        node: StdListener,
        shard_stats: Arc<ShardStats>,
        view: Arc<View>,
    }

    fn plane(flags: &[&str], node: StdListener) -> Plane {
        let node_addr = node.local_addr().unwrap();
        let mut argv = vec!["fluxbalancer".to_string(), "--node".to_string(), node_addr.to_string()];
        argv.extend(flags.iter().map(|f| f.to_string()));
        let config = Arc::new(Config::from_args(&Args::parse_from(argv)).unwrap());
        let mut membership = Membership::new(1, 1, config.table_size());
        membership.add(node_addr, Source::Static).unwrap();
        let view = Arc::new(membership.view_if_changed().unwrap());
        let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        listener.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        listener.listen(16).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let shard_stats: Arc<ShardStats> = Arc::default();
        let piper = Piper::start(0, listener, config, view.clone(), shard_stats.clone()).unwrap();
        Plane { piper, addr, node, shard_stats, view }
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Connects a client through the plane and accepts its node side.
    fn tunnel(plane: &Plane) -> (StdStream, StdStream) {
        let mut client = StdStream::connect(plane.addr).unwrap();
        client.write_all(HEAD).unwrap();
        let (mut node, _) = plane.node.accept().unwrap();
        let mut head = vec![0; HEAD.len()];
        node.read_exact(&mut head).unwrap();
        assert_eq!(head, HEAD, "the head is replayed to the node");
        // A stalled plane fails the test instead of hanging it.
        for far in [&client, &node] {
            far.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        }
        (client, node)
    }

    #[test]
    fn pipes_both_ways_through_full_buffers_and_passes_half_closes_on() {
        // Small buffers towards the node, inherited from the listener: a
        // small window and MSS, so the node-side send buffer is small and a
        // 32 KiB read never fits in one send: the plane keeps the rest and
        // waits for room (the resume path).
        let node = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        node.set_recv_buffer_size(8192).unwrap();
        node.set_mss(1000).unwrap();
        node.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).unwrap();
        node.listen(16).unwrap();
        let plane = plane(&[], node.into());
        let (mut client, mut node) = tunnel(&plane);
        const BYTES: usize = 512 << 10;
        let pattern = |i: usize| (i % 251) as u8;
        let mut writer = client.try_clone().unwrap();
        let sending = std::thread::spawn(move || {
            let data: Vec<u8> = (0..BYTES).map(pattern).collect();
            writer.write_all(&data).unwrap();
            writer.shutdown(Shutdown::Write).unwrap(); // the client half-closes
        });
        let mut got = Vec::with_capacity(BYTES);
        node.read_to_end(&mut got).unwrap(); // ends: the half-close came through
        sending.join().unwrap();
        assert_eq!(got.len(), BYTES);
        assert!(got.iter().enumerate().all(|(i, &b)| b == pattern(i)), "bytes changed or reordered");
        // The other direction still works after the client's half-close.
        node.write_all(b"last words").unwrap();
        node.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"last words");
        wait_until("the connection closed", || stats::get(&plane.shard_stats.connections_current) == 0);
        let node_stats = &plane.view.stats[0];
        assert_eq!(stats::get(&node_stats.connections_current), 0);
        assert_eq!(stats::get(&node_stats.connections_total), 1);
        let head = HEAD.len() as u64;
        assert_eq!(stats::get(&node_stats.bytes_to_node), head + BYTES as u64, "counted when it closed");
        assert_eq!(stats::get(&node_stats.bytes_from_node), 10);
    }

    #[test]
    fn a_silent_tunnel_is_closed_a_busy_one_is_not_and_stop_closes_the_rest() {
        let plane_a = plane(&["--tunnel-idle-timeout-ms", "200"], StdListener::bind("127.0.0.1:0").unwrap());
        let (mut client, _node) = tunnel(&plane_a);
        let mut buf = [0u8; 16];
        // Ends (EOF or reset) once the sweep finds it silent.
        assert!(matches!(client.read(&mut buf), Ok(0) | Err(_)));
        wait_until("the gauge went down", || stats::get(&plane_a.shard_stats.connections_current) == 0);

        // A tunnel that moves a byte between sweeps stays open through many
        // (a byte every 25 ms against sweeps every 200 ms: only a stall of
        // the test thread over 400 ms could look like silence).
        let (mut client, mut node) = tunnel(&plane_a);
        for i in 0..48u8 {
            client.write_all(&[i]).unwrap();
            let mut byte = [0u8; 1];
            node.read_exact(&mut byte).unwrap();
            assert_eq!(byte[0], i, "the tunnel was closed while in use");
            std::thread::sleep(Duration::from_millis(25)); // 1.2 s: about 6 sweeps
        }

        let plane_b = plane(&[], StdListener::bind("127.0.0.1:0").unwrap());
        let (mut client, _node) = tunnel(&plane_b);
        let waiting = StdStream::connect(plane_b.addr).unwrap(); // no head yet
        wait_until("both counted", || stats::get(&plane_b.shard_stats.connections_current) == 2);
        plane_b.piper.stop_accepting();
        plane_b.piper.stop();
        assert!(matches!(client.read(&mut buf), Ok(0) | Err(_)));
        assert!(matches!((&waiting).read(&mut buf), Ok(0) | Err(_)));
        assert_eq!(stats::get(&plane_b.shard_stats.connections_current), 0);
        assert_eq!(stats::get(&plane_b.view.stats[0].connections_current), 0);
        assert!(StdStream::connect(plane_b.addr).is_err(), "the listener is closed");
    }

    #[test]
    fn a_refused_connect_is_retried_nowhere_else_and_answered_502() {
        // The only node refuses: no fallback is left, so 502.
        let closed = StdListener::bind("127.0.0.1:0").unwrap();
        let plane = plane(&[], StdListener::bind("127.0.0.1:0").unwrap());
        let mut membership = Membership::new(1, 1, 65_537);
        membership.add(closed.local_addr().unwrap(), Source::Static).unwrap();
        let mut view = membership.view_if_changed().unwrap();
        view.generation = plane.view.generation + 1;
        drop(closed);
        plane.piper.install(Arc::new(view));
        // The view arrives between events: retry until the plane routes by it.
        wait_until("a 502 from the new view", || {
            let mut client = StdStream::connect(plane.addr).unwrap();
            client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            client.write_all(HEAD).unwrap();
            let mut answer = String::new();
            let _ = client.read_to_string(&mut answer);
            if answer.starts_with("HTTP/1.1 502") {
                return true;
            }
            // Still the old view: the test node got a connection; let it go.
            if let Ok((node, _)) = plane.node.accept() {
                drop(node);
            }
            false
        });
        assert_eq!(stats::get(&plane.shard_stats.node_unreachable), 1);
    }
}
