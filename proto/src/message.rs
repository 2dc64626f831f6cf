//! A published message as the owner shard sequenced it.

use std::time::Instant;

use bytes::Bytes;

/// Whether a payload was published as text (valid UTF-8) or binary. Raw
/// topic sockets deliver each message with the opcode it was published with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadKind {
    /// A WebSocket text frame or a JSON string; the payload is valid UTF-8.
    Text,
    /// A WebSocket binary frame or a raw HTTP body.
    Binary,
}

/// One sequenced message. Created once by the topic's owner shard; cloned
/// (reference-counted payload) into history, batches and every shard that
/// has subscribers. `Send`: it crosses shards inside batches.
#[derive(Clone, Debug)]
pub struct Message {
    /// Per-topic sequence number: starts at 1, no gaps.
    pub seq: u64,
    /// Server time of sequencing, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Text or binary.
    pub kind: PayloadKind,
    /// The payload bytes, shared.
    pub payload: Bytes,
    /// The routing key / aggregate id it was published with, if any
    /// (consumer groups partition by it; durable topics index it).
    pub key: Option<Bytes>,
    /// A request's return address: where its reply goes.
    pub reply_to: Option<ReplyTo>,
    /// Its kind, id and headers, when the publisher gave any (shared: a
    /// message crosses shards and is cloned per subscribing shard).
    pub meta: Option<std::sync::Arc<Meta>>,
    /// Monotonic time of sequencing, for publish-to-write latency.
    pub published_at: Instant,
}

/// What a message is, in Flux Capacitor's terms: stuff to do, to ask, to
/// announce, and the answers and measurements that follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// Stuff you want to do.
    Command,
    /// Stuff you want to ask.
    Query,
    /// Stuff you want to announce.
    Event,
    /// A command's or query's result.
    Result,
    /// A command's or query's failure.
    Error,
    /// An application metric.
    Metric,
    /// A scheduled message.
    Schedule,
}

impl MessageKind {
    /// All kinds, for parsing and documentation.
    pub const ALL: [MessageKind; 7] = [
        MessageKind::Command,
        MessageKind::Query,
        MessageKind::Event,
        MessageKind::Result,
        MessageKind::Error,
        MessageKind::Metric,
        MessageKind::Schedule,
    ];

    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Command => "command",
            MessageKind::Query => "query",
            MessageKind::Event => "event",
            MessageKind::Result => "result",
            MessageKind::Error => "error",
            MessageKind::Metric => "metric",
            MessageKind::Schedule => "schedule",
        }
    }

    /// The kind named `name`.
    pub fn parse(name: &str) -> Option<MessageKind> {
        MessageKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// Headers one message may carry.
pub const HEADERS_MAX: usize = 32;
/// Bytes of a header name.
pub const HEADER_NAME_BYTES_MAX: usize = 64;
/// Bytes of a header value.
pub const HEADER_VALUE_BYTES_MAX: usize = 1024;
/// Bytes of a message id.
pub const MESSAGE_ID_BYTES_MAX: usize = 128;
/// Header names reserved for what the log keeps of `Meta` (a durable
/// topic's record stores kind and id as headers with these names).
pub const KIND_HEADER: &str = "rayflux-kind";
/// See [`KIND_HEADER`].
pub const ID_HEADER: &str = "rayflux-message-id";
/// See [`KIND_HEADER`]: a request's return address, so that a consumer
/// group reading the log can still answer it (after a restart the address
/// names a request that is gone, and the reply is told `requester_gone`).
pub const REPLY_TO_HEADER: &str = "rayflux-reply-to";

/// A schedule journal's record of a pending schedule: its id (first header).
pub const SCHEDULE_ID_HEADER: &str = "rayflux-schedule-id";
/// A schedule journal's record that a schedule is no longer pending.
pub const SCHEDULE_DONE_HEADER: &str = "rayflux-schedule-done";
/// A schedule journal's record that a schedule fired as the message
/// numbered its record's `seq`, not yet written (it carries the schedule).
pub const SCHEDULE_FIRING_HEADER: &str = "rayflux-schedule-firing";
/// A schedule journal's record that the message numbered its `seq` is
/// written.
pub const SCHEDULE_FIRED_HEADER: &str = "rayflux-schedule-fired";

/// Whether `name` is a header name the log reserves.
pub fn reserved_header(name: &str) -> bool {
    [
        KIND_HEADER,
        ID_HEADER,
        REPLY_TO_HEADER,
        SCHEDULE_ID_HEADER,
        SCHEDULE_DONE_HEADER,
        SCHEDULE_FIRING_HEADER,
        SCHEDULE_FIRED_HEADER,
    ]
    .iter()
    .any(|r| name.eq_ignore_ascii_case(r))
}

/// A message's metadata: carried end to end, shown in native envelopes.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Meta {
    /// What it is.
    pub kind: Option<MessageKind>,
    /// The publisher's id for it.
    pub id: Option<String>,
    /// String headers, in the order given.
    pub headers: Vec<(String, String)>,
}

impl Meta {
    /// The headers a durable record keeps: kind and id as reserved headers
    /// first, then the message's own.
    pub fn to_record_headers(&self) -> Vec<(String, String)> {
        let mut out = Vec::with_capacity(self.headers.len() + 2);
        if let Some(kind) = self.kind {
            out.push((KIND_HEADER.to_string(), kind.as_str().to_string()));
        }
        if let Some(id) = &self.id {
            out.push((ID_HEADER.to_string(), id.clone()));
        }
        out.extend(self.headers.iter().cloned());
        out
    }

    /// Metadata back from a record's headers (none when it had none), and
    /// the request's return address it kept.
    pub fn from_record_headers(headers: Vec<(String, String)>) -> (Option<std::sync::Arc<Meta>>, Option<ReplyTo>) {
        let mut meta = Meta::default();
        let mut reply_to = None;
        let mut any = false;
        for (name, value) in headers {
            match name.as_str() {
                KIND_HEADER => meta.kind = MessageKind::parse(&value),
                ID_HEADER => meta.id = Some(value),
                REPLY_TO_HEADER => {
                    reply_to = value.parse().ok();
                    continue;
                }
                _ => meta.headers.push((name, value)),
            }
            any = true;
        }
        (any.then(|| std::sync::Arc::new(meta)), reply_to)
    }
}

impl Message {
    /// The headers its durable record keeps: its metadata's (see
    /// [`Meta::to_record_headers`]) and its return address if a request.
    pub fn record_headers(&self) -> Vec<(String, String)> {
        let mut out = self.meta.as_ref().map(|m| m.to_record_headers()).unwrap_or_default();
        if let Some(to) = self.reply_to {
            out.push((REPLY_TO_HEADER.to_string(), to.to_string()));
        }
        out
    }

    /// A message back from its durable record, read at `at`.
    pub fn from_record(record: crate::log::Record, at: std::time::Instant) -> Message {
        let (meta, reply_to) = Meta::from_record_headers(record.headers);
        Message {
            seq: record.seq,
            timestamp_ms: record.timestamp_ms,
            kind: record.kind,
            payload: record.payload,
            key: record.key,
            reply_to,
            meta,
            published_at: at,
        }
    }
}

/// Where a request's reply goes: the requester's shard, its request id
/// there, and a number only the requester's shard knows (so a connection
/// cannot answer a request it was not given by guessing the id; derived
/// from a per-process seed, not a cryptographic secret). The cluster will
/// add the node. On the wire, `"<shard>.<req>.<nonce hex>"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReplyTo {
    /// The requester's shard.
    pub shard: usize,
    /// The request's id on that shard.
    pub req: u64,
    /// Checked by the requester's shard.
    pub nonce: u64,
}

impl std::fmt::Display for ReplyTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{:016x}", self.shard, self.req, self.nonce)
    }
}

impl std::str::FromStr for ReplyTo {
    type Err = ();
    fn from_str(s: &str) -> Result<ReplyTo, ()> {
        let mut parts = s.split('.');
        let (Some(shard), Some(req), Some(nonce), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(());
        };
        Ok(ReplyTo {
            shard: shard.parse().map_err(|_| ())?,
            req: req.parse().map_err(|_| ())?,
            nonce: u64::from_str_radix(nonce, 16).map_err(|_| ())?,
        })
    }
}

/// Milliseconds since the Unix epoch, 0 if the clock is before it.
pub fn unix_time_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The identity of a topic's sequence space. A topic gets a new epoch each
/// time it is created: on a node's first publish or subscribe, after a
/// restart, after an eviction. Sequence numbers of two epochs are
/// unrelated, so a resume names the epoch its `from` belongs to, and one
/// from another epoch is told its history is lost instead of being served
/// the new epoch's numbers as if they were the old ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Epoch(pub u64);

impl std::fmt::Display for Epoch {
    /// Sixteen hex digits: a string on the wire (a JSON number would lose
    /// bits in JavaScript).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::str::FromStr for Epoch {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Epoch, Self::Err> {
        u64::from_str_radix(s, 16).map(Epoch)
    }
}

/// The time, read once by the shell and handed to the sans-IO cores (which
/// never read a clock): the monotonic instant for durations and latency,
/// and the wall clock for message timestamps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time.
    pub at: Instant,
    /// Milliseconds since the Unix epoch.
    pub unix_ms: u64,
}

impl Now {
    /// Reads both clocks (the shell's job).
    pub fn read() -> Now {
        Now { at: Instant::now(), unix_ms: unix_time_ms() }
    }
}
