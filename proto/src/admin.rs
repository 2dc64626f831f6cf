//! The JSON bodies of the node's and the balancer's HTTP APIs, typed once,
//! so that the servers that write them and the tools that read them
//! (`fluxctl`, tests) cannot disagree. Documented in docs/PROTOCOL.md.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Every error body: `{"error": code, "message": text}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable code (`invalid_topic`, `too_many_topics`, ...).
    pub error: String,
    /// Words for a person.
    pub message: String,
}

/// `/healthz` and `/readyz`: `{"status": "ok" | "ready" | "not ready" | "full"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusBody {
    /// The state.
    pub status: String,
}

/// The answer to an HTTP publish (`POST /publish`, `POST /v1/topics/{topic}`),
/// as the original RayFlux server answered: `{"seq", "status", "topic"}`,
/// keys in this order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishAnswer {
    /// The sequence number the message got.
    pub seq: u64,
    /// Always "message accepted".
    pub status: String,
    /// The topic.
    pub topic: String,
}

impl PublishAnswer {
    /// The answer for message `seq` of `topic`.
    pub fn accepted(topic: &str, seq: u64) -> PublishAnswer {
        PublishAnswer { seq, status: "message accepted".into(), topic: topic.into() }
    }
}

/// One topic as the node lists it (`GET /v1/topics`, `GET /v1/topics/{topic}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicInfo {
    /// The name.
    pub topic: String,
    /// Last sequence assigned (0: none yet).
    pub last_seq: u64,
    /// First sequence still retained (`last_seq + 1` when none is).
    pub first_seq: u64,
    /// Messages retained for resume.
    pub retained_messages: u64,
    /// Payload bytes retained for resume.
    pub retained_bytes: u64,
    /// Subscribers on every shard.
    pub subscribers: u64,
    /// Publishes in the last complete second.
    pub publish_rate_per_sec: u64,
    /// The shard that sequences it.
    pub owner_shard: usize,
    /// Its sequence space, 16 hex digits.
    pub epoch: String,
    /// Set for a durable topic: its declaration and log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durable: Option<DurableInfo>,
}

/// A durable topic's declaration and log figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DurableInfo {
    /// Default acknowledgement level (`none` or `local`).
    pub ack: String,
    /// Retention bounds.
    pub retention: crate::durable::Retention,
    /// First sequence readable with `/messages` or a resume (in the object
    /// store when older segments left the disk).
    pub log_first_seq: u64,
    /// First sequence on local disk.
    #[serde(default)]
    pub local_first_seq: u64,
    /// Records on local disk.
    pub log_messages: u64,
    /// Bytes of records on local disk.
    pub log_bytes: u64,
    /// Bytes of segments only in the object store (tiered reads).
    #[serde(default)]
    pub archived_bytes: u64,
    /// Segments only in the object store.
    #[serde(default)]
    pub archived_segments: u64,
    /// Segment files.
    pub segments: u64,
    /// Distinct keys in the key index.
    pub keys: u64,
    /// Messages sequenced and waiting for the disk.
    pub unwritten: u64,
    /// Writing failed: the topic takes no publishes until a restart.
    pub failed: bool,
}

/// One message read from a durable topic's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogMessage {
    /// Its sequence.
    pub seq: u64,
    /// When it was sequenced, ms since the Unix epoch.
    pub ts: u64,
    /// Its key, if any (as UTF-8, lossy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// A text payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// A binary payload, base64 (standard alphabet, padded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
    /// Its kind (`command`, `query`, `event`...), if it was given one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The publisher's id for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// Its headers.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub headers: std::collections::BTreeMap<String, String>,
}

/// A page of a durable topic's log (`GET /v1/topics/{topic}/messages`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPage {
    /// The topic.
    pub topic: String,
    /// Its sequence space, 16 hex digits.
    pub epoch: String,
    /// First sequence in the log.
    pub first_seq: u64,
    /// Last sequence written.
    pub last_seq: u64,
    /// The messages, in sequence order.
    pub messages: Vec<LogMessage>,
    /// Pass as `from_seq` for the next page (with the same `key`); absent
    /// when this page reached the end of what is written.
    pub next_seq: Option<u64>,
}

/// A page of the node's topic listing: names in byte order after the
/// request's `after`; `next` is the cursor of the following page, if any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicPage {
    /// The topics of this page.
    pub topics: Vec<TopicInfo>,
    /// Pass as `after` for the next page; absent on the last.
    pub next: Option<String>,
}

/// Where a node came from. A DNS answer replaces only DNS nodes; the admin
/// API may remove any node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `--node` or the config file.
    Static,
    /// The `--dns` name.
    Dns,
    /// Added through the admin API.
    Admin,
}

/// What the health checks last concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// In the table unless draining.
    Up,
    /// Out of the table until `rise` checks pass.
    Down,
}

/// One node as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// Address.
    pub addr: SocketAddr,
    /// Where it came from.
    pub source: Source,
    /// Health-check verdict.
    pub health: Health,
    /// Getting no new connections.
    pub draining: bool,
    /// In the current table.
    pub routable: bool,
    /// Piped connections open now.
    pub connections_current: u64,
    /// Piped connections opened.
    pub connections_total: u64,
    /// Connect attempts that failed.
    pub connect_failures: u64,
    /// Bytes piped from clients to the node.
    pub bytes_to_node: u64,
    /// Bytes piped from the node to clients.
    pub bytes_from_node: u64,
}

/// A node's delivery latency distribution (`GET /v1/latency`): publish
/// (sequencing) to the socket write, every shard merged, as the HdrHistogram
/// percentile iteration gives it (the rows of a `.hgrm` file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyReport {
    /// Deliveries counted.
    pub count: u64,
    /// The distribution, in increasing percentile.
    pub points: Vec<LatencyPoint>,
}

/// One row of a [`LatencyReport`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencyPoint {
    /// The latency, microseconds.
    pub value_us: u64,
    /// The fraction of deliveries at or below it (0 to 1).
    pub quantile: f64,
    /// Deliveries at or below it.
    pub total_count: u64,
}

/// Where the balancer sends a topic (`GET /v1/locate?topic=T`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Located {
    /// The topic (or `key`) asked about.
    pub topic: String,
    /// The node its connections go to now.
    pub node: SocketAddr,
}

/// The balancer's node listing (`GET /v1/nodes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeList {
    /// Every member, in address order.
    pub nodes: Vec<MemberInfo>,
}

/// A manifest: every durable topic's uploaded segments at one moment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Its id (milliseconds since the Unix epoch, zero-padded: ids sort in
    /// time order).
    pub id: String,
    /// When it was made, ms since the Unix epoch.
    pub created_ms: u64,
    /// The topics.
    pub topics: Vec<ManifestTopic>,
}

/// One durable topic in a manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestTopic {
    /// Its name.
    pub topic: String,
    /// Its epoch when the snapshot was made.
    pub epoch: String,
    /// Its declaration.
    pub spec: crate::durable::DurableSpec,
    /// Its directory name (on disk and in the store).
    pub dir: String,
    /// Its segments, oldest first.
    pub segments: Vec<ManifestSegment>,
}

/// One segment in a manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestSegment {
    /// Its first sequence.
    pub base_seq: u64,
    /// Its last sequence.
    pub last_seq: u64,
    /// Its length, bytes.
    pub bytes: u64,
    /// Its key in the store.
    pub key: String,
    /// Timestamps of its first and last record, ms (0 in manifests older
    /// than tiered reads).
    #[serde(default)]
    pub first_ms: u64,
    /// See `first_ms`.
    #[serde(default)]
    pub last_ms: u64,
}

/// A snapshot just made (`POST /v1/snapshots`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMade {
    /// Its id.
    pub id: String,
    /// Durable topics in it.
    pub topics: u64,
    /// Segments it names.
    pub segments: u64,
    /// Bytes of those segments.
    pub bytes: u64,
}

/// Snapshot ids in the object store, oldest first (`GET /v1/snapshots`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotList {
    /// The ids.
    pub snapshots: Vec<String>,
}

/// `GET /v1/cluster`: the node's view of its cluster (static membership
/// for now: `--peer` flags, version 1; a single node is its own cluster).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterBody {
    /// Where membership comes from: `single` or `static`.
    pub membership: String,
    /// The member set's version.
    pub version: u64,
    /// This node's address in the set.
    pub node: String,
    /// The members, sorted.
    pub members: Vec<String>,
    /// With `?topic=`: the topic and the member that owns it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// See `topic`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Whether this node serves the topics other members own (it forwards
    /// their publishes and follows them for its subscribers): true in a
    /// cluster of more than one member.
    pub forwarding: bool,
}
