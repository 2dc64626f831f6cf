//! The native multiplexed protocol on `GET /v1/ws`: JSON requests with a
//! client-chosen id and one reply each, and the envelopes that carry
//! delivered messages. Pure encode/decode; see docs/PROTOCOL.md.

use std::borrow::Cow;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;

use crate::durable::{AckLevel, PublishOptions};
use crate::group::{
    GroupSettings, GroupStart, Settle, ACK_TIMEOUT_MS_DEFAULT, ACK_TIMEOUT_MS_MAX, ACK_TIMEOUT_MS_MIN,
    GROUP_NAME_BYTES_MAX, MAX_DELIVERIES_DEFAULT, NACK_DELAY_MS_MAX, PREFETCH_MAX,
};
use std::sync::Arc;

use crate::message::{
    Epoch, Message, MessageKind, Meta, PayloadKind, ReplyTo, HEADERS_MAX, HEADER_NAME_BYTES_MAX,
    HEADER_VALUE_BYTES_MAX, ID_HEADER, KIND_HEADER, MESSAGE_ID_BYTES_MAX, REPLY_TO_HEADER,
};
use crate::request::{Answer, REQUEST_TIMEOUT_MS_DEFAULT, REQUEST_TIMEOUT_MS_MAX};
use crate::schedule::{SCHEDULE_AHEAD_MS_MAX, SCHEDULE_ID_BYTES_MAX};
use crate::topic::TopicName;
use crate::ws;

/// First byte of a binary frame from the client: a binary publish.
pub const CLIENT_BINARY_PUBLISH: u8 = 0x01;
/// First byte of a binary frame from the client: a batch of binary
/// publishes to one topic, answered with one reply.
pub const CLIENT_BINARY_BATCH: u8 = 0x02;
/// Messages in one publish batch: a batch is answered once, when its last
/// message is, so this bounds what one reply waits for (and the frame's
/// size, within the node's message size limit, bounds its bytes).
pub const PUBLISH_BATCH_MAX: usize = 10_000;
/// First byte of a binary frame from the server: a delivered binary message.
pub const SERVER_BINARY_MESSAGE: u8 = 0x01;

/// First byte of a binary frame holding several deliveries (server to
/// client, only on a connection opened with `?delivery=batch`).
pub const SERVER_BINARY_BATCH: u8 = 0x02;

/// Bytes before each delivery in a batch: its length, u32 big-endian.
pub const BATCH_RECORD_LEN_BYTES: usize = 4;

/// One client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Subscribe to a topic, optionally resuming after `from_seq` of the
    /// sequence space `epoch` (see [`Epoch`]).
    /// Or from the first message at or after `since_ms` (ms since the Unix
    /// epoch).
    Subscribe { id: u64, topic: String, from_seq: Option<u64>, epoch: Option<Epoch>, since_ms: Option<u64> },
    /// Leave a topic.
    Unsubscribe { id: u64, topic: String },
    /// Publish a payload, with its key and acknowledgement level.
    Publish { id: u64, topic: String, kind: PayloadKind, payload: Bytes, options: PublishOptions },
    /// Publish binary payloads to one topic, in order, with one reply
    /// (binary frame `0x02`).
    PublishBatch { id: u64, topic: String, payloads: Vec<Bytes> },
    /// Liveness check; the reply carries `"pong": true`.
    Ping { id: u64 },
    /// Join consumer group `group` of a topic (`subscribe` with `group`).
    Join { id: u64, topic: String, group: String, prefetch: u32, settings: GroupSettings, dead_letter: Option<String> },
    /// Leave a consumer group (`unsubscribe` with `group`).
    Leave { id: u64, topic: String, group: String },
    /// A member's ack, refusal or prefetch change (`ack`, `nack`,
    /// `prefetch`); answered only when it has an `id`.
    Settle { id: Option<u64>, topic: String, group: String, settle: Settle },
    /// A request to a topic's responders; answered with their reply.
    Ask { id: u64, topic: String, payload: Bytes, key: Option<Bytes>, meta: Option<Arc<Meta>>, timeout_ms: u64 },
    /// A publish for later (`deliver_at` or `delay_ms`, or a
    /// `schedule_id`): kept by the topic's owner until due.
    Schedule {
        id: u64,
        topic: String,
        payload: Bytes,
        key: Option<Bytes>,
        meta: Option<Arc<Meta>>,
        deliver_at: Option<u64>,
        delay_ms: Option<u64>,
        schedule_id: Option<String>,
        if_absent: bool,
    },
    /// Cancel a pending schedule (`cancel`).
    CancelSchedule { id: u64, topic: String, schedule_id: String },
    /// List a topic's pending schedules (`schedules`).
    ListSchedules { id: u64, topic: String },
    /// Delete a consumer group that has no members, with its position
    /// (`delete_group`).
    DeleteGroup { id: u64, topic: String, group: String },
    /// A responder's reply to the request `to` names, with an optional ack
    /// of the request's delivery (`topic`, `group`, `seq`); answered only
    /// when it has an `id`.
    Reply { id: Option<u64>, to: ReplyTo, answer: Answer, ack: Option<(String, String, u64)> },
}

/// Default prefetch of a group member: unacknowledged messages it holds.
pub const PREFETCH_DEFAULT: u32 = 100;

/// A request the server cannot act on, with the id to answer if known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest {
    /// The request's id, when it could be read.
    pub id: Option<u64>,
    /// Error code (`bad_request` or `unknown_op`).
    pub code: &'static str,
    /// Human-readable detail.
    pub message: String,
}

/// The JSON shape of a request: every field any op uses. Unknown fields are
/// refused, so a client never believes a feature is on when it is not.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireRequest<'a> {
    #[serde(borrow)]
    op: Cow<'a, str>,
    id: Option<u64>,
    #[serde(borrow)]
    topic: Option<Cow<'a, str>>,
    from_seq: Option<u64>,
    since_ms: Option<u64>,
    #[serde(borrow)]
    epoch: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: Option<Cow<'a, str>>,
    #[serde(borrow)]
    key: Option<Cow<'a, str>>,
    #[serde(borrow)]
    ack: Option<Cow<'a, str>>,
    #[serde(borrow)]
    group: Option<Cow<'a, str>>,
    prefetch: Option<u32>,
    ack_timeout_ms: Option<u64>,
    max_deliveries: Option<u32>,
    #[serde(borrow)]
    dead_letter: Option<Cow<'a, str>>,
    #[serde(borrow)]
    start: Option<Cow<'a, str>>,
    seq: Option<u64>,
    through_tag: Option<u64>,
    delay_ms: Option<u64>,
    timeout_ms: Option<u64>,
    #[serde(borrow)]
    kind: Option<Cow<'a, str>>,
    message_id: Option<String>,
    headers: Option<std::collections::BTreeMap<String, String>>,
    deliver_at: Option<u64>,
    #[serde(borrow)]
    schedule_id: Option<Cow<'a, str>>,
    if_absent: Option<bool>,
    #[serde(borrow)]
    to: Option<Cow<'a, str>>,
    error: Option<WireError>,
}

/// A responder's error, as its `reply` carries it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireError {
    code: String,
    message: String,
}

#[derive(Deserialize)]
struct IdOnly {
    id: Option<u64>,
}

/// Parses a text frame as a JSON request.
pub fn parse_text(text: &[u8]) -> Result<Request, BadRequest> {
    let wire: WireRequest = serde_json::from_slice(text).map_err(|e| BadRequest {
        id: serde_json::from_slice::<IdOnly>(text).ok().and_then(|i| i.id),
        code: "bad_request",
        message: e.to_string(),
    })?;
    let id = wire.id.unwrap_or(0);
    let bad = |message: &str| BadRequest { id: Some(id), code: "bad_request", message: message.to_string() };
    let topic = || wire.topic.as_deref().map(str::to_string).ok_or_else(|| bad("missing \"topic\""));
    let key = || {
        let key = wire.key.as_deref().map(|k| Bytes::copy_from_slice(k.as_bytes()));
        if key.as_ref().is_some_and(|k| k.len() > crate::limits::KEY_BYTES_MAX) {
            return Err(bad(&format!("\"key\" is longer than {} bytes", crate::limits::KEY_BYTES_MAX)));
        }
        Ok(key)
    };
    let meta = || -> Result<Option<Arc<Meta>>, BadRequest> {
        let kind = match wire.kind.as_deref() {
            None => None,
            Some(k) => Some(MessageKind::parse(k).ok_or_else(|| {
                let names: Vec<&str> = MessageKind::ALL.iter().map(|k| k.as_str()).collect();
                bad(&format!("\"kind\" is one of {}", names.join(", ")))
            })?),
        };
        if wire.message_id.as_ref().is_some_and(|i| i.is_empty() || i.len() > MESSAGE_ID_BYTES_MAX) {
            return Err(bad(&format!("\"message_id\" is 1 to {MESSAGE_ID_BYTES_MAX} bytes")));
        }
        let headers: Vec<(String, String)> = wire.headers.clone().unwrap_or_default().into_iter().collect();
        let fits = |(n, v): &(String, String)| {
            !n.is_empty() && n.len() <= HEADER_NAME_BYTES_MAX && v.len() <= HEADER_VALUE_BYTES_MAX
        };
        if headers.len() > HEADERS_MAX
            || !headers.iter().all(fits)
            || headers.iter().any(|(n, _)| crate::message::reserved_header(n))
        {
            return Err(bad(&format!(
                "\"headers\": at most {HEADERS_MAX}, names 1 to {HEADER_NAME_BYTES_MAX} bytes (not {KIND_HEADER}, \
                 {ID_HEADER} or {REPLY_TO_HEADER}), values up to {HEADER_VALUE_BYTES_MAX}"
            )));
        }
        if kind.is_none() && wire.message_id.is_none() && headers.is_empty() {
            return Ok(None);
        }
        Ok(Some(Arc::new(Meta { kind, id: wire.message_id.clone(), headers })))
    };
    let group = || {
        let g = wire.group.as_deref().ok_or_else(|| bad("missing \"group\""))?;
        let charset = g.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if g.is_empty() || g.len() > GROUP_NAME_BYTES_MAX || !charset {
            return Err(bad(&format!("\"group\" must be 1 to {GROUP_NAME_BYTES_MAX} bytes of [A-Za-z0-9._-]")));
        }
        Ok(g.to_string())
    };
    match wire.op.as_ref() {
        "subscribe" if wire.group.is_some() => {
            if wire.from_seq.is_some() || wire.since_ms.is_some() || wire.epoch.is_some() {
                return Err(bad("a group subscription starts from now: no \"from_seq\", \"since_ms\" or \"epoch\""));
            }
            let prefetch = wire.prefetch.unwrap_or(PREFETCH_DEFAULT);
            if prefetch > PREFETCH_MAX {
                return Err(bad(&format!("\"prefetch\" is at most {PREFETCH_MAX}")));
            }
            let timeout = wire.ack_timeout_ms.unwrap_or(ACK_TIMEOUT_MS_DEFAULT);
            if !(ACK_TIMEOUT_MS_MIN..=ACK_TIMEOUT_MS_MAX).contains(&timeout) {
                return Err(bad(&format!("\"ack_timeout_ms\" is {ACK_TIMEOUT_MS_MIN} to {ACK_TIMEOUT_MS_MAX}")));
            }
            let max_deliveries = wire.max_deliveries.unwrap_or(MAX_DELIVERIES_DEFAULT);
            if max_deliveries == 0 {
                return Err(bad("\"max_deliveries\" is at least 1"));
            }
            let start = match wire.start.as_deref() {
                None | Some("now") => GroupStart::Now,
                Some("beginning") => GroupStart::Beginning,
                Some(_) => return Err(bad("\"start\" is \"now\" or \"beginning\"")),
            };
            Ok(Request::Join {
                id,
                topic: topic()?,
                group: group()?,
                prefetch,
                settings: GroupSettings { ack_timeout_ms: timeout, max_deliveries, start },
                dead_letter: wire.dead_letter.as_deref().map(str::to_string),
            })
        }
        "unsubscribe" if wire.group.is_some() => Ok(Request::Leave { id, topic: topic()?, group: group()? }),
        "ack" => {
            let settle = match (wire.seq, wire.through_tag) {
                (Some(seq), None) => Settle::Ack { seq },
                (None, Some(tag)) => Settle::AckThrough { tag },
                _ => return Err(bad("an ack names \"seq\" or \"through_tag\"")),
            };
            Ok(Request::Settle { id: wire.id, topic: topic()?, group: group()?, settle })
        }
        "nack" => {
            let seq = wire.seq.ok_or_else(|| bad("missing \"seq\""))?;
            let delay_ms = wire.delay_ms.unwrap_or(0);
            if delay_ms > NACK_DELAY_MS_MAX {
                return Err(bad(&format!("\"delay_ms\" is at most {NACK_DELAY_MS_MAX}")));
            }
            Ok(Request::Settle {
                id: wire.id,
                topic: topic()?,
                group: group()?,
                settle: Settle::Nack { seq, delay_ms },
            })
        }
        "prefetch" => {
            let prefetch = wire.prefetch.ok_or_else(|| bad("missing \"prefetch\""))?;
            if prefetch > PREFETCH_MAX {
                return Err(bad(&format!("\"prefetch\" is at most {PREFETCH_MAX}")));
            }
            Ok(Request::Settle { id: wire.id, topic: topic()?, group: group()?, settle: Settle::Prefetch { prefetch } })
        }
        "subscribe" => {
            let epoch = match wire.epoch.as_deref().map(str::parse::<Epoch>) {
                None => None,
                Some(Ok(epoch)) => Some(epoch),
                Some(Err(_)) => return Err(bad("\"epoch\" must be the 16 hex digits a subscribe reply gave")),
            };
            if wire.from_seq.is_some() && wire.since_ms.is_some() {
                return Err(bad("\"from_seq\" and \"since_ms\" do not combine"));
            }
            Ok(Request::Subscribe { id, topic: topic()?, from_seq: wire.from_seq, epoch, since_ms: wire.since_ms })
        }
        "unsubscribe" => Ok(Request::Unsubscribe { id, topic: topic()? }),
        "publish" if wire.deliver_at.is_some() || wire.delay_ms.is_some() || wire.schedule_id.is_some() => {
            let data = wire.data.as_deref().ok_or_else(|| bad("missing \"data\""))?;
            if wire.ack.is_some() {
                return Err(bad("a scheduled publish is answered when it is kept: no \"ack\""));
            }
            if wire.deliver_at.is_some() && wire.delay_ms.is_some() {
                return Err(bad("\"deliver_at\" and \"delay_ms\" do not combine"));
            }
            if wire.delay_ms.is_some_and(|d| d > SCHEDULE_AHEAD_MS_MAX) {
                return Err(bad(&format!("\"delay_ms\" is at most {SCHEDULE_AHEAD_MS_MAX}")));
            }
            let schedule_id = wire.schedule_id.as_deref().map(str::to_string);
            if schedule_id.as_ref().is_some_and(|s| s.is_empty() || s.len() > SCHEDULE_ID_BYTES_MAX) {
                return Err(bad(&format!("\"schedule_id\" is 1 to {SCHEDULE_ID_BYTES_MAX} bytes")));
            }
            let key = key()?;
            Ok(Request::Schedule {
                id,
                topic: topic()?,
                payload: Bytes::copy_from_slice(data.as_bytes()),
                key,
                meta: meta()?,
                deliver_at: wire.deliver_at,
                delay_ms: wire.delay_ms,
                schedule_id,
                if_absent: wire.if_absent.unwrap_or(false),
            })
        }
        "cancel" => {
            let schedule_id = wire.schedule_id.as_deref().ok_or_else(|| bad("missing \"schedule_id\""))?;
            Ok(Request::CancelSchedule { id, topic: topic()?, schedule_id: schedule_id.to_string() })
        }
        "schedules" => Ok(Request::ListSchedules { id, topic: topic()? }),
        "delete_group" => Ok(Request::DeleteGroup { id, topic: topic()?, group: group()? }),
        "publish" => {
            let data = wire.data.as_deref().ok_or_else(|| bad("missing \"data\""))?;
            let ack = match wire.ack.as_deref().map(AckLevel::parse) {
                None => None,
                Some(Ok(ack)) => Some(ack),
                Some(Err(e)) => return Err(bad(&e.to_string())),
            };
            let key = key()?;
            Ok(Request::Publish {
                id,
                topic: topic()?,
                kind: PayloadKind::Text,
                payload: Bytes::copy_from_slice(data.as_bytes()),
                options: PublishOptions { key, ack, reply_to: None, meta: meta()? },
            })
        }
        "ping" => Ok(Request::Ping { id }),
        "request" => {
            let data = wire.data.as_deref().ok_or_else(|| bad("missing \"data\""))?;
            let timeout_ms = wire.timeout_ms.unwrap_or(REQUEST_TIMEOUT_MS_DEFAULT);
            if timeout_ms == 0 || timeout_ms > REQUEST_TIMEOUT_MS_MAX {
                return Err(bad(&format!("\"timeout_ms\" is 1 to {REQUEST_TIMEOUT_MS_MAX}")));
            }
            let key = key()?;
            let payload = Bytes::copy_from_slice(data.as_bytes());
            Ok(Request::Ask { id, topic: topic()?, payload, key, meta: meta()?, timeout_ms })
        }
        "reply" => {
            let to = wire.to.as_deref().and_then(|t| t.parse::<ReplyTo>().ok());
            let to = to.ok_or_else(|| bad("\"to\" must be the \"reply_to\" of the request"))?;
            let answer = match (wire.data.as_deref(), wire.error) {
                (Some(data), None) => {
                    Answer::Result { kind: PayloadKind::Text, payload: Bytes::copy_from_slice(data.as_bytes()) }
                }
                (None, Some(e)) => Answer::Error { code: e.code, message: e.message },
                _ => return Err(bad("a reply has \"data\" or \"error\"")),
            };
            let ack = match (wire.topic.as_deref(), wire.seq) {
                (Some(t), Some(seq)) => Some((t.to_string(), group()?, seq)),
                (None, None) => None,
                _ => return Err(bad("to acknowledge the request, name \"topic\", \"group\" and \"seq\"")),
            };
            Ok(Request::Reply { id: wire.id, to, answer, ack })
        }
        other => Err(BadRequest { id: Some(id), code: "unknown_op", message: format!("unknown op {other:?}") }),
    }
}

/// Parses a binary frame: `0x01 | id: u64 BE | topic_len: u8 | topic |
/// payload`, or a batch: `0x02 | id | topic_len | topic | count: u16 BE`
/// then `count` times `len: u32 BE | payload`.
pub fn parse_binary(frame: &Bytes) -> Result<Request, BadRequest> {
    match frame.first() {
        Some(&CLIENT_BINARY_PUBLISH) => {
            let (id, topic, at) = binary_head(frame, "binary publish")?;
            let (topic, payload) = (topic.to_string(), frame.slice(at..));
            Ok(Request::Publish { id, topic, kind: PayloadKind::Binary, payload, options: PublishOptions::default() })
        }
        Some(&CLIENT_BINARY_BATCH) => parse_batch(frame),
        _ => Err(BadRequest {
            id: None,
            code: "bad_request",
            message: "binary frames must start with 0x01 (publish) or 0x02 (publish batch)".into(),
        }),
    }
}

/// The start both binary requests share: `type | id | topic_len | topic`.
/// Returns the id, the topic and where what follows it starts.
fn binary_head<'f>(frame: &'f [u8], what: &str) -> Result<(u64, &'f str, usize), BadRequest> {
    let bad = |id, message: String| BadRequest { id, code: "bad_request", message };
    if frame.len() < 10 {
        return Err(bad(None, format!("{what} shorter than its header")));
    }
    // Length checked above: bytes 1..9 exist.
    let id = u64::from_be_bytes(frame[1..9].try_into().expect("8 bytes"));
    let end = 10 + frame[9] as usize;
    if frame.len() < end {
        return Err(bad(Some(id), format!("{what} shorter than its topic")));
    }
    let topic = std::str::from_utf8(&frame[10..end]).map_err(|_| bad(Some(id), "topic is not UTF-8".into()))?;
    Ok((id, topic, end))
}

/// Parses a publish batch (see [`parse_binary`]): its payloads are slices
/// of the frame (not copied).
fn parse_batch(frame: &Bytes) -> Result<Request, BadRequest> {
    let bad = |id, message: String| BadRequest { id, code: "bad_request", message };
    let (id, topic, topic_end) = binary_head(frame, "publish batch")?;
    if frame.len() < topic_end + 2 {
        return Err(bad(Some(id), "publish batch shorter than its count".into()));
    }
    let count = u16::from_be_bytes([frame[topic_end], frame[topic_end + 1]]) as usize;
    if count == 0 || count > PUBLISH_BATCH_MAX {
        return Err(bad(Some(id), format!("a publish batch holds 1 to {PUBLISH_BATCH_MAX} messages, not {count}")));
    }
    let mut payloads = Vec::with_capacity(count);
    let mut at = topic_end + 2;
    for i in 0..count {
        let len = frame
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize)
            .ok_or_else(|| bad(Some(id), format!("publish batch cut short at message {i}")))?;
        at += 4;
        if frame.len() - at < len {
            return Err(bad(Some(id), format!("publish batch cut short in message {i}")));
        }
        payloads.push(frame.slice(at..at + len));
        at += len;
    }
    if at != frame.len() {
        return Err(bad(Some(id), "bytes after the batch's last message".into()));
    }
    Ok(Request::PublishBatch { id, topic: topic.to_string(), payloads })
}

/// The frame of a publish batch (see [`parse_binary`]): for clients and
/// tests. `payloads` must number 1 to [`PUBLISH_BATCH_MAX`], `topic` at
/// most 255 bytes.
pub fn encode_batch(id: u64, topic: &str, payloads: &[&[u8]]) -> Vec<u8> {
    let size = 12 + topic.len() + payloads.iter().map(|p| 4 + p.len()).sum::<usize>();
    let mut frame = Vec::with_capacity(size);
    frame.push(CLIENT_BINARY_BATCH);
    frame.extend_from_slice(&id.to_be_bytes());
    frame.push(topic.len() as u8);
    frame.extend_from_slice(topic.as_bytes());
    frame.extend_from_slice(&(payloads.len() as u16).to_be_bytes());
    for p in payloads {
        frame.extend_from_slice(&(p.len() as u32).to_be_bytes());
        frame.extend_from_slice(p);
    }
    frame
}

/// A successful reply frame with extra fields (a JSON object's members).
pub fn reply_ok(id: u64, extra: serde_json::Value) -> Bytes {
    let mut body = serde_json::json!({ "type": "reply", "id": id, "ok": true });
    if let (Some(obj), serde_json::Value::Object(more)) = (body.as_object_mut(), extra) {
        obj.extend(more);
    }
    ws::encode_data(PayloadKind::Text, body.to_string().as_bytes())
}

/// `reply_ok` for extra fields that are all numbers, written without
/// building a JSON value: the publish replies (one per native publish or
/// publish batch), where `serde_json`'s map was the largest allocator in
/// the node's profile at 1 M msg/s over 1,000 topics. The same bytes as
/// `reply_ok` (keys in its sorted order); `extra` names are plain
/// identifiers, none of them `id`, `ok` or `type`.
pub fn reply_ok_numbers(id: u64, extra: &[(&'static str, u64)]) -> Bytes {
    use std::fmt::Write;
    #[derive(Clone, Copy)]
    enum Value {
        Number(u64),
        True,
        Reply,
    }
    const FIELDS_MAX: usize = 8;
    let mut fields = [("", Value::True); FIELDS_MAX];
    let count = extra.len() + 3;
    assert!(count <= FIELDS_MAX, "too many reply fields");
    fields[0] = ("id", Value::Number(id));
    fields[1] = ("ok", Value::True);
    fields[2] = ("type", Value::Reply);
    for (slot, (name, value)) in fields[3..].iter_mut().zip(extra) {
        *slot = (name, Value::Number(*value));
    }
    let fields = &mut fields[..count];
    fields.sort_unstable_by_key(|(name, _)| *name);
    let mut body = String::with_capacity(32 + 24 * count);
    body.push('{');
    for (i, (name, value)) in fields.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        let _ = match value {
            Value::Number(n) => write!(body, "\"{name}\":{n}"),
            Value::True => write!(body, "\"{name}\":true"),
            Value::Reply => write!(body, "\"{name}\":\"reply\""),
        };
    }
    body.push('}');
    ws::encode_data(PayloadKind::Text, body.as_bytes())
}

/// An error reply frame.
pub fn reply_error(id: Option<u64>, code: &str, message: &str) -> Bytes {
    let body = serde_json::json!({
        "type": "reply", "id": id, "ok": false,
        "error": { "code": code, "message": message },
    });
    ws::encode_data(PayloadKind::Text, body.to_string().as_bytes())
}

/// An error reply frame with extra fields (a JSON object's members).
pub fn reply_error_with(id: u64, code: &str, message: &str, extra: serde_json::Value) -> Bytes {
    let mut body = serde_json::json!({
        "type": "reply", "id": id, "ok": false,
        "error": { "code": code, "message": message },
    });
    if let (Some(obj), serde_json::Value::Object(more)) = (body.as_object_mut(), extra) {
        obj.extend(more);
    }
    ws::encode_data(PayloadKind::Text, body.to_string().as_bytes())
}

/// The notice sent to a `drop`-policy subscriber that missed messages.
/// `count` of the messages from `from_seq` to `to_seq` (inclusive) were
/// skipped; any others in the range were delivered.
pub fn dropped_notice(topic: &TopicName, from_seq: u64, to_seq: u64, count: u64) -> Bytes {
    let body = serde_json::json!({
        "type": "dropped", "topic": topic.as_str(), "from_seq": from_seq, "to_seq": to_seq, "count": count
    });
    ws::encode_data(PayloadKind::Text, body.to_string().as_bytes())
}

/// A notice that a subscription cannot get `from_seq..=to_seq` (found
/// while catching up from a durable topic's log, after the subscribe reply
/// went out: a range no longer retained, or numbers a crash skipped).
pub fn gap_notice(topic: &TopicName, from_seq: u64, to_seq: u64) -> Bytes {
    let body = serde_json::json!({ "type": "gap", "topic": topic.as_str(), "from_seq": from_seq, "to_seq": to_seq });
    ws::encode_data(PayloadKind::Text, body.to_string().as_bytes())
}

/// A notice that a consumer group membership ended because the topic's
/// owner node cannot be reached (the member's connection is on another
/// node): join again.
pub fn group_lost_notice(topic: &TopicName, group: &str) -> Bytes {
    let body = serde_json::json!({
        "type": "group_lost", "topic": topic.as_str(), "group": group, "reason": "owner_unreachable"
    });
    ws::encode_data(PayloadKind::Text, body.to_string().as_bytes())
}

/// A notice that a topic's sequence space changed under a live
/// subscription (the node that owns it restarted, or ownership moved
/// without a hand-off): nothing before `last_seq` of `epoch` is coming;
/// messages continue after it, numbered in the new space.
pub fn lost_notice(topic: &TopicName, epoch: Epoch, last_seq: u64) -> Bytes {
    let body = serde_json::json!({
        "type": "lost", "topic": topic.as_str(), "reason": "epoch_changed",
        "epoch": epoch.to_string(), "last_seq": last_seq
    });
    ws::encode_data(PayloadKind::Text, body.to_string().as_bytes())
}

/// Frames a delivered message: a JSON text frame for text payloads, the
/// binary envelope `0x01 | topic_len: u8 | topic | seq: u64 BE | ts_ms: u64
/// BE | payload` for binary payloads (no base64).
pub fn encode_message(topic: &TopicName, message: &Message) -> Bytes {
    match message.kind {
        PayloadKind::Text => {
            // Text payloads are valid UTF-8: the decoder or the JSON parser checked.
            let data = std::str::from_utf8(&message.payload).unwrap_or("");
            let mut out = Vec::with_capacity(64 + topic.as_str().len() + data.len());
            out.extend_from_slice(b"{\"type\":\"message\",\"topic\":\"");
            out.extend_from_slice(topic.as_str().as_bytes()); // charset needs no escaping
            out.extend_from_slice(format!("\",\"seq\":{},\"ts\":{},", message.seq, message.timestamp_ms).as_bytes());
            // Serialising a str into a Vec cannot fail.
            if let Some(key) = &message.key {
                out.extend_from_slice(b"\"key\":");
                serde_json::to_writer(&mut out, &String::from_utf8_lossy(key)).expect("write to memory");
                out.push(b',');
            }
            out.extend_from_slice(b"\"data\":");
            serde_json::to_writer(&mut out, data).expect("write to memory");
            if let Some(meta) = &message.meta {
                write_meta(&mut out, meta);
            }
            out.push(b'}');
            ws::encode_data(PayloadKind::Text, &out)
        }
        PayloadKind::Binary => {
            let name = topic.as_str().as_bytes();
            let mut head = BytesMut::with_capacity(18 + name.len());
            head.put_u8(SERVER_BINARY_MESSAGE);
            head.put_u8(name.len() as u8); // at most 255: TopicName's limit
            head.put_slice(name);
            head.put_u64(message.seq);
            head.put_u64(message.timestamp_ms);
            ws::encode_data_parts(PayloadKind::Binary, &[&head, &message.payload])
        }
    }
}

/// A message delivered to a consumer-group member: always a JSON text
/// frame (`data` for text, `data_base64` for binary payloads) naming the
/// group, the delivery count and the delivery's tag, so the member can
/// acknowledge it (by `seq`, or every delivery through a `tag`).
pub fn encode_group_message(topic: &TopicName, group: &str, message: &Message, delivery: u32, tag: u64) -> Bytes {
    // Written by hand, not through a `serde_json::Value`: one envelope per
    // delivery is the hot path of a group (building a map per message cost
    // about a third of the node's CPU per delivery in fluxbench's group
    // scenario). Only strings go through the JSON writer, for escaping.
    let mut out = Vec::with_capacity(128 + topic.as_str().len() + group.len() + message.payload.len());
    out.extend_from_slice(b"{\"type\":\"message\",\"topic\":\"");
    out.extend_from_slice(topic.as_str().as_bytes()); // charset needs no escaping
    out.extend_from_slice(b"\",\"group\":\"");
    out.extend_from_slice(group.as_bytes()); // charset checked on join
    let numbers =
        format!("\",\"seq\":{},\"ts\":{},\"delivery\":{delivery},\"tag\":{tag}", message.seq, message.timestamp_ms);
    out.extend_from_slice(numbers.as_bytes());
    // Writing into a Vec cannot fail.
    if let Some(key) = &message.key {
        out.extend_from_slice(b",\"key\":");
        serde_json::to_writer(&mut out, &String::from_utf8_lossy(key)).expect("write to memory");
    }
    if let Some(to) = message.reply_to {
        out.extend_from_slice(format!(",\"reply_to\":\"{to}\"").as_bytes());
    }
    if let Some(meta) = &message.meta {
        write_meta(&mut out, meta);
    }
    match message.kind {
        PayloadKind::Text => {
            out.extend_from_slice(b",\"data\":");
            serde_json::to_writer(&mut out, &String::from_utf8_lossy(&message.payload)).expect("write to memory");
        }
        PayloadKind::Binary => {
            use base64::Engine;
            out.extend_from_slice(b",\"data_base64\":\"");
            out.extend_from_slice(base64::engine::general_purpose::STANDARD.encode(&message.payload).as_bytes());
            out.push(b'"');
        }
    }
    out.push(b'}');
    ws::encode_data(PayloadKind::Text, &out)
}

/// Writes a message's metadata as JSON members (`kind`, `message_id`,
/// `headers`), each after a comma; nothing when it has none.
fn write_meta(out: &mut Vec<u8>, meta: &Meta) {
    let mut fields = serde_json::Map::new();
    if let Some(kind) = meta.kind {
        fields.insert("kind".into(), kind.as_str().into());
    }
    if let Some(id) = &meta.id {
        fields.insert("message_id".into(), id.clone().into());
    }
    if !meta.headers.is_empty() {
        let headers: serde_json::Map<String, serde_json::Value> =
            meta.headers.iter().map(|(n, v)| (n.clone(), v.clone().into())).collect();
        fields.insert("headers".into(), headers.into());
    }
    if fields.is_empty() {
        return;
    }
    // `{...}` without its braces: members to splice into an envelope.
    let object = serde_json::Value::Object(fields).to_string();
    out.push(b',');
    out.extend_from_slice(&object.as_bytes()[1..object.len() - 1]);
}

/// A payload as JSON fields: `data` for text, `data_base64` for binary.
pub fn payload_fields(kind: PayloadKind, payload: &[u8]) -> serde_json::Value {
    match kind {
        PayloadKind::Text => serde_json::json!({ "data": String::from_utf8_lossy(payload) }),
        PayloadKind::Binary => {
            use base64::Engine;
            serde_json::json!({ "data_base64": base64::engine::general_purpose::STANDARD.encode(payload) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn number_replies_are_the_bytes_reply_ok_writes() {
        for id in [0, 7, u64::MAX] {
            assert_eq!(reply_ok_numbers(id, &[("seq", 42)]), reply_ok(id, serde_json::json!({ "seq": 42 })));
            assert_eq!(reply_ok_numbers(id, &[("count", 0)]), reply_ok(id, serde_json::json!({ "count": 0 })));
            assert_eq!(
                reply_ok_numbers(id, &[("first_seq", 1), ("last_seq", u64::MAX), ("count", 100)]),
                reply_ok(id, serde_json::json!({ "first_seq": 1, "last_seq": u64::MAX, "count": 100 }))
            );
        }
    }

    #[test]
    fn parses_each_op() {
        assert_eq!(
            parse_text(br#"{"op":"subscribe","id":1,"topic":"a","from_seq":5}"#),
            Ok(Request::Subscribe { id: 1, topic: "a".into(), from_seq: Some(5), epoch: None, since_ms: None })
        );
        assert_eq!(
            parse_text(br#"{"op":"subscribe","id":1,"topic":"a","from_seq":5,"epoch":"00000000000000ff"}"#),
            Ok(Request::Subscribe {
                id: 1,
                topic: "a".into(),
                from_seq: Some(5),
                epoch: Some(Epoch(255)),
                since_ms: None
            })
        );
        assert_eq!(
            parse_text(br#"{"op":"subscribe","id":1,"topic":"a","epoch":"zz"}"#).unwrap_err().code,
            "bad_request"
        );
        assert_eq!(
            parse_text(br#"{"op":"publish","id":2,"topic":"a","data":"h\"i"}"#),
            Ok(Request::Publish {
                id: 2,
                topic: "a".into(),
                kind: PayloadKind::Text,
                payload: Bytes::from_static(b"h\"i"),
                options: PublishOptions::default(),
            })
        );
        assert_eq!(
            parse_text(br#"{"op":"publish","id":2,"topic":"a","data":"x","key":"order-7","ack":"none"}"#),
            Ok(Request::Publish {
                id: 2,
                topic: "a".into(),
                kind: PayloadKind::Text,
                payload: Bytes::from_static(b"x"),
                options: PublishOptions {
                    key: Some(Bytes::from_static(b"order-7")),
                    ack: Some(AckLevel::None),
                    reply_to: None,
                    meta: None
                },
            })
        );
        assert_eq!(
            parse_text(br#"{"op":"publish","id":2,"topic":"a","data":"x","ack":"eventually"}"#).unwrap_err().code,
            "bad_request"
        );
        assert_eq!(parse_text(br#"{"op":"ping","id":3}"#), Ok(Request::Ping { id: 3 }));
        assert_eq!(
            parse_text(br#"{"op":"unsubscribe","id":4,"topic":"a"}"#),
            Ok(Request::Unsubscribe { id: 4, topic: "a".into() })
        );
    }

    #[test]
    fn parses_the_messaging_ops_and_refuses_bad_ones() {
        let join = parse_text(br#"{"op":"subscribe","id":1,"topic":"t","group":"g","prefetch":5}"#).unwrap();
        assert!(matches!(join, Request::Join { prefetch: 5, ref group, .. } if group == "g"));
        let ack = parse_text(br#"{"op":"ack","topic":"t","group":"g","through_tag":9}"#).unwrap();
        assert!(matches!(ack, Request::Settle { id: None, settle: Settle::AckThrough { tag: 9 }, .. }));
        let nack = parse_text(br#"{"op":"nack","id":2,"topic":"t","group":"g","seq":3,"delay_ms":10}"#).unwrap();
        assert!(matches!(nack, Request::Settle { settle: Settle::Nack { seq: 3, delay_ms: 10 }, .. }));
        let ask = parse_text(br#"{"op":"request","id":3,"topic":"t","data":"q"}"#).unwrap();
        assert!(matches!(ask, Request::Ask { timeout_ms: REQUEST_TIMEOUT_MS_DEFAULT, .. }));
        let reply = parse_text(br#"{"op":"reply","to":"1.7.00000000000000ff","error":{"code":"c","message":"m"}}"#);
        let want = ReplyTo { shard: 1, req: 7, nonce: 255 };
        assert!(matches!(reply, Ok(Request::Reply { to, answer: Answer::Error { .. }, .. }) if to == want));
        let later = parse_text(br#"{"op":"publish","id":4,"topic":"t","data":"x","delay_ms":5,"schedule_id":"a"}"#);
        assert!(matches!(later, Ok(Request::Schedule { delay_ms: Some(5), if_absent: false, .. })));
        for bad in [
            &br#"{"op":"subscribe","id":1,"topic":"t","group":"a b"}"#[..],
            br#"{"op":"subscribe","id":1,"topic":"t","group":"g","from_seq":1}"#,
            br#"{"op":"subscribe","id":1,"topic":"t","group":"g","prefetch":10001}"#,
            br#"{"op":"ack","topic":"t","group":"g"}"#,
            br#"{"op":"request","id":1,"topic":"t","data":"q","timeout_ms":0}"#,
            br#"{"op":"reply","to":"nowhere","data":"x"}"#,
            br#"{"op":"reply","to":"1.2.3"}"#,
            br#"{"op":"reply","to":"1.2","data":"x"}"#,
            br#"{"op":"publish","id":1,"topic":"t","data":"x","delay_ms":1,"deliver_at":2}"#,
            br#"{"op":"publish","id":1,"topic":"t","data":"x","delay_ms":1,"ack":"local"}"#,
        ] {
            let e = parse_text(bad).unwrap_err();
            assert_eq!(e.code, "bad_request", "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn group_envelopes_are_json_with_every_field() {
        let msg = Message {
            seq: 3,
            timestamp_ms: 9,
            kind: PayloadKind::Text,
            payload: Bytes::from_static(b"q\"\\"),
            key: Some(Bytes::from_static(b"k\"1")),
            reply_to: Some(ReplyTo { shard: 1, req: 7, nonce: 0xab }),
            meta: None,
            published_at: Instant::now(),
        };
        let t = TopicName::new("t").unwrap();
        // A server frame's body: after 2 header bytes, or 4 past 125 bytes.
        let body = |f: &Bytes| f.slice(if f[1] & 0x7f == 126 { 4 } else { 2 }..);
        let framed = encode_group_message(&t, "g", &msg, 2, 40);
        let v: serde_json::Value = serde_json::from_slice(&body(&framed)).unwrap();
        let want = serde_json::json!({"type":"message","topic":"t","group":"g","seq":3,"ts":9,"delivery":2,"tag":40,
            "key":"k\"1","reply_to":"1.7.00000000000000ab","data":"q\"\\"});
        assert_eq!(v, want);
        let with_meta = Message {
            meta: Some(Arc::new(Meta {
                kind: Some(MessageKind::Command),
                id: Some("m-1".into()),
                headers: vec![("tenant".into(), "acme".into())],
            })),
            ..msg.clone()
        };
        // A server frame's body: after 2 header bytes, or 4 past 125 bytes.
        let body = |f: &Bytes| f.slice(if f[1] & 0x7f == 126 { 4 } else { 2 }..);
        let v: serde_json::Value =
            serde_json::from_slice(&body(&encode_group_message(&t, "g", &with_meta, 1, 1))).unwrap();
        assert_eq!((v["kind"].as_str(), v["message_id"].as_str()), (Some("command"), Some("m-1")), "{v}");
        assert_eq!(v["headers"], serde_json::json!({"tenant":"acme"}));
        let v: serde_json::Value = serde_json::from_slice(&body(&encode_message(&t, &with_meta))).unwrap();
        assert_eq!((v["kind"].as_str(), v["headers"]["tenant"].as_str()), (Some("command"), Some("acme")), "{v}");
        let empty = Message { meta: Some(Arc::new(Meta::default())), ..msg.clone() };
        assert!(serde_json::from_slice::<serde_json::Value>(&body(&encode_message(&t, &empty))).is_ok());
        let bin = Message {
            kind: PayloadKind::Binary,
            payload: Bytes::from_static(b"\x00\xff"),
            key: None,
            reply_to: None,
            ..msg
        };
        let v: serde_json::Value = serde_json::from_slice(&encode_group_message(&t, "g", &bin, 1, 1)[2..]).unwrap();
        assert_eq!(v["data_base64"], "AP8=");
        assert!(v.get("key").is_none() && v.get("data").is_none());
    }

    #[test]
    fn bad_requests_keep_their_id() {
        let e = parse_text(br#"{"op":"fly","id":7}"#).unwrap_err();
        assert_eq!((e.id, e.code), (Some(7), "unknown_op"));
        let e = parse_text(br#"{"op":"publish","id":8,"topic":"a","colour":1}"#).unwrap_err();
        assert_eq!((e.id, e.code), (Some(8), "bad_request"));
        let e = parse_text(b"{not json").unwrap_err();
        assert_eq!((e.id, e.code), (None, "bad_request"));
        let e = parse_text(br#"{"op":"subscribe","id":9}"#).unwrap_err();
        assert_eq!(e.id, Some(9));
    }

    #[test]
    fn a_publish_batch_and_every_way_it_can_be_malformed() {
        let frame = Bytes::from(encode_batch(7, "orders", &[b"a", b"", b"ccc"]));
        let parsed = parse_binary(&frame).unwrap();
        let payloads = vec![Bytes::from_static(b"a"), Bytes::new(), Bytes::from_static(b"ccc")];
        assert_eq!(parsed, Request::PublishBatch { id: 7, topic: "orders".into(), payloads });
        // Cut anywhere, it is refused with its id once the id is there.
        for cut in 1..frame.len() {
            let e = parse_binary(&frame.slice(..cut)).unwrap_err();
            assert_eq!((e.code, e.id.is_some()), ("bad_request", cut >= 10), "cut at {cut}: {}", e.message);
        }
        let mut longer = frame.to_vec();
        longer.push(0);
        assert!(parse_binary(&Bytes::from(longer)).unwrap_err().message.contains("after the batch"));
        let empty = Bytes::from(encode_batch(8, "t", &[]));
        assert!(parse_binary(&empty).unwrap_err().message.contains("1 to 10000"));
        let mut too_many = encode_batch(9, "t", &[b"x"]);
        let count_at = 11;
        too_many[count_at..count_at + 2].copy_from_slice(&((PUBLISH_BATCH_MAX + 1) as u16).to_be_bytes());
        assert!(parse_binary(&Bytes::from(too_many)).unwrap_err().message.contains("not 10001"));
        let mut huge_len = encode_batch(9, "t", &[b"x"]);
        huge_len[13..17].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_binary(&Bytes::from(huge_len)).unwrap_err().message.contains("cut short"));
    }

    #[test]
    fn binary_publish_and_envelope() {
        let mut frame = vec![1u8];
        frame.extend_from_slice(&42u64.to_be_bytes());
        frame.push(1);
        frame.extend_from_slice(b"t\x00\xff");
        let req = parse_binary(&Bytes::from(frame)).unwrap();
        assert_eq!(
            req,
            Request::Publish {
                id: 42,
                topic: "t".into(),
                kind: PayloadKind::Binary,
                payload: Bytes::from_static(b"\x00\xff"),
                options: PublishOptions::default(),
            }
        );
        assert!(parse_binary(&Bytes::from_static(&[1, 0, 0])).is_err());
        assert!(parse_binary(&Bytes::from_static(&[2; 20])).is_err());
        assert!(parse_binary(&Bytes::from_static(&[3; 20])).is_err());
        let msg = Message {
            seq: 3,
            timestamp_ms: 9,
            kind: PayloadKind::Binary,
            payload: Bytes::from_static(b"xy"),
            key: None,
            reply_to: None,
            meta: None,
            published_at: Instant::now(),
        };
        let framed = encode_message(&TopicName::new("t").unwrap(), &msg);
        assert_eq!(&framed[2..], &[1, 1, b't', 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 9, b'x', b'y']);
        let text = Message { kind: PayloadKind::Text, payload: Bytes::from_static(b"q\""), ..msg };
        let framed = encode_message(&TopicName::new("t").unwrap(), &text);
        let v: serde_json::Value = serde_json::from_slice(&framed[2..]).unwrap();
        assert_eq!(v, serde_json::json!({"type":"message","topic":"t","seq":3,"ts":9,"data":"q\""}));
    }
}
