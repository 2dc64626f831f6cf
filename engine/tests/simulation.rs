//! A seeded, deterministic simulation of the node's sans-IO decisions: the
//! sequencers of several shards (`Owner`: sequencing, history, resume,
//! epochs, eviction) and connections' send queues (`Outbound`: caps, the
//! `drop` and `disconnect` policies, missed ranges, the peer's close),
//! driven by random publishes, subscribes, unsubscribes, resumes, stalled
//! and slow readers, peer closes, disconnects and node restarts. After every
//! step the invariants are checked:
//!
//! - sequence numbers are contiguous and strictly increasing per topic
//!   epoch;
//! - every subscriber sees each epoch's messages in order, without
//!   duplicates, and only from the epoch its subscription was granted;
//! - nothing is lost unless it was announced to that subscriber (a
//!   `dropped` notice, a history gap, or a lost history on resume): checked
//!   whenever a live connection's queue and pending notices are empty. A
//!   connection that dies takes its unsent notices with it; its client saw
//!   the jump in sequence numbers, and resumes from the highest it saw;
//! - every queue stays within its cap plus one frame and the control slack,
//!   pending drop ranges within one per topic, every sequencer within its
//!   topic limit, and no client address keeps more than its share of a
//!   sequencer's topics subscribed.
//!
//! The glue between the two (what `shard.rs` does with a grant and a
//! delivery) is modelled here in a few lines; it moves into the simulation
//! proper once the broker is a state machine of its own (issue 11).
//!
//! `cargo test --test simulation` runs `SIM_SEEDS` seeds (default 200) of
//! `SIM_STEPS` steps (default 20,000); the ignored `long_run` runs 1,000
//! seeds of 100,000. A failure names its seed and step: rerun it with
//! `SIM_SEED=n`.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fluxnode::config::SlowConsumerPolicy;
use fluxnode::limits::CONTROL_SLACK_BYTES;
use fluxnode::message::{Now, PayloadKind};
use fluxnode::outbound::{Frame, Offer, Outbound};
use fluxnode::owner::{Epoch, Owner, OwnerLimits, ResumeFrom, Resumed};
use fluxnode::topic::TopicName;
use fluxnode::{native, ws};

/// Topics in play: more than the shards together may hold, so that
/// eviction happens.
const TOPICS: usize = 12;
/// Sequencers (one per simulated shard).
const SHARDS: usize = 3;
/// Topics each sequencer may hold.
const TOPICS_PER_SHARD: usize = 3;
/// Messages each topic retains.
const HISTORY_MESSAGES: usize = 8;
/// Send-queue cap per connection: a few frames, so that policies trigger.
const QUEUE_CAP_BYTES: usize = 600;
/// Largest data frame the simulation makes: header, 17 bytes of identity,
/// up to 150 bytes of padding.
const FRAME_BYTES_MAX: usize = 4 + 17 + 150;
/// Live connections at most.
const CONNECTIONS_MAX: usize = 8;
/// Client addresses the connections come from.
const ADDRESSES: u8 = 2;
/// Topics one address may keep subscribed in one sequencer: below
/// `TOPICS_PER_SHARD`, so that the share is reached.
const CLIENT_PINS_MAX: usize = 2;

#[test]
fn seeds() {
    let steps = env_or("SIM_STEPS", 20_000);
    if let Ok(seed) = std::env::var("SIM_SEED") {
        let seed = seed.parse().expect("SIM_SEED is a number");
        return run_or_panic(seed, steps);
    }
    for seed in 0..env_or("SIM_SEEDS", 200) {
        run_or_panic(seed, steps);
    }
}

#[test]
#[ignore = "long: 1,000 seeds of 100,000 steps; cargo test --release --test simulation -- --ignored"]
fn long_run() {
    for seed in 0..env_or("SIM_SEEDS", 1_000) {
        run_or_panic(seed, env_or("SIM_STEPS", 100_000));
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn run_or_panic(seed: u64, steps: u64) {
    let mut sim = Sim::new(seed);
    for step in 0..steps {
        if let Err(why) = sim.step() {
            panic!("seed {seed} step {step}: {why} (rerun: SIM_SEED={seed} SIM_STEPS={steps})");
        }
    }
    let s = &sim.stats;
    assert!(s.published > 0 && s.delivered > 0, "seed {seed}: nothing happened");
    eprintln!(
        "seed {seed}: {steps} steps, {} published, {} delivered, {} dropped and announced, {} disconnects, \
         {} lost histories, {} gaps, {} restarts, {} quiescence checks",
        s.published, s.delivered, s.announced, s.disconnects, s.lost, s.gaps, s.restarts, s.quiescent
    );
}

/// SplitMix64: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// What a client knows of one topic.
#[derive(Debug, Clone)]
struct ClientTopic {
    /// The sequence space its subscription was granted.
    epoch: Epoch,
    /// Highest sequence received.
    last_seen: u64,
    /// Sequences skipped over (below `last_seen`, never received).
    missing: BTreeSet<u64>,
    /// Sequences the node said this client would not get.
    announced: BTreeSet<u64>,
}

/// One connection: the node's side (queue, subscriptions) and the client's.
struct Conn {
    out: Rc<Outbound>,
    /// The client's address: topics its subscriptions keep are charged to it.
    addr: IpAddr,
    /// Node side: topic -> last sequence queued (`Subscriber::last_seq`).
    subs: HashMap<usize, u64>,
    /// Client side.
    client: HashMap<usize, ClientTopic>,
    /// Topics unsubscribed whose reply the client has not read yet: frames
    /// queued before the unsubscribe still arrive (in order, before the
    /// reply, as on the native protocol), so the client keeps its state
    /// until the reply and does not subscribe again before it.
    leaving: BTreeSet<usize>,
    /// Bytes the client reads per turn; 0 is a stalled reader.
    read_bytes: usize,
}

#[derive(Default)]
struct Stats {
    published: u64,
    delivered: u64,
    announced: u64,
    disconnects: u64,
    lost: u64,
    gaps: u64,
    restarts: u64,
    quiescent: u64,
}

struct Sim {
    rng: Rng,
    names: Vec<TopicName>,
    owners: Vec<Owner>,
    conns: Vec<Conn>,
    /// Clients whose connection died, with what they knew: they come back
    /// and resume.
    waiting: Vec<HashMap<usize, ClientTopic>>,
    /// Live connections subscribed, per topic (the owner hears of the last).
    subscribed: Vec<usize>,
    /// Last sequence assigned per (topic, epoch).
    assigned: HashMap<(usize, Epoch), u64>,
    start: Instant,
    step: u64,
    stats: Stats,
}

type Check = Result<(), String>;

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let owners = new_owners(&mut rng);
        Sim {
            rng,
            names: (0..TOPICS).map(|t| TopicName::new(&format!("t{t}")).expect("valid")).collect(),
            owners,
            conns: Vec::new(),
            waiting: Vec::new(),
            subscribed: vec![0; TOPICS],
            assigned: HashMap::new(),
            start: Instant::now(),
            step: 0,
            stats: Stats::default(),
        }
    }

    /// Simulated time: one millisecond a step, never the wall clock.
    fn now(&self) -> Instant {
        self.start + Duration::from_millis(self.step)
    }

    fn step(&mut self) -> Check {
        self.step += 1;
        match self.rng.below(1000) {
            0..=449 => {
                let t = self.rng.below(TOPICS);
                self.publish(t)?
            }
            450..=749 => self.read()?,
            750..=819 => self.subscribe()?,
            820..=859 => self.unsubscribe(),
            860..=899 => self.connect(),
            900..=949 => self.resume()?,
            950..=979 => self.peer_close(),
            980..=996 => self.set_reader_speed(),
            _ => self.restart(),
        }
        self.check_bounds()
    }

    fn publish(&mut self, t: usize) -> Check {
        let name = self.names[t].clone();
        let now = self.now();
        let padding = Bytes::from(vec![0u8; self.rng.below(151)]);
        let owner = &mut self.owners[name.owner_shard(SHARDS)];
        let Ok((message, _)) = owner.publish(&name, PayloadKind::Binary, padding, Now { at: now, unix_ms: 0 }) else {
            return Ok(()); // every topic of the shard has subscribers: refused
        };
        let epoch = owner.stat(&name).expect("just published").epoch;
        let last = self.assigned.entry((t, epoch)).or_insert(0);
        if message.seq != *last + 1 {
            return Err(format!("topic {t} epoch {epoch}: seq {} after {}", message.seq, last));
        }
        *last = message.seq;
        self.stats.published += 1;
        let frame = Frame::data(data_frame(t, epoch, message.seq, &message.payload), now);
        let mut dead = Vec::new();
        for (i, conn) in self.conns.iter_mut().enumerate() {
            let Some(queued) = conn.subs.get_mut(&t) else { continue };
            if message.seq <= *queued {
                continue;
            }
            *queued = message.seq;
            if conn.out.offer_data(&frame, &name, message.seq) == Offer::Disconnected {
                dead.push(i);
            }
        }
        for i in dead.into_iter().rev() {
            self.stats.disconnects += 1;
            self.kill(i);
        }
        Ok(())
    }

    /// One connection's writer and client take a turn: pending notices are
    /// queued as the writer does, then the client reads what it reads.
    fn read(&mut self) -> Check {
        if self.conns.is_empty() {
            return Ok(());
        }
        let i = self.rng.below(self.conns.len());
        let conn = &mut self.conns[i];
        while let Some(m) = conn.out.next_missed_if_room() {
            if !conn.out.offer_control(native::dropped_notice(&m.topic, m.from_seq, m.to_seq, m.dropped)) {
                return Err("a notice that fit its room closed the connection".into());
            }
        }
        let (mut bytes, mut published) = (Vec::new(), Vec::new());
        if conn.read_bytes > 0 && !conn.out.is_empty() {
            conn.out.take_batch(&mut bytes, conn.read_bytes, &mut published);
        }
        for frame in parse_frames(&bytes)? {
            match frame {
                Parsed::Data { topic, epoch, seq } => {
                    self.stats.delivered += 1;
                    receive(conn, topic, epoch, seq)?;
                }
                Parsed::Unsubscribed { topic } => {
                    conn.client.remove(&topic);
                    conn.leaving.remove(&topic);
                }
                Parsed::Dropped { topic, from_seq, to_seq, count } => {
                    if count == 0 || count > to_seq - from_seq + 1 {
                        return Err(format!("notice {from_seq}..={to_seq} counts {count}"));
                    }
                    self.stats.announced += count;
                    if let Some(c) = conn.client.get_mut(&topic) {
                        c.announced.extend(from_seq..=to_seq);
                    }
                }
            }
        }
        if conn.out.is_empty() && conn.out.missed_pending() == 0 {
            self.stats.quiescent += 1;
            quiescent(conn)?;
        }
        Ok(())
    }

    fn subscribe(&mut self) -> Check {
        if self.conns.is_empty() {
            return Ok(());
        }
        let i = self.rng.below(self.conns.len());
        let t = self.rng.below(TOPICS);
        if self.conns[i].subs.contains_key(&t) || self.conns[i].leaving.contains(&t) {
            return Ok(());
        }
        self.grant(i, t, None)
    }

    /// Subscribes connection `i` to topic `t`, resuming from `from`, and
    /// applies the grant as `shard::granted` does.
    fn grant(&mut self, i: usize, t: usize, from: Option<ClientTopic>) -> Check {
        let name = self.names[t].clone();
        let now = self.now();
        let resume = from.as_ref().map(|c| ResumeFrom { after_seq: c.last_seen, epoch: Some(c.epoch) });
        let Ok(grant) = self.owners[name.owner_shard(SHARDS)].subscribe(&name, 0, self.conns[i].addr, resume, now)
        else {
            return Ok(()); // no room for the topic: refused, nothing promised
        };
        self.subscribed[t] += 1;
        let conn = &mut self.conns[i];
        let mut client = ClientTopic {
            epoch: grant.epoch,
            last_seen: grant.last_seq,
            missing: BTreeSet::new(),
            announced: BTreeSet::new(),
        };
        match (grant.resumed, from) {
            (Resumed::Live, _) => {}
            (Resumed::Lost(_), _) => self.stats.lost += 1,
            (Resumed::Replayed { gap }, Some(from)) => {
                if from.epoch != grant.epoch {
                    return Err(format!("topic {t}: replayed from epoch {} into {}", from.epoch, grant.epoch));
                }
                client = ClientTopic { missing: BTreeSet::new(), ..from };
                if let Some(gap) = gap {
                    self.stats.gaps += 1;
                    client.announced.extend(gap.from_seq..=gap.to_seq);
                }
            }
            (Resumed::Replayed { .. }, None) => return Err("replayed without a resume".into()),
        }
        conn.client.insert(t, client);
        for message in &grant.replay {
            let frame = Frame::data(data_frame(t, grant.epoch, message.seq, &message.payload), now);
            if conn.out.offer_data(&frame, &name, message.seq) == Offer::Disconnected {
                conn.subs.insert(t, grant.last_seq);
                self.stats.disconnects += 1;
                self.kill(i);
                return Ok(());
            }
        }
        conn.subs.insert(t, grant.last_seq);
        Ok(())
    }

    fn unsubscribe(&mut self) {
        if self.conns.is_empty() {
            return;
        }
        let i = self.rng.below(self.conns.len());
        let Some(&t) = self.conns[i].subs.keys().min() else { return };
        let conn = &mut self.conns[i];
        conn.subs.remove(&t);
        conn.out.forget_missed(&self.names[t]);
        conn.leaving.insert(t);
        let reply = serde_json::json!({ "type": "unsubscribed", "topic": t }).to_string();
        let replied = conn.out.offer_control(ws::encode_data(PayloadKind::Text, reply.as_bytes()));
        self.left(t);
        if !replied {
            // Replies not read past the cap and the slack: closed with 4008.
            self.stats.disconnects += 1;
            self.kill(i);
        }
    }

    fn connect(&mut self) {
        if self.conns.len() >= CONNECTIONS_MAX {
            return;
        }
        let policy = if self.rng.below(2) == 0 { SlowConsumerPolicy::Drop } else { SlowConsumerPolicy::Disconnect };
        let read_bytes = self.reader_speed();
        let addr = self.address();
        self.conns.push(Conn {
            out: Rc::new(Outbound::new(QUEUE_CAP_BYTES, policy)),
            addr,
            subs: HashMap::new(),
            client: HashMap::new(),
            leaving: BTreeSet::new(),
            read_bytes,
        });
    }

    /// A client whose connection died comes back on a new one and resumes
    /// every topic it had, from what it had seen, naming the epoch.
    fn resume(&mut self) -> Check {
        if self.waiting.is_empty() || self.conns.len() >= CONNECTIONS_MAX {
            return Ok(());
        }
        let known = self.waiting.swap_remove(self.rng.below(self.waiting.len()));
        self.connect();
        let out = self.conns.last().expect("just connected").out.clone();
        let mut topics: Vec<_> = known.into_iter().collect();
        topics.sort_by_key(|(t, _)| *t);
        for (t, client) in topics {
            // A connection can die during its replays (disconnect policy).
            let Some(i) = self.conns.iter().position(|c| Rc::ptr_eq(&c.out, &out)) else { break };
            self.grant(i, t, Some(client))?;
        }
        Ok(())
    }

    /// The client closes: its queue is discarded at once and nothing more is
    /// queued (RFC 6455 5.5.1).
    fn peer_close(&mut self) {
        if self.conns.is_empty() {
            return;
        }
        let i = self.rng.below(self.conns.len());
        let out = self.conns[i].out.clone();
        out.peer_closed(1000);
        let frame = Frame::data(data_frame(0, Epoch(0), 1, &[]), self.now());
        let after = out.offer_data(&frame, &self.names[0], u64::MAX);
        assert!(out.is_empty() && after == Offer::Closed, "a closed queue takes nothing");
        self.kill(i);
    }

    fn set_reader_speed(&mut self) {
        if !self.conns.is_empty() {
            let i = self.rng.below(self.conns.len());
            self.conns[i].read_bytes = self.reader_speed();
        }
    }

    /// A reader: stalled, slow (one small frame a turn) or fast.
    /// A client address, some connections sharing one.
    fn address(&mut self) -> IpAddr {
        address(self.rng.below(ADDRESSES as usize) as u8)
    }

    fn reader_speed(&mut self) -> usize {
        [0, 1, 200, 2000, 1 << 20][self.rng.below(5)]
    }

    /// `kill -9` and a restart: every sequencer starts afresh with a new
    /// seed, every connection dies, every client will resume.
    fn restart(&mut self) {
        self.stats.restarts += 1;
        while !self.conns.is_empty() {
            self.kill(self.conns.len() - 1);
        }
        self.owners = new_owners(&mut self.rng);
        self.subscribed = vec![0; TOPICS];
    }

    /// Connection `i` is gone; its client waits to resume.
    fn kill(&mut self, i: usize) {
        let conn = self.conns.swap_remove(i);
        for &t in conn.subs.keys() {
            self.left(t);
        }
        if !conn.client.is_empty() {
            self.waiting.push(conn.client);
        }
    }

    /// A subscription to `t` ended; the last one tells the owner.
    fn left(&mut self, t: usize) {
        self.subscribed[t] -= 1;
        if self.subscribed[t] == 0 {
            let name = &self.names[t];
            let now = self.now();
            self.owners[name.owner_shard(SHARDS)].unsubscribe(name, 0, now);
        }
    }

    fn check_bounds(&self) -> Check {
        for (i, conn) in self.conns.iter().enumerate() {
            let bound = QUEUE_CAP_BYTES + FRAME_BYTES_MAX + CONTROL_SLACK_BYTES;
            if conn.out.queued_bytes() > bound {
                return Err(format!("connection {i}: {} bytes queued, bound {bound}", conn.out.queued_bytes()));
            }
            if conn.out.missed_pending() > TOPICS {
                return Err(format!("connection {i}: {} missed ranges pending", conn.out.missed_pending()));
            }
        }
        for (shard, owner) in self.owners.iter().enumerate() {
            if owner.len() > TOPICS_PER_SHARD {
                return Err(format!("shard {shard} holds {} topics", owner.len()));
            }
            for a in 0..ADDRESSES {
                let pinned = owner.pinned_by(address(a));
                if pinned > CLIENT_PINS_MAX {
                    return Err(format!("shard {shard}: address {a} keeps {pinned} topics subscribed"));
                }
            }
        }
        Ok(())
    }
}

fn new_owners(rng: &mut Rng) -> Vec<Owner> {
    let limits = OwnerLimits {
        topics_max: TOPICS_PER_SHARD,
        history_messages_max: HISTORY_MESSAGES,
        history_bytes_max: 1 << 20,
        client_pins_max: CLIENT_PINS_MAX,
    };
    (0..SHARDS).map(|_| Owner::new(limits, rng.next())).collect()
}

/// The simulation's client address `n`.
fn address(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
}

/// A client receives a message.
fn receive(conn: &mut Conn, topic: usize, epoch: Epoch, seq: u64) -> Check {
    let Some(c) = conn.client.get_mut(&topic) else {
        return Err(format!("topic {topic}: message {seq} on a connection not subscribed"));
    };
    if epoch != c.epoch {
        return Err(format!("topic {topic}: message of epoch {epoch} on a subscription to {}", c.epoch));
    }
    if seq <= c.last_seen {
        return Err(format!("topic {topic}: seq {seq} after {} (duplicate or out of order)", c.last_seen));
    }
    c.missing.extend(c.last_seen + 1..seq);
    c.last_seen = seq;
    Ok(())
}

/// Nothing is queued or pending for a live connection: everything it
/// skipped must have been announced.
fn quiescent(conn: &mut Conn) -> Check {
    for (t, c) in conn.client.iter_mut() {
        if let Some(silent) = c.missing.iter().find(|s| !c.announced.contains(s)) {
            return Err(format!("topic {t}: seq {silent} never arrived and was never announced"));
        }
        c.missing.clear();
        let below = c.last_seen + 1;
        c.announced = c.announced.split_off(&below); // what is settled is forgotten
    }
    Ok(())
}

/// A data frame naming its topic, epoch and sequence, then padding.
fn data_frame(topic: usize, epoch: Epoch, seq: u64, padding: &[u8]) -> Bytes {
    let mut payload = vec![topic as u8];
    payload.extend_from_slice(&epoch.0.to_be_bytes());
    payload.extend_from_slice(&seq.to_be_bytes());
    payload.extend_from_slice(padding);
    ws::encode_data(PayloadKind::Binary, &payload)
}

enum Parsed {
    Data { topic: usize, epoch: Epoch, seq: u64 },
    Dropped { topic: usize, from_seq: u64, to_seq: u64, count: u64 },
    Unsubscribed { topic: usize },
}

/// Parses what a client read: whole server frames only (a batch holds whole
/// frames).
fn parse_frames(mut bytes: &[u8]) -> Result<Vec<Parsed>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let end = ws::frame_end_at(bytes, 0, 1);
        let (frame, rest) = bytes.split_at(end);
        bytes = rest;
        let header = if frame[1] & 0x7f == 126 { 4 } else { 2 };
        let payload = &frame[header..];
        out.push(match frame[0] & 0x0f {
            0x2 => Parsed::Data {
                topic: payload[0] as usize,
                epoch: Epoch(u64::from_be_bytes(payload[1..9].try_into().expect("8 bytes"))),
                seq: u64::from_be_bytes(payload[9..17].try_into().expect("8 bytes")),
            },
            0x1 => {
                let notice: serde_json::Value = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
                if notice["type"] == "unsubscribed" {
                    out.push(Parsed::Unsubscribed { topic: notice["topic"].as_u64().ok_or("reply topic")? as usize });
                    continue;
                }
                let number = |k: &str| notice[k].as_u64().ok_or_else(|| format!("notice without {k}: {notice}"));
                let topic = notice["topic"].as_str().and_then(|n| n[1..].parse().ok()).ok_or("notice topic")?;
                Parsed::Dropped {
                    topic,
                    from_seq: number("from_seq")?,
                    to_seq: number("to_seq")?,
                    count: number("count")?,
                }
            }
            other => return Err(format!("unexpected opcode {other}")),
        });
    }
    Ok(out)
}
