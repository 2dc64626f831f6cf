//! Consumer groups, sans-IO: one group of load-balanced consumers of one
//! topic, kept by the topic's owner shard. Messages go in as they become
//! visible ([`Group::offer`]); members join, leave, acknowledge, refuse and
//! change their prefetch; the time comes in with every call that needs it;
//! deliveries and dead letters come out ([`GroupEvent`]). The broker routes
//! them (`crate::broker`); the simulation drives the same calls.
//!
//! Partitioning follows Flux Capacitor: a message's segment is a stable hash
//! of its key (of its sequence when it has none) modulo [`SEGMENTS`], and
//! the segments are split evenly among the members in id order, in
//! contiguous ranges. A segment's messages go to its holder in sequence
//! order, so per-key order holds while membership is stable; a segment
//! moves to a new member only once its holder has no unacknowledged message
//! from it (a member that leaves or dies gives its messages back first), so
//! per-key order also holds across rebalances.
//!
//! Delivery is at least once. A message is delivered again (its `delivery`
//! count one higher) when its member leaves or disconnects before
//! acknowledging it, when its ack deadline passes, or when the member
//! refuses it (`nack`, optionally after a delay). After `max_deliveries`
//! deliveries it goes to the dead-letter topic instead. Nothing else
//! delivers a message twice, and nothing drops one: a group whose backlog is
//! full makes the topic refuse publishes ([`Group::has_room`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use crate::message::Message;

/// Segments a group's messages are spread over (Flux Capacitor's count).
pub const SEGMENTS: usize = 128;
/// Messages waiting in one group (not yet delivered, or given back): past
/// this the topic refuses publishes (503 `group_full`) instead of dropping.
pub const BACKLOG_MESSAGES_MAX: usize = 100_000;
/// Payload bytes waiting in one group (as above).
pub const BACKLOG_BYTES_MAX: usize = 64 << 20;
/// Largest prefetch a member may ask for (unacknowledged messages it holds).
pub const PREFETCH_MAX: u32 = 10_000;
/// Members of one group.
pub const MEMBERS_MAX: usize = 1_024;
/// Groups of one topic.
pub const GROUPS_PER_TOPIC_MAX: usize = 64;
/// Bytes of a group name.
pub const GROUP_NAME_BYTES_MAX: usize = 64;
/// Default time a member has to acknowledge a delivery.
pub const ACK_TIMEOUT_MS_DEFAULT: u64 = 30_000;
/// Bounds of the ack timeout a group may ask for.
pub const ACK_TIMEOUT_MS_MIN: u64 = 10;
/// See [`ACK_TIMEOUT_MS_MIN`].
pub const ACK_TIMEOUT_MS_MAX: u64 = 3_600_000;
/// Default deliveries of one message before it is dead-lettered.
pub const MAX_DELIVERIES_DEFAULT: u32 = 5;
/// Longest delay a refusal may ask for.
pub const NACK_DELAY_MS_MAX: u64 = 3_600_000;
/// A group without members is removed after this long, with what it held
/// (a worker pool restarting within it loses nothing).
pub const IDLE_GROUP_MS: u64 = 60_000;

/// A member's request about a message it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Processed: `seq` is done.
    Ack { seq: u64 },
    /// Processed every delivery it received up to the one tagged `tag`
    /// (tags number deliveries in the order they are made; a member's
    /// arrive in that order), as AMQP's `multiple` ack does.
    AckThrough { tag: u64 },
    /// Refused: deliver `seq` again after `delay_ms`.
    Nack { seq: u64, delay_ms: u64 },
    /// Hold at most this many unacknowledged messages from now on.
    Prefetch { prefetch: u32 },
}

/// A member: its shard and its subscription id there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberId {
    /// The member's shard.
    pub shard: usize,
    /// Its subscription id on that shard.
    pub sub: u64,
}

/// A group's settings, fixed by its first member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupSettings {
    /// Time a member has to acknowledge a delivery.
    pub ack_timeout_ms: u64,
    /// Deliveries of a message before it is dead-lettered (at least 1).
    pub max_deliveries: u32,
    /// Where a group of a durable topic starts reading its log.
    pub start: GroupStart,
}

impl Default for GroupSettings {
    fn default() -> Self {
        GroupSettings {
            ack_timeout_ms: ACK_TIMEOUT_MS_DEFAULT,
            max_deliveries: MAX_DELIVERIES_DEFAULT,
            start: GroupStart::Now,
        }
    }
}

/// Where a new group of a durable topic starts (Kafka's
/// `auto.offset.reset`, JetStream's deliver policy `new` or `all`). A group
/// of an ephemeral topic always starts from now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupStart {
    /// With the next message published.
    #[default]
    Now,
    /// With the first message the log still holds.
    Beginning,
}

/// A durable group's state as saved next to its topic's log, so that it
/// survives a restart: its settings and its position in each segment.
/// Every message of segment `s` numbered below `positions[s]` was
/// acknowledged (or dead-lettered); positions only move forward.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedGroup {
    /// The group's name.
    pub group: String,
    /// Its settings (see [`GroupSettings`]).
    pub ack_timeout_ms: u64,
    /// See [`GroupSettings`].
    pub max_deliveries: u32,
    /// Where its dead letters go.
    pub dead_letter: String,
    /// Per segment, the first sequence not known to be done.
    pub positions: Vec<u64>,
}

/// Why a group call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    /// The group has [`MEMBERS_MAX`] members.
    #[error("the group has its {MEMBERS_MAX} members")]
    TooManyMembers,
    /// The member is already in the group.
    #[error("already a member of this group")]
    AlreadyMember,
}

/// What the broker must carry out.
#[derive(Debug, Clone)]
pub enum GroupEvent {
    /// Deliver `message` to `member`; this is its `delivery`th delivery.
    Deliver {
        /// The member.
        member: MemberId,
        /// The message.
        message: Message,
        /// 1 for the first delivery.
        delivery: u32,
        /// This delivery's number in the group (increasing), for
        /// cumulative acks.
        tag: u64,
    },
    /// `message` was delivered `deliveries` times without being
    /// acknowledged: publish it to the dead-letter topic.
    DeadLetter {
        /// The message.
        message: Message,
        /// Deliveries made.
        deliveries: u32,
    },
}

/// A message waiting for delivery.
#[derive(Debug, Clone)]
struct Waiting {
    message: Message,
    /// Deliveries so far.
    deliveries: u32,
}

/// A delivered message not yet acknowledged.
#[derive(Debug, Clone)]
struct Unacked {
    member: MemberId,
    segment: usize,
    deadline_ms: u64,
    /// When it was delivered, in the group's delivery order.
    order: u64,
    waiting: Waiting,
}

#[derive(Debug, Clone, Copy)]
struct MemberState {
    prefetch: u32,
    unacked: u32,
}

/// One consumer group of one topic.
#[derive(Debug)]
pub struct Group {
    settings: GroupSettings,
    members: BTreeMap<MemberId, MemberState>,
    /// Each segment's holder: who its messages go to.
    holder: Vec<Option<MemberId>>,
    /// Each segment's member under the current membership (recomputed on
    /// joins and leaves).
    targets: Vec<Option<MemberId>>,
    /// Each segment's waiting messages, in sequence order.
    queues: Vec<VecDeque<Waiting>>,
    /// Each segment's unacknowledged deliveries (all its holder's).
    seg_unacked: Vec<u32>,
    /// Delivered, not acknowledged, by sequence.
    unacked: BTreeMap<u64, Unacked>,
    /// (deadline, seq) of the unacknowledged.
    deadlines: BTreeSet<(u64, u64)>,
    /// Refused with a delay: (due, seq) and the messages.
    delayed: BTreeSet<(u64, u64)>,
    delayed_messages: HashMap<u64, Waiting>,
    /// Payload bytes of the delayed ones.
    delayed_bytes: usize,
    /// Waiting messages (queued and delayed) and their payload bytes.
    backlog_messages: usize,
    backlog_bytes: usize,
    /// Since when the group has had no member.
    idle_since_ms: Option<u64>,
    /// Deliveries made (the next one's `order`).
    delivered: u64,
    /// Per segment, sequences below which messages are done (a durable
    /// group restored after a restart): offered again, they are skipped.
    floors: Vec<u64>,
}

/// A message's segment: its key's hash, else its sequence's.
pub fn segment_of(message: &Message) -> usize {
    let h = match &message.key {
        Some(key) => crate::hash::fnv1a(key),
        None => crate::hash::avalanche(message.seq),
    };
    (h % SEGMENTS as u64) as usize
}

impl Group {
    /// An empty group, idle from `now_ms`.
    pub fn new(settings: GroupSettings, now_ms: u64) -> Group {
        let settings = GroupSettings {
            ack_timeout_ms: settings.ack_timeout_ms.clamp(ACK_TIMEOUT_MS_MIN, ACK_TIMEOUT_MS_MAX),
            max_deliveries: settings.max_deliveries.max(1),
            start: settings.start,
        };
        Group {
            settings,
            members: BTreeMap::new(),
            holder: vec![None; SEGMENTS],
            targets: vec![None; SEGMENTS],
            queues: (0..SEGMENTS).map(|_| VecDeque::new()).collect(),
            seg_unacked: vec![0; SEGMENTS],
            unacked: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            delayed: BTreeSet::new(),
            delayed_messages: HashMap::new(),
            delayed_bytes: 0,
            backlog_messages: 0,
            backlog_bytes: 0,
            idle_since_ms: Some(now_ms),
            delivered: 0,
            floors: vec![0; SEGMENTS],
        }
    }

    /// Its settings.
    pub fn settings(&self) -> GroupSettings {
        self.settings
    }

    /// Adds a member holding at most `prefetch` unacknowledged messages
    /// (0: none until it raises it), and rebalances.
    pub fn join(
        &mut self,
        member: MemberId,
        prefetch: u32,
        now_ms: u64,
        out: &mut Vec<GroupEvent>,
    ) -> Result<(), GroupError> {
        if self.members.contains_key(&member) {
            return Err(GroupError::AlreadyMember);
        }
        if self.members.len() >= MEMBERS_MAX {
            return Err(GroupError::TooManyMembers);
        }
        self.members.insert(member, MemberState { prefetch: prefetch.min(PREFETCH_MAX), unacked: 0 });
        self.retarget();
        self.idle_since_ms = None;
        self.pump(now_ms, out);
        Ok(())
    }

    /// Removes a member (it left, or its connection closed): what it had
    /// not acknowledged is given back for redelivery, its segments move.
    pub fn leave(&mut self, member: MemberId, now_ms: u64, out: &mut Vec<GroupEvent>) {
        if self.members.remove(&member).is_none() {
            return;
        }
        self.retarget();
        let theirs: Vec<u64> = self.unacked.iter().filter(|(_, u)| u.member == member).map(|(s, _)| *s).collect();
        for seq in theirs {
            if let Some(u) = self.take_unacked(seq) {
                // Counted as a failed delivery: a message that takes its
                // members down with it is dead-lettered after
                // `max_deliveries`, not handed around forever.
                self.retry(u, now_ms, now_ms, out);
            }
        }
        for h in self.holder.iter_mut().filter(|h| **h == Some(member)) {
            *h = None;
        }
        if self.members.is_empty() {
            self.idle_since_ms = Some(now_ms);
        }
        self.pump(now_ms, out);
    }

    /// Restores a durable group's positions (see [`SavedGroup`]): messages
    /// below them are done.
    pub fn set_floors(&mut self, positions: &[u64]) {
        for (floor, p) in self.floors.iter_mut().zip(positions) {
            *floor = (*floor).max(*p);
        }
    }

    /// The group's position in each segment (see [`SavedGroup`]), given
    /// that every message before `next` was offered: the first message of
    /// the segment still waiting, delayed or unacknowledged, else `next`.
    /// Never below what [`Group::set_floors`] restored.
    pub fn positions(&self, next: u64) -> Vec<u64> {
        let mut positions = vec![next; SEGMENTS];
        for (segment, queue) in self.queues.iter().enumerate() {
            if let Some(w) = queue.front() {
                positions[segment] = positions[segment].min(w.message.seq);
            }
        }
        for (seq, u) in &self.unacked {
            positions[u.segment] = positions[u.segment].min(*seq);
        }
        for (seq, w) in &self.delayed_messages {
            let segment = segment_of(&w.message);
            positions[segment] = positions[segment].min(*seq);
        }
        for (p, floor) in positions.iter_mut().zip(&self.floors) {
            *p = (*p).max(*floor);
        }
        positions
    }

    /// Messages queued for delivery (not counting refusals waiting out a
    /// delay), and their payload bytes.
    pub fn queued(&self) -> (usize, usize) {
        (self.backlog_messages - self.delayed_messages.len(), self.backlog_bytes - self.delayed_bytes)
    }

    /// Whether `member` is in the group.
    pub fn is_member(&self, member: MemberId) -> bool {
        self.members.contains_key(&member)
    }

    /// Its members, in id order.
    pub fn member_ids(&self) -> Vec<MemberId> {
        self.members.keys().copied().collect()
    }

    /// Members.
    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    /// Sets a member's prefetch.
    pub fn set_prefetch(&mut self, member: MemberId, prefetch: u32, now_ms: u64, out: &mut Vec<GroupEvent>) {
        if let Some(m) = self.members.get_mut(&member) {
            m.prefetch = prefetch.min(PREFETCH_MAX);
            self.pump(now_ms, out);
        }
    }

    /// Whether a message of `len` bytes may be published to the topic.
    pub fn has_room(&self, len: usize) -> bool {
        self.backlog_messages < BACKLOG_MESSAGES_MAX && self.backlog_bytes + len <= BACKLOG_BYTES_MAX
    }

    /// A message became visible on the topic (or was read from its log).
    /// One below its segment's floor (done before a restart) is skipped.
    pub fn offer(&mut self, message: Message, now_ms: u64, out: &mut Vec<GroupEvent>) {
        let segment = segment_of(&message);
        if message.seq < self.floors[segment] {
            return;
        }
        self.backlog_messages += 1;
        self.backlog_bytes += message.payload.len();
        self.queues[segment].push_back(Waiting { message, deliveries: 0 });
        self.pump_segment(segment, now_ms, out);
    }

    /// `member` acknowledges `seq`; false if it does not hold it (already
    /// acknowledged, redelivered elsewhere, or never its).
    pub fn ack(&mut self, member: MemberId, seq: u64, now_ms: u64, out: &mut Vec<GroupEvent>) -> bool {
        if self.unacked.get(&seq).is_none_or(|u| u.member != member) {
            return false;
        }
        if let Some(u) = self.take_unacked(seq) {
            // Room for this member, and maybe its segment may move now.
            self.pump_member(u.member, u.segment, now_ms, out);
        }
        true
    }

    /// `member` acknowledges every delivery it holds tagged `tag` or lower
    /// (made before that one: its channel is in order, so it has received
    /// them); how many. A delivery refused or expired meanwhile is not
    /// held any more; its redelivery has a higher tag.
    pub fn ack_through(&mut self, member: MemberId, tag: u64, now_ms: u64, out: &mut Vec<GroupEvent>) -> usize {
        let theirs: Vec<u64> =
            self.unacked.iter().filter(|(_, u)| u.member == member && u.order <= tag).map(|(s, _)| *s).collect();
        for s in &theirs {
            self.take_unacked(*s);
        }
        if !theirs.is_empty() {
            self.pump(now_ms, out);
        }
        theirs.len()
    }

    /// `member` refuses `seq`: it is delivered again after `delay_ms`
    /// (counting as a delivery made). False if it does not hold it.
    pub fn nack(&mut self, member: MemberId, seq: u64, delay_ms: u64, now_ms: u64, out: &mut Vec<GroupEvent>) -> bool {
        if self.unacked.get(&seq).is_none_or(|u| u.member != member) {
            return false;
        }
        if let Some(u) = self.take_unacked(seq) {
            self.retry(u, now_ms.saturating_add(delay_ms.min(NACK_DELAY_MS_MAX)), now_ms, out);
        }
        self.pump(now_ms, out);
        true
    }

    /// Applies the time: deliveries past their deadline are given back (or
    /// dead-lettered), delayed refusals come due.
    pub fn tick(&mut self, now_ms: u64, out: &mut Vec<GroupEvent>) {
        let expired: Vec<u64> = self.deadlines.iter().take_while(|(d, _)| *d <= now_ms).map(|(_, s)| *s).collect();
        for seq in expired {
            if let Some(u) = self.take_unacked(seq) {
                self.retry(u, now_ms, now_ms, out);
            }
        }
        let due: Vec<(u64, u64)> = self.delayed.iter().take_while(|(d, _)| *d <= now_ms).copied().collect();
        for key in due {
            self.delayed.remove(&key);
            if let Some(w) = self.delayed_messages.remove(&key.1) {
                self.delayed_bytes -= w.message.payload.len();
                self.backlog_messages -= 1;
                self.backlog_bytes -= w.message.payload.len();
                let segment = segment_of(&w.message);
                self.requeue(segment, w);
            }
        }
        self.pump(now_ms, out);
    }

    /// The earliest time [`Group::tick`] has something to do.
    pub fn next_due_ms(&self) -> Option<u64> {
        let d = self.deadlines.first().map(|(d, _)| *d);
        let l = self.delayed.first().map(|(d, _)| *d);
        d.into_iter().chain(l).min()
    }

    /// How long the group has been without members (0 while it has some).
    pub fn idle_for(&self, now_ms: u64) -> u64 {
        self.idle_since_ms.map_or(0, |since| now_ms.saturating_sub(since))
    }

    /// Whether the group has been without members for [`IDLE_GROUP_MS`].
    pub fn is_idle(&self, now_ms: u64) -> bool {
        self.idle_since_ms.is_some_and(|since| now_ms.saturating_sub(since) >= IDLE_GROUP_MS)
    }

    /// Messages waiting (queued or delayed), and unacknowledged.
    pub fn counts(&self) -> (usize, usize) {
        (self.backlog_messages, self.unacked.len())
    }

    /// Unacknowledged messages `member` holds.
    pub fn held_by(&self, member: MemberId) -> u32 {
        self.members.get(&member).map_or(0, |m| m.unacked)
    }

    /// Checks the group's own bookkeeping (the simulation calls it after
    /// every step): every unacknowledged message is its segment holder's,
    /// so a key is never with two members at once; counts agree; no member
    /// over its prefetch.
    pub fn check(&self) -> Result<(), String> {
        let mut per_segment = vec![0u32; SEGMENTS];
        let mut per_member: BTreeMap<MemberId, u32> = BTreeMap::new();
        for (seq, u) in &self.unacked {
            if self.holder[u.segment] != Some(u.member) {
                return Err(format!("seq {seq} is with {:?}, its segment with {:?}", u.member, self.holder[u.segment]));
            }
            per_segment[u.segment] += 1;
            *per_member.entry(u.member).or_default() += 1;
        }
        if per_segment != self.seg_unacked {
            return Err("per-segment counts disagree".into());
        }
        for (member, state) in &self.members {
            let held = per_member.get(member).copied().unwrap_or(0);
            if held != state.unacked {
                return Err(format!("{member:?} counted {} unacknowledged, holds {held}", state.unacked));
            }
        }
        let waiting = self.queues.iter().map(VecDeque::len).sum::<usize>() + self.delayed_messages.len();
        if waiting != self.backlog_messages {
            return Err(format!("{waiting} waiting, counted {}", self.backlog_messages));
        }
        Ok(())
    }

    /// Splits the segments evenly among the members, in contiguous ranges
    /// by member id.
    fn retarget(&mut self) {
        let members: Vec<MemberId> = self.members.keys().copied().collect();
        let n = members.len();
        for (segment, target) in self.targets.iter_mut().enumerate() {
            *target = (n > 0).then(|| members[segment * n / SEGMENTS]);
        }
    }

    /// Moves segments to their targets where their holders hold nothing
    /// from them, then delivers what fits.
    fn pump(&mut self, now_ms: u64, out: &mut Vec<GroupEvent>) {
        for segment in 0..SEGMENTS {
            self.pump_segment(segment, now_ms, out);
        }
    }

    /// After `member` settled a message of `segment`: that segment, then
    /// every segment `member` holds (it has room again).
    fn pump_member(&mut self, member: MemberId, segment: usize, now_ms: u64, out: &mut Vec<GroupEvent>) {
        self.pump_segment(segment, now_ms, out);
        for s in 0..SEGMENTS {
            if self.holder[s] == Some(member) && s != segment {
                self.pump_segment(s, now_ms, out);
            }
        }
    }

    fn pump_segment(&mut self, segment: usize, now_ms: u64, out: &mut Vec<GroupEvent>) {
        let target = self.targets[segment];
        if self.queues[segment].is_empty() && self.holder[segment] == target {
            return;
        }
        if self.holder[segment] != target && self.seg_unacked[segment] == 0 {
            self.holder[segment] = target;
        }
        // A segment waiting to move delivers nothing meanwhile.
        let Some(member) = self.holder[segment].filter(|h| Some(*h) == target) else { return };
        while let Some(state) = self.members.get_mut(&member) {
            if state.unacked >= state.prefetch {
                break;
            }
            let Some(mut w) = self.queues[segment].pop_front() else { break };
            state.unacked += 1;
            self.backlog_messages -= 1;
            self.backlog_bytes -= w.message.payload.len();
            w.deliveries += 1;
            let seq = w.message.seq;
            let deadline_ms = now_ms.saturating_add(self.settings.ack_timeout_ms);
            self.delivered += 1;
            let tag = self.delivered;
            out.push(GroupEvent::Deliver { member, message: w.message.clone(), delivery: w.deliveries, tag });
            self.seg_unacked[segment] += 1;
            self.deadlines.insert((deadline_ms, seq));
            self.unacked.insert(seq, Unacked { member, segment, deadline_ms, order: tag, waiting: w });
        }
    }

    fn take_unacked(&mut self, seq: u64) -> Option<Unacked> {
        let u = self.unacked.remove(&seq)?;
        self.deadlines.remove(&(u.deadline_ms, seq));
        self.seg_unacked[u.segment] -= 1;
        if let Some(m) = self.members.get_mut(&u.member) {
            m.unacked -= 1;
        }
        Some(u)
    }

    /// A delivery that failed (deadline, refusal): again at `due_ms`, or
    /// to the dead-letter topic once it has had its deliveries.
    fn retry(&mut self, u: Unacked, due_ms: u64, now_ms: u64, out: &mut Vec<GroupEvent>) {
        if u.waiting.deliveries >= self.settings.max_deliveries {
            out.push(GroupEvent::DeadLetter { message: u.waiting.message, deliveries: u.waiting.deliveries });
            return;
        }
        if due_ms <= now_ms {
            self.requeue(u.segment, u.waiting);
            return;
        }
        let seq = u.waiting.message.seq;
        self.backlog_messages += 1;
        self.backlog_bytes += u.waiting.message.payload.len();
        self.delayed.insert((due_ms, seq));
        self.delayed_bytes += u.waiting.message.payload.len();
        self.delayed_messages.insert(seq, u.waiting);
    }

    /// Puts a message given back at its place (sequence order) in its
    /// segment's queue.
    fn requeue(&mut self, segment: usize, w: Waiting) {
        self.backlog_messages += 1;
        self.backlog_bytes += w.message.payload.len();
        let queue = &mut self.queues[segment];
        let at = queue.partition_point(|q| q.message.seq < w.message.seq);
        queue.insert(at, w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::PayloadKind;
    use bytes::Bytes;
    use std::time::Instant;

    fn msg(seq: u64, key: &str) -> Message {
        Message {
            seq,
            timestamp_ms: seq,
            kind: PayloadKind::Text,
            payload: Bytes::from(format!("m{seq}")),
            key: Some(Bytes::copy_from_slice(key.as_bytes())),
            reply_to: None,
            meta: None,
            published_at: Instant::now(),
        }
    }

    fn m(sub: u64) -> MemberId {
        MemberId { shard: 0, sub }
    }

    /// (member, seq, delivery) of each delivery.
    fn delivered(out: &mut Vec<GroupEvent>) -> Vec<(u64, u64, u32)> {
        out.drain(..)
            .filter_map(|e| match e {
                GroupEvent::Deliver { member, message, delivery, .. } => Some((member.sub, message.seq, delivery)),
                GroupEvent::DeadLetter { .. } => None,
            })
            .collect()
    }

    #[test]
    fn each_message_goes_to_one_member_in_key_order_within_prefetch() {
        let mut g = Group::new(GroupSettings::default(), 0);
        let mut out = Vec::new();
        for sub in 1..=3 {
            g.join(m(sub), 4, 0, &mut out).unwrap();
        }
        for seq in 1..=300 {
            g.offer(msg(seq, &format!("k{}", seq % 10)), 0, &mut out);
        }
        let first = delivered(&mut out);
        for sub in 1..=3 {
            assert!(g.held_by(m(sub)) <= 4, "prefetch");
        }
        // Acknowledge everything as it comes until all are through.
        let mut all = first.clone();
        let mut pending = first;
        while let Some((sub, seq, _)) = pending.pop() {
            assert!(g.ack(m(sub), seq, 1, &mut out));
            let more = delivered(&mut out);
            all.extend(more.iter().copied());
            pending.extend(more);
        }
        let mut seqs: Vec<u64> = all.iter().map(|d| d.1).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=300).collect::<Vec<_>>(), "each once");
        // One member per key, and in order.
        for k in 0..10 {
            let of_key: Vec<&(u64, u64, u32)> = all.iter().filter(|d| d.1 % 10 == k).collect();
            assert!(of_key.iter().all(|d| d.0 == of_key[0].0), "key k{k} split across members");
            assert!(of_key.windows(2).all(|w| w[0].1 < w[1].1), "key k{k} out of order");
        }
        assert!(all.iter().all(|d| d.2 == 1));
        assert_eq!(g.counts(), (0, 0));
    }

    #[test]
    fn a_member_that_leaves_gives_its_messages_back_and_a_new_one_waits_for_the_old_holder() {
        let mut g = Group::new(GroupSettings::default(), 0);
        let mut out = Vec::new();
        g.join(m(1), 100, 0, &mut out).unwrap();
        for seq in 1..=20 {
            g.offer(msg(seq, &format!("k{seq}")), 0, &mut out);
        }
        assert_eq!(delivered(&mut out).len(), 20);
        // A second member: segments it should take stay with member 1 while
        // 1 holds their messages; nothing new goes to either for them.
        g.join(m(2), 100, 1, &mut out).unwrap();
        assert!(delivered(&mut out).is_empty());
        g.offer(msg(21, "k1"), 1, &mut out); // k1's segment: still held
        let d = delivered(&mut out);
        assert!(d.iter().all(|x| x.0 == 1), "only the holder gets it: {d:?}");
        // Member 1 dies: all it held goes again, to the segments' new holders.
        g.leave(m(1), 2, &mut out);
        let again = delivered(&mut out);
        let mut seqs: Vec<u64> = again.iter().map(|d| d.1).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=21).collect::<Vec<_>>());
        let first_time = |seq: u64| seq == 21 && d.is_empty();
        assert!(again.iter().all(|x| x.0 == 2 && x.2 == if first_time(x.1) { 1 } else { 2 }), "{again:?}");
    }

    #[test]
    fn deadlines_and_refusals_redeliver_then_dead_letter() {
        let settings = GroupSettings { ack_timeout_ms: 100, max_deliveries: 3, ..GroupSettings::default() };
        let mut g = Group::new(settings, 0);
        let mut out = Vec::new();
        g.join(m(1), 1, 0, &mut out).unwrap();
        g.offer(msg(1, "a"), 0, &mut out);
        g.offer(msg(2, "a"), 0, &mut out);
        assert_eq!(delivered(&mut out), [(1, 1, 1)], "prefetch 1");
        assert_eq!(g.next_due_ms(), Some(100));
        g.tick(99, &mut out);
        assert!(out.is_empty());
        g.tick(100, &mut out);
        assert_eq!(delivered(&mut out), [(1, 1, 2)], "the deadline passed: again, first in its segment");
        assert!(g.nack(m(1), 1, 50, 120, &mut out));
        assert_eq!(delivered(&mut out), [(1, 2, 1)], "refused with a delay: the next one meanwhile");
        assert!(g.ack(m(1), 2, 130, &mut out));
        assert!(out.is_empty());
        g.tick(170, &mut out);
        assert_eq!(delivered(&mut out), [(1, 1, 3)]);
        assert!(!g.ack(m(2), 1, 171, &mut out), "not its message");
        g.tick(270, &mut out);
        match out.as_slice() {
            [GroupEvent::DeadLetter { message, deliveries: 3 }] => assert_eq!(message.seq, 1),
            other => panic!("expected a dead letter, got {other:?}"),
        }
        assert_eq!(g.counts(), (0, 0));
    }

    #[test]
    fn a_message_that_takes_its_members_down_is_dead_lettered() {
        let mut g =
            Group::new(GroupSettings { ack_timeout_ms: 1_000, max_deliveries: 2, ..GroupSettings::default() }, 0);
        let mut out = Vec::new();
        g.join(m(1), 1, 0, &mut out).unwrap();
        g.offer(msg(1, "poison"), 0, &mut out);
        g.leave(m(1), 1, &mut out);
        g.join(m(2), 1, 2, &mut out).unwrap();
        assert_eq!(delivered(&mut out), [(1, 1, 1), (2, 1, 2)]);
        g.leave(m(2), 3, &mut out);
        assert!(matches!(out.as_slice(), [GroupEvent::DeadLetter { deliveries: 2, .. }]), "{out:?}");
        assert_eq!(g.counts(), (0, 0));
    }

    #[test]
    fn prefetch_zero_pulls_nothing_and_the_backlog_is_bounded() {
        let mut g = Group::new(GroupSettings::default(), 0);
        let mut out = Vec::new();
        g.join(m(1), 0, 0, &mut out).unwrap();
        g.offer(msg(1, "a"), 0, &mut out);
        assert!(out.is_empty());
        g.set_prefetch(m(1), 1, 0, &mut out);
        assert_eq!(delivered(&mut out), [(1, 1, 1)]);
        assert_eq!(g.ack_through(m(1), 0, 0, &mut out), 0, "no delivery tagged 0 or lower");
        assert_eq!(g.ack_through(m(1), 1, 0, &mut out), 1);
        assert!(g.has_room(10));
        let mut g = Group::new(GroupSettings::default(), 0);
        for seq in 1..=BACKLOG_MESSAGES_MAX as u64 {
            g.offer(msg(seq, "a"), 0, &mut out);
        }
        assert!(!g.has_room(1), "full: the topic refuses publishes");
        assert!(!g.is_idle(IDLE_GROUP_MS - 1) && g.is_idle(IDLE_GROUP_MS));
        assert_eq!(g.join(m(1), 1, 0, &mut out), Ok(()));
        assert_eq!(g.join(m(1), 1, 0, &mut out), Err(GroupError::AlreadyMember));
    }

    #[test]
    fn positions_follow_the_first_unfinished_message_of_each_segment_and_floors_skip_what_was_done() {
        let mut g = Group::new(GroupSettings::default(), 0);
        let mut out = Vec::new();
        g.join(m(1), 2, 0, &mut out).unwrap();
        for seq in 1..=6 {
            g.offer(msg(seq, "a"), 0, &mut out);
        }
        let a = segment_of(&msg(1, "a"));
        // Delivered 1 and 2 (prefetch 2), 3..6 waiting: the segment is at 1,
        // every other at the read cursor.
        assert_eq!(delivered(&mut out), vec![(1, 1, 1), (1, 2, 1)]);
        let p = g.positions(7);
        assert_eq!(p[a], 1);
        assert!(p.iter().enumerate().all(|(s, &v)| s == a || v == 7));
        // Acknowledging 2 first leaves 1 unfinished; then 1 moves it to 3.
        assert!(g.ack(m(1), 2, 0, &mut out));
        assert_eq!(g.positions(7)[a], 1);
        assert!(g.ack(m(1), 1, 0, &mut out));
        assert_eq!(g.positions(7)[a], 3);
        // A refusal with a delay holds the position.
        delivered(&mut out);
        assert!(g.nack(m(1), 3, 1_000, 0, &mut out));
        assert_eq!(g.positions(7)[a], 3);
        // Restored from those positions, a group skips what they cover.
        let saved = g.positions(7);
        let mut r = Group::new(GroupSettings::default(), 0);
        r.set_floors(&saved);
        r.join(m(1), 10, 0, &mut out).unwrap();
        out.clear();
        for seq in 1..=6 {
            r.offer(msg(seq, "a"), 0, &mut out);
        }
        let again: Vec<u64> = delivered(&mut out).iter().map(|d| d.1).collect();
        assert_eq!(again, vec![3, 4, 5, 6]);
        // Never backwards, whatever `next` says.
        assert_eq!(r.positions(1)[a], 3);
    }
}
