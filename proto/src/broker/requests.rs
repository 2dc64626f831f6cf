//! Request/reply (commands and queries), the broker's side. A request is a
//! message of a topic carrying a return address (`ReplyTo`: the
//! requester's shard and request id); the topic's owner refuses it with
//! `no_responders` when no consumer group of the topic has a member, else
//! sequences it and offers it to the groups as any message. A member
//! answers with `reply`, which goes straight to the requester's shard
//! (never through the topic, so no subscriber sees it); that shard hands it
//! to the waiting request and tells the responder's shard whether anyone
//! was still waiting. A request no reply reached by its deadline is
//! answered `timeout` by its shard's tick.
//!
//! For the cluster the return address gains the node: the reply then
//! crosses a node link instead of the shard mesh, and nothing else changes.

use super::*;
use crate::message::ReplyTo;
use crate::request::{Answer, REQUESTS_WAITING_MAX, REQUEST_TIMEOUT_MS_MAX};

/// A request waiting for its reply on the requester's shard.
#[derive(Debug)]
pub(super) struct WaitingRequest {
    out: Rc<Outbound>,
    /// What its `ReplyTo` carries; a reply naming another is refused.
    nonce: u64,
    /// The native request id to answer.
    id: u64,
    deadline_ms: u64,
}

impl Broker {
    /// Sends a request: published to `topic` with this shard's return
    /// address; the native reply `id` on `out` comes with the responder's
    /// answer, or an error (`no_responders`, `timeout`, `responder_error`,
    /// or the publish's own refusal).
    pub fn request(&mut self, request: RequestSpec, now: Now) {
        let RequestSpec { topic, kind, payload, key, meta, timeout_ms, out, id } = request;
        if self.requests.len() >= REQUESTS_WAITING_MAX {
            let why = format!("{REQUESTS_WAITING_MAX} requests wait on this shard");
            out.offer_control(native::reply_error(Some(id), "too_many_requests", &why));
            return;
        }
        let req = self.next_id();
        let deadline_ms = now.unix_ms.saturating_add(timeout_ms.min(REQUEST_TIMEOUT_MS_MAX));
        let nonce = crate::hash::avalanche(self.owner.seed() ^ crate::hash::avalanche(req));
        self.requests.insert(req, WaitingRequest { out, nonce, id, deadline_ms });
        let reply_to = Some(ReplyTo { shard: self.id, req, nonce });
        let options = PublishOptions { key, ack: None, reply_to, meta };
        self.publish(topic, kind, payload, options, PublishReply::Request { req }, now);
    }

    /// A publish made for request `req` was refused: the request fails.
    pub(super) fn request_refused(&mut self, req: u64, e: OwnerError) {
        if let Some(w) = self.requests.remove(&req) {
            w.out.offer_control(native::reply_error(Some(w.id), e.code(), &e.to_string()));
        }
    }

    /// A responder on this shard answers the request at `to`; `reply_id`
    /// (if any) on `out` is answered once the requester's shard says
    /// whether the request was still waiting.
    pub fn reply(&mut self, to: ReplyTo, answer: Answer, out: Rc<Outbound>, reply_id: Option<u64>, now: Now) -> bool {
        if to.shard >= self.shards {
            return false;
        }
        // 0: nobody waits for the requester shard's word (the reply had
        // no id), so none is sent back.
        let back = match reply_id {
            Some(id) => {
                let back = self.next_id();
                self.replying.insert(back, (out, id));
                back
            }
            None => 0,
        };
        self.send(to.shard, Item::Reply { to, answer, back }, now);
        true
    }

    /// Answers requests past their deadline with `timeout`.
    pub fn tick_requests(&mut self, now: Now) {
        self.expire_relayed(now);
        let expired: Vec<u64> =
            self.requests.iter().filter(|(_, w)| w.deadline_ms <= now.unix_ms).map(|(r, _)| *r).collect();
        for req in expired {
            if let Some(w) = self.requests.remove(&req) {
                let why = "no reply within the request's timeout";
                w.out.offer_control(native::reply_error(Some(w.id), "timeout", why));
            }
        }
    }

    /// Requests waiting on this shard.
    pub fn has_requests(&self) -> bool {
        !self.requests.is_empty() || !self.relayed.is_empty()
    }

    /// A reply item, or the answer to one.
    pub(super) fn handle_reply(&mut self, from: usize, item: Item, now: Now) {
        match item {
            Item::Reply { to, answer, back } => {
                // A request delivered here for another node's requester, or
                // forwarded here by its requester's node: its answer goes
                // on there.
                if self.reply_relayed(&to, &answer) {
                    if back != 0 {
                        self.send(from, Item::ReplyDone { back, delivered: true }, now);
                    }
                    return;
                }
                // A reply naming a request with the wrong nonce is not its
                // (guessed); the request stays waiting.
                let ours = self.requests.get(&to.req).is_some_and(|w| w.nonce == to.nonce);
                let waiting = if ours { self.requests.remove(&to.req) } else { None };
                let waiting = waiting.filter(|w| !w.out.is_closing());
                let delivered = waiting.is_some();
                if let Some(w) = waiting {
                    let frame = match answer {
                        Answer::Result { kind, payload } => {
                            native::reply_ok(w.id, native::payload_fields(kind, &payload))
                        }
                        Answer::Error { code, message } => {
                            let message = format!("{code}: {message}");
                            native::reply_error(Some(w.id), "responder_error", &message)
                        }
                    };
                    w.out.offer_control(frame);
                }
                if back != 0 {
                    self.send(from, Item::ReplyDone { back, delivered }, now);
                }
            }
            Item::ReplyDone { back, delivered } => {
                let Some((out, id)) = self.replying.remove(&back) else { return };
                let frame = if delivered {
                    native::reply_ok(id, serde_json::json!({}))
                } else {
                    let why = "no request waits for this reply (answered, timed out, or its requester left)";
                    native::reply_error(Some(id), "requester_gone", why)
                };
                out.offer_control(frame);
            }
            _ => {}
        }
    }
}

/// A connection's request.
#[derive(Debug)]
pub struct RequestSpec {
    /// The topic its responders consume.
    pub topic: TopicName,
    /// Text or binary.
    pub kind: PayloadKind,
    /// The request.
    pub payload: Bytes,
    /// Its routing key (which member gets it).
    pub key: Option<Bytes>,
    /// Its kind (a command, a query), id and headers.
    pub meta: Option<std::sync::Arc<crate::message::Meta>>,
    /// How long to wait for the reply.
    pub timeout_ms: u64,
    /// The requester's send queue.
    pub out: Rc<Outbound>,
    /// The native request id to answer.
    pub id: u64,
}
