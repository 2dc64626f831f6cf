//! Request/reply's shared types and limits: what a responder answers, and
//! how long a request may wait. The routing is in `broker` (its
//! `requests` part); the wire forms in `native`.

use bytes::Bytes;

use crate::message::PayloadKind;

/// Longest a request may wait for its reply.
pub const REQUEST_TIMEOUT_MS_MAX: u64 = 60_000;
/// A request's timeout when it names none.
pub const REQUEST_TIMEOUT_MS_DEFAULT: u64 = 5_000;
/// Requests waiting on one shard: past this a request is refused
/// (`too_many_requests`) rather than kept.
pub const REQUESTS_WAITING_MAX: usize = 100_000;

/// What a responder answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The result.
    Result {
        /// Text or binary.
        kind: PayloadKind,
        /// The result's bytes.
        payload: Bytes,
    },
    /// The responder failed: its code and message.
    Error {
        /// The responder's error code.
        code: String,
        /// Its message.
        message: String,
    },
}
