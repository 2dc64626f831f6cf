//! fluxbench: load generator and reporter for RayFlux and its peers.
//!
//! Scenarios (one shape underneath: T topics x S subscribers x P publishers
//! per topic, open-loop total rate): `fanout`, `topics` (many topics),
//! `fanin`, `original` (the original RayFlux benchmark shape on its API),
//! and `idle` (memory per idle connection). Targets, run in alternating
//! turns with per-turn ratios against the first:
//! - `rayflux://HOST:PORT`: FluxNode's raw topic sockets (or its original
//!   API with `original`);
//! - `nats://HOST:PORT`: NATS over WebSocket (the NATS protocol inside
//!   WebSocket frames: CONNECT, SUB, PUB, MSG, PING/PONG).
//!
//! Load is open-loop: message k is due at start + k/rate and its latency is
//! measured from that scheduled time (coordinated omission corrected). Every
//! payload carries its publisher, sequence and scheduled time; subscribers
//! count lost, duplicated and reordered messages per publisher. Publish
//! rate, delivery rate and latency are reported separately, with the
//! server's CPU-seconds per million deliveries (from /proc) and the load
//! generator's own CPU. `--max` searches for the highest zero-loss rate
//! under a p99 bound; `--hgrm` and `--plot` write percentile files and an
//! SVG chart.
//!
//! # Layout
//! - `main.rs`: command line, targets and connections, reporting, `--max`.
//! - `scenario.rs`: the publish/subscribe shape and its runner.
//! - `report.rs`: `.hgrm` percentile files and the SVG chart.
//! - `nats.rs`: sans-IO parser of NATS server operations.
//! - `jetstream.rs`: JetStream streams, consumers and pulling members (the
//!   group scenario's peer with acks).
//! - `request.rs`: the request/reply scenario.

mod jetstream;
mod nats;
mod report;
mod request;
mod scenario;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use tungstenite::{protocol::WebSocket, Message};

#[derive(Parser)]
#[command(name = "fluxbench", about = "Load generator for RayFlux and NATS over WebSocket")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One topic, one open-loop publisher, N subscribers.
    Fanout {
        /// Subscribers.
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        #[command(flatten)]
        common: Common,
    },
    /// T topics, S subscribers and P publishers per topic.
    Topics {
        /// Topics.
        #[arg(long, default_value_t = 1000)]
        topics: usize,
        /// Subscribers per topic.
        #[arg(long, default_value_t = 10)]
        subscribers: usize,
        /// Publishers per topic.
        #[arg(long, default_value_t = 4)]
        publishers: usize,
        #[command(flatten)]
        common: Common,
    },
    /// One topic, one publisher, N subscribers that read and K that
    /// subscribe and never read: do the readers stay whole and fast, and
    /// does the server's memory stay bounded?
    Slow {
        /// Subscribers that read.
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        /// Subscribers that never read.
        #[arg(long, default_value_t = 10)]
        stalled: usize,
        #[command(flatten)]
        common: Common,
    },
    /// One topic, one publisher, M members of one consumer group sharing its
    /// messages (RayFlux: a native group subscription with prefetch and
    /// cumulative acks; NATS: a core queue group, which has no acks, or with
    /// `jetstream=` a JetStream pull consumer with explicit acks). Each
    /// message must reach exactly one member.
    Group {
        /// Members.
        #[arg(long, default_value_t = 8)]
        members: usize,
        /// RayFlux and JetStream: unacknowledged messages a member holds.
        #[arg(long, default_value_t = 1000)]
        prefetch: u32,
        /// RayFlux: acknowledge each delivery by its sequence instead of
        /// every 64 cumulatively (JetStream members always ack each).
        #[arg(long)]
        ack_each: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Request/reply: R requesters send requests open-loop (at --rate
    /// together) to one topic, M responders answer each; latency is the
    /// round trip from the scheduled send. RayFlux: the native `request`
    /// op and a responder group; NATS: requests with reply subjects and a
    /// queue group of responders.
    Request {
        /// Requesters (one connection each).
        #[arg(long, default_value_t = 4)]
        requesters: usize,
        /// Responders.
        #[arg(long, default_value_t = 4)]
        responders: usize,
        /// RayFlux: requests a responder holds unanswered at most.
        #[arg(long, default_value_t = 100)]
        prefetch: u32,
        #[command(flatten)]
        common: Common,
    },
    /// Many publishers, one topic, one subscriber.
    Fanin {
        /// Publishers.
        #[arg(long, default_value_t = 100)]
        publishers: usize,
        #[command(flatten)]
        common: Common,
    },
    /// The original RayFlux benchmark shape on the original API: publishers
    /// on HTTP `POST /publish` (keep-alive), subscribers on WebSocket
    /// `/subscribe`. RayFlux targets only.
    Original {
        /// Topics.
        #[arg(long, default_value_t = 10)]
        topics: usize,
        /// Subscribers per topic.
        #[arg(long, default_value_t = 16)]
        subscribers: usize,
        /// Publishers per topic.
        #[arg(long, default_value_t = 4)]
        publishers: usize,
        #[command(flatten)]
        common: Common,
    },
    /// C idle WebSocket connections (each subscribed to one of T topics), held
    /// open; reports the server's resident memory per connection.
    Idle(IdleArgs),
}

/// Options every publish/subscribe scenario takes.
#[derive(clap::Args, Clone)]
struct Common {
    /// A target: `NAME=URL[,pid=PID][,durable=ACK][,jetstream=STORAGE][,publish=HOST:PORT][,owner=HOST:PORT][,delivery=D][,reads=BYTES]`,
    /// URL rayflux://HOST:PORT or nats://HOST:PORT; pid=A+B sums several
    /// servers' CPU (a cluster); publish=HOST:PORT (RayFlux) sends the
    /// publishers to another node of a cluster than the subscribers
    /// (cross-node delivery); owner=HOST:PORT (RayFlux) names the topics
    /// so that the cluster gives them to that member (with publish=, three
    /// nodes: two hops); durable=none|local|stored
    /// (RayFlux) declares each topic of a run durable with that ack level
    /// first; jetstream=memory|file (NATS, group scenario) uses a JetStream
    /// stream and pull consumer instead of a core queue group;
    /// delivery=single|batch (RayFlux) subscribes on the native protocol
    /// (`/v1/ws?delivery=D`, binary envelopes; `batch`: several deliveries
    /// per frame when they queue up) instead of raw topic sockets;
    /// reads=BYTES makes subscribers read at most that many bytes at a time
    /// (a client reading in small pieces; any target).
    /// Give two or more to run them in turns (A, B, A, B) and print ratios
    /// against the first. With pid, the server's CPU is read from /proc.
    #[arg(long = "target", required = true)]
    targets: Vec<String>,
    /// Messages per second offered, all publishers together.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Seconds of publishing per run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Payload bytes (at least 40: publisher, sequence and scheduled time).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Threads the subscribers share (0: one thread each). With N > 0 the
    /// subscribers are spread over N threads, each polling its connections
    /// and reading every frame (as a single-process application or a test
    /// harness does); such a client lags a little, and the server's cost
    /// per delivery then shows how it copes.
    #[arg(long, default_value_t = 0)]
    sub_threads: usize,
    /// Messages per publish frame (1: one each). RayFlux: native publish
    /// batches (binary frame 0x02 on /v1/ws, one reply each); NATS: that
    /// many PUBs in one WebSocket frame (its fastest publishing: pipelined
    /// PUBs in one write). A batch goes when full or when the publisher is
    /// ahead of its schedule.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// With --batch: while the publish loop is behind schedule, flush
    /// partly filled batches at most once per this many milliseconds
    /// (Kafka's `linger.ms`); 0: whenever 64 publishers hold messages.
    /// Many publishers at a high total rate otherwise send batches of one
    /// or two messages.
    #[arg(long, default_value_t = 0)]
    linger_ms: u64,
    /// Turns per target.
    #[arg(long, default_value_t = 2)]
    repeat: usize,
    /// Seconds of an unmeasured run against every target, at --rate, before
    /// the first turn (0: none). The first run of a fluxbench process (its
    /// threads, its memory) and of a fresh server is slower than the rest,
    /// and it would otherwise always fall on the first target.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Print one JSON object per run instead of the table.
    #[arg(long)]
    json: bool,
    /// Search each target for the highest rate with zero loss and p99 under
    /// this many milliseconds (starting at --rate, doubling, then bisecting;
    /// a rate fails only if two runs in a row fail).
    #[arg(long)]
    max: Option<f64>,
    /// Write each run's percentile distribution to `DIR/SCENARIO-TARGET-TURN.hgrm`.
    #[arg(long)]
    hgrm: Option<std::path::PathBuf>,
    /// Append every run as a JSON line to this file (as well as the table).
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
    /// Write an SVG percentile chart of every run to this file.
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
}

#[derive(clap::Args)]
struct IdleArgs {
    /// The target: NAME=URL,pid=PID (pid is required: memory comes from /proc).
    #[arg(long)]
    target: String,
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Topics the connections are spread over (connection i subscribes to
    /// topic i mod TOPICS).
    #[arg(long, default_value_t = 100)]
    topics: usize,
    /// Client source addresses 127.0.0.1 .. 127.0.0.N, used in turn: each
    /// gives another ~28,000 ephemeral ports, for connection counts past one
    /// address's port range (the open-files limit of both processes must
    /// allow the count too).
    #[arg(long, default_value_t = 1)]
    sources: u8,
}

/// Where to connect and how to read the server's CPU.
#[derive(Clone, Debug)]
struct Target {
    name: String,
    kind: Kind,
    addr: String,
    pid: Option<u32>,
    /// More servers whose CPU counts (`pid=A+B+C`: the nodes of a cluster).
    extra_pids: Vec<u32>,
    /// RayFlux only: where publishers connect, when not `addr` (another
    /// node of the same cluster).
    publish_addr: Option<String>,
    /// RayFlux only: the cluster member the run's topics are named to be
    /// owned by.
    owner: Option<String>,
    /// RayFlux only: declare each topic of a run durable with this default
    /// ack level (`none`, `local`, `stored`) before it starts.
    durable: Option<String>,
    /// NATS only: the group scenario goes through a JetStream stream with
    /// this storage (`memory`, `file`) and a pull consumer.
    jetstream: Option<String>,
    /// RayFlux only: subscribers use the native protocol with this
    /// delivery (`single`, `batch`) instead of raw topic sockets.
    delivery: Option<String>,
    /// Subscribers read at most this many bytes per read (0: no cap).
    reads: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Rayflux,
    Nats,
}

/// Appends NATS's `PUB subject len` with `payload` to `out`.
fn nats_pub(out: &mut Vec<u8>, subject: &str, payload: &[u8]) {
    out.extend_from_slice(format!("PUB {subject} {}\r\n", payload.len()).as_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// Appends the payloads of a native binary frame (a 0x01 message or a 0x02
/// batch of deliveries, docs/PROTOCOL.md) to `out`.
fn unpack_native(frame: &[u8], out: &mut std::collections::VecDeque<Vec<u8>>) -> Result<()> {
    let message = |m: &[u8]| -> Result<Vec<u8>> {
        let topic_len = *m.get(1).context("short message")? as usize;
        Ok(m.get(18 + topic_len..).context("short message")?.to_vec())
    };
    match frame.first() {
        Some(&proto::native::SERVER_BINARY_MESSAGE) => out.push_back(message(frame)?),
        Some(&proto::native::SERVER_BINARY_BATCH) => {
            let mut rest = &frame[1..];
            while !rest.is_empty() {
                let len = u32::from_be_bytes(rest.get(..4).context("short batch")?.try_into()?) as usize;
                let record = rest.get(4..4 + len).context("short batch")?;
                if record.first() == Some(&proto::native::SERVER_BINARY_MESSAGE) {
                    out.push_back(message(record)?);
                }
                rest = &rest[4 + len..];
            }
        }
        _ => bail!("unexpected binary frame from the node"),
    }
    Ok(())
}

/// A batching RayFlux publisher's replies (server frames, unmasked JSON),
/// read without waiting whenever it sends a batch, counting the refusals
/// among them. A thread per publisher reading them used to be 1,000
/// threads with 1,000 topics, and the load generator's own limit.
struct Refusals {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes kept from the previous read (a match may be cut in two).
    carry: usize,
    count: u64,
}

impl Refusals {
    const NEEDLE: &'static [u8] = b"\"ok\":false";

    fn new(stream: TcpStream) -> Refusals {
        Refusals { stream, buf: vec![0u8; 64 << 10], carry: 0, count: 0 }
    }

    /// Reads whatever replies have arrived, without waiting (`MSG_DONTWAIT`
    /// on this call only: the descriptor's flags are shared with the
    /// writing side, which stays blocking).
    fn drain(&mut self) {
        use std::os::fd::AsRawFd;
        loop {
            let room = &mut self.buf[self.carry..];
            // SAFETY: `room` is a valid, writable buffer of `room.len()` bytes.
            let n = unsafe {
                libc::recv(self.stream.as_raw_fd(), room.as_mut_ptr().cast(), room.len(), libc::MSG_DONTWAIT)
            };
            if n <= 0 {
                return; // nothing more now, or the connection ended
            }
            let end = self.carry + n as usize;
            let found = self.buf[..end].windows(Self::NEEDLE.len()).filter(|w| *w == Self::NEEDLE).count();
            self.count += found as u64;
            // Keeps a tail shorter than the needle: a match cut in two is
            // counted once, with the next read.
            self.carry = (Self::NEEDLE.len() - 1).min(end);
            self.buf.copy_within(end - self.carry..end, 0);
        }
    }
}

fn parse_target(spec: &str) -> Result<Target> {
    let (name, rest) = spec.split_once('=').context("target must be NAME=URL[,pid=PID]")?;
    let mut parts = rest.split(',');
    let url = parts.next().unwrap_or_default();
    let (kind, addr) = if let Some(a) = url.strip_prefix("rayflux://") {
        (Kind::Rayflux, a)
    } else if let Some(a) = url.strip_prefix("nats://") {
        (Kind::Nats, a)
    } else {
        bail!("unknown target URL {url}: use rayflux://HOST:PORT or nats://HOST:PORT");
    };
    let mut pid = None;
    let mut extra_pids = Vec::new();
    let mut publish_addr = None;
    let mut owner = None;
    let mut durable = None;
    let mut jetstream = None;
    let mut delivery = None;
    let mut reads = 0;
    for p in parts {
        match p.split_once('=') {
            Some(("pid", v)) => {
                let mut pids = v.split('+').map(|p| p.parse::<u32>().context("pid"));
                pid = pids.next().transpose()?;
                extra_pids = pids.collect::<Result<_>>()?;
            }
            Some(("publish", v)) if kind == Kind::Rayflux => publish_addr = Some(v.to_string()),
            Some(("owner", v)) if kind == Kind::Rayflux => owner = Some(v.to_string()),
            Some(("durable", v)) if kind == Kind::Rayflux => durable = Some(v.to_string()),
            Some(("jetstream", v)) if kind == Kind::Nats && matches!(v, "memory" | "file") => {
                jetstream = Some(v.to_string())
            }
            Some(("delivery", v)) if kind == Kind::Rayflux && matches!(v, "single" | "batch") => {
                delivery = Some(v.to_string())
            }
            Some(("reads", v)) => reads = v.parse().context("reads=BYTES")?,
            _ => bail!("unknown target option {p}"),
        }
    }
    Ok(Target {
        name: name.to_string(),
        kind,
        addr: addr.to_string(),
        pid,
        extra_pids,
        publish_addr,
        owner,
        durable,
        jetstream,
        delivery,
        reads,
    })
}

impl Target {
    /// CPU seconds of every server process named (`pid=`), summed; `None`
    /// without `pid=`.
    fn server_cpu_seconds(&self) -> Result<Option<f64>> {
        let Some(first) = self.pid else { return Ok(None) };
        let mut total = process_cpu_seconds(first)?;
        for pid in &self.extra_pids {
            total += process_cpu_seconds(*pid)?;
        }
        Ok(Some(total))
    }
}

/// A RayFlux group delivery's tag and sequence.
type TagSeq = (u64, u64);

/// A benchmark connection's socket. `read_max` > 0 caps every read at that
/// many bytes (the target's `reads=`): a client that reads a little at a
/// time, whatever arrived (tungstenite itself asks for 4 KiB).
pub(crate) struct Stream {
    tcp: TcpStream,
    read_max: usize,
}

impl Stream {
    pub(crate) fn new(tcp: TcpStream, read_max: usize) -> Stream {
        Stream { tcp, read_max }
    }
}

impl std::ops::Deref for Stream {
    type Target = TcpStream;
    fn deref(&self) -> &TcpStream {
        &self.tcp
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let len = match self.read_max {
            0 => buf.len(),
            max => buf.len().min(max),
        };
        self.tcp.read(&mut buf[..len])
    }
}

impl std::io::Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tcp.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}

/// A connection to a target, as publisher or subscriber.
struct Conn {
    ws: WebSocket<Stream>,
    kind: Kind,
    subject: String,
    nats: nats::Parser,
    /// A JetStream member's pulling.
    pull: Option<jetstream::Pull>,
    /// A batching publisher's messages not sent yet.
    batch: Option<Batch>,
    /// RayFlux: a native subscriber (`delivery=`), whose binary frames are
    /// envelopes (0x01) or batches of them (0x02).
    native_sub: bool,
    /// Payloads unpacked from a batch and not yet returned.
    unpacked: std::collections::VecDeque<Vec<u8>>,
}

/// A publisher's batch being filled (see `--batch`).
struct Batch {
    size: usize,
    pending: Vec<Vec<u8>>,
    next_id: u64,
    /// RayFlux: its replies, read as batches go.
    replies: Option<Box<Refusals>>,
}

impl Conn {
    fn new(ws: WebSocket<Stream>, kind: Kind, topic: &str) -> Conn {
        Conn {
            ws,
            kind,
            subject: topic.to_string(),
            nats: nats::Parser::default(),
            pull: None,
            batch: None,
            native_sub: false,
            unpacked: std::collections::VecDeque::new(),
        }
    }

    fn open(target: &Target, topic: &str, subscribe: bool) -> Result<Conn> {
        Conn::open_from(target, topic, subscribe, None)
    }

    /// A member of consumer group `bench` of `topic`: RayFlux's native
    /// group subscription, or a NATS queue subscription.
    fn open_member(target: &Target, topic: &str, prefetch: u32) -> Result<Conn> {
        let mut conn = Conn::open_native(target, topic)?;
        match conn.kind {
            Kind::Rayflux => conn.native_subscribe(
                serde_json::json!({"op":"subscribe","id":1,"topic":topic,"group":"bench","prefetch":prefetch}),
            )?,
            Kind::Nats => conn.nats_start(Some(format!("SUB {topic} bench 1\r\n")))?,
        }
        Ok(conn)
    }

    /// A RayFlux native-protocol connection (`/v1/ws`) about `topic`, or a
    /// NATS connection not yet started.
    fn open_native(target: &Target, topic: &str) -> Result<Conn> {
        let stream = connect(&target.addr, None)?;
        let url = match target.kind {
            Kind::Rayflux => format!("ws://{}/v1/ws", target.addr),
            Kind::Nats => format!("ws://{}/", target.addr),
        };
        let (ws, _) =
            tungstenite::client(url, Stream::new(stream, 0)).map_err(|e| anyhow::anyhow!("handshake: {e}"))?;
        Ok(Conn::new(ws, target.kind, topic))
    }

    /// A member's next delivery: the payload and, on RayFlux, its tag and
    /// sequence. A JetStream member's is acknowledged already.
    fn recv_member(&mut self) -> Result<(Vec<u8>, Option<TagSeq>)> {
        if self.pull.is_some() {
            return Ok((self.recv_pulled()?, None));
        }
        if self.kind == Kind::Nats {
            return Ok((self.recv()?, None));
        }
        loop {
            let Message::Text(t) = self.ws.read()? else { continue };
            let m: serde_json::Value = serde_json::from_str(&t)?;
            if m["type"] == "message" {
                let data = m["data"].as_str().context("a text payload")?.as_bytes().to_vec();
                let numbers = m["tag"].as_u64().zip(m["seq"].as_u64());
                return Ok((data, numbers));
            }
        }
    }

    /// RayFlux: acknowledges every delivery through `tag` (queued; sent
    /// with the next flush).
    fn ack_through(&mut self, tag: u64) -> Result<()> {
        let ack = serde_json::json!({"op":"ack","topic":self.subject,"group":"bench","through_tag":tag});
        self.ws.write(Message::text(ack.to_string()))?;
        Ok(())
    }

    /// RayFlux: acknowledges the delivery of `seq` (queued).
    fn ack_seq(&mut self, seq: u64) -> Result<()> {
        let ack = serde_json::json!({"op":"ack","topic":self.subject,"group":"bench","seq":seq});
        self.ws.write(Message::text(ack.to_string()))?;
        Ok(())
    }

    /// Queues one text message (the group scenario: RayFlux then delivers
    /// `data` as text, no base64).
    fn send_text(&mut self, payload: &[u8]) -> Result<()> {
        match self.kind {
            Kind::Rayflux => self.ws.write(Message::text(String::from_utf8_lossy(payload).into_owned()))?,
            Kind::Nats => return self.send(payload),
        }
        Ok(())
    }

    /// Like `open`, from a chosen local address.
    fn open_from(target: &Target, topic: &str, subscribe: bool, source: Option<std::net::IpAddr>) -> Result<Conn> {
        let addr = match (&target.publish_addr, subscribe) {
            (Some(publish), false) => publish,
            _ => &target.addr,
        };
        let stream = connect(addr, source)?;
        let native = subscribe && target.delivery.is_some();
        let url = match (target.kind, &target.delivery) {
            (Kind::Rayflux, Some(delivery)) if subscribe => format!("ws://{addr}/v1/ws?delivery={delivery}"),
            (Kind::Rayflux, _) => {
                format!("ws://{addr}/v1/topics/{topic}/ws?role={}", if subscribe { "sub" } else { "pub" })
            }
            (Kind::Nats, _) => format!("ws://{}/", target.addr),
        };
        let (ws, _) = tungstenite::client(url, Stream::new(stream, if subscribe { target.reads } else { 0 }))
            .map_err(|e| anyhow::anyhow!("handshake: {e}"))?;
        let mut conn = Conn::new(ws, target.kind, topic);
        if conn.kind == Kind::Nats {
            conn.nats_start(subscribe.then(|| format!("SUB {topic} 1\r\n")))?;
        }
        if native {
            conn.native_subscribe(serde_json::json!({"op": "subscribe", "id": 1, "topic": topic}))?;
            conn.native_sub = true;
        }
        Ok(conn)
    }

    /// RayFlux native: sends a `subscribe` request (plain or a group join)
    /// and waits for its successful reply.
    fn native_subscribe(&mut self, request: serde_json::Value) -> Result<()> {
        self.ws.send(Message::text(request.to_string()))?;
        let reply: serde_json::Value = match self.ws.read()? {
            Message::Text(t) => serde_json::from_str(&t)?,
            other => bail!("expected the subscription's reply, got {other:?}"),
        };
        if reply["ok"] != true {
            bail!("subscription refused: {reply}");
        }
        Ok(())
    }

    /// NATS: CONNECT, then `sub` if any, and waits for the PONG that proves
    /// both were processed (the subscription is live from here on).
    fn nats_start(&mut self, sub: Option<String>) -> Result<()> {
        // Headers: JetStream's pull status messages come with them.
        self.nats_command(
            b"CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"echo\":false,\"headers\":true}\r\n",
        )?;
        if let Some(sub) = sub {
            self.nats_command(sub.as_bytes())?;
        }
        self.nats_command(b"PING\r\n")?;
        self.ws.flush()?;
        loop {
            match self.next_op()? {
                nats::Op::Pong => return Ok(()),
                nats::Op::Err(e) => bail!("NATS refused: {e}"),
                _ => {}
            }
        }
    }

    fn nats_command(&mut self, bytes: &[u8]) -> Result<()> {
        self.ws.write(Message::binary(bytes.to_vec()))?;
        Ok(())
    }

    /// A publisher sending batches of `size` messages to `topic` (see
    /// `--batch`): RayFlux's native protocol, whose replies are read as
    /// batches go (counting refusals), or NATS.
    fn open_batching(target: &Target, topic: &str, size: usize) -> Result<Conn> {
        let mut replies = None;
        let mut conn = match target.kind {
            Kind::Rayflux => {
                let addr = target.publish_addr.as_ref().unwrap_or(&target.addr);
                let stream = connect(addr, None)?;
                replies = Some(Box::new(Refusals::new(stream.try_clone()?)));
                let (ws, _) = tungstenite::client(format!("ws://{addr}/v1/ws"), Stream::new(stream, 0))
                    .map_err(|e| anyhow::anyhow!("handshake: {e}"))?;
                Conn::new(ws, Kind::Rayflux, topic)
            }
            Kind::Nats => Conn::open(target, topic, false)?,
        };
        conn.batch = Some(Batch { size, pending: Vec::with_capacity(size), next_id: 1, replies });
        Ok(conn)
    }

    /// Sends the batch filled so far, if any.
    fn send_batch(&mut self) -> Result<()> {
        let Some(batch) = self.batch.as_mut().filter(|b| !b.pending.is_empty()) else { return Ok(()) };
        let frame = match self.kind {
            Kind::Rayflux => {
                let refs: Vec<&[u8]> = batch.pending.iter().map(Vec::as_slice).collect();
                batch.next_id += 1;
                proto::native::encode_batch(batch.next_id, &self.subject, &refs)
            }
            Kind::Nats => {
                let mut frame = Vec::new();
                for p in &batch.pending {
                    nats_pub(&mut frame, &self.subject, p);
                }
                frame
            }
        };
        batch.pending.clear();
        if let Some(replies) = batch.replies.as_mut() {
            replies.drain();
        }
        self.ws.write(Message::binary(frame))?;
        Ok(())
    }

    /// Refusals a batching RayFlux publisher's replies reported so far.
    fn refused(&mut self) -> u64 {
        let Some(replies) = self.batch.as_mut().and_then(|b| b.replies.as_mut()) else { return 0 };
        replies.drain();
        replies.count
    }

    /// Queues one message (flushed by `flush` or when the buffer fills).
    fn send(&mut self, payload: &[u8]) -> Result<()> {
        if let Some(batch) = self.batch.as_mut() {
            batch.pending.push(payload.to_vec());
            if batch.pending.len() >= batch.size {
                self.send_batch()?;
            }
            return Ok(());
        }
        match self.kind {
            Kind::Rayflux => self.ws.write(Message::binary(payload.to_vec()))?,
            Kind::Nats => {
                let mut frame = Vec::with_capacity(payload.len() + 32);
                nats_pub(&mut frame, &self.subject, payload);
                self.ws.write(Message::binary(frame))?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.send_batch()?;
        self.ws.flush()?;
        Ok(())
    }

    /// The next delivered payload.
    fn recv(&mut self) -> Result<Vec<u8>> {
        match self.kind {
            Kind::Rayflux if self.native_sub => loop {
                if let Some(payload) = self.unpacked.pop_front() {
                    return Ok(payload);
                }
                match self.ws.read()? {
                    Message::Binary(b) => unpack_native(&b, &mut self.unpacked)?,
                    Message::Close(c) => bail!("closed by server: {c:?}"),
                    _ => {} // text: replies and notices
                }
            },
            Kind::Rayflux => loop {
                match self.ws.read()? {
                    Message::Binary(b) => return Ok(b.to_vec()),
                    Message::Text(t) => return Ok(t.as_bytes().to_vec()),
                    Message::Close(c) => bail!("closed by server: {c:?}"),
                    _ => {}
                }
            },
            Kind::Nats => loop {
                match self.next_op()? {
                    nats::Op::Msg(payload) | nats::Op::MsgReply { payload, .. } => return Ok(payload),
                    nats::Op::Ping => {
                        self.nats_command(b"PONG\r\n")?;
                        self.ws.flush()?;
                    }
                    nats::Op::Err(e) => bail!("NATS error: {e}"),
                    _ => {}
                }
            },
        }
    }

    fn next_op(&mut self) -> Result<nats::Op> {
        loop {
            if let Some(op) = self.nats.next_op() {
                return Ok(op);
            }
            match self.ws.read()? {
                Message::Binary(b) => self.nats.push(&b),
                Message::Text(t) => self.nats.push(t.as_bytes()),
                Message::Close(c) => bail!("closed by server: {c:?}"),
                _ => {}
            }
        }
    }
}

/// One run of one target.
struct Run {
    target: String,
    scenario: String,
    turn: usize,
    rate: u64,
    published: u64,
    publish_seconds: f64,
    delivered: u64,
    lost: u64,
    duplicated_or_reordered: u64,
    latency_us: Histogram<u64>,
    server_cpu_seconds: Option<f64>,
    /// Server resident memory before and after publishing, KiB.
    server_rss_kib: Option<(u64, u64)>,
    client_cpu_seconds: f64,
}

impl Run {
    fn new(target: &str, scenario: &str, turn: usize, published: u64, publish_seconds: f64) -> Result<Run> {
        Ok(Run {
            target: target.to_string(),
            scenario: scenario.to_string(),
            turn,
            rate: 0,
            published,
            publish_seconds,
            delivered: 0,
            lost: 0,
            duplicated_or_reordered: 0,
            latency_us: Histogram::new(3)?,
            server_cpu_seconds: None,
            server_rss_kib: None,
            client_cpu_seconds: 0.0,
        })
    }
    fn delivered_per_sec(&self) -> f64 {
        self.delivered as f64 / self.publish_seconds
    }
    fn server_cpu_per_million(&self) -> Option<f64> {
        self.server_cpu_seconds.map(|c| c / (self.delivered as f64 / 1e6))
    }
    fn p(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }
}

fn main() -> Result<()> {
    // Reads that find nothing (a read timeout, a polled socket's
    // WouldBlock) are errors on their way up, and with RUST_BACKTRACE=1 in
    // the environment anyhow captured a backtrace for each: polled
    // subscribers then spent their time unwinding, and 10,000 topics showed
    // deliveries seconds late that the node had written within 5 ms.
    // Panics keep their backtraces (RUST_BACKTRACE).
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    let cli = Cli::parse();
    let shape = |name: &str, topics, subscribers, publishers, common: &Common, original_api| scenario::Shape {
        stalled: 0,
        group: None,
        request: None,
        name: name.to_string(),
        topics,
        subscribers,
        publishers,
        rate: common.rate,
        seconds: common.seconds,
        payload: common.payload,
        batch: common.batch.clamp(1, proto::native::PUBLISH_BATCH_MAX),
        original_api,
        sub_threads: common.sub_threads,
        linger_ms: common.linger_ms,
    };
    match cli.command {
        Command::Fanout { subscribers, common } => run_all(shape("fanout", 1, subscribers, 1, &common, false), &common),
        Command::Topics { topics, subscribers, publishers, common } => {
            run_all(shape("topics", topics, subscribers, publishers, &common, false), &common)
        }
        Command::Slow { subscribers, stalled, common } => {
            let shape = scenario::Shape { stalled, ..shape("slow", 1, subscribers, 1, &common, false) };
            run_all(shape, &common)
        }
        Command::Group { members, prefetch, ack_each, common } => {
            let group = Some(scenario::GroupShape { prefetch, ack_each });
            let shape = scenario::Shape { group, ..shape("group", 1, members, 1, &common, false) };
            run_all(shape, &common)
        }
        Command::Request { requesters, responders, prefetch, common } => {
            let request = Some(request::RequestShape { responders, prefetch });
            let shape = scenario::Shape { request, ..shape("request", 1, responders, requesters, &common, false) };
            run_all(shape, &common)
        }
        Command::Fanin { publishers, common } => run_all(shape("fanin", 1, 1, publishers, &common, false), &common),
        Command::Original { topics, subscribers, publishers, common } => {
            run_all(shape("original", topics, subscribers, publishers, &common, true), &common)
        }
        Command::Idle(args) => idle(args),
    }
}

/// Most connections one idle worker thread holds: each worker has a
/// descriptor table of its own, and the open-files limit (20,000 on the
/// machines this was written on, which root cannot raise) bounds each table,
/// not the process. 15,000 leaves room for everything else a table holds.
const IDLE_CONNECTIONS_PER_WORKER: usize = 15_000;

fn idle(args: IdleArgs) -> Result<()> {
    let target = parse_target(&args.target)?;
    let pid = target.pid.context("idle needs pid= in the target to read the server's memory")?;
    let topics = args.topics.max(1);
    let before = process_rss_kib(pid)?;
    let workers = args.connections.div_ceil(IDLE_CONNECTIONS_PER_WORKER).max(1);
    let start = Instant::now();
    let (opened_tx, opened_rx) = std::sync::mpsc::channel::<Result<()>>();
    let mut go = Vec::with_capacity(workers);
    let mut handles = Vec::with_capacity(workers);
    for worker in 0..workers {
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        go.push(go_tx);
        let (target, opened_tx, sources) = (target.clone(), opened_tx.clone(), args.sources);
        let first = worker * args.connections / workers;
        let last = (worker + 1) * args.connections / workers;
        handles.push(std::thread::spawn(move || -> usize {
            // Several workers: each leaves the shared descriptor table for a
            // copy of its own, so the limit applies to each (see above).
            // SAFETY: unshare(CLONE_FILES) only copies this thread's table.
            if workers > 1 && unsafe { libc::unshare(libc::CLONE_FILES) } != 0 {
                let _ = opened_tx.send(Err(std::io::Error::last_os_error()).context("unshare(CLONE_FILES)"));
                return 0;
            }
            let mut held = Vec::with_capacity(last - first);
            for i in first..last {
                let source =
                    (sources > 1).then(|| std::net::IpAddr::from([127, 0, 0, 1 + (i % sources as usize) as u8]));
                match Conn::open_from(&target, &format!("idle.{}", i % topics), true, source) {
                    Ok(conn) => held.push(conn),
                    Err(e) => {
                        let _ = opened_tx.send(Err(e.context(format!("connection {i}"))));
                        return 0;
                    }
                }
            }
            let _ = opened_tx.send(Ok(()));
            if go_rx.recv().is_err() {
                return 0;
            }
            let mut delivered = 0;
            for conn in &mut held {
                let got = conn.ws.get_ref().set_read_timeout(Some(std::time::Duration::from_secs(10)));
                if got.is_ok() && conn.recv().is_ok() {
                    delivered += 1;
                }
            }
            delivered
        }));
    }
    drop(opened_tx);
    for _ in 0..workers {
        opened_rx.recv().context("an idle worker stopped")??;
    }
    let opened = start.elapsed().as_secs_f64();
    // Every subscription was live before its handshake answer, so nothing is
    // pending: the memory now is the idle connections' cost.
    let after = process_rss_kib(pid)?;
    let per_connection = (after.saturating_sub(before)) as f64 * 1024.0 / args.connections as f64;
    println!(
        "{}: {} idle subscribed connections opened in {opened:.1}s by {workers} worker(s); server RSS {before} KiB -> {after} KiB: {per_connection:.0} bytes per connection",
        target.name, args.connections
    );
    // Then traffic: one message per topic, and every connection must get it.
    let mut publisher = Conn::open(&target, "idle.0", false)?;
    let sent = Instant::now();
    for t in 0..topics {
        publisher.subject = format!("idle.{t}");
        if target.kind == Kind::Rayflux {
            publisher = Conn::open(&target, &format!("idle.{t}"), false)?;
        }
        publisher.send(&scenario::encode(0, t as u64, unix_micros(), scenario::PAYLOAD_BYTES_MIN))?;
        publisher.flush()?;
    }
    for go_tx in go {
        let _ = go_tx.send(());
    }
    let delivered: usize = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
    println!(
        "{}: then one message per topic: delivered to {delivered} of {} connections in {:.2}s",
        target.name,
        args.connections,
        sent.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Resident set of a process, KiB.
fn process_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")
}

/// The turn number a warm-up run's topics are named with (apart from every
/// measured turn's).
const WARMUP_TURN: usize = 999;

/// Runs a shape against every target in turns (or searches each for its
/// maximum), prints or writes the results.
fn run_all(shape: scenario::Shape, common: &Common) -> Result<()> {
    let targets = common.targets.iter().map(|t| parse_target(t)).collect::<Result<Vec<_>>>()?;
    if common.warmup > 0 {
        let warmup = scenario::Shape { seconds: common.warmup, ..shape.clone() };
        for target in &targets {
            let run = one_run(target, &warmup, WARMUP_TURN)?;
            eprintln!(
                "  {} warm-up @{}/s for {}s: lost {}, p99 {:.2} ms (not counted)",
                target.name,
                warmup.rate,
                warmup.seconds,
                run.lost,
                run.latency_us.value_at_quantile(0.99) as f64 / 1000.0
            );
        }
    }
    let mut runs = Vec::new();
    for turn in 0..common.repeat {
        for target in &targets {
            let run = match common.max {
                Some(p99_ms) => max_search(target, &shape, turn, p99_ms)?,
                None => one_run(target, &shape, turn)?,
            };
            if common.json {
                println!("{}", run_json(&run, &shape));
            } else {
                print_run(&run);
            }
            if let Some(path) = &common.json_out {
                use std::io::Write;
                let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
                writeln!(file, "{}", run_json(&run, &shape))?;
            }
            runs.push(run);
        }
    }
    if !common.json && targets.len() > 1 {
        print_ratios(&runs, &targets);
    }
    if let Some(dir) = &common.hgrm {
        std::fs::create_dir_all(dir)?;
        for r in &runs {
            let file = dir.join(format!("{}-{}-{}.hgrm", r.scenario, r.target, r.turn));
            std::fs::write(&file, report::hgrm(&r.latency_us)).with_context(|| format!("{}", file.display()))?;
        }
    }
    if let Some(file) = &common.plot {
        let curves: Vec<(String, &Histogram<u64>)> =
            runs.iter().map(|r| (format!("{} turn {} @{}/s", r.target, r.turn, r.rate), &r.latency_us)).collect();
        let title = format!(
            "{}: {} topic(s) x {} subscriber(s), {} publisher(s) per topic",
            shape.name, shape.topics, shape.subscribers, shape.publishers
        );
        std::fs::write(file, report::svg(&title, &curves)).with_context(|| format!("{}", file.display()))?;
    }
    Ok(())
}

/// A benchmark connection to `addr` (`ip:port` when `source` is given), from
/// `source` if given, with Nagle off. It closes with a reset (`SO_LINGER` 0):
/// a search opens thousands of connections per probe, and closed ones left
/// in TIME_WAIT for a minute ran the loopback out of source ports after a
/// few probes ("Cannot assign requested address"). Nothing is in flight when
/// a run drops its connections.
pub(crate) fn connect(addr: &str, source: Option<std::net::IpAddr>) -> Result<TcpStream> {
    let stream = match source {
        None => TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?,
        Some(ip) => {
            let remote: std::net::SocketAddr = addr.parse().context("a source address needs an ip:port target")?;
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.bind(&std::net::SocketAddr::new(ip, 0).into())?;
            socket.connect(&remote.into()).with_context(|| format!("connect {remote} from {ip}"))?;
            socket.into()
        }
    };
    stream.set_nodelay(true)?;
    socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO))?;
    Ok(stream)
}

fn one_run(target: &Target, shape: &scenario::Shape, turn: usize) -> Result<Run> {
    let mut run = scenario::run(target, shape, turn)?;
    run.rate = shape.rate;
    Ok(run)
}

/// The highest rate with zero loss and p99 under `p99_ms` (see `search`).
fn max_search(target: &Target, shape: &scenario::Shape, turn: usize, p99_ms: f64) -> Result<Run> {
    let passes = |r: &Run| r.lost == 0 && r.duplicated_or_reordered == 0 && r.p(0.99) <= p99_ms;
    search(shape.rate, |rate, confirming| {
        let run = one_run(target, &scenario::Shape { rate, ..shape.clone() }, turn)?;
        let pass = passes(&run);
        eprintln!(
            "  {} @{}/s{}: lost {} p99 {:.2} ms -> {}",
            target.name,
            rate,
            if confirming { " (again)" } else { "" },
            run.lost,
            run.p(0.99),
            if pass { "pass" } else { "fail" }
        );
        Ok((pass, run))
    })
}

/// Most runs one search makes, confirmations included.
const SEARCH_RUNS_MAX: usize = 20;

/// From `start`, double while runs pass (halve while they fail), then bisect
/// between the highest pass and the lowest failure until they are within
/// 1/16 of each other. A rate fails only when it fails twice in a row: on a
/// loaded 2-core machine one run's p99 can spike from a stray stall alone,
/// and a single spike would otherwise send the search down for good. Returns
/// the best passing run, or the last failure if nothing down to 1 msg/s
/// passed. `try_rate(rate, confirming)` runs once and says whether it passed.
fn search<R>(start: u64, mut try_rate: impl FnMut(u64, bool) -> Result<(bool, R)>) -> Result<R> {
    let mut rate = start.max(1);
    let mut best: Option<(u64, R)> = None;
    let mut lowest_failure: Option<(u64, R)> = None;
    let mut runs = 0;
    while runs < SEARCH_RUNS_MAX {
        let (mut pass, mut run) = try_rate(rate, false)?;
        runs += 1;
        if !pass && runs < SEARCH_RUNS_MAX {
            (pass, run) = try_rate(rate, true)?;
            runs += 1;
        }
        if pass {
            best = Some((rate, run));
        } else {
            lowest_failure = Some((rate, run));
        }
        let low = best.as_ref().map(|b| b.0);
        let high = lowest_failure.as_ref().map(|f| f.0);
        rate = match (low, high) {
            (Some(low), None) => low * 2,
            (None, Some(high)) if high > 1 => high / 2,
            (Some(low), Some(high)) if high - low > high / 16 => (low + high) / 2,
            _ => break,
        };
    }
    best.or(lowest_failure).map(|(_, run)| run).context("no run")
}

fn print_run(r: &Run) {
    println!(
        "{:<8} {} turn {}  published {:>9.0}/s  delivered {:>11.0}/s  lost {:>6}  dup/reord {:>3}  latency ms p50 {:>7.2} p99 {:>7.2} p99.9 {:>7.2} max {:>7.2}  server {} {}  client CPU {:.2}s",
        r.target,
        r.scenario,
        r.turn,
        r.published as f64 / r.publish_seconds,
        r.delivered_per_sec(),
        r.lost,
        r.duplicated_or_reordered,
        r.p(0.5),
        r.p(0.99),
        r.p(0.999),
        r.latency_us.max() as f64 / 1000.0,
        r.server_cpu_per_million().map(|c| format!("{c:.3} CPU-s/M")).unwrap_or_else(|| "CPU n/a".into()),
        r.server_rss_kib.map(|(a, b)| format!("RSS {a}->{b} KiB")).unwrap_or_default(),
        r.client_cpu_seconds,
    );
}

fn run_json(r: &Run, shape: &scenario::Shape) -> String {
    serde_json::json!({
        "scenario": r.scenario, "target": r.target, "turn": r.turn,
        "topics": shape.topics, "subscribers_per_topic": shape.subscribers, "publishers_per_topic": shape.publishers,
        "rate": r.rate, "payload_bytes": shape.payload,
        "published": r.published, "publish_seconds": r.publish_seconds,
        "delivered": r.delivered, "delivered_per_sec": r.delivered_per_sec(),
        "lost": r.lost, "duplicated_or_reordered": r.duplicated_or_reordered,
        "latency_ms": { "p50": r.p(0.5), "p90": r.p(0.9), "p99": r.p(0.99), "p999": r.p(0.999), "max": r.latency_us.max() as f64 / 1000.0 },
        "server_cpu_seconds": r.server_cpu_seconds, "server_cpu_seconds_per_million": r.server_cpu_per_million(),
        "server_rss_kib_before": r.server_rss_kib.map(|m| m.0), "server_rss_kib_after": r.server_rss_kib.map(|m| m.1),
        "stalled_subscribers_per_topic": shape.stalled,
        "client_cpu_seconds": r.client_cpu_seconds,
    })
    .to_string()
}

/// Per-turn ratios of every target against the first.
fn print_ratios(runs: &[Run], targets: &[Target]) {
    let base = &targets[0].name;
    for other in &targets[1..] {
        println!("\nratios {} / {} per turn:", base, other.name);
        for turn in runs.iter().map(|r| r.turn).collect::<std::collections::BTreeSet<_>>() {
            let a = runs.iter().find(|r| r.turn == turn && &r.target == base);
            let b = runs.iter().find(|r| r.turn == turn && r.target == other.name);
            if let (Some(a), Some(b)) = (a, b) {
                let cpu = match (a.server_cpu_per_million(), b.server_cpu_per_million()) {
                    (Some(x), Some(y)) => format!("{:.2}", x / y),
                    _ => "n/a".into(),
                };
                println!(
                    "  turn {turn}: delivered/s {:.2}  server CPU per delivery {cpu}  p99 {:.2}  p50 {:.2}",
                    a.delivered_per_sec() / b.delivered_per_sec(),
                    a.p(0.99) / b.p(0.99),
                    a.p(0.5) / b.p(0.5),
                );
            }
        }
    }
}

fn unix_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// utime + stime of a process, seconds (clock ticks of 100 Hz).
fn process_cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("/proc/{pid}/stat"))?;
    let after = &stat[stat.rfind(')').context("stat format")? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake target: passes at `capacity` msg/s and below, except on the
    /// runs listed in `spikes` (by index); records every rate tried.
    fn fake(capacity: u64, spikes: &[usize]) -> (u64, Vec<u64>) {
        let mut tried = Vec::new();
        let found = search(1000, |rate, _| {
            let spike = spikes.contains(&tried.len());
            tried.push(rate);
            Ok((rate <= capacity && !spike, rate))
        })
        .unwrap();
        (found, tried)
    }

    #[test]
    fn the_search_finds_the_capacity_within_a_sixteenth() {
        let (found, _) = fake(5_000, &[]);
        assert!(found <= 5_000 && found > 5_000 - 5_000 / 16, "{found}");
        let (found, tried) = fake(300, &[]);
        assert!(found <= 300 && found > 300 - 300 / 16, "{found}");
        assert_eq!(tried[..3], [1000, 1000, 500], "a failure is confirmed before halving");
    }

    #[test]
    fn one_spike_does_not_send_the_search_down() {
        // The first run spikes (a cold start): confirmed as a pass, and the
        // search goes on up.
        let (found, tried) = fake(5_000, &[0]);
        assert!(found > 5_000 - 5_000 / 16, "{found} after {tried:?}");
        assert_eq!(tried[..3], [1000, 1000, 2000]);
    }

    #[test]
    fn nothing_passes_gives_the_last_failure() {
        let (found, tried) = fake(0, &[]);
        assert_eq!(found, tried[tried.len() - 1]);
        assert!(tried.len() <= SEARCH_RUNS_MAX);
    }
}
