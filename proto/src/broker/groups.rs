//! The broker's side of consumer groups: routing between the members'
//! shards and the group state the topic's owner keeps ([`Group`]).
//!
//! A member joins on its own shard (`join_group`), which tells the owner;
//! the owner offers each message of the topic to every group as it becomes
//! visible (sequenced, or written for a durable topic) and sends each
//! delivery to the member's shard only. Acknowledgements, refusals and
//! prefetch changes go back to the owner; a member's shard that loses the
//! member (leave, connection closed) tells the owner, which gives its
//! unacknowledged messages back. A delivery that reaches a shard after its
//! member left is dropped there: the owner already gave it back.

use std::sync::Arc;

use super::*;
use crate::group::{Group, GroupError, GroupEvent, GroupSettings, MemberId, Settle, GROUPS_PER_TOPIC_MAX};

/// A group's name (as a topic's, up to [`crate::group::GROUP_NAME_BYTES_MAX`] bytes).
pub type GroupName = Arc<str>;

/// A member's request to join.
#[derive(Debug)]
pub struct JoinRequest {
    /// The topic.
    pub topic: TopicName,
    /// The group.
    pub group: GroupName,
    /// The member's send queue.
    pub out: Rc<Outbound>,
    /// Unacknowledged messages it will hold.
    pub prefetch: u32,
    /// The group's settings if this member creates it.
    pub settings: GroupSettings,
    /// Where the group's dead letters go if this member creates it.
    pub dead_letter: TopicName,
    /// The native request to answer.
    pub reply_id: u64,
}

/// A member on this shard.
#[derive(Debug)]
pub(super) struct LocalMember {
    topic: TopicName,
    group: GroupName,
    out: Rc<Outbound>,
    /// The native request its join answers, until answered.
    reply_id: Option<u64>,
}

/// A group on the owner shard, with where its dead letters go.
#[derive(Debug)]
pub(super) struct OwnedGroup {
    group: Group,
    dead_letter: TopicName,
}

impl GroupError {
    /// The error code clients see.
    pub fn code(self) -> &'static str {
        match self {
            GroupError::TooManyMembers => "too_many_members",
            GroupError::AlreadyMember => "already_subscribed",
        }
    }
}

impl Broker {
    /// Joins a member of this shard to a group; its reply (ok, or the
    /// refusal) is queued to its connection when the owner answers.
    /// Returns the member's id for the calls below.
    pub fn join_group(&mut self, request: JoinRequest, now: Now) -> u64 {
        let JoinRequest { topic, group, out, prefetch, settings, dead_letter, reply_id } = request;
        let sub = self.next_id();
        let member = LocalMember { topic: topic.clone(), group: group.clone(), out, reply_id: Some(reply_id) };
        self.members.insert(sub, member);
        metrics::add(&self.metrics.subscriptions_current, 1);
        let owner = topic.owner_shard(self.shards);
        self.send(owner, Item::GroupJoin { topic, group, sub, prefetch, settings, dead_letter }, now);
        sub
    }

    /// Whether `sub` is a member on this shard.
    pub fn is_member(&self, sub: u64) -> bool {
        self.members.contains_key(&sub)
    }

    /// Removes a member of this shard (it left, or its connection closed).
    pub fn leave_group(&mut self, sub: u64, now: Now) {
        let Some(m) = self.members.remove(&sub) else { return };
        if let Some(id) = m.reply_id {
            // Its join is still unanswered: every request gets one reply.
            m.out.offer_control(native::reply_error(Some(id), "not_subscribed", "left before the join was answered"));
        }
        metrics::sub(&self.metrics.subscriptions_current, 1);
        let owner = m.topic.owner_shard(self.shards);
        self.send(owner, Item::GroupLeave { topic: m.topic, group: m.group, sub }, now);
    }

    /// A member's ack, refusal or prefetch change; false when `sub` is not
    /// a member here. The owner ignores one about a message the member no
    /// longer holds (redelivered elsewhere after its deadline).
    pub fn settle(&mut self, sub: u64, settle: Settle, now: Now) -> bool {
        let Some(m) = self.members.get(&sub) else { return false };
        let (topic, group) = (m.topic.clone(), m.group.clone());
        let owner = topic.owner_shard(self.shards);
        self.send(owner, Item::GroupSettle { topic, group, sub, settle }, now);
        true
    }

    /// Applies the time to the groups this shard owns (deadlines, delayed
    /// refusals) and removes those idle past `IDLE_GROUP_MS`.
    pub fn tick_groups(&mut self, now: Now) {
        let mut events = Vec::new();
        let keys: Vec<(TopicName, GroupName)> = self.groups.keys().cloned().collect();
        for key in keys {
            let Some(g) = self.groups.get_mut(&key) else { continue };
            if g.group.is_idle(now.unix_ms) {
                self.groups.remove(&key);
                self.owner.release_for_group(&key.0);
                if let Some(names) = self.group_names.get_mut(&key.0) {
                    names.retain(|n| *n != key.1);
                    if names.is_empty() {
                        self.group_names.remove(&key.0);
                    }
                }
                continue;
            }
            g.group.tick(now.unix_ms, &mut events);
            self.group_events(&key, &mut events, now);
        }
    }

    /// Whether this shard owns any group (the shell ticks them while so).
    pub fn has_groups(&self) -> bool {
        !self.groups.is_empty()
    }

    /// Messages waiting and unacknowledged in a group this shard owns.
    pub fn group_counts(&self, topic: &TopicName, group: &str) -> Option<(usize, usize)> {
        self.groups.get(&(topic.clone(), Arc::from(group))).map(|g| g.group.counts())
    }

    /// Unacknowledged messages member `sub` of shard `shard` holds in a
    /// group this shard owns (deliveries in flight included).
    pub fn group_member_held(&self, topic: &TopicName, group: &str, shard: usize, sub: u64) -> Option<u32> {
        let g = self.groups.get(&(topic.clone(), Arc::from(group)))?;
        let member = MemberId { shard, sub };
        g.group.is_member(member).then(|| g.group.held_by(member))
    }

    /// A group's own bookkeeping check (see `Group::check`).
    pub fn check_group(&self, topic: &TopicName, group: &str) -> Result<(), String> {
        self.groups.get(&(topic.clone(), Arc::from(group))).map_or(Ok(()), |g| g.group.check())
    }

    /// The groups of `topic` this shard owns.
    fn groups_of<'a>(&'a self, topic: &TopicName) -> impl Iterator<Item = &'a OwnedGroup> + 'a {
        // No group on the shard (the common case): no hashing on the
        // publish path.
        let names = if self.group_names.is_empty() { None } else { self.group_names.get(topic) };
        let names = names.map(Vec::as_slice).unwrap_or(&[]);
        let topic = topic.clone();
        names.iter().filter_map(move |n| self.groups.get(&(topic.clone(), n.clone())))
    }

    /// Whether some group of `topic` has a member (a request needs one).
    pub(super) fn has_responders(&self, topic: &TopicName) -> bool {
        self.groups_of(topic).any(|g| g.group.member_count() > 0)
    }

    /// Whether every group of `topic` has room for a message of `len`.
    pub(super) fn groups_have_room(&self, topic: &TopicName, len: usize) -> bool {
        self.groups_of(topic).all(|g| g.group.has_room(len))
    }

    /// A message of `topic` became visible: every group of it gets it.
    pub(super) fn offer_to_groups(&mut self, topic: &TopicName, message: &Message, now: Now) {
        if self.group_names.is_empty() {
            return;
        }
        let Some(names) = self.group_names.get(topic) else { return };
        let keys: Vec<(TopicName, GroupName)> = names.iter().map(|n| (topic.clone(), n.clone())).collect();
        let mut events = Vec::new();
        for key in keys {
            if let Some(g) = self.groups.get_mut(&key) {
                g.group.offer(message.clone(), now.unix_ms, &mut events);
            }
            self.group_events(&key, &mut events, now);
        }
    }

    /// Owner side: a group item from a member's shard.
    pub(super) fn handle_group(&mut self, from: usize, item: Item, now: Now) {
        let mut events = Vec::new();
        match item {
            Item::GroupJoin { topic, group, sub, prefetch, settings, dead_letter } => {
                let key = (topic.clone(), group.clone());
                let of_topic = self.group_names.get(&topic).map_or(0, Vec::len);
                let result = match self.groups.get_mut(&key) {
                    None if of_topic >= GROUPS_PER_TOPIC_MAX => Err(GroupJoinError::TooManyGroups),
                    existing => {
                        let g = match existing {
                            Some(g) => Some(g),
                            // A group keeps its topic from eviction: its state
                            // is keyed by the topic's sequence numbers.
                            None => match self.owner.hold_for_group(&topic, now.at) {
                                Err(_) => None,
                                Ok(()) => {
                                    self.group_names.entry(topic.clone()).or_default().push(group.clone());
                                    let new = OwnedGroup { group: Group::new(settings, now.unix_ms), dead_letter };
                                    Some(self.groups.entry(key.clone()).or_insert(new))
                                }
                            },
                        };
                        match g {
                            Some(g) => {
                                let member = MemberId { shard: from, sub };
                                g.group.join(member, prefetch, now.unix_ms, &mut events).map_err(GroupJoinError::Group)
                            }
                            None => Err(GroupJoinError::TooManyTopics),
                        }
                    }
                };
                // The answer goes before any delivery to the member.
                self.send(from, Item::GroupJoined { topic, group, sub, result }, now);
                self.group_events(&key, &mut events, now);
            }
            Item::GroupLeave { topic, group, sub } => {
                let key = (topic, group);
                if let Some(g) = self.groups.get_mut(&key) {
                    g.group.leave(MemberId { shard: from, sub }, now.unix_ms, &mut events);
                }
                self.group_events(&key, &mut events, now);
            }
            Item::GroupSettle { topic, group, sub, settle } => {
                let key = (topic, group);
                let member = MemberId { shard: from, sub };
                if let Some(g) = self.groups.get_mut(&key) {
                    let (g, at) = (&mut g.group, now.unix_ms);
                    match settle {
                        Settle::Ack { seq } => {
                            g.ack(member, seq, at, &mut events);
                        }
                        Settle::AckThrough { tag } => {
                            g.ack_through(member, tag, at, &mut events);
                        }
                        Settle::Nack { seq, delay_ms } => {
                            g.nack(member, seq, delay_ms, at, &mut events);
                        }
                        Settle::Prefetch { prefetch } => g.set_prefetch(member, prefetch, at, &mut events),
                    }
                }
                self.group_events(&key, &mut events, now);
            }
            // Member side.
            Item::GroupJoined { topic, group, sub, result } => self.group_joined(&topic, &group, sub, result),
            Item::GroupDeliver { topic, group, sub, message, delivery, tag } => {
                let Some(m) = self.members.get(&sub) else { return };
                if m.topic != topic || m.group != group {
                    return;
                }
                let frame = native::encode_group_message(&topic, &group, &message, delivery, tag);
                m.out.offer_control(frame);
            }
            _ => {}
        }
    }

    /// Member side: the owner's answer to a join.
    fn group_joined(&mut self, topic: &TopicName, group: &str, sub: u64, result: Result<(), GroupJoinError>) {
        let Some(m) = self.members.get_mut(&sub) else { return };
        let Some(id) = m.reply_id.take() else { return };
        match result {
            Ok(()) => {
                let extra = serde_json::json!({ "topic": topic.as_str(), "group": group });
                m.out.offer_control(native::reply_ok(id, extra));
            }
            Err(e) => {
                m.out.offer_control(native::reply_error(Some(id), e.code(), &e.to_string()));
                self.members.remove(&sub);
                metrics::sub(&self.metrics.subscriptions_current, 1);
            }
        }
    }

    /// Carries out a group's events: deliveries to members' shards, dead
    /// letters published to the group's dead-letter topic.
    fn group_events(&mut self, key: &(TopicName, GroupName), events: &mut Vec<GroupEvent>, now: Now) {
        for event in events.drain(..) {
            match event {
                GroupEvent::Deliver { member, message, delivery, tag } => {
                    let (topic, group) = (key.0.clone(), key.1.clone());
                    let item = Item::GroupDeliver { topic, group, sub: member.sub, message, delivery, tag };
                    self.send(member.shard, item, now);
                }
                GroupEvent::DeadLetter { message, .. } => {
                    metrics::add(&self.metrics.dead_letters, 1);
                    let Some(to) = self.groups.get(key).map(|g| g.dead_letter.clone()) else { continue };
                    let options = PublishOptions {
                        key: message.key.clone(),
                        ack: None,
                        reply_to: None,
                        meta: message.meta.clone(),
                    };
                    let (kind, payload) = (message.kind, message.payload);
                    // Sequenced like any publish (req 0: nobody awaits the answer).
                    let owner = to.owner_shard(self.shards);
                    self.send(owner, Item::Publish { topic: to, kind, payload, options, req: 0 }, now);
                }
            }
        }
    }
}

/// Why a join was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GroupJoinError {
    /// The topic has its groups.
    #[error("the topic has its {GROUPS_PER_TOPIC_MAX} groups")]
    TooManyGroups,
    /// The node's topic table is full (a group holds its topic).
    #[error("too many topics on this node")]
    TooManyTopics,
    /// The group refused.
    #[error(transparent)]
    Group(GroupError),
}

impl GroupJoinError {
    /// The error code clients see.
    pub fn code(self) -> &'static str {
        match self {
            GroupJoinError::TooManyGroups => "too_many_groups",
            GroupJoinError::TooManyTopics => "too_many_topics",
            GroupJoinError::Group(e) => e.code(),
        }
    }
}
