//! Piping established tunnels. Each shard hands every connection whose
//! head, node choice and first write are done to its piper: one thread,
//! started by the shard on the shard's own core and in its descriptor
//! table, that runs an edge-triggered epoll loop (mio) over all of the
//! shard's tunnels. Nothing here parses: bytes read from one side are sent
//! to the other.
//!
//! Why not glommio for this part (ARCHITECTURE.md has the figures): glommio
//! arms a one-shot poll on its ring for every read that finds no data and
//! parks its executor between bursts with a `membarrier` IPI each time, so
//! the balancer entered the kernel 4 times as often as HAProxy's
//! `epoll_wait` for the same chunks. Here each socket is registered once,
//! edge-triggered, and one `epoll_wait` returns every ready socket.
//!
//! Per readable side: read into the piper's scratch buffer, one
//! non-blocking send to the other side. Only what the kernel did not take is
//! kept, in a buffer of the direction's own (at most one chunk), and that
//! direction reads nothing more until it is written; the rest of a burst
//! stays in the kernel. A read shorter than the buffer ends the side's turn
//! (the next byte to arrive raises a new edge) unless the event said the
//! peer closed (then it reads to the end, so a FIN that came with the data
//! is not missed). A direction that resumes after waiting for room reads to
//! the end too: the edges that came while it waited were not acted on.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::limits::{PIPE_CHUNK_BYTES, PIPE_EVENTS_PER_WAIT, PIPE_STATS_FLUSH_MS};
use crate::stats::{self, NodeStats, ShardStats};

/// A connection ready to pipe: the client, the node (head and optional
/// PROXY header already written), and the node's counters. The piper
/// counts it in both `connections_current` gauges until it closes.
#[derive(Debug)]
pub struct NewTunnel {
    /// The client's socket (a duplicate of the descriptor the shard read from).
    pub client: socket2::Socket,
    /// The node's socket.
    pub node: socket2::Socket,
    /// The node's counters.
    pub node_stats: Arc<NodeStats>,
}

/// The shard's handle on its piper thread.
#[derive(Debug)]
pub struct Piper {
    inbox: Arc<Mutex<Vec<NewTunnel>>>,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The waker's token; tunnel sides use `2 * index + side`.
const WAKER: Token = Token(usize::MAX);

impl Piper {
    /// Starts the piper of shard `shard`. Call on the shard's thread: the
    /// new thread shares its core (affinity) and its descriptor table.
    pub fn start(shard: usize, shard_stats: Arc<ShardStats>, idle: Duration) -> io::Result<Piper> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let inbox: Arc<Mutex<Vec<NewTunnel>>> = Arc::default();
        let stop: Arc<AtomicBool> = Arc::default();
        let mut piping = Piping {
            poll,
            tunnels: Vec::new(),
            free: Vec::new(),
            scratch: vec![0; PIPE_CHUNK_BYTES].into_boxed_slice(),
            shard_stats,
            inbox: inbox.clone(),
            stop: stop.clone(),
            idle,
        };
        let thread = std::thread::Builder::new().name(format!("fluxbalancer-pipe-{shard}")).spawn(move || {
            // A panic must not leave the shard handing tunnels to a dead
            // thread: whatever ends the loop, close_all refuses new ones.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| piping.run())) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(shard, "piper stopped: {e}"),
                Err(_) => tracing::error!(shard, "piper panicked"),
            }
            piping.close_all();
        })?;
        Ok(Piper { inbox, waker, stop, thread: Mutex::new(Some(thread)) })
    }

    /// Hands a tunnel over. Err (the tunnel dropped, so both sockets close)
    /// when the piper has stopped.
    pub fn adopt(&self, tunnel: NewTunnel) -> io::Result<()> {
        let mut inbox = lock(&self.inbox);
        // Checked under the lock the thread takes to empty the inbox for
        // the last time, so no tunnel is left in it unseen.
        if self.stop.load(Ordering::Acquire) {
            return Err(io::Error::other("piper stopped"));
        }
        inbox.push(tunnel);
        drop(inbox);
        // Queued: the piper owns it now, whatever the wake says (mio's
        // eventfd waker handles a full counter itself).
        if let Err(e) = self.waker.wake() {
            tracing::error!("piper wake failed: {e}");
        }
        Ok(())
    }

    /// Stops the thread and closes every tunnel it holds; waits for it.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Piper {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A poisoned lock only means a panic elsewhere; the data is a plain list.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The piper thread's state.
struct Piping {
    poll: Poll,
    /// Tunnels by index; a closed one leaves `None` and its index in `free`.
    tunnels: Vec<Option<Tunnel>>,
    free: Vec<usize>,
    scratch: Box<[u8]>,
    shard_stats: Arc<ShardStats>,
    inbox: Arc<Mutex<Vec<NewTunnel>>>,
    stop: Arc<AtomicBool>,
    idle: Duration,
}

/// One side of a tunnel: its socket, and the bytes read from it that the
/// other side's socket has not taken yet.
struct Side {
    stream: TcpStream,
    pending: Vec<u8>,
    /// It sent its FIN (the other side was half-closed).
    ended: bool,
}

/// A client and its node. Side 0 is the client, side 1 the node.
struct Tunnel {
    sides: [Side; 2],
    /// Bytes read per side since the counters were last updated.
    unflushed: [u64; 2],
    /// Bytes moved since the last idle sweep.
    active: bool,
    node_stats: Arc<NodeStats>,
}

/// What an event left a tunnel as.
enum State {
    Open,
    /// Both sides ended and everything was written.
    Done,
    /// A read or write failed.
    Failed,
}

impl Piping {
    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(PIPE_EVENTS_PER_WAIT);
        let flush_every = Duration::from_millis(PIPE_STATS_FLUSH_MS);
        let mut next_flush = Instant::now() + flush_every;
        let mut next_sweep = Instant::now() + self.idle;
        loop {
            let now = Instant::now();
            if now >= next_flush {
                self.flush_stats();
                next_flush = now + flush_every;
            }
            if now >= next_sweep {
                self.sweep_idle();
                next_sweep = now + self.idle;
            }
            let wait = next_flush.min(next_sweep).saturating_duration_since(now);
            match self.poll.poll(&mut events, Some(wait)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let mut woken = false;
            for event in events.iter() {
                if event.token() == WAKER {
                    woken = true;
                    continue;
                }
                let broken = event.is_error() || event.is_write_closed();
                self.on_event(
                    event.token().0,
                    event.is_readable() || event.is_read_closed() || broken,
                    event.is_writable() || broken,
                    event.is_read_closed() || broken,
                );
            }
            // New tunnels only after the batch, so that a late event for a
            // tunnel closed in it cannot reach one that reused its index.
            if woken {
                if self.stop.load(Ordering::Acquire) {
                    return Ok(());
                }
                self.adopt_new();
            }
        }
    }

    fn adopt_new(&mut self) {
        let arrived = std::mem::take(&mut *lock(&self.inbox));
        for new in arrived {
            let node_stats = new.node_stats.clone();
            if let Err(e) = self.register(new) {
                // Dropped, so both sockets close; counted down here, as
                // the shard counts on the piper to.
                tracing::warn!("tunnel not adopted: {e}");
                stats::sub(&node_stats.connections_current, 1);
                stats::sub(&self.shard_stats.connections_current, 1);
            }
        }
    }

    fn register(&mut self, new: NewTunnel) -> io::Result<()> {
        let open = |socket: socket2::Socket| -> io::Result<TcpStream> {
            let stream: std::net::TcpStream = socket.into();
            stream.set_nonblocking(true)?;
            Ok(TcpStream::from_std(stream))
        };
        let NewTunnel { client, node, node_stats } = new;
        let side = |stream| Side { stream, pending: Vec::new(), ended: false };
        let mut tunnel =
            Tunnel { sides: [side(open(client)?), side(open(node)?)], unflushed: [0; 2], active: true, node_stats };
        let index = self.free.last().copied().unwrap_or(self.tunnels.len());
        let interest = Interest::READABLE | Interest::WRITABLE;
        for (i, side) in tunnel.sides.iter_mut().enumerate() {
            // Registered once, edge-triggered; already-ready sockets report
            // at the next wait. (On failure the sockets close as the tunnel
            // drops, which also takes them out of the epoll set.)
            self.poll.registry().register(&mut side.stream, Token(2 * index + i), interest)?;
        }
        if index < self.tunnels.len() {
            self.free.pop();
        }
        if index == self.tunnels.len() {
            self.tunnels.push(Some(tunnel));
        } else {
            self.tunnels[index] = Some(tunnel);
        }
        Ok(())
    }

    fn on_event(&mut self, token: usize, readable: bool, writable: bool, to_the_end: bool) {
        let (index, side) = (token / 2, token % 2);
        let Some(Some(tunnel)) = self.tunnels.get_mut(index) else {
            return; // closed earlier in this batch
        };
        let mut outcome = Ok(());
        if writable {
            // Room on `side`: write what the other side read for it, then
            // let the other side read again.
            outcome = tunnel.resume(1 - side, &mut self.scratch);
        }
        if readable && outcome.is_ok() {
            outcome = tunnel.pump(side, &mut self.scratch, to_the_end);
        }
        let state = match outcome {
            Err(_) => State::Failed,
            Ok(()) if tunnel.done() => State::Done,
            Ok(()) => State::Open,
        };
        match state {
            State::Open => {}
            State::Done => self.close(index),
            State::Failed => {
                tunnel.shut_both();
                self.close(index);
            }
        }
    }

    /// Closes a tunnel (its sockets leave the epoll set as they close).
    fn close(&mut self, index: usize) {
        if let Some(tunnel) = self.tunnels[index].take() {
            tunnel.flush_stats();
            stats::sub(&tunnel.node_stats.connections_current, 1);
            stats::sub(&self.shard_stats.connections_current, 1);
            self.free.push(index);
        }
    }

    /// Closes tunnels that moved no byte since the last sweep: one sweep
    /// per idle period, so a silent tunnel closes after one to two periods.
    fn sweep_idle(&mut self) {
        for index in 0..self.tunnels.len() {
            let Some(tunnel) = self.tunnels[index].as_mut() else { continue };
            if tunnel.active {
                tunnel.active = false;
            } else {
                tunnel.shut_both();
                self.close(index);
            }
        }
    }

    /// Adds every tunnel's byte counts to its node's counters: once a
    /// second, not once per read (those counters are shared by every shard).
    fn flush_stats(&mut self) {
        for tunnel in self.tunnels.iter_mut().flatten() {
            tunnel.flush_stats();
            tunnel.unflushed = [0; 2];
        }
    }

    fn close_all(&mut self) {
        for index in 0..self.tunnels.len() {
            if let Some(tunnel) = &self.tunnels[index] {
                tunnel.shut_both();
                self.close(index);
            }
        }
        // Tunnels handed over but not adopted: close them too, and refuse
        // any more (the thread may end on an error, not only on `stop`).
        let late = {
            let mut inbox = lock(&self.inbox);
            self.stop.store(true, Ordering::Release);
            std::mem::take(&mut *inbox)
        };
        for new in late {
            stats::sub(&new.node_stats.connections_current, 1);
            stats::sub(&self.shard_stats.connections_current, 1);
        }
    }
}

impl Tunnel {
    /// Reads from side `from` and sends to the other, until a short read
    /// (or, with `to_the_end`, until the socket has nothing more), the end
    /// of the stream, or a send the other side could not take whole.
    fn pump(&mut self, from: usize, scratch: &mut [u8], to_the_end: bool) -> io::Result<()> {
        let to = 1 - from;
        loop {
            if self.sides[from].ended || !self.sides[from].pending.is_empty() {
                return Ok(()); // done, or waiting for room on `to`
            }
            let n = match self.sides[from].stream.read(scratch) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                self.sides[from].ended = true;
                let _ = self.sides[to].stream.shutdown(Shutdown::Write);
                return Ok(());
            }
            self.unflushed[from] += n as u64;
            self.active = true;
            let sent = loop {
                match self.sides[to].stream.write(&scratch[..n]) {
                    Ok(sent) => break sent,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break 0,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            };
            if sent < n {
                self.sides[from].pending.extend_from_slice(&scratch[sent..n]);
                return Ok(());
            }
            if n < scratch.len() && !to_the_end {
                return Ok(());
            }
        }
    }

    /// Writes what side `from` read and the other side had no room for;
    /// once all of it is written, side `from` reads again (to the end: its
    /// edges while it waited were not acted on).
    fn resume(&mut self, from: usize, scratch: &mut [u8]) -> io::Result<()> {
        let to = 1 - from;
        if self.sides[from].pending.is_empty() {
            return Ok(());
        }
        while !self.sides[from].pending.is_empty() {
            match self.sides[to].stream.write(&self.sides[from].pending) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.sides[from].pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.sides[from].pending = Vec::new(); // an idle tunnel holds no buffer
        self.pump(from, scratch, true)
    }

    /// Both sides ended and nothing is left to write.
    fn done(&self) -> bool {
        self.sides.iter().all(|side| side.ended && side.pending.is_empty())
    }

    fn shut_both(&self) {
        for side in &self.sides {
            let _ = side.stream.shutdown(Shutdown::Both);
        }
    }

    fn flush_stats(&self) {
        stats::add(&self.node_stats.bytes_to_node, self.unflushed[0]);
        stats::add(&self.node_stats.bytes_from_node, self.unflushed[1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream as StdStream};
    use std::time::Instant;

    /// A connected pair: the far end (the test's) and the near end (the piper's).
    fn pair(listener: &TcpListener) -> (StdStream, socket2::Socket) {
        let far = StdStream::connect(listener.local_addr().unwrap()).unwrap();
        let (near, _) = listener.accept().unwrap();
        (far, near.into())
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn started(idle: Duration) -> (Piper, Arc<ShardStats>, Arc<NodeStats>, StdStream, StdStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let shard_stats: Arc<ShardStats> = Arc::default();
        let node_stats: Arc<NodeStats> = Arc::default();
        let piper = Piper::start(0, shard_stats.clone(), idle).unwrap();
        let (client, client_near) = pair(&listener);
        let (node, node_near) = pair(&listener);
        // Small buffers towards the node: a 32 KiB read never fits in one
        // send, so the piper keeps the rest and waits for room.
        // (No Nagle, as the shard sets on both sockets: with it, tiny
        // buffers wait for delayed ACKs.)
        node_near.set_send_buffer_size(8192).unwrap();
        node_near.set_nodelay(true).unwrap();
        socket2::SockRef::from(&node).set_recv_buffer_size(8192).unwrap();
        // The shard counts the tunnel before the hand-over; the piper counts it down.
        stats::add(&shard_stats.connections_current, 1);
        stats::add(&node_stats.connections_current, 1);
        piper.adopt(NewTunnel { client: client_near, node: node_near, node_stats: node_stats.clone() }).unwrap();
        // A stalled piper fails the test instead of hanging it.
        for far in [&client, &node] {
            far.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        }
        (piper, shard_stats, node_stats, client, node)
    }

    #[test]
    fn pipes_both_ways_through_full_buffers_and_passes_half_closes_on() {
        let (_piper, shard_stats, node_stats, mut client, mut node) = started(Duration::from_secs(60));
        // Far more than the small buffers towards the node hold: the
        // piper's sends come up short and its resume path runs.
        const BYTES: usize = 512 << 10;
        let pattern = |i: usize| (i % 251) as u8;
        let mut writer = client.try_clone().unwrap();
        let sending = std::thread::spawn(move || {
            let data: Vec<u8> = (0..BYTES).map(pattern).collect();
            writer.write_all(&data).unwrap();
            writer.shutdown(Shutdown::Write).unwrap(); // client half-closes
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
        wait_until("the tunnel closed", || stats::get(&shard_stats.connections_current) == 0);
        assert_eq!(stats::get(&node_stats.connections_current), 0);
        assert_eq!(stats::get(&node_stats.bytes_to_node), BYTES as u64, "counted when it closed");
        assert_eq!(stats::get(&node_stats.bytes_from_node), 10);
    }

    #[test]
    fn a_silent_tunnel_is_closed_and_stop_closes_the_rest() {
        let (piper, shard_stats, _node_stats, mut client, _node) = started(Duration::from_millis(50));
        let mut buf = [0u8; 16];
        // Ends (EOF or reset) once the sweep finds it silent.
        assert!(matches!(client.read(&mut buf), Ok(0) | Err(_)));
        wait_until("the gauge went down", || stats::get(&shard_stats.connections_current) == 0);

        let (piper2, shard_stats2, _n, mut client2, _node2) = started(Duration::from_secs(60));
        piper2.stop();
        assert!(matches!(client2.read(&mut buf), Ok(0) | Err(_)));
        assert_eq!(stats::get(&shard_stats2.connections_current), 0);
        assert!(piper2
            .adopt(NewTunnel { client: pair_socket(), node: pair_socket(), node_stats: Arc::default() })
            .is_err());
        drop(piper);
    }

    fn pair_socket() -> socket2::Socket {
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap()
    }
}
