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
use crate::group::{
    Group, GroupError, GroupEvent, GroupSettings, GroupStart, MemberId, SavedGroup, Settle, GROUPS_PER_TOPIC_MAX,
    SEGMENTS,
};

/// A durable topic's group reads the log while fewer messages than this
/// are queued in it (its read-ahead; refusals waiting out a delay do not
/// count): memory stays bounded however far behind it is, and publishes
/// are never refused for it (the log holds them). Large enough that a few
/// slow keys do not hold the others back for long.
pub const DURABLE_READ_AHEAD_MESSAGES: usize = 4_096;
/// Payload bytes of a durable group's read-ahead (as above).
pub const DURABLE_READ_AHEAD_BYTES: usize = 16 << 20;
/// A durable group without members is removed after this long, with its
/// saved positions (Kafka's default `offsets.retention.minutes`).
pub const DURABLE_IDLE_GROUP_MS: u64 = 7 * 24 * 3_600_000;
/// Bytes one read of the log brings a durable group, about.
pub const DURABLE_READ_BYTES: usize = 1 << 20;
/// After a read of the log that brought nothing (the store failed), the
/// next one waits this long.
pub const DURABLE_READ_RETRY_MS: u64 = 1_000;
/// Durable groups' positions are handed to the shell to save at most this
/// often (a crash redelivers what was acknowledged since the last save).
pub const GROUP_SAVE_INTERVAL_MS: u64 = 100;

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
    /// A member on another node, joined by its node's link session here:
    /// its id on that link (answers and deliveries go as link frames).
    link: Option<u64>,
}

/// A group on the owner shard, with where its dead letters go.
#[derive(Debug)]
pub(super) struct OwnedGroup {
    group: Group,
    dead_letter: TopicName,
    /// A durable topic's group: how it reads the log.
    feed: Option<LogFeed>,
}

/// How a durable topic's group takes its messages: from the topic's log,
/// in reads of [`DURABLE_READ_BYTES`], and live (without a read) only
/// while it is caught up. Its positions are saved by the shell
/// ([`Broker::take_group_saves`]) and restored at start
/// ([`Broker::restore_group`]).
#[derive(Debug)]
pub(super) struct LogFeed {
    /// The next sequence to offer: every one before it was offered.
    next: u64,
    /// A read of the log is in flight.
    reading: bool,
    /// No read before this time (after one that brought nothing).
    retry_at_ms: u64,
    /// The positions last handed to the shell to save.
    saved: Vec<u64>,
}

/// A removed durable group whose save the shell must delete, then report
/// with [`Broker::group_save_deleted`].
#[derive(Debug, Clone)]
pub struct GroupDeleteJob {
    /// The group's topic.
    pub topic: TopicName,
    /// The group.
    pub group: String,
    /// The `delete_group` waiting for it: the asking shard and request.
    answer: Option<(usize, u64)>,
}

/// A durable group the shell must save (see [`SavedGroup`]).
#[derive(Debug, Clone)]
pub struct GroupSave {
    /// The group's topic.
    pub topic: TopicName,
    /// What to save.
    pub saved: SavedGroup,
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
        self.join(request, None, now)
    }

    fn join(&mut self, request: JoinRequest, link: Option<u64>, now: Now) -> u64 {
        let JoinRequest { topic, group, out, prefetch, settings, dead_letter, reply_id } = request;
        let sub = self.next_id();
        let member = LocalMember { topic: topic.clone(), group: group.clone(), out, reply_id: Some(reply_id), link };
        self.members.insert(sub, member);
        metrics::add(&self.metrics.subscriptions_current, 1);
        let owner = topic.owner_shard(self.shards);
        self.send(owner, Item::GroupJoin { topic, group, sub, prefetch, settings, dead_letter }, now);
        sub
    }

    /// Joins for a member on another node (its node's link session here,
    /// `request.out` being the link, `member` its id there): as
    /// [`Broker::join_group`], its answer and deliveries written as link
    /// frames.
    pub fn join_group_link(&mut self, request: JoinRequest, member: u64, now: Now) -> u64 {
        self.join(request, Some(member), now)
    }

    /// Whether `sub` is a member on this shard.
    pub fn is_member(&self, sub: u64) -> bool {
        self.members.contains_key(&sub)
    }

    /// Removes a member of this shard (it left, or its connection closed).
    pub fn leave_group(&mut self, sub: u64, now: Now) {
        let Some(m) = self.members.remove(&sub) else { return };
        // Its join is still unanswered: every request gets one reply. Not
        // a member on another node: its node answers its own client, and
        // this queue is the node link, where a native reply is a malformed
        // frame (the peer dropped the link; found by the topology
        // simulation once it had group members).
        if let (Some(id), None) = (m.reply_id, m.link) {
            m.out.offer_control(native::reply_error(Some(id), "not_subscribed", "left before the join was answered"));
        }
        metrics::sub(&self.metrics.subscriptions_current, 1);
        let owner = m.topic.owner_shard(self.shards);
        self.send(owner, Item::GroupLeave { topic: m.topic, group: m.group, sub }, now);
    }

    /// Asks `topic`'s owner to delete `group` (it must have no members),
    /// with its saved position; the native reply `id` on `out` comes with
    /// the owner's answer: ok, `not_found`, or `busy` (it has members).
    pub fn delete_group(&mut self, topic: TopicName, group: GroupName, out: Rc<Outbound>, id: u64, now: Now) {
        let req = self.next_id();
        self.asking.insert(req, remote_asks::Asker::Native { out, id });
        let owner = topic.owner_shard(self.shards);
        self.send(owner, Item::GroupDelete { topic, group, req }, now);
    }

    /// `topic` stops being sequenced here (it moved to another node): its
    /// groups end here, their members told `group_lost` (they join again,
    /// on the new owner). Returns every group's positions, which go with
    /// the topic's state to the new owner (`groups_arrived`): there they go
    /// on from the first message not acknowledged here (a durable group
    /// from the log, an ephemeral one from the history handed over).
    /// `next` is the number after the last one sequenced here.
    pub(super) fn groups_leaving(&mut self, topic: &TopicName, next: u64, now: Now) -> Vec<SavedGroup> {
        let Some(names) = self.group_names.get(topic).cloned() else { return Vec::new() };
        let mut saved = Vec::new();
        for group in names {
            let key = (topic.clone(), group.clone());
            let Some(g) = self.groups.get(&key) else { continue };
            let members = g.group.member_ids();
            // A durable group has been offered its log up to its feed; an
            // ephemeral one every message sequenced before `next`.
            let offered = g.feed.as_ref().map_or(next, |feed| feed.next);
            saved.push(Self::saved_group(&group, g, g.group.positions(offered)));
            for m in members {
                self.send(m.shard, Item::GroupLost { topic: topic.clone(), group: group.clone(), sub: m.sub }, now);
            }
            self.remove_group(&key, None, false);
        }
        saved
    }

    /// A topic's groups handed over from its previous owner
    /// (`groups_leaving` there), its state taken over just before: restored
    /// (they wait for their members to join again); a durable topic's read
    /// its log and are saved here, an ephemeral topic's are offered the
    /// history this shard now holds for it.
    pub(super) fn groups_arrived(&mut self, topic: &TopicName, groups: Vec<SavedGroup>, now: Now) {
        let durable = self.owner.written_seq(topic).is_some();
        let retained = match (durable, groups.is_empty()) {
            (false, false) => self.owner.handed_state(topic).map(|(_, _, history)| history).unwrap_or_default(),
            _ => Vec::new(),
        };
        for saved in groups {
            let name = saved.group.clone();
            let restored = if durable {
                self.restore_group(topic, saved, now)
            } else {
                self.restore_ephemeral_group(topic, saved, &retained, now)
            };
            match restored {
                // Saved at the next save (its files here are new).
                Ok(()) if durable => self.group_save_failed(topic, &name),
                Ok(()) => {}
                Err(e) => tracing::warn!(topic = topic.as_str(), group = name, "a handed-over group is dropped: {e}"),
            }
        }
    }

    /// An ephemeral topic's group handed over from its previous owner, with
    /// the topic's retained history: made again with its settings,
    /// and offered every retained message from its positions on (what was
    /// unacknowledged or waiting there is delivered again: at least once).
    /// Messages older than the history are not recovered. It waits for its
    /// members to join again.
    fn restore_ephemeral_group(
        &mut self,
        topic: &TopicName,
        saved: SavedGroup,
        retained: &[Message],
        now: Now,
    ) -> Result<(), String> {
        let (key, dead_letter, settings) = self.restoring(topic, &saved, now)?;
        let mut group = Group::new(settings, now.unix_ms);
        group.set_floors(&saved.positions);
        let mut events = Vec::new();
        for message in retained {
            if !group.has_room(message.payload.len()) {
                break;
            }
            // Below its segment's floor it was done: `offer` skips it.
            group.offer(message.clone(), now.unix_ms, &mut events);
        }
        self.group_names.entry(topic.clone()).or_default().push(key.1.clone());
        self.groups.insert(key.clone(), OwnedGroup { group, dead_letter, feed: None });
        // No member yet: nothing to deliver; the ticker keeps its deadlines.
        self.group_events(&key, &mut events, now);
        self.actions.push(Action::Tick);
        Ok(())
    }

    /// What a durable group's save holds, at `positions`.
    fn saved_group(name: &GroupName, g: &OwnedGroup, positions: Vec<u64>) -> SavedGroup {
        let settings = g.group.settings();
        SavedGroup {
            group: name.to_string(),
            ack_timeout_ms: settings.ack_timeout_ms,
            max_deliveries: settings.max_deliveries,
            dead_letter: g.dead_letter.as_str().to_string(),
            positions,
        }
    }

    /// Removes an owned group and what it holds (its topic is no longer
    /// held for it); with `delete_save`, a durable one's save is deleted
    /// by the shell, and `answer` (the asking shard and its request) is
    /// answered after that. Whether it had a save to delete.
    fn remove_group(&mut self, key: &(TopicName, GroupName), answer: Option<(usize, u64)>, delete_save: bool) -> bool {
        let Some(g) = self.groups.remove(key) else { return false };
        let durable = g.feed.is_some() && delete_save;
        if durable {
            self.group_deletes.push(GroupDeleteJob { topic: key.0.clone(), group: key.1.to_string(), answer });
        }
        self.owner.release_for_group(&key.0);
        if let Some(names) = self.group_names.get_mut(&key.0) {
            names.retain(|n| *n != key.1);
            if names.is_empty() {
                self.group_names.remove(&key.0);
            }
        }
        durable
    }

    /// The shell deleted (`ok`) or failed to delete a removed durable
    /// group's save: a `delete_group` waiting for it is answered.
    pub fn group_save_deleted(&mut self, job: GroupDeleteJob, ok: bool, now: Now) {
        let Some((from, req)) = job.answer else { return };
        let answer = if ok {
            Ok(serde_json::json!({"topic": job.topic.as_str(), "group": job.group}))
        } else {
            Err(("storage_failed".to_string(), "the group's saved position could not be deleted".to_string()))
        };
        self.send(from, Item::OwnerAnswer { req, answer }, now);
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
    /// refusals) and removes those idle past `IDLE_GROUP_MS` (a durable
    /// topic's: `DURABLE_IDLE_GROUP_MS`).
    pub fn tick_groups(&mut self, now: Now) {
        let mut events = Vec::new();
        let keys: Vec<(TopicName, GroupName)> = self.groups.keys().cloned().collect();
        for key in keys {
            let Some(g) = self.groups.get_mut(&key) else { continue };
            // A durable group stays without members for a week (its
            // position is what a restarted worker pool resumes from).
            let expired = match g.feed {
                None => g.group.is_idle(now.unix_ms),
                Some(_) => g.group.idle_for(now.unix_ms) >= DURABLE_IDLE_GROUP_MS,
            };
            if expired {
                self.remove_group(&key, None, true);
                continue;
            }
            g.group.tick(now.unix_ms, &mut events);
            self.group_events(&key, &mut events, now);
            self.feed_group(&key, now);
        }
    }

    /// Whether this shard owns any group, or has a removed durable group's
    /// save to delete (the shell ticks them while so).
    pub fn has_groups(&self) -> bool {
        !self.groups.is_empty() || !self.group_deletes.is_empty()
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
        // A durable group reads the log: it never refuses.
        self.groups_of(topic).all(|g| g.feed.is_some() || g.group.has_room(len))
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
                match &mut g.feed {
                    None => g.group.offer(message.clone(), now.unix_ms, &mut events),
                    // Caught up and with room: live, without a read. Else
                    // the log has it for a later read.
                    Some(feed) => {
                        let (queued, bytes) = g.group.queued();
                        if !feed.reading
                            && feed.next == message.seq
                            && queued < DURABLE_READ_AHEAD_MESSAGES
                            && bytes < DURABLE_READ_AHEAD_BYTES
                        {
                            feed.next += 1;
                            g.group.offer(message.clone(), now.unix_ms, &mut events);
                        }
                    }
                }
            }
            self.group_events(&key, &mut events, now);
        }
    }

    /// After a commit's messages were offered: each durable group of
    /// `topic` that fell behind reads the log (once per commit, not per
    /// message: the commit made its whole batch visible at once).
    pub(super) fn feed_groups_of(&mut self, topic: &TopicName, now: Now) {
        let Some(names) = self.group_names.get(topic) else { return };
        let keys: Vec<(TopicName, GroupName)> = names.iter().map(|n| (topic.clone(), n.clone())).collect();
        for key in keys {
            self.feed_group(&key, now);
        }
    }

    /// Asks a read of the log for a durable group that is behind, has
    /// members and room, and no read in flight.
    fn feed_group(&mut self, key: &(TopicName, GroupName), now: Now) {
        let Some(g) = self.groups.get_mut(key) else { return };
        let Some(feed) = g.feed.as_mut() else { return };
        let (Some(written), Some((_, log))) = (self.owner.written_seq(&key.0), self.owner.durable(&key.0)) else {
            // The topic's log was deleted: the group goes on as an
            // ephemeral topic's, from what is published next.
            g.feed = None;
            return;
        };
        // Up to a record that exists: after an unclean restart the written
        // number includes those the crash skipped.
        let to = written.min(log.last_record_seq());
        let (queued, bytes) = g.group.queued();
        let idle = g.group.member_count() == 0
            || queued >= DURABLE_READ_AHEAD_MESSAGES / 2
            || bytes >= DURABLE_READ_AHEAD_BYTES / 2;
        if feed.reading || feed.next > to || idle || now.unix_ms < feed.retry_at_ms {
            return;
        }
        feed.reading = true;
        let from_seq = feed.next;
        let id = self.next_id();
        self.group_reads.insert(id, key.clone());
        let read = LogRead { id, topic: key.0.clone(), from_seq, to_seq: to, max_bytes: DURABLE_READ_BYTES };
        self.actions.push(Action::ReadLog(read));
    }

    /// A read of the log asked by [`Broker::feed_group`] came back.
    pub(super) fn group_log_read(&mut self, id: u64, messages: Vec<Message>, now: Now) {
        let Some(key) = self.group_reads.remove(&id) else { return };
        let mut events = Vec::new();
        if let Some(g) = self.groups.get_mut(&key) {
            if let Some(feed) = g.feed.as_mut() {
                feed.reading = false;
                match messages.last().map(|m| m.seq) {
                    // The range ends at a record: nothing means the read
                    // failed (logged by the shell). Again later.
                    None => feed.retry_at_ms = now.unix_ms + DURABLE_READ_RETRY_MS,
                    Some(last) => {
                        for m in messages.into_iter().filter(|m| m.seq >= feed.next) {
                            g.group.offer(m, now.unix_ms, &mut events);
                        }
                        feed.next = feed.next.max(last + 1);
                    }
                }
            }
        }
        self.group_events(&key, &mut events, now);
        self.feed_group(&key, now);
    }

    /// Durable groups whose positions moved since they were last handed
    /// over, for the shell to save (at most every
    /// `GROUP_SAVE_INTERVAL_MS`; `force` at a stop).
    pub fn take_group_saves(&mut self, now: Now, force: bool) -> Vec<GroupSave> {
        if !force && now.unix_ms < self.groups_saved_ms + GROUP_SAVE_INTERVAL_MS {
            return Vec::new();
        }
        self.groups_saved_ms = now.unix_ms;
        let mut saves = Vec::new();
        for ((topic, name), g) in self.groups.iter_mut() {
            // Only a group whose positions moved is written out.
            let Some(feed) = g.feed.as_mut() else { continue };
            let positions = g.group.positions(feed.next);
            if positions == feed.saved {
                continue;
            }
            feed.saved = positions.clone();
            saves.push(GroupSave { topic: topic.clone(), saved: Self::saved_group(name, g, positions) });
        }
        saves
    }

    /// `topic`'s log was deleted (it is ephemeral again): its groups stop
    /// reading the log at once and take what is published from now on (a
    /// later tick would leave the messages of the meantime to no one).
    pub fn topic_undeclared(&mut self, topic: &TopicName) {
        let Some(names) = self.group_names.get(topic) else { return };
        for name in names.clone() {
            if let Some(g) = self.groups.get_mut(&(topic.clone(), name.clone())) {
                // Its saves (here and in the object store) go with the log.
                if g.feed.take().is_some() {
                    let job = GroupDeleteJob { topic: topic.clone(), group: name.to_string(), answer: None };
                    self.group_deletes.push(job);
                }
            }
        }
    }

    /// Durable groups removed (idle past `DURABLE_IDLE_GROUP_MS`) since
    /// the last call: (topic, group) whose saved positions the shell deletes.
    pub fn take_group_deletes(&mut self) -> Vec<GroupDeleteJob> {
        std::mem::take(&mut self.group_deletes)
    }

    /// A save handed over by [`Broker::take_group_saves`] failed: the next
    /// one hands the group over again even if its positions stay.
    pub fn group_save_failed(&mut self, topic: &TopicName, group: &str) {
        if let Some(feed) = self.groups.get_mut(&(topic.clone(), Arc::from(group))).and_then(|g| g.feed.as_mut()) {
            feed.saved.clear();
        }
    }

    /// What restoring `saved` makes, once checked: its key (topic and
    /// name), dead letter topic and settings; the topic is held for it.
    fn restoring(
        &mut self,
        topic: &TopicName,
        saved: &SavedGroup,
        now: Now,
    ) -> Result<((TopicName, GroupName), TopicName, GroupSettings), String> {
        if saved.positions.len() != SEGMENTS {
            return Err(format!("{} positions, not {SEGMENTS}", saved.positions.len()));
        }
        let dead_letter = TopicName::new(&saved.dead_letter).map_err(|e| e.to_string())?;
        let name: GroupName = Arc::from(saved.group.as_str());
        let key = (topic.clone(), name.clone());
        if self.groups.contains_key(&key) {
            return Err("restored twice".into());
        }
        self.owner.hold_for_group(topic, now.at).map_err(|e| e.to_string())?;
        let settings = GroupSettings {
            ack_timeout_ms: saved.ack_timeout_ms,
            max_deliveries: saved.max_deliveries,
            start: GroupStart::Now,
        };
        Ok((key, dead_letter, settings))
    }

    /// Restores a durable group saved by a previous run, before the shard
    /// serves: it goes on from its positions, without members until they
    /// join. Refused when the topic is not durable here or the save is
    /// malformed.
    pub fn restore_group(&mut self, topic: &TopicName, saved: SavedGroup, now: Now) -> Result<(), String> {
        let durable = self.owner.written_seq(topic).ok_or("the topic is not durable")?;
        let (key, dead_letter, settings) = self.restoring(topic, &saved, now)?;
        // Never past what the log holds: a log that lost its tail (an
        // fsync interval, damage) must not make the group skip what is
        // numbered next.
        let positions: Vec<u64> = saved.positions.iter().map(|p| (*p).min(durable + 1)).collect();
        let mut group = Group::new(settings, now.unix_ms);
        group.set_floors(&positions);
        let next = positions.iter().copied().min().unwrap_or(durable + 1);
        let feed = LogFeed { next, reading: false, retry_at_ms: 0, saved: positions };
        self.group_names.entry(topic.clone()).or_default().push(key.1.clone());
        self.groups.insert(key, OwnedGroup { group, dead_letter, feed: Some(feed) });
        self.actions.push(Action::Tick);
        Ok(())
    }

    /// Owner side: a group item from a member's shard.
    pub(super) fn handle_group(&mut self, from: usize, item: Item, now: Now) {
        let mut events = Vec::new();
        match item {
            Item::GroupJoin { topic, group, sub, prefetch, settings, dead_letter } => {
                let key = (topic.clone(), group.clone());
                let of_topic = self.group_names.get(&topic).map_or(0, Vec::len);
                let durable = self.owner.written_seq(&topic);
                let result = match self.groups.get_mut(&key) {
                    None if of_topic >= GROUPS_PER_TOPIC_MAX => Err(GroupJoinError::TooManyGroups),
                    None if durable.is_none() && settings.start == GroupStart::Beginning => {
                        Err(GroupJoinError::NotDurable)
                    }
                    existing => {
                        let g = match existing {
                            Some(g) => Some(g),
                            // A group keeps its topic from eviction: its state
                            // is keyed by the topic's sequence numbers.
                            None => match self.owner.hold_for_group(&topic, now.at) {
                                Err(_) => None,
                                Ok(()) => {
                                    self.group_names.entry(topic.clone()).or_default().push(group.clone());
                                    // A durable topic's group reads its log, from
                                    // its first record or from what comes next.
                                    let feed = durable.map(|written| LogFeed {
                                        next: match settings.start {
                                            GroupStart::Now => written + 1,
                                            GroupStart::Beginning => 1,
                                        },
                                        reading: false,
                                        retry_at_ms: 0,
                                        saved: Vec::new(),
                                    });
                                    let group = Group::new(settings, now.unix_ms);
                                    let new = OwnedGroup { group, dead_letter, feed };
                                    // Its deadlines and saves need the ticker (a
                                    // join held for a hand-off woke it in vain).
                                    self.actions.push(Action::Tick);
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
                self.feed_group(&key, now);
            }
            Item::GroupLeave { topic, group, sub } => {
                let key = (topic, group);
                if let Some(g) = self.groups.get_mut(&key) {
                    g.group.leave(MemberId { shard: from, sub }, now.unix_ms, &mut events);
                }
                self.group_events(&key, &mut events, now);
                self.feed_group(&key, now);
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
                self.feed_group(&key, now);
            }
            Item::GroupDelete { topic, group, req } => {
                let key = (topic, group);
                let members = self.groups.get(&key).map(|g| g.group.member_count());
                let answer = match members {
                    None => Err(("not_found".to_string(), "no such group on this topic".to_string())),
                    Some(n) if n > 0 => Err(("busy".to_string(), format!("the group has {n} members"))),
                    // A durable group's answer waits for its save's
                    // deletion (`group_save_deleted`).
                    Some(_) if self.remove_group(&key, Some((from, req)), true) => return,
                    Some(_) => Ok(serde_json::json!({"topic": key.0.as_str(), "group": &*key.1})),
                };
                self.send(from, Item::OwnerAnswer { req, answer }, now);
            }
            // Member side.
            Item::GroupJoined { topic, group, sub, result } => self.group_joined(&topic, &group, sub, result),
            Item::GroupDeliver { topic, group, sub, message, delivery, tag } => {
                let Some(m) = self.members.get(&sub) else { return };
                if m.topic != topic || m.group != group {
                    return;
                }
                let frame = match m.link {
                    Some(member) => {
                        let op = crate::link::GroupLink::Deliver { message, delivery, tag };
                        link_frame(&crate::link::LinkFrame::Group { member, op })
                    }
                    None => native::encode_group_message(&topic, &group, &message, delivery, tag),
                };
                m.out.offer_control(frame);
            }
            Item::GroupLost { topic, group, sub } => {
                let Some(m) = self.members.remove(&sub) else { return };
                metrics::sub(&self.metrics.subscriptions_current, 1);
                match (m.link, m.reply_id) {
                    // A member on another node: its node tells it.
                    (Some(member), _) => {
                        m.out.offer_control(link_frame(&crate::link::LinkFrame::Group {
                            member,
                            op: crate::link::GroupLink::Lost,
                        }));
                    }
                    (None, Some(id)) => {
                        let e = GroupJoinError::OwnerUnreachable;
                        m.out.offer_control(native::reply_error(Some(id), e.code(), &e.to_string()));
                    }
                    (None, None) => {
                        m.out.offer_control(native::group_lost_notice(&topic, &group));
                    }
                }
            }
            _ => {}
        }
    }

    /// Member side: the owner's answer to a join.
    fn group_joined(&mut self, topic: &TopicName, group: &str, sub: u64, result: Result<(), GroupJoinError>) {
        let Some(m) = self.members.get_mut(&sub) else { return };
        let Some(id) = m.reply_id.take() else { return };
        if let Some(member) = m.link {
            let op = crate::link::GroupLink::Joined(result.map_err(|e| e.code().to_string()));
            m.out.offer_control(link_frame(&crate::link::LinkFrame::Group { member, op }));
            if result.is_err() {
                self.members.remove(&sub);
                metrics::sub(&self.metrics.subscriptions_current, 1);
            }
            return;
        }
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
    /// `start: beginning` on a topic that is not durable (only a log
    /// has a beginning to replay).
    #[error("\"start\": \"beginning\" needs a durable topic")]
    NotDurable,
    /// The group refused.
    #[error(transparent)]
    Group(GroupError),
    /// Another node of the cluster owns the topic; its groups are served
    /// there (for now).
    #[error("this topic is owned by another node of the cluster: join its groups there")]
    OwnedElsewhere,
    /// The topic's owner node cannot be reached (its link failed).
    #[error("the node that owns this topic cannot be reached: join again")]
    OwnerUnreachable,
}

/// A link frame as a binary WebSocket message.
fn link_frame(frame: &crate::link::LinkFrame) -> Bytes {
    ws::encode_data(PayloadKind::Binary, &crate::link::encode(frame))
}

impl GroupJoinError {
    /// The error code clients see.
    pub fn code(self) -> &'static str {
        match self {
            GroupJoinError::TooManyGroups => "too_many_groups",
            GroupJoinError::TooManyTopics => "too_many_topics",
            GroupJoinError::NotDurable => "not_durable",
            GroupJoinError::OwnedElsewhere => "owned_elsewhere",
            GroupJoinError::OwnerUnreachable => "owner_unreachable",
            GroupJoinError::Group(e) => e.code(),
        }
    }

    /// The refusal a code names (the owner node's answer over the link).
    pub fn from_code(code: &str) -> GroupJoinError {
        [
            GroupJoinError::TooManyGroups,
            GroupJoinError::TooManyTopics,
            GroupJoinError::NotDurable,
            GroupJoinError::OwnedElsewhere,
            GroupJoinError::Group(GroupError::TooManyMembers),
            GroupJoinError::Group(GroupError::AlreadyMember),
        ]
        .into_iter()
        .find(|e| e.code() == code)
        .unwrap_or(GroupJoinError::OwnerUnreachable)
    }
}
