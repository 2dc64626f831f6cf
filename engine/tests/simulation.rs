//! A seeded, deterministic simulation of the node's brokers: several
//! shards' [`Broker`]s (sequencing, history, resume, epochs, eviction,
//! local topics, fan-out, framing, answers) exactly as the shards run them,
//! the channel mesh between them as per-pair FIFO queues delivered at random
//! moments, and connections' send queues (`Outbound`: caps, the `drop` and
//! `disconnect` policies, missed ranges, the peer's close) read by simulated
//! clients. Driven by random publishes from many publishers, subscribes,
//! unsubscribes, resumes, fan-out passes, stalled and slow readers, peer
//! closes, disconnects and node restarts. After every step the invariants
//! are checked:
//!
//! - sequence numbers are contiguous and strictly increasing per topic
//!   epoch;
//! - every subscriber sees each epoch's messages in order, without
//!   duplicates, only from the epoch its subscription was granted, and each
//!   publisher's messages to a topic in the order they were published;
//! - every delivered message was sequenced, with the sequence number its
//!   envelope says;
//! - nothing is lost unless it was announced to that subscriber (a
//!   `dropped` notice, a history gap, or a lost history on resume): checked
//!   whenever a live connection's queue and pending notices are empty. A
//!   connection that dies takes its unsent notices with it; its client saw
//!   the jump in sequence numbers, and resumes from the highest it saw;
//! - durable topics (the first `DURABLE_TOPICS`, their group commits
//!   written, or failing, at random moments; resumes older than the
//!   history caught up from their log in batches, read at random moments,
//!   now and then unreadable, as if retention had removed it): no
//!   subscriber receives a
//!   message before the commit that carries it was reported written, no
//!   publisher at ack `local` hears back before it either, no number is
//!   answered twice, and a broker with records to write has asked for a
//!   commit;
//! - every queue stays within its cap plus one frame and the control slack,
//!   pending drop ranges within one per topic, every sequencer within its
//!   topic limit, no client address above its share of a sequencer's
//!   topics, publishes in flight within their budget, and the fan-out
//!   buffers empty once every pass has run.
//!
//! `cargo test --test simulation` runs `SIM_SEEDS` seeds (default 200) of
//! `SIM_STEPS` steps (default 20,000); the ignored `long_run` runs 1,000
//! seeds of 100,000. A failure names its seed and step: rerun it with
//! `SIM_SEED=n`.

mod sim_support;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::broker::{
    Action, Broker, BrokerLimits, Format, Granted, Item, LogRead, PublishOptions, PublishReply, Published,
    SubscribeRequest, Subscription,
};
use proto::durable::{AckLevel, DurableSpec, LogLimits};
use proto::limits::{CONTROL_SLACK_BYTES, ITEM_OVERHEAD_BYTES};
use proto::message::{Message, Now, PayloadKind};
use proto::metrics::Metrics;
use proto::outbound::SlowConsumerPolicy;
use proto::outbound::{Frame, Offer, Outbound};
use proto::owner::{Epoch, Owner, OwnerError, OwnerLimits, ResumeFrom, Resumed, TopicCommit};
use proto::topic::TopicName;
use proto::{native, ws};
use sim_support::{run_seeds, Rng};

/// Topics in play: more than the shards together may hold, so that
/// eviction happens.
const TOPICS: usize = 12;
/// The first this many topics are durable.
const DURABLE_TOPICS: usize = 4;
/// One commit in this many fails (the topic then refuses publishes until
/// a restart).
const COMMIT_FAILS_ONE_IN: usize = 300;
/// Shards (brokers).
const SHARDS: usize = 3;
/// Topics each sequencer may hold.
const TOPICS_PER_SHARD: usize = 3;
/// Messages each topic retains.
const HISTORY_MESSAGES: usize = 8;
/// Send-queue cap per connection: a few frames, so that policies trigger.
const QUEUE_CAP_BYTES: usize = 600;
/// Largest data frame the simulation makes: 4 bytes of frame header, a
/// native binary envelope (type and name length, up to 3 bytes of name, seq
/// and timestamp), 20 bytes of identity and up to 150 of padding.
const FRAME_BYTES_MAX: usize = 4 + (2 + 3 + 16) + 20 + 150;
/// Live connections at most.
const CONNECTIONS_MAX: usize = 8;
/// Publishers; publisher p is a connection of shard p % SHARDS (the order
/// the node keeps is a connection's order).
const PUBLISHERS: u32 = 4;
/// Client addresses the connections come from.
const ADDRESSES: u8 = 2;
/// Topics one address may keep subscribed in one sequencer: below
/// `TOPICS_PER_SHARD`, so that the share is reached.
const CLIENT_PINS_MAX: usize = 2;
/// Bytes of publishes one shard may have in flight to one owner: a few
/// messages, so that publishers wait.
const IN_FLIGHT_MAX: usize = 4 * (ITEM_OVERHEAD_BYTES + 170);

#[test]
fn seeds() {
    run_seeds(200, 20_000, run_or_panic);
}

#[test]
#[ignore = "long: 1,000 seeds of 100,000 steps; cargo test --release --test simulation -- --ignored"]
fn long_run() {
    run_seeds(1_000, 100_000, run_or_panic);
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
        "seed {seed}: {steps} steps, {} published ({} through a peer), {} delivered, {} dropped and announced, \
         {} disconnects, {} lost histories, {} gaps, {} refused, {} restarts, {} quiescence checks, \
         {} commits ({} failed), {} catch-up batches, {} unreadable reads, {} delivery batch frames",
        s.published,
        s.remote,
        s.delivered,
        s.announced,
        s.disconnects,
        s.lost,
        s.gaps,
        s.refused,
        s.restarts,
        s.quiescent,
        s.commits,
        s.failed_commits,
        s.catch_up_batches,
        s.unread,
        s.delivery_batches
    );
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
    /// Last publisher sequence received, per publisher.
    publishers: HashMap<u32, u64>,
}

/// A subscription on the node's side.
#[derive(Debug, Clone, Copy)]
enum Sub {
    /// Waiting for the owner's grant (`req`).
    Pending { sub_id: u64 },
    /// Live.
    Live { sub_id: u64 },
}

impl Sub {
    fn id(self) -> u64 {
        match self {
            Sub::Pending { sub_id } | Sub::Live { sub_id } => sub_id,
        }
    }
}

/// One connection: the node's side (queue, subscriptions) and the client's.
struct Conn {
    /// Its own id, stable while it lives.
    id: u64,
    /// The shard that serves it.
    shard: usize,
    out: Rc<Outbound>,
    /// How it wants messages framed.
    format: Format,
    /// The client's address: topics its subscriptions keep are charged to it.
    addr: IpAddr,
    /// Node side: topic -> its subscription.
    subs: HashMap<usize, Sub>,
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

/// A subscribe the owner has not answered yet.
struct Asked {
    conn: u64,
    topic: usize,
    from: Option<ClientTopic>,
}

/// A message the simulation published: filled in when it is sequenced.
#[derive(Debug, Clone, Copy)]
struct Sent {
    topic: usize,
    /// Published at ack `local` (its answer waits for the commit).
    ack_local: bool,
    /// Its place, once sequenced.
    seq: Option<(Epoch, u64)>,
}

#[derive(Default)]
struct Stats {
    published: u64,
    remote: u64,
    delivered: u64,
    announced: u64,
    disconnects: u64,
    lost: u64,
    gaps: u64,
    refused: u64,
    restarts: u64,
    quiescent: u64,
    commits: u64,
    failed_commits: u64,
    catch_up_batches: u64,
    unread: u64,
    /// Batch frames batched native clients read.
    delivery_batches: u64,
}

struct Sim {
    rng: Rng,
    names: Vec<TopicName>,
    brokers: Vec<Broker>,
    /// The channel mesh: `mesh[from][to]`, FIFO.
    mesh: Vec<Vec<VecDeque<Item>>>,
    conns: Vec<Conn>,
    next_conn: u64,
    /// Clients whose connection died, with what they knew: they come back
    /// and resume.
    waiting: Vec<HashMap<usize, ClientTopic>>,
    /// Subscribes awaiting their grant, by (shard, req).
    asked: HashMap<(usize, u64), Asked>,
    /// Publishes awaiting their sequence, by (shard, req): the message id.
    publishing: HashMap<(usize, u64), u64>,
    /// Per shard: whether its broker asked for a fan-out pass (`FanOut`)
    /// that has not run yet. A broker with topics waiting must have asked:
    /// the real fan-out task sleeps until it does.
    fanout_asked: Vec<bool>,
    /// Per shard: whether its broker asked for a commit (`Commit`) not yet
    /// taken.
    commit_asked: Vec<bool>,
    /// Per shard: the group commit being written.
    writing: Vec<Vec<TopicCommit>>,
    /// Last sequence reported written per durable (topic, epoch).
    written: HashMap<(usize, Epoch), u64>,
    /// Durable topics' sequenced messages by (topic, epoch): seq -> id
    /// (what their logs hold once written).
    logged: HashMap<(usize, Epoch), std::collections::BTreeMap<u64, u64>>,
    /// Every message's payload, by id.
    payloads: Vec<Bytes>,
    /// Catch-up reads asked for, per shard.
    log_reads: Vec<(usize, LogRead)>,
    /// Subscribers catching up, waiting for room: (shard, topic, req, queue).
    catch_ups: Vec<(usize, TopicName, u64, Rc<Outbound>)>,
    /// Numbers answered per durable (topic, epoch): each once.
    answered: std::collections::HashSet<(usize, Epoch, u64)>,
    /// Every message published, by id (its payload carries the id).
    sent: Vec<Sent>,
    /// Next sequence number per publisher.
    publisher_seq: Vec<u64>,
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
        let names: Vec<TopicName> = (0..TOPICS).map(|t| TopicName::new(&format!("t{t}")).expect("valid")).collect();
        let start = Instant::now();
        let brokers = new_brokers(&mut rng, &names, start);
        Sim {
            rng,
            names,
            brokers,
            mesh: new_mesh(),
            conns: Vec::new(),
            next_conn: 0,
            waiting: Vec::new(),
            asked: HashMap::new(),
            publishing: HashMap::new(),
            fanout_asked: vec![false; SHARDS],
            commit_asked: vec![false; SHARDS],
            writing: (0..SHARDS).map(|_| Vec::new()).collect(),
            written: HashMap::new(),
            answered: Default::default(),
            logged: HashMap::new(),
            payloads: Vec::new(),
            log_reads: Vec::new(),
            catch_ups: Vec::new(),
            sent: Vec::new(),
            publisher_seq: vec![0; PUBLISHERS as usize],
            assigned: HashMap::new(),
            start,
            step: 0,
            stats: Stats::default(),
        }
    }

    /// Simulated time: one millisecond a step, never the wall clock.
    fn now(&self) -> Now {
        Now { at: self.start + Duration::from_millis(self.step), unix_ms: 1_700_000_000_000 + self.step }
    }

    fn step(&mut self) -> Check {
        self.step += 1;
        match self.rng.below(1000) {
            0..=249 => self.publish()?,
            250..=449 => self.carry()?,
            450..=529 => self.fan_out()?,
            530..=749 => self.read()?,
            750..=849 => self.subscribe()?,
            850..=869 => self.unsubscribe()?,
            870..=899 => self.connect(),
            900..=939 => self.resume()?,
            940..=959 => self.peer_close()?,
            960..=969 => self.set_reader_speed(),
            970..=979 => self.catch_up()?,
            980..=998 => self.commit()?,
            _ => self.restart(),
        }
        self.reap_disconnected();
        self.check_bounds()
    }

    /// A publisher publishes to a random topic, if its shard may send more
    /// to the topic's owner (the shell waits until it may).
    fn publish(&mut self) -> Check {
        let t = self.rng.below(TOPICS);
        let publisher = self.rng.below(PUBLISHERS as usize) as u32;
        let shard = publisher as usize % SHARDS;
        let padding = self.rng.below(151);
        let name = self.names[t].clone();
        if !self.brokers[shard].remote_room(&name, 20 + padding) {
            return Ok(());
        }
        let id = self.sent.len() as u64;
        self.publisher_seq[publisher as usize] += 1;
        let mut payload = id.to_be_bytes().to_vec();
        payload.extend_from_slice(&publisher.to_be_bytes());
        payload.extend_from_slice(&self.publisher_seq[publisher as usize].to_be_bytes());
        payload.resize(20 + padding, 0);
        // Durable topics default to `local`; some publishes ask for `none`.
        let ack = [None, Some(AckLevel::None), Some(AckLevel::Local)][self.rng.below(3)];
        let ack_local = t < DURABLE_TOPICS && ack != Some(AckLevel::None);
        self.sent.push(Sent { topic: t, ack_local, seq: None });
        let payload = Bytes::from(payload);
        self.payloads.push(payload.clone());
        let now = self.now();
        let options = PublishOptions { key: None, ack, reply_to: None, meta: None };
        let published =
            self.brokers[shard].publish(name, PayloadKind::Binary, payload, options, PublishReply::Caller, now);
        match published {
            Published::Now(result) => self.sequenced(shard, id, result)?,
            Published::Later { req } => {
                self.stats.remote += 1;
                self.publishing.insert((shard, req), id);
            }
        }
        self.actions(shard)
    }

    /// Message `id` was sequenced by the owner of its topic (`owner`), or
    /// refused: checks and records its place.
    fn sequenced(&mut self, owner: usize, id: u64, result: Result<u64, OwnerError>) -> Check {
        let Ok(seq) = result else {
            self.stats.refused += 1;
            return Ok(()); // every topic of the shard has subscribers: refused
        };
        let t = self.sent[id as usize].topic;
        let epoch = self.brokers[owner].owner().stat(&self.names[t]).ok_or("sequenced, and no topic")?.epoch;
        if t < DURABLE_TOPICS {
            // Answers at `none` come as the owner sequences, at `local` as
            // commits are written: not in sequence order, but each once.
            let written = self.written.get(&(t, epoch)).copied().unwrap_or(0);
            if self.sent[id as usize].ack_local && seq > written {
                return Err(format!("topic {t}: seq {seq} answered at ack local, written through {written}"));
            }
            if !self.answered.insert((t, epoch, seq)) {
                return Err(format!("topic {t} epoch {epoch}: seq {seq} answered twice"));
            }
            self.logged.entry((t, epoch)).or_default().insert(seq, id);
            self.sent[id as usize].seq = Some((epoch, seq));
            self.stats.published += 1;
            return Ok(());
        }
        let last = self.assigned.entry((t, epoch)).or_insert(0);
        if seq != *last + 1 {
            return Err(format!("topic {t} epoch {epoch}: seq {seq} after {last}"));
        }
        *last = seq;
        self.sent[id as usize].seq = Some((epoch, seq));
        self.stats.published += 1;
        Ok(())
    }

    /// The mesh carries a batch: the first few items from one shard to
    /// another, handled by the receiving broker one by one.
    fn carry(&mut self) -> Check {
        let (from, to) = (self.rng.below(SHARDS), self.rng.below(SHARDS));
        let batch = 1 + self.rng.below(4);
        for _ in 0..batch {
            let Some(item) = self.mesh[from][to].pop_front() else { break };
            // What an owner sequences is seen as its answer leaves.
            let now = self.now();
            self.brokers[to].handle(from, item, now);
            self.actions(to)?;
        }
        Ok(())
    }

    /// A shard's fan-out task runs a pass: every waiting topic.
    fn fan_out(&mut self) -> Check {
        let shard = self.rng.below(SHARDS);
        self.fanout_asked[shard] = false;
        while self.brokers[shard].fan_out_next() {
            self.actions(shard)?;
        }
        if self.brokers[shard].fanout_pending_bytes() != 0 {
            let left = self.brokers[shard].fanout_pending_bytes();
            return Err(format!("shard {shard}: {left} bytes left after a whole pass"));
        }
        Ok(())
    }

    /// Carries out shard `shard`'s actions as the shell does.
    fn actions(&mut self, shard: usize) -> Check {
        let mut actions = Vec::new();
        self.brokers[shard].take_actions(&mut actions);
        for action in actions {
            match action {
                Action::Send { to, item } => {
                    if let Item::PublishDone { req, result } = &item {
                        // The owner answers as it sequences: record it now,
                        // while its epoch is the one it sequenced in.
                        if let Some(&id) = self.publishing.get(&(to, *req)) {
                            self.sequenced(shard, id, *result)?;
                        }
                    }
                    self.mesh[shard][to].push_back(item);
                }
                // No queue is in direct mode here: clients read through
                // the writer's path.
                Action::Flush(_) => return Err("a queue without a socket asked for a direct flush".into()),
                Action::Commit => self.commit_asked[shard] = true,
                Action::ReadLog(read) => self.log_reads.push((shard, read)),
                Action::CatchUp { topic, req, out } => self.catch_ups.push((shard, topic, req, out)),
                Action::Link { .. } => return Err("a node without a cluster used a link".into()),
                Action::DurableMoved(_) | Action::ListStored { .. } => {
                    return Err("a node without a cluster moved a durable log".into())
                }
                Action::Published { req, result } => {
                    let id = self.publishing.remove(&(shard, req)).ok_or("an answer to no publish")?;
                    if self.sent[id as usize].seq.is_none() {
                        // A durable topic this shard owns, answered at its
                        // commit: this shard is the owner.
                        self.sequenced(shard, id, result)?;
                    } else if self.sent[id as usize].seq.map(|(_, s)| s) != result.ok() {
                        return Err(format!(
                            "publish {id}: answered {result:?}, sequenced {:?}",
                            self.sent[id as usize]
                        ));
                    }
                }
                Action::Subscribed { req, result } => self.granted(shard, req, result)?,
                Action::FanOut => self.fanout_asked[shard] = true,
                Action::Room | Action::Tick | Action::ClaimAnswered => {}
            }
        }
        Ok(())
    }

    /// A subscribe was answered: the client learns where it stands.
    fn granted(&mut self, shard: usize, req: u64, result: Result<Granted, OwnerError>) -> Check {
        let asked = self.asked.remove(&(shard, req)).ok_or("a grant nobody asked for")?;
        let Some(conn) = self.conns.iter_mut().find(|c| c.id == asked.conn) else {
            return Err("a grant for a connection that left".into());
        };
        let t = asked.topic;
        let granted = match result {
            Ok(granted) => granted,
            Err(_) => {
                // Refused (no room, or the address's share): the broker
                // dropped the subscription; nothing was promised.
                self.stats.refused += 1;
                conn.subs.remove(&t);
                return Ok(());
            }
        };
        conn.subs.insert(t, Sub::Live { sub_id: granted.sub_id });
        let client = client_after(&mut self.stats, t, &granted, asked.from)?;
        conn.client.insert(t, client);
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
        for frame in parse_frames(&bytes, conn.format)? {
            match frame {
                Parsed::Data { id, publisher, publisher_seq, seq } => {
                    self.stats.delivered += 1;
                    let sent = self.sent.get(id as usize).copied().ok_or("a message never published")?;
                    let Some((epoch, assigned)) = sent.seq else {
                        return Err(format!("message {id} delivered, never sequenced"));
                    };
                    if seq.is_some_and(|s| s != assigned) {
                        return Err(format!("message {id}: envelope says seq {seq:?}, sequenced {assigned}"));
                    }
                    if sent.topic < DURABLE_TOPICS {
                        let written = self.written.get(&(sent.topic, epoch)).copied().unwrap_or(0);
                        if assigned > written {
                            return Err(format!(
                                "topic {}: seq {assigned} delivered, written through {written}",
                                sent.topic
                            ));
                        }
                    }
                    receive(conn, sent.topic, epoch, assigned, publisher, publisher_seq)?;
                }
                Parsed::Unsubscribed { topic } => {
                    conn.client.remove(&topic);
                    conn.leaving.remove(&topic);
                }
                Parsed::Batch => self.stats.delivery_batches += 1,
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
        self.ask(i, t, None)
    }

    /// Connection `i` subscribes to topic `t`, resuming from `from`.
    fn ask(&mut self, i: usize, t: usize, from: Option<ClientTopic>) -> Check {
        let conn = &self.conns[i];
        let (shard, conn_id) = (conn.shard, conn.id);
        let request = SubscribeRequest {
            topic: self.names[t].clone(),
            out: conn.out.clone(),
            client: conn.addr,
            format: conn.format,
            from: from.as_ref().map(|c| ResumeFrom { after_seq: c.last_seen, epoch: Some(c.epoch), since_ms: None }),
            reply_id: None,
        };
        let now = self.now();
        match self.brokers[shard].subscribe(request, now) {
            Subscription::Live(granted) => {
                if from.is_some() {
                    return Err("a resume went live without asking the owner".into());
                }
                let client = client_after(&mut self.stats, t, &granted, None)?;
                let conn = &mut self.conns[i];
                conn.subs.insert(t, Sub::Live { sub_id: granted.sub_id });
                conn.client.insert(t, client);
            }
            Subscription::Pending { req, sub_id } => {
                self.conns[i].subs.insert(t, Sub::Pending { sub_id });
                self.asked.insert((shard, req), Asked { conn: conn_id, topic: t, from });
            }
        }
        self.actions(shard)
    }

    fn unsubscribe(&mut self) -> Check {
        if self.conns.is_empty() {
            return Ok(());
        }
        let i = self.rng.below(self.conns.len());
        let Some(&t) = self.conns[i].subs.keys().min() else { return Ok(()) };
        let now = self.now();
        let conn = &mut self.conns[i];
        let sub = conn.subs.remove(&t).expect("listed");
        let (shard, id) = (conn.shard, conn.id);
        self.brokers[shard].unsubscribe(&self.names[t], sub.id(), now);
        self.asked.retain(|_, a| !(a.conn == id && a.topic == t));
        conn.leaving.insert(t);
        let reply = serde_json::json!({ "type": "unsubscribed", "topic": t }).to_string();
        let replied = conn.out.offer_control(ws::encode_data(PayloadKind::Text, reply.as_bytes()));
        if !replied {
            // Replies not read past the cap and the slack: closed with 4008.
            self.stats.disconnects += 1;
            self.kill(i);
        }
        self.actions(shard)
    }

    fn connect(&mut self) {
        if self.conns.len() >= CONNECTIONS_MAX {
            return;
        }
        let policy = if self.rng.below(2) == 0 { SlowConsumerPolicy::Drop } else { SlowConsumerPolicy::Disconnect };
        let format = if self.rng.below(2) == 0 { Format::Raw } else { Format::Native };
        // Half the native clients take their deliveries batched
        // (`?delivery=batch`): the same order and loss invariants hold
        // through the batch frames.
        let batched = format == Format::Native && self.rng.below(2) == 0;
        let read_bytes = self.reader_speed();
        let addr = address(self.rng.below(ADDRESSES as usize) as u8);
        self.next_conn += 1;
        self.conns.push(Conn {
            id: self.next_conn,
            shard: self.rng.below(SHARDS),
            out: Rc::new(Outbound::new(QUEUE_CAP_BYTES, policy)),
            format,
            addr,
            subs: HashMap::new(),
            client: HashMap::new(),
            leaving: BTreeSet::new(),
            read_bytes,
        });
        if batched {
            self.conns.last().expect("just connected").out.set_batched(true);
        }
    }

    /// A client whose connection died comes back on a new one and resumes
    /// every topic it had, from what it had seen, naming the epoch.
    fn resume(&mut self) -> Check {
        if self.waiting.is_empty() || self.conns.len() >= CONNECTIONS_MAX {
            return Ok(());
        }
        let known = self.waiting.swap_remove(self.rng.below(self.waiting.len()));
        self.connect();
        let id = self.conns.last().expect("just connected").id;
        let mut topics: Vec<_> = known.into_iter().collect();
        topics.sort_by_key(|(t, _)| *t);
        for (t, client) in topics {
            // A connection can die during its replays (disconnect policy).
            let Some(i) = self.conns.iter().position(|c| c.id == id) else { break };
            self.ask(i, t, Some(client))?;
        }
        Ok(())
    }

    /// The client closes: its queue is discarded at once and nothing more is
    /// queued (RFC 6455 5.5.1).
    fn peer_close(&mut self) -> Check {
        if self.conns.is_empty() {
            return Ok(());
        }
        let i = self.rng.below(self.conns.len());
        let out = self.conns[i].out.clone();
        out.peer_closed(1000);
        let frame = Frame::data(Bytes::from_static(b"\x82\x00"), self.now().at);
        let after = out.offer_data(&frame, &self.names[0], u64::MAX);
        if !out.is_empty() || after != Offer::Closed {
            return Err("a closed queue took a frame".into());
        }
        self.kill(i);
        Ok(())
    }

    fn set_reader_speed(&mut self) {
        if !self.conns.is_empty() {
            let i = self.rng.below(self.conns.len());
            self.conns[i].read_bytes = self.reader_speed();
        }
    }

    /// A reader: stalled, slow (one small frame a turn) or fast.
    fn reader_speed(&mut self) -> usize {
        [0, 1, 200, 2000, 1 << 20][self.rng.below(5)]
    }

    /// `kill -9` and a restart: every broker starts afresh with a new seed,
    /// every connection and item in flight is gone, every client will
    /// resume.
    /// A catch-up read completes (the owner's log answers with what it
    /// holds of the range, within the batch's bytes; now and then nothing,
    /// as if retention had removed it, or only a later part, as if an
    /// archived segment could not be fetched), or a subscriber catching up with
    /// room in its queue asks for its next batch.
    fn catch_up(&mut self) -> Check {
        if !self.log_reads.is_empty() && (self.catch_ups.is_empty() || self.rng.below(2) == 0) {
            let (shard, read) = self.log_reads.swap_remove(self.rng.below(self.log_reads.len()));
            let t = self.names.iter().position(|n| *n == read.topic).ok_or("a read of no topic")?;
            let epoch = self.brokers[shard].owner().stat(&read.topic).ok_or("a read of a topic gone")?.epoch;
            let written = self.written.get(&(t, epoch)).copied().unwrap_or(0);
            let mut messages = Vec::new();
            let mut bytes = 0;
            let roll = self.rng.below(10);
            if roll != 0 {
                // Now and then the start of the range is not to be had (an
                // archived segment the object store could not give back):
                // the batch starts after it.
                let span = read.to_seq.min(written).saturating_sub(read.from_seq) + 1;
                let from = if roll == 1 { read.from_seq + self.rng.below(span as usize) as u64 } else { read.from_seq };
                let logged = self.logged.get(&(t, epoch)).cloned().unwrap_or_default();
                for (&seq, &id) in logged.range(from..=read.to_seq.min(written)) {
                    let payload = self.payloads[id as usize].clone();
                    if !messages.is_empty() && bytes + payload.len() > read.max_bytes {
                        break;
                    }
                    bytes += payload.len();
                    let at = self.now().at;
                    messages.push(Message {
                        seq,
                        timestamp_ms: 0,
                        kind: PayloadKind::Binary,
                        payload,
                        key: None,
                        reply_to: None,
                        meta: None,
                        published_at: at,
                    });
                }
            }
            if messages.is_empty() {
                self.stats.unread += 1;
            }
            let now = self.now();
            self.brokers[shard].log_read(&read.topic, read.id, messages, now);
            return self.actions(shard);
        }
        if self.catch_ups.is_empty() {
            return Ok(());
        }
        let i = self.rng.below(self.catch_ups.len());
        let (_, _, _, out) = &self.catch_ups[i];
        let room = out.room();
        if out.is_closing() {
            self.catch_ups.swap_remove(i);
        } else if room >= out.cap_bytes() / 2 {
            let (shard, topic, req, _) = self.catch_ups.swap_remove(i);
            self.stats.catch_up_batches += 1;
            let now = self.now();
            self.brokers[shard].catch_up(&topic, req, room, now);
            self.actions(shard)?;
        }
        Ok(())
    }

    /// A shard's committer: reports the group commit it was writing
    /// (written, or now and then failed), or takes the next one.
    fn commit(&mut self) -> Check {
        let shard = self.rng.below(SHARDS);
        let writing = std::mem::take(&mut self.writing[shard]);
        if writing.is_empty() {
            self.commit_asked[shard] = false;
            self.writing[shard] = self.brokers[shard].take_commits();
            return Ok(());
        }
        for commit in &writing {
            let t = self.names.iter().position(|n| *n == commit.topic).ok_or("a commit of no topic")?;
            let now = self.now();
            if self.rng.below(COMMIT_FAILS_ONE_IN) == 0 {
                self.stats.failed_commits += 1;
                self.brokers[shard].commit_failed(commit, now);
            } else {
                self.stats.commits += 1;
                let epoch = self.brokers[shard].owner().stat(&commit.topic).ok_or("committed, and no topic")?.epoch;
                let written = self.written.entry((t, epoch)).or_insert(0);
                *written = (*written).max(commit.through_seq);
                self.brokers[shard].committed(commit, now);
            }
            self.actions(shard)?;
        }
        Ok(())
    }

    fn restart(&mut self) {
        self.stats.restarts += 1;
        for conn in self.conns.drain(..) {
            if !conn.client.is_empty() {
                self.waiting.push(conn.client);
            }
        }
        // The disks go with the node (a recovery from disk is tested
        // against real processes in tests/durable.rs): durable topics come
        // back empty, in new epochs, which resumes are told.
        self.brokers = new_brokers(&mut self.rng, &self.names, self.start);
        self.mesh = new_mesh();
        self.fanout_asked = vec![false; SHARDS];
        self.commit_asked = vec![false; SHARDS];
        self.writing = (0..SHARDS).map(|_| Vec::new()).collect();
        self.log_reads.clear();
        self.catch_ups.clear();
        self.asked.clear();
        self.publishing.clear();
    }

    /// Connections the slow-consumer policy closed are gone.
    fn reap_disconnected(&mut self) {
        let mut i = 0;
        while i < self.conns.len() {
            if self.conns[i].out.is_closing() {
                self.stats.disconnects += 1;
                self.kill(i);
            } else {
                i += 1;
            }
        }
    }

    /// Connection `i` is gone: its subscriptions end (as the connection's
    /// task does on its way out) and its client waits to resume.
    fn kill(&mut self, i: usize) {
        let conn = self.conns.swap_remove(i);
        let now = self.now();
        for (&t, sub) in &conn.subs {
            self.brokers[conn.shard].unsubscribe(&self.names[t], sub.id(), now);
        }
        self.asked.retain(|_, a| a.conn != conn.id);
        if !conn.client.is_empty() {
            self.waiting.push(conn.client);
        }
    }

    fn check_bounds(&mut self) -> Check {
        for shard in 0..SHARDS {
            // Actions left by a kill's unsubscribes.
            self.actions(shard)?;
        }
        for (i, conn) in self.conns.iter().enumerate() {
            let bound = QUEUE_CAP_BYTES + FRAME_BYTES_MAX + CONTROL_SLACK_BYTES;
            if conn.out.queued_bytes() > bound {
                return Err(format!("connection {i}: {} bytes queued, bound {bound}", conn.out.queued_bytes()));
            }
            if conn.out.missed_pending() > TOPICS {
                return Err(format!("connection {i}: {} missed ranges pending", conn.out.missed_pending()));
            }
        }
        for (shard, broker) in self.brokers.iter().enumerate() {
            let owner = broker.owner();
            if owner.len() > TOPICS_PER_SHARD {
                return Err(format!("shard {shard} holds {} topics", owner.len()));
            }
            for a in 0..ADDRESSES {
                let pinned = owner.pinned_by(address(a));
                if pinned > CLIENT_PINS_MAX {
                    return Err(format!("shard {shard}: address {a} keeps {pinned} topics subscribed"));
                }
            }
            if let Some(bytes) = broker.in_flight_bytes().iter().find(|&&b| b > IN_FLIGHT_MAX) {
                return Err(format!("shard {shard}: {bytes} bytes of publishes in flight"));
            }
            if broker.has_fan_out() && !self.fanout_asked[shard] {
                return Err(format!("shard {shard}: topics wait for a fan-out it never asked for"));
            }
            if broker.owner().has_commits() && !self.commit_asked[shard] {
                return Err(format!("shard {shard}: records wait for a commit it never asked for"));
            }
        }
        // With no connection left and nothing in flight between shards,
        // nothing may still be charged to any address.
        if self.conns.is_empty() && self.mesh.iter().flatten().all(VecDeque::is_empty) {
            for (shard, broker) in self.brokers.iter().enumerate() {
                for a in 0..ADDRESSES {
                    if broker.owner().pinned_by(address(a)) != 0 {
                        return Err(format!("shard {shard}: address {a} still charged with no subscriber left"));
                    }
                }
            }
        }
        Ok(())
    }
}

fn new_brokers(rng: &mut Rng, names: &[TopicName], now: Instant) -> Vec<Broker> {
    let owner_limits = OwnerLimits {
        topics_max: TOPICS_PER_SHARD,
        history_messages_max: HISTORY_MESSAGES,
        history_bytes_max: 1 << 20,
        client_pins_max: CLIENT_PINS_MAX,
    };
    let limits = BrokerLimits { publish_bytes_in_flight_max: IN_FLIGHT_MAX };
    let mut brokers: Vec<Broker> = (0..SHARDS)
        .map(|id| {
            let owner = Owner::new(owner_limits, rng.next());
            Broker::new(id, SHARDS, owner, limits, Rc::new(Metrics::default()))
        })
        .collect();
    // Small segments, so that logs roll.
    let log = LogLimits { segment_bytes_max: 2048, segment_age_ms: 500 };
    for name in &names[..DURABLE_TOPICS] {
        let owner = brokers[name.owner_shard(SHARDS)].owner_mut();
        owner.declare_durable(name, DurableSpec::default(), None, log, now).expect("room for the durable topics");
    }
    brokers
}

fn new_mesh() -> Vec<Vec<VecDeque<Item>>> {
    (0..SHARDS).map(|_| (0..SHARDS).map(|_| VecDeque::new()).collect()).collect()
}

/// The simulation's client address `n`.
fn address(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
}

/// What a client knows of topic `t` once `granted`, having asked to resume
/// `from`.
fn client_after(
    stats: &mut Stats,
    t: usize,
    granted: &Granted,
    from: Option<ClientTopic>,
) -> Result<ClientTopic, String> {
    let fresh = ClientTopic {
        epoch: granted.epoch,
        last_seen: granted.last_seq,
        missing: BTreeSet::new(),
        announced: BTreeSet::new(),
        publishers: HashMap::new(),
    };
    Ok(match (granted.resumed, from) {
        (Resumed::Live, _) => fresh,
        (Resumed::Lost(_), _) => {
            stats.lost += 1;
            fresh
        }
        (Resumed::Replayed { gap }, Some(from)) => {
            if from.epoch != granted.epoch {
                return Err(format!("topic {t}: replayed from epoch {} into {}", from.epoch, granted.epoch));
            }
            let mut client = ClientTopic { missing: BTreeSet::new(), ..from };
            if let Some(gap) = gap {
                stats.gaps += 1;
                client.announced.extend(gap.from_seq..=gap.to_seq);
            }
            client
        }
        (Resumed::Replayed { .. }, None) => return Err("replayed without a resume".into()),
    })
}

/// A client receives a message.
fn receive(conn: &mut Conn, topic: usize, epoch: Epoch, seq: u64, publisher: u32, publisher_seq: u64) -> Check {
    let Some(c) = conn.client.get_mut(&topic) else {
        return Err(format!("topic {topic}: message {seq} on a connection not subscribed"));
    };
    if epoch != c.epoch {
        return Err(format!("topic {topic}: message of epoch {epoch} on a subscription to {}", c.epoch));
    }
    if seq <= c.last_seen {
        return Err(format!("topic {topic}: seq {seq} after {} (duplicate or out of order)", c.last_seen));
    }
    let last = c.publishers.entry(publisher).or_insert(0);
    if publisher_seq <= *last {
        return Err(format!("topic {topic}: publisher {publisher}'s message {publisher_seq} after its {last}"));
    }
    *last = publisher_seq;
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

enum Parsed {
    /// A batch frame began (its deliveries follow as `Data`).
    Batch,
    /// A message: its id and publisher from the payload, and the sequence
    /// its envelope names (native only).
    Data {
        id: u64,
        publisher: u32,
        publisher_seq: u64,
        seq: Option<u64>,
    },
    Dropped {
        topic: usize,
        from_seq: u64,
        to_seq: u64,
        count: u64,
    },
    Unsubscribed {
        topic: usize,
    },
}

/// Parses what a client read: whole server frames only (a batch holds whole
/// frames).
fn parse_frames(mut bytes: &[u8], format: Format) -> Result<Vec<Parsed>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let end = ws::frame_end_at(bytes, 0, 1);
        let (frame, rest) = bytes.split_at(end);
        bytes = rest;
        let header = match frame[1] & 0x7f {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        let payload = &frame[header..];
        out.push(match frame[0] & 0x0f {
            0x2 if format == Format::Native && payload[0] == native::SERVER_BINARY_BATCH => {
                // A batch: length-prefixed envelopes, at least two.
                out.push(Parsed::Batch);
                let (mut rest, mut count) = (&payload[1..], 0);
                while !rest.is_empty() {
                    let len = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
                    out.push(parse_data(&rest[4..4 + len], format));
                    (rest, count) = (&rest[4 + len..], count + 1);
                }
                if count < 2 {
                    return Err(format!("a batch frame of {count} deliveries"));
                }
                continue;
            }
            0x2 => parse_data(payload, format),
            0x1 => {
                let notice: serde_json::Value = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
                if notice["type"] == "unsubscribed" {
                    out.push(Parsed::Unsubscribed { topic: notice["topic"].as_u64().ok_or("reply topic")? as usize });
                    continue;
                }
                let number = |k: &str| notice[k].as_u64().ok_or_else(|| format!("notice without {k}: {notice}"));
                let topic = notice["topic"].as_str().and_then(|n| n[1..].parse().ok()).ok_or("notice topic")?;
                if notice["type"] == "gap" {
                    // Found while catching up: announced like a drop.
                    let (from_seq, to_seq) = (number("from_seq")?, number("to_seq")?);
                    out.push(Parsed::Dropped { topic, from_seq, to_seq, count: to_seq - from_seq + 1 });
                    continue;
                }
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

/// One delivery: a raw frame's payload, or a native binary envelope (type,
/// name length, name, seq, ts, payload).
fn parse_data(payload: &[u8], format: Format) -> Parsed {
    let (seq, payload) = match format {
        Format::Native => {
            let at = 2 + payload[1] as usize;
            (Some(be_u64(&payload[at..])), &payload[at + 16..])
        }
        _ => (None, payload),
    };
    Parsed::Data {
        id: be_u64(payload),
        publisher: u32::from_be_bytes(payload[8..12].try_into().expect("4 bytes")),
        publisher_seq: be_u64(&payload[12..]),
        seq,
    }
}

fn be_u64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"))
}
