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
//!   the responder's answer on to the owner ([`LinkFrame::Reply`]). A
//!   request forwarded to the owner by its requester's node is named by
//!   the owner's link session the same way, and answered back on that
//!   link.

use super::*;
use crate::link::{GroupLink, LinkFrame};
use crate::message::ReplyTo;

/// How long a request delivered to a member here waits for its answer to
/// be sent on (the longest a requester waits).
pub const REMOTE_REPLY_MS: u64 = crate::request::REQUEST_TIMEOUT_MS_MAX;
/// Requests delivered here whose answer is still to be sent on, at most
/// (past it the oldest are forgotten: their requesters time out).
pub const REMOTE_REPLIES_MAX: usize = crate::request::REQUESTS_WAITING_MAX;

/// A request whose requester is on another node, named by this shard in
/// the delivery (see [`Broker::relay_request`]): where its answer goes.
#[derive(Debug)]
pub(super) struct Relayed {
    route: ReplyRoute,
    /// The requester on its node.
    to: ReplyTo,
    nonce: u64,
    expires_ms: u64,
}

/// How an answer reaches the requester's node.
#[derive(Debug)]
pub(super) enum ReplyRoute {
    /// Over this node's link to that node (the requester is on the owner;
    /// the responder is a member here).
    Node(String),
    /// Back on the link that node opened here (it forwarded the request).
    Link(Rc<Outbound>),
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
                    message.reply_to = Some(self.relay_request(to, ReplyRoute::Node(node.to_string()), now));
                }
                self.send(shard, Item::GroupDeliver { topic, group, sub, message, delivery, tag }, now);
            }
            GroupLink::Lost => {
                self.remote_members.remove(&member);
                self.remote_member_ids.remove(&(shard, sub));
                self.send(shard, Item::GroupLost { topic, group, sub }, now);
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

    /// A request forwarded by its requester's node over the link `out`
    /// (its `reply_to` names the requester there): named by this shard
    /// instead, so that its answer comes here and goes back on the link.
    pub fn relay_reply_to(&mut self, options: &mut PublishOptions, out: Rc<Outbound>, now: Now) {
        if let Some(to) = options.reply_to {
            options.reply_to = Some(self.relay_request(to, ReplyRoute::Link(out), now));
        }
    }

    /// Names this shard for a request whose requester `to` is on another
    /// node (kept at most [`REMOTE_REPLY_MS`]; past [`REMOTE_REPLIES_MAX`]
    /// the oldest is forgotten and its requester times out).
    fn relay_request(&mut self, to: ReplyTo, route: ReplyRoute, now: Now) -> ReplyTo {
        let req = self.next_id();
        let nonce = crate::hash::avalanche(self.owner.seed() ^ crate::hash::avalanche(req));
        if self.relayed.len() >= REMOTE_REPLIES_MAX {
            let oldest = self.relayed.keys().min().copied();
            oldest.map(|k| self.relayed.remove(&k));
        }
        let expires_ms = now.unix_ms + REMOTE_REPLY_MS;
        self.relayed.insert(req, Relayed { route, to, nonce, expires_ms });
        ReplyTo { shard: self.id, req, nonce }
    }

    /// A responder's answer naming `to`: if it is a request relayed here,
    /// sent on to its requester's node (true).
    pub(super) fn reply_relayed(&mut self, to: &ReplyTo, answer: &crate::request::Answer) -> bool {
        let ours = self.relayed.get(&to.req).is_some_and(|r| r.nonce == to.nonce);
        let Some(r) = ours.then(|| self.relayed.remove(&to.req)).flatten() else { return false };
        let frame = LinkFrame::Reply { to: r.to, answer: answer.clone() };
        match r.route {
            ReplyRoute::Node(node) => self.actions.push(Action::Link { node, frame }),
            ReplyRoute::Link(out) => {
                out.offer_control(ws::encode_data(PayloadKind::Binary, &crate::link::encode(&frame)));
            }
        }
        true
    }

    /// Forgets relayed requests whose requesters stopped waiting.
    pub(super) fn expire_relayed(&mut self, now: Now) {
        if !self.relayed.is_empty() {
            self.relayed.retain(|_, r| r.expires_ms > now.unix_ms);
        }
    }
}
