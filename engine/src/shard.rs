//! A shard: the glommio shell around one [`Broker`], and the only place
//! where shards meet.
//!
//! The broker decides; the shard carries its [`Action`]s out: items for
//! peers go to one outbox per peer, whose flusher task sends everything
//! queued as one batch over the bounded SPSC channels of glommio's channel
//! mesh; queues in direct mode are written by the fan-out task before it
//! yields; answers wake the tasks that await them. Beside the data plane,
//! the shard answers peers' stats requests (in the control queue) and
//! adopts sockets handed over by peers.
//!
//! Tasks per shard: one ingress task per peer channel, one flusher per peer
//! outbox, one fan-out task and the stats server, plus the adopter,
//! accept loop and connections (see `server`).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use glommio::channels::channel_mesh::Senders;
use glommio::channels::shared_channel::ConnectedReceiver;
use proto::broker::{
    self, Action, Broker, BrokerLimits, Granted, PublishOptions, PublishReply, Published, SubscribeRequest,
    Subscription,
};
use proto::durable::LogLimits;
use proto::limits::{
    ADMIN_CONNECTIONS_RESERVED, FANOUT_PENDING_BYTES_MAX, ITEM_OVERHEAD_BYTES, OUTBOX_BYTES_MAX, READ_SCRATCH_BYTES,
    REMOTE_PUBLISH_BYTES_IN_FLIGHT_MAX, WRITE_BATCH_BYTES_MAX,
};
use proto::message::{Now, PayloadKind};
use proto::metrics::{self, LatencyTally, Metrics, ShardStats};
use proto::outbound::Outbound;
use proto::owner::{Owner, OwnerError, OwnerLimits};
use proto::sync::{Event, Slot};
use proto::topic::{TopicName, TopicQuery};
use runtime::fdpass::Links;

use crate::config::Config;
use crate::durability::{DurableAnswer, DurableAsk};
use crate::store::Store;

/// How often a shard applies the time to the consumer groups it owns and
/// its connections' requests: the granularity of ack deadlines, delayed
/// refusals and request timeouts.
const TICK_MS: u64 = 10;

/// What crosses between shards, always inside a batch (`Vec<Item>`).
#[derive(Debug)]
pub enum Item {
    /// Between brokers: publishes, subscriptions, deliveries.
    Data(broker::Item),
    /// Ask for a stats snapshot, with the topics a listing wants.
    StatsRequest { req: u64, topics: Option<TopicQuery> },
    /// A stats snapshot.
    StatsReply { req: u64, stats: Box<ShardStats> },
    /// A connection accepted elsewhere, for the receiving shard to serve.
    Handoff(Box<Handoff>),
    /// Declare, delete or read a durable topic (to its owner).
    DurableRequest { req: u64, ask: Box<DurableAsk> },
    /// The owner's answer.
    DurableReply { req: u64, answer: Box<DurableAnswer> },
}

impl Item {
    fn cost_bytes(&self) -> usize {
        match self {
            Item::Data(item) => item.cost_bytes(),
            Item::Handoff(h) => ITEM_OVERHEAD_BYTES + h.buf.len(),
            Item::DurableReply { answer, .. } => ITEM_OVERHEAD_BYTES + answer.cost_bytes(),
            _ => ITEM_OVERHEAD_BYTES,
        }
    }
}

/// A connection handed to the shard that owns its topic (see
/// `Config::topic_sockets`): a topic socket between its request head and
/// the 101, or a native socket at its first request. The socket itself
/// travels beside it, over the hand-off link (`fdpass`), as record `seq`.
/// Dropping it closes the connection.
#[derive(Debug)]
pub struct Handoff {
    /// The socket's record number on the link from the sending shard.
    pub seq: u64,
    /// Bytes read and not yet used: after the request head, or from the
    /// native socket's first request frame on.
    pub buf: Vec<u8>,
    /// How far the connection got on the accepting shard.
    pub stage: HandoffStage,
    /// The connection's place in the node's count, released if the hand-off
    /// is dropped on the way (shutdown).
    pub node: NodeConnection,
}

/// How far a handed-off connection got before it moved.
#[derive(Debug)]
pub enum HandoffStage {
    /// Before the 101: the adopting shard answers the upgrade.
    Upgrade {
        /// The parsed request head.
        head: proto::http::RequestHead,
        /// The address the node attributes the connection to.
        client: std::net::SocketAddr,
    },
    /// A native socket after its 101, before its first request was handled
    /// (nothing queued to it, nothing subscribed): the adopting shard serves
    /// the session from that request on.
    Native {
        /// The address the node attributes the connection to.
        client: std::net::IpAddr,
        /// Its slow-consumer policy (`slow=`).
        policy: proto::outbound::SlowConsumerPolicy,
        /// Whether its deliveries are packed (`delivery=batch`).
        batched: bool,
    },
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
    /// The object-store worker, set once before the shards start.
    pub archive: std::sync::OnceLock<Arc<objstore::Worker>>,
    /// The member set from etcd, when membership comes from there (set
    /// once before the shards start).
    pub cluster: std::sync::OnceLock<Arc<crate::membership::ClusterShared>>,
    /// Shards whose topics were all claimed after the node left its
    /// cluster (a graceful stop): the node stops accepting when all are.
    pub handed_over: AtomicUsize,
    /// Shards (bit i: shard i) of a stopping node with durable records
    /// still to upload for topics they gave up: every shard keeps its
    /// links open while any has (`membership::DURABLE_DRAIN_WAIT`).
    pub uploading_shards: std::sync::atomic::AtomicU64,
    /// Other nodes' claims taken by this node's link sessions and not yet
    /// answered on their links: a stopping node drains only at 0.
    pub claims_unanswered: AtomicUsize,
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
    /// Whether `items` holds deliveries whose flusher was not woken: they
    /// go with the fan-out's next write (see `Shard::send`).
    held: Cell<bool>,
}

/// The line of publishes waiting for room in the in-flight budget toward
/// one owner shard.
#[derive(Debug, Default)]
struct RemoteQueue {
    /// Waiting callers' ids, first come first.
    waiting: RefCell<VecDeque<u64>>,
    /// The next id.
    next: Cell<u64>,
}

/// A place in a [`RemoteQueue`]; dropping it leaves the line and lets the
/// next caller look again.
struct Turn<'a> {
    queue: &'a RemoteQueue,
    id: u64,
    room: &'a Event,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.queue.waiting.borrow_mut().retain(|&w| w != self.id);
        self.room.notify();
    }
}

/// Work for subscribers catching up from a durable topic's log.
#[derive(Debug)]
pub(crate) enum CatchUpWork {
    /// Read a batch (owner side).
    Read(proto::broker::LogRead),
    /// Ask for the next batch once `out` has room (subscriber side).
    Next { topic: TopicName, req: u64, out: Rc<Outbound> },
}

/// An answer a task on this shard awaits.
#[derive(Debug)]
pub(crate) enum Awaited {
    Publish(Slot<Result<u64, OwnerError>>),
    Subscribe(Slot<Result<Granted, OwnerError>>),
    Stats(Slot<ShardStats>),
    Durable(Slot<DurableAnswer>),
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
    /// This shard's counters (the broker counts its own in them too).
    pub metrics: Rc<Metrics>,
    /// The data plane's decisions.
    pub(crate) broker: RefCell<Broker>,
    /// Actions taken from the broker, being carried out (kept for its
    /// capacity).
    actions: RefCell<Vec<Action>>,
    /// Senders to every peer (None with one shard).
    senders: Option<Senders<Batch>>,
    /// Outboxes by peer index (this shard's own is unused).
    outboxes: Vec<Outbox>,
    /// Notified when outboxes, fan-out buffers or publishes in flight drain.
    room: Event,
    /// Wakes the fan-out task.
    fanout_wake: Event,
    /// Set while the fan-out task waits out its flush interval before a
    /// write (see `fanout`): raw publishers then read at its end
    /// (`read_tick`), not on every arriving frame.
    pacing: Cell<bool>,
    /// Notified when that wait ends, just before the write: what paced
    /// publishers read then is sequenced into it.
    read_tick: Event,
    /// Whether some outbox holds deliveries for the fan-out to release.
    deliveries_held: Cell<bool>,
    /// Publishes waiting for the in-flight budget, per owner shard.
    remote_queues: Vec<RemoteQueue>,
    /// Answers awaited by tasks, by request id.
    pub(crate) awaited: RefCell<HashMap<u64, Awaited, ahash::RandomState>>,
    /// Durable topics' files.
    pub(crate) store: Store,
    /// Segment bounds of new durable logs.
    pub(crate) log_limits: LogLimits,
    /// Wakes the committer.
    pub(crate) commit_wake: Event,
    /// Whether a group commit is being written.
    pub(crate) committing: Cell<bool>,
    /// Peers' durable-topic requests, for the durable task (control queue).
    pub(crate) durable_requests: RefCell<Vec<(usize, u64, DurableAsk)>>,
    /// Durable topics whose segments the broker asked the object store
    /// for (`Action::ListStored`), for the durable task.
    pub(crate) store_listings: RefCell<Vec<TopicName>>,
    /// Wakes the durable task.
    pub(crate) durable_wake: Event,
    /// Catch-up work for the catch-up task (control queue).
    pub(crate) catch_ups: RefCell<Vec<CatchUpWork>>,
    /// Wakes the catch-up task.
    pub(crate) catch_up_wake: Event,
    /// Wakes the ticker when a group or a request appears (it sleeps
    /// without a timer while there is none).
    ticker_wake: Event,
    /// Sealed segments on their way to the object store.
    pub(crate) uploads: RefCell<crate::archive::Uploads>,
    /// Archived segments fetched back for tiered reads.
    pub(crate) fetched: RefCell<crate::tiered::FetchedCache>,
    /// Wakes the archive task.
    pub(crate) archive_wake: Event,
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
    /// This shard's links to the other nodes of its cluster.
    node_links: crate::node_link::NodeLinks,
    /// When this shard began leaving its cluster (a graceful stop).
    pub(crate) leaving_since: std::cell::OnceCell<Instant>,
    /// This shard's topics were all claimed (counted in
    /// `NodeShared::handed_over`).
    pub(crate) handed_over: Cell<bool>,
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
        let topics_max = config.topics_max().div_ceil(shards);
        let owner_limits = OwnerLimits {
            topics_max,
            history_messages_max: config.history_messages_max(),
            history_bytes_max: config.history_bytes_max(),
            client_pins_max: topics_max * config.client_topics_share_percent() / 100,
        };
        let limits = BrokerLimits { publish_bytes_in_flight_max: REMOTE_PUBLISH_BYTES_IN_FLIGHT_MAX };
        let metrics = Rc::new(Metrics::default());
        let owner = Owner::new(owner_limits, epoch_seed(id));
        let mut broker = Broker::new(id, shards, owner, limits, metrics.clone());
        let (topology, dynamic) = match node.cluster.get() {
            Some(cluster) => ((*cluster.topology()).clone(), true),
            None => (config.topology().clone(), false),
        };
        if id == 0 {
            metrics.topology_version.set(topology.version());
        }
        broker.set_cluster(config.advertise().to_string(), topology, dynamic);
        let store = Store::new(config.data_dir(), config.fsync());
        let log_limits = LogLimits { segment_bytes_max: config.segment_bytes_max(), ..LogLimits::default() };
        Rc::new(Shard {
            id,
            shards,
            config,
            node,
            broker: RefCell::new(broker),
            metrics,
            actions: RefCell::default(),
            senders,
            outboxes: (0..shards).map(|_| Outbox::default()).collect(),
            room: Event::default(),
            fanout_wake: Event::default(),
            pacing: Cell::new(false),
            read_tick: Event::default(),
            deliveries_held: Cell::new(false),
            remote_queues: (0..shards).map(|_| RemoteQueue::default()).collect(),
            awaited: RefCell::default(),
            control_queue,
            read_scratch: RefCell::new(vec![0; READ_SCRATCH_BYTES]),
            write_scratch: RefCell::new(Vec::with_capacity(WRITE_BATCH_BYTES_MAX)),
            sessions: RefCell::default(),
            flush_list: RefCell::default(),
            flush_published: RefCell::default(),
            latency_tally: RefCell::default(),
            handoffs: RefCell::default(),
            handoff_wake: Event::default(),
            stats_requests: RefCell::default(),
            stats_wake: Event::default(),
            links,
            node_links: crate::node_link::NodeLinks::default(),
            leaving_since: std::cell::OnceCell::new(),
            handed_over: Cell::new(false),
            store,
            log_limits,
            commit_wake: Event::default(),
            committing: Cell::new(false),
            durable_requests: RefCell::default(),
            store_listings: RefCell::default(),
            durable_wake: Event::default(),
            uploads: RefCell::default(),
            fetched: RefCell::default(),
            archive_wake: Event::default(),
            catch_ups: RefCell::default(),
            catch_up_wake: Event::default(),
            ticker_wake: Event::default(),
        })
    }

    /// Carries out what the broker decided.
    pub(crate) fn apply(&self) {
        let mut actions = self.actions.borrow_mut();
        self.broker.borrow_mut().take_actions(&mut actions);
        for action in actions.drain(..) {
            match action {
                Action::Send { to, item } => self.send(to, Item::Data(item)),
                Action::Flush(out) => {
                    let mut list = self.flush_list.borrow_mut();
                    if list.is_empty() {
                        self.fanout_wake.notify();
                    }
                    list.push(out);
                }
                Action::Published { req, result } => {
                    if let Some(Awaited::Publish(slot)) = self.awaited.borrow_mut().remove(&req) {
                        slot.set(result);
                    }
                }
                Action::Subscribed { req, result } => {
                    if let Some(Awaited::Subscribe(slot)) = self.awaited.borrow_mut().remove(&req) {
                        slot.set(result);
                    }
                }
                Action::Room => self.room.notify(),
                Action::FanOut => self.fanout_wake.notify(),
                Action::Commit => self.commit_wake.notify(),
                Action::ReadLog(read) => {
                    self.catch_ups.borrow_mut().push(CatchUpWork::Read(read));
                    self.catch_up_wake.notify();
                }
                Action::CatchUp { topic, req, out } => {
                    self.catch_ups.borrow_mut().push(CatchUpWork::Next { topic, req, out });
                    self.catch_up_wake.notify();
                }
                Action::Link { node, frame } => self.node_links.send(node, &frame),
                Action::DurableMoved(moved) => self.durable_moved(moved),
                Action::ListStored { topic } => self.list_stored(topic),
                Action::Tick => self.ticker_wake.notify(),
                Action::ClaimAnswered => {
                    self.node.claims_unanswered.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                }
            }
        }
    }

    /// Queues an item in peer `shard`'s outbox for its next batch.
    ///
    /// A delivery for the peer's subscribers is held for the fan-out's next
    /// write (its flush interval) instead of waking the flusher, so that a
    /// busy topic wakes a peer shard once per interval rather than once per
    /// publish: each wake-up of a sleeping peer costs an eventfd write, a
    /// context switch and its ring's enters, and with subscribers on both
    /// shards of a 2-core box that made a delivery cost twice as much
    /// (ARCHITECTURE.md). Anything else wakes the flusher at once and takes
    /// the held deliveries with it (order kept); so does a half-full outbox.
    pub(crate) fn send(&self, shard: usize, item: Item) {
        let outbox = &self.outboxes[shard];
        let delivery = matches!(item, Item::Data(broker::Item::Deliver { .. }));
        outbox.bytes.set(outbox.bytes.get() + item.cost_bytes());
        outbox.items.borrow_mut().push(item);
        if delivery && !self.config.flush_interval().is_zero() && outbox.bytes.get() < OUTBOX_BYTES_MAX / 2 {
            outbox.held.set(true);
            if !self.deliveries_held.replace(true) {
                self.fanout_wake.notify();
            }
        } else {
            outbox.held.set(false);
            outbox.wake.notify();
        }
    }

    /// Wakes the flushers of outboxes holding deliveries (see `send`).
    fn release_deliveries(&self) {
        if self.deliveries_held.replace(false) {
            for outbox in self.outboxes.iter().filter(|o| o.held.replace(false)) {
                outbox.wake.notify();
            }
        }
    }

    /// Counts frames handed to a socket by a session's writer and records their
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
    /// (see `outbound`). What a socket refuses goes to its session's writer.
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

    /// Spawns the ingress, flusher and fan-out tasks.
    pub fn start(
        self: &Rc<Self>,
        receivers: Vec<(usize, ConnectedReceiver<Batch>)>,
        data_queue: glommio::TaskQueueHandle,
    ) {
        self.node_links.start(self);
        if let Some(cluster) = self.node.cluster.get().cloned() {
            let shard = self.clone();
            glommio::spawn_local_into(async move { shard.follow_cluster(cluster).await }, data_queue)
                .map(|t| t.detach())
                .ok();
        }
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
        let control = self.control_queue;
        glommio::spawn_local_into(async move { shard.stats_server().await }, control).map(|t| t.detach()).ok();
        let shard = self.clone();
        glommio::spawn_local_into(async move { shard.committer().await }, data_queue).map(|t| t.detach()).ok();
        let shard = self.clone();
        glommio::spawn_local_into(async move { shard.durable_server().await }, control).map(|t| t.detach()).ok();
        let shard = self.clone();
        glommio::spawn_local_into(async move { shard.log_keeper().await }, control).map(|t| t.detach()).ok();
        let shard = self.clone();
        glommio::spawn_local_into(async move { shard.archiver().await }, control).map(|t| t.detach()).ok();
        let shard = self.clone();
        glommio::spawn_local_into(async move { shard.catcher().await }, control).map(|t| t.detach()).ok();
        let shard = self.clone();
        glommio::spawn_local_into(async move { shard.ticker().await }, data_queue).map(|t| t.detach()).ok();
    }

    /// Hands one peer's batches to the broker.
    async fn ingress(self: Rc<Self>, peer: usize, receiver: ConnectedReceiver<Batch>) {
        while let Some(batch) = receiver.recv().await {
            let now = Now::read();
            for item in batch {
                match item {
                    Item::Data(item) => {
                        // A group created here by a peer's member: this
                        // shard's ticker keeps its deadlines.
                        let joins = matches!(
                            item,
                            proto::broker::Item::GroupJoin { .. } | proto::broker::Item::ScheduleAsk { .. }
                        );
                        self.broker.borrow_mut().handle(peer, item, now);
                        if joins {
                            self.ticker_wake.notify();
                        }
                    }
                    Item::StatsRequest { req, topics } => {
                        self.stats_requests.borrow_mut().push(StatsWanted { from: peer, req, topics });
                        self.stats_wake.notify();
                    }
                    Item::StatsReply { req, stats } => {
                        if let Some(Awaited::Stats(slot)) = self.awaited.borrow_mut().remove(&req) {
                            slot.set(*stats);
                        }
                    }
                    Item::Handoff(handoff) => self.received(peer, *handoff),
                    Item::DurableRequest { req, ask } => {
                        self.durable_requests.borrow_mut().push((peer, req, *ask));
                        self.durable_wake.notify();
                    }
                    Item::DurableReply { req, answer } => {
                        if let Some(Awaited::Durable(slot)) = self.awaited.borrow_mut().remove(&req) {
                            slot.set(*answer);
                        }
                    }
                }
            }
            self.apply();
            // Backpressure: stop taking batches while fan-out is behind.
            while self.broker.borrow().fanout_pending_bytes() > FANOUT_PENDING_BYTES_MAX {
                self.room.wait().await;
            }
        }
    }

    /// Takes the socket of a hand-off from its link, for the adopter task.
    fn received(&self, from: usize, handoff: Handoff) {
        match self.links.receive(from, handoff.seq) {
            Ok(fd) => {
                self.handoffs.borrow_mut().push(Adoption { fd, handoff });
                self.handoff_wake.notify();
            }
            // This table is full (EMFILE), or the record is gone: the
            // client sees the connection close (a topic socket before its
            // 101, a native socket without the answer to its first request).
            Err(e) => tracing::warn!(shard = self.id, from, "handed-off socket not received: {e}"),
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

    /// The fan-out task: has the broker fan out every topic with
    /// deliveries, and writes the queues that got frames. Writes are
    /// flushed before every yield, so a long pass over many topics does not
    /// hold the first topics' frames until its end, and otherwise at most
    /// once per `flush_interval` while messages keep coming (see there).
    async fn fanout(self: Rc<Self>) {
        let interval = self.config.flush_interval();
        let mut last_flush = Instant::now();
        loop {
            if !self.broker.borrow().has_fan_out() && self.flush_list.borrow().is_empty() && !self.deliveries_held.get()
            {
                self.fanout_wake.wait().await;
                continue;
            }
            self.fan_out_waiting().await;
            // Messages are coming faster than the flush interval: what
            // arrives until it has passed joins this write (one send per
            // subscriber for all of it). Nothing waits when they come
            // slower, nor when the pass left nothing for this task to write
            // (deliveries that woke their session's writer, group
            // deliveries): the wait would cost a timer and batch nothing.
            // Queues stay bounded by their caps meanwhile. Room is
            // announced first, so that publishers and the shard mesh keep
            // bringing messages during the wait.
            let since = last_flush.elapsed();
            if since < interval && (!self.flush_list.borrow().is_empty() || self.deliveries_held.get()) {
                self.room.notify();
                self.pacing.set(true);
                glommio::timer::sleep(interval - since).await;
                self.pacing.set(false);
                // Paced publishers read now, before the write: what they
                // bring joins it (the readers run first: the yield puts
                // this task behind them).
                if self.read_tick.has_waiters() {
                    self.read_tick.notify();
                    futures_lite::future::yield_now().await;
                }
                self.fan_out_waiting().await;
            }
            self.flush_direct();
            self.release_deliveries();
            last_flush = Instant::now();
            self.room.notify();
        }
    }

    /// For a raw publisher's reader, after it handled what it read: while
    /// the fan-out task waits out its flush interval, the next read waits
    /// for that wait's end (`read_tick`), so a publisher sending faster
    /// than the interval costs a wake-up per interval, not one per frame.
    /// Nothing waits when the fan-out is not pacing. Its messages go out in
    /// the same write as when read at once.
    pub async fn paced_read(&self) {
        if self.pacing.get() {
            self.read_tick.wait().await;
        }
    }

    /// Has the broker fan out every topic with deliveries, writing what is
    /// queued before each yield.
    async fn fan_out_waiting(&self) {
        while self.broker.borrow_mut().fan_out_next() {
            self.apply();
            if glommio::executor().need_preempt() {
                self.flush_direct();
                glommio::yield_if_needed().await;
            }
        }
        self.apply();
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

    /// The connections peers handed over since the last call, waiting
    /// until there is one (the server's adopter task serves each).
    pub async fn adoptions(&self) -> Vec<Adoption> {
        loop {
            let handoffs = std::mem::take(&mut *self.handoffs.borrow_mut());
            if !handoffs.is_empty() {
                return handoffs;
            }
            self.handoff_wake.wait().await;
        }
    }

    /// A fresh shard-unique id.
    pub fn next_id(&self) -> u64 {
        self.broker.borrow_mut().next_id()
    }

    /// Publishes a message to `topic`; resolves with its sequence number
    /// once the owner assigned it. Waits while the node is saturated
    /// (outboxes or fan-out buffers full), never for a slow subscriber.
    pub async fn publish(
        self: &Rc<Self>,
        topic: TopicName,
        kind: PayloadKind,
        payload: Bytes,
        options: PublishOptions,
    ) -> Result<u64, OwnerError> {
        match self.publish_pipelined(topic, kind, payload, options, PublishReply::Caller).await {
            Published::Now(result) => result,
            Published::Later { req } => {
                let slot = Slot::default();
                self.awaited.borrow_mut().insert(req, Awaited::Publish(slot.clone()));
                slot.wait().await
            }
        }
    }

    /// Publishes without waiting for the owner's answer, which goes to
    /// `reply`. Returns once the message is sequenced (local owner) or
    /// queued to the owner; messages from one caller keep their order.
    pub async fn publish_pipelined(
        self: &Rc<Self>,
        topic: TopicName,
        kind: PayloadKind,
        payload: Bytes,
        options: PublishOptions,
        reply: PublishReply,
    ) -> Published {
        if topic.owner_shard(self.shards) == self.id {
            self.wait_for_room().await;
        } else {
            self.take_turn(&topic, payload.len()).await;
        }
        let published = self.broker.borrow_mut().publish(topic, kind, payload, options, reply, Now::read());
        self.apply();
        published
    }

    /// A native publish batch: its messages go as single publishes do, in
    /// order, after one wait for room (for all of them) and with one clock
    /// read; `batch` gets each answer and replies after the last.
    pub async fn publish_batch(
        self: &Rc<Self>,
        topic: TopicName,
        payloads: Vec<Bytes>,
        batch: Rc<proto::broker::BatchReply>,
    ) {
        if topic.owner_shard(self.shards) == self.id {
            self.wait_for_room().await;
        } else {
            let cost = payloads.iter().map(|p| p.len() + proto::limits::ITEM_OVERHEAD_BYTES).sum::<usize>();
            // The turn asks for one item's overhead on top.
            self.take_turn(&topic, cost.saturating_sub(proto::limits::ITEM_OVERHEAD_BYTES)).await;
        }
        let now = Now::read();
        {
            let mut broker = self.broker.borrow_mut();
            for payload in payloads {
                let reply = PublishReply::Batch(batch.clone());
                broker.publish(topic.clone(), PayloadKind::Binary, payload, PublishOptions::default(), reply, now);
            }
        }
        self.apply();
    }

    /// Waits until a publish of `len` bytes to `topic`'s owner fits the
    /// in-flight budget, first come, first served: while anyone waits, later
    /// callers queue behind them, so a large publish is never starved by a
    /// stream of small ones.
    async fn take_turn(&self, topic: &TopicName, len: usize) {
        let owner = topic.owner_shard(self.shards);
        let queue = &self.remote_queues[owner];
        if queue.waiting.borrow().is_empty() && self.broker.borrow().remote_room(topic, len) {
            return;
        }
        let id = queue.next.get();
        queue.next.set(id + 1);
        queue.waiting.borrow_mut().push_back(id);
        // Leaves the line however this ends (served, or the caller dropped).
        let _turn = Turn { queue, id, room: &self.room };
        while queue.waiting.borrow().front() != Some(&id) || !self.broker.borrow().remote_room(topic, len) {
            self.room.wait().await;
        }
    }

    /// Waits while the outboxes or the fan-out buffers are over their caps.
    async fn wait_for_room(&self) {
        loop {
            let full = self.broker.borrow().fanout_pending_bytes() > FANOUT_PENDING_BYTES_MAX
                || self.outboxes.iter().any(|o| o.bytes.get() > OUTBOX_BYTES_MAX);
            if !full {
                return;
            }
            self.room.wait().await;
        }
    }

    /// Subscribes a connection (see [`Broker::subscribe`]). Resolves once
    /// the subscription is live: every message sequenced after that
    /// reaches the connection, after the replay its resume asked for.
    pub async fn subscribe(self: &Rc<Self>, request: SubscribeRequest) -> Result<Granted, OwnerError> {
        let subscription = self.broker.borrow_mut().subscribe(request, Now::read());
        match subscription {
            Subscription::Live(granted) => {
                self.apply();
                Ok(granted)
            }
            Subscription::Pending { req, .. } => {
                // Registered before the actions run: a local owner answers
                // inside the call.
                let slot = Slot::default();
                self.awaited.borrow_mut().insert(req, Awaited::Subscribe(slot.clone()));
                self.apply();
                slot.wait().await
            }
        }
    }

    /// Joins a consumer group (see [`Broker::join_group`]): the reply is
    /// queued to the member's connection when the owner answers.
    pub fn join_group(&self, request: proto::broker::JoinRequest) -> u64 {
        let sub = self.broker.borrow_mut().join_group(request, Now::read());
        self.apply();
        // The group may be this shard's (a peer's ticker wakes when the
        // join reaches it).
        self.ticker_wake.notify();
        sub
    }

    /// A request forwarded by another node: its answer is to come back on
    /// the link `out` (see [`Broker::relay_reply_to`]).
    pub fn relay_reply_to(&self, options: &mut proto::durable::PublishOptions, out: Rc<Outbound>) {
        if options.reply_to.is_some() {
            self.broker.borrow_mut().relay_reply_to(options, out, Now::read());
            self.ticker_wake.notify();
        }
    }

    /// Joins a consumer group for a member on another node (see
    /// [`Broker::join_group_link`]).
    pub fn join_group_link(&self, request: proto::broker::JoinRequest, member: u64) -> u64 {
        let sub = self.broker.borrow_mut().join_group_link(request, member, Now::read());
        self.apply();
        self.ticker_wake.notify();
        sub
    }

    /// Whether `sub` is a consumer-group member on this shard.
    pub fn is_member(&self, sub: u64) -> bool {
        self.broker.borrow().is_member(sub)
    }

    /// Leaves a consumer group; the owner gives back what the member held.
    pub fn leave_group(&self, sub: u64) {
        self.broker.borrow_mut().leave_group(sub, Now::read());
        self.apply();
    }

    /// A member's ack, refusal or prefetch change; false if not a member.
    pub fn settle(&self, sub: u64, settle: proto::broker::Settle) -> bool {
        let done = self.broker.borrow_mut().settle(sub, settle, Now::read());
        self.apply();
        done
    }

    /// Applies the time to the consumer groups this shard owns (ack
    /// deadlines, delayed refusals, idle groups), to the requests of its
    /// connections (timeouts) and to its topics' schedules (due ones are
    /// published).
    pub(crate) async fn ticker(self: Rc<Self>) {
        loop {
            let (groups, requests, schedules) = {
                let broker = self.broker.borrow();
                (broker.has_groups(), broker.has_requests(), broker.has_schedules())
            };
            if !groups && !requests && !schedules {
                // No timer while idle: a join or a request wakes it.
                self.ticker_wake.wait().await;
                continue;
            }
            glommio::timer::sleep(Duration::from_millis(TICK_MS)).await;
            if groups {
                self.broker.borrow_mut().tick_groups(Now::read());
                self.save_groups(false);
            }
            if requests {
                self.broker.borrow_mut().tick_requests(Now::read());
            }
            if schedules {
                self.broker.borrow_mut().tick_schedules(Now::read());
                self.write_schedule_journals();
            }
            if groups || requests || schedules {
                self.apply();
            }
        }
    }

    /// Sends a request (see [`Broker::request`]): its native reply comes
    /// with the responder's answer, or an error.
    pub async fn request(self: &Rc<Self>, request: proto::broker::RequestSpec) {
        if request.topic.owner_shard(self.shards) == self.id {
            self.wait_for_room().await;
        } else {
            self.take_turn(&request.topic, request.payload.len()).await;
        }
        self.broker.borrow_mut().request(request, Now::read());
        self.apply();
        self.ticker_wake.notify();
    }

    /// Adds, cancels or lists schedules of `topic` (see
    /// [`Broker::ask_schedules`]); the native reply `id` comes with the
    /// owner's answer.
    pub async fn ask_schedules(
        self: &Rc<Self>,
        topic: TopicName,
        ask: proto::broker::ScheduleAsk,
        out: Rc<Outbound>,
        id: u64,
    ) {
        if topic.owner_shard(self.shards) == self.id {
            self.wait_for_room().await;
            self.ticker_wake.notify();
        } else if let proto::broker::ScheduleAsk::Add { scheduled, .. } = &ask {
            self.take_turn(&topic, scheduled.payload.len()).await;
        }
        self.broker.borrow_mut().ask_schedules(topic, ask, out, id, Now::read());
        self.apply();
    }

    /// Deletes a consumer group without members (see
    /// [`Broker::delete_group`]); the native reply `id` comes with the
    /// owner's answer.
    pub fn delete_group(&self, topic: TopicName, group: &str, out: Rc<Outbound>, id: u64) {
        self.broker.borrow_mut().delete_group(topic, group.into(), out, id, Now::read());
        self.apply();
        // A durable group's save is deleted by the owner's ticker.
        self.ticker_wake.notify();
    }

    /// Another node's connection asks what only the topic's owner answers
    /// (see [`Broker::ask_from_link`]); the answer goes back on the link.
    pub fn ask_from_link(&self, topic: TopicName, ask: proto::link::OwnerAsk, out: Rc<Outbound>, id: u64) {
        self.broker.borrow_mut().ask_from_link(topic, ask, out, id, Now::read());
        self.apply();
        // Schedules fire from the ticker, which sleeps while there are none.
        self.ticker_wake.notify();
    }

    /// A fresh schedule id, unique on this node.
    pub fn schedule_id(&self) -> String {
        self.broker.borrow_mut().schedule_id()
    }

    /// A responder's reply to the request `to` names; false when `to`
    /// names no shard of this node.
    pub fn reply(
        &self,
        to: proto::message::ReplyTo,
        answer: proto::broker::Answer,
        out: Rc<Outbound>,
        reply_id: Option<u64>,
    ) -> bool {
        let sent = self.broker.borrow_mut().reply(to, answer, out, reply_id, Now::read());
        self.apply();
        sent
    }

    /// Removes a subscription; the last one on this shard tells the owner.
    pub fn unsubscribe(&self, topic: &TopicName, sub_id: u64) {
        self.broker.borrow_mut().unsubscribe(topic, sub_id, Now::read());
        self.apply();
    }

    /// Snapshots of every shard, this one included, in shard order, with
    /// the topics `topics` lists (none without it).
    pub async fn gather_stats(self: &Rc<Self>, topics: Option<TopicQuery>) -> Vec<ShardStats> {
        let mut waits = Vec::new();
        for peer in (0..self.shards).filter(|&p| p != self.id) {
            let req = self.next_id();
            let slot = Slot::default();
            self.awaited.borrow_mut().insert(req, Awaited::Stats(slot.clone()));
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
        let broker = self.broker.borrow();
        let owner = broker.owner();
        self.metrics.topics_evicted.set(owner.evicted_total());
        let (owned_topics, local_subscribers) = match topics {
            None => (Vec::new(), Vec::new()),
            Some(query) => (owner.stats_page(query), broker.local_subscribers(query)),
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
}

/// A seed for this process's topic epochs: the wall clock's nanoseconds,
/// the process id and the shard, so that a restarted node (or another node)
/// never gives a topic the epoch it had before.
pub(crate) fn epoch_seed(shard: usize) -> u64 {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32) ^ ((shard as u64) << 56)
}
