//! The sequencer: topics this shard owns. Sans-IO; the shard shell calls it
//! and routes what it returns.
//!
//! Lives on the topic's owner shard only; nothing else touches it.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::ops::Bound;
use std::time::Instant;

use bytes::Bytes;

use crate::durable::{
    AckLevel, ArchivedSegment, DurableHandOff, DurableSpec, PublishOptions, Recovered, TopicLog, WriteJob,
    UNWRITTEN_BYTES_MAX, UNWRITTEN_MESSAGES_MAX,
};
use crate::history::History;
pub use crate::history::SeqRange;
use crate::log::Record;
pub use crate::message::Epoch;
use crate::message::{Message, Now, PayloadKind};
use crate::topic::{TopicName, TopicQuery};

/// Why the owner refused a publish or subscribe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OwnerError {
    /// The node holds `topics_max` topics already (client may retry later; 503).
    #[error("too many topics on this node")]
    TooManyTopics,
    /// The subscriber's address already holds its share of the topic table
    /// in topics kept alive by its subscriptions (429; see
    /// `Config::client_topics_share_percent`).
    #[error("this client address holds its share of this node's topics ({max} on this topic's shard)")]
    ClientShare {
        /// The share, in topics of this owner's table.
        max: usize,
    },
    /// A durable topic has `UNWRITTEN_MESSAGES_MAX` messages waiting for
    /// the disk (retry later; 503).
    #[error("the topic's log is behind: too many messages waiting for the disk")]
    StorageBehind,
    /// Writing the durable topic's log failed; it takes no publishes until
    /// the node restarts and recovers it (503).
    #[error("the topic's log could not be written; it takes no publishes until the node restarts")]
    StorageFailed,
    /// A consumer group of the topic holds `group::BACKLOG_MESSAGES_MAX`
    /// messages or `BACKLOG_BYTES_MAX` bytes not yet delivered (its members
    /// are behind or gone; retry later; 503).
    #[error("a consumer group of this topic is full: its members are behind")]
    GroupFull,
    /// A request to a topic no consumer-group member listens to (503).
    #[error("no responders: the topic has no consumer group with a member")]
    NoResponders,
    /// The topic's owner is another node of the cluster and the link to
    /// it is down (retry; 503).
    #[error("the node that owns this topic cannot be reached")]
    OwnerUnreachable,
    /// The topic's owner is another node of the cluster, and this request
    /// (a consumer group, a request, a schedule, a durable declaration) is
    /// served on the owner only (421: ask `GET /v1/cluster?topic=` which
    /// node, and connect there).
    #[error("this topic is owned by another node of the cluster, which serves this request")]
    OwnedElsewhere,
    /// This node lost its cluster membership (its etcd lease lapsed) and
    /// sequences nothing until it has it again (retry, or another node;
    /// 503).
    #[error("this node is not a member of its cluster just now (its lease lapsed)")]
    NotMember,
}

impl OwnerError {
    /// The error code clients see (native `error.code`, HTTP body `error`).
    pub fn code(self) -> &'static str {
        match self {
            OwnerError::TooManyTopics => "too_many_topics",
            OwnerError::ClientShare { .. } => "client_topic_share",
            OwnerError::StorageBehind => "storage_behind",
            OwnerError::StorageFailed => "storage_failed",
            OwnerError::GroupFull => "group_full",
            OwnerError::NoResponders => "no_responders",
            OwnerError::OwnerUnreachable => "owner_unreachable",
            OwnerError::OwnedElsewhere => "owned_elsewhere",
            OwnerError::NotMember => "not_member",
        }
    }

    /// The HTTP status that carries it: 503 when the node is full (try
    /// later, or another node), 429 when this client holds its share.
    pub fn http_status(self) -> u16 {
        match self {
            OwnerError::TooManyTopics
            | OwnerError::StorageBehind
            | OwnerError::StorageFailed
            | OwnerError::GroupFull
            | OwnerError::NoResponders
            | OwnerError::OwnerUnreachable
            | OwnerError::NotMember => 503,
            OwnerError::ClientShare { .. } => 429,
            OwnerError::OwnedElsewhere => 421,
        }
    }
}

/// A message a copy took in ([`Owner::mirror_accept`]).
#[derive(Debug)]
pub struct MirrorAccepted {
    /// The copy's sequence space.
    pub epoch: Epoch,
    /// The shards subscribing to it.
    pub subscriber_shards: u64,
    /// What it skipped to get to this message (never sent to it).
    pub skipped: Option<SeqRange>,
    /// The message.
    pub message: Message,
}

/// What [`Owner::adopt`] did.
#[derive(Debug)]
pub struct Adopted {
    /// The topic's sequence space.
    pub epoch: Epoch,
    /// Shards subscribing here.
    pub subscriber_shards: u64,
    /// Messages this shard's copy lacked, to deliver.
    pub new: Vec<Message>,
    /// Shards whose subscribers were in another sequence space.
    pub restarted: u64,
    /// Numbers in the same space the hand-off passed without their
    /// messages (a hand-off without history): live subscribers are told.
    pub skipped: Option<SeqRange>,
}

/// The bounds of one owner's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnerLimits {
    /// Most topics this shard may own.
    pub topics_max: usize,
    /// History bound, in messages, for each topic.
    pub history_messages_max: usize,
    /// History bound, in payload bytes, for each topic.
    pub history_bytes_max: usize,
    /// Most topics one client address may keep in the table by subscribing
    /// (at least 1): one client cannot lock everyone else out.
    pub client_pins_max: usize,
}

impl OwnerLimits {
    /// An empty history within these bounds.
    fn empty_history(&self) -> History {
        History::new(self.history_messages_max, self.history_bytes_max)
    }
}

/// Where a subscriber wants to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeFrom {
    /// The last sequence the subscriber has: replay what follows it.
    pub after_seq: u64,
    /// The epoch `after_seq` belongs to, if the subscriber knows it.
    pub epoch: Option<Epoch>,
    /// Start at the first message sequenced at or after this time (ms
    /// since the Unix epoch) instead: the owner finds `after_seq` (a bound
    /// that may start a little earlier; the subscriber's shard skips what
    /// precedes the time), and no epoch is needed.
    pub since_ms: Option<u64>,
}

/// Why a resume cannot be served from this topic's sequence space at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryLost {
    /// The resume named another epoch: the topic was created anew (a node
    /// restart, a failover to another node, an eviction).
    EpochChanged,
    /// The resume's sequence is beyond the last one assigned: it came from
    /// another sequence space (a client that did not send the epoch).
    BeyondLastSeq,
}

impl HistoryLost {
    /// The name clients see.
    pub fn as_str(self) -> &'static str {
        match self {
            HistoryLost::EpochChanged => "epoch_changed",
            HistoryLost::BeyondLastSeq => "beyond_last_seq",
        }
    }
}

/// How a resume went: what the subscriber cannot get, if anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumed {
    /// No resume asked for: live from now.
    Live,
    /// Replayed from history; `gap` is what was asked for but is evicted.
    Replayed { gap: Option<SeqRange> },
    /// Nothing after the subscriber's sequence can be recovered; the
    /// subscription is live from now in the current epoch.
    Lost(HistoryLost),
}

/// A message the owner sequenced, and where it goes.
#[derive(Debug, Clone)]
pub struct Sequenced {
    /// The message, with its sequence number and timestamp.
    pub message: Message,
    /// The sequence space the number belongs to.
    pub epoch: Epoch,
    /// Bit i set: shard i has subscribers to deliver it to.
    pub subscriber_shards: u64,
    /// Set for a durable topic's message, with the topic's default
    /// acknowledgement level: neither delivered nor in history until its
    /// write is reported ([`Owner::written`]); `subscriber_shards` is 0.
    pub held: Option<AckLevel>,
}

/// One durable topic's share of a group commit: the writes to make, and
/// the last message they carry.
#[derive(Debug)]
pub struct TopicCommit {
    /// The topic.
    pub topic: TopicName,
    /// Writes, in order.
    pub jobs: Vec<WriteJob>,
    /// The last sequence the writes carry.
    pub through_seq: u64,
}

/// Messages a commit made visible: deliver them.
#[derive(Debug)]
pub struct Released {
    /// The topic's sequence space.
    pub epoch: Epoch,
    /// Shards with subscribers now.
    pub subscriber_shards: u64,
    /// The messages, in order.
    pub messages: Vec<Message>,
}

/// A durable topic's state beside its history.
#[derive(Debug)]
struct Durable {
    /// Its declaration.
    spec: DurableSpec,
    /// Its log.
    log: TopicLog,
    /// Sequenced, not yet reported written, in order.
    unwritten: std::collections::VecDeque<Message>,
    /// Their payload bytes.
    unwritten_bytes: usize,
    /// Appended since the last `take_commits`.
    appended: bool,
    /// A write failed: no more publishes until a restart.
    failed: bool,
    /// The last sequence subscribers may see: written, or skipped over at
    /// recovery (never one that was sequenced and then lost).
    visible: u64,
}

impl Durable {
    /// A durable state whose log ends at `visible` (nothing waiting).
    fn new(spec: DurableSpec, log: TopicLog, visible: u64) -> Box<Durable> {
        Box::new(Durable {
            spec,
            log,
            unwritten: Default::default(),
            unwritten_bytes: 0,
            appended: false,
            failed: false,
            visible,
        })
    }
}

/// A durable topic's figures for listings.
#[derive(Debug, Clone, Copy)]
pub struct DurableStat {
    /// Its declaration.
    pub spec: DurableSpec,
    /// First sequence a read can reach (in the object store when
    /// segments were archived).
    pub log_first_seq: u64,
    /// First sequence on local disk.
    pub local_first_seq: u64,
    /// Bytes of segments only in the object store, and their count.
    pub archived_bytes: u64,
    /// Segments only in the object store.
    pub archived_segments: usize,
    /// Bytes of records on local disk.
    pub log_bytes: u64,
    /// Records in the log.
    pub log_messages: u64,
    /// Segments.
    pub segments: usize,
    /// Distinct keys indexed.
    pub keys: usize,
    /// Messages waiting for the disk.
    pub unwritten: usize,
    /// Writing failed.
    pub failed: bool,
}

/// What a subscribing shard learns when it registers for a topic.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The topic's sequence space.
    pub epoch: Epoch,
    /// Last sequence assigned so far (0: none yet).
    pub last_seq: u64,
    /// First sequence still retained (last_seq + 1 when history is empty).
    pub first_seq: u64,
    /// Retained messages after the requested sequence, in order.
    pub replay: Vec<Message>,
    /// What the subscriber cannot get.
    pub resumed: Resumed,
    /// A durable topic's messages to read from its log before `replay`
    /// (older than the history holds): the broker reads them and answers
    /// with a fresh grant after them.
    pub from_log: Option<SeqRange>,
    /// A catch-up from the log answered in part: `replay` ends before the
    /// topic's position; the subscriber asks again after its last message.
    pub more: bool,
}

/// A snapshot of one owned topic for `/v1/topics`.
#[derive(Debug, Clone)]
pub struct TopicStat {
    /// Topic name.
    pub name: TopicName,
    /// Last assigned sequence.
    pub last_seq: u64,
    /// First retained sequence.
    pub first_seq: u64,
    /// Retained messages and bytes.
    pub retained_messages: usize,
    /// Retained payload bytes.
    pub retained_bytes: usize,
    /// Messages per second over the last complete one-second window.
    pub publish_rate_per_sec: u64,
    /// Shards with subscribers, as a bit mask.
    pub subscriber_shards: u64,
    /// The topic's sequence space.
    pub epoch: Epoch,
    /// Durable topics' log figures.
    pub durable: Option<DurableStat>,
}

/// One owned topic.
#[derive(Debug)]
struct OwnedTopic {
    /// This incarnation's sequence space.
    epoch: Epoch,
    /// Last publish, subscribe or unsubscribe: the least recently active
    /// idle topic is evicted first.
    last_active: Instant,
    /// Last assigned sequence; the next message gets `last_seq + 1`.
    last_seq: u64,
    /// Retained messages.
    history: History,
    /// Bit i set: shard i has at least one subscriber.
    subscriber_shards: u64,
    /// Start of the current rate window.
    window_start: Instant,
    /// Publishes in the current window.
    window_count: u64,
    /// Publishes in the last complete window.
    last_window_rate: u64,
    /// The address whose subscription made the topic subscribed (the
    /// first subscribing shard's subscriber): charged for it in
    /// `Owner::pins` until no shard subscribes.
    pinned_by: Option<IpAddr>,
    /// Set for a durable topic.
    durable: Option<Box<Durable>>,
    /// Consumer groups of the topic: while any exists the topic is not
    /// evicted (the groups' state is keyed by its sequence numbers).
    groups: usize,
    /// A copy of a topic another node owns (see `Owner::mirror_start`):
    /// never sequenced here.
    mirror: bool,
    /// It has pending schedules (kept by the broker): not evicted, and
    /// handed off with them when it moves.
    scheduled: bool,
}

impl OwnedTopic {
    /// The last sequence subscribers may see: a durable topic's messages
    /// are visible once written.
    fn visible_seq(&self) -> u64 {
        match &self.durable {
            Some(d) => d.visible,
            None => self.last_seq,
        }
    }
}

/// All topics owned by one shard.
#[derive(Debug)]
pub struct Owner {
    /// Owned topics by name.
    topics: HashMap<TopicName, OwnedTopic, ahash::RandomState>,
    /// The same names in order, for listings: a page is a range read,
    /// O(log topics + page), not a scan. Changed only when a topic is made
    /// or freed, never on the publish path.
    names: BTreeSet<TopicName>,
    /// Table and history bounds.
    limits: OwnerLimits,
    /// Subscribed topics charged to each client address (see
    /// `OwnedTopic::pinned_by`); an address has an entry only while it is
    /// charged for at least one topic, so the map is bounded by the table.
    pins: HashMap<IpAddr, usize, ahash::RandomState>,
    /// Where epochs come from: mixed with `topics_created`, so every
    /// incarnation of a topic gets a different one. The shell seeds it from
    /// the clock and the process; a simulation from its seed.
    epoch_seed: u64,
    /// Topics created so far.
    topics_created: u64,
    /// Idle topics evicted to make room so far.
    evicted_total: u64,
    /// Durable topics with records appended since the last commit.
    appended: Vec<TopicName>,
    /// Durable declarations a topic takes at its first publish here (a
    /// cluster's configured durable topics: declared where they are
    /// sequenced, not on every node at start). Empty on a single node.
    declare_on_publish: HashMap<TopicName, DurableSpec, ahash::RandomState>,
    /// Segment bounds of durable logs made here.
    log_limits: crate::durable::LogLimits,
    /// Durable logs taken over or given away since the last call of
    /// [`Owner::take_durable_moves`]: the shell's files follow.
    durable_moves: Vec<DurableMove>,
}

/// A durable topic's log arrived on this node or left it; the shell makes
/// its files say so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DurableMove {
    /// Owned here from now on: `topic`'s directory holds only `meta.json`
    /// (epoch, declaration, numbering floor `floor`) and the list of its
    /// segments in the object store; whatever a previous incarnation left
    /// there goes.
    Taken { topic: TopicName, epoch: Epoch, spec: DurableSpec, floor: u64, segments: Vec<ArchivedSegment> },
    /// Handed to another node with every record in the object store: the
    /// local files go.
    Left { topic: TopicName },
}

/// Whether a durable topic can be handed to another node yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DurableHandOffReady {
    /// Not durable here.
    Ephemeral,
    /// Every record is in the object store: this goes with the state.
    Ready(DurableHandOff),
    /// Records are still being written, sealed or uploaded (asked for).
    Waiting,
}

impl Owner {
    /// An owner with no topics; `epoch_seed` must differ between processes
    /// (see [`Epoch`]).
    pub fn new(limits: OwnerLimits, epoch_seed: u64) -> Owner {
        Owner {
            topics: HashMap::default(),
            names: BTreeSet::new(),
            limits: OwnerLimits { client_pins_max: limits.client_pins_max.max(1), ..limits },
            pins: HashMap::default(),
            epoch_seed,
            topics_created: 0,
            evicted_total: 0,
            appended: Vec::new(),
            declare_on_publish: HashMap::default(),
            log_limits: crate::durable::LogLimits::default(),
            durable_moves: Vec::new(),
        }
    }

    /// Sets the segment bounds of durable logs made here, and the durable
    /// declarations topics take at their first publish here (a cluster's
    /// configured ones; see `declare_on_publish`).
    pub fn set_durable_config(
        &mut self,
        log_limits: crate::durable::LogLimits,
        declare_on_publish: impl IntoIterator<Item = (TopicName, DurableSpec)>,
    ) {
        self.log_limits = log_limits;
        self.declare_on_publish = declare_on_publish.into_iter().collect();
    }

    /// Durable logs taken over or given away since the last call.
    pub fn take_durable_moves(&mut self) -> Vec<DurableMove> {
        std::mem::take(&mut self.durable_moves)
    }

    /// Whether `topic` (given away, held for its next owner) can leave with
    /// its durable log: every record written, sealed and uploaded (the
    /// caller asks for the seal, and so the upload, when not yet). A log
    /// whose writes failed leaves with what is in the object store once
    /// its sealed segments are uploaded.
    pub fn durable_hand_off(&self, topic: &TopicName) -> DurableHandOffReady {
        let Some(d) = self.topics.get(topic).and_then(|t| t.durable.as_ref()) else {
            return DurableHandOffReady::Ephemeral;
        };
        // A failed log writes nothing more, but what it wrote and sealed
        // is uploaded first.
        let stored = if d.failed { d.log.to_upload().is_empty() } else { d.unwritten.is_empty() && d.log.all_stored() };
        if stored {
            return DurableHandOffReady::Ready(DurableHandOff {
                spec: d.spec,
                segments: d.log.stored_segments(),
                groups: Vec::new(),
            });
        }
        DurableHandOffReady::Waiting
    }

    /// The durable declaration `topic` takes at its first publish here, if
    /// it is one of a cluster's configured durable topics.
    pub fn durable_on_publish(&self, topic: &TopicName) -> Option<DurableSpec> {
        self.declare_on_publish.get(topic).copied()
    }

    /// `topic` (just started afresh here: its state went with its node)
    /// continues its durable log as the object store holds it (`segments`):
    /// its numbers go on after the last one stored.
    pub fn durable_from_store(&mut self, topic: &TopicName, spec: DurableSpec, segments: Vec<ArchivedSegment>) {
        self.install_durable(topic, spec, segments, true);
    }

    /// Makes `topic` (held here) durable with a log whose records are
    /// `segments` in the object store (none: a new log) and tells the shell
    /// (`DurableMove::Taken`). With `after_store` its numbers go on after
    /// the last stored one and its history starts over (taken without a
    /// hand-off); else they go on from its own last number.
    fn install_durable(
        &mut self,
        topic: &TopicName,
        spec: DurableSpec,
        segments: Vec<ArchivedSegment>,
        after_store: bool,
    ) {
        let (limits, empty) = (self.log_limits, self.limits.empty_history());
        let Some(t) = self.topics.get_mut(topic) else { return };
        let log = TopicLog::in_store(limits, segments.iter().copied());
        if after_store {
            t.last_seq = t.last_seq.max(log.next_seq() - 1);
            t.history = empty;
        }
        t.durable = Some(Durable::new(spec, log, t.last_seq));
        let taken = DurableMove::Taken { topic: topic.clone(), epoch: t.epoch, spec, floor: t.last_seq, segments };
        self.durable_moves.push(taken);
    }

    /// `topic`'s durable log went to another node with its state: a copy
    /// here from now on, its files deleted.
    pub fn durable_left(&mut self, topic: &TopicName) {
        if let Some(t) = self.topics.get_mut(topic).filter(|t| t.durable.is_some()) {
            t.durable = None;
            self.durable_moves.push(DurableMove::Left { topic: topic.clone() });
        }
    }

    /// Takes over `topic`'s durable log from its previous owner's hand-off
    /// (the topic's state adopted just before): appends go after its
    /// segments, which reads find in the object store. A log this node
    /// held before is replaced.
    pub fn durable_taken(&mut self, topic: &TopicName, handed: DurableHandOff) {
        self.install_durable(topic, handed.spec, handed.segments, false);
    }

    /// Sequences a message: assigns the next sequence and a timestamp, keeps
    /// it in history, and returns it with the mask of subscribing shards.
    /// A durable topic's message is appended to its log instead and held
    /// until [`Owner::written`] (the key is kept in the log and its index,
    /// the metadata as record headers).
    pub fn publish(
        &mut self,
        topic: &TopicName,
        kind: PayloadKind,
        payload: Bytes,
        options: &PublishOptions,
        now: Now,
    ) -> Result<Sequenced, OwnerError> {
        // A cluster's configured durable topic becomes durable where it is
        // first sequenced (a single node's map is empty: one branch).
        if !self.declare_on_publish.is_empty() {
            if let Some(&spec) = self.declare_on_publish.get(topic) {
                if self.topics.get(topic).is_none_or(|t| t.durable.is_none() && !t.mirror) {
                    self.topic_mut(topic, now.at)?;
                    self.install_durable(topic, spec, Vec::new(), false);
                }
            }
        }
        let t = self.topic_mut(topic, now.at)?;
        if let Some(d) = &t.durable {
            if d.failed {
                return Err(OwnerError::StorageFailed);
            }
            if d.unwritten.len() as u64 >= UNWRITTEN_MESSAGES_MAX || d.unwritten_bytes >= UNWRITTEN_BYTES_MAX {
                return Err(OwnerError::StorageBehind);
            }
        }
        t.last_active = now.at;
        let seq = t.last_seq + 1;
        let message = Message {
            seq,
            timestamp_ms: now.unix_ms,
            kind,
            payload,
            key: options.key.clone(),
            reply_to: options.reply_to,
            meta: options.meta.clone(),
            published_at: now.at,
        };
        let mut first_append = false;
        let held = if let Some(d) = &mut t.durable {
            let record = Record {
                seq,
                timestamp_ms: now.unix_ms,
                kind,
                key: message.key.clone(),
                headers: message.record_headers(),
                payload: message.payload.clone(),
            };
            // Only a record over the log's ceiling fails, and publishes are
            // bounded far below it (MESSAGE_BYTES_MAX_CEILING).
            d.log.append(&record).map_err(|_| OwnerError::StorageFailed)?;
            d.unwritten_bytes += message.payload.len();
            d.unwritten.push_back(message.clone());
            first_append = !d.appended;
            d.appended = true;
            Some(d.spec.ack)
        } else {
            t.history.push(message.clone());
            None
        };
        t.last_seq = seq;
        if now.at.duration_since(t.window_start).as_secs() >= 1 {
            t.last_window_rate = t.window_count;
            t.window_count = 0;
            t.window_start = now.at;
        }
        t.window_count += 1;
        let subscriber_shards = if held.is_some() { 0 } else { t.subscriber_shards };
        let epoch = t.epoch;
        if first_append {
            self.appended.push(topic.clone());
        }
        Ok(Sequenced { message, epoch, subscriber_shards, held })
    }

    /// Makes `topic` durable with `spec`: from its next message on, every
    /// message goes to its log first. With `recovered`, the topic comes back
    /// as a previous run left it: its epoch, its log, its next sequence and
    /// its last messages in history.
    pub fn declare_durable(
        &mut self,
        topic: &TopicName,
        spec: DurableSpec,
        recovered: Option<(Epoch, Recovered)>,
        limits: crate::durable::LogLimits,
        now: Instant,
    ) -> Result<(), OwnerError> {
        let (messages_max, bytes_max) = (self.limits.history_messages_max, self.limits.history_bytes_max);
        let history = History::new(messages_max, bytes_max);
        let t = self.topic_mut(topic, now)?;
        match recovered {
            Some((epoch, r)) => {
                t.epoch = epoch;
                t.last_seq = r.next_seq - 1;
                t.history = history;
                // The ring holds contiguous numbers: only the tail after the
                // last skip goes in, and nothing when the next number skips.
                if r.log.next_seq() == r.next_seq {
                    let mut previous = None;
                    for record in r.tail {
                        if previous.is_some_and(|p: u64| p + 1 != record.seq) {
                            t.history = History::new(messages_max, bytes_max);
                        }
                        previous = Some(record.seq);
                        t.history.push(Message::from_record(record, now));
                    }
                }
                t.durable = Some(Durable::new(spec, r.log, t.last_seq));
            }
            None => match &mut t.durable {
                Some(d) => d.spec = spec,
                None => t.durable = Some(Durable::new(spec, TopicLog::new(limits), t.last_seq)),
            },
        }
        Ok(())
    }

    /// Makes a durable topic ephemeral again (its history stays; the shell
    /// deletes its files). Messages still waiting for the disk stay held
    /// until their commit reports.
    pub fn undeclare_durable(&mut self, topic: &TopicName) -> bool {
        match self.topics.get_mut(topic) {
            Some(t) if t.durable.as_ref().is_some_and(|d| d.unwritten.is_empty()) => {
                t.durable = None;
                true
            }
            _ => false,
        }
    }

    /// A durable topic's declaration and log, if it is one.
    pub fn durable(&self, topic: &TopicName) -> Option<(DurableSpec, &TopicLog)> {
        self.topics.get(topic).and_then(|t| t.durable.as_ref()).map(|d| (d.spec, &d.log))
    }

    /// The last sequence of a durable topic that is written (what a
    /// consumer group may read from its log); `None` if not durable.
    pub fn written_seq(&self, topic: &TopicName) -> Option<u64> {
        self.topics.get(topic).and_then(|t| t.durable.as_ref()).map(|d| d.visible)
    }

    /// A durable topic's log, to expire segments.
    pub fn durable_log_mut(&mut self, topic: &TopicName) -> Option<&mut TopicLog> {
        self.topics.get_mut(topic).and_then(|t| t.durable.as_mut()).map(|d| &mut d.log)
    }

    /// Whether writing `topic`'s log failed (it is not marked clean at a
    /// stop: its next start skips numbers and cuts what was half written).
    pub fn durable_failed(&self, topic: &TopicName) -> bool {
        self.topics.get(topic).and_then(|t| t.durable.as_ref()).is_some_and(|d| d.failed)
    }

    /// The last sequence `topic` assigned (a durable declaration's floor).
    pub fn last_seq(&self, topic: &TopicName) -> Option<u64> {
        self.topics.get(topic).map(|t| t.last_seq)
    }

    /// Names of the durable topics.
    pub fn durable_names(&self) -> Vec<TopicName> {
        self.topics.iter().filter(|(_, t)| t.durable.is_some()).map(|(n, _)| n.clone()).collect()
    }

    /// The writes of everything appended since the last call, per topic:
    /// one group commit.
    pub fn take_commits(&mut self) -> Vec<TopicCommit> {
        let mut commits = Vec::new();
        for topic in std::mem::take(&mut self.appended) {
            let Some(t) = self.topics.get_mut(&topic) else { continue };
            let Some(d) = &mut t.durable else { continue };
            d.appended = false;
            if d.failed {
                continue; // its records are never written
            }
            let jobs = d.log.take_writes();
            commits.push(TopicCommit { topic, jobs, through_seq: t.last_seq });
        }
        commits
    }

    /// Seals `topic`'s active segment at the next commit (an upload is
    /// awaited); false when there is nothing to seal.
    pub fn seal(&mut self, topic: &TopicName) -> bool {
        let Some(d) = self.topics.get_mut(topic).and_then(|t| t.durable.as_mut()) else { return false };
        if d.failed || !d.log.seal_active() {
            return false;
        }
        if !d.appended {
            d.appended = true;
            self.appended.push(topic.clone());
        }
        true
    }

    /// Whether some durable topic has records waiting for `take_commits`.
    pub fn has_commits(&self) -> bool {
        !self.appended.is_empty()
    }

    /// Reports a topic's commit written: its messages through `through_seq`
    /// go to history and are released for delivery.
    pub fn written(&mut self, commit: &TopicCommit) -> Option<Released> {
        let t = self.topics.get_mut(&commit.topic)?;
        let d = t.durable.as_mut().filter(|d| !d.failed)?;
        for job in &commit.jobs {
            d.log.written(job.segment, job.end);
        }
        let mut messages = Vec::new();
        while d.unwritten.front().is_some_and(|m| m.seq <= commit.through_seq) {
            if let Some(m) = d.unwritten.pop_front() {
                d.unwritten_bytes -= m.payload.len();
                t.history.push(m.clone());
                d.visible = m.seq;
                messages.push(m);
            }
        }
        Some(Released { epoch: t.epoch, subscriber_shards: t.subscriber_shards, messages })
    }

    /// Reports a topic's commit failed: the topic takes no more publishes,
    /// and every message it holds, in this commit or appended since, is
    /// dropped (never delivered, never written); their sequences are
    /// returned, to answer their publishers.
    pub fn write_failed(&mut self, commit: &TopicCommit) -> Vec<u64> {
        let Some(d) = self.topics.get_mut(&commit.topic).and_then(|t| t.durable.as_mut()) else { return Vec::new() };
        d.failed = true;
        d.unwritten_bytes = 0;
        d.unwritten.drain(..).map(|m| m.seq).collect()
    }

    /// Registers `shard` as subscribing, for a subscriber at `client`, and
    /// answers with the topic's position and, when `from` is given, the
    /// retained messages after it, or why nothing after it can be had
    /// (never a silent gap). A topic no shard subscribed to yet is charged
    /// to `client`, which is refused past its share.
    pub fn subscribe(
        &mut self,
        topic: &TopicName,
        shard: usize,
        client: IpAddr,
        from: Option<ResumeFrom>,
        now: Instant,
    ) -> Result<Grant, OwnerError> {
        let pinned = self.topics.get(topic).is_some_and(|t| t.subscriber_shards != 0);
        let charged = self.pins.get(&client).copied().unwrap_or(0);
        if !pinned && charged >= self.limits.client_pins_max {
            return Err(OwnerError::ClientShare { max: self.limits.client_pins_max });
        }
        let t = self.topic_mut(topic, now)?;
        let newly_pinned = t.subscriber_shards == 0;
        if newly_pinned {
            t.pinned_by = Some(client);
        }
        t.subscriber_shards |= 1 << shard;
        t.last_active = now;
        let (epoch, last_seq) = (t.epoch, t.visible_seq());
        let first_seq = t.history.first_seq().unwrap_or(last_seq + 1);
        let from = from.map(|f| match f.since_ms {
            Some(ms) => ResumeFrom { after_seq: after_seq_for_time(t, ms), epoch: None, since_ms: Some(ms) },
            None => f,
        });
        let lost = match from {
            Some(ResumeFrom { epoch: Some(e), .. }) if e != epoch => Some(HistoryLost::EpochChanged),
            Some(ResumeFrom { after_seq, .. }) if after_seq > t.last_seq => Some(HistoryLost::BeyondLastSeq),
            _ => None,
        };
        let grant =
            |replay, resumed, from_log| Grant { epoch, last_seq, first_seq, replay, resumed, from_log, more: false };
        let grant = match (from, lost) {
            (_, Some(lost)) => grant(Vec::new(), Resumed::Lost(lost), None),
            (Some(from), None) => {
                let replay = t.history.after(from.after_seq, last_seq);
                // A durable topic's log may hold what the history no longer
                // does: read it first; only what neither holds is a gap.
                let log = t.durable.as_ref().map(|d| (d.log.first_readable_seq(), d.log.next_seq() - 1));
                let in_log = match (replay.gap, log) {
                    (Some(gap), Some((log_first, log_last))) => {
                        let range =
                            SeqRange { from_seq: gap.from_seq.max(log_first), to_seq: gap.to_seq.min(log_last) };
                        (range.from_seq <= range.to_seq).then_some((gap, log_first, range))
                    }
                    _ => None,
                };
                match in_log {
                    Some((gap, log_first, range)) => {
                        let before = (gap.from_seq < log_first)
                            .then(|| SeqRange { from_seq: gap.from_seq, to_seq: log_first - 1 });
                        grant(Vec::new(), Resumed::Replayed { gap: before }, Some(range))
                    }
                    None => grant(replay.messages, Resumed::Replayed { gap: replay.gap }, None),
                }
            }
            (None, None) => grant(Vec::new(), Resumed::Live, None),
        };
        if newly_pinned {
            *self.pins.entry(client).or_default() += 1;
        }
        Ok(grant)
    }

    /// Removes `shard` from the topic's subscribing shards. A topic left
    /// with no subscribers and nothing ever published (made by a subscribe)
    /// is freed at once: nothing about it is worth keeping.
    pub fn unsubscribe(&mut self, topic: &TopicName, shard: usize, now: Instant) {
        let Some(t) = self.topics.get_mut(topic) else { return };
        t.subscriber_shards &= !(1 << shard);
        t.last_active = now;
        if t.subscriber_shards == 0 {
            if let Some(client) = t.pinned_by.take() {
                release(&mut self.pins, client);
            }
        }
        if t.subscriber_shards == 0 && t.last_seq == 0 && t.durable.is_none() {
            self.topics.remove(topic);
            self.names.remove(topic);
        }
    }

    /// Idle topics evicted to make room so far.
    pub fn evicted_total(&self) -> u64 {
        self.evicted_total
    }

    /// Snapshots of the owned topics `query` asks for, sorted by name.
    pub fn stats_page(&self, query: &TopicQuery) -> Vec<TopicStat> {
        let start = match &query.after {
            Some(after) if after.as_str() >= query.prefix.as_str() => Bound::Excluded(after.as_str()),
            _ => Bound::Included(query.prefix.as_str()),
        };
        self.names
            .range::<str, _>((start, Bound::Unbounded))
            .take_while(|name| name.as_str().starts_with(&query.prefix))
            .take(query.limit)
            .filter_map(|name| self.topics.get(name).map(|t| stat(name, t)))
            .collect()
    }

    /// Snapshot of one owned topic, if it exists.
    pub fn stat(&self, topic: &TopicName) -> Option<TopicStat> {
        self.topics.get(topic).map(|t| stat(topic, t))
    }

    /// Subscribed topics charged to `client` in this table.
    pub fn pinned_by(&self, client: IpAddr) -> usize {
        self.pins.get(&client).copied().unwrap_or(0)
    }

    /// The most topics one client address may keep subscribed here.
    pub fn client_pins_max(&self) -> usize {
        self.limits.client_pins_max
    }

    /// Number of owned topics.
    pub fn len(&self) -> usize {
        self.topics.len()
    }

    /// Whether no topic is owned.
    pub fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }

    fn topic_mut(&mut self, topic: &TopicName, now: Instant) -> Result<&mut OwnedTopic, OwnerError> {
        if !self.topics.contains_key(topic) {
            if self.topics.len() >= self.limits.topics_max && !self.evict_one_idle() {
                return Err(OwnerError::TooManyTopics);
            }
            self.topics_created += 1;
            let epoch = Epoch(mix(self.epoch_seed ^ mix(self.topics_created)));
            self.names.insert(topic.clone());
            self.topics.insert(
                topic.clone(),
                OwnedTopic {
                    epoch,
                    last_active: now,
                    last_seq: 0,
                    history: self.limits.empty_history(),
                    subscriber_shards: 0,
                    window_start: now,
                    window_count: 0,
                    last_window_rate: 0,
                    pinned_by: None,
                    durable: None,
                    groups: 0,
                    mirror: false,
                    scheduled: false,
                },
            );
        }
        // Inserted just above when missing.
        Ok(self.topics.get_mut(topic).expect("present"))
    }

    /// Where this node's copy of another node's topic stands (its epoch and
    /// last number), if it has one: a follow resumes after it.
    pub fn mirror_position(&self, topic: &TopicName) -> Option<(Epoch, u64)> {
        // A copy at 0 has a position too (it started following at 0): a
        // follow again must ask for what came since, not for "now".
        self.topics.get(topic).filter(|t| t.mirror || t.last_seq > 0).map(|t| (t.epoch, t.last_seq))
    }

    /// Starts (or restarts) this node's copy of another node's topic: the
    /// owner's follow went live in sequence space `epoch` at `owner_last`,
    /// after the follow asked to resume after `asked` (whose replay comes
    /// next as messages). A copy in the same epoch is kept; otherwise its
    /// history is cleared and its position is where the replay starts
    /// (`owner_last` when there is no replay; 0 when the owner's sequence
    /// space changed: the caller follows again from its start). Returns the shards whose
    /// subscribers were live in another epoch (they are to be told).
    pub fn mirror_start(
        &mut self,
        topic: &TopicName,
        epoch: Epoch,
        owner_last: u64,
        asked: Option<ResumeFrom>,
        now: Instant,
    ) -> Result<u64, OwnerError> {
        let limits = self.limits;
        let t = self.topic_mut(topic, now)?;
        // Same sequence space: a copy never goes back, even when the node
        // it follows is behind it (a copy itself, or a new owner that has
        // not taken the topic over yet): what it has stays, and what the
        // follow sends again is dropped as had.
        if t.epoch == epoch {
            return Ok(0);
        }
        let restarted = t.subscriber_shards;
        let position = match asked {
            Some(ResumeFrom { since_ms: Some(_), .. }) => 0,
            Some(ResumeFrom { epoch: Some(e), .. }) if e != epoch => 0,
            Some(ResumeFrom { after_seq, .. }) => after_seq.min(owner_last),
            None => owner_last,
        };
        t.epoch = epoch;
        t.last_seq = position;
        t.history = limits.empty_history();
        t.mirror = true;
        Ok(restarted)
    }

    /// Whether this shard owns `topic` (has it, and not as a copy).
    pub fn owns(&self, topic: &TopicName) -> bool {
        self.topics.get(topic).is_some_and(|t| !t.mirror)
    }

    /// Whether this shard holds `topic` as a copy of another node's.
    pub fn is_copy(&self, topic: &TopicName) -> bool {
        self.topics.get(topic).is_some_and(|t| t.mirror)
    }

    /// The topics this shard owns (not copies), for a topology change.
    pub fn owned_names(&self) -> Vec<TopicName> {
        // In name order: what a topology change does is the same on every
        // run (the hash map's order is per process).
        self.names.iter().filter(|n| self.owns(n)).cloned().collect()
    }

    /// Gives `topic` away to its new owner: it becomes a copy here (never
    /// sequenced again), and its state goes in the hand-off: epoch, last
    /// number, retained history. `None` when this shard does not own it.
    pub fn give_away(&mut self, topic: &TopicName) -> Option<(Epoch, u64, Vec<Message>)> {
        let t = self.topics.get_mut(topic).filter(|t| !t.mirror)?;
        t.mirror = true;
        Some(Owner::state_of(t))
    }

    /// The state of a topic held here: epoch, last number, retained
    /// history (for a topic given away and not yet claimed, what its
    /// hand-off carries).
    pub fn handed_state(&self, topic: &TopicName) -> Option<(Epoch, u64, Vec<Message>)> {
        self.topics.get(topic).map(Owner::state_of)
    }

    fn state_of(t: &OwnedTopic) -> (Epoch, u64, Vec<Message>) {
        (t.epoch, t.last_seq, t.history.after(0, t.last_seq).messages)
    }

    /// Takes `topic` over from its previous owner's hand-off: its epoch, last
    /// number and history. A copy in the same epoch keeps what it had and
    /// gets the rest (returned, to deliver to the subscribing shards); a
    /// copy in another epoch, or none, starts from the hand-off (`restarted`
    /// names the shards whose subscribers were in another epoch).
    pub fn adopt(
        &mut self,
        topic: &TopicName,
        epoch: Epoch,
        last_seq: u64,
        history: Vec<Message>,
        now: Instant,
    ) -> Result<Adopted, OwnerError> {
        let limits = self.limits;
        let t = self.topic_mut(topic, now)?;
        let had = t.mirror && t.last_seq > 0;
        let mut adopted =
            Adopted { epoch, subscriber_shards: t.subscriber_shards, new: Vec::new(), restarted: 0, skipped: None };
        // Same sequence space: never go back (a copy may be ahead of a
        // hand-off from a node that was not the last owner).
        if t.epoch == epoch {
            // What the copy holds and what the hand-off carries, merged: the
            // hand-off fills in what the copy missed before it started
            // following (its history may begin later), and brings what came
            // after the copy's last (delivered here as new).
            let had_through = t.last_seq;
            let mut by_seq: std::collections::BTreeMap<u64, Message> =
                t.history.after(0, had_through).messages.into_iter().map(|m| (m.seq, m)).collect();
            for m in history {
                if m.seq > had_through {
                    adopted.new.push(m.clone());
                }
                by_seq.entry(m.seq).or_insert(m);
            }
            // The longest run of consecutive numbers ending at the last one.
            let last = by_seq.keys().next_back().copied().unwrap_or(0).max(had_through);
            let mut first = last.saturating_add(1);
            while first > 1 && by_seq.contains_key(&(first - 1)) {
                first -= 1;
            }
            t.history = limits.empty_history();
            for (_, m) in by_seq.range(first..) {
                t.history.push(m.clone());
            }
            t.last_seq = last;
        } else {
            if had || t.subscriber_shards != 0 {
                adopted.restarted = t.subscriber_shards;
            }
            t.epoch = epoch;
            t.history = limits.empty_history();
            for m in history {
                if t.history.first_seq().is_some() && m.seq != t.last_seq + 1 {
                    t.history = limits.empty_history();
                }
                t.last_seq = m.seq;
                t.history.push(m);
            }
        }
        if last_seq > t.last_seq {
            // The hand-off's last number is past its history: what is
            // retained here ends before it, so the history starts over
            // (a resume across it is told the gap), and in the same space
            // live subscribers are told too.
            if t.epoch == epoch && adopted.restarted == 0 {
                adopted.skipped = Some(SeqRange { from_seq: t.last_seq + 1, to_seq: last_seq });
            }
            t.history = limits.empty_history();
            t.last_seq = last_seq;
        }
        t.mirror = false;
        t.last_active = now;
        Ok(adopted)
    }

    /// Takes a topic over without a hand-off (its previous owner is gone):
    /// a copy starts a new sequence space here. Returns the shards whose
    /// subscribers were in the old one.
    pub fn take_fresh(&mut self, topic: &TopicName, now: Instant) -> u64 {
        let limits = self.limits;
        self.topics_created += 1;
        let epoch = Epoch(mix(self.epoch_seed ^ mix(self.topics_created)));
        let Some(t) = self.topics.get_mut(topic) else { return 0 };
        if !t.mirror {
            return 0;
        }
        t.mirror = false;
        t.epoch = epoch;
        t.last_seq = 0;
        t.history = limits.empty_history();
        t.last_active = now;
        t.subscriber_shards
    }

    /// Makes `topic` (empty, owned here) if this shard holds nothing of it:
    /// a topic taken over with nothing to hand off.
    pub fn ensure(&mut self, topic: &TopicName, now: Instant) -> Result<(), OwnerError> {
        self.topic_mut(topic, now).map(|_| ())
    }

    /// The epoch of `topic`, if held.
    pub fn epoch_of(&self, topic: &TopicName) -> Option<Epoch> {
        self.topics.get(topic).map(|t| t.epoch)
    }

    /// A message of a topic this node copies from its owner: kept in
    /// history as if sequenced here (its number is the owner's). `None`
    /// when it was had already. A number past the next one clears the
    /// history first (a resume from before it is then told the gap), and
    /// the range skipped comes back, for live subscribers to be told.
    pub fn mirror_accept(&mut self, topic: &TopicName, message: Message) -> Option<MirrorAccepted> {
        let limits = self.limits;
        let t = self.topics.get_mut(topic)?;
        if message.seq <= t.last_seq {
            return None;
        }
        let mut skipped = None;
        if message.seq != t.last_seq + 1 {
            t.history = limits.empty_history();
            skipped = Some(SeqRange { from_seq: t.last_seq + 1, to_seq: message.seq - 1 });
        }
        t.last_seq = message.seq;
        t.last_active = message.published_at;
        t.history.push(message.clone());
        Some(MirrorAccepted { epoch: t.epoch, subscriber_shards: t.subscriber_shards, skipped, message })
    }

    /// The owner of a topic this node copies announced that
    /// `..=to_seq` cannot be had: the copy moves past it. The range it
    /// skipped, its epoch and the subscribing shards, if it moved.
    pub fn mirror_gap(&mut self, topic: &TopicName, to_seq: u64) -> Option<(Epoch, SeqRange, u64)> {
        let limits = self.limits;
        let t = self.topics.get_mut(topic)?;
        if to_seq <= t.last_seq {
            return None;
        }
        let skipped = SeqRange { from_seq: t.last_seq + 1, to_seq };
        t.last_seq = to_seq;
        t.history = limits.empty_history();
        Some((t.epoch, skipped, t.subscriber_shards))
    }

    /// The shards subscribing to `topic` (bit i: shard i).
    pub fn subscriber_shards(&self, topic: &TopicName) -> u64 {
        self.topics.get(topic).map_or(0, |t| t.subscriber_shards)
    }

    /// The seed this owner's epochs come from (differs between processes).
    pub fn seed(&self) -> u64 {
        self.epoch_seed
    }

    /// A consumer group of `topic` was created: the topic (made if needed)
    /// is kept until the group goes.
    pub fn hold_for_group(&mut self, topic: &TopicName, now: Instant) -> Result<(), OwnerError> {
        self.topic_mut(topic, now)?.groups += 1;
        Ok(())
    }

    /// `topic` has pending schedules (made if needed: it is owned here
    /// from now on, so it is handed off with them when it moves).
    pub fn hold_for_schedules(&mut self, topic: &TopicName, now: Instant) -> Result<(), OwnerError> {
        self.topic_mut(topic, now)?.scheduled = true;
        Ok(())
    }

    /// `topic` has no pending schedules any more.
    pub fn release_for_schedules(&mut self, topic: &TopicName) {
        if let Some(t) = self.topics.get_mut(topic) {
            t.scheduled = false;
        }
    }

    /// A consumer group of `topic` was removed.
    pub fn release_for_group(&mut self, topic: &TopicName) {
        if let Some(t) = self.topics.get_mut(topic) {
            t.groups = t.groups.saturating_sub(1);
        }
    }

    /// Frees the least recently active topic that no shard subscribes to,
    /// if there is one. Its history goes with it; a later resume from it
    /// meets a new epoch and is told so. A scan: it runs only when the
    /// table is full, and costs microseconds per thousand topics.
    fn evict_one_idle(&mut self) -> bool {
        let oldest = self
            .topics
            .iter()
            .filter(|(_, t)| t.subscriber_shards == 0 && t.durable.is_none() && t.groups == 0 && !t.scheduled)
            .min_by_key(|(_, t)| t.last_active)
            .map(|(name, _)| name.clone());
        let Some(name) = oldest else { return false };
        self.topics.remove(&name);
        self.names.remove(&name);
        self.evicted_total += 1;
        true
    }
}

/// A sequence after which every message sequenced at or after `ms` lies:
/// exact from the history when it reaches back before `ms`, else a lower
/// bound from a durable topic's log index, else 0 (from the start).
fn after_seq_for_time(t: &OwnedTopic, ms: u64) -> u64 {
    let from_history = t.history.first_at_or_after(ms);
    if let Some(seq) = from_history {
        return seq - 1;
    }
    if t.history.first_seq().is_some() && t.history.last_timestamp_ms().is_some_and(|last| last < ms) {
        return t.visible_seq(); // nothing retained is that recent: live
    }
    t.durable.as_ref().map_or(0, |d| d.log.seq_bound_before_time(ms))
}

/// Takes one topic off `client`'s charge, forgetting an address charged
/// for none.
fn release(pins: &mut HashMap<IpAddr, usize, ahash::RandomState>, client: IpAddr) {
    if let Some(n) = pins.get_mut(&client) {
        *n -= 1;
        if *n == 0 {
            pins.remove(&client);
        }
    }
}

/// SplitMix64's step: spreads a counter over 64 bits.
fn mix(x: u64) -> u64 {
    crate::hash::avalanche(x.wrapping_add(0x9e37_79b9_7f4a_7c15))
}

fn stat(name: &TopicName, t: &OwnedTopic) -> TopicStat {
    TopicStat {
        name: name.clone(),
        last_seq: t.visible_seq(),
        first_seq: t.history.first_seq().unwrap_or(t.visible_seq() + 1),
        retained_messages: t.history.len(),
        retained_bytes: t.history.bytes(),
        publish_rate_per_sec: t.last_window_rate,
        subscriber_shards: t.subscriber_shards,
        epoch: t.epoch,
        durable: t.durable.as_ref().map(|d| DurableStat {
            spec: d.spec,
            log_first_seq: d.log.first_readable_seq(),
            local_first_seq: d.log.first_seq(),
            archived_bytes: d.log.archived_bytes(),
            archived_segments: d.log.archived().count(),
            log_bytes: d.log.bytes(),
            log_messages: d.log.messages(),
            segments: d.log.segment_count(),
            keys: d.log.key_count(),
            unwritten: d.unwritten.len(),
            failed: d.failed,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    fn at(instant: Instant) -> Now {
        Now { at: instant, unix_ms: 1 }
    }

    fn limits(topics_max: usize) -> OwnerLimits {
        OwnerLimits { topics_max, history_messages_max: 10, history_bytes_max: 1000, client_pins_max: topics_max }
    }

    fn name(s: &str) -> TopicName {
        TopicName::new(s).expect("valid name")
    }

    fn from(after_seq: u64, epoch: Option<Epoch>) -> Option<ResumeFrom> {
        Some(ResumeFrom { after_seq, epoch, since_ms: None })
    }

    #[test]
    fn a_durable_topics_messages_are_held_until_written_and_dropped_when_writing_fails() {
        let mut o = Owner::new(limits(4), 7);
        let t = name("orders");
        let now = Instant::now();
        o.declare_durable(&t, DurableSpec::default(), None, crate::durable::LogLimits::default(), now).unwrap();
        o.subscribe(&t, 1, A, None, now).unwrap();
        let s1 =
            o.publish(&t, PayloadKind::Text, Bytes::from_static(b"a"), &PublishOptions::default(), at(now)).unwrap();
        let s2 =
            o.publish(&t, PayloadKind::Text, Bytes::from_static(b"b"), &PublishOptions::default(), at(now)).unwrap();
        assert!(s1.held.is_some() && s2.held.is_some() && s1.subscriber_shards == 0);
        // Not visible before the write: a subscriber's grant stops before it.
        assert_eq!(o.subscribe(&t, 2, B, None, now).unwrap().last_seq, 0);
        assert!(o.has_commits());
        let commits = o.take_commits();
        assert_eq!((commits.len(), commits[0].through_seq), (1, 2));
        assert!(!o.has_commits());
        let s3 =
            o.publish(&t, PayloadKind::Text, Bytes::from_static(b"c"), &PublishOptions::default(), at(now)).unwrap();
        let released = o.written(&commits[0]).unwrap();
        assert_eq!(released.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(released.subscriber_shards, 0b110);
        assert_eq!(o.stat(&t).unwrap().last_seq, 2, "3 still waits for its write");
        let next = o.take_commits();
        assert_eq!(o.write_failed(&next[0]), [s3.message.seq]);
        let refused = o.publish(&t, PayloadKind::Text, Bytes::from_static(b"d"), &PublishOptions::default(), at(now));
        assert_eq!(refused.err(), Some(OwnerError::StorageFailed));
        assert_eq!(o.stat(&t).unwrap().last_seq, 2);
    }

    #[test]
    fn a_durable_log_moves_between_nodes_only_whole_in_the_object_store() {
        let now = Instant::now();
        let t = name("ledger");
        let publish = |o: &mut Owner, body: &'static [u8]| {
            o.publish(&t, PayloadKind::Text, Bytes::from_static(body), &PublishOptions::default(), at(now)).unwrap()
        };
        // A cluster's configured durable topic is declared at its first
        // publish where it is sequenced (the shell is told to make files).
        let mut giver = Owner::new(limits(4), 7);
        giver.set_durable_config(crate::durable::LogLimits::default(), [(t.clone(), DurableSpec::default())]);
        assert_eq!(giver.durable_hand_off(&t), DurableHandOffReady::Ephemeral);
        publish(&mut giver, b"a");
        publish(&mut giver, b"b");
        let moves = giver.take_durable_moves();
        assert!(matches!(&moves[..], [DurableMove::Taken { floor: 0, segments, .. }] if segments.is_empty()));
        // Given away with records not yet written, sealed or uploaded: it
        // waits (the broker asks for the seal).
        giver.give_away(&t).unwrap();
        assert_eq!(giver.durable_hand_off(&t), DurableHandOffReady::Waiting);
        let commits = giver.take_commits();
        giver.written(&commits[0]).unwrap();
        assert_eq!(giver.durable_hand_off(&t), DurableHandOffReady::Waiting, "written, not sealed");
        assert!(giver.seal(&t));
        let sealed = giver.take_commits();
        assert!(sealed[0].jobs.iter().any(|j| j.seal));
        giver.written(&sealed[0]);
        assert_eq!(giver.durable_hand_off(&t), DurableHandOffReady::Waiting, "sealed, not uploaded");
        giver.durable_log_mut(&t).unwrap().uploaded(1);
        let DurableHandOffReady::Ready(handed) = giver.durable_hand_off(&t) else { panic!("uploaded: ready") };
        assert_eq!(handed.segments.iter().map(|s| (s.base_seq, s.last_seq)).collect::<Vec<_>>(), [(1, 2)]);
        let (epoch, last_seq, history) = giver.handed_state(&t).unwrap();
        giver.durable_left(&t);
        assert!(giver.durable(&t).is_none());
        assert_eq!(giver.take_durable_moves(), [DurableMove::Left { topic: t.clone() }]);

        // The taker appends after the handed segments, in the same space,
        // and a read before them goes to the object store.
        let mut taker = Owner::new(limits(4), 8);
        taker.adopt(&t, epoch, last_seq, history, now).unwrap();
        taker.durable_taken(&t, handed);
        assert!(matches!(&taker.take_durable_moves()[..], [DurableMove::Taken { floor: 2, .. }]));
        let s3 = publish(&mut taker, b"c");
        assert_eq!((s3.message.seq, s3.epoch), (3, epoch));
        let (_, log) = taker.durable(&t).unwrap();
        assert_eq!((log.first_readable_seq(), log.next_seq()), (1, 4));
        assert!(log.plan(crate::durable::ReadFrom::Seq(1), 10).archived.is_some());

        // Taken without a hand-off: numbers go on after the stored log, in
        // a new space.
        let mut fresh = Owner::new(limits(4), 9);
        fresh.ensure(&t, now).unwrap();
        let stored = vec![ArchivedSegment { base_seq: 1, last_seq: 40, len: 9, first_ms: 0, last_ms: u64::MAX }];
        fresh.durable_from_store(&t, DurableSpec::default(), stored);
        let s41 = publish(&mut fresh, b"d");
        assert_eq!(s41.message.seq, 41);
        assert_ne!(s41.epoch, epoch);
    }

    #[test]
    fn sequences_without_gaps_and_tracks_subscribers() {
        let mut o = Owner::new(limits(2), 7);
        let t = name("a");
        let now = Instant::now();
        let s1 = o
            .publish(&t, PayloadKind::Text, Bytes::from_static(b"x"), &PublishOptions::default(), at(now))
            .expect("publish");
        assert_eq!((s1.message.seq, s1.subscriber_shards), (1, 0));
        let g = o.subscribe(&t, 3, A, None, now).expect("subscribe");
        assert_eq!((g.last_seq, g.first_seq, g.replay.len(), g.resumed), (1, 1, 0, Resumed::Live));
        let s2 = o
            .publish(&t, PayloadKind::Text, Bytes::from_static(b"y"), &PublishOptions::default(), at(now))
            .expect("publish");
        assert_eq!((s2.message.seq, s2.subscriber_shards, s2.epoch), (2, 0b1000, g.epoch));
        let g = o.subscribe(&t, 0, A, from(0, Some(g.epoch)), now).expect("subscribe");
        assert_eq!(g.replay.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(g.resumed, Resumed::Replayed { gap: None });
        o.unsubscribe(&t, 3, now);
        assert_eq!(o.stat(&t).expect("topic exists").subscriber_shards, 1);
    }

    #[test]
    fn a_resume_from_another_sequence_space_is_told_its_history_is_lost() {
        let now = Instant::now();
        let t = name("a");
        let mut before = Owner::new(limits(4), 1);
        for _ in 0..5 {
            before.publish(&t, PayloadKind::Text, Bytes::new(), &PublishOptions::default(), at(now)).expect("publish");
        }
        let old_epoch = before.stat(&t).expect("topic").epoch;
        // A restart: a new process, a new seed, the same topic from seq 1.
        let mut after = Owner::new(limits(4), 2);
        for _ in 0..3 {
            after.publish(&t, PayloadKind::Text, Bytes::new(), &PublishOptions::default(), at(now)).expect("publish");
        }
        let g = after.subscribe(&t, 0, A, from(2, Some(old_epoch)), now).expect("subscribe");
        assert_ne!(g.epoch, old_epoch);
        assert_eq!((g.resumed, g.replay.len()), (Resumed::Lost(HistoryLost::EpochChanged), 0));
        // Without the epoch, a sequence never assigned here gives it away.
        let g = after.subscribe(&t, 0, A, from(4, None), now).expect("subscribe");
        assert_eq!(g.resumed, Resumed::Lost(HistoryLost::BeyondLastSeq));
        // The current epoch and a sequence it has: an ordinary replay.
        let g = after.subscribe(&t, 0, A, from(1, Some(g.epoch)), now).expect("subscribe");
        assert_eq!((g.resumed, g.replay.len()), (Resumed::Replayed { gap: None }, 2));
    }

    #[test]
    fn full_tables_evict_the_least_recently_active_idle_topic() {
        let mut o = Owner::new(limits(2), 3);
        let t0 = Instant::now();
        let later = |ms| t0 + std::time::Duration::from_millis(ms);
        o.publish(&name("old"), PayloadKind::Text, Bytes::new(), &PublishOptions::default(), at(t0)).expect("publish");
        o.publish(&name("busy"), PayloadKind::Text, Bytes::new(), &PublishOptions::default(), at(later(1)))
            .expect("publish");
        let old_epoch = o.stat(&name("old")).expect("topic").epoch;
        o.publish(&name("new"), PayloadKind::Text, Bytes::new(), &PublishOptions::default(), at(later(2)))
            .expect("room made");
        assert!(o.stat(&name("old")).is_none(), "the least recently active idle topic went");
        assert_eq!(o.evicted_total(), 1);
        // Subscribed topics are never evicted.
        o.subscribe(&name("busy"), 0, A, None, later(3)).expect("subscribe");
        o.subscribe(&name("new"), 1, A, None, later(4)).expect("subscribe");
        let err = o.publish(&name("more"), PayloadKind::Text, Bytes::new(), &PublishOptions::default(), at(later(5)));
        assert_eq!(err.unwrap_err(), OwnerError::TooManyTopics);
        // Recreated later, "old" is a new sequence space, and says so.
        o.unsubscribe(&name("busy"), 0, later(6));
        let g = o.subscribe(&name("old"), 0, A, from(1, Some(old_epoch)), later(7)).expect("room made");
        assert_eq!(g.resumed, Resumed::Lost(HistoryLost::EpochChanged));
    }

    #[test]
    fn listings_read_pages_in_name_order() {
        let mut o = Owner::new(limits(10), 3);
        let now = Instant::now();
        for n in ["b2", "a1", "b1", "c", "b10"] {
            o.publish(&name(n), PayloadKind::Text, Bytes::new(), &PublishOptions::default(), at(now)).expect("publish");
        }
        let page = |prefix: &str, after: Option<&str>, limit| {
            let query = TopicQuery { prefix: prefix.into(), after: after.map(Into::into), limit };
            o.stats_page(&query).into_iter().map(|t| t.name.as_str().to_string()).collect::<Vec<_>>()
        };
        assert_eq!(page("", None, 10), ["a1", "b1", "b10", "b2", "c"]);
        assert_eq!(page("b", None, 2), ["b1", "b10"]);
        assert_eq!(page("b", Some("b10"), 2), ["b2"]);
        assert_eq!(page("b", Some("a9"), 1), ["b1"], "a cursor before the prefix starts at the prefix");
        assert_eq!(page("b", Some("b2"), 5), Vec::<String>::new());
    }

    #[test]
    fn a_topic_made_by_a_subscribe_goes_with_its_last_subscriber() {
        let mut o = Owner::new(limits(2), 3);
        let now = Instant::now();
        o.subscribe(&name("s"), 0, A, None, now).expect("subscribe");
        o.subscribe(&name("s"), 1, A, None, now).expect("subscribe");
        o.unsubscribe(&name("s"), 0, now);
        assert_eq!(o.len(), 1, "shard 1 still subscribes");
        o.unsubscribe(&name("s"), 1, now);
        assert!(o.is_empty());
    }

    #[test]
    fn one_address_cannot_pin_more_than_its_share_of_the_table() {
        let mut o = Owner::new(OwnerLimits { client_pins_max: 2, ..limits(4) }, 3);
        let now = Instant::now();
        o.subscribe(&name("a1"), 0, A, None, now).expect("first");
        o.subscribe(&name("a2"), 1, A, None, now).expect("second");
        let refused = o.subscribe(&name("a3"), 0, A, None, now).expect_err("past the share");
        assert_eq!(refused, OwnerError::ClientShare { max: 2 });
        assert_eq!((refused.http_status(), refused.code()), (429, "client_topic_share"));
        assert!(o.stat(&name("a3")).is_none(), "a refused subscribe makes no topic");
        // Joining a topic someone already keeps subscribed costs nothing.
        o.subscribe(&name("b1"), 0, B, None, now).expect("another address");
        o.subscribe(&name("b1"), 1, A, None, now).expect("already pinned");
        assert_eq!((o.pinned_by(A), o.pinned_by(B)), (2, 1));
        // The rest of the table is still there for everyone else.
        o.subscribe(&name("b2"), 0, B, None, now).expect("room for B");
        // A's charge goes when no shard subscribes any more.
        o.unsubscribe(&name("a1"), 0, now);
        assert_eq!(o.pinned_by(A), 1);
        o.subscribe(&name("a3"), 0, A, None, now).expect("room again");
        o.unsubscribe(&name("b1"), 0, now);
        o.unsubscribe(&name("b1"), 1, now);
        assert_eq!(o.pinned_by(B), 1);
    }
}
