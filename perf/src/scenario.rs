//! The publish/subscribe scenarios, all one shape: T topics, S subscribers
//! and P publishers per topic, an open-loop total rate R. Fan-out is
//! T=1, P=1; many topics is T=1000, S=10, P=4; fan-in is T=1, S=1, P=many;
//! the original RayFlux shape is T=10 with publishers on `POST /publish`
//! and subscribers on WebSocket `/subscribe`.
//!
//! Message k (0-based, over all publishers) is due at start + k/R and is
//! sent by publisher k mod (T x P), as that publisher's message k / (T x P).
//! Its payload is text: publisher id, sequence and scheduled time in hex,
//! padded to the payload size, so it travels unchanged through every API
//! (the original API carries messages as JSON strings).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;

use crate::{process_cpu_seconds, unix_micros, Conn, Kind, Run, Target};

/// Smallest payload: 8 + 16 + 16 hex digits.
pub const PAYLOAD_BYTES_MIN: usize = 40;
/// How long a subscriber waits for the next message, once publishing has
/// begun, before it gives up.
pub(crate) const QUIET_SECONDS: u64 = 5;
/// Publishers with unflushed messages that make the publish loop flush
/// even when it is behind schedule (one publisher batches while behind, as
/// before; many must not hold messages back).
const PUBLISHERS_FLUSHED_BEHIND: usize = 64;
/// Most messages a polled subscriber reads before its thread turns to the
/// next ready connection (`--sub-threads`).
const POLLED_FRAMES_PER_TURN: usize = 256;
/// Subscriber thread stack: they hold a socket and a histogram, no deep calls.
const SUBSCRIBER_STACK_BYTES: usize = 256 << 10;

/// One scenario's shape.
#[derive(Clone, Debug)]
pub struct Shape {
    /// Name in reports.
    pub name: String,
    /// Topics.
    pub topics: usize,
    /// Subscribers per topic.
    pub subscribers: usize,
    /// Publishers per topic.
    pub publishers: usize,
    /// Messages per second offered, all publishers together.
    pub rate: u64,
    /// Seconds of publishing.
    pub seconds: u64,
    /// Payload bytes.
    pub payload: usize,
    /// Messages per publish frame (see `--batch`).
    pub batch: usize,
    /// Original API: publish with HTTP `POST /publish`, subscribe on `/subscribe`.
    pub original_api: bool,
    /// Extra subscribers per topic that connect and subscribe, then never
    /// read (the slow-consumer scenario); not counted in deliveries.
    pub stalled: usize,
    /// The subscribers are members of one consumer group (the group
    /// scenario): each message reaches one of them.
    pub group: Option<GroupShape>,
    /// The request scenario: the publishers are requesters, and these
    /// responders answer.
    pub request: Option<crate::request::RequestShape>,
    /// Threads the subscribers share (0: a thread each; see `--sub-threads`).
    pub sub_threads: usize,
    /// With batches: flush partly filled ones at most this often while
    /// behind schedule (see `--linger-ms`; 0: `PUBLISHERS_FLUSHED_BEHIND`).
    pub linger_ms: u64,
}

/// How the group scenario's members take their messages.
#[derive(Clone, Copy, Debug)]
pub struct GroupShape {
    /// Unacknowledged messages a member holds (RayFlux, JetStream).
    pub prefetch: u32,
    /// RayFlux: acknowledge each delivery instead of every
    /// [`GROUP_ACK_EVERY`] cumulatively.
    pub ack_each: bool,
}

impl Shape {
    fn total(&self) -> u64 {
        self.rate * self.seconds
    }
    fn publishers_total(&self) -> u64 {
        (self.topics * self.publishers) as u64
    }
    /// Messages publisher `g` sends.
    fn sent_by(&self, g: u64) -> u64 {
        let (total, n) = (self.total(), self.publishers_total());
        if g >= total {
            0
        } else {
            (total - g).div_ceil(n)
        }
    }
}

/// Encodes publisher, sequence and due time, padded to `len`.
pub fn encode(publisher: u64, seq: u64, due_us: u64, len: usize) -> Vec<u8> {
    let mut text = format!("{publisher:08x}{seq:016x}{due_us:016x}").into_bytes();
    text.resize(len.max(PAYLOAD_BYTES_MIN), b'.');
    text
}

/// Decodes what `encode` wrote.
pub fn decode(payload: &[u8]) -> Option<(u64, u64, u64)> {
    let text = std::str::from_utf8(payload.get(..PAYLOAD_BYTES_MIN)?).ok()?;
    let field = |r: std::ops::Range<usize>| u64::from_str_radix(&text[r], 16).ok();
    Some((field(0..8)?, field(8..24)?, field(24..40)?))
}

/// What one subscriber saw.
struct SubStats {
    received: u64,
    lost: u64,
    duplicated_or_reordered: u64,
    latency_us: Histogram<u64>,
}

/// Runs the shape once against `target`.
pub fn run(target: &Target, shape: &Shape, turn: usize) -> Result<Run> {
    if shape.payload < PAYLOAD_BYTES_MIN {
        bail!("--payload must be at least {PAYLOAD_BYTES_MIN} bytes");
    }
    if shape.original_api && target.kind != Kind::Rayflux {
        bail!("the original API exists only on RayFlux targets");
    }
    let tag = format!("fluxbench.{}.{}.{turn}.{}", shape.name, target.name, std::process::id());
    let names = (0..shape.topics).map(|t| topic_name(target, &tag, t)).collect::<Result<Vec<_>>>()?;
    let topic = |t: usize| names[t].clone();
    // Subscribers start reading (and their quiet timeout starts) only when
    // publishing begins. Opening 14,000 connections to NATS takes longer
    // than the quiet timeout, and the first subscribers used to give up
    // before the first message and count every message as lost.
    if let Some(ack) = &target.durable {
        for t in 0..shape.topics {
            let body = format!("{{\"ack\":\"{ack}\"}}");
            let (status, answer) = http(&target.addr, "PUT", &format!("/v1/topics/{}", topic(t)), Some(&body))?;
            if status != 200 {
                bail!("declaring {} durable: {status} {answer}", topic(t));
            }
        }
    }
    if let Some(group) = shape.group {
        return run_group(target, shape, &topic(0), group, turn);
    }
    if let Some(request) = shape.request {
        return crate::request::run(target, shape, &topic(0), request, turn);
    }
    let go = GateOpener::new();
    let mut subscribers = Vec::new();
    // Polled subscribers (`--sub-threads`): each thread opens its own share
    // of the connections, in a descriptor table of its own when there are
    // several threads, so that the open-files limit bounds a thread, not
    // the process (10,000 topics x 10 subscribers is 100,000 sockets).
    let mut shares: Vec<Vec<(String, SubState)>> = (0..shape.sub_threads).map(|_| Vec::new()).collect();
    for t in 0..shape.topics {
        let publishers: Vec<u64> = (0..shape.publishers).map(|p| (t * shape.publishers + p) as u64).collect();
        let per_publisher: Vec<u64> = publishers.iter().map(|&g| shape.sent_by(g)).collect();
        for s in 0..shape.subscribers {
            let state = SubState::new(&publishers, &per_publisher);
            if shape.sub_threads > 0 {
                shares[(t * shape.subscribers + s) % shape.sub_threads].push((topic(t), state));
                continue;
            }
            let conn = open_subscriber(target, &topic(t), shape.original_api)?;
            let (go, seconds) = (go.handle(), shape.seconds);
            let thread = std::thread::Builder::new().stack_size(SUBSCRIBER_STACK_BYTES).spawn(move || {
                go.wait();
                let schedule_end = Instant::now() + Duration::from_secs(seconds);
                vec![subscriber(conn, state, schedule_end)]
            })?;
            subscribers.push(thread);
        }
    }
    let (opened_tx, opened_rx) = std::sync::mpsc::channel::<Result<()>>();
    let own_tables = shape.sub_threads > 1;
    for (k, share) in shares.into_iter().enumerate() {
        let (go, seconds, opened_tx) = (go.handle(), shape.seconds, opened_tx.clone());
        // Several threads: each connects from an address of its own
        // (127.0.0.2, .3, ...), so that 100,000 sockets do not run out of
        // one address's ephemeral ports.
        let source = own_tables.then(|| std::net::IpAddr::from([127, 0, 0, 2 + (k % 250) as u8]));
        let (target, original_api) = (target.clone(), shape.original_api);
        let thread = std::thread::Builder::new().stack_size(SUBSCRIBER_STACK_BYTES).spawn(move || {
            // SAFETY: unshare(CLONE_FILES) only gives this thread a copy of
            // the descriptor table.
            if own_tables && unsafe { libc::unshare(libc::CLONE_FILES) } != 0 {
                let _ = opened_tx.send(Err(std::io::Error::last_os_error()).context("unshare(CLONE_FILES)"));
                return Vec::new();
            }
            let mut group = Vec::with_capacity(share.len());
            for (topic, state) in share {
                match open_subscriber_from(&target, &topic, original_api, source) {
                    Ok(conn) => group.push((conn, state)),
                    Err(e) => {
                        let _ = opened_tx.send(Err(e));
                        return Vec::new();
                    }
                }
            }
            let _ = opened_tx.send(Ok(()));
            go.wait();
            let schedule_end = Instant::now() + Duration::from_secs(seconds);
            subscribers_polled(group, schedule_end)
        })?;
        subscribers.push(thread);
    }
    drop(opened_tx);
    for _ in 0..shape.sub_threads {
        opened_rx.recv().context("a subscriber thread stopped")??;
    }
    // Stalled subscribers: held open, never read, dropped after the run.
    let mut stalled = Vec::new();
    for t in 0..shape.topics {
        for _ in 0..shape.stalled {
            stalled.push(open_subscriber(target, &topic(t), shape.original_api)?);
        }
    }
    if shape.original_api {
        // /subscribe sends no acknowledgement: wait until the node counts them.
        for t in 0..shape.topics {
            wait_subscribed(target, &topic(t), shape.subscribers)?;
        }
    }
    let mut publishers = Vec::with_capacity(shape.publishers_total() as usize);
    for g in 0..shape.publishers_total() as usize {
        publishers.push(Publisher::open(target, &topic(g / shape.publishers), shape.original_api, shape.batch)?);
    }
    let cpu_server_start = target.server_cpu_seconds()?;
    let rss_start = target.pid.map(crate::process_rss_kib).transpose()?;
    let cpu_client_start = process_cpu_seconds(std::process::id())?;
    go.open();
    let publish_seconds = publish(shape, &mut publishers)?;
    let mut run = Run::new(&target.name, &shape.name, turn, shape.total(), publish_seconds)?;
    if let (Some(pid), Some(before)) = (target.pid, rss_start) {
        run.server_rss_kib = Some((before, crate::process_rss_kib(pid)?));
    }
    for s in subscribers {
        for stats in s.join().map_err(|_| anyhow::anyhow!("subscriber thread panicked"))? {
            run.delivered += stats.received;
            run.lost += stats.lost;
            run.duplicated_or_reordered += stats.duplicated_or_reordered;
            run.latency_us.add(&stats.latency_us)?;
        }
    }
    if let (Some(now), Some(before)) = (target.server_cpu_seconds()?, cpu_server_start) {
        run.server_cpu_seconds = Some(now - before);
    }
    run.client_cpu_seconds = process_cpu_seconds(std::process::id())? - cpu_client_start;
    // A batch refused in part loses messages the subscribers count; its
    // replies say why.
    let refused: u64 = publishers.iter_mut().map(Publisher::refused).sum();
    if refused > 0 {
        eprintln!("{}: {refused} publish batches refused (in whole or part)", target.name);
    }
    drop(stalled);
    Ok(run)
}

/// How often a group member acknowledges (cumulatively, by tag).
const GROUP_ACK_EVERY: u64 = 64;

/// The group scenario: one publisher, `shape.subscribers` members of one
/// group; every message must reach exactly one member. A JetStream target
/// gets its stream and consumer first and loses them after.
fn run_group(target: &Target, shape: &Shape, topic: &str, group: GroupShape, turn: usize) -> Result<Run> {
    let prefetch = group.prefetch;
    if let Some(storage) = &target.jetstream {
        let pending = u64::from(prefetch) * shape.subscribers as u64;
        crate::jetstream::create(target, topic, storage, pending)?;
        let run = run_members(target, shape, topic, group, turn);
        crate::jetstream::delete(target, topic)?;
        return run;
    }
    run_members(target, shape, topic, group, turn)
}

fn run_members(target: &Target, shape: &Shape, topic: &str, group: GroupShape, turn: usize) -> Result<Run> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let (prefetch, ack_each) = (group.prefetch, group.ack_each);
    let expected = shape.total();
    let received = std::sync::Arc::new(AtomicU64::new(0));
    let go = GateOpener::new();
    let mut members = Vec::new();
    for member in 0..shape.subscribers {
        let mut conn = match target.jetstream {
            Some(_) => Conn::open_puller(target, topic, member, prefetch)?,
            None => Conn::open_member(target, topic, prefetch)?,
        };
        conn.ws.get_ref().set_read_timeout(Some(Duration::from_millis(200)))?;
        let (go, received, seconds) = (go.handle(), received.clone(), shape.seconds);
        members.push(std::thread::Builder::new().stack_size(SUBSCRIBER_STACK_BYTES).spawn(move || {
            go.wait();
            let quiet_after = Instant::now() + Duration::from_secs(seconds + QUIET_SECONDS);
            let mut seen = Vec::new();
            let mut latency = Histogram::<u64>::new(3).expect("valid histogram");
            let mut last_tag = None;
            let mut unacked = 0;
            while received.load(Ordering::Relaxed) < expected && Instant::now() < quiet_after {
                let (payload, numbers) = match conn.recv_member() {
                    Ok(got) => got,
                    Err(e) if is_read_timeout(&e) => {
                        if let Some(tag) = last_tag.take() {
                            let _ = conn.ack_through(tag);
                            unacked = 0;
                        }
                        let _ = conn.flush_acks();
                        continue;
                    }
                    Err(_) => break,
                };
                let now = unix_micros();
                if let Some((publisher, seq, due)) = decode(&payload) {
                    seen.push((publisher, seq));
                    let _ = latency.record(now.saturating_sub(due).max(1));
                    received.fetch_add(1, Ordering::Relaxed);
                }
                if let Some((tag, seq)) = numbers {
                    unacked += 1;
                    if ack_each {
                        let _ = conn.ack_seq(seq);
                    } else {
                        last_tag = Some(tag);
                    }
                    if unacked >= GROUP_ACK_EVERY {
                        if let Some(tag) = last_tag.take() {
                            let _ = conn.ack_through(tag);
                        }
                        let _ = conn.flush();
                        unacked = 0;
                    }
                }
            }
            // Acknowledge what was processed before leaving: a member that
            // leaves holding deliveries gets them redelivered to the others.
            if let Some(tag) = last_tag {
                let _ = conn.ack_through(tag);
            }
            let _ = conn.flush_acks();
            (seen, latency)
        })?);
    }
    let mut publisher = Conn::open(target, topic, false)?;
    let cpu_server_start = target.server_cpu_seconds()?;
    let cpu_client_start = process_cpu_seconds(std::process::id())?;
    go.open();
    let start = Instant::now();
    let start_unix_us = unix_micros();
    for k in 0..expected {
        let due_us = k * 1_000_000 / shape.rate;
        let elapsed_us = start.elapsed().as_micros() as u64;
        if elapsed_us < due_us {
            publisher.flush()?;
            std::thread::sleep(Duration::from_micros(due_us - elapsed_us));
        }
        publisher.send_text(&encode(0, k, start_unix_us + due_us, shape.payload))?;
    }
    publisher.flush()?;
    let publish_seconds = start.elapsed().as_secs_f64();
    let mut run = Run::new(&target.name, &shape.name, turn, expected, publish_seconds)?;
    let mut all = std::collections::HashSet::new();
    let mut total = 0u64;
    for m in members {
        let (seen, latency) = m.join().map_err(|_| anyhow::anyhow!("member thread panicked"))?;
        total += seen.len() as u64;
        all.extend(seen);
        run.latency_us.add(&latency)?;
    }
    run.delivered = all.len() as u64;
    run.duplicated_or_reordered = total - all.len() as u64;
    run.lost = expected.saturating_sub(all.len() as u64);
    if let (Some(now), Some(before)) = (target.server_cpu_seconds()?, cpu_server_start) {
        run.server_cpu_seconds = Some(now - before);
    }
    run.client_cpu_seconds = process_cpu_seconds(std::process::id())? - cpu_client_start;
    Ok(run)
}

/// A start signal for the subscriber threads. Opens when told to, or when
/// the last handle to it on the opening side is dropped (a run that fails
/// while connecting must not leave threads waiting forever).
#[derive(Clone)]
struct Gate(std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>);

impl Gate {
    fn wait(&self) {
        let (open, cv) = &*self.0;
        let mut guard = open.lock().unwrap_or_else(|e| e.into_inner());
        while !*guard {
            guard = cv.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The opening side of a [`Gate`]; opens it when dropped.
struct GateOpener(Gate);

impl GateOpener {
    fn new() -> GateOpener {
        GateOpener(Gate(Default::default()))
    }

    fn handle(&self) -> Gate {
        self.0.clone()
    }

    fn open(&self) {
        let (open, cv) = &*(self.0).0;
        *open.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }
}

impl Drop for GateOpener {
    fn drop(&mut self) {
        self.open();
    }
}

/// Sends every message on schedule; returns the seconds it took.
fn publish(shape: &Shape, publishers: &mut [Publisher]) -> Result<f64> {
    let n = publishers.len() as u64;
    let start = Instant::now();
    let start_unix_us = unix_micros();
    // Publishers with unflushed messages. Flushing every publisher whenever
    // the loop was ahead of schedule cost 10,000 calls per message with
    // 10,000 publishers: the loop fell behind, stopped flushing, and
    // messages sat in the client's buffers for seconds (the node's own
    // publish-to-write latency was 0.55 ms at p50 meanwhile).
    let mut dirty: Vec<usize> = Vec::new();
    let mut is_dirty = vec![false; publishers.len()];
    let flush = |dirty: &mut Vec<usize>, is_dirty: &mut [bool], publishers: &mut [Publisher]| -> Result<()> {
        for g in dirty.drain(..) {
            is_dirty[g] = false;
            publishers[g].flush()?;
        }
        Ok(())
    };
    let linger_us = shape.linger_ms * 1000;
    let mut last_flush_us = 0;
    for k in 0..shape.total() {
        let due_us = k * 1_000_000 / shape.rate;
        let elapsed_us = start.elapsed().as_micros() as u64;
        if elapsed_us < due_us {
            flush(&mut dirty, &mut is_dirty, publishers)?;
            last_flush_us = elapsed_us;
            std::thread::sleep(Duration::from_micros(due_us - elapsed_us));
        } else if linger_us > 0 {
            // Behind schedule: partly filled batches go once they have
            // lingered long enough; full ones went as they filled.
            if elapsed_us - last_flush_us >= linger_us {
                flush(&mut dirty, &mut is_dirty, publishers)?;
                last_flush_us = elapsed_us;
            }
        } else if dirty.len() >= PUBLISHERS_FLUSHED_BEHIND {
            // Behind schedule with many publishers waiting: flush anyway,
            // so that being behind never means holding messages back.
            flush(&mut dirty, &mut is_dirty, publishers)?;
        }
        let g = (k % n) as usize;
        let payload = encode(g as u64, k / n, start_unix_us + due_us, shape.payload);
        publishers[g].send(&payload)?;
        if !is_dirty[g] {
            is_dirty[g] = true;
            dirty.push(g);
        }
    }
    flush(&mut dirty, &mut is_dirty, publishers)?;
    Ok(start.elapsed().as_secs_f64())
}

/// Reads until every expected message arrived, or the stream is quiet for
/// QUIET_SECONDS after `schedule_end` (the publishers' last scheduled send).
/// `per_publisher[i]` is how many messages `publishers[i]` sends.
/// One subscriber's count: the next sequence expected from each of its
/// publishers, and what it saw.
///
/// Latency goes to a histogram the caller owns: one per subscriber thread,
/// not one per subscriber (a histogram covering microseconds to seconds at 3
/// significant digits is about 128 KiB, and 100,000 of them had the load
/// generator spend 70% of its time zeroing fresh pages).
struct SubState {
    next: HashMap<u64, u64>,
    /// Messages each publisher sends, in `next`'s publishers' order.
    per_publisher: Vec<(u64, u64)>,
    expected: u64,
    received: u64,
    lost: u64,
    duplicated_or_reordered: u64,
}

impl SubState {
    fn new(publishers: &[u64], per_publisher: &[u64]) -> SubState {
        SubState {
            next: publishers.iter().map(|&p| (p, 0)).collect(),
            per_publisher: publishers.iter().copied().zip(per_publisher.iter().copied()).collect(),
            expected: per_publisher.iter().sum(),
            received: 0,
            lost: 0,
            duplicated_or_reordered: 0,
        }
    }

    /// Whether every message is accounted for (received or lost).
    fn complete(&self) -> bool {
        self.received + self.lost >= self.expected
    }

    fn on_payload(&mut self, payload: &[u8], latency_us: &mut Histogram<u64>) {
        let now = unix_micros();
        let Some((publisher, seq, due)) = decode(payload) else { return };
        let Some(next_seq) = self.next.get_mut(&publisher) else { return };
        if seq < *next_seq {
            self.duplicated_or_reordered += 1;
            return;
        }
        self.lost += seq - *next_seq;
        *next_seq = seq + 1;
        self.received += 1;
        let _ = latency_us.record(now.saturating_sub(due).max(1));
    }

    /// Adds the count to `stats`, with whatever never arrived from each
    /// publisher lost.
    fn finish(self, stats: &mut SubStats) {
        stats.received += self.received;
        stats.duplicated_or_reordered += self.duplicated_or_reordered;
        stats.lost += self.lost;
        for (p, sent) in &self.per_publisher {
            stats.lost += sent.saturating_sub(self.next[p]);
        }
    }
}

impl SubStats {
    fn new() -> SubStats {
        SubStats {
            received: 0,
            lost: 0,
            duplicated_or_reordered: 0,
            latency_us: Histogram::new(3).expect("valid histogram"),
        }
    }
}

fn subscriber(mut conn: Sub, mut state: SubState, schedule_end: Instant) -> SubStats {
    let mut stats = SubStats::new();
    while !state.complete() {
        let payload = match conn.recv() {
            Ok(payload) => payload,
            // Quiet before the schedule ends is not an end: at low rates one
            // publisher's messages can be further apart than QUIET_SECONDS.
            Err(e) if is_read_timeout(&e) && Instant::now() < schedule_end => continue,
            Err(_) => break,
        };
        state.on_payload(&payload, &mut stats.latency_us);
    }
    state.finish(&mut stats);
    stats
}

/// Subscribers sharing one thread (`--sub-threads`): non-blocking sockets
/// in one epoll set (level-triggered: a poll(2) over 12,500 sockets per
/// wait made the load generator the bottleneck), and every ready connection
/// read for a bounded turn. Ends when each is complete or closed, or after
/// QUIET_SECONDS without data once the schedule has ended.
fn subscribers_polled(mut subs: Vec<(Sub, SubState)>, schedule_end: Instant) -> Vec<SubStats> {
    use std::os::fd::AsRawFd;
    // SAFETY: epoll_create1 has no memory arguments; the descriptor is
    // closed below.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    let mut waiting = 0usize;
    for (i, (conn, state)) in subs.iter().enumerate() {
        if state.complete() || conn.stream().set_nonblocking(true).is_err() {
            continue;
        }
        let mut event = libc::epoll_event { events: libc::EPOLLIN as u32, u64: i as u64 };
        // SAFETY: `event` is a valid epoll_event; the fd is open.
        if unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, conn.stream().as_raw_fd(), &mut event) } == 0 {
            waiting += 1;
        }
    }
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut stats = SubStats::new();
    let mut last_data = Instant::now();
    // Connections whose turn ended at its frame limit: the WebSocket
    // reader may hold whole frames it read ahead, which epoll (watching the
    // socket) never announces again. Served again without waiting. (Before
    // this, the last frames of a burst could sit there unread and be
    // counted lost although the server had sent them.)
    let mut again: Vec<usize> = Vec::new();
    while waiting > 0 {
        let now = Instant::now();
        if now > schedule_end && now.duration_since(last_data) > Duration::from_secs(QUIET_SECONDS) {
            break;
        }
        let wait_ms = if again.is_empty() { 100 } else { 0 };
        // SAFETY: `events` holds `events.len()` writable epoll_event structs.
        let ready = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, wait_ms) };
        let mut turn: Vec<usize> = std::mem::take(&mut again);
        turn.extend(events.iter().take(ready.max(0) as usize).map(|e| e.u64 as usize));
        turn.sort_unstable();
        turn.dedup();
        for i in turn {
            let (conn, state) = &mut subs[i];
            if state.complete() {
                continue; // already removed from the set
            }
            let mut done = false;
            let mut dry = false;
            // A bounded turn per connection: one that never runs dry must
            // not starve the others on this thread.
            for _ in 0..POLLED_FRAMES_PER_TURN {
                match conn.recv() {
                    Ok(payload) => {
                        last_data = Instant::now();
                        state.on_payload(&payload, &mut stats.latency_us);
                        if state.complete() {
                            done = true;
                            break;
                        }
                    }
                    Err(e) if is_read_timeout(&e) => {
                        dry = true;
                        break;
                    }
                    Err(_) => {
                        done = true;
                        break;
                    }
                }
            }
            if !done && !dry {
                again.push(i);
            }
            if done {
                let fd = conn.stream().as_raw_fd();
                // SAFETY: removing an fd from the set; a null event is allowed for DEL.
                unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
                waiting -= 1;
            }
        }
    }
    // SAFETY: `epoll` is the descriptor created above, closed once.
    unsafe { libc::close(epoll) };
    for (_, state) in subs {
        state.finish(&mut stats);
    }
    vec![stats]
}

/// Whether `recv` failed only because nothing arrived within the read
/// timeout (the connection is still usable).
pub(crate) fn is_read_timeout(e: &anyhow::Error) -> bool {
    let timed_out =
        |io: &std::io::Error| matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut);
    e.chain().any(|cause| match cause.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Io(io)) => timed_out(io),
        _ => cause.downcast_ref::<std::io::Error>().is_some_and(timed_out),
    })
}

/// A subscription: a WebSocket on the target's own API.
enum Sub {
    Native(Conn),
    Original(tungstenite::WebSocket<crate::Stream>),
}

impl Sub {
    fn stream(&self) -> &TcpStream {
        match self {
            Sub::Native(conn) => conn.ws.get_ref(),
            Sub::Original(ws) => ws.get_ref(),
        }
    }

    fn recv(&mut self) -> Result<Vec<u8>> {
        match self {
            Sub::Native(conn) => conn.recv(),
            Sub::Original(ws) => loop {
                match ws.read()? {
                    tungstenite::Message::Binary(b) => return Ok(b.to_vec()),
                    tungstenite::Message::Text(t) => return Ok(t.as_bytes().to_vec()),
                    tungstenite::Message::Close(c) => bail!("closed by server: {c:?}"),
                    _ => {}
                }
            },
        }
    }
}

fn open_subscriber(target: &Target, topic: &str, original_api: bool) -> Result<Sub> {
    open_subscriber_from(target, topic, original_api, None)
}

/// Like `open_subscriber`, from a chosen local address (topic sockets and
/// native subscribers; the original API connects from the default).
fn open_subscriber_from(
    target: &Target,
    topic: &str,
    original_api: bool,
    source: Option<std::net::IpAddr>,
) -> Result<Sub> {
    if !original_api {
        let conn = Conn::open_from(target, topic, true, source)?;
        conn.ws.get_ref().set_read_timeout(Some(Duration::from_secs(QUIET_SECONDS)))?;
        return Ok(Sub::Native(conn));
    }
    let stream = crate::connect(&target.addr, None)?;
    stream.set_read_timeout(Some(Duration::from_secs(QUIET_SECONDS)))?;
    let stream = crate::Stream::new(stream, target.reads);
    let (mut ws, _) = tungstenite::client(format!("ws://{}/subscribe", target.addr), stream)
        .map_err(|e| anyhow::anyhow!("handshake: {e}"))?;
    let hello = serde_json::json!({ "subscriber_id": "fluxbench", "topic": topic }).to_string();
    ws.send(tungstenite::Message::text(hello))?;
    Ok(Sub::Original(ws))
}

/// Waits until the node reports `count` subscribers on `topic`.
fn wait_subscribed(target: &Target, topic: &str, count: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = http(&target.addr, "GET", &format!("/v1/topics/{topic}"), None)?;
        let have = if status == 200 {
            serde_json::from_str::<serde_json::Value>(&body)?["subscribers"].as_u64().unwrap_or(0)
        } else {
            0
        };
        if have >= count as u64 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {have} of {count} subscribers registered on {topic}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One HTTP/1.1 request on a fresh connection (setup only).
/// Topic `t` of a run tagged `tag`; with the target's `owner=`, a name
/// the cluster gives to that node (asked of the target's node), so that a
/// run can put publishers, owner and subscribers on three nodes.
fn topic_name(target: &Target, tag: &str, t: usize) -> Result<String> {
    let Some(want) = &target.owner else { return Ok(format!("{tag}.{t}")) };
    for k in 0..10_000 {
        let name = format!("{tag}.{t}.{k}");
        let (status, body) = http(&target.addr, "GET", &format!("/v1/cluster?topic={name}"), None)?;
        let view: serde_json::Value = serde_json::from_str(&body).context("the node's cluster view")?;
        if status != 200 {
            bail!("asking the owner of {name}: {status} {body}");
        }
        if view["owner"].as_str() == Some(want.as_str()) {
            return Ok(name);
        }
    }
    bail!("no topic name owned by {want} in 10,000 tries: is it a member?")
}

fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// A publisher: a WebSocket on the target's own API, or a keep-alive HTTP
/// connection for `POST /publish`.
enum Publisher {
    Native(Box<Conn>),
    Original { stream: TcpStream, topic: String, response: Vec<u8> },
}

impl Publisher {
    fn open(target: &Target, topic: &str, original_api: bool, batch: usize) -> Result<Publisher> {
        if !original_api && batch > 1 {
            return Ok(Publisher::Native(Box::new(Conn::open_batching(target, topic, batch)?)));
        }
        if !original_api {
            return Ok(Publisher::Native(Box::new(Conn::open(target, topic, false)?)));
        }
        let stream = crate::connect(&target.addr, None)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Publisher::Original { stream, topic: topic.to_string(), response: Vec::new() })
    }

    fn send(&mut self, payload: &[u8]) -> Result<()> {
        match self {
            Publisher::Native(conn) => conn.send(payload),
            Publisher::Original { stream, topic, response } => {
                let message = std::str::from_utf8(payload).context("payloads are text")?;
                let body = serde_json::json!({ "topic": topic, "message": message }).to_string();
                write!(
                    stream,
                    "POST /publish HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )?;
                read_one_response(stream, response)
            }
        }
    }

    fn flush(&mut self) -> Result<()> {
        match self {
            Publisher::Native(conn) => conn.flush(),
            Publisher::Original { .. } => Ok(()),
        }
    }

    /// Publish batches its replies refused (RayFlux, `--batch`).
    fn refused(&mut self) -> u64 {
        match self {
            Publisher::Native(conn) => conn.refused(),
            Publisher::Original { .. } => 0,
        }
    }
}

/// Reads one keep-alive response (head plus content-length body) and checks
/// it is a 200.
fn read_one_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<()> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                if !head.starts_with("http/1.1 200") {
                    bail!("publish refused: {}", String::from_utf8_lossy(&buf[..end + 4 + length]));
                }
                buf.drain(..end + 4 + length);
                return Ok(());
            }
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("server closed the publish connection");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_read_timeout_lets_a_subscriber_wait_on() {
        let would_block = std::io::Error::from(std::io::ErrorKind::WouldBlock);
        assert!(is_read_timeout(&anyhow::Error::from(tungstenite::Error::Io(would_block))));
        let timed_out = std::io::Error::from(std::io::ErrorKind::TimedOut);
        assert!(is_read_timeout(&anyhow::Error::from(timed_out).context("reading")));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(!is_read_timeout(&anyhow::Error::from(tungstenite::Error::Io(reset))));
        assert!(!is_read_timeout(&anyhow::anyhow!("closed by server")));
        assert!(!is_read_timeout(&anyhow::Error::from(tungstenite::Error::ConnectionClosed)));
    }

    #[test]
    fn payloads_round_trip_and_counts_add_up() {
        let p = encode(7, 123_456, 1_700_000_000_000_000, 64);
        assert_eq!(p.len(), 64);
        assert_eq!(decode(&p), Some((7, 123_456, 1_700_000_000_000_000)));
        assert_eq!(decode(b"short"), None);
        let shape = Shape {
            name: "t".into(),
            topics: 3,
            subscribers: 1,
            publishers: 4,
            rate: 1001,
            seconds: 1,
            payload: 64,
            batch: 1,
            original_api: false,
            stalled: 0,
            sub_threads: 0,
            linger_ms: 0,
            group: None,
            request: None,
        };
        let sum: u64 = (0..12).map(|g| shape.sent_by(g)).sum();
        assert_eq!(sum, 1001);
    }
}
