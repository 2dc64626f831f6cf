//! A shard: one pinned executor's share of the node, and the only place
//! where shards meet.
//!
//! Each shard owns (a) the topics that hash to it (`Owner`: sequencing and
//! history), (b) a `LocalTopic` for every topic with subscribers on its
//! connections, (c) one outbox per peer shard. State is `Rc`/`RefCell`
//! inside the shard; shards exchange only batches of [`Item`] over the
//! bounded SPSC channels of glommio's channel mesh.
//!
//! Tasks per shard: one ingress task per peer channel, one flusher per peer
//! outbox, one fan-out task that drains dirty topics' dual buffers into
//! connection queues, plus the accept loop and connections (see `server`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use glommio::channels::channel_mesh::Senders;
use glommio::channels::shared_channel::ConnectedReceiver;
use glommio::sync::{Semaphore, StaticPermit};

use crate::config::Config;
use crate::fdpass::Links;
use crate::limits::{
    ADMIN_CONNECTIONS_RESERVED, FANOUT_PENDING_BYTES_MAX, ITEM_OVERHEAD_BYTES, OUTBOX_BYTES_MAX, READ_SCRATCH_BYTES,
    REMOTE_PUBLISH_BYTES_IN_FLIGHT_MAX, WRITE_BATCH_BYTES_MAX,
};
use crate::message::{Message, PayloadKind};
use crate::metrics::{self, LatencyTally, Metrics, ShardStats};
use crate::native;
use crate::outbound::{Frame, Offer, Outbound};
use crate::owner::{Epoch, Grant, Owner, OwnerError, OwnerLimits, ResumeFrom, Resumed};
use crate::sync::{Event, Slot};
use crate::topic::{TopicName, TopicQuery};
use crate::ws;

/// What crosses between shards, always inside a batch (`Vec<Item>`).
#[derive(Debug)]
pub enum Item {
    /// Sequence this message (to the owner).
    Publish { topic: TopicName, kind: PayloadKind, payload: Bytes, req: u64 },
    /// The owner's answer to `Publish`: the assigned sequence.
    PublishDone { req: u64, result: Result<u64, OwnerError> },
    /// Register the sending shard for a topic (to the owner).
    Subscribe { topic: TopicName, client: std::net::IpAddr, from: Option<ResumeFrom>, req: u64 },
    /// The owner's answer to `Subscribe`.
    SubscribeDone { topic: TopicName, req: u64, result: Result<Grant, OwnerError> },
    /// The sending shard has no subscribers left for a topic (to the owner).
    Unsubscribe { topic: TopicName },
    /// A sequenced message for the receiving shard's subscribers.
    Deliver { topic: TopicName, message: Message },
    /// Ask for a stats snapshot, with the topics a listing wants.
    StatsRequest { req: u64, topics: Option<TopicQuery> },
    /// A stats snapshot.
    StatsReply { req: u64, stats: Box<ShardStats> },
    /// A connection accepted elsewhere, for the receiving shard to serve.
    Handoff(Box<Handoff>),
}

/// A topic socket handed to the shard that owns its topic, between its
/// request head and the 101 (see `Config::topic_sockets`). The socket
/// itself travels beside it, over the hand-off link (`fdpass`), as record
/// `seq`. Dropping it closes the connection.
#[derive(Debug)]
pub struct Handoff {
    /// The socket's record number on the link from the sending shard.
    pub seq: u64,
    /// Bytes read after the request head.
    pub buf: Vec<u8>,
    /// The parsed request head.
    pub head: crate::http::RequestHead,
    /// The address the node attributes the connection to.
    pub client: std::net::SocketAddr,
    /// The connection's place in the node's count, released if the hand-off
    /// is dropped on the way (shutdown).
    pub node: NodeConnection,
}

/// A hand-off whose socket has arrived, for the adopter task.
#[derive(Debug)]
pub struct Adoption {
    /// The socket, in this shard's descriptor table.
    pub fd: std::os::fd::OwnedFd,
    /// Everything else the accepting shard knew.
    pub handoff: Handoff,
}

/// A place in one of the node-wide connection counts of [`NodeShared`];
/// dropping it gives the place back.
#[derive(Debug)]
struct Place {
    /// Holds the counts.
    node: Arc<NodeShared>,
    /// Which count the place is in.
    count: fn(&NodeShared) -> &AtomicUsize,
}

impl Place {
    /// Takes a place if the count is below `max`.
    fn take(node: &Arc<NodeShared>, count: fn(&NodeShared) -> &AtomicUsize, max: usize) -> Option<Place> {
        if count(node).fetch_add(1, Ordering::AcqRel) >= max {
            count(node).fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Place { node: node.clone(), count })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        (self.count)(&self.node).fetch_sub(1, Ordering::AcqRel);
    }
}

/// One connection's place in the node-wide count (`NodeShared::connections`),
/// taken at accept; dropping it gives the place back.
#[derive(Debug)]
pub struct NodeConnection {
    /// Held for its drop.
    _place: Place,
}

impl NodeConnection {
    /// Takes a place if fewer than `max` connections are open on the node.
    pub fn take(node: &Arc<NodeShared>, max: usize) -> Option<NodeConnection> {
        Place::take(node, |n| &n.connections, max).map(|place| NodeConnection { _place: place })
    }
}

/// A place among the connections admitted at the limit for health,
/// readiness and metrics only (`NodeShared::admin_connections`).
#[derive(Debug)]
pub struct AdminConnection {
    /// Held for its drop.
    _place: Place,
}

impl AdminConnection {
    /// Takes a place if fewer than `ADMIN_CONNECTIONS_RESERVED` are in use.
    pub fn take(node: &Arc<NodeShared>) -> Option<AdminConnection> {
        Place::take(node, |n| &n.admin_connections, ADMIN_CONNECTIONS_RESERVED)
            .map(|place| AdminConnection { _place: place })
    }
}

impl Item {
    fn cost_bytes(&self) -> usize {
        ITEM_OVERHEAD_BYTES
            + match self {
                Item::Publish { payload, .. } => payload.len(),
                Item::Deliver { message, .. } => message.payload.len(),
                Item::SubscribeDone { result: Ok(g), .. } => g.replay.iter().map(|m| m.payload.len()).sum(),
                Item::Handoff(h) => h.buf.len(),
                _ => 0,
            }
    }
}

/// A batch: what one channel send carries.
pub type Batch = Vec<Item>;

/// Process-wide flags, shared by every shard and the signal thread.
#[derive(Debug, Default)]
pub struct NodeShared {
    /// Whether `/readyz` answers 200.
    pub ready: AtomicBool,
    /// Set by the signal thread on SIGTERM/SIGINT.
    pub shutdown: AtomicBool,
    /// Client connections open on the node, every shard together (checked
    /// against `connections_max` at accept; a hand-off moves a connection
    /// between shards without changing it).
    pub connections: AtomicUsize,
    /// Connections admitted over `connections_max` for a health, readiness
    /// or metrics request (see `ADMIN_CONNECTIONS_RESERVED`).
    pub admin_connections: AtomicUsize,
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

/// A subscription waiting for its owner's grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    /// The request id the grant answers.
    req: u64,
    /// The native request id to answer first, if any.
    reply_id: Option<u64>,
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

/// A topic with subscribers on this shard. Lives on this shard only.
///
/// The dual buffer: ingress (deliveries from the owner) appends to `fill`;
/// the fan-out task swaps `fill` and `drain` and writes the `drain` side
/// into subscriber queues. The two sides are separate `RefCell`s, so a
/// delivery arriving while a fan-out pass runs never waits for it, and the
/// two vectors keep their capacity, so steady state allocates nothing.
#[derive(Debug)]
struct LocalTopic {
    /// Topic name.
    name: TopicName,
    /// Last sequence received by this shard for this topic.
    last_seq: Cell<u64>,
    /// The topic's sequence space, once a grant told this shard.
    epoch: Cell<Option<Epoch>>,
    /// Subscribers, in subscription order.
    subs: RefCell<Vec<Subscriber>>,
    /// Side being filled by ingress.
    fill: RefCell<Vec<Message>>,
    /// Side being drained by fan-out.
    drain: RefCell<Vec<Message>>,
    /// Whether the topic is in the shard's dirty list.
    dirty: Cell<bool>,
}

/// An outbox toward one peer shard.
#[derive(Debug, Default)]
struct Outbox {
    /// Items waiting for the next batch.
    items: RefCell<Vec<Item>>,
    /// Cost of `items` plus the batch in flight.
    bytes: Cell<usize>,
    /// Wakes the flusher.
    wake: Event,
}

/// Where the owner's answer to a pipelined publish goes. Pipelined
/// publishes let one connection have many publishes in flight (ordering is
/// kept by the FIFO channel to the owner), so a publisher on one shard is not
/// limited to one cross-shard round trip per message.
#[derive(Debug)]
pub enum PublishDone {
    /// Nothing to say on success; close the connection (1013) on error. Raw
    /// topic sockets, whose protocol has no replies.
    CloseOnError(Rc<Outbound>),
    /// Queue the native reply for request `id`.
    NativeReply { out: Rc<Outbound>, id: u64 },
    /// Hand the result to a task that awaits it (HTTP publishes).
    Await(Slot<Result<u64, OwnerError>>),
}

impl PublishDone {
    fn complete(self, result: Result<u64, OwnerError>) {
        match (self, result) {
            (PublishDone::CloseOnError(_), Ok(_)) => {}
            (PublishDone::CloseOnError(out), Err(e)) => out.close(ws::close_code::TRY_AGAIN_LATER, &e.to_string()),
            (PublishDone::NativeReply { out, id }, Ok(seq)) => {
                out.offer_control(native::reply_ok(id, serde_json::json!({ "seq": seq })));
            }
            (PublishDone::NativeReply { out, id }, Err(e)) => {
                out.offer_control(native::reply_error(Some(id), e.code(), &e.to_string()));
            }
            (PublishDone::Await(slot), result) => slot.set(result),
        }
    }
}

/// A reply awaited by a task on this shard.
#[derive(Debug)]
enum Reply {
    Publish(PublishDone, Option<StaticPermit>),
    Subscribe(Slot<Result<Granted, OwnerError>>),
    Stats(Slot<ShardStats>),
}

/// One shard's state. Created once per executor, shared by its tasks via `Rc`.
#[derive(Debug)]
pub struct Shard {
    /// This shard's index (its position in the channel mesh).
    pub id: usize,
    /// Number of shards.
    pub shards: usize,
    /// Validated configuration.
    pub config: Arc<Config>,
    /// Process-wide flags.
    pub node: Arc<NodeShared>,
    /// This shard's counters.
    pub metrics: Metrics,
    /// Senders to every peer (None with one shard).
    senders: Option<Senders<Batch>>,
    /// Topics this shard owns.
    owner: RefCell<Owner>,
    /// Topics with local subscribers.
    topics: RefCell<HashMap<TopicName, Rc<LocalTopic>, ahash::RandomState>>,
    /// Outboxes by peer index (this shard's own is unused).
    outboxes: Vec<Outbox>,
    /// Notified when outboxes or fan-out buffers drain.
    room: Event,
    /// Topics with undrained deliveries.
    dirty: RefCell<Vec<Rc<LocalTopic>>>,
    /// Payload bytes in fill buffers.
    fanout_pending_bytes: Cell<usize>,
    /// Wakes the fan-out task.
    fanout_wake: Event,
    /// Byte budget per owner for publishes in flight.
    remote_budget: Vec<Rc<Semaphore>>,
    /// Awaited replies by request id.
    replies: RefCell<HashMap<u64, Reply, ahash::RandomState>>,
    /// Next request or subscription id.
    next_id: Cell<u64>,
    /// Low-share task queue for the control plane (`/metrics`, `/v1/topics`),
    /// so admin work never competes on equal terms with fan-out.
    pub control_queue: glommio::TaskQueueHandle,
    /// Where every socket read of this shard lands first (see
    /// `READ_SCRATCH_BYTES`); borrowed only inside one `poll`.
    pub read_scratch: RefCell<Vec<u8>>,
    /// Where writers gather frames for a non-blocking send; borrowed only
    /// between taking frames and the send returning, never across an await.
    pub write_scratch: RefCell<Vec<u8>>,
    /// Open WebSocket sessions' send queues, to close them on shutdown.
    pub sessions: RefCell<HashMap<u64, Rc<Outbound>, ahash::RandomState>>,
    /// Queues in direct mode that got frames since the last flush: the
    /// fan-out task writes them before it yields or waits.
    flush_list: RefCell<Vec<Rc<Outbound>>>,
    /// Publish times of the frames one direct flush took (reused).
    flush_published: RefCell<Vec<Instant>>,
    /// Latencies of one flush, counted per message before the histogram.
    latency_tally: RefCell<LatencyTally>,
    /// Connections handed over by peers, for the adopter task.
    handoffs: RefCell<Vec<Adoption>>,
    /// Where sockets cross to and from peers' descriptor tables.
    links: Links,
    /// Wakes the adopter task.
    handoff_wake: Event,
    /// Peers' stats requests, for the stats task (control queue).
    stats_requests: RefCell<Vec<StatsWanted>>,
    /// Wakes the stats task.
    stats_wake: Event,
}

/// A peer's stats request, answered by the stats task in the control queue:
/// a topic listing scans every owned topic, which must not hold up the
/// data plane's ingress.
#[derive(Debug)]
struct StatsWanted {
    /// The asking shard.
    from: usize,
    /// Its request id.
    req: u64,
    /// The topics it lists, if any.
    topics: Option<TopicQuery>,
}

impl Shard {
    /// Creates the shard's state; `start` spawns its tasks.
    pub fn new(
        id: usize,
        shards: usize,
        config: Arc<Config>,
        node: Arc<NodeShared>,
        senders: Option<Senders<Batch>>,
        control_queue: glommio::TaskQueueHandle,
        links: Links,
    ) -> Rc<Shard> {
        let topics_max = config.topics_max.div_ceil(shards);
        let limits = OwnerLimits {
            topics_max,
            history_messages_max: config.history_messages_max,
            history_bytes_max: config.history_bytes_max,
            client_pins_max: topics_max * config.client_topics_share_percent / 100,
        };
        Rc::new(Shard {
            id,
            shards,
            owner: RefCell::new(Owner::new(limits, epoch_seed(id))),
            config,
            node,
            metrics: Metrics::default(),
            senders,
            topics: RefCell::default(),
            outboxes: (0..shards).map(|_| Outbox::default()).collect(),
            room: Event::default(),
            dirty: RefCell::default(),
            fanout_pending_bytes: Cell::new(0),
            fanout_wake: Event::default(),
            remote_budget: (0..shards)
                .map(|_| Rc::new(Semaphore::new(REMOTE_PUBLISH_BYTES_IN_FLIGHT_MAX as u64)))
                .collect(),
            replies: RefCell::default(),
            next_id: Cell::new(1),
            control_queue,
            read_scratch: RefCell::new(vec![0; READ_SCRATCH_BYTES]),
            write_scratch: RefCell::new(Vec::with_capacity(crate::limits::WRITE_BATCH_BYTES_MAX)),
            sessions: RefCell::default(),
            flush_list: RefCell::default(),
            flush_published: RefCell::default(),
            latency_tally: RefCell::default(),
            handoffs: RefCell::default(),
            handoff_wake: Event::default(),
            stats_requests: RefCell::default(),
            stats_wake: Event::default(),
            links,
        })
    }

    /// Counts frames handed to a socket by a writer task and records their
    /// publish-to-write latency (through the tally, as the direct flush does).
    pub fn record_written(&self, bytes: usize, published: &[Instant], now: Instant) {
        let mut tally = self.latency_tally.borrow_mut();
        tally.add(published);
        tally.finish(&self.metrics, now);
        self.count_written(published.len(), bytes);
    }

    /// Counts messages and bytes handed to sockets.
    fn count_written(&self, messages: usize, bytes: usize) {
        metrics::add(&self.metrics.messages_delivered, messages as u64);
        metrics::add(&self.metrics.bytes_written, bytes as u64);
    }

    /// Writes every listed direct-mode queue, one non-blocking `send` each
    /// (see `outbound`). What a socket refuses goes to its writer task.
    ///
    /// Batching a pass's sends into one `io_uring_enter` (a ring of the
    /// shard's own; glommio 0.9 lends none) was tried: at 100 subscribers ×
    /// 10,000 msg/s it cut involuntary context switches from about 26,000 to
    /// 3,500 per second and cost about 5% more node CPU per delivery on this
    /// 2-core VM, so it was not kept (ARCHITECTURE.md).
    fn flush_direct(&self) {
        let list = std::mem::take(&mut *self.flush_list.borrow_mut());
        if list.is_empty() {
            return;
        }
        let mut scratch = self.write_scratch.borrow_mut();
        let mut published = self.flush_published.borrow_mut();
        let mut tally = self.latency_tally.borrow_mut();
        let (mut messages, mut bytes) = (0, 0);
        for out in &list {
            published.clear();
            scratch.clear();
            let Some(sink) = out.take_direct(&mut scratch, WRITE_BATCH_BYTES_MAX, &mut published) else { continue };
            messages += published.len();
            bytes += scratch.len();
            tally.add(&published);
            out.sent_direct(&scratch, sink.try_send(&scratch));
        }
        tally.finish(&self.metrics, Instant::now());
        self.count_written(messages, bytes);
    }

    /// Counts an offer and lists a direct-mode queue for the next flush.
    fn offered(&self, out: &Rc<Outbound>, offer: Offer) {
        match offer {
            Offer::Queued | Offer::Closed => {}
            Offer::Flush => self.flush_list.borrow_mut().push(out.clone()),
            Offer::Dropped => metrics::add(&self.metrics.messages_dropped, 1),
            Offer::Disconnected => {
                metrics::add(&self.metrics.slow_consumer_disconnects, 1);
                tracing::warn!(
                    shard = self.id,
                    "slow consumer disconnected (send queue over {} bytes)",
                    self.config.send_queue_bytes_max
                );
            }
        }
    }

    /// Spawns the ingress, flusher and fan-out tasks.
    pub fn start(
        self: &Rc<Self>,
        receivers: Vec<(usize, ConnectedReceiver<Batch>)>,
        data_queue: glommio::TaskQueueHandle,
    ) {
        for (peer, receiver) in receivers {
            let shard = self.clone();
            glommio::spawn_local_into(async move { shard.ingress(peer, receiver).await }, data_queue)
                .map(|t| t.detach())
                .ok();
        }
        for peer in (0..self.shards).filter(|&p| p != self.id) {
            let shard = self.clone();
            glommio::spawn_local_into(async move { shard.flusher(peer).await }, data_queue).map(|t| t.detach()).ok();
        }
        let shard = self.clone();
        glommio::spawn_local_into(async move { shard.fanout().await }, data_queue).map(|t| t.detach()).ok();
        let shard = self.clone();
        glommio::spawn_local_into(async move { shard.adopter(data_queue).await }, data_queue).map(|t| t.detach()).ok();
        let shard = self.clone();
        let control = self.control_queue;
        glommio::spawn_local_into(async move { shard.stats_server().await }, control).map(|t| t.detach()).ok();
    }

    /// Answers peers' stats requests, in the control queue.
    async fn stats_server(self: Rc<Self>) {
        loop {
            let wanted = std::mem::take(&mut *self.stats_requests.borrow_mut());
            if wanted.is_empty() {
                self.stats_wake.wait().await;
                continue;
            }
            for StatsWanted { from, req, topics } in wanted {
                let stats = Box::new(self.snapshot(topics.as_ref()));
                self.send(from, Item::StatsReply { req, stats });
                glommio::yield_if_needed().await;
            }
        }
    }

    /// Sends a socket to shard `owner`'s descriptor table, first of the two
    /// halves of a hand-off; the record number for the [`Handoff`]. On an
    /// error (the link's buffer is full) the socket stays here.
    pub fn pass_socket(&self, owner: usize, fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<u64> {
        self.links.send(owner, fd)
    }

    /// Hands a connection to shard `owner` (see [`Handoff`]), after
    /// `pass_socket`.
    pub fn hand_off(&self, owner: usize, handoff: Handoff) {
        self.send(owner, Item::Handoff(Box::new(handoff)));
    }

    /// Serves the connections peers hand over, each in a task of its own.
    async fn adopter(self: Rc<Self>, data_queue: glommio::TaskQueueHandle) {
        loop {
            let handoffs = std::mem::take(&mut *self.handoffs.borrow_mut());
            if handoffs.is_empty() {
                self.handoff_wake.wait().await;
                continue;
            }
            for adoption in handoffs {
                let task = glommio::spawn_local_into(crate::conn::adopt(self.clone(), adoption), data_queue);
                if let Ok(task) = task {
                    task.detach();
                }
            }
        }
    }

    /// A fresh shard-unique id.
    pub fn next_id(&self) -> u64 {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        id
    }

    /// Publishes a message to `topic`; resolves with its sequence number
    /// once the owner assigned it. Waits while the node is saturated
    /// (outboxes or fan-out buffers full), never for a slow subscriber.
    pub async fn publish(
        self: &Rc<Self>,
        topic: TopicName,
        kind: PayloadKind,
        payload: Bytes,
    ) -> Result<u64, OwnerError> {
        let slot = Slot::default();
        self.publish_pipelined(topic, kind, payload, PublishDone::Await(slot.clone())).await;
        slot.wait().await
    }

    /// Publishes without waiting for the owner's answer, which goes to
    /// `done`. Returns once the message is sequenced (local owner) or queued
    /// to the owner; messages from one caller keep their order.
    pub async fn publish_pipelined(
        self: &Rc<Self>,
        topic: TopicName,
        kind: PayloadKind,
        payload: Bytes,
        done: PublishDone,
    ) {
        let owner = topic.owner_shard(self.shards);
        if owner == self.id {
            self.wait_for_room().await;
            return done.complete(self.sequence(&topic, kind, payload));
        }
        let permit = self.remote_permit(owner, payload.len()).await;
        let req = self.next_id();
        self.replies.borrow_mut().insert(req, Reply::Publish(done, permit));
        self.send(owner, Item::Publish { topic, kind, payload, req });
    }

    /// Waits for room in the byte budget of publishes in flight to `owner`;
    /// the permit is held until the owner answers.
    async fn remote_permit(&self, owner: usize, payload_len: usize) -> Option<StaticPermit> {
        let cost = (payload_len + ITEM_OVERHEAD_BYTES) as u64;
        // The semaphore is never closed, so acquiring cannot fail.
        self.remote_budget[owner].acquire_static_permit(cost).await.ok()
    }

    /// Subscribes `out` to `topic`. With `from_seq`, first replays retained
    /// messages after it. Resolves once the subscription is live: every
    /// message sequenced after that reaches `out`. With `reply_id`, the
    /// native ok reply is queued before any message.
    pub async fn subscribe(
        self: &Rc<Self>,
        topic: &TopicName,
        out: &Rc<Outbound>,
        client: std::net::IpAddr,
        format: Format,
        from: Option<ResumeFrom>,
        reply_id: Option<u64>,
    ) -> Result<Granted, OwnerError> {
        let sub_id = self.next_id();
        let local = self.local_topic(topic);
        let live = local.subs.borrow().iter().any(|s| s.pending.is_none());
        if let (true, None, Some(epoch)) = (live, from, local.epoch.get()) {
            let last_seq = local.last_seq.get();
            if let Some(id) = reply_id {
                out.offer_control(native::reply_ok(
                    id,
                    serde_json::json!({ "topic": topic.as_str(), "epoch": epoch.to_string(), "last_seq": last_seq }),
                ));
            }
            local.subs.borrow_mut().push(Subscriber { id: sub_id, out: out.clone(), format, last_seq, pending: None });
            metrics::add(&self.metrics.subscriptions_current, 1);
            return Ok(Granted { sub_id, epoch, last_seq, resumed: Resumed::Live });
        }
        let req = self.next_id();
        local.subs.borrow_mut().push(Subscriber {
            id: sub_id,
            out: out.clone(),
            format,
            last_seq: 0,
            pending: Some(Pending { req, reply_id }),
        });
        metrics::add(&self.metrics.subscriptions_current, 1);
        let slot = Slot::default();
        self.replies.borrow_mut().insert(req, Reply::Subscribe(slot.clone()));
        self.send(topic.owner_shard(self.shards), Item::Subscribe { topic: topic.clone(), client, from, req });
        let result = slot.wait().await;
        if result.is_err() {
            self.unsubscribe(topic, sub_id);
        }
        result.map(|g| Granted { sub_id, ..g })
    }

    /// Removes a subscription; the last one on this shard tells the owner.
    pub fn unsubscribe(&self, topic: &TopicName, sub_id: u64) {
        let Some(local) = self.topics.borrow().get(topic).cloned() else { return };
        let now_empty = {
            let mut subs = local.subs.borrow_mut();
            if let Some(at) = subs.iter().position(|s| s.id == sub_id) {
                // Drops it left unreported are about a topic the connection
                // left (and may meet again in another epoch): never told.
                subs.remove(at).out.forget_missed(topic);
                metrics::sub(&self.metrics.subscriptions_current, 1);
            }
            subs.is_empty()
        };
        if now_empty {
            self.topics.borrow_mut().remove(topic);
            self.send(topic.owner_shard(self.shards), Item::Unsubscribe { topic: topic.clone() });
        }
    }

    /// Snapshots of every shard, this one included, in shard order, with
    /// the topics `topics` lists (none without it).
    pub async fn gather_stats(self: &Rc<Self>, topics: Option<TopicQuery>) -> Vec<ShardStats> {
        let mut waits = Vec::new();
        for peer in (0..self.shards).filter(|&p| p != self.id) {
            let req = self.next_id();
            let slot = Slot::default();
            self.replies.borrow_mut().insert(req, Reply::Stats(slot.clone()));
            self.send(peer, Item::StatsRequest { req, topics: topics.clone() });
            waits.push(slot);
        }
        let mut all = vec![self.snapshot(topics.as_ref())];
        for slot in waits {
            all.push(slot.wait().await);
        }
        all.sort_by_key(|s| s.shard);
        all
    }

    /// Whether the node is draining for shutdown.
    pub fn shutting_down(&self) -> bool {
        self.node.shutdown.load(Ordering::Relaxed)
    }

    /// This shard's counters and, for a listing, the page of its owned
    /// topics and of its local subscriber counts that `topics` asks for
    /// (each topic with local subscribers is owned somewhere, so the page's
    /// topics are among the first `limit` local ones).
    fn snapshot(&self, topics: Option<&TopicQuery>) -> ShardStats {
        let owner = self.owner.borrow();
        self.metrics.topics_evicted.set(owner.evicted_total());
        let (owned_topics, local_subscribers) = match topics {
            None => (Vec::new(), Vec::new()),
            Some(query) => {
                let local = self.topics.borrow();
                let matching = local.values().filter(|t| query.matches(t.name.as_str())).collect();
                let page = query.first_page(matching, |t| t.name.as_str());
                let counts = page.iter().map(|t| (t.name.as_str().to_string(), t.subs.borrow().len() as u64));
                (owner.stats_page(query), counts.collect())
            }
        };
        ShardStats {
            shard: self.id,
            counters: self.metrics.counter_values(),
            latency_us: self.metrics.latency_us.borrow().clone(),
            owned_topics_count: owner.len(),
            owned_topics,
            local_subscribers,
        }
    }

    /// Sequences a message on this (owner) shard and routes it to every
    /// subscribing shard.
    fn sequence(&self, topic: &TopicName, kind: PayloadKind, payload: Bytes) -> Result<u64, OwnerError> {
        let len = payload.len() as u64;
        let (message, mask) = self.owner.borrow_mut().publish(topic, kind, payload, Instant::now())?;
        metrics::add(&self.metrics.messages_published, 1);
        metrics::add(&self.metrics.bytes_published, len);
        let seq = message.seq;
        for shard in (0..self.shards).filter(|s| mask & (1 << s) != 0) {
            self.send(shard, Item::Deliver { topic: topic.clone(), message: message.clone() });
        }
        Ok(seq)
    }

    /// Routes an item: handled at once for this shard, else queued in the
    /// peer's outbox for the next batch.
    fn send(&self, shard: usize, item: Item) {
        if shard == self.id {
            self.handle(shard, item);
            return;
        }
        let outbox = &self.outboxes[shard];
        outbox.bytes.set(outbox.bytes.get() + item.cost_bytes());
        outbox.items.borrow_mut().push(item);
        outbox.wake.notify();
    }

    /// Handles one item from shard `from` (possibly this shard).
    fn handle(&self, from: usize, item: Item) {
        match item {
            Item::Publish { topic, kind, payload, req } => {
                let result = self.sequence(&topic, kind, payload);
                self.send(from, Item::PublishDone { req, result });
            }
            Item::Subscribe { topic, client, from: resume, req } => {
                let result = self.owner.borrow_mut().subscribe(&topic, from, client, resume, Instant::now());
                self.send(from, Item::SubscribeDone { topic, req, result });
            }
            Item::Unsubscribe { topic } => self.owner.borrow_mut().unsubscribe(&topic, from, Instant::now()),
            Item::Deliver { topic, message } => self.deliver(&topic, message),
            Item::SubscribeDone { topic, req, result } => self.granted(&topic, req, result),
            Item::PublishDone { req, result } => {
                let reply = self.replies.borrow_mut().remove(&req);
                if let Some(Reply::Publish(done, _permit)) = reply {
                    done.complete(result);
                }
            }
            Item::StatsRequest { req, topics } => {
                self.stats_requests.borrow_mut().push(StatsWanted { from, req, topics });
                self.stats_wake.notify();
            }
            Item::StatsReply { req, stats } => {
                if let Some(Reply::Stats(slot)) = self.replies.borrow_mut().remove(&req) {
                    slot.set(*stats);
                }
            }
            Item::Handoff(handoff) => match self.links.receive(from, handoff.seq) {
                Ok(fd) => {
                    self.handoffs.borrow_mut().push(Adoption { fd, handoff: *handoff });
                    self.handoff_wake.notify();
                }
                // This table is full (EMFILE), or the record is gone: the
                // client sees the connection close before its 101.
                Err(e) => tracing::warn!(shard = self.id, from, "handed-off socket not received: {e}"),
            },
        }
    }

    /// Ingress side of the dual buffer.
    fn deliver(&self, topic: &TopicName, message: Message) {
        let Some(local) = self.topics.borrow().get(topic).cloned() else { return };
        if message.seq <= local.last_seq.get() {
            return;
        }
        local.last_seq.set(message.seq);
        self.fanout_pending_bytes.set(self.fanout_pending_bytes.get() + message.payload.len());
        local.fill.borrow_mut().push(message);
        if !local.dirty.replace(true) {
            self.dirty.borrow_mut().push(local);
            self.fanout_wake.notify();
        }
    }

    /// Applies the owner's grant to the pending subscriber `req`: queue the
    /// native reply, then the replay, then go live.
    fn granted(&self, topic: &TopicName, req: u64, result: Result<Grant, OwnerError>) {
        let reply = self.replies.borrow_mut().remove(&req);
        let Some(Reply::Subscribe(slot)) = reply else { return };
        let grant = match result {
            Ok(grant) => grant,
            Err(e) => return slot.set(Err(e)),
        };
        let local = self.topics.borrow().get(topic).cloned();
        if let Some(local) = local {
            if local.last_seq.get() < grant.last_seq {
                local.last_seq.set(grant.last_seq);
            }
            local.epoch.set(Some(grant.epoch));
            let mut subs = local.subs.borrow_mut();
            if let Some(sub) = subs.iter_mut().find(|s| s.pending.is_some_and(|p| p.req == req)) {
                if let Some(Pending { reply_id: Some(id), .. }) = sub.pending {
                    sub.out.offer_control(native::reply_ok(id, grant_reply(topic, &grant)));
                }
                for message in &grant.replay {
                    let frame = Frame::data(encode(sub.format, topic, message), message.published_at);
                    self.offered(&sub.out, sub.out.offer_data(&frame, topic, message.seq));
                }
                // A listed replay is written by the fan-out task's next flush.
                self.fanout_wake.notify();
                sub.last_seq = grant.last_seq;
                sub.pending = None;
            }
        }
        slot.set(Ok(Granted { sub_id: 0, epoch: grant.epoch, last_seq: grant.last_seq, resumed: grant.resumed }));
    }

    fn local_topic(&self, topic: &TopicName) -> Rc<LocalTopic> {
        self.topics
            .borrow_mut()
            .entry(topic.clone())
            .or_insert_with(|| {
                Rc::new(LocalTopic {
                    name: topic.clone(),
                    last_seq: Cell::new(0),
                    epoch: Cell::new(None),
                    subs: RefCell::default(),
                    fill: RefCell::default(),
                    drain: RefCell::default(),
                    dirty: Cell::new(false),
                })
            })
            .clone()
    }

    async fn wait_for_room(&self) {
        loop {
            let full = self.fanout_pending_bytes.get() > FANOUT_PENDING_BYTES_MAX
                || self.outboxes.iter().any(|o| o.bytes.get() > OUTBOX_BYTES_MAX);
            if !full {
                return;
            }
            self.room.wait().await;
        }
    }

    async fn ingress(self: Rc<Self>, peer: usize, receiver: ConnectedReceiver<Batch>) {
        while let Some(batch) = receiver.recv().await {
            for item in batch {
                self.handle(peer, item);
            }
            // Backpressure: stop taking batches while fan-out is behind.
            while self.fanout_pending_bytes.get() > FANOUT_PENDING_BYTES_MAX {
                self.room.wait().await;
            }
        }
    }

    async fn flusher(self: Rc<Self>, peer: usize) {
        let Some(senders) = &self.senders else { return };
        let outbox = &self.outboxes[peer];
        loop {
            if outbox.items.borrow().is_empty() {
                outbox.wake.wait().await;
                continue;
            }
            let batch = std::mem::take(&mut *outbox.items.borrow_mut());
            let cost: usize = batch.iter().map(Item::cost_bytes).sum();
            if senders.send_to(peer, batch).await.is_err() {
                return; // the peer is gone: shutdown
            }
            outbox.bytes.set(outbox.bytes.get().saturating_sub(cost));
            self.room.notify();
        }
    }

    /// The fan-out task: drains dirty topics into subscriber queues.
    /// Writes are flushed before every yield, so a long pass over many
    /// topics does not hold the first topics' frames until its end.
    async fn fanout(self: Rc<Self>) {
        loop {
            let dirty = std::mem::take(&mut *self.dirty.borrow_mut());
            if dirty.is_empty() && self.flush_list.borrow().is_empty() {
                self.fanout_wake.wait().await;
                continue;
            }
            for topic in dirty {
                self.drain_topic(&topic);
                if glommio::executor().need_preempt() {
                    self.flush_direct();
                    glommio::yield_if_needed().await;
                }
            }
            self.flush_direct();
            self.room.notify();
        }
    }

    fn drain_topic(&self, topic: &LocalTopic) {
        topic.dirty.set(false);
        let mut drain = topic.drain.borrow_mut();
        std::mem::swap(&mut *drain, &mut *topic.fill.borrow_mut());
        let mut subs = topic.subs.borrow_mut();
        let mut bytes = 0;
        for message in drain.drain(..) {
            bytes += message.payload.len();
            self.fan_out(&topic.name, &mut subs, &message);
        }
        self.fanout_pending_bytes.set(self.fanout_pending_bytes.get().saturating_sub(bytes));
    }

    /// Queues one message to every live subscriber that has not had it,
    /// framed at most once per format on this shard and shared by all.
    fn fan_out(&self, topic: &TopicName, subs: &mut [Subscriber], message: &Message) {
        let mut frames: [Option<Rc<Frame>>; 3] = [None, None, None];
        for sub in subs.iter_mut().filter(|s| s.pending.is_none() && message.seq > s.last_seq) {
            let frame = frames[sub.format as usize]
                .get_or_insert_with(|| Frame::data(encode(sub.format, topic, message), message.published_at));
            self.offered(&sub.out, sub.out.offer_data(frame, topic, message.seq));
            sub.last_seq = message.seq;
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

/// A seed for this process's topic epochs: the wall clock's nanoseconds,
/// the process id and the shard, so that a restarted node (or another node)
/// never gives a topic the epoch it had before.
fn epoch_seed(shard: usize) -> u64 {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32) ^ ((shard as u64) << 56)
}

/// Frames a message for a subscriber format.
fn encode(format: Format, topic: &TopicName, message: &Message) -> Bytes {
    match format {
        Format::Raw => ws::encode_data(message.kind, &message.payload),
        Format::Legacy => ws::encode_data(PayloadKind::Binary, &message.payload),
        Format::Native => native::encode_message(topic, message),
    }
}
