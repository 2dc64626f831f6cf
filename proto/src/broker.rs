//! The broker: one shard's data-plane decisions, as a plain state machine.
//!
//! It sequences the topics its shard owns (through [`Owner`]), keeps the
//! topics its shard's connections subscribe to, frames each message once
//! per format and offers it to the subscribers' send queues ([`Outbound`],
//! itself sans-IO), and answers subscribes and publishes. Inputs are method
//! calls with the time ([`Now`]); what the shell must carry out comes back
//! as [`Action`]s from [`Broker::take_actions`]: send an item to shard k,
//! write a queue that is in direct mode, complete a publish or a subscribe a
//! task awaits, notice that room was made. No runtime, socket or clock lives
//! here, so the simulation (`tests/simulation.rs`) drives several brokers
//! exactly as the shards do.
//!
//! Messages for another shard are [`Item`]s; the shell batches them over
//! the channel mesh and hands what arrives to [`Broker::handle`]. Items for
//! this shard itself are handled at once, inside the call that made them.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::rc::Rc;

use bytes::Bytes;

use crate::durable::AckLevel;
pub use crate::durable::PublishOptions;
use crate::limits::ITEM_OVERHEAD_BYTES;
use crate::message::{Message, Now, PayloadKind};
use crate::metrics::{self, Metrics};
use crate::native;
use crate::outbound::{Frame, Offer, Outbound};
use crate::owner::{Epoch, Grant, Owner, OwnerError, Released, ResumeFrom, Resumed, SeqRange, Sequenced, TopicCommit};
use crate::topic::{TopicName, TopicQuery};
use crate::ws;

mod groups;
mod handoff;
mod mirrors;
mod remote_asks;
mod remote_groups;
mod requests;
mod schedules;
pub use crate::group::Settle;
pub use crate::request::Answer;
pub use groups::{GroupDeleteJob, GroupJoinError, GroupName, GroupSave, JoinRequest};
pub use requests::RequestSpec;
pub use schedules::{JournalWrite, ScheduleAsk};

/// An owner's answer to a native request: the reply's fields, or an error
/// code and message.
pub type OwnerAnswer = Result<serde_json::Value, (String, String)>;

/// `e` as an owner's answer (its code and message).
fn refused(e: OwnerError) -> OwnerAnswer {
    Err((e.code().to_string(), e.to_string()))
}

/// What one shard's broker tells another's.
#[derive(Debug)]
pub enum Item {
    /// Sequence this message (to the owner).
    Publish { topic: TopicName, kind: PayloadKind, payload: Bytes, options: PublishOptions, req: u64 },
    /// The owner's answer to `Publish`: the assigned sequence.
    PublishDone { req: u64, result: Result<u64, OwnerError> },
    /// Register the sending shard for a topic, for a subscriber at `client`
    /// (to the owner). A catch-up from a durable topic's log answers with
    /// at most about `room` bytes.
    Subscribe { topic: TopicName, client: IpAddr, from: Option<ResumeFrom>, req: u64, room: usize },
    /// The owner's answer to `Subscribe`.
    SubscribeDone { topic: TopicName, req: u64, result: Result<Grant, OwnerError> },
    /// The sending shard has no subscribers left for a topic (to the owner).
    Unsubscribe { topic: TopicName },
    /// A sequenced message for the receiving shard's subscribers, with the
    /// sequence space its number belongs to.
    Deliver { topic: TopicName, epoch: Epoch, message: Message },
    /// Owner (a copy of another node's topic) to subscribing shard: the
    /// topic's sequence space changed to `epoch`, now at `last_seq`.
    Restarted { topic: TopicName, epoch: Epoch, last_seq: u64 },
    /// Owner (a copy of another node's topic) to subscribing shard: the
    /// topic's owner cannot send `gap` of `epoch` (it no longer holds it);
    /// live subscribers are told and go on after it.
    Gap { topic: TopicName, epoch: Epoch, gap: SeqRange },
    /// A link session's shard to the topic's owner shard: node `node`
    /// claims the topic at topology `version`.
    Claim { topic: TopicName, version: u64, node: String, at: u64, req: u64 },
    /// The owner shard's answer to a claim, to write on the link.
    HandOffAnswer { req: u64, topic: TopicName, state: crate::link::HandOffState },
    /// Member `sub` of the sending shard joins a consumer group (to the
    /// owner); `settings` and `dead_letter` apply if it creates the group.
    GroupJoin {
        topic: TopicName,
        group: GroupName,
        sub: u64,
        prefetch: u32,
        settings: crate::group::GroupSettings,
        dead_letter: TopicName,
    },
    /// The member's group is on another node whose link failed (to the
    /// member's shard): the member is told and removed.
    GroupLost { topic: TopicName, group: GroupName, sub: u64 },
    /// The owner's answer to `GroupJoin`.
    GroupJoined { topic: TopicName, group: GroupName, sub: u64, result: Result<(), GroupJoinError> },
    /// Member `sub` of the sending shard left (to the owner).
    GroupLeave { topic: TopicName, group: GroupName, sub: u64 },
    /// Member `sub` of the sending shard acknowledges, refuses, or changes
    /// its prefetch (to the owner).
    GroupSettle { topic: TopicName, group: GroupName, sub: u64, settle: Settle },
    /// Delete a group without members (to the owner); answered with
    /// `OwnerAnswer`.
    GroupDelete { topic: TopicName, group: GroupName, req: u64 },
    /// A responder's answer to the request `to` names (on the receiving
    /// shard); `back` names the responder's reply, for `ReplyDone` (0: the
    /// responder wants no word back).
    Reply { to: crate::message::ReplyTo, answer: Answer, back: u64 },
    /// Whether the request a reply answered was still waiting.
    ReplyDone { back: u64, delivered: bool },
    /// Add, cancel or list `topic`'s schedules (to the owner).
    ScheduleAsk { topic: TopicName, ask: ScheduleAsk, req: u64 },
    /// The owner's answer to a native request a connection of the receiving
    /// shard made (schedules, group deletion), by the request `req` it was
    /// asked with.
    OwnerAnswer { req: u64, answer: OwnerAnswer },
    /// A node that gave `topic` up offers it to this node (a link session's
    /// shard to the topic's owner shard): claimed now if owned here.
    Offer { topic: TopicName },
    /// A hand-off the claimer's link could not take (its queue full or
    /// closing), back to the topic's owner shard, which holds the state
    /// again (a state is never dropped) until the next claim.
    HandOffReturned { topic: TopicName, state: crate::link::HandOffState },
    /// A message for member `sub` of the receiving shard, its
    /// `delivery`th delivery, tagged `tag` in the group.
    GroupDeliver { topic: TopicName, group: GroupName, sub: u64, message: Message, delivery: u32, tag: u64 },
}

impl Item {
    /// What the item costs a bounded outbox: its payload bytes plus a
    /// fixed overhead.
    pub fn cost_bytes(&self) -> usize {
        ITEM_OVERHEAD_BYTES
            + match self {
                Item::Publish { payload, .. } => payload.len(),
                Item::Deliver { message, .. } | Item::GroupDeliver { message, .. } => message.payload.len(),
                Item::Reply { answer: Answer::Result { payload, .. }, .. } => payload.len(),
                Item::ScheduleAsk { ask: ScheduleAsk::Add { scheduled, .. }, .. } => scheduled.payload.len(),
                Item::SubscribeDone { result: Ok(g), .. } => g.replay.iter().map(|m| m.payload.len()).sum(),
                _ => 0,
            }
    }
}

/// What the shell must carry out.
#[derive(Debug)]
pub enum Action {
    /// Queue `item` for shard `to` (never this shard).
    Send { to: usize, item: Item },
    /// A queue in direct mode got frames: write it (one non-blocking send)
    /// before the shard yields. Listed once until written.
    Flush(Rc<Outbound>),
    /// The owner answered a publish made with [`PublishReply::Caller`].
    Published { req: u64, result: Result<u64, OwnerError> },
    /// A subscribe answered later ([`Subscription::Pending`]) went live, or
    /// was refused (the subscriber is then gone).
    Subscribed { req: u64, result: Result<Granted, OwnerError> },
    /// Publishes in flight to an owner were answered: callers waiting for
    /// [`Broker::remote_room`] may go on.
    Room,
    /// A topic has deliveries waiting and none had before: call
    /// [`Broker::fan_out_next`] until it says there are no more.
    FanOut,
    /// Durable topics have records to write and none had before: take
    /// them with [`Broker::take_commits`], write them, and report each
    /// with [`Broker::committed`] or [`Broker::commit_failed`].
    Commit,
    /// Read a durable topic's log for a subscriber catching up or a
    /// durable consumer group, in the low-priority queue, and hand the
    /// messages to [`Broker::log_read`].
    ReadLog(LogRead),
    /// A subscriber catching up got a batch: once its queue `out` has room
    /// again, call [`Broker::catch_up`] with `req` and that room.
    CatchUp { topic: TopicName, req: u64, out: Rc<Outbound> },
    /// Send `frame` to cluster member `node` over this shard's link to it
    /// (made if missing). If the link fails, call [`Broker::link_down`]
    /// once its queue is dropped.
    Link { node: String, frame: crate::link::LinkFrame },
    /// A durable topic's log was taken over from another node or handed to
    /// it: make its files say so before the next commit writes any.
    DurableMoved(crate::owner::DurableMove),
    /// List `topic`'s segments in the object store (a durable topic taken
    /// over without its state) and hand them to [`Broker::stored_listed`].
    ListStored { topic: TopicName },
    /// Timed work arrived other than through a connection (schedules with
    /// a topic's state, a group made by a join that waited for a hand-off
    /// or handed over with its topic): the shard's ticker runs again.
    Tick,
    /// A claim [`Broker::claim`] took is answered, its frames queued on
    /// its link: a leaving node may stop once none is left (a state
    /// decided on its owner shard and not yet written would die with it).
    ClaimAnswered,
}

/// A read of a durable topic's log for a catch-up.
#[derive(Debug, Clone)]
pub struct LogRead {
    /// Answer with this id.
    pub id: u64,
    /// The topic.
    pub topic: TopicName,
    /// First and last sequence wanted.
    pub from_seq: u64,
    /// Last sequence wanted.
    pub to_seq: u64,
    /// About this many bytes at most.
    pub max_bytes: usize,
}

/// A catch-up read in progress on the owner.
#[derive(Debug)]
struct Reading {
    /// The topic.
    topic: TopicName,
    /// The subscribing shard and its request.
    from: usize,
    req: u64,
    /// The subscriber's address.
    client: IpAddr,
    /// The range asked of the log.
    range: SeqRange,
    /// The grant made when the read was asked (its gap: what precedes the
    /// log).
    grant: Grant,
}

/// Per topic, entries in increasing sequence.
type BySeq<T> = HashMap<TopicName, VecDeque<(u64, T)>, ahash::RandomState>;

/// A publish whose answer waits for its durable topic's commit.
#[derive(Debug)]
enum Held {
    /// Made on this shard.
    Here { reply: PublishReply, req: u64 },
    /// Made on shard `from` as request `req`.
    There { from: usize, req: u64 },
    /// A due schedule of a topic owned elsewhere now, forwarded to its
    /// owner: kept again if that fails (fired at least once).
    Schedule { topic: TopicName, scheduled: Box<crate::schedule::Scheduled> },
}

/// How a subscriber wants messages framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Raw topic socket: payload verbatim, opcode as published.
    Raw = 0,
    /// Original RayFlux `/subscribe`: payload verbatim, always binary.
    Legacy = 1,
    /// Native protocol envelope.
    Native = 2,
    /// A node link's message frame (another node follows the topic).
    Link = 3,
}

/// What a subscriber learns when its subscription is granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    /// Subscription id, for unsubscribe.
    pub sub_id: u64,
    /// The topic's sequence space.
    pub epoch: Epoch,
    /// Last sequence at the moment the subscription went live.
    pub last_seq: u64,
    /// What of the resume the client asked for it cannot get.
    pub resumed: Resumed,
}

/// Where the answer to a publish goes. Pipelined publishes let one
/// connection have many in flight (the channel to the owner is FIFO, so
/// they keep their order).
#[derive(Debug)]
pub enum PublishReply {
    /// Nothing on success; close the connection (1013) on error. Raw topic
    /// sockets, whose protocol has no replies.
    CloseOnError(Rc<Outbound>),
    /// Queue the native reply for request `id`.
    Native { out: Rc<Outbound>, id: u64 },
    /// The caller awaits it: [`Published::Later`], then
    /// [`Action::Published`].
    Caller,
    /// A request's publish: nothing on success (the reply answers it), the
    /// request fails on error.
    Request { req: u64 },
    /// A publish another node forwarded: answer on its link with its `id`.
    Link { out: Rc<Outbound>, id: u64 },
    /// One message of a native publish batch: the batch's one reply goes
    /// when its last message is answered.
    Batch(Rc<BatchReply>),
}

/// The answers of a native publish batch so far (see
/// [`PublishReply::Batch`]), shared by its messages.
#[derive(Debug)]
pub struct BatchReply {
    out: Rc<Outbound>,
    id: u64,
    tally: std::cell::RefCell<BatchTally>,
}

#[derive(Debug)]
struct BatchTally {
    /// Messages not answered yet.
    remaining: usize,
    accepted: usize,
    first_seq: u64,
    last_seq: u64,
    /// The first refusal, if any.
    refused: Option<OwnerError>,
}

impl BatchReply {
    /// The reply to request `id` on `out`, for a batch of `count` messages.
    pub fn new(out: Rc<Outbound>, id: u64, count: usize) -> Rc<BatchReply> {
        let tally = BatchTally { remaining: count, accepted: 0, first_seq: u64::MAX, last_seq: 0, refused: None };
        Rc::new(BatchReply { out, id, tally: std::cell::RefCell::new(tally) })
    }

    /// One message's answer; the last one queues the reply: `first_seq`,
    /// `last_seq` and `count` of what was sequenced, or the first refusal
    /// with how many were `accepted` (and their numbers, if any).
    fn answer(&self, result: Result<u64, OwnerError>) {
        let mut t = self.tally.borrow_mut();
        match result {
            Ok(seq) => {
                t.accepted += 1;
                t.first_seq = t.first_seq.min(seq);
                t.last_seq = t.last_seq.max(seq);
            }
            Err(e) => {
                t.refused.get_or_insert(e);
            }
        }
        t.remaining = t.remaining.saturating_sub(1);
        if t.remaining > 0 {
            return;
        }
        let frame = match (t.refused, t.accepted) {
            (None, 0) => native::reply_ok_numbers(self.id, &[("count", 0)]),
            (None, accepted) => native::reply_ok_numbers(
                self.id,
                &[("first_seq", t.first_seq), ("last_seq", t.last_seq), ("count", accepted as u64)],
            ),
            (Some(e), 0) => {
                native::reply_error_with(self.id, e.code(), &e.to_string(), serde_json::json!({ "count": 0 }))
            }
            (Some(e), accepted) => native::reply_error_with(
                self.id,
                e.code(),
                &e.to_string(),
                serde_json::json!({ "first_seq": t.first_seq, "last_seq": t.last_seq, "count": accepted }),
            ),
        };
        self.out.offer_control(frame);
    }
}

impl PublishReply {
    /// Carries out the answer; false for `Caller`, whose answer is not
    /// delivered here.
    fn complete(&self, result: Result<u64, OwnerError>) -> bool {
        match (self, result) {
            (PublishReply::CloseOnError(_), Ok(_)) => {}
            (PublishReply::CloseOnError(out), Err(e)) => out.close(ws::close_code::TRY_AGAIN_LATER, &e.to_string()),
            (PublishReply::Native { out, id }, Ok(seq)) => {
                out.offer_control(native::reply_ok_numbers(*id, &[("seq", seq)]));
            }
            (PublishReply::Native { out, id }, Err(e)) => {
                out.offer_control(native::reply_error(Some(*id), e.code(), &e.to_string()));
            }
            (PublishReply::Link { out, id }, result) => {
                let done = crate::link::LinkFrame::PublishDone { id: *id, result };
                out.offer_control(ws::encode_data(PayloadKind::Binary, &crate::link::encode(&done)));
            }
            (PublishReply::Batch(batch), result) => batch.answer(result),
            (PublishReply::Caller | PublishReply::Request { .. }, _) => return false,
        }
        true
    }
}

/// What [`Broker::publish`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Sequenced here (this shard owns the topic).
    Now(Result<u64, OwnerError>),
    /// Sent to the owner; a `Caller` reply comes as [`Action::Published`]
    /// with this `req`.
    Later { req: u64 },
}

/// A connection's subscribe.
#[derive(Debug)]
pub struct SubscribeRequest {
    /// The topic.
    pub topic: TopicName,
    /// The connection's send queue.
    pub out: Rc<Outbound>,
    /// The connection's client address (charged for the topic if this
    /// subscription makes it subscribed).
    pub client: IpAddr,
    /// How it wants messages framed.
    pub format: Format,
    /// Where to resume, if anywhere.
    pub from: Option<ResumeFrom>,
    /// The native request to answer before any message, if any.
    pub reply_id: Option<u64>,
}

/// What [`Broker::subscribe`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscription {
    /// Live at once: the topic is live on this shard and no resume was
    /// asked for.
    Live(Granted),
    /// Asked of the owner; the answer comes as [`Action::Subscribed`] with
    /// `req`. `sub_id` unsubscribes it meanwhile.
    Pending { req: u64, sub_id: u64 },
}

/// A subscription waiting for its owner's grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    /// The request id the grant answers.
    req: u64,
    /// The native request id to answer first, if any (none once answered:
    /// a catch-up answers with its first batch).
    reply_id: Option<u64>,
    /// The subscriber's address (asked again on each catch-up batch).
    client: IpAddr,
    /// A catch-up's earlier batches went out: the subscription was
    /// reported to its task already.
    reported: bool,
    /// A subscription from a time: replayed messages before it are skipped
    /// (the owner's starting point may be a little earlier).
    since_ms: Option<u64>,
}

/// A subscriber of a local topic.
#[derive(Debug)]
struct Subscriber {
    /// Shard-unique id.
    id: u64,
    /// The connection's send queue.
    out: Rc<Outbound>,
    /// Framing.
    format: Format,
    /// Last sequence queued to it; later deliveries only.
    last_seq: u64,
    /// Set until the owner's grant arrives.
    pending: Option<Pending>,
}

/// A topic with subscribers on this shard.
#[derive(Debug)]
struct LocalTopic {
    /// Topic name.
    name: TopicName,
    /// Last sequence received by this shard for this topic.
    last_seq: u64,
    /// The topic's sequence space, once a grant told this shard.
    epoch: Option<Epoch>,
    /// Subscribers, in subscription order.
    subs: Vec<Subscriber>,
    /// Deliveries not yet fanned out; keeps its capacity.
    fill: Vec<Message>,
    /// Whether the topic is in the dirty list.
    dirty: bool,
}

/// A request this shard awaits from an owner.
#[derive(Debug)]
enum Waiting {
    /// A publish, its reply, and what it holds of the in-flight budget.
    Publish { reply: PublishReply, owner: usize, cost: usize },
    /// A subscribe; the subscriber is pending in its local topic.
    Subscribe,
}

/// The bounds a broker keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokerLimits {
    /// Bytes of publishes in flight to one owner shard (`remote_room`).
    pub publish_bytes_in_flight_max: usize,
}

/// One shard's broker.
#[derive(Debug)]
pub struct Broker {
    /// This shard.
    id: usize,
    /// Number of shards.
    shards: usize,
    /// Bounds.
    limits: BrokerLimits,
    /// Topics this shard owns.
    owner: Owner,
    /// Local topics by name: the index of their slot.
    topics: HashMap<TopicName, usize, ahash::RandomState>,
    /// Local topics; `None` is a free slot (listed in `free`).
    slots: Vec<Option<LocalTopic>>,
    /// Free slots.
    free: Vec<usize>,
    /// Slots of topics with deliveries not yet fanned out.
    /// In the order they became dirty: a pass serves the oldest first, and
    /// a topic dirtied again meanwhile waits its turn behind the others.
    dirty: VecDeque<usize>,
    /// Payload bytes in fill buffers.
    fanout_pending_bytes: usize,
    /// Requests awaiting an owner's answer, by request id.
    waiting: HashMap<u64, Waiting, ahash::RandomState>,
    /// Bytes of publishes in flight, per owner shard.
    in_flight: Vec<usize>,
    /// Next request or subscription id.
    next_id: u64,
    /// What the shell must carry out.
    actions: Vec<Action>,
    /// Publishes awaiting their durable topic's commit, per topic, by
    /// sequence, with the level they wait for.
    held: BySeq<(AckLevel, Held)>,
    /// Publishes at ack `stored` whose commit is written, awaiting the
    /// upload of their segment, per topic, by sequence.
    stored_wait: BySeq<Held>,
    /// `Action::Commit` was asked for and the commits not yet taken.
    commit_asked: bool,
    /// Catch-up reads of durable logs in progress, by read id.
    reading: HashMap<u64, Reading, ahash::RandomState>,
    /// Consumer groups of the topics this shard owns.
    groups: HashMap<(TopicName, GroupName), groups::OwnedGroup, ahash::RandomState>,
    /// Each topic's groups, so a publish looks at its topic's only.
    group_names: HashMap<TopicName, Vec<GroupName>, ahash::RandomState>,
    /// Reads of the log in flight for durable groups, by read id.
    group_reads: HashMap<u64, (TopicName, GroupName), ahash::RandomState>,
    /// When durable groups' positions were last handed over to save.
    groups_saved_ms: u64,
    /// Durable groups removed, whose saves the shell deletes.
    group_deletes: Vec<groups::GroupDeleteJob>,
    /// Consumer-group members on this shard, by id.
    members: HashMap<u64, groups::LocalMember, ahash::RandomState>,
    /// Requests of this shard's connections waiting for their reply.
    requests: HashMap<u64, requests::WaitingRequest, ahash::RandomState>,
    /// Replies of this shard's responders awaiting the requester shard's
    /// word, with the native request to answer.
    replying: HashMap<u64, (Rc<Outbound>, u64), ahash::RandomState>,
    /// Pending schedules of the topics this shard owns.
    schedules: HashMap<TopicName, crate::schedule::Schedules, ahash::RandomState>,
    /// Durable topics' schedule changes waiting to be journaled.
    schedule_journal: HashMap<TopicName, schedules::Journal, ahash::RandomState>,
    /// Durable topics' fired schedules whose messages are not yet written,
    /// by their messages' sequences, in order.
    schedule_fired: HashMap<TopicName, Vec<(u64, crate::schedule::Scheduled)>, ahash::RandomState>,
    /// Durable topics' schedules fired before a restart whose messages
    /// were not known written (with their old sequences): fired again at
    /// the next tick.
    schedule_refire: HashMap<TopicName, Vec<(u64, crate::schedule::Scheduled)>, ahash::RandomState>,
    /// Schedule and group-deletion requests of this shard's connections
    /// awaiting the owner's answer (`Item::OwnerAnswer`): the queue and
    /// the native id to answer.
    asking: HashMap<u64, remote_asks::Asker, ahash::RandomState>,
    /// Questions forwarded to their topic's owner node and not yet
    /// answered: the node, the asking shard and its request.
    remote_asks: HashMap<u64, (String, usize, u64), ahash::RandomState>,
    /// Schedules a claimed node sent ahead of a topic's state, by node and
    /// topic (its hand-off frame follows on the same link).
    schedules_arriving: HashMap<(String, TopicName), Vec<crate::schedule::Scheduled>, ahash::RandomState>,
    /// This node's cluster, when it has other members.
    cluster: Option<crate::cluster::Views>,
    /// Topics another node owns that this shard follows, by name.
    mirrors: HashMap<TopicName, mirrors::Mirror, ahash::RandomState>,
    /// This node lost its membership lease: it sequences nothing.
    fenced: bool,
    /// Topics owned here under the current topology, waiting for their
    /// previous owner's hand-off.
    taking: HashMap<TopicName, handoff::Taking, ahash::RandomState>,
    /// Topics given up at the last topology change, kept until their new
    /// owner claims them, with that owner.
    handing: HashMap<TopicName, handoff::Handing, ahash::RandomState>,
    /// Topics given away ahead of this node's own view (a claim from a
    /// newer topology), with their new owner and its view's version.
    given: HashMap<TopicName, (String, u64), ahash::RandomState>,
    /// Topics whose state left this node, with this node's view version
    /// then and the node it went to: a claim about a run before it is
    /// stale. Forgotten with the views ([`crate::cluster::VIEW_HISTORY_MAX`]).
    gave: HashMap<TopicName, (u64, String), ahash::RandomState>,
    /// Topics offered to this node before its view made it their owner:
    /// claimed at the next member set if it does (else forgotten; at most
    /// [`handoff::OFFERS_HELD_MAX`]).
    offered: std::collections::HashSet<TopicName, ahash::RandomState>,
    /// Follows sent and not answered yet, by owner node and topic (on the
    /// link to that node now).
    follows_out: HashMap<(String, TopicName), u32, ahash::RandomState>,
    /// Members of this node whose group is on another node, by their id on
    /// the link, and that id by (member's shard, its id there).
    remote_members: HashMap<u64, remote_groups::RemoteMember, ahash::RandomState>,
    remote_member_ids: HashMap<(usize, u64), u64, ahash::RandomState>,
    /// Requests named by this shard for requesters on other nodes (a
    /// responder here, or a request forwarded here).
    relayed: HashMap<u64, remote_groups::Relayed, ahash::RandomState>,
    /// Claims by other nodes' links on this shard, awaiting the owner
    /// shard's answer: the link to answer on.
    claims: HashMap<u64, Rc<Outbound>, ahash::RandomState>,
    /// Publishes forwarded to their owner node, awaiting its answer, by
    /// link id: the node and whom to answer.
    forwarded: HashMap<u64, (String, Held), ahash::RandomState>,
    /// This shard's counters.
    metrics: Rc<Metrics>,
}

impl Broker {
    /// A broker for shard `id` of `shards`, owning through `owner`.
    pub fn new(id: usize, shards: usize, owner: Owner, limits: BrokerLimits, metrics: Rc<Metrics>) -> Broker {
        Broker {
            id,
            shards,
            limits,
            owner,
            topics: HashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            dirty: VecDeque::new(),
            fanout_pending_bytes: 0,
            waiting: HashMap::default(),
            in_flight: vec![0; shards],
            next_id: 1,
            actions: Vec::new(),
            held: HashMap::default(),
            stored_wait: HashMap::default(),
            commit_asked: false,
            reading: HashMap::default(),
            groups: HashMap::default(),
            group_names: HashMap::default(),
            group_reads: HashMap::default(),
            groups_saved_ms: 0,
            group_deletes: Vec::new(),
            members: HashMap::default(),
            requests: HashMap::default(),
            replying: HashMap::default(),
            schedules: HashMap::default(),
            schedule_journal: HashMap::default(),
            schedule_fired: HashMap::default(),
            schedule_refire: HashMap::default(),
            asking: HashMap::default(),
            remote_asks: HashMap::default(),
            schedules_arriving: HashMap::default(),
            cluster: None,
            mirrors: HashMap::default(),
            fenced: false,
            taking: HashMap::default(),
            handing: HashMap::default(),
            offered: Default::default(),
            given: HashMap::default(),
            gave: HashMap::default(),
            follows_out: HashMap::default(),
            remote_members: HashMap::default(),
            remote_member_ids: HashMap::default(),
            relayed: HashMap::default(),
            claims: HashMap::default(),
            forwarded: HashMap::default(),
            metrics,
        }
    }

    /// Moves what the shell must carry out into `into` (emptied first).
    pub fn take_actions(&mut self, into: &mut Vec<Action>) {
        into.clear();
        std::mem::swap(into, &mut self.actions);
        into.extend(self.owner.take_durable_moves().into_iter().map(Action::DurableMoved));
    }

    /// A fresh shard-unique id.
    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Whether a publish of `payload_len` bytes to `topic` may be sent to
    /// its owner now; always true when this shard owns it.
    pub fn remote_room(&self, topic: &TopicName, payload_len: usize) -> bool {
        let owner = topic.owner_shard(self.shards);
        owner == self.id
            || self.in_flight[owner] == 0
            || self.in_flight[owner] + payload_len + ITEM_OVERHEAD_BYTES <= self.limits.publish_bytes_in_flight_max
    }

    /// Publishes a message: sequenced at once when this shard owns the
    /// topic, else sent to the owner (even past `remote_room`: the shell
    /// asks first). `reply` is completed here, except a `Caller`'s. On a
    /// durable topic at ack `local`, the answer waits for the commit: a
    /// `Caller` then gets [`Published::Later`].
    pub fn publish(
        &mut self,
        topic: TopicName,
        kind: PayloadKind,
        payload: Bytes,
        options: PublishOptions,
        reply: PublishReply,
        now: Now,
    ) -> Published {
        let owner = topic.owner_shard(self.shards);
        if owner == self.id {
            // Another node's topic, or one being taken over: answered later.
            if self.cluster.is_some() && (self.remote_node(&topic).is_some() || self.needs_hand_off(&topic)) {
                let req = self.next_id();
                self.publish_held(topic, kind, payload, options, Held::Here { reply, req }, now);
                return Published::Later { req };
            }
            let result = self.sequence(&topic, kind, payload, options, now);
            return match result {
                Ok((seq, Some(level))) => {
                    let req = self.next_id();
                    let later = matches!(reply, PublishReply::Caller);
                    self.hold(topic, seq, level, Held::Here { reply, req });
                    if later {
                        Published::Later { req }
                    } else {
                        Published::Now(Ok(seq))
                    }
                }
                Ok((seq, None)) => {
                    self.finish(reply, None, Ok(seq));
                    Published::Now(Ok(seq))
                }
                Err(e) => {
                    self.finish(reply, None, Err(e));
                    Published::Now(Err(e))
                }
            };
        }
        let req = self.next_id();
        let cost = payload.len() + ITEM_OVERHEAD_BYTES;
        self.in_flight[owner] += cost;
        self.waiting.insert(req, Waiting::Publish { reply, owner, cost });
        self.send(owner, Item::Publish { topic, kind, payload, options, req }, now);
        Published::Later { req }
    }

    /// A catch-up read of `topic`'s log (asked by [`Action::ReadLog`])
    /// returned `messages` (in order, within its range; empty when nothing
    /// of it could be read). The subscriber gets them, and: when they reach
    /// what the history holds, the history after them and the subscription
    /// goes live; else it asks again after the last one
    /// ([`Action::CatchUp`]). A range that could not be read is reported
    /// as a gap.
    pub fn log_read(&mut self, topic: &TopicName, id: u64, messages: Vec<Message>, now: Now) {
        if self.group_reads.contains_key(&id) {
            self.group_log_read(id, messages, now);
            return;
        }
        let Some(Reading { from, req, client, range, grant, .. }) = self.reading.remove(&id) else { return };
        let mut messages = messages;
        // Numbers missing at the start of the batch (skipped by a crash, or
        // removed by retention) are a gap; one missing inside it ends the
        // batch there (the next batch starts with it).
        if let Some(i) = messages.windows(2).position(|w| w[1].seq != w[0].seq + 1) {
            messages.truncate(i + 1);
        }
        let after = messages.last().map_or(range.to_seq, |m| m.seq);
        let unread = match messages.first() {
            None => Some(range),
            Some(m) if m.seq > range.from_seq => Some(SeqRange { from_seq: range.from_seq, to_seq: m.seq - 1 }),
            Some(_) => None,
        };
        let resume = Some(ResumeFrom { after_seq: after, epoch: Some(grant.epoch), since_ms: None });
        // What precedes the log and what could not be read: adjacent.
        let before = merge_gaps(resumed_gap(&grant), unread);
        let result = match self.owner.subscribe(topic, from, client, resume, now.at) {
            // Caught up, unless a gap before this batch and one after it
            // would have to be told as one (the batch between them was had).
            Ok(next)
                if next.from_log.is_none()
                    && (before.is_none()
                        || resumed_gap(&next).is_none_or(|g| before.is_some_and(|b| b.to_seq + 1 >= g.from_seq))) =>
            {
                // Caught up: the log's part, then the history's.
                let gap = merge_gaps(before, resumed_gap(&next));
                let resumed = match next.resumed {
                    Resumed::Lost(why) => Resumed::Lost(why),
                    _ => Resumed::Replayed { gap },
                };
                let mut replay = messages;
                replay.extend(next.replay);
                Ok(Grant { replay, resumed, ..next })
            }
            Ok(next) => {
                // More to read: this batch, then the subscriber asks again.
                let gap = before;
                Ok(Grant {
                    last_seq: after,
                    replay: messages,
                    resumed: Resumed::Replayed { gap },
                    from_log: None,
                    more: true,
                    ..next
                })
            }
            Err(e) => Err(e),
        };
        self.send(from, Item::SubscribeDone { topic: topic.clone(), req, result }, now);
    }

    /// Whether subscription request `req` of `topic` is still catching up
    /// (the shell stops waiting for room once it is not).
    pub fn catching_up(&self, topic: &TopicName, req: u64) -> bool {
        let local = self.topics.get(topic).and_then(|&slot| self.slots[slot].as_ref());
        local.is_some_and(|l| l.subs.iter().any(|s| s.pending.is_some_and(|p| p.req == req)))
    }

    /// A subscriber catching up (see [`Action::CatchUp`]) has `room` bytes
    /// free in its queue: ask its owner for the next batch.
    pub fn catch_up(&mut self, topic: &TopicName, req: u64, room: usize, now: Now) {
        let Some(&slot) = self.topics.get(topic) else { return };
        let Some(local) = self.slots[slot].as_ref() else { return };
        let Some(sub) = local.subs.iter().find(|s| s.pending.is_some_and(|p| p.req == req)) else { return };
        let (Some(pending), Some(epoch)) = (sub.pending, local.epoch) else { return };
        let from = Some(ResumeFrom { after_seq: sub.last_seq, epoch: Some(epoch), since_ms: None });
        let owner = topic.owner_shard(self.shards);
        let item = Item::Subscribe { topic: topic.clone(), client: pending.client, from, req, room };
        self.send(owner, item, now);
    }

    /// The records of durable topics appended since the last call, per
    /// topic: one group commit for the shell to write.
    pub fn take_commits(&mut self) -> Vec<TopicCommit> {
        self.commit_asked = false;
        self.owner.take_commits()
    }

    /// A topic's commit is written: its messages are delivered and their
    /// publishers answered.
    pub fn committed(&mut self, commit: &TopicCommit, now: Now) {
        let Some(Released { epoch, subscriber_shards, messages }) = self.owner.written(commit) else { return };
        for message in messages {
            for shard in (0..self.shards).filter(|s| subscriber_shards & (1 << s) != 0) {
                let item = Item::Deliver { topic: commit.topic.clone(), epoch, message: message.clone() };
                self.send(shard, item, now);
            }
            self.offer_to_groups(&commit.topic, &message, now);
        }
        if !self.group_names.is_empty() {
            self.feed_groups_of(&commit.topic, now);
        }
        if !self.schedule_fired.is_empty() {
            self.schedules_fired_written(&commit.topic, commit.through_seq);
        }
        self.answer_held(&commit.topic, commit.through_seq, Ok, now);
    }

    /// `topic`'s segments through `through_seq` are in the object store:
    /// publishers waiting at ack `stored` are answered.
    pub fn stored(&mut self, topic: &TopicName, through_seq: u64, now: Now) {
        for (seq, held) in take_through(&mut self.stored_wait, topic, through_seq) {
            self.answer(held, Ok(seq), now);
        }
    }

    /// Seals the active segment of every topic with publishers waiting at
    /// ack `stored` (the shell calls it every upload interval), so their
    /// segments are uploaded without waiting to fill.
    pub fn seal_for_stored(&mut self) {
        let topics: Vec<TopicName> = self.stored_wait.keys().cloned().collect();
        for topic in topics {
            self.seal(&topic);
        }
    }

    /// Seals `topic`'s active segment at the next commit (for an upload:
    /// a snapshot, or publishers at ack `stored`); false when it holds
    /// nothing unsealed.
    pub fn seal(&mut self, topic: &TopicName) -> bool {
        let sealed = self.owner.seal(topic);
        if sealed {
            self.ask_commit();
        }
        sealed
    }

    /// Asks the shell for a commit pass, once until it takes the commits.
    fn ask_commit(&mut self) {
        if !self.commit_asked {
            self.commit_asked = true;
            self.actions.push(Action::Commit);
        }
    }

    /// Publishes waiting for an upload.
    pub fn stored_waiting(&self) -> usize {
        self.stored_wait.values().map(VecDeque::len).sum()
    }

    /// A topic's commit failed: its held messages (this commit's and any
    /// appended since) are dropped and their publishers told; the topic
    /// takes no more publishes.
    pub fn commit_failed(&mut self, commit: &TopicCommit, now: Now) {
        self.owner.write_failed(commit);
        // Fired schedules whose messages are dropped: to fire again (the
        // topic refuses until a restart, which fires them from the
        // journal; meanwhile a rewrite of the journal keeps them).
        if let Some(fired) = self.schedule_fired.remove(&commit.topic) {
            self.schedule_refire.entry(commit.topic.clone()).or_default().extend(fired);
        }
        // Everything held for the topic: later appends are never written.
        self.answer_held(&commit.topic, u64::MAX, |_| Err(OwnerError::StorageFailed), now);
        if let Some(queue) = self.stored_wait.remove(&commit.topic) {
            for (_, held) in queue {
                self.answer(held, Err(OwnerError::StorageFailed), now);
            }
        }
    }

    /// Answers the held publishes of `topic` through `through_seq`.
    fn answer_held(
        &mut self,
        topic: &TopicName,
        through_seq: u64,
        result: impl Fn(u64) -> Result<u64, OwnerError>,
        now: Now,
    ) {
        for (seq, (level, held)) in take_through(&mut self.held, topic, through_seq) {
            match (level, result(seq)) {
                // Written; now it waits for its segment's upload.
                (AckLevel::Stored, Ok(_)) => self.stored_wait.entry(topic.clone()).or_default().push_back((seq, held)),
                (_, answer) => self.answer(held, answer, now),
            }
        }
    }

    /// Completes a publish's `reply` with `result`: a `Caller` hears of it
    /// as [`Action::Published`] for `req` (when it awaits one), a request
    /// fails on an error.
    fn finish(&mut self, reply: PublishReply, req: Option<u64>, result: Result<u64, OwnerError>) {
        match (&reply, result) {
            (PublishReply::Request { req }, Err(e)) => self.request_refused(*req, e),
            (PublishReply::Request { .. }, Ok(_)) => {}
            _ => {
                if !reply.complete(result) {
                    if let Some(req) = req {
                        self.actions.push(Action::Published { req, result });
                    }
                }
            }
        }
    }

    /// Delivers a held publish's answer.
    fn answer(&mut self, held: Held, result: Result<u64, OwnerError>, now: Now) {
        match held {
            Held::Here { reply, req } => self.finish(reply, Some(req), result),
            Held::There { from, req } => self.send(from, Item::PublishDone { req, result }, now),
            Held::Schedule { topic, scheduled } => {
                if let Err(e) = result {
                    tracing::debug!(topic = topic.as_str(), id = scheduled.id, "a forwarded schedule kept again: {e}");
                    self.schedule_again(&topic, *scheduled);
                }
            }
        }
    }

    /// Keeps a publish's answer until its topic's commit (and, at ack
    /// `stored`, its upload).
    fn hold(&mut self, topic: TopicName, seq: u64, level: AckLevel, held: Held) {
        self.held.entry(topic).or_default().push_back((seq, (level, held)));
    }

    /// Subscribes a connection of this shard. Live at once when the topic
    /// is live here and `from` is `None`; otherwise asks the owner, which
    /// answers with the resume's replay. With `reply_id`, the native ok reply is queued before any
    /// message.
    pub fn subscribe(&mut self, request: SubscribeRequest, now: Now) -> Subscription {
        let SubscribeRequest { topic, out, client, format, from, reply_id } = request;
        let sub_id = self.next_id();
        let local = self.local_topic(&topic);
        let live = local.subs.iter().any(|s| s.pending.is_none());
        // Live on this shard already and no resume asked for: the local
        // topic's position is the subscriber's, no owner to ask.
        let live_epoch = match (live, from, local.epoch) {
            (true, None, Some(epoch)) => Some(epoch),
            _ => None,
        };
        let last_seq = if live_epoch.is_some() { local.last_seq } else { 0 };
        let since_ms = from.and_then(|f| f.since_ms);
        let pending =
            live_epoch.is_none().then_some(Pending { req: sub_id, reply_id, client, reported: false, since_ms });
        if let (Some(epoch), Some(id)) = (live_epoch, reply_id) {
            out.offer_control(if format == Format::Link {
                followed_frame(&topic, epoch, last_seq)
            } else {
                native::reply_ok(
                    id,
                    serde_json::json!({ "topic": topic.as_str(), "epoch": epoch.to_string(), "last_seq": last_seq }),
                )
            });
        }
        // What a catch-up's first batch may bring: the queue's free room.
        let room = out.room();
        local.subs.push(Subscriber { id: sub_id, out, format, last_seq, pending });
        // Another node following the topic is not a subscriber here: its
        // subscribers count on their own node.
        if format != Format::Link {
            metrics::add(&self.metrics.subscriptions_current, 1);
        }
        if let Some(epoch) = live_epoch {
            return Subscription::Live(Granted { sub_id, epoch, last_seq, resumed: Resumed::Live });
        }
        let req = sub_id;
        self.waiting.insert(req, Waiting::Subscribe);
        let owner = topic.owner_shard(self.shards);
        self.send(owner, Item::Subscribe { topic, client, from, req, room }, now);
        Subscription::Pending { req, sub_id }
    }

    /// Removes a subscription; the last one on this shard tells the owner.
    pub fn unsubscribe(&mut self, topic: &TopicName, sub_id: u64, now: Now) {
        let Some(&slot) = self.topics.get(topic) else { return };
        let Some(local) = self.slots[slot].as_mut() else { return };
        if let Some(at) = local.subs.iter().position(|s| s.id == sub_id) {
            let sub = local.subs.remove(at);
            // Drops it left unreported are about a topic the connection
            // left (and may meet again in another epoch): never told.
            sub.out.forget_missed(topic);
            if let Some(pending) = sub.pending {
                self.waiting.remove(&pending.req);
            }
            if sub.format != Format::Link {
                metrics::sub(&self.metrics.subscriptions_current, 1);
            }
        }
        if local.subs.is_empty() {
            self.free_local(slot);
            let owner = topic.owner_shard(self.shards);
            self.send(owner, Item::Unsubscribe { topic: topic.clone() }, now);
        }
    }

    /// Handles an item from shard `from` (possibly this one).
    pub fn handle(&mut self, from: usize, item: Item, now: Now) {
        match item {
            Item::Publish { topic, kind, payload, options, req } => {
                self.publish_held(topic, kind, payload, options, Held::There { from, req }, now);
            }
            // Whatever makes or reads a topic's owned state waits for its
            // hand-off (else it would make the topic anew here, and the
            // state, history and schedules handed over later would find
            // it owned).
            Item::Subscribe { ref topic, .. }
            | Item::GroupJoin { ref topic, .. }
            | Item::ScheduleAsk { ref topic, .. }
            | Item::GroupDelete { ref topic, .. }
                if self.needs_hand_off(topic) =>
            {
                let topic = topic.clone();
                self.take_over_item(from, &topic, item, now);
            }
            // A member's leave and settles wait with its join, in order: a
            // leave handled before the join it follows left a member that
            // no longer existed holding deliveries (found by the topology
            // simulation once it had group members). Not a member of a group
            // on another node: those go there at once (below).
            Item::GroupLeave { ref topic, sub, .. } | Item::GroupSettle { ref topic, sub, .. }
                if self.needs_hand_off(topic) && !self.is_remote_member(from, sub) =>
            {
                let topic = topic.clone();
                self.take_over_item(from, &topic, item, now);
            }
            Item::Claim { topic, version, node, at, req } => {
                self.answer_claim(from, topic, version, node, at, req, now)
            }
            Item::HandOffAnswer { req, topic, state } => self.claim_answered(req, topic, state, now),
            Item::HandOffReturned { topic, state } => self.hand_off_returned(topic, state, now),
            Item::Offer { topic } => self.offered_here(topic, now),
            Item::Subscribe { ref topic, .. } if !self.mirror_live(topic) && self.remote_node(topic).is_some() => {
                if let Some(node) = self.remote_node(topic) {
                    self.mirror_subscribe(node, from, item);
                }
            }
            Item::GroupJoin { topic, group, sub, prefetch, settings, dead_letter }
                if self.remote_node(&topic).is_some() =>
            {
                if let Some(node) = self.remote_node(&topic) {
                    self.forward_group_join(node, from, topic, group, sub, prefetch, settings, dead_letter);
                }
            }
            Item::GroupLeave { sub, .. } if self.is_remote_member(from, sub) => {
                self.forward_group_op(from, sub, crate::link::GroupLink::Leave);
            }
            Item::GroupSettle { sub, settle, .. } if self.is_remote_member(from, sub) => {
                self.forward_group_op(from, sub, crate::link::GroupLink::Settle(settle));
            }
            Item::ScheduleAsk { topic, ask, req } if self.remote_node(&topic).is_some() => {
                if let Some(node) = self.remote_node(&topic) {
                    self.forward_ask(node, from, req, topic, crate::link::OwnerAsk::Schedule(ask), now);
                }
            }
            Item::GroupDelete { topic, group, req } if self.remote_node(&topic).is_some() => {
                if let Some(node) = self.remote_node(&topic) {
                    let ask = crate::link::OwnerAsk::GroupDelete { group: group.to_string() };
                    self.forward_ask(node, from, req, topic, ask, now);
                }
            }
            Item::Subscribe { topic, client, from: resume, req, room } => {
                match self.owner.subscribe(&topic, from, client, resume, now.at) {
                    Ok(grant) if grant.from_log.is_some() => {
                        let range = grant.from_log.unwrap_or(SeqRange { from_seq: 0, to_seq: 0 });
                        let id = self.next_id();
                        let reading = Reading { topic: topic.clone(), from, req, client, range, grant };
                        self.reading.insert(id, reading);
                        let read =
                            LogRead { id, topic, from_seq: range.from_seq, to_seq: range.to_seq, max_bytes: room };
                        self.actions.push(Action::ReadLog(read));
                    }
                    result => self.send(from, Item::SubscribeDone { topic, req, result }, now),
                }
            }
            Item::Unsubscribe { topic } => {
                // A catch-up read for a shard that left: its answer would
                // register the shard again.
                self.reading.retain(|_, r| r.from != from || r.topic != topic);
                self.owner.unsubscribe(&topic, from, now.at);
                self.mirror_unsubscribed(from, &topic);
            }
            Item::Deliver { topic, epoch, message } => self.deliver(&topic, epoch, message),
            Item::Restarted { topic, epoch, last_seq } => self.restarted(&topic, epoch, last_seq),
            Item::Gap { topic, epoch, gap } => self.gap(&topic, epoch, gap),
            item @ (Item::GroupJoin { .. }
            | Item::GroupJoined { .. }
            | Item::GroupLeave { .. }
            | Item::GroupSettle { .. }
            | Item::GroupDelete { .. }
            | Item::GroupLost { .. }
            | Item::GroupDeliver { .. }) => self.handle_group(from, item, now),
            item @ (Item::Reply { .. } | Item::ReplyDone { .. }) => self.handle_reply(from, item, now),
            Item::ScheduleAsk { topic, ask, req } => self.handle_schedule_ask(from, topic, ask, req, now),
            Item::OwnerAnswer { req, answer } => self.owner_answered(req, answer),
            Item::SubscribeDone { topic, req, result } => self.granted(&topic, req, result, now),
            Item::PublishDone { req, result } => {
                if let Some(Waiting::Publish { reply, owner, cost }) = self.waiting.remove(&req) {
                    self.in_flight[owner] -= cost;
                    self.actions.push(Action::Room);
                    self.finish(reply, Some(req), result);
                }
            }
        }
    }

    /// Fans out the next topic with deliveries waiting: each message framed
    /// once per format in use and offered to every live subscriber that has
    /// not had it. False when no topic was waiting.
    pub fn fan_out_next(&mut self) -> bool {
        let Some(slot) = self.dirty.pop_front() else { return false };
        let Some(local) = self.slots[slot].as_mut() else { return true };
        local.dirty = false;
        let mut bytes = 0;
        for message in local.fill.drain(..) {
            bytes += message.payload.len();
            let mut frames: [Option<Rc<Frame>>; 4] = [None, None, None, None];
            for sub in local.subs.iter_mut().filter(|s| s.pending.is_none() && message.seq > s.last_seq) {
                let frame = frames[sub.format as usize].get_or_insert_with(|| {
                    Frame::data(encode(sub.format, &local.name, &message), message.published_at)
                });
                let offer = sub.out.offer_data(frame, &local.name, message.seq);
                offered(&mut self.actions, &self.metrics, &sub.out, offer);
                sub.last_seq = message.seq;
            }
        }
        self.fanout_pending_bytes -= bytes;
        true
    }

    /// Whether some topic has deliveries waiting for [`Broker::fan_out_next`].
    pub fn has_fan_out(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Payload bytes delivered here and not yet fanned out.
    pub fn fanout_pending_bytes(&self) -> usize {
        self.fanout_pending_bytes
    }

    /// The topics this shard owns.
    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    /// Local subscriber counts of the first `query.limit` local topics
    /// that match it, in name order.
    pub fn local_subscribers(&self, query: &TopicQuery) -> Vec<(String, u64)> {
        let matching = self.slots.iter().flatten().filter(|t| query.matches(t.name.as_str())).collect();
        let page = query.first_page(matching, |t| t.name.as_str());
        let subscribers = |t: &LocalTopic| t.subs.iter().filter(|s| s.format != Format::Link).count() as u64;
        page.iter().map(|t| (t.name.as_str().to_string(), subscribers(t))).collect()
    }

    /// Bytes of publishes in flight to each owner shard.
    pub fn in_flight_bytes(&self) -> &[usize] {
        &self.in_flight
    }

    /// A publish on the topic's owner shard, answered through `held`:
    /// forwarded when another node owns the topic, held while it is being
    /// taken over, else sequenced.
    fn publish_held(
        &mut self,
        topic: TopicName,
        kind: PayloadKind,
        payload: Bytes,
        options: PublishOptions,
        held: Held,
        now: Now,
    ) {
        if let Some(node) = self.remote_node(&topic) {
            self.forward(node, topic, kind, payload, options, held);
            return;
        }
        if self.needs_hand_off(&topic) {
            let pending = handoff::Pending::Publish { topic: topic.clone(), kind, payload, options, held };
            self.take_over(&topic, pending, now);
            return;
        }
        match self.sequence(&topic, kind, payload, options, now) {
            Ok((seq, Some(level))) => self.hold(topic, seq, level, held),
            Ok((seq, None)) => self.answer(held, Ok(seq), now),
            Err(e) => self.answer(held, Err(e), now),
        }
    }

    /// Sequences a message on this (owner) shard and routes it to every
    /// subscribing shard; a durable topic's is held for its commit. With
    /// the level the answer waits for, if it waits (held, at ack `local` or
    /// `stored`).
    fn sequence(
        &mut self,
        topic: &TopicName,
        kind: PayloadKind,
        payload: Bytes,
        options: PublishOptions,
        now: Now,
    ) -> Result<(u64, Option<AckLevel>), OwnerError> {
        let len = payload.len() as u64;
        // In a cluster only (a single node pays nothing here): a fenced node
        // sequences nothing, and another node's topic, or this node's copy
        // of one (given up at a topology change), is never sequenced here.
        if self.cluster.is_some() {
            if self.is_fenced() {
                return Err(OwnerError::NotMember);
            }
            if self.remote_node(topic).is_some() || self.owner.is_copy(topic) {
                return Err(OwnerError::OwnedElsewhere);
            }
        }
        if !self.groups_have_room(topic, payload.len()) {
            return Err(OwnerError::GroupFull);
        }
        if options.reply_to.is_some() && !self.has_responders(topic) {
            return Err(OwnerError::NoResponders);
        }
        let Sequenced { message, epoch, subscriber_shards, held } =
            self.owner.publish(topic, kind, payload, &options, now)?;
        let ack = options.ack;
        metrics::add(&self.metrics.messages_published, 1);
        metrics::add(&self.metrics.bytes_published, len);
        let seq = message.seq;
        if let Some(default) = held {
            self.ask_commit();
            let level = ack.unwrap_or(default);
            return Ok((seq, (level != AckLevel::None).then_some(level)));
        }
        for shard in (0..self.shards).filter(|s| subscriber_shards & (1 << s) != 0) {
            self.send(shard, Item::Deliver { topic: topic.clone(), epoch, message: message.clone() }, now);
        }
        self.offer_to_groups(topic, &message, now);
        Ok((seq, None))
    }

    /// The topics this shard owns, to declare or recover durable ones.
    pub fn owner_mut(&mut self) -> &mut Owner {
        &mut self.owner
    }

    /// Routes an item: handled at once for this shard, else an action.
    fn send(&mut self, to: usize, item: Item, now: Now) {
        if to == self.id {
            self.handle(to, item, now);
        } else {
            self.actions.push(Action::Send { to, item });
        }
    }

    /// Appends a delivery to its local topic's fill buffer. A delivery
    /// from another sequence space than the one this shard's subscribers
    /// were granted, or before any grant, is stale: it was sent before this
    /// shard last left the topic, which may since have been made anew (its
    /// numbers would then shadow the new ones). A grant covers everything
    /// sequenced before it, so nothing live is lost.
    fn deliver(&mut self, topic: &TopicName, epoch: Epoch, message: Message) {
        let Some(&slot) = self.topics.get(topic) else { return };
        let Some(local) = self.slots[slot].as_mut() else { return };
        if local.epoch != Some(epoch) || message.seq <= local.last_seq {
            return;
        }
        local.last_seq = message.seq;
        self.fanout_pending_bytes += message.payload.len();
        local.fill.push(message);
        if !local.dirty {
            local.dirty = true;
            if self.dirty.is_empty() {
                self.actions.push(Action::FanOut);
            }
            self.dirty.push_back(slot);
        }
    }

    /// The topic's sequence space changed under its live subscribers (see
    /// [`Item::Restarted`]): each is told (a native `lost` notice; a raw
    /// socket closes with 4011 as a resume into another epoch would, and so
    /// does another node's link following it; the original API, which has
    /// no numbers, just goes on) and gets what follows in the new space.
    fn restarted(&mut self, topic: &TopicName, epoch: Epoch, last_seq: u64) {
        let Some(&slot) = self.topics.get(topic) else { return };
        let Some(local) = self.slots[slot].as_mut() else { return };
        if local.epoch == Some(epoch) {
            return;
        }
        local.epoch = Some(epoch);
        local.last_seq = last_seq;
        self.fanout_pending_bytes -= local.fill.iter().map(|m| m.payload.len()).sum::<usize>();
        local.fill.clear();
        for sub in local.subs.iter_mut().filter(|s| s.pending.is_none()) {
            sub.last_seq = last_seq;
            match sub.format {
                Format::Native => {
                    sub.out.offer_control(native::lost_notice(topic, epoch, last_seq));
                }
                Format::Raw => {
                    let reason = format!(
                        "history lost (epoch_changed): epoch is now {epoch}, last seq {last_seq}; resume from there"
                    );
                    sub.out.close(CLOSE_HISTORY_LOST, &reason);
                }
                // A node following this copy follows again, meeting the new
                // space (message frames carry no epoch: it drops what comes
                // until its new follow is answered).
                Format::Link => {
                    let frame = crate::link::LinkFrame::Restart { topic: topic.clone() };
                    sub.out.offer_control(ws::encode_data(PayloadKind::Binary, &crate::link::encode(&frame)));
                }
                Format::Legacy => {}
            }
        }
    }

    /// A copy's owner could not send `gap` (see [`Item::Gap`]): what this
    /// shard queued before it goes out first, then each live subscriber
    /// still behind it is told (a native `gap` notice; a raw socket closes
    /// as a resume across it would; a following node gets a gap frame).
    fn gap(&mut self, topic: &TopicName, epoch: Epoch, gap: SeqRange) {
        let behind = self
            .topics
            .get(topic)
            .and_then(|&s| self.slots[s].as_ref())
            .is_some_and(|local| local.epoch == Some(epoch) && local.last_seq < gap.to_seq);
        if !behind {
            return;
        }
        while self.fan_out_next() {}
        let Some(&slot) = self.topics.get(topic) else { return };
        let Some(local) = self.slots[slot].as_mut() else { return };
        local.last_seq = gap.to_seq;
        for sub in local.subs.iter_mut().filter(|s| s.pending.is_none() && s.last_seq < gap.to_seq) {
            let told = SeqRange { from_seq: gap.from_seq.max(sub.last_seq + 1), to_seq: gap.to_seq };
            sub.last_seq = gap.to_seq;
            tell_gap(&sub.out, sub.format, topic, told);
        }
    }

    /// Applies the owner's answer to the pending subscriber `req`: queue the
    /// native reply, then the replay, then go live; or remove it.
    fn granted(&mut self, topic: &TopicName, req: u64, result: Result<Grant, OwnerError>, now: Now) {
        let more = result.as_ref().is_ok_and(|g| g.more);
        let present = if more { self.waiting.contains_key(&req) } else { self.waiting.remove(&req).is_some() };
        if !present {
            return; // the subscriber left before the answer
        }
        let slot = self.topics.get(topic).copied();
        let local = slot.and_then(|s| self.slots[s].as_mut());
        let Some(local) = local else { return };
        let Some(at) = local.subs.iter().position(|s| s.pending.is_some_and(|p| p.req == req)) else { return };
        let grant = match result {
            Ok(grant) => grant,
            Err(e) => {
                let sub_id = local.subs[at].id;
                self.unsubscribe(topic, sub_id, now);
                self.actions.push(Action::Subscribed { req, result: Err(e) });
                return;
            }
        };
        if local.epoch != Some(grant.epoch) {
            // The first grant of this local topic: its sequence space.
            local.epoch = Some(grant.epoch);
            local.last_seq = grant.last_seq;
        }
        local.last_seq = local.last_seq.max(grant.last_seq);
        let sub = &mut local.subs[at];
        let Some(pending) = sub.pending else { return };
        if let Some(id) = pending.reply_id {
            sub.out.offer_control(if sub.format == Format::Link {
                followed_frame(topic, grant.epoch, grant.last_seq)
            } else {
                native::reply_ok(id, grant_reply(topic, &grant))
            });
        }
        // A later batch of a catch-up tells what it cannot get where it
        // falls: before this batch's messages or after them.
        // The first batch's gap is in the grant's reply, except on a node
        // link, whose answer (`Followed`) has no room for it: told there as
        // a gap frame, before the replay's messages, as later batches' are.
        let gap = if pending.reported || sub.format == Format::Link { resumed_gap(&grant) } else { None };
        let first = grant.replay.first().map(|m| m.seq);
        let (gap_before, gap_after) = match gap {
            Some(g) if first.is_none_or(|f| g.to_seq < f) => (Some(g), None),
            g => (None, g),
        };
        if let Some(g) = gap_before {
            if !tell_gap(&sub.out, sub.format, topic, g) {
                return;
            }
        }
        // A replay stops where the queue is full (a catch-up batch is
        // sized in log bytes, framing adds to it): the rest comes in the
        // next batch, never through the slow-consumer policy.
        let mut last_offered = None;
        for message in &grant.replay {
            if pending.since_ms.is_some_and(|ms| message.timestamp_ms < ms) {
                last_offered = Some(message.seq); // before the start asked for: skipped, not lost
                continue;
            }
            // A replay's latency counts from now: its messages' publish
            // times would measure how old the history is, not the node.
            let frame = Frame::data(encode(sub.format, topic, message), now.at);
            if last_offered.is_some() && !sub.out.has_room_for(frame.bytes.len()) {
                break;
            }
            let offer = sub.out.offer_data(&frame, topic, message.seq);
            offered(&mut self.actions, &self.metrics, &sub.out, offer);
            last_offered = Some(message.seq);
        }
        let cut = last_offered.is_some_and(|seq| seq != grant.replay.last().map_or(seq, |m| m.seq));
        if let Some(g) = gap_after.filter(|_| !cut) {
            if !tell_gap(&sub.out, sub.format, topic, g) {
                return;
            }
        }
        let more = more || cut;
        sub.last_seq = if cut { last_offered.unwrap_or(grant.last_seq) } else { grant.last_seq };
        let granted = Granted { sub_id: sub.id, epoch: grant.epoch, last_seq: grant.last_seq, resumed: grant.resumed };
        if more {
            if cut {
                self.waiting.insert(req, Waiting::Subscribe);
            }
            sub.pending = Some(Pending { reply_id: None, reported: true, ..pending });
            self.actions.push(Action::CatchUp { topic: topic.clone(), req, out: sub.out.clone() });
        } else {
            sub.pending = None;
        }
        if !pending.reported {
            self.actions.push(Action::Subscribed { req, result: Ok(granted) });
        }
    }

    /// `topic`'s local state, made (in a free slot if there is one) if missing.
    fn local_topic(&mut self, topic: &TopicName) -> &mut LocalTopic {
        let slot = match self.topics.get(topic) {
            Some(&slot) => slot,
            None => {
                let slot = self.free.pop().unwrap_or_else(|| {
                    self.slots.push(None);
                    self.slots.len() - 1
                });
                self.topics.insert(topic.clone(), slot);
                slot
            }
        };
        self.slots[slot].get_or_insert_with(|| LocalTopic {
            name: topic.clone(),
            last_seq: 0,
            epoch: None,
            subs: Vec::new(),
            fill: Vec::new(),
            dirty: false,
        })
    }

    /// Frees a local topic's slot, with any deliveries it still held.
    fn free_local(&mut self, slot: usize) {
        if let Some(local) = self.slots[slot].take() {
            self.topics.remove(&local.name);
            self.fanout_pending_bytes -= local.fill.iter().map(|m| m.payload.len()).sum::<usize>();
            // A stale entry in `dirty` finds the slot empty, or reused by a
            // topic whose own deliveries it then fans out early: harmless.
            self.free.push(slot);
        }
    }
}

/// Takes the entries of `topic`'s queue with sequence <= `through_seq`,
/// forgetting a queue left empty.
fn take_through<T>(queues: &mut BySeq<T>, topic: &TopicName, through_seq: u64) -> Vec<(u64, T)> {
    let Some(queue) = queues.get_mut(topic) else { return Vec::new() };
    let n = queue.partition_point(|(seq, _)| *seq <= through_seq);
    let done = queue.drain(..n).collect();
    if queue.is_empty() {
        queues.remove(topic);
    }
    done
}

/// Tells a subscriber catching up that it cannot get `gap`: a notice on
/// the native protocol; a raw socket closes as its resume would have (its
/// client resumes after the gap). False when the connection closes.
fn tell_gap(out: &Outbound, format: Format, topic: &TopicName, gap: SeqRange) -> bool {
    if format == Format::Link {
        let frame = crate::link::LinkFrame::Gap { topic: topic.clone(), from_seq: gap.from_seq, to_seq: gap.to_seq };
        out.offer_control(ws::encode_data(PayloadKind::Binary, &crate::link::encode(&frame)));
        return true;
    }
    if format == Format::Native {
        out.offer_control(native::gap_notice(topic, gap.from_seq, gap.to_seq));
        return true;
    }
    let reason =
        format!("history gap: {}..={} cannot be had; resume with from={}", gap.from_seq, gap.to_seq, gap.to_seq);
    out.close(ws::close_code::HISTORY_GAP, &reason);
    false
}

/// The gap a grant reports, if any.
fn resumed_gap(grant: &Grant) -> Option<SeqRange> {
    match grant.resumed {
        Resumed::Replayed { gap } => gap,
        _ => None,
    }
}

/// The smallest range covering both (only ever called with adjacent
/// ranges, or with one of them absent).
fn merge_gaps(a: Option<SeqRange>, b: Option<SeqRange>) -> Option<SeqRange> {
    match (a, b) {
        (Some(a), Some(b)) => Some(SeqRange { from_seq: a.from_seq.min(b.from_seq), to_seq: a.to_seq.max(b.to_seq) }),
        (a, b) => a.or(b),
    }
}

/// Counts an offer and lists a direct-mode queue for the next flush.
fn offered(actions: &mut Vec<Action>, metrics: &Metrics, out: &Rc<Outbound>, offer: Offer) {
    match offer {
        Offer::Queued | Offer::Closed => {}
        Offer::Flush => actions.push(Action::Flush(out.clone())),
        Offer::Dropped => metrics::add(&metrics.messages_dropped, 1),
        Offer::Disconnected => {
            metrics::add(&metrics.slow_consumer_disconnects, 1);
            tracing::warn!("slow consumer disconnected (send queue over its cap)");
        }
    }
}

/// The native subscribe reply's fields: where the topic stands, and what of
/// the resume cannot be had (`gap`: evicted from history; `lost`: another
/// sequence space, nothing after `from_seq` can be recovered).
fn grant_reply(topic: &TopicName, grant: &Grant) -> serde_json::Value {
    let mut extra = serde_json::json!({
        "topic": topic.as_str(),
        "epoch": grant.epoch.to_string(),
        "last_seq": grant.last_seq,
        "first_seq": grant.first_seq,
    });
    match grant.resumed {
        Resumed::Live | Resumed::Replayed { gap: None } => {}
        Resumed::Replayed { gap: Some(gap) } => {
            extra["gap"] = serde_json::json!({ "from_seq": gap.from_seq, "to_seq": gap.to_seq });
        }
        Resumed::Lost(why) => extra["lost"] = serde_json::json!({ "reason": why.as_str() }),
    }
    extra
}

/// Close code of a raw socket whose topic's sequence space changed (as
/// for a resume into another epoch).
const CLOSE_HISTORY_LOST: u16 = 4011;

/// A node link's answer to a follow that went live.
fn followed_frame(topic: &TopicName, epoch: Epoch, last_seq: u64) -> Bytes {
    let frame = crate::link::LinkFrame::Followed { topic: topic.clone(), result: Ok((epoch, last_seq)) };
    ws::encode_data(PayloadKind::Binary, &crate::link::encode(&frame))
}

/// Frames a message for a subscriber format.
fn encode(format: Format, topic: &TopicName, message: &Message) -> Bytes {
    match format {
        Format::Raw => ws::encode_data(message.kind, &message.payload),
        Format::Legacy => ws::encode_data(PayloadKind::Binary, &message.payload),
        Format::Native => native::encode_message(topic, message),
        Format::Link => ws::encode_data(PayloadKind::Binary, &crate::link::encode_message(topic, message)),
    }
}
