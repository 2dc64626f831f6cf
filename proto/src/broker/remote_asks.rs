//! What only a topic's owner answers (its schedules: add, cancel, list;
//! deleting one of its consumer groups), asked on another node of the
//! cluster: the asking node's owner shard forwards the question over the
//! node link ([`LinkFrame::Ask`]); the owner's link session asks its owner
//! shard as a connection would ([`Broker::ask_from_link`]) and writes the
//! answer back ([`LinkFrame::Answered`]), which goes to the asking
//! connection as the owner's own answer would.
//!
//! A link that fails fails its unanswered questions with
//! `owner_unreachable` (retryable: an add may have been kept, as a publish
//! may have been sequenced).

use super::*;
use crate::link::{LinkFrame, OwnerAsk};

/// Questions forwarded and not yet answered, per shard, at most: past it
/// they are refused at once (`owner_unreachable`), so a silent owner
/// cannot grow memory. A question is a connection's request: each waits
/// for its answer, so this bounds nothing a client does in order.
pub const REMOTE_ASKS_MAX: usize = 10_000;

/// Who waits for the owner's answer to a question.
#[derive(Debug)]
pub(super) enum Asker {
    /// A connection of this node, by its native request id.
    Native { out: Rc<Outbound>, id: u64 },
    /// Another node, over the link, by its question's id.
    Link { out: Rc<Outbound>, id: u64 },
}

impl Broker {
    /// The owner shard got question `ask` about `topic` from shard `from`
    /// (its request `req`), and `node` owns the topic: forwarded.
    pub(super) fn forward_ask(
        &mut self,
        node: String,
        from: usize,
        req: u64,
        topic: TopicName,
        ask: OwnerAsk,
        now: Now,
    ) {
        if self.remote_asks.len() >= REMOTE_ASKS_MAX {
            self.send(from, Item::OwnerAnswer { req, answer: refused(OwnerError::OwnerUnreachable) }, now);
            return;
        }
        let id = self.next_id();
        self.remote_asks.insert(id, (node.clone(), from, req));
        self.actions.push(Action::Link { node, frame: LinkFrame::Ask { id, topic, ask } });
    }

    /// Owner node `node` answered question `id`.
    pub(super) fn remote_answered(&mut self, node: &str, id: u64, answer: OwnerAnswer, now: Now) {
        if self.remote_asks.get(&id).is_some_and(|(n, _, _)| n == node) {
            if let Some((_, from, req)) = self.remote_asks.remove(&id) {
                self.send(from, Item::OwnerAnswer { req, answer }, now);
            }
        }
    }

    /// The link to `node` failed: its unanswered questions fail.
    pub(super) fn remote_asks_link_down(&mut self, node: &str, now: Now) {
        let mut failed: Vec<u64> =
            self.remote_asks.iter().filter(|(_, (n, _, _))| n == node).map(|(id, _)| *id).collect();
        failed.sort_unstable();
        for id in failed {
            if let Some((_, from, req)) = self.remote_asks.remove(&id) {
                self.send(from, Item::OwnerAnswer { req, answer: refused(OwnerError::OwnerUnreachable) }, now);
            }
        }
    }

    /// Owner side: a link session got question `id` about `topic`: asked
    /// of the topic's owner shard as a connection's would be; the answer
    /// goes back on `out`.
    pub fn ask_from_link(&mut self, topic: TopicName, ask: OwnerAsk, out: Rc<Outbound>, id: u64, now: Now) {
        let req = self.next_id();
        self.asking.insert(req, Asker::Link { out, id });
        let owner = topic.owner_shard(self.shards);
        let item = match ask {
            OwnerAsk::Schedule(ask) => Item::ScheduleAsk { topic, ask, req },
            OwnerAsk::GroupDelete { group } => Item::GroupDelete { topic, group: group.into(), req },
        };
        self.send(owner, item, now);
    }

    /// Asker side: the owner answered request `req` (see `asking`): the
    /// connection gets its reply, or the asking node its answer.
    pub(super) fn owner_answered(&mut self, req: u64, answer: OwnerAnswer) {
        match self.asking.remove(&req) {
            Some(Asker::Native { out, id }) => {
                let frame = match answer {
                    Ok(fields) => native::reply_ok(id, fields),
                    Err((code, message)) => native::reply_error(Some(id), &code, &message),
                };
                out.offer_control(frame);
            }
            Some(Asker::Link { out, id }) => {
                let frame = crate::link::encode(&LinkFrame::Answered { id, answer });
                out.offer_control(ws::encode_data(PayloadKind::Binary, &frame));
            }
            None => {}
        }
    }
}
