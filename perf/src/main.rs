//! fluxbench: load generator and reporter for RayFlux and its peers.
//!
//! This first version has one scenario, `fanout` (one topic, one publisher,
//! N subscribers), against two kinds of target, run in alternating turns:
//! - `rayflux://HOST:PORT`: FluxNode's raw topic socket;
//! - `nats://HOST:PORT`: NATS over WebSocket (the NATS protocol inside
//!   WebSocket frames: CONNECT, SUB, PUB, MSG, PING/PONG).
//!
//! Load is open-loop: message i is due at start + i/rate and its latency is
//! measured from that scheduled time (coordinated omission corrected). Every
//! payload carries its sequence and scheduled time; subscribers count lost,
//! duplicated and reordered messages. Publish rate, delivery rate and
//! latency are reported separately, with the server's CPU-seconds per
//! million deliveries (from /proc) and the load generator's own CPU.
//!
//! # Layout
//! - `main.rs`: command line, the fan-out scenario, reporting.
//! - `nats.rs`: sans-IO parser of NATS server operations.

mod nats;

use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
    Fanout(FanoutArgs),
    /// C idle WebSocket connections (each subscribed to one of T topics), held
    /// open; reports the server's resident memory per connection.
    Idle(IdleArgs),
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
}

#[derive(clap::Args)]
struct FanoutArgs {
    /// A target: NAME=URL[,pid=PID], URL rayflux://HOST:PORT or nats://HOST:PORT.
    /// Give two or more to run them in turns (A, B, A, B) and print ratios
    /// against the first. With pid, the server's CPU is read from /proc.
    #[arg(long = "target", required = true)]
    targets: Vec<String>,
    /// Subscribers (one connection and one thread each).
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Messages per second offered by the publisher.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Seconds of publishing per run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Payload bytes (at least 16: sequence and scheduled time).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Turns per target.
    #[arg(long, default_value_t = 2)]
    repeat: usize,
    /// Print one JSON object per run instead of the table.
    #[arg(long)]
    json: bool,
}

/// Where to connect and how to read the server's CPU.
#[derive(Clone, Debug)]
struct Target {
    name: String,
    kind: Kind,
    addr: String,
    pid: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Rayflux,
    Nats,
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
    for p in parts {
        match p.split_once('=') {
            Some(("pid", v)) => pid = Some(v.parse().context("pid")?),
            _ => bail!("unknown target option {p}"),
        }
    }
    Ok(Target { name: name.to_string(), kind, addr: addr.to_string(), pid })
}

/// A connection to a target, as publisher or subscriber.
struct Conn {
    ws: WebSocket<TcpStream>,
    kind: Kind,
    subject: String,
    nats: nats::Parser,
}

impl Conn {
    fn open(target: &Target, topic: &str, subscribe: bool) -> Result<Conn> {
        let stream = TcpStream::connect(&target.addr).with_context(|| format!("connect {}", target.addr))?;
        stream.set_nodelay(true)?;
        let url = match target.kind {
            Kind::Rayflux => {
                format!("ws://{}/v1/topics/{topic}/ws?role={}", target.addr, if subscribe { "sub" } else { "pub" })
            }
            Kind::Nats => format!("ws://{}/", target.addr),
        };
        let (ws, _) = tungstenite::client(url, stream).map_err(|e| anyhow::anyhow!("handshake: {e}"))?;
        let mut conn = Conn { ws, kind: target.kind, subject: topic.to_string(), nats: nats::Parser::default() };
        if conn.kind == Kind::Nats {
            conn.nats_command(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"protocol\":1,\"echo\":false}\r\n")?;
            if subscribe {
                conn.nats_command(format!("SUB {topic} 1\r\n").as_bytes())?;
            }
            // The PONG proves CONNECT (and SUB) were processed: the
            // subscription is live from here on.
            conn.nats_command(b"PING\r\n")?;
            conn.ws.flush()?;
            loop {
                match conn.next_op()? {
                    nats::Op::Pong => break,
                    nats::Op::Err(e) => bail!("NATS refused: {e}"),
                    _ => {}
                }
            }
        }
        Ok(conn)
    }

    fn nats_command(&mut self, bytes: &[u8]) -> Result<()> {
        self.ws.write(Message::binary(bytes.to_vec()))?;
        Ok(())
    }

    /// Queues one message (flushed by `flush` or when the buffer fills).
    fn send(&mut self, payload: &[u8]) -> Result<()> {
        match self.kind {
            Kind::Rayflux => self.ws.write(Message::binary(payload.to_vec()))?,
            Kind::Nats => {
                let mut frame = format!("PUB {} {}\r\n", self.subject, payload.len()).into_bytes();
                frame.extend_from_slice(payload);
                frame.extend_from_slice(b"\r\n");
                self.ws.write(Message::binary(frame))?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.ws.flush()?;
        Ok(())
    }

    /// The next delivered payload.
    fn recv(&mut self) -> Result<Vec<u8>> {
        match self.kind {
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
                    nats::Op::Msg(payload) => return Ok(payload),
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

/// What one subscriber saw.
struct SubStats {
    received: u64,
    lost: u64,
    duplicated_or_reordered: u64,
    latency_us: Histogram<u64>,
}

/// One run of one target.
struct Run {
    target: String,
    turn: usize,
    published: u64,
    publish_seconds: f64,
    delivered: u64,
    lost: u64,
    duplicated_or_reordered: u64,
    latency_us: Histogram<u64>,
    server_cpu_seconds: Option<f64>,
    client_cpu_seconds: f64,
}

impl Run {
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
    let cli = Cli::parse();
    match cli.command {
        Command::Fanout(args) => fanout(args),
        Command::Idle(args) => idle(args),
    }
}

fn idle(args: IdleArgs) -> Result<()> {
    let target = parse_target(&args.target)?;
    let pid = target.pid.context("idle needs pid= in the target to read the server's memory")?;
    let before = process_rss_kib(pid)?;
    let mut held = Vec::with_capacity(args.connections);
    let start = Instant::now();
    for i in 0..args.connections {
        held.push(
            Conn::open(&target, &format!("idle.{}", i % args.topics.max(1)), true)
                .with_context(|| format!("connection {i}"))?,
        );
    }
    let opened = start.elapsed().as_secs_f64();
    // Let the server settle: every subscription was live before its handshake
    // answer, so nothing is pending; read memory twice to see it is stable.
    let after = process_rss_kib(pid)?;
    let per_connection = (after.saturating_sub(before)) as f64 * 1024.0 / args.connections as f64;
    println!(
        "{}: {} idle subscribed connections opened in {opened:.1}s; server RSS {before} KiB -> {after} KiB: {per_connection:.0} bytes per connection",
        target.name, args.connections
    );
    drop(held);
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

fn fanout(args: FanoutArgs) -> Result<()> {
    if args.payload < 16 {
        bail!("--payload must be at least 16 bytes");
    }
    let targets = args.targets.iter().map(|t| parse_target(t)).collect::<Result<Vec<_>>>()?;
    let mut runs = Vec::new();
    for turn in 0..args.repeat {
        for target in &targets {
            let run = fanout_run(target, &args, turn)?;
            if args.json {
                println!("{}", run_json(&run, &args));
            } else {
                print_run(&run);
            }
            runs.push(run);
        }
    }
    if !args.json && targets.len() > 1 {
        print_ratios(&runs, &targets);
    }
    Ok(())
}

fn fanout_run(target: &Target, args: &FanoutArgs, turn: usize) -> Result<Run> {
    let topic = format!("fluxbench.{}.{turn}.{}", target.name, std::process::id());
    let total = args.rate * args.seconds;
    let mut subscribers = Vec::new();
    for _ in 0..args.subscribers {
        let mut conn = Conn::open(target, &topic, true)?;
        conn.ws.get_mut().set_read_timeout(Some(Duration::from_secs(5)))?;
        subscribers.push(std::thread::spawn(move || subscriber(conn, total)));
    }
    let mut publisher = Conn::open(target, &topic, false)?;
    let cpu_server_start = target.pid.map(process_cpu_seconds).transpose()?;
    let cpu_client_start = process_cpu_seconds(std::process::id())?;
    let start = Instant::now();
    let start_unix_us = unix_micros();
    let mut payload = vec![0u8; args.payload];
    for seq in 0..total {
        let due_us = seq * 1_000_000 / args.rate;
        let elapsed_us = start.elapsed().as_micros() as u64;
        if elapsed_us < due_us {
            publisher.flush()?;
            std::thread::sleep(Duration::from_micros(due_us - elapsed_us));
        }
        payload[..8].copy_from_slice(&seq.to_le_bytes());
        payload[8..16].copy_from_slice(&(start_unix_us + due_us).to_le_bytes());
        publisher.send(&payload)?;
    }
    publisher.flush()?;
    let publish_seconds = start.elapsed().as_secs_f64();
    let mut run = Run {
        target: target.name.clone(),
        turn,
        published: total,
        publish_seconds,
        delivered: 0,
        lost: 0,
        duplicated_or_reordered: 0,
        latency_us: Histogram::new(3)?,
        server_cpu_seconds: None,
        client_cpu_seconds: 0.0,
    };
    for s in subscribers {
        let stats = s.join().map_err(|_| anyhow::anyhow!("subscriber thread panicked"))?;
        run.delivered += stats.received;
        run.lost += stats.lost;
        run.duplicated_or_reordered += stats.duplicated_or_reordered;
        run.latency_us.add(&stats.latency_us)?;
    }
    if let (Some(pid), Some(before)) = (target.pid, cpu_server_start) {
        run.server_cpu_seconds = Some(process_cpu_seconds(pid)? - before);
    }
    run.client_cpu_seconds = process_cpu_seconds(std::process::id())? - cpu_client_start;
    drop(publisher);
    Ok(run)
}

/// Reads until every message arrived or the stream is quiet for 5 s.
fn subscriber(mut conn: Conn, total: u64) -> SubStats {
    let mut stats = SubStats {
        received: 0,
        lost: 0,
        duplicated_or_reordered: 0,
        latency_us: Histogram::new(3).expect("valid histogram"),
    };
    let mut next_seq = 0u64;
    while next_seq < total {
        let Ok(payload) = conn.recv() else { break };
        let now = unix_micros();
        if payload.len() < 16 {
            continue;
        }
        let seq = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
        let due = u64::from_le_bytes(payload[8..16].try_into().expect("8 bytes"));
        if seq < next_seq {
            stats.duplicated_or_reordered += 1;
            continue;
        }
        stats.lost += seq - next_seq;
        next_seq = seq + 1;
        stats.received += 1;
        let _ = stats.latency_us.record(now.saturating_sub(due).max(1));
    }
    stats.lost += total - next_seq.min(total);
    stats
}

fn print_run(r: &Run) {
    println!(
        "{:<8} turn {}  published {:>9.0}/s  delivered {:>11.0}/s  lost {:>6}  dup/reord {:>3}  latency ms p50 {:>7.2} p99 {:>7.2} p99.9 {:>7.2} max {:>7.2}  server {}  client CPU {:.2}s",
        r.target,
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
        r.client_cpu_seconds,
    );
}

fn run_json(r: &Run, args: &FanoutArgs) -> String {
    serde_json::json!({
        "scenario": "fanout", "target": r.target, "turn": r.turn,
        "subscribers": args.subscribers, "rate": args.rate, "payload_bytes": args.payload,
        "published": r.published, "publish_seconds": r.publish_seconds,
        "delivered": r.delivered, "delivered_per_sec": r.delivered_per_sec(),
        "lost": r.lost, "duplicated_or_reordered": r.duplicated_or_reordered,
        "latency_ms": { "p50": r.p(0.5), "p90": r.p(0.9), "p99": r.p(0.99), "p999": r.p(0.999), "max": r.latency_us.max() as f64 / 1000.0 },
        "server_cpu_seconds": r.server_cpu_seconds, "server_cpu_seconds_per_million": r.server_cpu_per_million(),
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
