//! Configuration: command-line flags and an optional TOML file, merged and
//! validated once into [`Config`], which cannot hold an invalid state.
//!
//! Precedence: a flag given on the command line beats the file, the file
//! beats the default. Unknown keys in the file are rejected.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use proto::limits;
use runtime::config::read_file;
pub use runtime::config::ConfigError;
use runtime::pick;
use serde::Deserialize;

pub use proto::durable::{DurableSpec, FsyncPolicy};
pub use proto::outbound::SlowConsumerPolicy;

/// Smallest ownership table: Maglev wants many slots per member, and a
/// cluster grows (at 5,003 slots, 50 per node at 100 nodes).
const TABLE_SIZE_MIN: usize = 5_003;
/// Largest ownership table: each shard keeps 16 of them (4 bytes a slot:
/// 128 MiB per shard at this size).
const TABLE_SIZE_MAX: usize = 2_000_003;

/// Default data directory (durable topics' logs), relative to the working
/// directory. Nothing is written there until a durable topic exists.
pub const DATA_DIR_DEFAULT: &str = "fluxnode-data";
/// Default fsync interval under `--fsync interval`, ms: what a power
/// failure may take of acknowledged messages.
pub const FSYNC_INTERVAL_MS_DEFAULT: u64 = 100;
/// Default upload interval, ms: the longest a publish at ack `stored` waits
/// before its segment is sealed early and uploaded.
pub const UPLOAD_INTERVAL_MS_DEFAULT: u64 = 1_000;
/// Default snapshot period, ms (0: only on demand): hourly.
pub const SNAPSHOT_INTERVAL_MS_DEFAULT: u64 = 3_600_000;

/// Which shard serves a topic socket (`/v1/topics/{topic}/ws`), and a
/// native socket (`/v1/ws`) from its first request on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TopicSockets {
    /// The shard that owns the topic: the accepting shard hands the socket
    /// over before the 101, so the topic's messages never cross shards on
    /// their way to it, and its publishes are sequenced where they are read.
    /// A native socket moves to the owner of the topic its first request
    /// (publish, publish batch, subscribe, join) names.
    Owner,
    /// The shard that accepted it (the kernel's SO_REUSEPORT hash): spreads
    /// one hot topic's fan-out over every core, at the price of a
    /// cross-shard hop per message and shard.
    Accepting,
}

/// Command-line flags. Every knob is also a key of the TOML file, with the
/// same name in snake_case.
#[derive(Debug, Parser)]
#[command(name = "fluxnode", version, about = "FluxNode: thread-per-core WebSocket pub/sub")]
pub struct Args {
    /// Address to listen on (HTTP and WebSocket). [default: 0.0.0.0:8080]
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Number of shards (one pinned thread each). [default: all online cores]
    #[arg(long)]
    pub shards: Option<usize>,
    /// TOML file with any of the settings below; flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Largest message or publish body, bytes. [default: 1048576]
    #[arg(long)]
    pub message_bytes_max: Option<usize>,
    /// Cap on bytes queued per connection before the slow-consumer policy
    /// applies, bytes. Memory per connection is at most this. [default: 4194304]
    #[arg(long)]
    pub send_queue_bytes_max: Option<usize>,
    /// Default slow-consumer policy; native clients may choose per connection.
    /// [default: disconnect]
    #[arg(long, value_enum)]
    pub slow_consumer_policy: Option<SlowConsumerPolicy>,
    /// Messages retained per topic for resume. [default: 1024]
    #[arg(long)]
    pub history_messages_max: Option<usize>,
    /// Payload bytes retained per topic for resume. [default: 1048576]
    #[arg(long)]
    pub history_bytes_max: Option<usize>,
    /// Ceiling on topics_max x history_bytes_max, bytes. [default: 4294967296]
    #[arg(long)]
    pub history_memory_max: Option<usize>,
    /// Most topics on this node. [default: 4096]
    #[arg(long)]
    pub topics_max: Option<usize>,
    /// Most subscriptions per connection. [default: 1024]
    #[arg(long)]
    pub subscriptions_per_connection_max: Option<usize>,
    /// Share of each shard's topic table, in percent (1 to 100), that one
    /// client address may keep alive by subscribing. [default: 25]
    #[arg(long)]
    pub client_topics_share_percent: Option<usize>,
    /// Most client connections on this node. [default: 16384]
    #[arg(long)]
    pub connections_max: Option<usize>,
    /// Time allowed for a complete HTTP request head, ms. [default: 10000]
    #[arg(long)]
    pub handshake_timeout_ms: Option<u64>,
    /// WebSocket silence before a server ping; twice this closes, ms. [default: 30000]
    #[arg(long)]
    pub idle_timeout_ms: Option<u64>,
    /// Time graceful shutdown spends flushing queues, ms. [default: 10000]
    #[arg(long)]
    pub drain_timeout_ms: Option<u64>,
    /// Shortest time between two fan-out writes of a shard, µs: while
    /// messages come faster, each subscriber gets what arrived meanwhile in
    /// one write (fewer sends per delivery, up to this much added latency);
    /// when they come slower nothing waits. 0 writes after every pass.
    /// [default: 1000]
    #[arg(long)]
    pub flush_interval_us: Option<u64>,
    /// Require a PROXY protocol v2 header on every connection (behind
    /// FluxBalancer's --proxy-protocol); connections without one get 400.
    #[arg(long)]
    pub proxy_protocol: bool,
    /// Which shard serves a topic socket (`/v1/topics/{topic}/ws`), and a
    /// native socket from its first request on (`owner`: the shard owning
    /// the topic it names). [default: owner]
    #[arg(long, value_enum)]
    pub topic_sockets: Option<TopicSockets>,
    /// Where durable topics keep their logs. [default: fluxnode-data]
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// When durable topics' writes are fsynced: `always` (every group
    /// commit, before answering) or `interval`. [default: always]
    #[arg(long, value_enum)]
    pub fsync: Option<FsyncPolicy>,
    /// Fsync interval under `--fsync interval`, ms. [default: 100]
    #[arg(long)]
    pub fsync_interval_ms: Option<u64>,
    /// Segment size at which a durable topic's log rolls, bytes. [default: 67108864]
    #[arg(long)]
    pub segment_bytes_max: Option<u64>,
    /// Declare a durable topic (ack `local`, no retention bound); repeat for
    /// more. The file's `[durable_topics.NAME]` tables set retention and ack.
    #[arg(long = "durable", value_name = "TOPIC")]
    pub durable: Vec<String>,
    /// Object store for durable topics' sealed segments and snapshots: a
    /// directory, or `s3://bucket/prefix` (credentials from the standard AWS
    /// chain). [default: DATA_DIR/objects]
    #[arg(long)]
    pub object_store: Option<String>,
    /// S3 endpoint override, for S3-compatible stores (e.g. http://127.0.0.1:9000).
    #[arg(long)]
    pub s3_endpoint: Option<String>,
    /// S3 region. [default: the AWS chain's, else us-east-1]
    #[arg(long)]
    pub s3_region: Option<String>,
    /// Path-style S3 addressing (most S3-compatible stores need it).
    #[arg(long)]
    pub s3_path_style: bool,
    /// Longest a publish at ack `stored` waits before its segment is sealed
    /// early and uploaded, ms. [default: 1000]
    #[arg(long)]
    pub upload_interval_ms: Option<u64>,
    /// Snapshot period, ms; 0 for on demand only. [default: 3600000]
    #[arg(long)]
    pub snapshot_interval_ms: Option<u64>,
    /// Restore durable topics from a snapshot (`latest` or an id) into an
    /// empty data directory before serving.
    #[arg(long, value_name = "latest|ID")]
    pub restore: Option<String>,
    /// A member of this node's cluster (`host:port`, this node's own
    /// address included); repeat for each. Static membership: every node
    /// must be given the same set. Not with `--etcd`.
    #[arg(long = "peer", value_name = "HOST:PORT")]
    pub peers: Vec<String>,
    /// Slots of the topic ownership table (a prime; every node of a
    /// cluster and its FluxBalancer must use the same). Larger tables move
    /// fewer topics per membership change in large clusters (at 1,000
    /// nodes, 655373 moves 0.41% of topics where 65537 moves 0.69%).
    /// [default: 65537]
    #[arg(long)]
    pub table_size: Option<usize>,
    /// This node's address among the members, as other nodes reach it.
    /// [default: the listen address]
    #[arg(long)]
    pub advertise: Option<String>,
    /// Cluster membership from etcd (its client address, `host:port`,
    /// plain HTTP): the node registers under a lease and follows the
    /// member set. Not with `--peer`.
    #[arg(long, value_name = "HOST:PORT")]
    pub etcd: Option<String>,
    /// The cluster's name in etcd (its keys: `/rayflux/NAME/members/`).
    /// [default: rayflux]
    #[arg(long)]
    pub cluster_name: Option<String>,
}

/// The TOML file: the same knobs as [`Args`], all optional, unknown keys
/// rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    shards: Option<usize>,
    message_bytes_max: Option<usize>,
    send_queue_bytes_max: Option<usize>,
    slow_consumer_policy: Option<SlowConsumerPolicy>,
    history_messages_max: Option<usize>,
    history_bytes_max: Option<usize>,
    history_memory_max: Option<usize>,
    topics_max: Option<usize>,
    subscriptions_per_connection_max: Option<usize>,
    client_topics_share_percent: Option<usize>,
    connections_max: Option<usize>,
    handshake_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    drain_timeout_ms: Option<u64>,
    flush_interval_us: Option<u64>,
    proxy_protocol: Option<bool>,
    topic_sockets: Option<TopicSockets>,
    data_dir: Option<PathBuf>,
    fsync: Option<FsyncPolicy>,
    fsync_interval_ms: Option<u64>,
    segment_bytes_max: Option<u64>,
    #[serde(default)]
    durable_topics: BTreeMap<String, DurableSpec>,
    object_store: Option<String>,
    s3_endpoint: Option<String>,
    s3_region: Option<String>,
    s3_path_style: Option<bool>,
    upload_interval_ms: Option<u64>,
    snapshot_interval_ms: Option<u64>,
    #[serde(default)]
    peers: Vec<String>,
    table_size: Option<usize>,
    advertise: Option<String>,
    etcd: Option<String>,
    cluster_name: Option<String>,
}

/// The object store: `--object-store` or the file's, with the S3 settings,
/// else `DATA_DIR/objects`.
fn object_store(args: &Args, file: &FileConfig, data_dir: &std::path::Path) -> objstore::Target {
    let named = args.object_store.clone().or(file.object_store.clone());
    match named.map(|s| objstore::Target::parse(&s)) {
        None => objstore::Target::Dir(data_dir.join("objects")),
        Some(objstore::Target::S3(mut s3)) => {
            s3.endpoint = args.s3_endpoint.clone().or(file.s3_endpoint.clone());
            s3.region = args.s3_region.clone().or(file.s3_region.clone());
            s3.path_style = args.s3_path_style || file.s3_path_style.unwrap_or(false);
            objstore::Target::S3(s3)
        }
        Some(dir) => dir,
    }
}

/// The durable topics of `--durable` flags (default declaration) and the
/// file's `[durable_topics.NAME]` tables, names validated.
fn durable_topics(
    flags: &[String],
    file: &BTreeMap<String, DurableSpec>,
) -> Result<Vec<(proto::topic::TopicName, DurableSpec)>, ConfigError> {
    let mut all: BTreeMap<&str, DurableSpec> = file.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    for name in flags {
        all.entry(name).or_default();
    }
    all.into_iter()
        .map(|(name, spec)| {
            proto::topic::TopicName::new(name)
                .map(|t| (t, spec))
                .map_err(|e| ConfigError::Invalid(format!("durable topic {name:?}: {e}")))
        })
        .collect()
}

/// A validated configuration. Built only by [`Config::from_args`] or
/// [`Config::default`]; shared read-only by every shard.
#[derive(Clone, Debug)]
pub struct Config {
    /// Listening address, shared by every shard through SO_REUSEPORT.
    listen: SocketAddr,
    /// Number of shards, 1..=SHARDS_MAX.
    shards: usize,
    /// Largest message payload or publish body, bytes.
    message_bytes_max: usize,
    /// Per-connection send queue cap, bytes.
    send_queue_bytes_max: usize,
    /// Default slow-consumer policy.
    slow_consumer_policy: SlowConsumerPolicy,
    /// Messages retained per topic.
    history_messages_max: usize,
    /// Payload bytes retained per topic.
    history_bytes_max: usize,
    /// Most topics on this node.
    topics_max: usize,
    /// Most subscriptions per connection.
    subscriptions_per_connection_max: usize,
    /// Share of each shard's topic table one client address may keep
    /// subscribed, in percent.
    client_topics_share_percent: usize,
    /// Most client connections on this node.
    connections_max: usize,
    /// Time allowed for a complete request head.
    handshake_timeout: Duration,
    /// WebSocket silence before a ping.
    idle_timeout: Duration,
    /// Time spent flushing on shutdown.
    drain_timeout: Duration,
    /// Shortest time between two fan-out writes of a shard while busy.
    flush_interval: Duration,
    /// Whether every connection starts with a PROXY v2 header.
    proxy_protocol: bool,
    /// Which shard serves a topic socket.
    topic_sockets: TopicSockets,
    /// Where durable topics keep their logs.
    data_dir: PathBuf,
    /// When durable writes are fsynced.
    fsync: FsyncPolicy,
    /// Fsync interval under `FsyncPolicy::Interval`.
    fsync_interval: Duration,
    /// Segment roll size, bytes.
    segment_bytes_max: u64,
    /// Durable topics declared by configuration, validated names.
    durable_topics: Vec<(proto::topic::TopicName, DurableSpec)>,
    /// Where sealed segments and snapshots go.
    object_store: objstore::Target,
    /// Whether the object store was named (else the node's own directory).
    object_store_named: bool,
    /// Longest wait before a segment with `stored` publishers is sealed.
    upload_interval: Duration,
    /// Snapshot period; zero for on demand only.
    snapshot_interval: Duration,
    /// Snapshot to restore before serving.
    restore: Option<String>,
    /// This node's address in its cluster.
    advertise: String,
    /// The cluster's static member set (this node alone when none given).
    topology: proto::cluster::Topology,
    /// Whether the member set came from `--peer` flags.
    static_peers: bool,
    /// The ownership table's size.
    table_size: usize,
    /// etcd's client address and the cluster's name, when membership
    /// comes from etcd.
    etcd: Option<(String, String)>,
}

/// Read access: the fields are private, so a `Config` exists only as
/// [`Config::from_args`] or [`Config::default`] made it, valid.
impl Config {
    /// Listening address, shared by every shard through SO_REUSEPORT.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Number of shards, 1..=SHARDS_MAX.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// Largest message payload or publish body, bytes.
    pub fn message_bytes_max(&self) -> usize {
        self.message_bytes_max
    }

    /// Per-connection send queue cap, bytes.
    pub fn send_queue_bytes_max(&self) -> usize {
        self.send_queue_bytes_max
    }

    /// Default slow-consumer policy.
    pub fn slow_consumer_policy(&self) -> SlowConsumerPolicy {
        self.slow_consumer_policy
    }

    /// Messages retained per topic.
    pub fn history_messages_max(&self) -> usize {
        self.history_messages_max
    }

    /// Payload bytes retained per topic.
    pub fn history_bytes_max(&self) -> usize {
        self.history_bytes_max
    }

    /// Most topics on this node.
    pub fn topics_max(&self) -> usize {
        self.topics_max
    }

    /// Most subscriptions per connection.
    pub fn subscriptions_per_connection_max(&self) -> usize {
        self.subscriptions_per_connection_max
    }

    /// Share of each shard's topic table one client address may keep
    /// subscribed, in percent.
    pub fn client_topics_share_percent(&self) -> usize {
        self.client_topics_share_percent
    }

    /// Most client connections on this node.
    pub fn connections_max(&self) -> usize {
        self.connections_max
    }

    /// Time allowed for a complete request head.
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    /// WebSocket silence before a ping.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// Time spent flushing on shutdown.
    pub fn drain_timeout(&self) -> Duration {
        self.drain_timeout
    }

    /// Shortest time between two fan-out writes of a shard while messages
    /// keep coming (zero: a write after every pass).
    pub fn flush_interval(&self) -> Duration {
        self.flush_interval
    }

    /// Whether every connection starts with a PROXY v2 header.
    pub fn proxy_protocol(&self) -> bool {
        self.proxy_protocol
    }

    /// This node's address in its cluster.
    pub fn advertise(&self) -> &str {
        &self.advertise
    }

    /// The cluster's member set and topic owners.
    pub fn topology(&self) -> &proto::cluster::Topology {
        &self.topology
    }

    /// Whether the member set came from `--peer` (else: this node alone,
    /// or etcd).
    pub fn static_peers(&self) -> bool {
        self.static_peers
    }

    /// The ownership table's size in slots.
    pub fn table_size(&self) -> usize {
        self.table_size
    }

    /// etcd's client address and the cluster's name, when membership comes
    /// from etcd.
    pub fn etcd(&self) -> Option<(&str, &str)> {
        self.etcd.as_ref().map(|(e, c)| (e.as_str(), c.as_str()))
    }

    /// Which shard serves a topic socket.
    pub fn topic_sockets(&self) -> TopicSockets {
        self.topic_sockets
    }

    /// Where durable topics keep their logs.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// When durable writes are fsynced.
    pub fn fsync(&self) -> FsyncPolicy {
        self.fsync
    }

    /// Fsync interval under `FsyncPolicy::Interval`.
    pub fn fsync_interval(&self) -> Duration {
        self.fsync_interval
    }

    /// Segment roll size, bytes.
    pub fn segment_bytes_max(&self) -> u64 {
        self.segment_bytes_max
    }

    /// Durable topics declared by configuration.
    pub fn durable_topics(&self) -> &[(proto::topic::TopicName, DurableSpec)] {
        &self.durable_topics
    }

    /// Where sealed segments and snapshots go.
    pub fn object_store(&self) -> &objstore::Target {
        &self.object_store
    }

    /// Whether the object store was named (`--object-store` or the file);
    /// else it is this node's own directory, which a cluster's durable
    /// topics cannot move through.
    pub fn object_store_named(&self) -> bool {
        self.object_store_named
    }

    /// Longest wait before a segment with `stored` publishers is sealed.
    pub fn upload_interval(&self) -> Duration {
        self.upload_interval
    }

    /// Snapshot period; zero for on demand only.
    pub fn snapshot_interval(&self) -> Duration {
        self.snapshot_interval
    }

    /// Snapshot to restore before serving.
    pub fn restore(&self) -> Option<&str> {
        self.restore.as_deref()
    }
}

impl Default for Config {
    fn default() -> Self {
        let listen = SocketAddr::from(([0, 0, 0, 0], 8080));
        Config {
            listen,
            shards: online_cores(),
            message_bytes_max: limits::MESSAGE_BYTES_MAX_DEFAULT,
            send_queue_bytes_max: limits::SEND_QUEUE_BYTES_MAX_DEFAULT,
            slow_consumer_policy: SlowConsumerPolicy::Disconnect,
            history_messages_max: limits::HISTORY_MESSAGES_MAX_DEFAULT,
            history_bytes_max: limits::HISTORY_BYTES_MAX_DEFAULT,
            topics_max: limits::TOPICS_MAX_DEFAULT,
            subscriptions_per_connection_max: limits::SUBSCRIPTIONS_PER_CONNECTION_MAX_DEFAULT,
            client_topics_share_percent: limits::CLIENT_TOPICS_SHARE_PERCENT_DEFAULT,
            connections_max: limits::CONNECTIONS_MAX_DEFAULT,
            handshake_timeout: Duration::from_millis(limits::HANDSHAKE_TIMEOUT_MS_DEFAULT),
            idle_timeout: Duration::from_millis(limits::IDLE_TIMEOUT_MS_DEFAULT),
            drain_timeout: Duration::from_millis(limits::DRAIN_TIMEOUT_MS_DEFAULT),
            flush_interval: Duration::from_micros(limits::FLUSH_INTERVAL_US_DEFAULT),
            proxy_protocol: false,
            topic_sockets: TopicSockets::Owner,
            data_dir: PathBuf::from(DATA_DIR_DEFAULT),
            fsync: FsyncPolicy::Always,
            fsync_interval: Duration::from_millis(FSYNC_INTERVAL_MS_DEFAULT),
            segment_bytes_max: proto::durable::SEGMENT_BYTES_MAX_DEFAULT,
            durable_topics: Vec::new(),
            object_store: objstore::Target::Dir(PathBuf::from(DATA_DIR_DEFAULT).join("objects")),
            object_store_named: false,
            upload_interval: Duration::from_millis(UPLOAD_INTERVAL_MS_DEFAULT),
            snapshot_interval: Duration::from_millis(SNAPSHOT_INTERVAL_MS_DEFAULT),
            restore: None,
            advertise: listen.to_string(),
            topology: proto::cluster::Topology::new(1, &[listen.to_string()]).expect("one member fits"),
            static_peers: false,
            table_size: proto::maglev::TABLE_SIZE_DEFAULT,
            etcd: None,
        }
    }
}

impl Config {
    /// Merges flags over the file over defaults, then validates.
    pub fn from_args(args: &Args) -> Result<Config, ConfigError> {
        let file: FileConfig = read_file(args.config.as_deref())?;
        let d = Config::default();
        let ms = Duration::from_millis;
        let history_memory_max = pick!(args, file, history_memory_max, limits::HISTORY_MEMORY_MAX_DEFAULT);
        let data_dir = args.data_dir.clone().or(file.data_dir.clone()).unwrap_or(d.data_dir);
        let config = Config {
            listen: pick!(args, file, listen, d.listen),
            shards: pick!(args, file, shards, d.shards),
            message_bytes_max: pick!(args, file, message_bytes_max, d.message_bytes_max),
            send_queue_bytes_max: pick!(args, file, send_queue_bytes_max, d.send_queue_bytes_max),
            slow_consumer_policy: pick!(args, file, slow_consumer_policy, d.slow_consumer_policy),
            history_messages_max: pick!(args, file, history_messages_max, d.history_messages_max),
            history_bytes_max: pick!(args, file, history_bytes_max, d.history_bytes_max),
            topics_max: pick!(args, file, topics_max, d.topics_max),
            subscriptions_per_connection_max: pick!(
                args,
                file,
                subscriptions_per_connection_max,
                d.subscriptions_per_connection_max
            ),
            client_topics_share_percent: pick!(args, file, client_topics_share_percent, d.client_topics_share_percent),
            connections_max: pick!(args, file, connections_max, d.connections_max),
            handshake_timeout: ms(pick!(args, file, handshake_timeout_ms, d.handshake_timeout.as_millis() as u64)),
            idle_timeout: ms(pick!(args, file, idle_timeout_ms, d.idle_timeout.as_millis() as u64)),
            drain_timeout: ms(pick!(args, file, drain_timeout_ms, d.drain_timeout.as_millis() as u64)),
            flush_interval: Duration::from_micros(pick!(
                args,
                file,
                flush_interval_us,
                d.flush_interval.as_micros() as u64
            )),
            proxy_protocol: args.proxy_protocol || file.proxy_protocol.unwrap_or(d.proxy_protocol),
            topic_sockets: pick!(args, file, topic_sockets, d.topic_sockets),
            data_dir: data_dir.clone(),
            fsync: pick!(args, file, fsync, d.fsync),
            fsync_interval: ms(pick!(args, file, fsync_interval_ms, d.fsync_interval.as_millis() as u64)),
            segment_bytes_max: pick!(args, file, segment_bytes_max, d.segment_bytes_max),
            durable_topics: durable_topics(&args.durable, &file.durable_topics)?,
            object_store: object_store(args, &file, &data_dir),
            object_store_named: args.object_store.is_some() || file.object_store.is_some(),
            upload_interval: ms(pick!(args, file, upload_interval_ms, UPLOAD_INTERVAL_MS_DEFAULT)),
            snapshot_interval: ms(pick!(args, file, snapshot_interval_ms, SNAPSHOT_INTERVAL_MS_DEFAULT)),
            restore: args.restore.clone(),
            advertise: String::new(),
            topology: d.topology.clone(),
            static_peers: false,
            table_size: proto::maglev::TABLE_SIZE_DEFAULT,
            etcd: None,
        };
        let mut config = config;
        let listen = config.listen;
        config.advertise = args.advertise.clone().or(file.advertise.clone()).unwrap_or_else(|| listen.to_string());
        let peers = if args.peers.is_empty() { file.peers.clone() } else { args.peers.clone() };
        config.static_peers = !peers.is_empty();
        let etcd = args.etcd.clone().or(file.etcd.clone());
        if etcd.is_some() && config.static_peers {
            return Err(ConfigError::Invalid("--etcd and --peer do not combine: one source of membership".into()));
        }
        let cluster_name = args.cluster_name.clone().or(file.cluster_name.clone()).unwrap_or_else(|| "rayflux".into());
        if cluster_name.is_empty() || !cluster_name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(ConfigError::Invalid(format!("cluster name {cluster_name:?}: letters, digits, - _ . only")));
        }
        config.etcd = etcd.map(|e| (e, cluster_name));
        let members = if peers.is_empty() { vec![config.advertise.clone()] } else { peers };
        if !members.contains(&config.advertise) {
            return Err(ConfigError::Invalid(format!(
                "this node's address {} is not among the peers {members:?} (see --advertise)",
                config.advertise
            )));
        }
        config.table_size = args.table_size.or(file.table_size).unwrap_or(proto::maglev::TABLE_SIZE_DEFAULT);
        if !(TABLE_SIZE_MIN..=TABLE_SIZE_MAX).contains(&config.table_size) {
            return Err(ConfigError::Invalid(format!(
                "table_size must be a prime in {TABLE_SIZE_MIN}..={TABLE_SIZE_MAX}, got {}",
                config.table_size
            )));
        }
        config.topology = proto::cluster::Topology::with_table_size(1, &members, config.table_size)
            .map_err(|e| ConfigError::Invalid(format!("peers or table_size: {e}")))?;
        config.validate(history_memory_max)?;
        Ok(config)
    }

    fn validate(&self, history_memory_max: usize) -> Result<(), ConfigError> {
        let fail = |m: String| Err(ConfigError::Invalid(m));
        if self.segment_bytes_max < 1 << 16 || self.segment_bytes_max > 1 << 32 {
            return fail(format!("segment_bytes_max must be 65536..=4294967296, got {}", self.segment_bytes_max));
        }
        if self.fsync_interval.is_zero() || self.upload_interval.is_zero() {
            return fail("fsync_interval_ms and upload_interval_ms must be at least 1".into());
        }
        if self.shards == 0 || self.shards > limits::SHARDS_MAX {
            return fail(format!("shards must be 1..={}, got {}", limits::SHARDS_MAX, self.shards));
        }
        if self.message_bytes_max == 0 || self.message_bytes_max > limits::MESSAGE_BYTES_MAX_CEILING {
            return fail(format!(
                "message_bytes_max must be 1..={}, got {}",
                limits::MESSAGE_BYTES_MAX_CEILING,
                self.message_bytes_max
            ));
        }
        if self.send_queue_bytes_max < self.message_bytes_max + 64 {
            return fail("send_queue_bytes_max must hold at least one largest message".into());
        }
        if self.history_bytes_max > self.send_queue_bytes_max {
            return fail(format!(
                "history_bytes_max ({}) must not exceed send_queue_bytes_max ({}): a full replay must fit an empty send queue",
                self.history_bytes_max, self.send_queue_bytes_max
            ));
        }
        if self.history_messages_max == 0 || self.history_bytes_max == 0 {
            return fail("history_messages_max and history_bytes_max must be at least 1".into());
        }
        if self.topics_max == 0 || self.subscriptions_per_connection_max == 0 {
            return fail("topics_max and subscriptions_per_connection_max must be at least 1".into());
        }
        if !(1..=100).contains(&self.client_topics_share_percent) {
            return fail(format!(
                "client_topics_share_percent must be 1..=100, got {}",
                self.client_topics_share_percent
            ));
        }
        match self.topics_max.checked_mul(self.history_bytes_max) {
            Some(total) if total <= history_memory_max => {}
            _ => {
                return fail(format!(
                    "topics_max x history_bytes_max exceeds history_memory_max ({history_memory_max} bytes)"
                ))
            }
        }
        if self.flush_interval > Duration::from_micros(limits::FLUSH_INTERVAL_US_MAX) {
            return fail(format!(
                "flush_interval_us must be 0..={}, got {}",
                limits::FLUSH_INTERVAL_US_MAX,
                self.flush_interval.as_micros()
            ));
        }
        if self.connections_max < self.shards {
            return fail("connections_max must be at least one per shard".into());
        }
        for (name, value) in [
            ("handshake_timeout_ms", self.handshake_timeout),
            ("idle_timeout_ms", self.idle_timeout),
            ("drain_timeout_ms", self.drain_timeout),
        ] {
            if value.is_zero() {
                return fail(format!("{name} must be at least 1"));
            }
        }
        Ok(())
    }
}

fn online_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(limits::SHARDS_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["fluxnode"];
        v.extend_from_slice(extra);
        Args::parse_from(v)
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::from_args(&args(&[])).expect("defaults validate");
        assert_eq!(c.listen.port(), 8080);
        assert!(c.shards >= 1);
    }

    #[test]
    fn flags_override_file_and_unknown_keys_fail() {
        let dir = std::env::temp_dir().join(format!("fluxnode-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, "shards = 1\ntopics_max = 10\n").unwrap();
        let c = Config::from_args(&args(&["--config", good.to_str().unwrap(), "--topics-max", "20"])).unwrap();
        assert_eq!(c.shards, 1);
        assert_eq!(c.topics_max, 20);
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "shardz = 1\n").unwrap();
        assert!(matches!(
            Config::from_args(&args(&["--config", bad.to_str().unwrap()])),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn the_documented_example_file_is_valid_and_matches_the_defaults() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/fluxnode.example.toml");
        let c = Config::from_args(&args(&["--config", path])).expect("example validates");
        let d = Config::default();
        assert_eq!(c.message_bytes_max, d.message_bytes_max);
        assert_eq!(c.send_queue_bytes_max, d.send_queue_bytes_max);
        assert_eq!(c.history_bytes_max, d.history_bytes_max);
        assert_eq!(c.topics_max, d.topics_max);
        assert_eq!(c.client_topics_share_percent, d.client_topics_share_percent);
        assert_eq!(c.connections_max, d.connections_max);
        assert_eq!(c.idle_timeout, d.idle_timeout);
        assert_eq!(c.drain_timeout, d.drain_timeout);
        assert_eq!(c.proxy_protocol, d.proxy_protocol);
        assert_eq!(c.topic_sockets, d.topic_sockets);
    }

    #[test]
    fn topic_sockets_come_from_the_flag_or_the_file() {
        assert_eq!(Config::default().topic_sockets, TopicSockets::Owner);
        let c = Config::from_args(&args(&["--topic-sockets", "accepting"])).unwrap();
        assert_eq!(c.topic_sockets, TopicSockets::Accepting);
        let dir = std::env::temp_dir().join(format!("fluxnode-config-ts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("accepting.toml");
        std::fs::write(&file, "topic_sockets = \"accepting\"\n").unwrap();
        let c = Config::from_args(&args(&["--config", file.to_str().unwrap()])).unwrap();
        assert_eq!(c.topic_sockets, TopicSockets::Accepting);
    }

    #[test]
    fn contradictions_are_refused() {
        assert!(Config::from_args(&args(&["--shards", "0"])).is_err());
        assert!(Config::from_args(&args(&["--history-bytes-max", "9000000"])).is_err());
        assert!(Config::from_args(&args(&["--send-queue-bytes-max", "100"])).is_err());
        assert!(Config::from_args(&args(&["--idle-timeout-ms", "0"])).is_err());
        assert!(Config::from_args(&args(&["--flush-interval-us", "10001"])).is_err());
        let off = Config::from_args(&args(&["--flush-interval-us", "0"])).unwrap();
        assert_eq!(off.flush_interval(), Duration::ZERO);
        assert_eq!(Config::default().flush_interval(), Duration::from_micros(1000));
    }
}
