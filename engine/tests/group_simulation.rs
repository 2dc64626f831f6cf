//! A seeded, deterministic simulation of consumer groups across shards:
//! several shards' `Broker`s, the channel mesh between them as per-pair
//! FIFO queues delivered at random moments, simulated time, and members on
//! random shards that join, acknowledge (one by one or cumulatively),
//! refuse (now or after a delay), stall past their ack deadline, change
//! their prefetch, leave, and die. Publishers publish keyed messages on
//! random shards; requesters on random shards send requests (with random
//! timeouts) that members answer with a result or an error as they
//! acknowledge them. After every step:
//!
//! - each delivery of a message has its own number (1, 2, 3...), a
//!   member's deliveries arrive in tag order, and a message is processed
//!   twice only if it was delivered twice;
//! - the owner never has more unacknowledged deliveries out to a member
//!   than the member's prefetch;
//! - a member receives a key's first deliveries in sequence order;
//! - no member receives a message of a group it is not in;
//! - a scheduled message is published only when due, and never when a
//!   later schedule with its id replaced it, `if_absent` kept an earlier
//!   one, or it was cancelled first (the simulation follows the owner's
//!   table in the order the owner applies the requests);
//! - each request is answered exactly once, on its own requester, with its
//!   own result or a documented error; a responder is told its reply was
//!   taken at most once per request, and only when the requester got a
//!   responder's answer (checked at the end);
//! - a group deleted (`delete_group`, asked when no member is known) takes
//!   what it had not finished with it; nothing after the deletion is lost;
//! - the owner's books agree (`Group::check`): every unacknowledged
//!   message is with its segment's holder, so a key is never with two
//!   members at once, and the counts match.
//!
//! At the end the chaos stops: every member still alive processes what it
//! gets, time runs past every deadline, and every published message must
//! have been processed or dead-lettered (published to the group's
//! dead-letter topic, which the simulation watches on the mesh): none lost.
//!
//! Odd seeds make the topic durable: its owner's group commits are written
//! to segments kept in memory (a commit taken may be lost by a crash
//! before it is written), the group reads the log through `ReadLog`
//! answers (now and then one that brings nothing, as a failed read), its
//! positions are saved when the broker hands them over, and now and then
//! the node restarts as after `kill -9`: every broker is made anew, the
//! topic recovered from the segments and the group restored from its last
//! save; members, requests, schedules and items in flight are gone. Then
//! also: every acknowledged publish is in the log, a schedule that fired
//! is in the log or pending again, and after a restart a message is
//! delivered again only at or after its segment's saved position (what was
//! acknowledged before the save never comes back).
//!
//! `cargo test --test group_simulation` runs `SIM_SEEDS` seeds (default
//! 50) of `SIM_STEPS` steps (default 20,000); a failure names its seed:
//! rerun with `SIM_SEED=n`.

mod sim_support;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::broker::LogRead;
use proto::broker::{
    Action, Answer, Broker, BrokerLimits, Item, JoinRequest, PublishOptions, PublishReply, Published, RequestSpec,
    ScheduleAsk, Settle,
};
use proto::durable::{DurableSpec, LogLimits, TopicLog};
use proto::group::{segment_of, GroupSettings, SavedGroup};
use proto::message::ReplyTo;
use proto::message::{Message, Now, PayloadKind};
use proto::metrics::Metrics;
use proto::outbound::{Outbound, SlowConsumerPolicy};
use proto::owner::{Owner, OwnerLimits, TopicCommit};
use proto::schedule::Scheduled;
use proto::topic::TopicName;
use sim_support::{run_seeds, Rng};

const SHARDS: usize = 3;
/// Keys the publishers use.
const KEYS: u64 = 7;
/// Members alive at most.
const MEMBERS_MAX: usize = 5;
/// Ack deadline and deliveries before the dead-letter topic.
const ACK_TIMEOUT_MS: u64 = 50;
const MAX_DELIVERIES: u32 = 4;
/// Native ids of members' replies start here (below: their joins).
const REPLY_IDS: u64 = 1_000;
/// A durable run restarts the node about once in this many steps.
const RESTART_ONE_IN: usize = 2_500;
/// Small segments, so that the log rolls.
const LOG_LIMITS: LogLimits = LogLimits { segment_bytes_max: 2048, segment_age_ms: 500 };

#[test]
fn seeds() {
    run_seeds(50, 20_000, run_or_panic);
}

#[test]
#[ignore = "long: 1,000 seeds of 100,000 steps; cargo test --profile ci --test group_simulation -- --ignored"]
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
    if let Err(why) = sim.drain() {
        panic!("seed {seed} at the end: {why} (rerun: SIM_SEED={seed} SIM_STEPS={steps})");
    }
    let s = &sim.stats;
    assert!(s.processed > 0, "seed {seed}: nothing processed");
    eprintln!(
        "seed {seed}: {steps} steps, {} published, {} scheduled ({} published when due, {} replaced or cancelled), \
         {} requests ({} answered by a responder), {} processed ({} twice), \
         {} redeliveries, {} dead letters, {} joins, {} leaves, {} deaths, {} refusals, \
         {} deletions asked ({} done); durable: {} \
         ({} restarts, {} delivered again after one, {} log reads, {} failed)",
        sim.published.len(),
        sim.schedule_due.len(),
        sim.fired.len(),
        sim.doomed.len(),
        sim.requests.len(),
        sim.answers.values().filter(|a| a.starts_with("res ") || *a == "responder_error").count(),
        s.processed,
        s.twice,
        s.redeliveries,
        sim.dead.len(),
        s.joins,
        s.leaves,
        s.deaths,
        s.nacks,
        s.deletes,
        s.deleted,
        sim.durable,
        s.restarts,
        s.again_after_restart,
        s.log_reads,
        s.failed_reads
    );
}

/// A delivery a member received and has not settled.
#[derive(Debug, Clone, Copy)]
struct Held {
    seq: u64,
    tag: u64,
    /// A request's return address and number.
    request: Option<(ReplyTo, u64)>,
}

struct Member {
    shard: usize,
    sub: u64,
    out: Rc<Outbound>,
    prefetch: u32,
    /// Deliveries received and not yet settled, in arrival order.
    held: Vec<Held>,
    /// The join was answered ok.
    joined: bool,
    /// Stalls: takes no new work and settles nothing (its deadlines pass).
    stalled: bool,
}

#[derive(Default)]
struct Stats {
    processed: u64,
    twice: u64,
    redeliveries: u64,
    joins: u64,
    leaves: u64,
    deaths: u64,
    nacks: u64,
    restarts: u64,
    deletes: u64,
    deleted: u64,
    again_after_restart: u64,
    log_reads: u64,
    failed_reads: u64,
}

struct Sim {
    rng: Rng,
    brokers: Vec<Broker>,
    mesh: Vec<Vec<VecDeque<Item>>>,
    topic: TopicName,
    dead_letter: TopicName,
    start: Instant,
    now_ms: u64,
    members: Vec<Member>,
    /// Published: seq -> (key, id).
    published: BTreeMap<u64, (u64, u64)>,
    /// Publishes awaiting their answer: (shard, req) -> (key, id).
    publishing: HashMap<(usize, u64), (u64, u64)>,
    /// The next publish's id (its payload).
    next_id: u64,
    /// Each delivered seq's key, checked against the publish at the end.
    delivered_key: HashMap<u64, u64>,
    /// Highest delivery number seen per seq.
    deliveries: HashMap<u64, u32>,
    /// Times processed per seq.
    processed: HashMap<u64, u32>,
    /// Last first-delivered seq per member and key.
    first_by_key: HashMap<(u64, u64), u64>,
    /// (seq, delivery) pairs seen.
    numbered: std::collections::HashSet<(u64, u32)>,
    /// Ids dead-lettered (seen on their way to the dead-letter topic).
    dead: BTreeSet<u64>,
    /// Requester connections, one per shard.
    requesters: Vec<Rc<Outbound>>,
    /// Requests sent: number -> requester shard.
    requests: BTreeMap<u64, usize>,
    /// Each request's answer as its requester read it.
    answers: BTreeMap<u64, String>,
    /// Seqs that carried a request.
    request_seqs: BTreeSet<u64>,
    /// Replies sent by members, by their native id: the request number.
    replies: HashMap<u64, u64>,
    /// Replies the requester's shard took (answered ok), per request.
    replies_ok: BTreeMap<u64, u32>,
    /// The next reply's native id.
    next_reply: u64,
    /// Where schedule answers go, one queue per shard.
    schedulers: Vec<Rc<Outbound>>,
    /// Schedules as the owner has them: id -> (number, due).
    pending_schedules: HashMap<String, (u64, u64)>,
    /// Each schedule's due time, by number.
    schedule_due: HashMap<u64, u64>,
    /// Schedules replaced, cancelled or refused before they were due:
    /// never to be delivered.
    doomed: BTreeSet<u64>,
    /// Schedules taken when due (published).
    fired: BTreeSet<u64>,
    /// Seqs sequenced while the group did not exist (before its first
    /// member, or after it was removed idle): not the group's.
    exempt: BTreeSet<u64>,
    stats: Stats,
    /// The topic is durable (odd seeds).
    durable: bool,
    /// Its segment files: first sequence -> bytes (cut to their length).
    segments: BTreeMap<u64, Vec<u8>>,
    /// How far each segment was decoded into `log`.
    decoded: BTreeMap<u64, usize>,
    /// Every record written, by sequence.
    log: BTreeMap<u64, Message>,
    /// The owner's committer: commits taken, not yet written.
    writing: Vec<TopicCommit>,
    /// Reads of the log asked and not yet answered.
    log_reads: Vec<(usize, LogRead)>,
    /// The group's last save handed over.
    saved: Option<SavedGroup>,
    /// The topic's schedule journal as written.
    journal: Vec<proto::log::Record>,
    /// The saved positions at the last restart: nothing below them is
    /// delivered again.
    floors: Vec<u64>,
    /// Seqs delivered again after a restart (processing them again is
    /// documented).
    again: BTreeSet<u64>,
    /// Seqs delivered before the last restart.
    before_restart: std::collections::HashSet<u64>,
    /// Schedules fired since the last restart.
    fired_since_restart: BTreeSet<u64>,
    /// Seqs up to which a deleted group took what it had not finished.
    deleted_through: u64,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let brokers = new_brokers(&mut rng);
        let mut sim = Sim {
            rng,
            brokers,
            mesh: (0..SHARDS).map(|_| (0..SHARDS).map(|_| VecDeque::new()).collect()).collect(),
            topic: TopicName::new("commands").expect("valid"),
            // On another shard than the topic, so dead letters cross the
            // mesh, where the simulation sees them.
            dead_letter: (0..)
                .map(|i| TopicName::new(&format!("commands.dead{i}")).expect("valid"))
                .find(|t| t.owner_shard(SHARDS) != TopicName::new("commands").expect("valid").owner_shard(SHARDS))
                .expect("a name on another shard"),
            start: Instant::now(),
            now_ms: 0,
            members: Vec::new(),
            published: BTreeMap::new(),
            publishing: HashMap::new(),
            next_id: 0,
            delivered_key: HashMap::new(),
            deliveries: HashMap::new(),
            processed: HashMap::new(),
            first_by_key: HashMap::new(),
            numbered: Default::default(),
            dead: BTreeSet::new(),
            exempt: BTreeSet::new(),
            requesters: (0..SHARDS).map(|_| Rc::new(Outbound::new(1 << 20, SlowConsumerPolicy::Disconnect))).collect(),
            requests: BTreeMap::new(),
            answers: BTreeMap::new(),
            request_seqs: BTreeSet::new(),
            replies: HashMap::new(),
            replies_ok: BTreeMap::new(),
            next_reply: REPLY_IDS,
            schedulers: (0..SHARDS).map(|_| Rc::new(Outbound::new(1 << 20, SlowConsumerPolicy::Disconnect))).collect(),
            pending_schedules: HashMap::new(),
            schedule_due: HashMap::new(),
            doomed: BTreeSet::new(),
            fired: BTreeSet::new(),
            stats: Stats::default(),
            durable: seed % 2 == 1,
            segments: BTreeMap::new(),
            decoded: BTreeMap::new(),
            log: BTreeMap::new(),
            writing: Vec::new(),
            log_reads: Vec::new(),
            saved: None,
            journal: Vec::new(),
            floors: Vec::new(),
            again: BTreeSet::new(),
            before_restart: Default::default(),
            fired_since_restart: BTreeSet::new(),
            deleted_through: 0,
        };
        if sim.durable {
            let (owner, now) = (sim.topic.owner_shard(SHARDS), sim.now());
            let topic = sim.topic.clone();
            let declared = sim.brokers[owner].owner_mut().declare_durable(
                &topic,
                DurableSpec::default(),
                None,
                LOG_LIMITS,
                now.at,
            );
            declared.expect("room for the topic");
        }
        sim
    }

    fn now(&self) -> Now {
        Now { at: self.start + Duration::from_millis(self.now_ms), unix_ms: 1_700_000_000_000 + self.now_ms }
    }

    fn step(&mut self) -> Result<(), String> {
        if self.durable {
            match self.rng.below(RESTART_ONE_IN) {
                0 => return self.restart(),
                r if r < RESTART_ONE_IN / 10 => return self.commit().and_then(|_| self.check()),
                r if r < RESTART_ONE_IN / 5 => return self.read_log(true).and_then(|_| self.check()),
                r if r < RESTART_ONE_IN / 5 + RESTART_ONE_IN / 50 => return self.save(),
                _ => {}
            }
        }
        match self.rng.below(100) {
            0..=19 => self.publish()?,
            20..=49 => self.carry()?,
            50..=69 => self.work(true)?,
            70..=74 => self.join()?,
            75..=76 => self.leave(false)?,
            77 => self.leave(true)?,
            78..=79 => self.toggle_stall(),
            80..=81 => self.change_prefetch()?,
            82..=85 => self.request()?,
            86..=87 => self.read_answers()?,
            88..=89 => self.schedule()?,
            90 => self.cancel_schedule()?,
            91 => self.delete_group()?,
            _ => {
                let ms = 1 + self.rng.below(5) as u64;
                self.tick(ms)?
            }
        }
        self.check()
    }

    /// Time passes: every shard ticks its groups and requests.
    fn tick(&mut self, ms: u64) -> Result<(), String> {
        self.now_ms += ms;
        for shard in 0..SHARDS {
            let now = self.now();
            self.brokers[shard].tick_groups(now);
            self.brokers[shard].tick_requests(now);
            let before = self.owner_state();
            self.brokers[shard].tick_schedules(now);
            self.note_groupless(before);
            if shard == self.topic.owner_shard(SHARDS) {
                // The owner took what was due.
                let due: Vec<String> = self
                    .pending_schedules
                    .iter()
                    .filter(|(_, (_, d))| *d <= now.unix_ms)
                    .map(|(i, _)| i.clone())
                    .collect();
                for id in due {
                    if let Some((n, _)) = self.pending_schedules.remove(&id) {
                        self.fired.insert(n);
                        self.fired_since_restart.insert(n);
                    }
                }
            }
            self.actions(shard)?;
        }
        Ok(())
    }

    /// A publish for later, on a random shard, with an id from a small
    /// pool (so that schedules replace each other) and now and then
    /// `if_absent`.
    fn schedule(&mut self) -> Result<(), String> {
        let shard = self.rng.below(SHARDS);
        let n = self.schedule_due.len() as u64 + 1;
        let due_ms = self.now().unix_ms + self.rng.below(300) as u64;
        self.schedule_due.insert(n, due_ms);
        let id = format!("sid{}", self.rng.below(6));
        let if_absent = self.rng.below(4) == 0;
        let key = Some(Bytes::from(format!("k{}", self.rng.below(KEYS as usize))));
        let scheduled = Scheduled {
            id,
            due_ms,
            kind: PayloadKind::Text,
            payload: Bytes::from(format!("sched {n}")),
            key,
            meta: None,
        };
        self.ask_schedules(shard, ScheduleAsk::Add { scheduled, if_absent })
    }

    fn cancel_schedule(&mut self) -> Result<(), String> {
        let shard = self.rng.below(SHARDS);
        let id = format!("sid{}", self.rng.below(6));
        self.ask_schedules(shard, ScheduleAsk::Cancel { id })
    }

    fn ask_schedules(&mut self, shard: usize, ask: ScheduleAsk) -> Result<(), String> {
        let out = self.schedulers[shard].clone();
        let now = self.now();
        let owner = self.topic.owner_shard(SHARDS);
        if shard == owner {
            // Handled inside the call: the model follows at once.
            self.model_schedule(&ask);
        }
        let topic = self.topic.clone();
        self.brokers[shard].ask_schedules(topic, ask, out, 1, now);
        self.actions(shard)?;
        // Answers are not checked here (the integration test does); the
        // queues are emptied.
        self.schedulers[shard].take_batch(&mut Vec::new(), usize::MAX, &mut Vec::new());
        Ok(())
    }

    /// The owner applies a schedule request: the model does the same. A
    /// schedule that fired already (before a restart that brought it back
    /// from the journal) stays delivered: only its coming back is undone.
    fn model_schedule(&mut self, ask: &ScheduleAsk) {
        let before = self.doomed.len();
        self.model_schedule_change(ask);
        if self.doomed.len() != before {
            let fired = &self.fired;
            self.doomed.retain(|n| !fired.contains(n));
        }
    }

    fn model_schedule_change(&mut self, ask: &ScheduleAsk) {
        match ask {
            ScheduleAsk::Add { scheduled, if_absent } => {
                let n: u64 = std::str::from_utf8(&scheduled.payload)
                    .ok()
                    .and_then(|p| p.strip_prefix("sched ")?.parse().ok())
                    .unwrap_or(0);
                if *if_absent && self.pending_schedules.contains_key(&scheduled.id) {
                    self.doomed.insert(n);
                } else if let Some((old, _)) =
                    self.pending_schedules.insert(scheduled.id.clone(), (n, scheduled.due_ms))
                {
                    self.doomed.insert(old);
                }
            }
            ScheduleAsk::Cancel { id } => {
                if let Some((old, _)) = self.pending_schedules.remove(id) {
                    self.doomed.insert(old);
                }
            }
            ScheduleAsk::List => {}
        }
    }

    /// A requester on a random shard asks the topic's responders.
    fn request(&mut self) -> Result<(), String> {
        let shard = self.rng.below(SHARDS);
        let n = self.requests.len() as u64 + 1;
        self.requests.insert(n, shard);
        let spec = RequestSpec {
            meta: None,
            topic: self.topic.clone(),
            kind: PayloadKind::Text,
            payload: Bytes::from(format!("req {n}")),
            key: Some(Bytes::from(format!("k{}", self.rng.below(KEYS as usize)))),
            timeout_ms: 50 + self.rng.below(1_000) as u64,
            out: self.requesters[shard].clone(),
            id: n,
        };
        let now = self.now();
        let before = self.owner_state();
        self.brokers[shard].request(spec, now);
        self.note_groupless(before);
        self.actions(shard)
    }

    /// Requesters read their answers: each request is answered once, with
    /// its own result or an error.
    fn read_answers(&mut self) -> Result<(), String> {
        for shard in 0..SHARDS {
            let mut bytes = Vec::new();
            self.requesters[shard].take_batch(&mut bytes, usize::MAX, &mut Vec::new());
            for frame in text_frames(&bytes)? {
                let v: serde_json::Value = serde_json::from_slice(&frame).map_err(|e| e.to_string())?;
                let n = v["id"].as_u64().ok_or_else(|| format!("an answer without id: {v}"))?;
                if self.requests.get(&n) != Some(&shard) {
                    return Err(format!("request {n}'s answer on shard {shard}'s requester: {v}"));
                }
                let answer = if v["ok"] == true {
                    let data = v["data"].as_str().unwrap_or_default().to_string();
                    if data != format!("res {n}") {
                        return Err(format!("request {n} answered with another's result: {v}"));
                    }
                    data
                } else {
                    let code = v["error"]["code"].as_str().unwrap_or_default().to_string();
                    let known = ["timeout", "no_responders", "responder_error", "group_full"];
                    if !known.contains(&code.as_str()) {
                        return Err(format!("request {n}: {v}"));
                    }
                    code
                };
                if let Some(first) = self.answers.insert(n, answer) {
                    return Err(format!("request {n} answered twice (first {first}): {v}"));
                }
            }
        }
        Ok(())
    }

    fn publish(&mut self) -> Result<(), String> {
        let shard = self.rng.below(SHARDS);
        let key = self.rng.below(KEYS as usize) as u64;
        let options =
            PublishOptions { key: Some(Bytes::from(format!("k{key}"))), ack: None, reply_to: None, meta: None };
        let now = self.now();
        self.next_id += 1;
        let id = self.next_id;
        let payload = Bytes::from(format!("id {id}"));
        let topic = self.topic.clone();
        let before = self.owner_state();
        let published =
            self.brokers[shard].publish(topic, PayloadKind::Text, payload, options, PublishReply::Caller, now);
        self.note_groupless(before);
        match published {
            Published::Now(Ok(seq)) => {
                self.published.insert(seq, (key, id));
            }
            Published::Now(Err(e)) => return Err(format!("publish refused: {e}")),
            Published::Later { req } => {
                self.publishing.insert((shard, req), (key, id));
            }
        }
        self.actions(shard)
    }

    fn carry(&mut self) -> Result<(), String> {
        let (from, to) = (self.rng.below(SHARDS), self.rng.below(SHARDS));
        for _ in 0..1 + self.rng.below(4) {
            let Some(item) = self.mesh[from][to].pop_front() else { break };
            self.handle(from, to, item)?;
        }
        Ok(())
    }

    fn handle(&mut self, from: usize, to: usize, item: Item) -> Result<(), String> {
        // A dead letter on its way to the dead-letter topic's owner.
        if let Item::Publish { topic, payload, .. } = &item {
            if *topic == self.dead_letter {
                // A request's dead letter is not a published message's.
                let text = std::str::from_utf8(payload).unwrap_or_default();
                if !text.starts_with("req ") && !text.starts_with("sched ") {
                    let id = text.strip_prefix("id ").and_then(|s| s.parse().ok());
                    let id = id.ok_or_else(|| format!("a dead letter without its id: {payload:?}"))?;
                    self.dead.insert(id);
                }
            }
        }
        if let Item::ScheduleAsk { ask, .. } = &item {
            if to == self.topic.owner_shard(SHARDS) {
                let ask = ask.clone();
                self.model_schedule(&ask);
            }
        }
        let now = self.now();
        let before = self.owner_state();
        self.brokers[to].handle(from, item, now);
        self.note_groupless(before);
        self.actions(to)
    }

    /// Whether the owner has the group, and the topic's last sequence.
    fn owner_state(&self) -> (bool, u64) {
        let owner = &self.brokers[self.topic.owner_shard(SHARDS)];
        (owner.group_counts(&self.topic, "workers").is_some(), owner.owner().last_seq(&self.topic).unwrap_or(0))
    }

    /// Seqs sequenced by the call just made while there was no group.
    fn note_groupless(&mut self, before: (bool, u64)) {
        let (exists, last) = self.owner_state();
        if !before.0 {
            self.exempt.extend(before.1 + 1..=last);
        }
        if before.0 && !exists {
            // Deleted (`delete_group`): what it had not finished goes with it.
            self.deleted_through = self.deleted_through.max(before.1);
            self.stats.deleted += 1;
        }
    }

    /// Deletes the group when the simulation knows of no member (the owner
    /// may still have one whose leave is in flight: then `busy`).
    fn delete_group(&mut self) -> Result<(), String> {
        if !self.members.is_empty() {
            return Ok(());
        }
        let shard = self.rng.below(SHARDS);
        let now = self.now();
        let before = self.owner_state();
        let out = self.schedulers[shard].clone();
        self.brokers[shard].delete_group(self.topic.clone(), "workers".into(), out, 1, now);
        self.note_groupless(before);
        self.actions(shard)?;
        self.schedulers[shard].take_batch(&mut Vec::new(), usize::MAX, &mut Vec::new());
        self.stats.deletes += 1;
        Ok(())
    }

    fn actions(&mut self, shard: usize) -> Result<(), String> {
        let mut actions = Vec::new();
        self.brokers[shard].take_actions(&mut actions);
        for action in actions {
            match action {
                Action::Send { to, item } => self.mesh[shard][to].push_back(item),
                Action::Published { req, result } => {
                    let published = self.publishing.remove(&(shard, req)).ok_or("an answer to no publish")?;
                    let seq = result.map_err(|e| format!("publish refused: {e}"))?;
                    self.published.insert(seq, published);
                }
                Action::ReadLog(read) => self.log_reads.push((shard, read)),
                _ => {}
            }
        }
        Ok(())
    }

    fn join(&mut self) -> Result<(), String> {
        if self.members.len() >= MEMBERS_MAX {
            return Ok(());
        }
        let shard = self.rng.below(SHARDS);
        let prefetch = self.rng.below(4) as u32; // 0: pulls nothing until raised
        let out = Rc::new(Outbound::new(1 << 20, SlowConsumerPolicy::Disconnect));
        let request = JoinRequest {
            topic: self.topic.clone(),
            group: "workers".into(),
            out: out.clone(),
            prefetch,
            settings: GroupSettings {
                ack_timeout_ms: ACK_TIMEOUT_MS,
                max_deliveries: MAX_DELIVERIES,
                ..GroupSettings::default()
            },
            dead_letter: self.dead_letter.clone(),
            reply_id: 1,
        };
        let now = self.now();
        let sub = self.brokers[shard].join_group(request, now);
        self.members.push(Member { shard, sub, out, prefetch, held: Vec::new(), joined: false, stalled: false });
        self.stats.joins += 1;
        self.actions(shard)
    }

    /// A member leaves (or its connection dies: the same to the broker,
    /// but what it held unsettled is simply gone).
    fn leave(&mut self, dies: bool) -> Result<(), String> {
        if self.members.is_empty() {
            return Ok(());
        }
        let m = self.members.swap_remove(self.rng.below(self.members.len()));
        let now = self.now();
        self.brokers[m.shard].leave_group(m.sub, now);
        if dies {
            self.stats.deaths += 1;
        } else {
            self.stats.leaves += 1;
        }
        self.actions(m.shard)
    }

    fn toggle_stall(&mut self) {
        if !self.members.is_empty() {
            let i = self.rng.below(self.members.len());
            self.members[i].stalled = !self.members[i].stalled;
        }
    }

    fn change_prefetch(&mut self) -> Result<(), String> {
        if self.members.is_empty() {
            return Ok(());
        }
        let i = self.rng.below(self.members.len());
        let prefetch = self.rng.below(5) as u32;
        let (shard, sub) = (self.members[i].shard, self.members[i].sub);
        // Deliveries made before a lower prefetch reached the owner may
        // still arrive: the check holds the member to the highest it asked.
        self.members[i].prefetch = self.members[i].prefetch.max(prefetch);
        let now = self.now();
        self.brokers[shard].settle(sub, Settle::Prefetch { prefetch }, now);
        self.actions(shard)
    }

    /// A member reads what reached it, and (unless stalled) settles some of
    /// what it holds: ack, cumulative ack, or refusal.
    fn work(&mut self, chaos: bool) -> Result<(), String> {
        if self.members.is_empty() {
            return Ok(());
        }
        let i = self.rng.below(self.members.len());
        self.read(i)?;
        let m = &self.members[i];
        if (m.stalled && chaos) || m.held.is_empty() {
            return Ok(());
        }
        let (shard, sub) = (m.shard, m.sub);
        let pick = self.rng.below(m.held.len());
        let roll = if chaos { self.rng.below(10) } else { 0 };
        let held = self.members[i].held.remove(pick);
        let settle = match roll {
            0..=6 => Settle::Ack { seq: held.seq },
            7 => {
                // This one and everything received before it.
                let taken: Vec<Held> = self.members[i].held.drain(..pick).collect();
                for h in taken {
                    self.processed(h)?;
                }
                Settle::AckThrough { tag: held.tag }
            }
            _ => {
                self.stats.nacks += 1;
                let delay_ms = if roll == 8 { 0 } else { 1 + self.rng.below(20) as u64 };
                let now = self.now();
                self.brokers[shard].settle(sub, Settle::Nack { seq: held.seq, delay_ms }, now);
                return self.actions(shard);
            }
        };
        self.processed(held)?;
        let now = self.now();
        self.brokers[shard].settle(sub, settle, now);
        if let Some((to, n)) = held.request {
            let answer = if self.rng.below(8) == 0 {
                Answer::Error { code: "refused".into(), message: format!("req {n}") }
            } else {
                Answer::Result { kind: PayloadKind::Text, payload: Bytes::from(format!("res {n}")) }
            };
            let id = self.next_reply;
            self.next_reply += 1;
            self.replies.insert(id, n);
            let out = self.members[i].out.clone();
            if !self.brokers[shard].reply(to, answer, out, Some(id), now) {
                return Err(format!("reply to {to} refused"));
            }
        }
        self.actions(shard)
    }

    fn processed(&mut self, held: Held) -> Result<(), String> {
        let n = self.processed.entry(held.seq).or_default();
        *n += 1;
        if *n > 1 {
            self.stats.twice += 1;
            if self.deliveries.get(&held.seq).is_none_or(|d| *d < 2) && !self.again.contains(&held.seq) {
                return Err(format!("seq {} processed twice but delivered once", held.seq));
            }
        }
        self.stats.processed += 1;
        Ok(())
    }

    /// Member `i` reads its queue.
    fn read(&mut self, i: usize) -> Result<(), String> {
        let mut bytes = Vec::new();
        let mut published = Vec::new();
        self.members[i].out.take_batch(&mut bytes, usize::MAX, &mut published);
        for frame in text_frames(&bytes)? {
            let v: serde_json::Value = serde_json::from_slice(&frame).map_err(|e| e.to_string())?;
            match v["type"].as_str() {
                Some("reply") if v["id"].as_u64() >= Some(REPLY_IDS) => {
                    let id = v["id"].as_u64().unwrap_or(0);
                    let n = self.replies.remove(&id).ok_or_else(|| format!("an answer to no reply: {v}"))?;
                    if v["ok"] == true {
                        *self.replies_ok.entry(n).or_default() += 1;
                    } else if v["error"]["code"] != "requester_gone" {
                        return Err(format!("reply to request {n}: {v}"));
                    }
                }
                Some("reply") if v["ok"] == true => self.members[i].joined = true,
                Some("reply") => return Err(format!("join refused: {v}")),
                Some("message") => {
                    if !self.members[i].joined {
                        return Err(format!("a delivery before the join's reply: {v}"));
                    }
                    if v["group"] != "workers" || v["topic"] != self.topic.as_str() {
                        return Err(format!("a delivery of another group: {v}"));
                    }
                    let seq = v["seq"].as_u64().ok_or("no seq")?;
                    let delivery = v["delivery"].as_u64().ok_or("no delivery")? as u32;
                    let tag = v["tag"].as_u64().ok_or("no tag")?;
                    if self.members[i].held.last().is_some_and(|h| h.tag >= tag) {
                        return Err(format!("tag {tag} after a higher one"));
                    }
                    let key: u64 = v["key"].as_str().and_then(|k| k.strip_prefix('k')?.parse().ok()).ok_or("no key")?;
                    if self.delivered_key.insert(seq, key).is_some_and(|k| k != key) {
                        return Err(format!("seq {seq} delivered with two keys"));
                    }
                    // Each delivery number once (members on different
                    // shards read in any order).
                    if !self.numbered.insert((seq, delivery)) {
                        return Err(format!("seq {seq}: delivery {delivery} twice"));
                    }
                    if delivery == 1 && self.before_restart.contains(&seq) {
                        // Delivered before a restart, and again after it:
                        // only at or after its segment's saved position.
                        let logged =
                            self.log.get(&seq).ok_or_else(|| format!("seq {seq} delivered, not in the log"))?;
                        let probe = Message { key: Some(Bytes::from(format!("k{key}"))), ..logged.clone() };
                        let floor = self.floors.get(segment_of(&probe)).copied().unwrap_or(0);
                        if seq < floor {
                            return Err(format!("seq {seq} delivered again below its saved position {floor}"));
                        }
                        self.again.insert(seq);
                        self.stats.again_after_restart += 1;
                    }
                    let last = self.deliveries.entry(seq).or_default();
                    *last = (*last).max(delivery);
                    if delivery == 1 {
                        let sub = self.members[i].sub;
                        let before = self.first_by_key.insert((sub, key), seq).unwrap_or(0);
                        if seq <= before {
                            return Err(format!("member {sub}, key k{key}: first delivery of {seq} after {before}"));
                        }
                    } else {
                        self.stats.redeliveries += 1;
                    }
                    if let Some(n) = v["data"].as_str().and_then(|d| d.strip_prefix("sched ")?.parse::<u64>().ok()) {
                        self.request_seqs.insert(seq);
                        if self.doomed.contains(&n) {
                            return Err(format!("schedule {n} was replaced or cancelled, yet delivered: {v}"));
                        }
                        let due = self.schedule_due.get(&n).copied().unwrap_or(u64::MAX);
                        if v["ts"].as_u64().is_none_or(|ts| ts < due) {
                            return Err(format!("schedule {n} due at {due} published early: {v}"));
                        }
                    }
                    let request = match v["reply_to"].as_str() {
                        Some(to) => {
                            let to: ReplyTo = to.parse().map_err(|_| format!("bad reply_to {v}"))?;
                            let n = v["data"].as_str().and_then(|d| d.strip_prefix("req ")?.parse().ok());
                            self.request_seqs.insert(seq);
                            Some((to, n.ok_or_else(|| format!("a request without its number: {v}"))?))
                        }
                        None => None,
                    };
                    self.members[i].held.push(Held { seq, tag, request });
                }
                _ => return Err(format!("unexpected frame {v}")),
            }
        }
        Ok(())
    }

    /// What the owner counts against a member's prefetch: its deliveries
    /// not yet acknowledged, refused or expired (a delivery past its
    /// deadline no longer counts, though the member may still have it).
    fn check(&self) -> Result<(), String> {
        let owner = &self.brokers[self.topic.owner_shard(SHARDS)];
        owner.check_group(&self.topic, "workers")?;
        for m in &self.members {
            let held = owner.group_member_held(&self.topic, "workers", m.shard, m.sub).unwrap_or(0);
            if held > m.prefetch {
                return Err(format!(
                    "member {} holds {held} unacknowledged deliveries, prefetch {}",
                    m.sub, m.prefetch
                ));
            }
        }
        Ok(())
    }

    /// The end: no more chaos. Members wake, every item is carried, time
    /// runs past every deadline, members process everything.
    fn drain(&mut self) -> Result<(), String> {
        if self.members.is_empty() {
            self.join()?;
        }
        for m in &mut self.members {
            m.stalled = false;
        }
        for i in 0..self.members.len() {
            let (shard, sub) = (self.members[i].shard, self.members[i].sub);
            let now = self.now();
            self.brokers[shard].settle(sub, Settle::Prefetch { prefetch: 4 }, now);
            self.members[i].prefetch = self.members[i].prefetch.max(4);
            self.actions(shard)?;
        }
        for _ in 0..200_000 {
            let mut moved = false;
            if self.durable {
                // The committer writes what it took and takes the rest;
                // every read is answered.
                while self.brokers[self.topic.owner_shard(SHARDS)].owner().has_commits() || !self.writing.is_empty() {
                    self.commit()?;
                    moved = true;
                }
                while !self.log_reads.is_empty() {
                    self.read_log(false)?;
                    moved = true;
                }
            }
            for from in 0..SHARDS {
                for to in 0..SHARDS {
                    while let Some(item) = self.mesh[from][to].pop_front() {
                        self.handle(from, to, item)?;
                        moved = true;
                    }
                }
            }
            for i in 0..self.members.len() {
                self.read(i)?;
                while !self.members[i].held.is_empty() {
                    self.work(false)?;
                    moved = true;
                    self.read(i)?;
                }
            }
            self.read_answers()?;
            if !moved {
                if self.publishing.is_empty() && self.lost().is_empty() && self.answers.len() == self.requests.len() {
                    self.keys_match()?;
                    return self.replies_match();
                }
                self.tick(ACK_TIMEOUT_MS)?;
            }
        }
        let lost = self.lost();
        let owner = &self.brokers[self.topic.owner_shard(SHARDS)];
        let seen: Vec<_> = lost.iter().map(|s| (s, self.deliveries.get(s), self.published.get(s))).collect();
        Err(format!(
            "{} messages neither processed nor dead-lettered: {:?}; group (waiting, unacked) {:?}, {} members",
            lost.len(),
            &seen[..seen.len().min(10)],
            owner.group_counts(&self.topic, "workers"),
            self.members.len()
        ))
    }

    /// The owner's committer: writes the commits it took (to the segments,
    /// decoding the new records into the log) and reports them, or takes
    /// the next ones.
    fn commit(&mut self) -> Result<(), String> {
        let owner = self.topic.owner_shard(SHARDS);
        if self.writing.is_empty() {
            self.writing = self.brokers[owner].take_commits();
            return Ok(());
        }
        for commit in std::mem::take(&mut self.writing) {
            for job in &commit.jobs {
                let file = self.segments.entry(job.segment).or_default();
                let end = job.offset as usize + job.bytes.len();
                if file.len() < end {
                    file.resize(end, 0);
                }
                file[job.offset as usize..end].copy_from_slice(&job.bytes);
                file.truncate(job.end as usize);
                let bytes = Bytes::from(file.clone());
                let at = self.decoded.entry(job.segment).or_default();
                while *at < bytes.len() {
                    let (record, next) =
                        proto::log::read_one(&bytes, *at).map_err(|e| format!("segment {}: {e:?}", job.segment))?;
                    *at = next;
                    let message = Message::from_record(record, self.start);
                    self.log.insert(message.seq, message);
                }
            }
            let now = self.now();
            self.brokers[owner].committed(&commit, now);
            self.actions(owner)?;
        }
        Ok(())
    }

    /// The shell answers a read of the log: what it holds of the range,
    /// within the read's bytes (at least one record); with `chaos`, now and
    /// then nothing (a failed read, retried after a while).
    fn read_log(&mut self, chaos: bool) -> Result<(), String> {
        if self.log_reads.is_empty() {
            return Ok(());
        }
        let (shard, read) = self.log_reads.swap_remove(self.rng.below(self.log_reads.len()));
        self.stats.log_reads += 1;
        let mut messages = Vec::new();
        if chaos && self.rng.below(10) == 0 {
            self.stats.failed_reads += 1;
        } else {
            let mut bytes = 0;
            for m in self.log.range(read.from_seq..=read.to_seq).map(|(_, m)| m) {
                if !messages.is_empty() && bytes + m.payload.len() > read.max_bytes {
                    break;
                }
                bytes += m.payload.len();
                messages.push(m.clone());
            }
        }
        let now = self.now();
        self.brokers[shard].log_read(&read.topic, read.id, messages, now);
        self.actions(shard)
    }

    /// The owner hands over the group's positions to save (as its shard's
    /// ticker does, throttled; or all, as at a stop), and its schedule
    /// journal's records.
    fn save(&mut self) -> Result<(), String> {
        let owner = self.topic.owner_shard(SHARDS);
        let force = self.rng.below(4) == 0;
        let now = self.now();
        // The schedule journal too (as the ticker writes it).
        for write in self.brokers[owner].take_schedule_journal() {
            self.journal.extend(write.records);
            self.brokers[owner].schedules_written(&write.topic, true, now);
        }
        self.actions(owner)?;
        // A deleted group's save goes first (as the shell does).
        let deletes = self.brokers[owner].take_group_deletes();
        if !deletes.is_empty() {
            self.saved = None;
        }
        for job in deletes {
            self.brokers[owner].group_save_deleted(job, true, now);
        }
        self.actions(owner)?;
        for save in self.brokers[owner].take_group_saves(now, force) {
            if let Some(before) = &self.saved {
                if before.positions.iter().zip(&save.saved.positions).any(|(b, a)| a < b) {
                    return Err(format!("a saved position went back: {:?} -> {:?}", before.positions, save.saved));
                }
            }
            self.saved = Some(save.saved);
        }
        Ok(())
    }

    /// `kill -9` and a start: every broker anew, the topic recovered from
    /// its segments, the group from its last save. Members, requests,
    /// schedules, items in flight and commits not yet written are gone.
    fn restart(&mut self) -> Result<(), String> {
        self.stats.restarts += 1;
        if self.rng.below(3) == 0 {
            self.save()?; // now and then a save just before
        }
        // Answers that reached the requesters are theirs.
        self.read_answers()?;
        let owner = self.topic.owner_shard(SHARDS);
        let epoch = self.brokers[owner].owner().stat(&self.topic).ok_or("no topic")?.epoch;
        // Dead letters in flight left the group: counted as dead-lettered
        // (their loss in the crash is a documented limit).
        for queue in self.mesh.iter().flatten() {
            for item in queue {
                if let Item::Publish { topic, payload, .. } = item {
                    let text = std::str::from_utf8(payload).unwrap_or_default();
                    if *topic == self.dead_letter {
                        if let Some(id) = text.strip_prefix("id ").and_then(|s| s.parse().ok()) {
                            self.dead.insert(id);
                        }
                    }
                }
            }
        }
        // Every acknowledged publish is in the log; those written but not
        // yet answered count as published (they are the group's).
        for seq in self.published.keys() {
            if !self.log.contains_key(seq) {
                return Err(format!("seq {seq} acknowledged, not in the log at the crash"));
            }
        }
        for (seq, m) in &self.log {
            let text = std::str::from_utf8(&m.payload).unwrap_or_default();
            let key = m.key.as_ref().and_then(|k| std::str::from_utf8(k).ok()?.strip_prefix('k')?.parse().ok());
            if let (Some(id), Some(key)) = (text.strip_prefix("id ").and_then(|s| s.parse().ok()), key) {
                self.published.entry(*seq).or_insert((key, id));
            }
        }
        self.publishing.clear();
        // A group never saved is forgotten (documented): its messages are
        // no longer its.
        if self.saved.is_none() {
            let gone: Vec<u64> = self.published.keys().copied().collect();
            self.exempt.extend(gone);
        }
        for n in self.requests.keys() {
            self.answers.entry(*n).or_insert_with(|| "lost in a restart".into());
        }
        self.replies.clear();
        // The schedules the journal keeps come back (an un-journaled
        // cancel or replacement was never answered: undone); the others
        // pending are gone.
        let replayed = proto::schedule::replay(self.journal.clone());
        // A schedule that fired is in the log, or comes back pending: never
        // neither (its done record waits for its message's commit).
        let logged: BTreeSet<u64> = self
            .log
            .values()
            .filter_map(|m| std::str::from_utf8(&m.payload).ok()?.strip_prefix("sched ")?.parse().ok())
            .collect();
        let back: BTreeSet<u64> = replayed
            .pending
            .iter()
            .chain(replayed.unwritten.iter().map(|(_, s)| s))
            .filter_map(|s| std::str::from_utf8(&s.payload).ok()?.strip_prefix("sched ")?.parse().ok())
            .collect();
        // (An add not yet journaled was never answered: it may go.)
        let journaled: BTreeSet<u64> = self
            .journal
            .iter()
            .filter_map(|r| std::str::from_utf8(&r.payload).ok()?.strip_prefix("sched ")?.parse().ok())
            .collect();
        // (Only those fired since the last restart: one that came back
        // may since have been replaced or cancelled, and rightly gone.)
        let lost =
            self.fired_since_restart.iter().find(|n| journaled.contains(n) && !logged.contains(n) && !back.contains(n));
        if let Some(n) = lost {
            return Err(format!("schedule {n} fired, yet neither in the log nor pending after the restart"));
        }
        self.fired_since_restart.clear();
        for (_, (n, _)) in self.pending_schedules.drain() {
            if !self.fired.contains(&n) {
                self.doomed.insert(n);
            }
        }
        for s in &replayed.pending {
            let text = std::str::from_utf8(&s.payload).unwrap_or_default();
            let n: u64 =
                text.strip_prefix("sched ").and_then(|n| n.parse().ok()).ok_or("a schedule without its number")?;
            self.doomed.remove(&n);
            self.pending_schedules.insert(s.id.clone(), (n, s.due_ms));
        }
        self.before_restart.extend(self.deliveries.keys().copied());
        self.members.clear();
        self.first_by_key.clear();
        self.numbered.clear();
        self.mesh = (0..SHARDS).map(|_| (0..SHARDS).map(|_| VecDeque::new()).collect()).collect();
        self.writing.clear();
        self.log_reads.clear();
        self.requesters =
            (0..SHARDS).map(|_| Rc::new(Outbound::new(1 << 20, SlowConsumerPolicy::Disconnect))).collect();
        self.schedulers =
            (0..SHARDS).map(|_| Rc::new(Outbound::new(1 << 20, SlowConsumerPolicy::Disconnect))).collect();
        self.brokers = new_brokers(&mut self.rng);
        let segments: Vec<(u64, Bytes)> = self.segments.iter().map(|(b, f)| (*b, Bytes::from(f.clone()))).collect();
        let recovered = TopicLog::recover(segments, false, 0, LOG_LIMITS, 8);
        if !recovered.cut.is_empty() || !recovered.dropped.is_empty() {
            return Err(format!("recovery cut {:?}, dropped {:?}", recovered.cut, recovered.dropped));
        }
        let now = self.now();
        let topic = self.topic.clone();
        self.brokers[owner]
            .owner_mut()
            .declare_durable(&topic, DurableSpec::default(), Some((epoch, recovered)), LOG_LIMITS, now.at)
            .map_err(|e| format!("recovery: {e}"))?;
        // Fired ones not known written fire again at the first tick.
        for (_, s) in &replayed.unwritten {
            let text = std::str::from_utf8(&s.payload).unwrap_or_default();
            let n: u64 =
                text.strip_prefix("sched ").and_then(|n| n.parse().ok()).ok_or("a schedule without its number")?;
            self.doomed.remove(&n);
            self.fired.insert(n);
            self.fired_since_restart.insert(n);
        }
        self.brokers[owner].restore_schedules(&topic, replayed);
        if let Some(saved) = self.saved.clone() {
            for (f, p) in self.floors.iter_mut().zip(&saved.positions) {
                *f = (*f).max(*p);
            }
            if self.floors.is_empty() {
                self.floors = saved.positions.clone();
            }
            self.brokers[owner].restore_group(&topic, saved, now)?;
        }
        Ok(())
    }

    /// Published seqs neither processed nor dead-lettered.
    fn lost(&self) -> Vec<u64> {
        let gone = |(seq, (_, id)): (&u64, &(u64, u64))| {
            !self.processed.contains_key(seq)
                && !self.dead.contains(id)
                && !self.exempt.contains(seq)
                && *seq > self.deleted_through
        };
        self.published.iter().filter(|p| gone(*p)).map(|(s, _)| *s).collect()
    }

    /// A responder was told its reply was taken at most once per request,
    /// and only for a request whose requester got a responder's answer.
    fn replies_match(&self) -> Result<(), String> {
        for (n, ok) in &self.replies_ok {
            let answer = self.answers.get(n).map(String::as_str);
            let from_responder = answer.is_some_and(|a| a.starts_with("res ") || a == "responder_error");
            if *ok > 1 || !from_responder {
                return Err(format!("request {n}: {ok} replies taken, its requester got {answer:?}"));
            }
        }
        Ok(())
    }

    /// Every delivery carried the key its message was published with.
    fn keys_match(&self) -> Result<(), String> {
        for (seq, key) in self.delivered_key.iter().filter(|(s, _)| !self.request_seqs.contains(s)) {
            if self.published.get(seq).map(|p| p.0) != Some(*key) {
                return Err(format!("seq {seq} delivered with key k{key}, published {:?}", self.published.get(seq)));
            }
        }
        Ok(())
    }
}

/// One broker per shard, each with a fresh owner.
fn new_brokers(rng: &mut Rng) -> Vec<Broker> {
    let limits =
        OwnerLimits { topics_max: 16, history_messages_max: 8, history_bytes_max: 1 << 20, client_pins_max: 16 };
    (0..SHARDS)
        .map(|id| {
            let owner = Owner::new(limits, rng.next());
            let limits = BrokerLimits { publish_bytes_in_flight_max: 1 << 20 };
            Broker::new(id, SHARDS, owner, limits, Rc::new(Metrics::default()))
        })
        .collect()
}

/// The payloads of a run of unmasked server text frames.
fn text_frames(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 2 || bytes[0] != 0x81 {
            return Err(format!("not a text frame: {:?}", &bytes[..bytes.len().min(8)]));
        }
        let (len, head) = match bytes[1] {
            126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 => (u64::from_be_bytes(bytes[2..10].try_into().map_err(|_| "short")?) as usize, 10),
            n => (n as usize, 2),
        };
        frames.push(bytes[head..head + len].to_vec());
        bytes = &bytes[head + len..];
    }
    Ok(frames)
}
