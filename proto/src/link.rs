//! The node link's frames, sans-IO: what one FluxNode says to another about
//! topics the other owns. A node that does not own a topic forwards its
//! publishes to the owner and follows the topic there once for all of its
//! own subscribers; the owner answers the publishes and sends the topic's
//! messages (numbered by the owner) once per following node.
//!
//! The link is a WebSocket connection to the owner's `GET /v1/link`; each
//! link frame is one binary WebSocket message (so frames are
//! length-prefixed by the WebSocket header, and the writers batch every
//! frame queued into one `send`). A frame is a type byte and fixed-order
//! fields, big-endian; a message travels as its durable log record
//! ([`crate::log`]: checksummed, with kind, key and headers), so the link
//! and the log share one message layout. See docs/PROTOCOL.md.

use bytes::Bytes;

use crate::durable::{AckLevel, ArchivedSegment, DurableHandOff, PublishOptions, HANDOFF_SEGMENTS_MAX};
use crate::group::{SavedGroup, GROUPS_PER_TOPIC_MAX, SEGMENTS};
use crate::log::{self, Record};
use crate::message::{Epoch, Message, PayloadKind};
use crate::owner::{OwnerError, ResumeFrom};
use crate::topic::TopicName;

/// Frame types.
const PUBLISH: u8 = 1;
const PUBLISH_DONE: u8 = 2;
const FOLLOW: u8 = 3;
const UNFOLLOW: u8 = 4;
const FOLLOWED: u8 = 5;
const MESSAGE: u8 = 6;
const GAP: u8 = 7;
const CLAIM: u8 = 8;
const HAND_OFF: u8 = 9;
const RESTART: u8 = 10;
const GROUP: u8 = 11;
const REPLY: u8 = 12;
const ASK: u8 = 13;
const ANSWERED: u8 = 14;
const SCHEDULES: u8 = 15;
const OFFER: u8 = 16;

/// One link frame.
#[derive(Debug, Clone)]
pub enum LinkFrame {
    /// Follower to owner: sequence this message (`id` is the follower's,
    /// echoed in the answer).
    Publish {
        id: u64,
        topic: TopicName,
        ack: Option<AckLevel>,
        kind: PayloadKind,
        payload: Bytes,
        options: LinkOptions,
    },
    /// Owner to follower: the answer to publish `id`.
    PublishDone { id: u64, result: Result<u64, OwnerError> },
    /// Follower to owner: send me `topic`'s messages, after `from` if
    /// given (a resume, as a subscriber's).
    Follow { topic: TopicName, from: Option<ResumeFrom> },
    /// Follower to owner: no more of `topic`.
    Unfollow { topic: TopicName },
    /// Owner to follower: the follow is live (the topic's sequence space
    /// and last number at that moment; the replay after `from` follows
    /// as messages), or refused.
    Followed { topic: TopicName, result: Result<(Epoch, u64), OwnerError> },
    /// Owner to follower: one of `topic`'s messages, numbered.
    Message { topic: TopicName, message: Message },
    /// Owner to follower: `from_seq..=to_seq` of `topic` cannot be had
    /// (evicted from history, or lost).
    Gap { topic: TopicName, from_seq: u64, to_seq: u64 },
    /// New owner (or a relay) to the node that owned `topic` in the view
    /// of version `at`, just before the claimer's run of ownership: hand
    /// me its state (the claimer's view is `version`).
    Claim { topic: TopicName, version: u64, node: String, at: u64 },
    /// Previous owner to new owner: the answer to a claim.
    HandOff { topic: TopicName, state: HandOffState },
    /// Owner (a copy) to follower: `topic`'s sequence space changed under
    /// the follow; what comes after this on the link is in another space:
    /// follow again. Only that topic's follow restarts; the link stays.
    Restart { topic: TopicName },
    /// A consumer group member on the follower's node (`member`: its id on
    /// this link), both ways: see [`GroupLink`].
    Group { member: u64, op: GroupLink },
    /// Follower to owner: a responder's answer to a request the owner's
    /// group delivered to a member on the follower's node; `to` names the
    /// requester on the owner.
    Reply { to: crate::message::ReplyTo, answer: crate::request::Answer },
    /// Follower to owner: a connection on the follower's node asks what
    /// only the topic's owner answers (schedules, group deletion); `id`
    /// names the question in the answer.
    Ask { id: u64, topic: TopicName, ask: OwnerAsk },
    /// Owner to follower: the answer to `Ask` `id` (the fields of a native
    /// reply, or its error code and message).
    Answered { id: u64, answer: crate::broker::OwnerAnswer },
    /// Claimed node to claimer: pending schedules of `topic`, whose state
    /// follows in the next hand-off frame (a topic's schedules take as
    /// many of these as their size needs).
    Schedules { topic: TopicName, list: Vec<crate::schedule::Scheduled> },
    /// A node that gave `topic` up to the receiving node (its owner now):
    /// claim it now rather than at its next use (a leaving node is gone
    /// soon). A hint: the receiver claims only if its own view agrees.
    Offer { topic: TopicName },
}

/// About the most bytes of schedules one `Schedules` frame carries (one
/// schedule at least): frames stay far below the link's frame limit.
pub const SCHEDULES_FRAME_BYTES: usize = 1 << 20;

/// A hand-off's frames, in order: its schedules in frames of at most about
/// [`SCHEDULES_FRAME_BYTES`], then the hand-off itself.
pub fn hand_off_frames(topic: &TopicName, state: HandOffState) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let state = match state {
        HandOffState::State { epoch, last_seq, history, durable, schedules, groups } => {
            let mut list = Vec::new();
            let mut bytes = 0;
            for s in schedules {
                let size = crate::schedule::record_size(&s);
                if !list.is_empty() && bytes + size > SCHEDULES_FRAME_BYTES {
                    let full = std::mem::take(&mut list);
                    frames.push(encode(&LinkFrame::Schedules { topic: topic.clone(), list: full }));
                    bytes = 0;
                }
                bytes += size;
                list.push(s);
            }
            if !list.is_empty() {
                frames.push(encode(&LinkFrame::Schedules { topic: topic.clone(), list }));
            }
            HandOffState::State { epoch, last_seq, history, durable, schedules: Vec::new(), groups }
        }
        other => other,
    };
    frames.push(encode(&LinkFrame::HandOff { topic: topic.clone(), state }));
    frames
}

/// What a connection may ask a topic's owner through another node.
#[derive(Debug, Clone)]
pub enum OwnerAsk {
    /// Add, cancel or list the topic's schedules.
    Schedule(crate::broker::ScheduleAsk),
    /// Delete a consumer group without members.
    GroupDelete { group: String },
}

/// A consumer group's traffic for a member whose connection is on another
/// node than the topic's owner: the follower's node joins, leaves and
/// settles for it; the owner answers the join and sends its deliveries.
#[derive(Debug, Clone)]
pub enum GroupLink {
    /// Follower to owner: join `group` of `topic`.
    Join {
        topic: TopicName,
        group: String,
        prefetch: u32,
        settings: crate::group::GroupSettings,
        dead_letter: TopicName,
    },
    /// Follower to owner: the member left.
    Leave,
    /// Follower to owner: an ack, a refusal or a prefetch change.
    Settle(crate::group::Settle),
    /// Owner to follower: the join's answer (an error code on refusal).
    Joined(Result<(), String>),
    /// Owner to follower: a delivery to the member.
    Deliver { message: Message, delivery: u32, tag: u64 },
    /// Owner to follower: the group ended here (its topic moved to
    /// another node): the member is told `group_lost` and joins again.
    Lost,
}

/// What a previous owner hands over for a claimed topic.
#[derive(Debug, Clone)]
pub enum HandOffState {
    /// It never had the topic (or gave it away before): start it afresh.
    Nothing,
    /// It still owns the topic under a topology at least as new as the
    /// claim's: the claimer's view is behind; ask again later.
    Refused,
    /// The topic's sequence space, last number and retained history; the
    /// previous owner sequences it no more. A durable topic's log comes
    /// with it (`durable`), its records all in the object store.
    /// Its pending schedules go too, in [`LinkFrame::Schedules`] frames
    /// just before the hand-off's (see [`hand_off_frames`]): a hand-off
    /// frame decodes with none. An ephemeral topic's consumer groups come
    /// in `groups`, each at its first message not acknowledged (a durable
    /// topic's travel with its log, in `durable`).
    State {
        epoch: Epoch,
        last_seq: u64,
        history: Vec<Message>,
        durable: Option<DurableHandOff>,
        schedules: Vec<crate::schedule::Scheduled>,
        groups: Vec<SavedGroup>,
    },
}

/// The part of a publish's options a link carries: key and metadata.
/// A request's return address never crosses a link (requests are served
/// on the topic's owner only, for now).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkOptions {
    /// Routing key.
    pub key: Option<Bytes>,
    /// Kind, id and headers.
    pub meta: Option<std::sync::Arc<crate::message::Meta>>,
    /// A request's requester on the forwarding node (its answer comes
    /// back as a reply frame).
    pub reply_to: Option<crate::message::ReplyTo>,
}

impl LinkOptions {
    /// What a publish's options keep on a link.
    pub fn of(options: &PublishOptions) -> LinkOptions {
        LinkOptions { key: options.key.clone(), meta: options.meta.clone(), reply_to: options.reply_to }
    }

    /// Publish options on the owner's side.
    pub fn into_options(self, ack: Option<AckLevel>) -> PublishOptions {
        PublishOptions { key: self.key, ack, reply_to: self.reply_to, meta: self.meta }
    }
}

/// Why a link frame could not be read: the peer speaks something else, or
/// a frame is damaged. The link is closed (WebSocket close 1007).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed link frame: {0}")]
pub struct LinkError(pub &'static str);

/// Encodes a frame (the payload of one binary WebSocket message).
pub fn encode(frame: &LinkFrame) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    match frame {
        LinkFrame::Publish { id, topic, ack, kind, payload, options } => {
            out.push(PUBLISH);
            out.extend_from_slice(&id.to_be_bytes());
            put_topic(&mut out, topic);
            out.push(match ack {
                None => 0,
                Some(AckLevel::None) => 1,
                Some(AckLevel::Local) => 2,
                Some(AckLevel::Stored) => 3,
            });
            let mut headers = options.meta.as_ref().map(|m| m.to_record_headers()).unwrap_or_default();
            if let Some(to) = options.reply_to {
                headers.push((crate::message::REPLY_TO_HEADER.to_string(), to.to_string()));
            }
            let record = Record {
                seq: 0,
                timestamp_ms: 0,
                kind: *kind,
                key: options.key.clone(),
                headers,
                payload: payload.clone(),
            };
            put_record(&mut out, &record);
        }
        LinkFrame::PublishDone { id, result } => {
            out.push(PUBLISH_DONE);
            out.extend_from_slice(&id.to_be_bytes());
            match result {
                Ok(seq) => {
                    out.push(0);
                    out.extend_from_slice(&seq.to_be_bytes());
                }
                Err(e) => put_error(&mut out, *e),
            }
        }
        LinkFrame::Follow { topic, from } => {
            out.push(FOLLOW);
            put_topic(&mut out, topic);
            match from {
                None => out.push(0),
                Some(f) => {
                    out.push(1);
                    out.extend_from_slice(&f.after_seq.to_be_bytes());
                    out.extend_from_slice(&f.epoch.map_or(0, |e| e.0).to_be_bytes());
                    out.push(u8::from(f.epoch.is_some()) | (u8::from(f.since_ms.is_some()) << 1));
                    out.extend_from_slice(&f.since_ms.unwrap_or(0).to_be_bytes());
                }
            }
        }
        LinkFrame::Unfollow { topic } => {
            out.push(UNFOLLOW);
            put_topic(&mut out, topic);
        }
        LinkFrame::Offer { topic } => {
            out.push(OFFER);
            put_topic(&mut out, topic);
        }
        LinkFrame::Followed { topic, result } => {
            out.push(FOLLOWED);
            put_topic(&mut out, topic);
            match result {
                Ok((epoch, last_seq)) => {
                    out.push(0);
                    out.extend_from_slice(&epoch.0.to_be_bytes());
                    out.extend_from_slice(&last_seq.to_be_bytes());
                }
                Err(e) => put_error(&mut out, *e),
            }
        }
        LinkFrame::Message { topic, message } => return encode_message(topic, message),
        LinkFrame::Claim { topic, version, node, at } => {
            out.push(CLAIM);
            put_topic(&mut out, topic);
            out.extend_from_slice(&version.to_be_bytes());
            out.extend_from_slice(&at.to_be_bytes());
            // A node address is far shorter than 64 KiB.
            out.extend_from_slice(&(node.len() as u16).to_be_bytes());
            out.extend_from_slice(node.as_bytes());
        }
        LinkFrame::HandOff { topic, state } => {
            out.push(HAND_OFF);
            put_topic(&mut out, topic);
            match state {
                HandOffState::Nothing => out.push(0),
                HandOffState::Refused => out.push(1),
                HandOffState::State { epoch, last_seq, history, durable, schedules: _, groups } => {
                    out.push(2);
                    out.extend_from_slice(&epoch.0.to_be_bytes());
                    out.extend_from_slice(&last_seq.to_be_bytes());
                    out.extend_from_slice(&(history.len() as u32).to_be_bytes());
                    for m in history {
                        put_message(&mut out, m);
                    }
                    put_durable(&mut out, durable.as_ref());
                    put_groups(&mut out, groups);
                }
            }
        }
        LinkFrame::Gap { topic, from_seq, to_seq } => {
            out.push(GAP);
            put_topic(&mut out, topic);
            out.extend_from_slice(&from_seq.to_be_bytes());
            out.extend_from_slice(&to_seq.to_be_bytes());
        }
        LinkFrame::Restart { topic } => {
            out.push(RESTART);
            put_topic(&mut out, topic);
        }
        LinkFrame::Group { member, op } => {
            out.push(GROUP);
            out.extend_from_slice(&member.to_be_bytes());
            put_group_op(&mut out, op);
        }
        LinkFrame::Ask { id, topic, ask } => {
            use crate::broker::ScheduleAsk;
            out.push(ASK);
            out.extend_from_slice(&id.to_be_bytes());
            put_topic(&mut out, topic);
            match ask {
                OwnerAsk::Schedule(ScheduleAsk::Add { scheduled, if_absent }) => {
                    out.push(0);
                    out.push(u8::from(*if_absent));
                    put_record(&mut out, &scheduled.to_record());
                }
                OwnerAsk::Schedule(ScheduleAsk::Cancel { id }) => {
                    out.push(1);
                    put_short_string(&mut out, id);
                }
                OwnerAsk::Schedule(ScheduleAsk::List) => out.push(2),
                OwnerAsk::GroupDelete { group } => {
                    out.push(3);
                    put_short_string(&mut out, group);
                }
            }
        }
        LinkFrame::Schedules { topic, list } => {
            out.push(SCHEDULES);
            put_topic(&mut out, topic);
            out.extend_from_slice(&(list.len() as u32).to_be_bytes());
            for s in list {
                put_record(&mut out, &s.to_record());
            }
        }
        LinkFrame::Answered { id, answer } => {
            out.push(ANSWERED);
            out.extend_from_slice(&id.to_be_bytes());
            let (ok, first, second) = match answer {
                Ok(fields) => (1, String::new(), fields.to_string()),
                Err((code, message)) => (0, code.clone(), message.clone()),
            };
            out.push(ok);
            put_short_string(&mut out, &first);
            out.extend_from_slice(&(second.len() as u32).to_be_bytes());
            out.extend_from_slice(second.as_bytes());
        }
        LinkFrame::Reply { to, answer } => {
            out.push(REPLY);
            out.extend_from_slice(&(to.shard as u64).to_be_bytes());
            out.extend_from_slice(&to.req.to_be_bytes());
            out.extend_from_slice(&to.nonce.to_be_bytes());
            match answer {
                crate::request::Answer::Result { kind, payload } => {
                    out.push(match kind {
                        PayloadKind::Text => 0,
                        PayloadKind::Binary => 1,
                    });
                    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                    out.extend_from_slice(payload);
                }
                crate::request::Answer::Error { code, message } => {
                    out.push(2);
                    put_short_string(&mut out, code);
                    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
                    out.extend_from_slice(message.as_bytes());
                }
            }
        }
    }
    out
}

fn put_group_op(out: &mut Vec<u8>, op: &GroupLink) {
    use crate::group::{GroupStart, Settle};
    match op {
        GroupLink::Join { topic, group, prefetch, settings, dead_letter } => {
            out.push(1);
            put_topic(out, topic);
            put_short_string(out, group);
            out.extend_from_slice(&prefetch.to_be_bytes());
            out.extend_from_slice(&settings.ack_timeout_ms.to_be_bytes());
            out.extend_from_slice(&settings.max_deliveries.to_be_bytes());
            out.push(match settings.start {
                GroupStart::Now => 0,
                GroupStart::Beginning => 1,
            });
            put_topic(out, dead_letter);
        }
        GroupLink::Leave => out.push(2),
        GroupLink::Settle(settle) => {
            out.push(3);
            match *settle {
                Settle::Ack { seq } => {
                    out.push(0);
                    out.extend_from_slice(&seq.to_be_bytes());
                }
                Settle::AckThrough { tag } => {
                    out.push(1);
                    out.extend_from_slice(&tag.to_be_bytes());
                }
                Settle::Nack { seq, delay_ms } => {
                    out.push(2);
                    out.extend_from_slice(&seq.to_be_bytes());
                    out.extend_from_slice(&delay_ms.to_be_bytes());
                }
                Settle::Prefetch { prefetch } => {
                    out.push(3);
                    out.extend_from_slice(&prefetch.to_be_bytes());
                }
            }
        }
        GroupLink::Joined(result) => {
            out.push(4);
            match result {
                Ok(()) => out.push(0),
                Err(code) => {
                    out.push(1);
                    put_short_string(out, code);
                }
            }
        }
        GroupLink::Lost => out.push(6),
        GroupLink::Deliver { message, delivery, tag } => {
            out.push(5);
            out.extend_from_slice(&delivery.to_be_bytes());
            out.extend_from_slice(&tag.to_be_bytes());
            put_message(out, message);
        }
    }
}

// Schedule ids and group names cross the link as short strings.
const _: () = assert!(crate::schedule::SCHEDULE_ID_BYTES_MAX <= 255 && crate::group::GROUP_NAME_BYTES_MAX <= 255);

/// A string of at most 255 bytes (a group name, an error code).
fn put_short_string(out: &mut Vec<u8>, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(255)];
    out.push(bytes.len() as u8);
    out.extend_from_slice(bytes);
}

/// Encodes a topic's message (what the owner's fan-out frames once per
/// message for every following node).
pub fn encode_message(topic: &TopicName, message: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + topic.as_str().len() + message.payload.len());
    out.push(MESSAGE);
    put_topic(&mut out, topic);
    put_message(&mut out, message);
    out
}

/// Decodes a frame; `at` is when it arrived (a message's publish time on
/// this node, for latency).
pub fn decode(frame: &Bytes, at: std::time::Instant) -> Result<LinkFrame, LinkError> {
    let mut r = Reader { bytes: frame, at: 0 };
    let decoded = match r.u8()? {
        PUBLISH => {
            let id = r.u64()?;
            let topic = r.topic()?;
            let ack = match r.u8()? {
                0 => None,
                1 => Some(AckLevel::None),
                2 => Some(AckLevel::Local),
                3 => Some(AckLevel::Stored),
                _ => return Err(LinkError("unknown ack level")),
            };
            let record = r.record()?;
            let message = Message::from_record(record, at);
            let options = LinkOptions { key: message.key, meta: message.meta, reply_to: message.reply_to };
            LinkFrame::Publish { id, topic, ack, kind: message.kind, payload: message.payload, options }
        }
        PUBLISH_DONE => {
            let id = r.u64()?;
            let result = match r.u8()? {
                0 => Ok(r.u64()?),
                code => Err(r.error(code)?),
            };
            LinkFrame::PublishDone { id, result }
        }
        FOLLOW => {
            let topic = r.topic()?;
            let from = match r.u8()? {
                0 => None,
                1 => {
                    let after_seq = r.u64()?;
                    let epoch = r.u64()?;
                    let flags = r.u8()?;
                    let since_ms = r.u64()?;
                    Some(ResumeFrom {
                        after_seq,
                        epoch: (flags & 1 != 0).then_some(Epoch(epoch)),
                        since_ms: (flags & 2 != 0).then_some(since_ms),
                    })
                }
                _ => return Err(LinkError("bad resume flag")),
            };
            LinkFrame::Follow { topic, from }
        }
        UNFOLLOW => LinkFrame::Unfollow { topic: r.topic()? },
        OFFER => LinkFrame::Offer { topic: r.topic()? },
        FOLLOWED => {
            let topic = r.topic()?;
            let result = match r.u8()? {
                0 => Ok((Epoch(r.u64()?), r.u64()?)),
                code => Err(r.error(code)?),
            };
            LinkFrame::Followed { topic, result }
        }
        MESSAGE => {
            let topic = r.topic()?;
            let record = r.record()?;
            LinkFrame::Message { topic, message: Message::from_record(record, at) }
        }
        GAP => LinkFrame::Gap { topic: r.topic()?, from_seq: r.u64()?, to_seq: r.u64()? },
        RESTART => LinkFrame::Restart { topic: r.topic()? },
        GROUP => {
            let member = r.u64()?;
            LinkFrame::Group { member, op: r.group_op(at)? }
        }
        REPLY => {
            let shard = usize::try_from(r.u64()?).map_err(|_| LinkError("shard out of range"))?;
            let to = crate::message::ReplyTo { shard, req: r.u64()?, nonce: r.u64()? };
            let answer = match r.u8()? {
                k @ (0 | 1) => {
                    let kind = if k == 0 { PayloadKind::Text } else { PayloadKind::Binary };
                    let len = r.u32()? as usize;
                    crate::request::Answer::Result { kind, payload: frame.slice(r.at..r.at + r.take(len)?.len()) }
                }
                2 => {
                    let code = r.short_string()?;
                    let len = r.u32()? as usize;
                    let message =
                        std::str::from_utf8(r.take(len)?).map_err(|_| LinkError("message not UTF-8"))?.to_string();
                    crate::request::Answer::Error { code, message }
                }
                _ => return Err(LinkError("unknown answer")),
            };
            LinkFrame::Reply { to, answer }
        }
        ASK => {
            use crate::broker::ScheduleAsk;
            let (id, topic) = (r.u64()?, r.topic()?);
            let ask = match r.u8()? {
                0 => {
                    let if_absent = r.u8()? != 0;
                    let scheduled = crate::schedule::Scheduled::from_record(r.record()?)
                        .ok_or(LinkError("not a schedule record"))?;
                    OwnerAsk::Schedule(ScheduleAsk::Add { scheduled, if_absent })
                }
                1 => OwnerAsk::Schedule(ScheduleAsk::Cancel { id: r.short_string()? }),
                2 => OwnerAsk::Schedule(ScheduleAsk::List),
                3 => OwnerAsk::GroupDelete { group: r.short_string()? },
                _ => return Err(LinkError("unknown ask")),
            };
            LinkFrame::Ask { id, topic, ask }
        }
        SCHEDULES => {
            let topic = r.topic()?;
            let count = r.u32()? as usize;
            // Each record takes at least its fixed bytes.
            if count > frame.len() / 8 {
                return Err(LinkError("schedule count past the frame"));
            }
            let mut list = Vec::with_capacity(count);
            for _ in 0..count {
                let s = crate::schedule::Scheduled::from_record(r.record()?);
                list.push(s.ok_or(LinkError("not a schedule record"))?);
            }
            LinkFrame::Schedules { topic, list }
        }
        ANSWERED => {
            let (id, ok, first) = (r.u64()?, r.u8()?, r.short_string()?);
            let len = r.u32()? as usize;
            let second = std::str::from_utf8(r.take(len)?).map_err(|_| LinkError("answer not UTF-8"))?.to_string();
            let answer = match ok {
                1 => Ok(serde_json::from_str(&second).map_err(|_| LinkError("answer not JSON"))?),
                0 => Err((first, second)),
                _ => return Err(LinkError("unknown answer")),
            };
            LinkFrame::Answered { id, answer }
        }
        CLAIM => {
            let (topic, version, at) = (r.topic()?, r.u64()?, r.u64()?);
            let b = r.take(2)?;
            let len = u16::from_be_bytes([b[0], b[1]]) as usize;
            let node = std::str::from_utf8(r.take(len)?).map_err(|_| LinkError("node not UTF-8"))?.to_string();
            LinkFrame::Claim { topic, version, node, at }
        }
        HAND_OFF => {
            let topic = r.topic()?;
            let state = match r.u8()? {
                0 => HandOffState::Nothing,
                1 => HandOffState::Refused,
                2 => {
                    let (epoch, last_seq) = (Epoch(r.u64()?), r.u64()?);
                    let b = r.take(4)?;
                    let count = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
                    // Each record takes at least its fixed bytes: a count
                    // past what the frame can hold is a damaged frame.
                    if count > frame.len() / 8 {
                        return Err(LinkError("hand-off count past the frame"));
                    }
                    let mut history = Vec::with_capacity(count);
                    for _ in 0..count {
                        history.push(Message::from_record(r.record()?, at));
                    }
                    let durable = r.durable()?;
                    let groups = r.groups()?;
                    HandOffState::State { epoch, last_seq, history, durable, schedules: Vec::new(), groups }
                }
                _ => return Err(LinkError("unknown hand-off state")),
            };
            LinkFrame::HandOff { topic, state }
        }
        _ => return Err(LinkError("unknown frame type")),
    };
    if r.at != frame.len() {
        return Err(LinkError("bytes after the frame"));
    }
    Ok(decoded)
}

fn put_topic(out: &mut Vec<u8>, topic: &TopicName) {
    let name = topic.as_str().as_bytes();
    // Topic names are far shorter than 64 KiB (`topic::TOPIC_BYTES_MAX`).
    out.extend_from_slice(&(name.len() as u16).to_be_bytes());
    out.extend_from_slice(name);
}

/// A durable topic's hand-off: a flag, then its declaration (JSON, as in
/// `meta.json`), its segments (five numbers each), newest kept when
/// there are more than [`HANDOFF_SEGMENTS_MAX`], and its consumer groups
/// (JSON, as saved in `groups/`).
fn put_durable(out: &mut Vec<u8>, durable: Option<&DurableHandOff>) {
    let Some(d) = durable else {
        out.push(0);
        return;
    };
    out.push(1);
    let spec = serde_json::to_vec(&d.spec).unwrap_or_default();
    out.extend_from_slice(&(spec.len() as u32).to_be_bytes());
    out.extend_from_slice(&spec);
    let kept = &d.segments[d.segments.len().saturating_sub(HANDOFF_SEGMENTS_MAX)..];
    out.extend_from_slice(&(kept.len() as u32).to_be_bytes());
    for s in kept {
        for n in [s.base_seq, s.last_seq, s.len, s.first_ms, s.last_ms] {
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
    put_groups(out, &d.groups);
}

/// Consumer groups' positions (JSON, as a durable group's save in
/// `groups/`), at most [`GROUPS_PER_TOPIC_MAX`].
fn put_groups(out: &mut Vec<u8>, groups: &[SavedGroup]) {
    let groups = &groups[..groups.len().min(GROUPS_PER_TOPIC_MAX)];
    let groups = serde_json::to_vec(groups).unwrap_or_default();
    out.extend_from_slice(&(groups.len() as u32).to_be_bytes());
    out.extend_from_slice(&groups);
}

/// A message as its durable log record.
fn put_message(out: &mut Vec<u8>, message: &Message) {
    let record = Record {
        seq: message.seq,
        timestamp_ms: message.timestamp_ms,
        kind: message.kind,
        key: message.key.clone(),
        headers: message.record_headers(),
        payload: message.payload.clone(),
    };
    put_record(out, &record);
}

fn put_record(out: &mut Vec<u8>, record: &Record) {
    // A publish or delivery is bounded far below the record ceiling
    // (`MESSAGE_BYTES_MAX_CEILING`), keys and headers by the protocols'
    // limits: encoding cannot fail for anything a node accepted.
    if log::encode(record, out).is_err() {
        debug_assert!(false, "a message the node accepted fits a record");
    }
}

fn put_error(out: &mut Vec<u8>, e: OwnerError) {
    let (code, arg) = match e {
        OwnerError::TooManyTopics => (1, 0),
        OwnerError::ClientShare { max } => (2, max as u64),
        OwnerError::StorageBehind => (3, 0),
        OwnerError::StorageFailed => (4, 0),
        OwnerError::GroupFull => (5, 0),
        OwnerError::NoResponders => (6, 0),
        OwnerError::OwnerUnreachable => (7, 0),
        OwnerError::OwnedElsewhere => (8, 0),
        OwnerError::NotMember => (9, 0),
    };
    out.push(code);
    out.extend_from_slice(&arg.to_be_bytes());
}

struct Reader<'a> {
    bytes: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], LinkError> {
        let end = self.at.checked_add(n).filter(|&end| end <= self.bytes.len()).ok_or(LinkError("frame cut short"))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, LinkError> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, LinkError> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes(b.try_into().map_err(|_| LinkError("frame cut short"))?))
    }

    /// A durable topic's hand-off (see `put_durable`).
    fn durable(&mut self) -> Result<Option<DurableHandOff>, LinkError> {
        if self.u8()? == 0 {
            return Ok(None);
        }
        let len = self.u32()? as usize;
        let spec = serde_json::from_slice(self.take(len)?).map_err(|_| LinkError("durable declaration unreadable"))?;
        let count = self.u32()? as usize;
        if count > HANDOFF_SEGMENTS_MAX {
            return Err(LinkError("too many segments in a hand-off"));
        }
        let mut segments = Vec::with_capacity(count.min(self.bytes.len() / 40));
        for _ in 0..count {
            let (base_seq, last_seq, len, first_ms, last_ms) =
                (self.u64()?, self.u64()?, self.u64()?, self.u64()?, self.u64()?);
            segments.push(ArchivedSegment { base_seq, last_seq, len, first_ms, last_ms });
        }
        let groups = self.groups()?;
        Ok(Some(DurableHandOff { spec, segments, groups }))
    }

    /// Consumer groups' positions (see `put_groups`).
    fn groups(&mut self) -> Result<Vec<SavedGroup>, LinkError> {
        let len = self.u32()? as usize;
        let groups: Vec<SavedGroup> =
            serde_json::from_slice(self.take(len)?).map_err(|_| LinkError("groups unreadable"))?;
        if groups.len() > GROUPS_PER_TOPIC_MAX || groups.iter().any(|g| g.positions.len() != SEGMENTS) {
            return Err(LinkError("malformed groups"));
        }
        Ok(groups)
    }

    fn u32(&mut self) -> Result<u32, LinkError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes(b.try_into().map_err(|_| LinkError("frame cut short"))?))
    }

    fn short_string(&mut self) -> Result<String, LinkError> {
        let len = self.u8()? as usize;
        let s = std::str::from_utf8(self.take(len)?).map_err(|_| LinkError("string not UTF-8"))?;
        Ok(s.to_string())
    }

    fn group_op(&mut self, at: std::time::Instant) -> Result<GroupLink, LinkError> {
        use crate::group::{GroupSettings, GroupStart, Settle, GROUP_NAME_BYTES_MAX};
        Ok(match self.u8()? {
            1 => {
                let topic = self.topic()?;
                let group = self.short_string()?;
                if group.is_empty() || group.len() > GROUP_NAME_BYTES_MAX {
                    return Err(LinkError("invalid group name"));
                }
                let prefetch = self.u32()?;
                let (ack_timeout_ms, max_deliveries) = (self.u64()?, self.u32()?);
                let start = match self.u8()? {
                    0 => GroupStart::Now,
                    1 => GroupStart::Beginning,
                    _ => return Err(LinkError("unknown group start")),
                };
                let settings = GroupSettings { ack_timeout_ms, max_deliveries, start };
                GroupLink::Join { topic, group, prefetch, settings, dead_letter: self.topic()? }
            }
            2 => GroupLink::Leave,
            3 => GroupLink::Settle(match self.u8()? {
                0 => Settle::Ack { seq: self.u64()? },
                1 => Settle::AckThrough { tag: self.u64()? },
                2 => Settle::Nack { seq: self.u64()?, delay_ms: self.u64()? },
                3 => Settle::Prefetch { prefetch: self.u32()? },
                _ => return Err(LinkError("unknown settle")),
            }),
            4 => GroupLink::Joined(match self.u8()? {
                0 => Ok(()),
                1 => Err(self.short_string()?),
                _ => return Err(LinkError("unknown join answer")),
            }),
            5 => {
                let (delivery, tag) = (self.u32()?, self.u64()?);
                GroupLink::Deliver { message: Message::from_record(self.record()?, at), delivery, tag }
            }
            6 => GroupLink::Lost,
            _ => return Err(LinkError("unknown group op")),
        })
    }

    fn topic(&mut self) -> Result<TopicName, LinkError> {
        let b = self.take(2)?;
        let len = u16::from_be_bytes([b[0], b[1]]) as usize;
        let name = std::str::from_utf8(self.take(len)?).map_err(|_| LinkError("topic not UTF-8"))?;
        TopicName::new(name).map_err(|_| LinkError("invalid topic"))
    }

    fn record(&mut self) -> Result<Record, LinkError> {
        let rest = self.bytes.slice(self.at..);
        let (record, used) = log::read_one(&rest, 0).map_err(|_| LinkError("damaged message record"))?;
        self.at += used;
        Ok(record)
    }

    fn error(&mut self, code: u8) -> Result<OwnerError, LinkError> {
        let arg = self.u64()?;
        Ok(match code {
            1 => OwnerError::TooManyTopics,
            2 => OwnerError::ClientShare { max: arg as usize },
            3 => OwnerError::StorageBehind,
            4 => OwnerError::StorageFailed,
            5 => OwnerError::GroupFull,
            6 => OwnerError::NoResponders,
            7 => OwnerError::OwnerUnreachable,
            8 => OwnerError::OwnedElsewhere,
            9 => OwnerError::NotMember,
            _ => return Err(LinkError("unknown error code")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{MessageKind, Meta};
    use std::sync::Arc;
    use std::time::Instant;

    fn topic(name: &str) -> TopicName {
        TopicName::new(name).unwrap()
    }

    fn frames() -> Vec<LinkFrame> {
        let meta = Arc::new(Meta {
            kind: Some(MessageKind::Event),
            id: Some("m-1".into()),
            headers: vec![("trace".into(), "abc".into())],
        });
        let at = Instant::now();
        let message = Message {
            seq: 42,
            timestamp_ms: 1_700_000_000_000,
            kind: PayloadKind::Binary,
            payload: Bytes::from_static(b"\x00\x01payload"),
            key: Some(Bytes::from_static(b"order-7")),
            reply_to: None,
            meta: Some(meta.clone()),
            published_at: at,
        };
        vec![
            LinkFrame::Publish {
                id: 7,
                topic: topic("orders"),
                ack: Some(AckLevel::Local),
                kind: PayloadKind::Text,
                payload: Bytes::from_static(b"hello"),
                options: LinkOptions {
                    key: Some(Bytes::from_static(b"k")),
                    meta: Some(meta),
                    reply_to: Some(crate::message::ReplyTo { shard: 1, req: 2, nonce: 3 }),
                },
            },
            LinkFrame::Publish {
                id: 8,
                topic: topic("t"),
                ack: None,
                kind: PayloadKind::Binary,
                payload: Bytes::new(),
                options: LinkOptions::default(),
            },
            LinkFrame::PublishDone { id: 7, result: Ok(99) },
            LinkFrame::PublishDone { id: 8, result: Err(OwnerError::ClientShare { max: 12 }) },
            LinkFrame::PublishDone { id: 9, result: Err(OwnerError::OwnerUnreachable) },
            LinkFrame::Follow { topic: topic("orders"), from: None },
            LinkFrame::Follow {
                topic: topic("orders"),
                from: Some(ResumeFrom { after_seq: 5, epoch: Some(Epoch(77)), since_ms: None }),
            },
            LinkFrame::Follow {
                topic: topic("orders"),
                from: Some(ResumeFrom { after_seq: 0, epoch: None, since_ms: Some(123) }),
            },
            LinkFrame::Unfollow { topic: topic("orders") },
            LinkFrame::Offer { topic: topic("orders") },
            LinkFrame::Followed { topic: topic("orders"), result: Ok((Epoch(77), 41)) },
            LinkFrame::Followed { topic: topic("orders"), result: Err(OwnerError::TooManyTopics) },
            LinkFrame::Message { topic: topic("orders"), message: message.clone() },
            LinkFrame::Gap { topic: topic("orders"), from_seq: 3, to_seq: 9 },
            LinkFrame::Restart { topic: topic("orders") },
            LinkFrame::Group {
                member: 7,
                op: GroupLink::Join {
                    topic: topic("orders"),
                    group: "billing".into(),
                    prefetch: 10,
                    settings: crate::group::GroupSettings {
                        ack_timeout_ms: 30_000,
                        max_deliveries: 5,
                        start: crate::group::GroupStart::Beginning,
                    },
                    dead_letter: topic("orders.dead"),
                },
            },
            LinkFrame::Group { member: 7, op: GroupLink::Leave },
            LinkFrame::Group { member: 7, op: GroupLink::Lost },
            LinkFrame::Group { member: 7, op: GroupLink::Settle(crate::group::Settle::Nack { seq: 4, delay_ms: 9 }) },
            LinkFrame::Group { member: 7, op: GroupLink::Settle(crate::group::Settle::Prefetch { prefetch: 3 }) },
            LinkFrame::Group { member: 7, op: GroupLink::Joined(Ok(())) },
            LinkFrame::Reply {
                to: crate::message::ReplyTo { shard: 1, req: 9, nonce: 77 },
                answer: crate::request::Answer::Result { kind: PayloadKind::Text, payload: Bytes::from_static(b"42") },
            },
            LinkFrame::Reply {
                to: crate::message::ReplyTo { shard: 0, req: 3, nonce: 5 },
                answer: crate::request::Answer::Error { code: "nope".into(), message: "out of stock".into() },
            },
            LinkFrame::Group { member: 7, op: GroupLink::Joined(Err("too_many_groups".into())) },
            LinkFrame::Group { member: 7, op: GroupLink::Deliver { message: message.clone(), delivery: 2, tag: 11 } },
            LinkFrame::Claim { topic: topic("orders"), version: 12, node: "10.0.0.3:8080".into(), at: 9 },
            LinkFrame::Ask {
                id: 4,
                topic: topic("orders"),
                ask: OwnerAsk::Schedule(crate::broker::ScheduleAsk::Add {
                    scheduled: crate::schedule::Scheduled {
                        id: "s0-9".into(),
                        due_ms: 1_700_000_000_000,
                        kind: PayloadKind::Text,
                        payload: Bytes::from_static(b"remind"),
                        key: Some(Bytes::from_static(b"k")),
                        meta: None,
                    },
                    if_absent: true,
                }),
            },
            LinkFrame::Ask {
                id: 5,
                topic: topic("orders"),
                ask: OwnerAsk::Schedule(crate::broker::ScheduleAsk::Cancel { id: "s0-9".into() }),
            },
            LinkFrame::Ask { id: 6, topic: topic("orders"), ask: OwnerAsk::Schedule(crate::broker::ScheduleAsk::List) },
            LinkFrame::Ask { id: 7, topic: topic("orders"), ask: OwnerAsk::GroupDelete { group: "billing".into() } },
            LinkFrame::Answered { id: 4, answer: Ok(serde_json::json!({ "id": "s0-9", "replaced": false })) },
            LinkFrame::Schedules { topic: topic("orders"), list: vec![schedule("a", 9), schedule("b", 10)] },
            LinkFrame::Answered { id: 5, answer: Err(("not_found".into(), "no such schedule".into())) },
            LinkFrame::HandOff { topic: topic("orders"), state: HandOffState::Nothing },
            LinkFrame::HandOff { topic: topic("orders"), state: HandOffState::Refused },
            LinkFrame::HandOff {
                topic: topic("orders"),
                state: HandOffState::State {
                    epoch: Epoch(5),
                    last_seq: 43,
                    history: vec![message.clone(), message.clone()],
                    durable: None,
                    schedules: Vec::new(),
                    groups: vec![crate::group::SavedGroup {
                        group: "workers".into(),
                        ack_timeout_ms: 5_000,
                        max_deliveries: 3,
                        dead_letter: "orders.dead".into(),
                        positions: (0..crate::group::SEGMENTS as u64).map(|s| 42 + s % 2).collect(),
                    }],
                },
            },
            LinkFrame::HandOff {
                topic: topic("orders"),
                state: HandOffState::State {
                    epoch: Epoch(6),
                    last_seq: 90,
                    history: vec![message.clone()],
                    durable: Some(crate::durable::DurableHandOff {
                        spec: crate::durable::DurableSpec { ack: AckLevel::Stored, ..Default::default() },
                        segments: vec![
                            ArchivedSegment { base_seq: 1, last_seq: 40, len: 4096, first_ms: 10, last_ms: 20 },
                            ArchivedSegment { base_seq: 41, last_seq: 90, len: 8192, first_ms: 21, last_ms: 30 },
                        ],
                        groups: vec![crate::group::SavedGroup {
                            group: "billing".into(),
                            ack_timeout_ms: 30_000,
                            max_deliveries: 5,
                            dead_letter: "orders.dead".into(),
                            positions: (0..crate::group::SEGMENTS as u64).map(|s| 40 + s % 3).collect(),
                        }],
                    }),
                    schedules: Vec::new(),
                    groups: Vec::new(),
                },
            },
        ]
    }

    fn schedule(id: &str, size: usize) -> crate::schedule::Scheduled {
        crate::schedule::Scheduled {
            id: id.into(),
            due_ms: 1_700_000_000_000,
            kind: PayloadKind::Binary,
            payload: Bytes::from(vec![1u8; size]),
            key: None,
            meta: None,
        }
    }

    #[test]
    fn a_hand_off_sends_its_schedules_first_in_bounded_frames() {
        let big = SCHEDULES_FRAME_BYTES / 3;
        let schedules: Vec<_> = (0..7).map(|i| schedule(&format!("s{i}"), big)).collect();
        let state = HandOffState::State {
            epoch: Epoch(1),
            last_seq: 3,
            history: vec![],
            durable: None,
            schedules,
            groups: vec![],
        };
        let frames = hand_off_frames(&topic("orders"), state);
        let decoded: Vec<LinkFrame> =
            frames.iter().map(|f| decode(&Bytes::from(f.clone()), Instant::now()).unwrap()).collect();
        let (last, first) = decoded.split_last().unwrap();
        assert!(matches!(last, LinkFrame::HandOff { state: HandOffState::State { last_seq: 3, .. }, .. }));
        let ids: Vec<String> = first
            .iter()
            .flat_map(|f| match f {
                LinkFrame::Schedules { list, .. } => list.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, (0..7).map(|i| format!("s{i}")).collect::<Vec<_>>());
        assert!(first.len() >= 3 && frames.iter().all(|f| f.len() < 2 * SCHEDULES_FRAME_BYTES), "{}", first.len());
    }

    /// Messages compare without their arrival time.
    fn same_message(m1: &Message, m2: &Message) -> bool {
        (m1.seq, m1.timestamp_ms, m1.kind, &m1.payload, &m1.key, &m1.meta)
            == (m2.seq, m2.timestamp_ms, m2.kind, &m2.payload, &m2.key, &m2.meta)
    }

    fn same(a: &LinkFrame, b: &LinkFrame) -> bool {
        match (a, b) {
            (LinkFrame::Message { topic: t1, message: m1 }, LinkFrame::Message { topic: t2, message: m2 }) => {
                t1 == t2 && same_message(m1, m2)
            }
            (
                LinkFrame::HandOff {
                    topic: t1,
                    state: HandOffState::State { epoch: e1, last_seq: l1, history: h1, durable: d1, groups: g1, .. },
                },
                LinkFrame::HandOff {
                    topic: t2,
                    state: HandOffState::State { epoch: e2, last_seq: l2, history: h2, durable: d2, groups: g2, .. },
                },
            ) => {
                (t1, e1, l1, h1.len(), d1, g1) == (t2, e2, l2, h2.len(), d2, g2)
                    && h1.iter().zip(h2).all(|(m1, m2)| same_message(m1, m2))
            }
            (
                LinkFrame::Group { member: i1, op: GroupLink::Deliver { message: m1, delivery: d1, tag: g1 } },
                LinkFrame::Group { member: i2, op: GroupLink::Deliver { message: m2, delivery: d2, tag: g2 } },
            ) => (i1, d1, g1) == (i2, d2, g2) && same_message(m1, m2),
            _ => format!("{a:?}") == format!("{b:?}"),
        }
    }

    #[test]
    fn every_frame_decodes_to_itself() {
        for frame in frames() {
            let bytes = Bytes::from(encode(&frame));
            let back = decode(&bytes, Instant::now()).unwrap();
            assert!(same(&frame, &back), "{frame:?} came back as {back:?}");
        }
    }

    /// Every cut and every flipped byte of every frame is refused or
    /// decodes to some frame: never a panic (the link's parser meets a
    /// peer's bytes).
    #[test]
    fn damaged_frames_are_refused_without_a_panic() {
        let mut refused = 0;
        for frame in frames() {
            let bytes = encode(&frame);
            for cut in 0..bytes.len() {
                assert!(decode(&Bytes::copy_from_slice(&bytes[..cut]), Instant::now()).is_err());
                refused += 1;
            }
            for at in 0..bytes.len() {
                let mut damaged = bytes.clone();
                damaged[at] ^= 0x5a;
                let _ = decode(&Bytes::from(damaged), Instant::now());
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(decode(&Bytes::from(longer), Instant::now()).is_err());
        }
        assert!(refused > 100);
    }
}
