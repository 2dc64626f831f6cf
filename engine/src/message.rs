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
    /// Monotonic time of sequencing, for publish-to-write latency.
    pub published_at: Instant,
}

/// Milliseconds since the Unix epoch, 0 if the clock is before it.
pub fn unix_time_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
