//! A seeded, deterministic simulation of a cluster's topology changes over
//! the sans-IO brokers: nodes (one shard each) with node links modelled
//! as FIFO queues of `proto::link` frames (encoded and decoded on the way,
//! as on a socket), each node applying a new member set at its own later
//! step (views lag), nodes joining, leaving gracefully (they stay until
//! their topics are claimed) and dying (their links fail at once), with a
//! subscriber on every node, a member of consumer group `g` of every topic
//! on every node (acknowledging what it reads, joining again when told
//! `group_lost`), and publishes from every node.
//!
//! The simulation's own maps are ordered, and the brokers walk theirs in
//! sorted order where it decides what they do on a topology change, so a
//! seed replays (the brokers' other hash maps still iterate in a
//! per-process order; where that shows, a seed's step may differ a little
//! between runs).
//!
//! Invariants, checked at every delivery and acknowledgement:
//! - a topic's (epoch, seq) always names the same message: numbers never
//!   repeat or go back within a sequence space, however ownership moved;
//! - a subscriber sees each topic's numbers contiguous within an epoch,
//!   unless told of a gap (`gap` notice), and an epoch change only after
//!   a `lost` notice;
//! - without deaths, no gap and no epoch change: nothing acknowledged is
//!   lost (a leave that overruns its deadline counts as a death), and
//!   every acknowledged message from the group's first delivery on
//!   reached a member of the group, however often its topic moved.
//!
//! `SIM_SEED`, `SIM_SEEDS`, `SIM_STEPS` as in the other simulations; the
//! seed is printed on failure, with the trail of the failing topic's
//! topology changes, claims, hand-offs and follows (`SIM_TRAIL=N` lines,
//! `SIM_FOCUS=text` to keep only lines with it; `SIM_LOG=debug` shows the
//! brokers' hand-off decisions). `SIM_OVERLAPPING=1` lets a change come
//! before every node applied the previous one: the numbering and
//! announcement invariants hold there too (tested below), but a topic
//! may then restart in a new sequence space without a death (a joining
//! node knows only the set without itself before it joined).
//!
//! Defects this simulation found and that are fixed (each was a real one:
//! the live tests passed with all of them): a copy at number 0 followed
//! again "from now"; a node asked for a topic it was itself taking over
//! answered "nothing"; a copy whose owner changed sequence space kept
//! serving old numbers; `adopt` went back within an epoch; a leaving node
//! counted as done while taking a topic over; a copy went back when the
//! node it followed was behind it (and the state it handed on with it);
//! claims waiting on each other in a circle (a node relaying a claim for
//! a topic it was itself claiming); a node given its own topic back
//! claimed it from elsewhere; the answer to an earlier follow taken for
//! the answer to the latest; a node link's first replay did not tell its
//! gap; a hand-off dropped the history the copy missed; a state answer
//! lost when the claimer's view moved on; the whole link closed for one
//! topic's new sequence space (losing hand-offs in flight on it); a copy
//! that started live answered resumes with gaps its owner did not have; a
//! node that gave its topic to a newer view claimed it back; a claim to a
//! node gone without the state started the topic afresh. With group
//! members (2026-12-03): a member on another node that left before its
//! join was answered got a native reply written onto the node link (a
//! malformed frame there); a member's leave handled before the join it
//! followed, held for the topic's hand-off, left a member that no longer
//! existed holding deliveries.

mod sim_support;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use proto::broker::{
    Action, Broker, BrokerLimits, Format, JoinRequest, PublishReply, Published, SubscribeRequest, Subscription,
};
use proto::cluster::Topology;
use proto::durable::PublishOptions;
use proto::group::{GroupSettings, Settle};
use proto::link::{self, LinkFrame};
use proto::message::{Now, PayloadKind};
use proto::metrics::Metrics;
use proto::outbound::{Outbound, SlowConsumerPolicy};
use proto::owner::{Owner, OwnerLimits};
use proto::topic::TopicName;
use proto::ws::{Decoder, WsEvent};
use sim_support::{run_seeds, Rng};

const NODES_MAX: usize = 5;
const TOPICS: usize = 6;
/// Large enough that the simulation never meets a queue bound.
const QUEUE_BYTES: usize = 64 << 20;
/// Frames one link write carries at most, toward an owner.
const LINK_BATCH_MAX: usize = 32;

type Check = Result<(), String>;

/// One node: its broker, its subscriber, its links' owner-side sessions.
struct Node {
    addr: String,
    broker: Broker,
    /// Whether the process runs.
    alive: bool,
    /// The topology version it has applied.
    applied: u64,
    /// The subscriber's queue and what it saw: per topic, its epoch and
    /// last seq, and the messages (epoch, seq, id).
    sub: Rc<Outbound>,
    sub_decoder: Decoder,
    seen: BTreeMap<String, SubView>,
    /// Owner side of each follower's link: the session's queue, its decoder
    /// on the follower's side, and its follows (topic -> subscription id).
    sessions: BTreeMap<String, Session>,
    /// Frames this node queued toward each owner node.
    outgoing: BTreeMap<String, VecDeque<Bytes>>,
    /// Publishes awaiting their answer: broker req -> message id.
    publishing: HashMap<u64, u64>,
    /// Subscribes awaiting their grant: req -> topic.
    granting: HashMap<u64, String>,
    /// Links that failed, to report to the broker.
    down: Vec<String>,
    /// A member of group `g` of every topic: its queue, and its member id
    /// per topic (joined again after `group_lost`).
    member: Rc<Outbound>,
    member_decoder: Decoder,
    memberships: BTreeMap<String, u64>,
}

#[derive(Default, Clone)]
struct SubView {
    epoch: Option<String>,
    last: u64,
    /// Granted at (epoch, last_seq): later messages are owed.
    from: Option<(String, u64)>,
    got: Vec<(String, u64, u64)>,
    lost: u32,
}

struct Session {
    out: Rc<Outbound>,
    decoder: Decoder,
    follows: HashMap<TopicName, u64>,
    /// Follow subscriptions awaiting their grant: req -> (topic, the
    /// follow's generation).
    pending: HashMap<u64, (TopicName, u64)>,
    /// Each topic's latest follow (as the link session counts them): a
    /// grant for an earlier one, or after an unfollow, is undone.
    wanted: HashMap<TopicName, u64>,
    generation: u64,
    /// Group members of the follower node joined over this link: their id
    /// there -> their id here.
    members: HashMap<u64, u64>,
}

struct Sim {
    rng: Rng,
    nodes: Vec<Node>,
    /// The agreed member set and its version, and every earlier set by
    /// version: nodes apply them one by one, in order, as etcd's watch
    /// delivers them.
    members: Vec<String>,
    version: u64,
    history: BTreeMap<u64, Vec<String>>,
    /// Nodes leaving gracefully: step at which they stop at the latest.
    leaving: HashMap<String, u64>,
    /// Every message: id -> (topic, acknowledged (epoch, seq)).
    messages: Vec<(String, Option<(String, u64)>)>,
    /// Messages delivered to group `g` of their topic (by id), and per
    /// topic the first number the group delivered.
    group_got: std::collections::HashSet<u64>,
    group_first: BTreeMap<String, u64>,
    /// (topic, epoch, seq) -> message id: the numbering invariant.
    numbers: HashMap<(String, String, u64), u64>,
    deaths: u32,
    /// What happened, for the report of a failure.
    log: Vec<String>,
    /// Whether a change may come before every node applied the last one.
    overlapping: bool,
    /// Whether an epoch change or a loss without a death fails the run.
    strict: bool,
    start: Instant,
    step: u64,
    stats: Stats,
}

#[derive(Default, Debug)]
struct Stats {
    published: u64,
    acked: u64,
    refused: u64,
    delivered: u64,
    joins: u32,
    leaves: u32,
    deaths: u32,
    claims: u64,
    group_delivered: u64,
    groups_lost: u32,
}

/// What a client reads from `out`: its native JSON frames.
fn read_json(out: &Outbound, decoder: &mut Decoder) -> Result<Vec<serde_json::Value>, String> {
    let mut bytes = Vec::new();
    out.take_batch(&mut bytes, 1 << 16, &mut Vec::new());
    let mut buf = BytesMut::from(&bytes[..]);
    let mut events = Vec::new();
    while let Some(event) = decoder.decode(&mut buf).map_err(|e| e.to_string())? {
        if let WsEvent::Message { payload, .. } = event {
            events.push(serde_json::from_slice::<serde_json::Value>(&payload).map_err(|e| e.to_string())?);
        }
    }
    Ok(events)
}

fn topic(t: usize) -> String {
    format!("sim.{t}")
}

fn new_broker(id: usize, seed: u64, addr: &str, topology: Topology) -> Broker {
    let owner_limits =
        OwnerLimits { topics_max: 64, history_messages_max: 4096, history_bytes_max: 1 << 22, client_pins_max: 64 };
    let owner = Owner::new(owner_limits, seed.wrapping_mul(31).wrapping_add(id as u64 + 1));
    let limits = BrokerLimits { publish_bytes_in_flight_max: 1 << 30 };
    let mut broker = Broker::new(0, 1, owner, limits, Rc::new(Metrics::default()));
    broker.set_cluster(addr.to_string(), topology, true);
    broker
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut sim = Sim {
            rng: Rng(seed),
            nodes: Vec::new(),
            members: Vec::new(),
            version: 1,
            history: BTreeMap::new(),
            leaving: HashMap::new(),
            messages: Vec::new(),
            group_got: std::collections::HashSet::new(),
            group_first: BTreeMap::new(),
            numbers: HashMap::new(),
            deaths: 0,
            log: Vec::new(),
            overlapping: std::env::var("SIM_OVERLAPPING").is_ok(),
            strict: true,
            start: Instant::now(),
            step: 0,
            stats: Stats::default(),
        };
        for _ in 0..3 {
            sim.join().expect("a node joins");
        }
        sim
    }

    fn now(&self) -> Now {
        // 1 ms per step: claims retry and wait on this clock.
        let at = self.start + Duration::from_millis(self.step);
        Now { at, unix_ms: 1_700_000_000_000 + self.step }
    }

    fn topology(&self) -> Topology {
        Topology::new(self.version, &self.members).expect("members fit")
    }

    /// The member set changed: a new version.
    fn changed(&mut self) {
        self.version += 1;
        self.history.insert(self.version, self.members.clone());
    }

    /// Node `i` applies the next member set it has not applied yet.
    fn apply_next(&mut self, i: usize) -> Check {
        let Some((&version, members)) = self.history.range(self.nodes[i].applied + 1..).next() else { return Ok(()) };
        let topology = Topology::new(version, members).expect("members fit");
        let owners: Vec<&str> =
            (0..TOPICS).map(|t| topology.owner_of(&TopicName::new(&topic(t)).unwrap()).unwrap_or("-")).collect();
        self.log.push(format!("{} {} applies v{version}: owners {owners:?}", self.step, self.nodes[i].addr));
        let now = self.now();
        self.nodes[i].applied = version;
        self.nodes[i].broker.set_topology(topology, now);
        self.actions(i)
    }

    fn node_index(&self, addr: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.addr == addr && n.alive)
    }

    /// A new node joins (registers: the member set changes).
    fn join(&mut self) -> Result<(), String> {
        let id = self.nodes.len();
        let addr = format!("n{id}:1");
        self.members.push(addr.clone());
        self.changed();
        let broker = new_broker(id, self.rng.next(), &addr, self.topology());
        let version = self.version;
        self.nodes.push(Node {
            addr,
            broker,
            alive: true,
            applied: version,
            sub: Rc::new(Outbound::new(QUEUE_BYTES, SlowConsumerPolicy::Disconnect)),
            sub_decoder: Decoder::of_server_frames(QUEUE_BYTES),
            seen: BTreeMap::new(),
            sessions: BTreeMap::new(),
            outgoing: BTreeMap::new(),
            publishing: HashMap::new(),
            granting: HashMap::new(),
            down: Vec::new(),
            member: Rc::new(Outbound::new(QUEUE_BYTES, SlowConsumerPolicy::Disconnect)),
            member_decoder: Decoder::of_server_frames(QUEUE_BYTES),
            memberships: BTreeMap::new(),
        });
        self.stats.joins += 1;
        // Its subscriber subscribes to every topic.
        for t in 0..TOPICS {
            let now = self.now();
            let node = &mut self.nodes[id];
            let request = SubscribeRequest {
                topic: TopicName::new(&topic(t)).unwrap(),
                out: node.sub.clone(),
                client: IpAddr::V4(Ipv4Addr::new(10, 0, 0, id as u8)),
                format: Format::Native,
                from: None,
                reply_id: Some(t as u64),
            };
            match node.broker.subscribe(request, now) {
                Subscription::Live(_) => {}
                Subscription::Pending { req, .. } => {
                    node.granting.insert(req, topic(t));
                }
            }
            self.actions(id)?;
            self.member_join(id, t)?;
        }
        Ok(())
    }

    /// Node `i`'s member joins group `g` of topic `t`.
    fn member_join(&mut self, i: usize, t: usize) -> Check {
        let now = self.now();
        let node = &mut self.nodes[i];
        let request = JoinRequest {
            topic: TopicName::new(&topic(t)).unwrap(),
            group: std::sync::Arc::from("g"),
            out: node.member.clone(),
            prefetch: 8,
            settings: GroupSettings::default(),
            dead_letter: TopicName::new("sim.dead").unwrap(),
            reply_id: 1000 + t as u64,
        };
        let sub = node.broker.join_group(request, now);
        node.memberships.insert(topic(t), sub);
        self.log.push(format!("{} {} member joins {} as {sub}", self.step, self.nodes[i].addr, topic(t)));
        self.actions(i)
    }

    /// Node `i`'s member reads what is queued for it: acknowledges each
    /// delivery at once, and joins again when its group is lost.
    fn read_member(&mut self, i: usize) -> Check {
        if !self.nodes[i].alive || self.nodes[i].member.is_empty() {
            return Ok(());
        }
        let node = &mut self.nodes[i];
        let events = read_json(&node.member, &mut node.member_decoder)?;
        let addr = node.addr.clone();
        for v in events {
            let t = v["topic"].as_str().unwrap_or("").to_string();
            match v["type"].as_str() {
                Some("reply") if v["ok"] == true => {}
                Some("reply") => {
                    // A join the owner could not answer (its topic moved
                    // meanwhile): joined again.
                    let id = v["id"].as_u64().ok_or("reply id")?;
                    self.log.push(format!("{} {addr} member join refused: {v}", self.step));
                    self.member_join(i, (id - 1000) as usize)?;
                }
                Some("group_lost") => {
                    self.stats.groups_lost += 1;
                    self.log.push(format!("{} {addr} member told group_lost on {t}", self.step));
                    let index = (0..TOPICS).find(|&k| topic(k) == t).ok_or("group_lost topic")?;
                    self.member_join(i, index)?;
                }
                Some("message") => {
                    self.stats.group_delivered += 1;
                    let seq = v["seq"].as_u64().ok_or("seq")?;
                    let id: u64 = v["data"].as_str().and_then(|d| d.parse().ok()).ok_or("data")?;
                    if self.messages[id as usize].0 != t {
                        return Err(format!(
                            "group: message {id} of {} delivered on {t}",
                            self.messages[id as usize].0
                        ));
                    }
                    self.group_got.insert(id);
                    self.log.push(format!("{} {addr} member got {t} {seq} (message {id})", self.step));
                    let first = self.group_first.entry(t.clone()).or_insert(seq);
                    *first = (*first).min(seq);
                    let Some(&sub) = self.nodes[i].memberships.get(&t) else { continue };
                    let now = self.now();
                    self.nodes[i].broker.settle(sub, Settle::Ack { seq }, now);
                    self.actions(i)?;
                }
                _ => return Err(format!("{addr} member: unexpected {v}")),
            }
        }
        Ok(())
    }

    /// Runs the simulation for `steps` steps.
    fn run(&mut self, steps: u64, deaths_allowed: bool) -> Check {
        for _ in 0..steps {
            self.step += 1;
            match self.rng.below(100) {
                0..=39 => self.publish()?,
                40..=69 => self.deliver_link()?,
                70..=77 => self.read_subscriber()?,
                78..=84 => {
                    let i = self.rng.below(self.nodes.len());
                    self.read_member(i)?
                }
                85..=92 => self.apply_view()?,
                93..=95 => self.tick()?,
                96 => self.change(deaths_allowed)?,
                _ => self.report_down()?,
            }
        }
        self.quiesce()
    }

    /// Membership changes: a join, a graceful leave, or (if allowed) a death.
    fn change(&mut self, deaths_allowed: bool) -> Check {
        // OVERLAPPING: a change only once every live node applied the
        // last one, unless overlapping changes are simulated.
        if !self.overlapping && self.nodes.iter().any(|n| n.alive && n.applied != self.version) {
            return Ok(());
        }
        let alive: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.nodes[i].alive).collect();
        let members = self.members.len();
        match self.rng.below(3) {
            0 if self.nodes.len() < NODES_MAX + 3 && members < NODES_MAX => self.join(),
            1 if members > 2 => {
                let i = alive[self.rng.below(alive.len())];
                let addr = self.nodes[i].addr.clone();
                if !self.members.contains(&addr) {
                    return Ok(());
                }
                self.members.retain(|m| *m != addr);
                self.changed();
                self.leaving.insert(addr, self.step + 3000);
                self.stats.leaves += 1;
                Ok(())
            }
            2 if deaths_allowed && members > 2 => {
                let i = alive[self.rng.below(alive.len())];
                let addr = self.nodes[i].addr.clone();
                if self.members.contains(&addr) {
                    // Its lease expires: the set changes without it.
                    self.members.retain(|m| *m != addr);
                    self.changed();
                }
                self.kill(i);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn kill(&mut self, i: usize) {
        let addr = self.nodes[i].addr.clone();
        self.log.push(format!("{} {addr} stops (applies sim.* no more)", self.step));
        self.nodes[i].alive = false;
        self.leaving.remove(&addr);
        self.deaths += 1;
        self.stats.deaths += 1;
        let now = self.now();
        for node in self.nodes.iter_mut().filter(|n| n.alive) {
            node.outgoing.remove(&addr);
            // Its link sessions end: their group members leave (what they
            // held goes to the others); the actions run at the node's next.
            if let Some(session) = node.sessions.remove(&addr) {
                for sub in session.members.into_values() {
                    node.broker.leave_group(sub, now);
                }
            }
            node.down.push(addr.clone());
        }
    }

    /// A lagging node applies the current member set.
    fn apply_view(&mut self) -> Check {
        let i = self.rng.below(self.nodes.len());
        if !self.nodes[i].alive {
            return Ok(());
        }
        self.apply_next(i)
    }

    fn tick(&mut self) -> Check {
        let i = self.rng.below(self.nodes.len());
        if !self.nodes[i].alive {
            return Ok(());
        }
        let now = self.now();
        self.nodes[i].broker.cluster_tick(now);
        self.actions(i)?;
        // A leaving node stops once its topics were claimed, or at its
        // deadline (then as a death: its links fail).
        let addr = self.nodes[i].addr.clone();
        if let Some(&until) = self.leaving.get(&addr) {
            // Done once its topics were claimed and the answers written (a
            // stopping node drains its links' queues before it closes).
            let done = self.nodes[i].applied == self.version
                && self.nodes[i].broker.handing_over() == 0
                && self.nodes[i].sessions.values().all(|s| s.out.is_empty());
            if done || self.step >= until {
                self.kill(i);
                self.deaths -= u32::from(done); // a clean exit is not a death
                self.stats.deaths -= u32::from(done);
            }
        }
        Ok(())
    }

    fn report_down(&mut self) -> Check {
        let i = self.rng.below(self.nodes.len());
        if !self.nodes[i].alive || self.nodes[i].down.is_empty() {
            return Ok(());
        }
        let now = self.now();
        for node in std::mem::take(&mut self.nodes[i].down) {
            self.log.push(format!("{} {} hears its link to {node} failed", self.step, self.nodes[i].addr));
            self.nodes[i].broker.link_down(&node, now);
        }
        self.actions(i)
    }

    fn publish(&mut self) -> Check {
        let i = self.rng.below(self.nodes.len());
        if !self.nodes[i].alive {
            return Ok(());
        }
        let t = self.rng.below(TOPICS);
        let id = self.messages.len() as u64;
        self.messages.push((topic(t), None));
        self.stats.published += 1;
        let now = self.now();
        let payload = Bytes::from(format!("{id}"));
        let name = TopicName::new(&topic(t)).unwrap();
        let node = &mut self.nodes[i];
        match node.broker.publish(
            name,
            PayloadKind::Text,
            payload,
            PublishOptions::default(),
            PublishReply::Caller,
            now,
        ) {
            Published::Now(result) => self.acked(id, result.map_err(|e| e.to_string()))?,
            Published::Later { req } => {
                node.publishing.insert(req, id);
            }
        }
        self.actions(i)
    }

    /// A publish was answered: record its number (never reused).
    fn acked(&mut self, id: u64, result: Result<u64, String>) -> Check {
        let Ok(seq) = result else {
            self.stats.refused += 1;
            return Ok(());
        };
        let _ = seq; // its epoch comes with its delivery; numbers are checked there
        self.stats.acked += 1;
        self.messages[id as usize].1 = Some((String::new(), seq));
        Ok(())
    }

    /// Carries out node `i`'s broker actions.
    fn actions(&mut self, i: usize) -> Check {
        let mut actions = Vec::new();
        loop {
            self.nodes[i].broker.take_actions(&mut actions);
            if actions.is_empty() {
                return Ok(());
            }
            for action in actions.drain(..) {
                match action {
                    Action::Link { node, frame } => {
                        if !matches!(frame, LinkFrame::Publish { .. }) {
                            let f = format!("{frame:?}");
                            self.log.push(format!(
                                "{} {} -> {node}: {}",
                                self.step,
                                self.nodes[i].addr,
                                &f[..f.len().min(160)]
                            ));
                        }
                        if matches!(frame, LinkFrame::Claim { .. }) {
                            self.stats.claims += 1;
                        }
                        let bytes = Bytes::from(link::encode(&frame));
                        match self.node_index(&node) {
                            Some(_) => self.nodes[i].outgoing.entry(node).or_default().push_back(bytes),
                            None => {
                                // Refused: the link fails (reported later).
                                if !self.nodes[i].down.contains(&node) {
                                    self.nodes[i].down.push(node);
                                }
                            }
                        }
                    }
                    Action::Published { req, result } => {
                        if let Some(id) = self.nodes[i].publishing.remove(&req) {
                            self.acked(id, result.map_err(|e| e.to_string()))?;
                        }
                    }
                    Action::Subscribed { req, result } => {
                        if let Some(t) = self.nodes[i].granting.remove(&req) {
                            result.map_err(|e| format!("{}: subscribe {t}: {e}", self.nodes[i].addr))?;
                        } else {
                            // A follow on one of this node's sessions: kept if
                            // still the latest, else undone (as the link
                            // session does).
                            let mut undo = Vec::new();
                            for session in self.nodes[i].sessions.values_mut() {
                                if let Some((topic, generation)) = session.pending.remove(&req) {
                                    if let Ok(g) = &result {
                                        if session.wanted.get(&topic) == Some(&generation) {
                                            session.follows.insert(topic, g.sub_id);
                                        } else {
                                            undo.push((topic, g.sub_id));
                                        }
                                    }
                                }
                            }
                            let now = self.now();
                            for (topic, sub) in undo {
                                self.nodes[i].broker.unsubscribe(&topic, sub, now);
                            }
                        }
                    }
                    Action::FanOut => while self.nodes[i].broker.fan_out_next() {},
                    Action::Send { .. } => return Err("one shard sent to another".into()),
                    Action::Flush(_)
                    | Action::Room
                    | Action::Commit
                    | Action::ReadLog(_)
                    | Action::CatchUp { .. }
                    | Action::Tick
                    | Action::ClaimAnswered => {}
                    Action::DurableMoved(moved) => return Err(format!("no durable topic here, yet {moved:?}")),
                    Action::ListStored { topic } => return Err(format!("no durable topic here, yet {topic} listed")),
                }
            }
        }
    }

    /// One link frame travels: from a follower to an owner (handled as the
    /// owner's link session does), or the owner's session queue to the
    /// follower's broker.
    fn deliver_link(&mut self) -> Check {
        let i = self.rng.below(self.nodes.len());
        if !self.nodes[i].alive {
            return Ok(());
        }
        if self.rng.below(2) == 0 {
            // Follower i -> owner.
            let targets: Vec<String> =
                self.nodes[i].outgoing.iter().filter(|(_, q)| !q.is_empty()).map(|(n, _)| n.clone()).collect();
            if targets.is_empty() {
                return Ok(());
            }
            let to = targets[self.rng.below(targets.len())].clone();
            // A write carries what is queued, up to a batch (as the link's
            // writer batches): a burst of forwarded publishes does not hold
            // a claim back for thousands of steps.
            let batch = 1 + self.rng.below(LINK_BATCH_MAX);
            for _ in 0..batch {
                let Some(bytes) = self.nodes[i].outgoing.get_mut(&to).and_then(|q| q.pop_front()) else {
                    return Ok(());
                };
                let Some(o) = self.node_index(&to) else { return Ok(()) };
                let from = self.nodes[i].addr.clone();
                let frame = link::decode(&bytes, self.start).map_err(|e| {
                    format!("{from} -> {to}: {e} (frame of {} bytes, type {:?})", bytes.len(), bytes.first())
                })?;
                self.owner_side(o, &from, frame)?;
            }
            Ok(())
        } else {
            // A session the owner closed: the link fails (the owner drops
            // its follows, the follower its queue, and hears of it).
            let closed: Vec<String> =
                self.nodes[i].sessions.iter().filter(|(_, s)| s.out.is_closing()).map(|(n, _)| n.clone()).collect();
            for f_addr in closed {
                let now = self.now();
                let owner = self.nodes[i].addr.clone();
                if let Some(session) = self.nodes[i].sessions.remove(&f_addr) {
                    for (topic, sub) in session.follows {
                        self.nodes[i].broker.unsubscribe(&topic, sub, now);
                    }
                    for sub in session.members.into_values() {
                        self.nodes[i].broker.leave_group(sub, now);
                    }
                }
                self.actions(i)?;
                if let Some(f) = self.node_index(&f_addr) {
                    // The follower's link reads the close, drops its queue
                    // and tells its broker before it sends on a new link.
                    self.log
                        .push(format!("{} link {f_addr} -> {owner} closed by the owner: {f_addr} hears", self.step));
                    self.nodes[f].outgoing.remove(&owner);
                    self.nodes[f].broker.link_down(&owner, now);
                    self.actions(f)?;
                }
            }
            // Owner i's session toward a follower -> that follower.
            let followers: Vec<String> =
                self.nodes[i].sessions.iter().filter(|(_, s)| !s.out.is_empty()).map(|(n, _)| n.clone()).collect();
            if followers.is_empty() {
                return Ok(());
            }
            let f_addr = followers[self.rng.below(followers.len())].clone();
            let Some(f) = self.node_index(&f_addr) else { return Ok(()) };
            let owner = self.nodes[i].addr.clone();
            let mut bytes = Vec::new();
            let session = self.nodes[i].sessions.get_mut(&f_addr).expect("listed");
            session.out.take_batch(&mut bytes, 4096, &mut Vec::new());
            let mut buf = BytesMut::from(&bytes[..]);
            let mut frames = Vec::new();
            while let Some(event) = session.decoder.decode(&mut buf).map_err(|e| e.to_string())? {
                if let WsEvent::Message { payload, .. } = event {
                    frames.push(link::decode(&payload, self.start).map_err(|e| {
                        format!(
                            "{owner} => {f_addr}: {e} (frame of {} bytes, type {:?})",
                            payload.len(),
                            payload.first()
                        )
                    })?);
                }
            }
            let now = self.now();
            for frame in frames {
                if !matches!(frame, LinkFrame::PublishDone { .. }) {
                    let text = match &frame {
                        LinkFrame::Message { topic, message } => format!("Message {} {}", topic.as_str(), message.seq),
                        other => {
                            let f = format!("{other:?}");
                            f[..f.len().min(160)].to_string()
                        }
                    };
                    self.log.push(format!("{} {owner} => {}: {text}", self.step, self.nodes[f].addr));
                }
                self.nodes[f].broker.link_frame(&owner, frame, now);
            }
            self.actions(f)
        }
    }

    /// Owner `o` handles `frame` from follower `from` (its link session).
    fn owner_side(&mut self, o: usize, from: &str, frame: LinkFrame) -> Check {
        let now = self.now();
        let node = &mut self.nodes[o];
        let session = node.sessions.entry(from.to_string()).or_insert_with(|| Session {
            out: Rc::new(Outbound::new(QUEUE_BYTES, SlowConsumerPolicy::Disconnect)),
            decoder: Decoder::of_server_frames(QUEUE_BYTES),
            follows: HashMap::new(),
            pending: HashMap::new(),
            wanted: HashMap::new(),
            generation: 0,
            members: HashMap::new(),
        });
        let out = session.out.clone();
        match frame {
            LinkFrame::Publish { id, topic, ack, kind, payload, options } => {
                let reply = PublishReply::Link { out, id };
                node.broker.publish(topic, kind, payload, options.into_options(ack), reply, now);
            }
            LinkFrame::Follow { topic, from: resume } => {
                if let Some(sub) = session.follows.remove(&topic) {
                    node.broker.unsubscribe(&topic, sub, now);
                }
                let request = SubscribeRequest {
                    topic: topic.clone(),
                    out,
                    client: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    format: Format::Link,
                    from: resume,
                    reply_id: Some(0),
                };
                let session = node.sessions.get_mut(from).expect("made above");
                session.generation += 1;
                let generation = session.generation;
                session.wanted.insert(topic.clone(), generation);
                match node.broker.subscribe(request, now) {
                    Subscription::Live(g) => {
                        session.follows.insert(topic, g.sub_id);
                    }
                    Subscription::Pending { req, .. } => {
                        session.pending.insert(req, (topic, generation));
                    }
                }
            }
            LinkFrame::Unfollow { topic } => {
                let session = node.sessions.get_mut(from).expect("made above");
                session.wanted.remove(&topic);
                if let Some(sub) = session.follows.remove(&topic) {
                    node.broker.unsubscribe(&topic, sub, now);
                }
            }
            LinkFrame::Claim { topic, version, node: claimer, at } => {
                node.broker.claim(topic, version, claimer, at, out, now)
            }
            LinkFrame::Offer { topic } => node.broker.offer(topic, now),
            // As the link session does (`link_session::group_op`).
            LinkFrame::Group { member, op } => match op {
                link::GroupLink::Join { topic, group, prefetch, settings, dead_letter } => {
                    if !session.members.contains_key(&member) {
                        let request = JoinRequest {
                            topic,
                            group: group.into(),
                            out,
                            prefetch,
                            settings,
                            dead_letter,
                            reply_id: member,
                        };
                        let sub = node.broker.join_group_link(request, member, now);
                        node.sessions.get_mut(from).expect("made above").members.insert(member, sub);
                    }
                }
                link::GroupLink::Leave => {
                    if let Some(sub) = session.members.remove(&member) {
                        node.broker.leave_group(sub, now);
                    }
                }
                link::GroupLink::Settle(settle) => {
                    if let Some(&sub) = session.members.get(&member) {
                        node.broker.settle(sub, settle, now);
                    }
                }
                other => return Err(format!("a member's frame sent to an owner: {other:?}")),
            },
            other => return Err(format!("an owner's frame sent to an owner: {other:?}")),
        }
        self.actions(o)
    }

    /// Node `i`'s subscriber reads what is queued for it.
    fn read_subscriber(&mut self) -> Check {
        let i = self.rng.below(self.nodes.len());
        if !self.nodes[i].alive {
            return Ok(());
        }
        let node = &mut self.nodes[i];
        if node.sub.is_empty() {
            return Ok(());
        }
        let events = read_json(&node.sub, &mut node.sub_decoder)?;
        let addr = node.addr.clone();
        for v in events {
            let t = v["topic"].as_str().unwrap_or("").to_string();
            match v["type"].as_str() {
                Some("reply") => {
                    let (epoch, last) =
                        (v["epoch"].as_str().unwrap_or("").to_string(), v["last_seq"].as_u64().unwrap_or(0));
                    self.log.push(format!("{} {addr} subscriber granted {t} at {epoch} {last}", self.step));
                    let view = self.nodes[i].seen.entry(t).or_default();
                    view.epoch = Some(epoch.clone());
                    view.last = last;
                    view.from = Some((epoch, last));
                }
                Some("lost") => {
                    let view = self.nodes[i].seen.entry(t).or_default();
                    view.epoch = Some(v["epoch"].as_str().unwrap_or("").to_string());
                    view.last = v["last_seq"].as_u64().unwrap_or(0);
                    view.lost += 1;
                    if self.deaths == 0 && self.strict {
                        return Err(format!("{addr}: {v} without a death"));
                    }
                }
                Some("gap") => {
                    // Announced: the subscriber goes on after it; allowed
                    // only where a node died (it held what is missing).
                    let to = v["to_seq"].as_u64().ok_or("to_seq")?;
                    self.log.push(format!("{} {addr} subscriber told gap {v}", self.step));
                    if self.deaths == 0 && self.strict {
                        return Err(format!("{addr}: {v} without a death"));
                    }
                    let view = self.nodes[i].seen.entry(t).or_default();
                    view.last = view.last.max(to);
                }
                Some("message") => {
                    self.stats.delivered += 1;
                    let seq = v["seq"].as_u64().ok_or("seq")?;
                    let id: u64 = v["data"].as_str().and_then(|d| d.parse().ok()).ok_or("data")?;
                    let view = self.nodes[i].seen.entry(t.clone()).or_default();
                    let epoch = view.epoch.clone().ok_or_else(|| format!("{addr}: {t} message before its grant"))?;
                    if seq != view.last + 1 {
                        return Err(format!(
                            "{addr}: {t} epoch {epoch}: seq {seq} after {} (granted at {:?}, {} lost notices, had {:?})",
                            view.last,
                            view.from,
                            view.lost,
                            view.got.iter().rev().take(3).collect::<Vec<_>>()
                        ));
                    }
                    view.last = seq;
                    view.got.push((epoch.clone(), seq, id));
                    match self.numbers.insert((t.clone(), epoch.clone(), seq), id) {
                        Some(other) if other != id => {
                            return Err(format!("{t} epoch {epoch} seq {seq} names messages {other} and {id}"))
                        }
                        _ => {}
                    }
                    let (msg_topic, acked) = &self.messages[id as usize];
                    if *msg_topic != t {
                        return Err(format!("message {id} of {msg_topic} delivered on {t}"));
                    }
                    if let Some((_, s)) = acked {
                        if *s != seq && self.deaths == 0 {
                            return Err(format!("message {id} acknowledged as seq {s}, delivered as {seq}"));
                        }
                    }
                }
                _ => return Err(format!("{addr}: unexpected {v}")),
            }
        }
        Ok(())
    }

    /// Lets every view catch up and every queue drain, then checks that
    /// nothing acknowledged was lost (runs without deaths).
    fn quiesce(&mut self) -> Check {
        for _ in 0..200_000 {
            self.step += 1;
            for i in 0..self.nodes.len() {
                if !self.nodes[i].alive {
                    continue;
                }
                self.apply_next(i)?;
            }
            match self.rng.below(6) {
                0 | 1 => self.deliver_link()?,
                2 => self.read_subscriber()?,
                3 => self.tick()?,
                4 => {
                    let i = self.rng.below(self.nodes.len());
                    self.read_member(i)?
                }
                _ => self.report_down()?,
            }
        }
        let busy: Vec<&str> = self
            .nodes
            .iter()
            .filter(|n| {
                n.alive && (n.outgoing.values().any(|q| !q.is_empty()) || !n.sub.is_empty() || !n.member.is_empty())
            })
            .map(|n| n.addr.as_str())
            .collect();
        if !busy.is_empty() {
            return Err(format!("queues not drained on {busy:?}"));
        }
        if self.deaths > 0 || !self.strict {
            return Ok(());
        }
        // Every acknowledged message reached every live subscriber that was
        // subscribed when it was numbered.
        for node in self.nodes.iter().filter(|n| n.alive) {
            for (t, view) in &node.seen {
                let Some((epoch, from)) = &view.from else { continue };
                let got: BTreeMap<u64, u64> =
                    view.got.iter().filter(|(e, _, _)| e == epoch).map(|(_, s, id)| (*s, *id)).collect();
                for (id, (mt, acked)) in self.messages.iter().enumerate() {
                    let Some((_, seq)) = acked else { continue };
                    if mt == t && seq > from && got.get(seq) != Some(&(id as u64)) {
                        return Err(format!("{}: {t} acknowledged seq {seq} (message {id}) never arrived", node.addr));
                    }
                }
                if view.lost > 0 {
                    return Err(format!("{}: {t} changed epoch without a death", node.addr));
                }
            }
        }
        // Every acknowledged message from the group's first delivery on
        // reached a member of the group (at least once), however its topic
        // moved: the groups went with their topics.
        for (id, (t, acked)) in self.messages.iter().enumerate() {
            let (Some((_, seq)), Some(first)) = (acked, self.group_first.get(t)) else { continue };
            if seq >= first && !self.group_got.contains(&(id as u64)) {
                return Err(format!("{t}: acknowledged seq {seq} (message {id}) never reached group g"));
            }
        }
        Ok(())
    }
}

/// Runs `seeds` seeds; `strict`: no epoch may change without a death, and
/// nothing acknowledged may be lost without one.
fn simulate(seeds: u64, steps: u64, strict: bool) {
    simulate_with(seeds, steps, strict, std::env::var("SIM_OVERLAPPING").is_ok());
}

fn run_overlapping(seeds: u64, steps: u64) {
    simulate_with(seeds, steps, false, true);
}

fn simulate_with(seeds: u64, steps: u64, strict: bool, overlapping: bool) {
    // SIM_LOG=debug shows the brokers' hand-off decisions.
    if std::env::var("SIM_LOG").is_ok() {
        runtime::init_tracing("SIM_LOG");
    }
    run_seeds(seeds, steps, |seed, steps| {
        let deaths = !strict || seed % 2 == 1;
        let mut sim = Sim::new(seed);
        sim.strict = strict;
        sim.overlapping = overlapping;
        if let Err(e) = sim.run(steps, deaths) {
            let about = e
                .find("sim.")
                .map(|at| e[at..].chars().take_while(|c| *c == '.' || c.is_ascii_alphanumeric()).collect::<String>())
                .unwrap_or_default();
            let focus = std::env::var("SIM_FOCUS").unwrap_or_default();
            let trail: Vec<&String> = sim
                .log
                .iter()
                .filter(|l| {
                    (about.is_empty()
                        || l.contains(&about)
                        || l.contains("applies")
                        || l.contains("stops")
                        || l.contains("hears"))
                        && l.contains(&focus)
                })
                .collect();
            let keep = std::env::var("SIM_TRAIL").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
            let trail: Vec<&&String> = trail.iter().rev().take(keep).rev().collect();
            for line in trail {
                eprintln!("{line}");
            }
            panic!("seed {seed} (deaths {deaths}) step {}: {e}\n{:?}", sim.step, sim.stats);
        }
        if seed < 4 {
            eprintln!("seed {seed} (deaths {deaths}): {:?}", sim.stats);
        }
    });
}

/// Numbers are never reused within an epoch, each subscriber sees its
/// topics' numbers contiguous within an epoch (or is told of a gap), and
/// an epoch changes under a subscriber only with a `lost` notice (deaths
/// on every seed).
#[test]
fn topology_changes_never_reuse_a_number_and_announce_every_epoch_change() {
    simulate(40, 20_000, false);
}

/// Without deaths no epoch changes, no gaps, and nothing acknowledged is
/// lost (odd seeds still have deaths and check only the invariants above).
#[test]
fn without_deaths_no_epoch_changes_and_nothing_acknowledged_is_lost() {
    simulate(40, 20_000, true);
}

/// Membership changes that overlap (a change before every node applied the
/// last): the numbering and announcement invariants still hold.
#[test]
fn overlapping_changes_never_reuse_a_number_and_announce_every_epoch_change() {
    run_overlapping(20, 20_000);
}
