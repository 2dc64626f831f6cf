//! Consumer group members whose connection is on another node than the
//! topic's owner, the broker's side.
//!
//! - On the member's node, the topic's owner shard (which holds the
//!   node's copy of the topic) forwards the member's join, leave and
//!   settles over the node link ([`LinkFrame::Group`]), naming the member
//!   by an id of its own, and routes the owner's answer and deliveries
//!   back to the member's shard, which serves them as a local owner's.
//! - On the owner's node, the link session joins for the remote member
//!   like a connection of its own ([`Broker::join_group_link`]): the group
//!   counts it as any member (prefetch, acks, deadlines, redelivery), and
//!   its answer and deliveries are written to the link as group frames.
//! - When the link fails, the member's node tells each remote member's
//!   connection (`group_lost` notice: join again) and the owner's session
//!   leaves for them (what they held is delivered to the others).
//! - A request delivered to such a member names its requester on the
//!   owner: the member's node puts its own name for it in the delivery
//!   (a shard and id here, kept at most [`REMOTE_REPLY_MS`]) and sends
//!   the responder's answer on to the owner ([`LinkFrame::Reply`]).

use super::*;
use crate::link::{GroupLink, LinkFrame};

/// How long a request delivered to a member here waits for its answer to
/// be sent on (the longest a requester waits).
pub const REMOTE_REPLY_MS: u64 = crate::request::REQUEST_TIMEOUT_MS_MAX;
/// Requests delivered here whose answer is still to be sent on, at most
/// (past it the oldest are forgotten: their requesters time out).
pub const REMOTE_REPLIES_MAX: usize = crate::request::REQUESTS_WAITING_MAX;

/// A request delivered to a member here, its requester on another node.
#[derive(Debug)]
pub(super) struct RemoteReply {
    node: String,
    to: crate::message::ReplyTo,
    nonce: u64,
    expires_ms: u64,
}

/// A request forwarded here by its requester's node: the link to answer
/// on and the requester there.
#[derive(Debug)]
pub(super) struct ReplyBack {
    out: Rc<Outbound>,
    to: crate::message::ReplyTo,
    nonce: u64,
    expires_ms: u64,
}

/// A member of this node whose group is on another node.
#[derive(Debug)]
pub(super) struct RemoteMember {
    /// The topic's owner node.
    node: String,
    /// The member's shard and id there.
    shard: usize,
    sub: u64,
    topic: TopicName,
    group: GroupName,
}

impl Broker {
    /// A member of shard `from` joins a group of a topic `node` owns: sent
    /// over the link.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_group_join(
        &mut self,
        node: String,
        from: usize,
        topic: TopicName,
        group: GroupName,
        sub: u64,
        prefetch: u32,
        settings: crate::group::GroupSettings,
        dead_letter: TopicName,
    ) {
        let member = self.next_id();
        let remote = RemoteMember { node: node.clone(), shard: from, sub, topic: topic.clone(), group: group.clone() };
        self.remote_members.insert(member, remote);
        self.remote_member_ids.insert((from, sub), member);
        let op = GroupLink::Join { topic, group: group.to_string(), prefetch, settings, dead_letter };
        self.actions.push(Action::Link { node, frame: LinkFrame::Group { member, op } });
    }

    /// Whether member `sub` of shard `from` is a remote group's member.
    pub(super) fn is_remote_member(&self, from: usize, sub: u64) -> bool {
        !self.remote_member_ids.is_empty() && self.remote_member_ids.contains_key(&(from, sub))
    }

    /// A remote member left or settled: sent over the link.
    pub(super) fn forward_group_op(&mut self, from: usize, sub: u64, op: GroupLink) {
        let Some(&member) = self.remote_member_ids.get(&(from, sub)) else { return };
        if matches!(op, GroupLink::Leave) {
            self.remote_member_ids.remove(&(from, sub));
        }
        let node = if matches!(op, GroupLink::Leave) {
            self.remote_members.remove(&member).map(|m| m.node)
        } else {
            self.remote_members.get(&member).map(|m| m.node.clone())
        };
        if let Some(node) = node {
            self.actions.push(Action::Link { node, frame: LinkFrame::Group { member, op } });
        }
    }

    /// The owner's group frame for a member of this node.
    pub(super) fn remote_group_frame(&mut self, node: &str, member: u64, op: GroupLink, now: Now) {
        let Some(m) = self.remote_members.get(&member).filter(|m| m.node == node) else { return };
        let (shard, sub, topic, group) = (m.shard, m.sub, m.topic.clone(), m.group.clone());
        match op {
            GroupLink::Joined(result) => {
                let result = result.map_err(|code| GroupJoinError::from_code(&code));
                if result.is_err() {
                    self.remote_members.remove(&member);
                    self.remote_member_ids.remove(&(shard, sub));
                }
                self.send(shard, Item::GroupJoined { topic, group, sub, result }, now);
            }
            GroupLink::Deliver { mut message, delivery, tag } => {
                // A request: its answer comes back here, to be sent on.
                if let Some(to) = message.reply_to {
                    let req = self.next_id();
                    let nonce = req.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ self.owner.seed();
                    if self.remote_replies.len() >= REMOTE_REPLIES_MAX {
                        let oldest = self.remote_replies.keys().min().copied();
                        oldest.map(|k| self.remote_replies.remove(&k));
                    }
                    let expires_ms = now.unix_ms + REMOTE_REPLY_MS;
                    self.remote_replies.insert(req, RemoteReply { node: node.to_string(), to, nonce, expires_ms });
                    message.reply_to = Some(crate::message::ReplyTo { shard: self.id, req, nonce });
                }
                self.send(shard, Item::GroupDeliver { topic, group, sub, message, delivery, tag }, now);
            }
            // Frames only an owner receives.
            GroupLink::Join { .. } | GroupLink::Leave | GroupLink::Settle(_) => {}
        }
    }

    /// The link to `node` failed: its groups' members here are told
    /// (`group_lost`; they join again).
    pub(super) fn remote_groups_link_down(&mut self, node: &str, now: Now) {
        let mut lost: Vec<u64> =
            self.remote_members.iter().filter(|(_, m)| m.node == node).map(|(id, _)| *id).collect();
        lost.sort_unstable();
        for member in lost {
            let Some(m) = self.remote_members.remove(&member) else { continue };
            self.remote_member_ids.remove(&(m.shard, m.sub));
            self.send(m.shard, Item::GroupLost { topic: m.topic, group: m.group, sub: m.sub }, now);
        }
    }

    /// A responder's answer naming `to`: if it is a request delivered here
    /// for another node's requester, sent on there (true).
    pub(super) fn reply_on(&mut self, to: &crate::message::ReplyTo, answer: &crate::request::Answer) -> bool {
        let theirs = self.remote_replies.get(&to.req).is_some_and(|r| r.nonce == to.nonce);
        let Some(r) = theirs.then(|| self.remote_replies.remove(&to.req)).flatten() else { return false };
        let frame = LinkFrame::Reply { to: r.to, answer: answer.clone() };
        self.actions.push(Action::Link { node: r.node, frame });
        true
    }

    /// Forgets requests delivered here whose requesters stopped waiting.
    pub(super) fn expire_remote_replies(&mut self, now: Now) {
        if !self.remote_replies.is_empty() {
            self.remote_replies.retain(|_, r| r.expires_ms > now.unix_ms);
        }
        if !self.reply_backs.is_empty() {
            self.reply_backs.retain(|_, r| r.expires_ms > now.unix_ms);
        }
    }

    /// A request forwarded by its requester's node over the link `out`
    /// (its `reply_to` names the requester there): named by this shard
    /// instead, so that its answer comes here and goes back on the link.
    pub fn relay_reply_to(&mut self, options: &mut PublishOptions, out: Rc<Outbound>, now: Now) {
        let Some(to) = options.reply_to else { return };
        let req = self.next_id();
        let nonce = req.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ self.owner.seed();
        if self.reply_backs.len() >= REMOTE_REPLIES_MAX {
            let oldest = self.reply_backs.keys().min().copied();
            oldest.map(|k| self.reply_backs.remove(&k));
        }
        let expires_ms = now.unix_ms + REMOTE_REPLY_MS;
        self.reply_backs.insert(req, ReplyBack { out, to, nonce, expires_ms });
        options.reply_to = Some(crate::message::ReplyTo { shard: self.id, req, nonce });
    }

    /// A responder's answer naming `to`: if it is a request forwarded here
    /// by its requester's node, written back on that link (true).
    pub(super) fn reply_back(&mut self, to: &crate::message::ReplyTo, answer: &crate::request::Answer) -> bool {
        let theirs = self.reply_backs.get(&to.req).is_some_and(|r| r.nonce == to.nonce);
        let Some(r) = theirs.then(|| self.reply_backs.remove(&to.req)).flatten() else { return false };
        let frame = LinkFrame::Reply { to: r.to, answer: answer.clone() };
        r.out.offer_control(ws::encode_data(PayloadKind::Binary, &crate::link::encode(&frame)));
        true
    }
}
