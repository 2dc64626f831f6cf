//! A topic changing owner, the broker's side: when the member set changes
//! ([`Broker::set_topology`]), the topics whose owner changes move.
//!
//! A topic's right to be sequenced (its epoch, last number and history:
//! the *state*) is held by exactly one node at a time, or travels in one
//! hand-off frame; numbers never go back or repeat because only its
//! holder sequences, and a holder only gives it forward along the chain of
//! the topic's owners over time ([`crate::cluster::Views`]: every node
//! applies every member set in order, so all agree on that chain where
//! they remember it).
//!
//! - The previous owner stops sequencing each of its topics that now
//!   belongs to another node at once (it keeps the state, as a copy: it is
//!   *handing* it) and forwards publishes to the new owner from then on; a
//!   topic it has subscribers for is followed on the new owner like any
//!   copy.
//! - The new owner takes a topic over on its first publish or subscribe
//!   (or a follow from another node): it claims the topic
//!   ([`LinkFrame::Claim`]) from the node that owned it in the view just
//!   before its own run of ownership, naming that view's version (`at`),
//!   and holds what asks for the topic until the answer
//!   ([`LinkFrame::HandOff`]): the state (it continues it: subscribers see
//!   no gap), "nothing" (a new topic), or "refused" (ask again).
//! - A node claimed for a topic it never held during its run at `at` (it
//!   owned the topic then, but nobody asked for it) asks the owner before
//!   that run in turn (a *relay*), answering "refused" until the state
//!   reaches it; then it gives it on. The chain is walked strictly back in
//!   versions, so claims cannot wait on each other in a circle.
//! - A holder gives the state to a claim whose `at` is in or after the run
//!   it holds the state for (the claimer comes later in the chain);
//!   a claim about an earlier run is stale ("refused": the claimer's view
//!   is behind and will move on). A node whose view is behind the claim's
//!   `at` refuses until it catches up.
//! - A state that arrives is never dropped: a node whose view moved on
//!   meanwhile adopts it and hands it on.
//! - When the node claimed from cannot be reached and is no longer a
//!   member (it died: its lease expired), the claimer starts the topic
//!   afresh in a new sequence space; its followers are told (`lost`).
//!   While it is a member and silent, publishes wait up to
//!   [`HANDOFF_WAIT_MS`] and then fail with `owner_unreachable`; the claim
//!   is asked again.
//!
//! - A durable topic's log moves through the object store the nodes share:
//!   given only once every record is uploaded (the state then lists its
//!   segments); without a hand-off, the claimer lists the store and goes
//!   on after the last stored number in a new sequence space
//!   ([`Broker::stored_listed`]).
//!
//! - Its pending schedules go with the state (`schedules_leaving`,
//!   `schedules_arrived`); its consumer groups end where it was sequenced,
//!   their members told `group_lost` (`groups_leaving`) to join again; the
//!   groups go with the state, each from the first message it had not had
//!   acknowledged (`groups_arrived`; what was in flight is delivered again:
//!   at least once): a durable topic's reading its log, an ephemeral
//!   topic's offered the history that came with the state (older messages
//!   are not recovered).
//! - A publish, subscribe, group join, schedule request or group deletion
//!   of a topic being taken over waits for the hand-off.

use super::*;
use crate::cluster::Topology;
use crate::durable::{ArchivedSegment, DurableHandOff, DurableSpec};
use crate::group::SavedGroup;
use crate::link::{HandOffState, LinkFrame};
use crate::owner::DurableHandOffReady;
use crate::schedule::Scheduled;

/// How long publishes and subscribes of a topic being taken over wait for
/// the previous owner's hand-off before they fail (`owner_unreachable`);
/// also how long a relay keeps asking for a topic no longer owned here.
pub const HANDOFF_WAIT_MS: u64 = 5_000;
/// How often an unanswered or refused claim is asked again.
pub const CLAIM_RETRY_MS: u64 = 250;
/// How long a relay goes on without the claim it serves being asked
/// again (a claimer retries every [`CLAIM_RETRY_MS`]).
pub const RELAY_IDLE_MS: u64 = 4 * CLAIM_RETRY_MS;
/// Publishes and subscribes a topic being taken over holds at most (past
/// it they fail at once): a claim that takes long cannot grow memory.
pub const TAKING_QUEUE_MAX: usize = 10_000;
/// Offers held for a view that does not make this node their topic's
/// owner yet (one topic name each): past it an offer is dropped and its
/// topic claimed at its first use, as without offers.
pub const OFFERS_HELD_MAX: usize = 100_000;

/// A topic this shard claims: owned here under the current view and being
/// taken over, or (a relay) asked for by the next owner in the chain.
#[derive(Debug)]
pub(super) struct Taking {
    /// The node claimed from.
    from: String,
    /// The version of the view in which `from` owned the topic.
    at: u64,
    /// What waits for the hand-off, in arrival order.
    pending: Vec<Pending>,
    /// Asked for by the next node in the chain, not owned here.
    relay: bool,
    /// Claims sent to `from` not answered yet.
    outstanding: u32,
    /// Not wanted any more: asked no more, ends at its answer (a state
    /// may still come, and is given on; a leaving node waits for it).
    ending: bool,
    /// When pending publishes and subscribes fail; when a relay ends.
    deadline_ms: u64,
    /// When the claim is asked again.
    retry_ms: u64,
    /// Nobody is asked: the object store is, where a durable topic's log
    /// ends (see `Broker::stored_listed`).
    listing: bool,
}

/// What comes with a topic's state besides its numbers and history.
#[derive(Debug, Default)]
pub(super) struct Carried {
    /// A durable topic's log (its groups taken out into `groups`).
    durable: Option<DurableHandOff>,
    /// Its pending schedules.
    schedules: Vec<Scheduled>,
    /// Its consumer groups (a durable topic's from its log).
    groups: Vec<SavedGroup>,
}

impl Carried {
    /// What a hand-off's state carries: its durable log with its groups
    /// taken out, its schedules, and an ephemeral topic's groups.
    fn handed(mut durable: Option<DurableHandOff>, schedules: Vec<Scheduled>, groups: Vec<SavedGroup>) -> Carried {
        let groups = match durable.as_mut() {
            Some(d) => std::mem::take(&mut d.groups),
            None => groups,
        };
        Carried { durable, schedules, groups }
    }
}

impl Taking {
    /// A durable topic waiting for its segments' listing, with what waits
    /// for it until `deadline_ms`.
    fn listing(pending: Vec<Pending>, deadline_ms: u64) -> Taking {
        Taking {
            from: String::new(),
            at: 0,
            pending,
            relay: false,
            outstanding: 0,
            ending: false,
            deadline_ms,
            retry_ms: u64::MAX,
            listing: true,
        }
    }
}

/// A topic given up and not yet claimed: what it stood at when given up,
/// and the run of ownership it was held for. The copy kept here may follow
/// another node meanwhile; the hand-off never carries less than this
/// (numbers never go back).
#[derive(Debug)]
pub(super) struct Handing {
    epoch: Epoch,
    last_seq: u64,
    /// The first version of the run this node held the state for.
    run_start: u64,
    /// The first version after this node's last run: a claimer whose view
    /// is at least this new comes later in the chain than every run of
    /// this node it remembers.
    run_end: u64,
    /// Its consumer groups where they stood when given up (handed over
    /// with the state; a durable topic's with its log).
    groups: Vec<SavedGroup>,
}

/// Where a topic's state is to be asked for, past a gone node.
enum Source {
    /// This node, owner at this version.
    Node(String, u64),
    /// It left this node (toward the gone one), or never existed before
    /// this node's first set: gone with it, or new.
    LeftHere,
    /// Before what this node remembers.
    Unknown,
}

/// A request waiting for a topic's hand-off.
#[derive(Debug)]
pub(super) enum Pending {
    /// A publish and whom to answer.
    Publish { topic: TopicName, kind: PayloadKind, payload: Bytes, options: PublishOptions, held: Held },
    /// A subscribe from a shard (`Item::Subscribe`).
    Item { from: usize, item: Item },
}

impl Broker {
    /// The member set changed (membership from etcd): topics this node
    /// owned and no longer does are given up and followed on their new
    /// owner; copies follow their topic's new owner; topics now owned here
    /// are claimed when first asked for.
    pub fn set_topology(&mut self, topology: Topology, now: Now) {
        let Some(views) = self.cluster.as_mut() else {
            return;
        };
        let current = views.current();
        if topology.version() <= current.version() && topology.members() == current.members() {
            return;
        }
        views.push(topology);
        let oldest = views.oldest_version();
        // What left this node before the oldest remembered view no longer
        // decides a claim.
        self.gave.retain(|_, (version, _)| *version >= oldest);
        // Topics given to a node whose view was newer stay its until this
        // node's view is as new (else this node would own them again, with
        // nothing, under a set it has not seen change).
        let current = views.current().version();
        self.given.retain(|_, (_, version)| *version > current);
        // Topics owned here that now belong elsewhere.
        for topic in self.owner.owned_names() {
            if self.remote_node(&topic).is_some() {
                self.give_up(&topic, now);
            }
        }
        // Topics given up before and not claimed, owned here again: taken
        // back (this node still holds their state).
        let mut back: Vec<TopicName> = self.handing.keys().filter(|t| self.remote_node(t).is_none()).cloned().collect();
        back.sort();
        for topic in back {
            let Some(mut given) = self.handing.remove(&topic) else { continue };
            let (epoch, last_seq, history) = self.handed_state(&topic, &given);
            let carried = Carried { groups: std::mem::take(&mut given.groups), ..Carried::default() };
            self.handing.insert(topic.clone(), given);
            self.taken(&topic, Some((epoch, last_seq, history)), carried, now);
        }
        // Copies whose owner changed: follow the new one (or take over).
        // Sorted wherever a hash map is walked here: the actions come out in
        // the same order on every run (the simulation's seeds replay).
        let mut mirrors: Vec<(TopicName, String)> =
            self.mirrors.iter().map(|(t, m)| (t.clone(), m.node.clone())).collect();
        mirrors.sort();
        for (topic, node) in mirrors {
            match self.remote_node(&topic) {
                Some(owner) if owner == node => {}
                Some(owner) => {
                    self.actions.push(Action::Link { node, frame: LinkFrame::Unfollow { topic: topic.clone() } });
                    if let Some(m) = self.mirrors.get_mut(&topic) {
                        m.node = owner;
                    }
                    self.follow_again(&topic);
                }
                None => {
                    // Now owned here: the copy's subscribers stay; the topic
                    // is claimed from the owner before this node's run.
                    self.actions
                        .push(Action::Link { node: node.clone(), frame: LinkFrame::Unfollow { topic: topic.clone() } });
                    let queued = self.mirrors.remove(&topic).map(|m| m.queued).unwrap_or_default();
                    if !self.taking.contains_key(&topic) && !self.owner.owns(&topic) {
                        match self.claim_target(&topic) {
                            Some((from, at)) => self.start_claim(&topic, from, at, false, now),
                            None => self.taken(&topic, None, Carried::default(), now),
                        }
                    }
                    // Held for the hand-off if there is one, else granted.
                    for (from, item) in queued {
                        self.handle(from, item, now);
                    }
                }
            }
        }
        // Claims under way: one for a topic owned here asks the owner before
        // this node's current run (the chain may have grown; a relay for it
        // becomes this node's own claim); one for a topic owned elsewhere
        // now ends, and what waited for it goes to the new owner (a relay
        // goes on while its claimer asks).
        let mut taking: Vec<TopicName> = self.taking.keys().cloned().collect();
        taking.sort();
        for topic in taking {
            if self.taking.get(&topic).is_some_and(|t| t.listing) {
                continue; // ends at its listing, given on from there if need be
            }
            if self.remote_node(&topic).is_none() {
                let target = self.claim_target(&topic);
                let Some(t) = self.taking.get_mut(&topic) else { continue };
                if t.relay || t.ending {
                    t.relay = false;
                    t.ending = false;
                    t.deadline_ms = now.unix_ms + HANDOFF_WAIT_MS;
                }
                if let Some((from, at)) = target.filter(|(from, at)| *from != t.from || *at != t.at) {
                    self.claim_from(&topic, from, at, now);
                }
            } else if self.taking.get(&topic).is_some_and(|t| !t.relay) {
                let pending = self.taking.get_mut(&topic).map(|t| std::mem::take(&mut t.pending)).unwrap_or_default();
                self.end_taking(&topic, now);
                // Its live subscribers here follow the new owner.
                self.follow_if_subscribed(&topic);
                for p in pending {
                    self.release(p, now);
                }
            }
        }
        // Topics offered ahead of this view: claimed if it made them ours.
        let mut offered: Vec<TopicName> = std::mem::take(&mut self.offered).into_iter().collect();
        offered.sort();
        for topic in offered {
            if self.remote_node(&topic).is_none() {
                self.claim_offered(&topic, now);
            }
        }
    }

    /// This node lost (or regained) its membership lease: while fenced it
    /// sequences nothing.
    pub fn set_fenced(&mut self, fenced: bool) {
        self.fenced = fenced;
    }

    /// Topics given up and not yet claimed, and topics being claimed
    /// (whose state, once here, is to be handed on): a leaving node waits
    /// for both.
    pub fn handing_over(&self) -> usize {
        self.handing.len() + self.taking.len()
    }

    /// Whether a durable topic given up here still has records not in the
    /// object store (its last segment being sealed or uploaded): a leaving
    /// node waits for them past its usual bound, so that they are there
    /// for whoever takes the topic, claimed or not.
    pub fn durable_uploads_pending(&self) -> bool {
        self.handing.keys().any(|t| self.owner.durable_hand_off(t) == DurableHandOffReady::Waiting)
    }

    /// Whether this node is fenced.
    pub(super) fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// Stops owning `topic` (it belongs to another node now): kept as a
    /// copy, its state handed off when claimed; followed on its owner if
    /// subscribed here.
    fn give_up(&mut self, topic: &TopicName, now: Now) {
        let Some((epoch, last_seq, _)) = self.owner.give_away(topic) else {
            return;
        };
        // A durable log leaves only whole in the object store: its last
        // segment is sealed and uploaded now, before any claim (and before
        // a leaving node is gone, if nobody claims it).
        self.seal(topic);
        // Its groups end here: their members join again on the new owner,
        // a durable topic's groups where they stood.
        let groups = self.groups_leaving(topic, last_seq + 1, now);
        let run_start = self.cluster.as_ref().and_then(|v| v.latest_run(topic)).map_or(0, |r| r.start);
        let run_end = self.cluster.as_ref().map_or(0, |v| v.latest_run_end(topic));
        self.handing.insert(topic.clone(), Handing { epoch, last_seq, run_start, run_end, groups });
        self.follow_if_subscribed(topic);
        // The new owner claims it now, not at its first use: a leaving
        // node is gone in seconds, and a topic nobody used by then would
        // start afresh there (its history, a durable topic's groups lost).
        if let Some(node) = self.remote_node(topic) {
            self.actions.push(Action::Link { node, frame: LinkFrame::Offer { topic: topic.clone() } });
        }
    }

    /// Another node gave `topic` up to this one ([`LinkFrame::Offer`]):
    /// claimed now if this node's view makes it the owner, else held for
    /// the next member set (which may).
    pub fn offer(&mut self, topic: TopicName, now: Now) {
        let owner = topic.owner_shard(self.shards);
        self.send(owner, Item::Offer { topic }, now);
    }

    /// The owner shard's side of [`Broker::offer`].
    pub(super) fn offered_here(&mut self, topic: TopicName, now: Now) {
        let Some(views) = self.cluster.as_ref() else { return };
        if views.mine(&topic) {
            self.claim_offered(&topic, now);
        } else if self.offered.len() < OFFERS_HELD_MAX {
            self.offered.insert(topic);
        }
    }

    /// Claims an offered topic owned here that is neither held nor being
    /// taken over (nothing waits for it yet).
    fn claim_offered(&mut self, topic: &TopicName, now: Now) {
        // `needs_hand_off` is false for a topic held here.
        if self.taking.contains_key(topic) || !self.needs_hand_off(topic) {
            return;
        }
        if let Some((from, at)) = self.claim_target(topic) {
            self.start_claim(topic, from, at, false, now);
        }
    }

    /// Follows `topic` on its owner if this node subscribes to it and does
    /// not follow it yet (it was owned or being taken over here).
    fn follow_if_subscribed(&mut self, topic: &TopicName) {
        let Some(node) = self.remote_node(topic) else { return };
        if self.owner.subscriber_shards(topic) != 0 && !self.mirrors.contains_key(topic) {
            // After what the copy has, else from the owner's first retained.
            let asked = self
                .owner
                .mirror_position(topic)
                .map(|(epoch, last)| ResumeFrom { after_seq: last, epoch: Some(epoch), since_ms: None })
                .or(Some(ResumeFrom { after_seq: 0, epoch: None, since_ms: None }));
            self.mirrors.insert(topic.clone(), mirrors::Mirror::following(node.clone(), asked));
            self.send_follow(node, topic.clone(), asked);
        }
    }

    /// Whom to claim `topic` from for this node's current run of it, and
    /// the version of the view in which that node owned it; `None` when
    /// the run reaches back past the remembered views (a new topic).
    fn claim_target(&self, topic: &TopicName) -> Option<(String, u64)> {
        let views = self.cluster.as_ref()?;
        views.run_at(topic, views.current().version())?.before
    }

    /// Whether a publish or subscribe of `topic` must wait for a hand-off:
    /// this node owns it under the current view, holds no state for it,
    /// and another node owned it before this node's run.
    pub(super) fn needs_hand_off(&self, topic: &TopicName) -> bool {
        // Outside a cluster (the publish path of a single node) nothing to
        // look up; cheapest first: most topics are held where they are owned.
        let Some(views) = self.cluster.as_ref() else { return false };
        if self.owner.owns(topic) && self.taking.is_empty() {
            return false;
        }
        if !views.mine(topic) || (!self.given.is_empty() && self.given.contains_key(topic)) {
            return false;
        }
        // Not held here: claimed from the owner before, or (a configured
        // durable topic new here) its log's end asked of the object store.
        self.taking.contains_key(topic)
            || (!self.owner.owns(topic)
                && (self.claim_target(topic).is_some() || self.owner.durable_on_publish(topic).is_some()))
    }

    /// Holds a subscribe until `topic`'s hand-off.
    pub(super) fn take_over_item(&mut self, from: usize, topic: &TopicName, item: Item, now: Now) {
        self.take_over(topic, Pending::Item { from, item }, now);
    }

    /// Holds `pending` until `topic`'s hand-off (claiming it if not yet).
    pub(super) fn take_over(&mut self, topic: &TopicName, pending: Pending, now: Now) {
        if !self.taking.contains_key(topic) {
            match self.claim_target(topic) {
                Some((from, at)) => self.start_claim(topic, from, at, false, now),
                // Nobody to claim from: a durable topic's numbers go on
                // after what the object store holds of it (an earlier run
                // of the cluster), never over it.
                None if self.owner.durable_on_publish(topic).is_some() => self.start_listing(topic, Vec::new(), now),
                None => {
                    self.release(pending, now);
                    return;
                }
            }
        }
        let full = self.taking.get(topic).is_some_and(|t| t.pending.len() >= TAKING_QUEUE_MAX);
        if full {
            // A leave that cannot wait takes its member's held join (and
            // settles) out of the line: handled later without it, the join
            // would make a member that no longer exists.
            if let Pending::Item { from, item: Item::GroupLeave { sub, .. } } = &pending {
                let (from, sub) = (*from, *sub);
                if let Some(t) = self.taking.get_mut(topic) {
                    t.pending.retain(|p| {
                        !matches!(p, Pending::Item { from: f, item: Item::GroupJoin { sub: s, .. } | Item::GroupSettle { sub: s, .. } }
                            if *f == from && *s == sub)
                    });
                }
            }
            self.fail(pending, OwnerError::OwnerUnreachable, now);
            return;
        }
        if let Some(t) = self.taking.get_mut(topic) {
            t.pending.push(pending);
        }
    }

    fn start_claim(&mut self, topic: &TopicName, from: String, at: u64, relay: bool, now: Now) {
        let ms = now.unix_ms;
        let taking = Taking {
            from: from.clone(),
            at,
            pending: Vec::new(),
            relay,
            outstanding: 0,
            ending: false,
            deadline_ms: ms + if relay { RELAY_IDLE_MS } else { HANDOFF_WAIT_MS },
            retry_ms: ms + CLAIM_RETRY_MS,
            listing: false,
        };
        self.taking.insert(topic.clone(), taking);
        self.send_claim(topic, from, at);
    }

    /// A claim under way asks another node now (`from`, owner at `at`):
    /// answers still due from the one before count for nothing.
    fn claim_from(&mut self, topic: &TopicName, from: String, at: u64, now: Now) {
        let Some(t) = self.taking.get_mut(topic) else { return };
        t.from = from.clone();
        t.at = at;
        t.outstanding = 0;
        t.retry_ms = now.unix_ms + CLAIM_RETRY_MS;
        self.send_claim(topic, from, at);
    }

    fn send_claim(&mut self, topic: &TopicName, from: String, at: u64) {
        let Some(views) = self.cluster.as_ref() else { return };
        if let Some(t) = self.taking.get_mut(topic) {
            t.outstanding += 1;
        }
        let version = views.current().version();
        tracing::debug!(topic = topic.as_str(), from = %from, version, at, "claiming");
        let frame = LinkFrame::Claim { topic: topic.clone(), version, node: views.me().to_string(), at };
        self.actions.push(Action::Link { node: from, frame });
    }

    /// A claim not wanted any more (its topic moved away, or a relay nobody
    /// asks for): ends now if no claim is unanswered, else at its answer.
    fn end_taking(&mut self, topic: &TopicName, now: Now) {
        let Some(t) = self.taking.get_mut(topic) else { return };
        if t.outstanding == 0 {
            self.taking.remove(topic);
        } else {
            t.ending = true;
            t.deadline_ms = now.unix_ms + HANDOFF_WAIT_MS;
        }
    }

    /// A node answered a claim of `topic`.
    pub(super) fn handed_off(&mut self, node: &str, topic: &TopicName, state: HandOffState, now: Now) {
        let mut asked = false;
        if let Some(t) = self.taking.get_mut(topic).filter(|t| t.from == node) {
            t.outstanding = t.outstanding.saturating_sub(1);
            asked = !t.ending;
            if t.ending && t.outstanding == 0 && !matches!(state, HandOffState::State { .. }) {
                self.taking.remove(topic);
            }
        }
        tracing::info!(topic = topic.as_str(), from = node, asked, "hand-off: {state:?}");
        match state {
            HandOffState::Refused if asked => {
                if let Some(t) = self.taking.get_mut(topic) {
                    t.retry_ms = now.unix_ms + CLAIM_RETRY_MS;
                }
            }
            HandOffState::Nothing if asked => self.taken(topic, None, Carried::default(), now),
            HandOffState::Refused | HandOffState::Nothing => {}
            // A state is never dropped, asked for now or not: it is the
            // topic's only one.
            HandOffState::State { epoch, last_seq, history, durable, schedules: _, groups } => {
                metrics::add(&self.metrics.topics_taken_over, 1);
                let schedules = self.schedules_arriving.remove(&(node.to_string(), topic.clone())).unwrap_or_default();
                self.taken(topic, Some((epoch, last_seq, history)), Carried::handed(durable, schedules, groups), now)
            }
        }
    }

    /// A claimed node sent schedules of `topic` ahead of its state.
    pub(super) fn schedules_ahead(&mut self, node: &str, topic: TopicName, list: Vec<Scheduled>) {
        self.schedules_arriving.entry((node.to_string(), topic)).or_default().extend(list);
    }

    /// `topic`'s state arrived (or there is none: it starts afresh here, a
    /// copy held here moving to a new sequence space): held here, then
    /// given on if another node owns the topic now; what waited goes
    /// through. A durable topic's log and the topic's pending schedules
    /// come with its state (`carried`).
    fn taken(&mut self, topic: &TopicName, state: Option<(Epoch, u64, Vec<Message>)>, carried: Carried, now: Now) {
        let Carried { durable, schedules, groups } = carried;
        let pending = self.taking.remove(topic).map(|t| t.pending).unwrap_or_default();
        // A durable log this node sequences already stays (a late state
        // must not drop its unwritten records and waiting publishers).
        let durable = durable.filter(|_| !(self.owner.owns(topic) && self.owner.durable(topic).is_some()));
        if self.owner.owns(topic) && state.is_some() {
            tracing::warn!(topic = topic.as_str(), "a second state of a topic arrived: kept in its own epoch");
        }
        match state {
            Some((epoch, last_seq, history)) => match self.owner.adopt(topic, epoch, last_seq, history, now.at) {
                Ok(adopted) => {
                    self.handing.remove(topic);
                    if let Some(durable) = durable {
                        self.owner.durable_taken(topic, durable);
                    }
                    self.schedules_arrived(topic, schedules, now);
                    self.groups_arrived(topic, groups, now);
                    let position = self.owner.last_seq(topic).unwrap_or(last_seq);
                    for shard in (0..self.shards).filter(|s| adopted.restarted & (1 << s) != 0) {
                        self.send(shard, Item::Restarted { topic: topic.clone(), epoch, last_seq: position }, now);
                    }
                    for message in adopted.new {
                        for shard in (0..self.shards).filter(|s| adopted.subscriber_shards & (1 << s) != 0) {
                            let item = Item::Deliver { topic: topic.clone(), epoch, message: message.clone() };
                            self.send(shard, item, now);
                        }
                    }
                    // Numbers the hand-off passed without their messages.
                    if let Some(gap) = adopted.skipped {
                        for shard in (0..self.shards).filter(|s| adopted.subscriber_shards & (1 << s) != 0) {
                            self.send(shard, Item::Gap { topic: topic.clone(), epoch, gap }, now);
                        }
                    }
                }
                Err(e) => {
                    // No room for it here (the topic table is full): the
                    // state is kept to be handed on, never dropped.
                    tracing::warn!(topic = topic.as_str(), "a topic's state arrived with no room for it: {e}");
                    let views = self.cluster.as_ref();
                    let run_start = views.and_then(|v| v.latest_run(topic)).map_or(0, |r| r.start);
                    let run_end = views.map_or(0, |v| v.latest_run_end(topic));
                    self.handing.insert(topic.clone(), Handing { epoch, last_seq, run_start, run_end, groups });
                    for pending in pending {
                        self.fail(pending, e, now);
                    }
                    return;
                }
            },
            None => {
                if self.owner.durable_on_publish(topic).is_some() {
                    // A durable topic's state went with its node, its log
                    // did not: the object store says where it ended before
                    // it is numbered anew (`stored_listed`).
                    return self.start_listing(topic, pending, now);
                }
                return self.start_afresh(topic, None, pending, now);
            }
        }
        // Owned elsewhere now (a relay, or the view moved on meanwhile).
        if self.remote_node(topic).is_some() {
            self.give_up(topic, now);
        }
        for pending in pending {
            self.release(pending, now);
        }
    }

    /// Starts `topic` in a new sequence space here (its state is gone), its
    /// copy's subscribers told; a durable topic's numbers go on after its
    /// log in the object store (`stored`); then given on if owned
    /// elsewhere now, and what waited goes through (or fails when there is
    /// no room for the topic).
    fn start_afresh(
        &mut self,
        topic: &TopicName,
        stored: Option<(DurableSpec, Vec<ArchivedSegment>, Vec<SavedGroup>)>,
        pending: Vec<Pending>,
        now: Now,
    ) {
        // Held from now on as owned (an empty topic if nothing was here),
        // so that it is not claimed again.
        if let Err(e) = self.owner.ensure(topic, now.at) {
            for pending in pending {
                self.fail(pending, e, now);
            }
            return;
        }
        let restarted = self.owner.take_fresh(topic, now.at);
        let groups = match stored {
            Some((spec, segments, groups)) => {
                self.owner.durable_from_store(topic, spec, segments);
                groups
            }
            None => Vec::new(),
        };
        let last_seq = self.owner.last_seq(topic).unwrap_or(0);
        if let Some(epoch) = self.owner.epoch_of(topic).filter(|_| restarted != 0) {
            for shard in (0..self.shards).filter(|s| restarted & (1 << s) != 0) {
                self.send(shard, Item::Restarted { topic: topic.clone(), epoch, last_seq }, now);
            }
        }
        // Its durable groups as the store has them, before the joins that
        // waited (which would make them anew).
        self.groups_arrived(topic, groups, now);
        // Owned elsewhere now (a relay, or the view moved on meanwhile).
        if self.remote_node(topic).is_some() {
            self.give_up(topic, now);
        }
        for pending in pending {
            self.release(pending, now);
        }
    }

    /// Asks the object store where `topic`'s durable log ends; `pending`
    /// waits for the answer (failed past [`HANDOFF_WAIT_MS`], and again
    /// each time after, while the listing is still out).
    fn start_listing(&mut self, topic: &TopicName, pending: Vec<Pending>, now: Now) {
        self.taking.insert(topic.clone(), Taking::listing(pending, now.unix_ms + HANDOFF_WAIT_MS));
        self.actions.push(Action::ListStored { topic: topic.clone() });
    }

    /// The object store listed the segments of `topic`, a durable topic
    /// about to start afresh here: its numbers go on after the last one
    /// stored (in a new sequence space: its previous owner may have
    /// numbered messages it never uploaded). A failed listing fails what
    /// waits (`owner_unreachable`, retryable); the next attempt lists again.
    /// With it come the durable groups' positions the store holds (sent
    /// there by its earlier owners, about once a second): they go on from
    /// there (what they finished since is delivered again).
    pub fn stored_listed(
        &mut self,
        topic: &TopicName,
        listed: Result<(Vec<ArchivedSegment>, Vec<SavedGroup>), String>,
        now: Now,
    ) {
        if !self.taking.get(topic).is_some_and(|t| t.listing) {
            return;
        }
        let pending = self.taking.remove(topic).map(|t| t.pending).unwrap_or_default();
        let spec = self.owner.durable_on_publish(topic);
        let (segments, groups, spec) = match (listed, spec) {
            (Ok((segments, groups)), Some(spec)) => (segments, groups, spec),
            (listed, _) => {
                tracing::warn!(topic = topic.as_str(), "durable topic's segments not listed: {:?}", listed.err());
                for pending in pending {
                    self.fail_or_forward(topic, pending, now);
                }
                return;
            }
        };
        let (count, last) = (segments.len(), segments.last().map_or(0, |s| s.last_seq));
        tracing::warn!(
            topic = topic.as_str(),
            segments = count,
            last,
            "durable topic starts afresh after its stored log"
        );
        self.start_afresh(topic, Some((spec, segments, groups)), pending, now);
    }

    /// Lets a held request go through now that its topic is owned here.
    fn release(&mut self, pending: Pending, now: Now) {
        match pending {
            Pending::Publish { topic, kind, payload, options, held } => {
                self.publish_held(topic, kind, payload, options, held, now);
            }
            Pending::Item { from, item } => self.handle(from, item, now),
        }
    }

    /// What waited for a listing that failed or is late: to the topic's
    /// owner if it moved meanwhile, else failed (retryable).
    fn fail_or_forward(&mut self, topic: &TopicName, pending: Pending, now: Now) {
        if self.remote_node(topic).is_some() {
            self.release(pending, now);
        } else {
            self.fail(pending, OwnerError::OwnerUnreachable, now);
        }
    }

    fn fail(&mut self, pending: Pending, e: OwnerError, now: Now) {
        match pending {
            Pending::Publish { held, .. } => self.answer(held, Err(e), now),
            Pending::Item { from, item: Item::Subscribe { topic, req, .. } } => {
                self.send(from, Item::SubscribeDone { topic, req, result: Err(e) }, now);
            }
            Pending::Item { from, item: Item::GroupJoin { topic, group, sub, .. } } => {
                let result = Err(GroupJoinError::OwnerUnreachable);
                self.send(from, Item::GroupJoined { topic, group, sub, result }, now);
            }
            Pending::Item { from, item: Item::ScheduleAsk { req, .. } | Item::GroupDelete { req, .. } } => {
                self.send(from, Item::OwnerAnswer { req, answer: refused(e) }, now);
            }
            Pending::Item { .. } => {}
        }
    }

    /// The state a hand-off carries for `topic`, given up as `given`: the
    /// copy's, unless the copy moved to another sequence space or went
    /// back meanwhile (then where it stood when given up, without history).
    fn handed_state(&self, topic: &TopicName, given: &Handing) -> (Epoch, u64, Vec<Message>) {
        match self.owner.handed_state(topic) {
            Some(state) if state.0 == given.epoch && state.1 >= given.last_seq => state,
            _ => (given.epoch, given.last_seq, Vec::new()),
        }
    }

    /// Claims and deadlines: a claim not answered is asked again; past the
    /// deadline, what waits fails (a relay ends), unless the node claimed
    /// from is gone (no longer a member), when the topic starts afresh.
    pub fn cluster_tick(&mut self, now: Now) {
        // Listings late past their deadline: what waits fails (retryable);
        // the listing stays out, its answer still awaited.
        let mut late: Vec<TopicName> = self
            .taking
            .iter()
            .filter(|(_, t)| t.listing && now.unix_ms >= t.deadline_ms)
            .map(|(topic, _)| topic.clone())
            .collect();
        late.sort();
        for topic in late {
            let Some(t) = self.taking.get_mut(&topic) else { continue };
            t.deadline_ms = now.unix_ms + HANDOFF_WAIT_MS;
            for p in std::mem::take(&mut t.pending) {
                self.fail_or_forward(&topic, p, now);
            }
        }
        let mut due: Vec<TopicName> = self
            .taking
            .iter()
            .filter(|(_, t)| !t.listing && (now.unix_ms >= t.retry_ms || now.unix_ms >= t.deadline_ms))
            .map(|(topic, _)| topic.clone())
            .collect();
        due.sort();
        for topic in due {
            let Some(t) = self.taking.get(&topic) else { continue };
            let (from, at) = (t.from.clone(), t.at);
            let member = self.cluster.as_ref().is_some_and(|v| v.current().members().contains(&from));
            if t.ending {
                // Asked no more; its answer is lost past the deadline.
                if now.unix_ms >= t.deadline_ms {
                    self.taking.remove(&topic);
                }
                continue;
            }
            if now.unix_ms >= t.deadline_ms {
                if !member {
                    self.claim_past(&topic, now);
                    continue;
                }
                if t.relay {
                    // A relay nobody asked again for.
                    self.end_taking(&topic, now);
                    continue;
                }
                let pending = self.taking.get_mut(&topic).map(|t| std::mem::take(&mut t.pending)).unwrap_or_default();
                for p in pending {
                    self.fail(p, OwnerError::OwnerUnreachable, now);
                }
                if let Some(t) = self.taking.get_mut(&topic) {
                    t.deadline_ms = now.unix_ms + HANDOFF_WAIT_MS;
                }
            }
            if let Some(t) = self.taking.get_mut(&topic) {
                t.retry_ms = now.unix_ms + CLAIM_RETRY_MS;
            }
            self.send_claim(&topic, from, at);
        }
    }

    /// The link to `node` failed: topics claimed from it that it can no
    /// longer answer for (it is not a member) start afresh.
    pub(super) fn claims_link_down(&mut self, node: &str, now: Now) {
        let member = self.cluster.as_ref().is_some_and(|v| v.current().members().iter().any(|m| m == node));
        if member {
            return; // asked again at the next retry
        }
        let mut gone: Vec<TopicName> =
            self.taking.iter().filter(|(_, t)| t.from == node).map(|(t, _)| t.clone()).collect();
        gone.sort();
        for topic in gone {
            if self.taking.get(&topic).is_some_and(|t| t.ending) {
                self.taking.remove(&topic);
                continue;
            }
            self.claim_past(&topic, now);
        }
    }

    /// The node `topic` is claimed from is gone (no longer a member, its
    /// link down): the claim goes to the owner before that node's run, who
    /// holds the state if the gone node never took it, or knows it left
    /// with the gone node; with nobody before it, the topic starts afresh
    /// in a new sequence space (announced: `lost`).
    fn claim_past(&mut self, topic: &TopicName, now: Now) {
        let Some(t) = self.taking.get(topic) else { return };
        let Some(views) = self.cluster.as_ref() else { return };
        let (gone, gone_at) = (t.from.clone(), t.at);
        let next = match self.source_before(&gone, topic, gone_at) {
            Source::Node(from, at) => Some((from, at)),
            Source::LeftHere => None,
            // This node remembers too little (it joined since): a member
            // of the view at `gone_at` still here walks on for it.
            Source::Unknown => views
                .at(gone_at)
                .and_then(|v| {
                    v.members()
                        .iter()
                        .find(|m| **m != gone && *m != views.me() && views.current().members().contains(m))
                })
                .map(|m| (m.clone(), gone_at)),
        };
        match next {
            Some((from, at)) => {
                tracing::info!(topic = topic.as_str(), gone = %gone, asking = %from, at, "claim goes past a gone node");
                if let Some(t) = self.taking.get_mut(topic) {
                    t.deadline_ms = now.unix_ms + HANDOFF_WAIT_MS;
                }
                self.claim_from(topic, from, at, now);
            }
            None => {
                tracing::warn!(topic = topic.as_str(), from = %gone, "no hand-off from a gone owner: the topic starts afresh");
                self.taken(topic, None, Carried::default(), now);
            }
        }
    }

    /// Who to ask for `topic` in place of `gone`, which owned it at
    /// version `at`: the owner before `gone`'s run (past runs of this node
    /// during which the state never came here).
    fn source_before(&self, gone: &str, topic: &TopicName, at: u64) -> Source {
        let Some(views) = self.cluster.as_ref() else { return Source::Unknown };
        let (mut node, mut at) = (gone.to_string(), at);
        loop {
            let Some(run) = views.run_by(&node, topic, at) else { return Source::Unknown };
            let Some((before, before_at)) = run.before else {
                // A run of this node's reaching back to its first set, in
                // which it never held the state: nothing came before it.
                return if node == views.me() { Source::LeftHere } else { Source::Unknown };
            };
            if before != views.me() {
                return Source::Node(before, before_at);
            }
            // This node owned it before: if the state left it then (toward
            // the gone node), it is gone with that node.
            let left = views
                .run_at(topic, before_at)
                .is_some_and(|r| self.gave.get(topic).is_some_and(|(v, _)| *v >= r.start));
            if left {
                return Source::LeftHere;
            }
            (node, at) = (before, before_at);
        }
    }

    /// A link session of this node got `node`'s claim of `topic` (as owned
    /// here in the view of version `at`; the claimer's view is `version`):
    /// the topic's owner shard answers on `out`.
    pub fn claim(&mut self, topic: TopicName, version: u64, node: String, at: u64, out: Rc<Outbound>, now: Now) {
        let req = self.next_id();
        self.claims.insert(req, out);
        let owner = topic.owner_shard(self.shards);
        self.send(owner, Item::Claim { topic, version, node, at, req }, now);
    }

    /// The owner shard's answer to a claim: written to the claiming link.
    /// A state's schedules go in frames of their own just before it.
    /// A state the link does not take (its queue full: it closes) goes
    /// back to the topic's owner shard (`hand_off_returned`).
    pub(super) fn claim_answered(&mut self, req: u64, topic: TopicName, state: HandOffState, now: Now) {
        if let Some(out) = self.claims.remove(&req) {
            let kept = matches!(state, HandOffState::State { .. }).then(|| state.clone());
            let mut queued = true;
            for frame in crate::link::hand_off_frames(&topic, state) {
                queued = queued && out.offer_control(ws::encode_data(PayloadKind::Binary, &frame));
            }
            self.actions.push(Action::ClaimAnswered);
            if let Some(state) = kept.filter(|_| !queued) {
                tracing::warn!(topic = topic.as_str(), "a hand-off the claimer's link did not take: held again");
                let owner = topic.owner_shard(self.shards);
                self.send(owner, Item::HandOffReturned { topic, state }, now);
            }
        }
    }

    /// A state given to a claimer whose link did not take it: adopted
    /// again as if it had arrived (then given up again: it belongs to the
    /// claimer), so that the claimer's next claim gets it.
    pub(super) fn hand_off_returned(&mut self, topic: TopicName, state: HandOffState, now: Now) {
        let HandOffState::State { epoch, last_seq, history, durable, schedules, groups } = state else { return };
        // It did not leave: a claim is not stale for it.
        self.gave.remove(&topic);
        metrics::add(&self.metrics.handoffs_returned, 1);
        self.taken(&topic, Some((epoch, last_seq, history)), Carried::handed(durable, schedules, groups), now);
    }

    /// `node` claims `topic`, which this node owned in the view of version
    /// `at` (the claimer's view is `version`); request `req` of shard
    /// `from` (a link session) gets the answer.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn answer_claim(
        &mut self,
        from: usize,
        topic: TopicName,
        version: u64,
        node: String,
        at: u64,
        req: u64,
        now: Now,
    ) {
        let state = self.claim_decision(&topic, version, &node, at, now);
        tracing::debug!(topic = topic.as_str(), version, at, claimer = %node, "claim answered: {state:?}");
        self.send(from, Item::HandOffAnswer { req, topic, state }, now);
    }

    /// The state held here (given up) leaves for `node` (this node's view
    /// is `mine`).
    /// A durable topic leaves only with every record in the object store:
    /// until then the claim is refused (and asked again) while its last
    /// segment is sealed and uploaded.
    fn hand_over(&mut self, topic: &TopicName, node: &str, mine: u64) -> HandOffState {
        if !self.handing.contains_key(topic) {
            return HandOffState::Refused;
        }
        let mut durable = match self.owner.durable_hand_off(topic) {
            DurableHandOffReady::Waiting => {
                self.seal(topic);
                return HandOffState::Refused;
            }
            DurableHandOffReady::Ephemeral => None,
            DurableHandOffReady::Ready(d) => Some(d),
        };
        // Schedule changes answered only once journaled: those answers
        // first.
        if !self.schedules_may_leave(topic) {
            return HandOffState::Refused;
        }
        let Some(mut given) = self.handing.remove(topic) else { return HandOffState::Refused };
        let mut groups = std::mem::take(&mut given.groups);
        if let Some(d) = durable.as_mut() {
            d.groups = std::mem::take(&mut groups);
        }
        self.gave.insert(topic.clone(), (mine, node.to_string()));
        metrics::add(&self.metrics.topics_handed_over, 1);
        let (epoch, last_seq, history) = self.handed_state(topic, &given);
        if durable.is_some() {
            self.owner.durable_left(topic);
        }
        let schedules = self.schedules_leaving(topic);
        HandOffState::State { epoch, last_seq, history, durable, schedules, groups }
    }

    /// What a claim of `topic` by `node` (its view `version`, this node
    /// the owner at `at`) gets; see the module's rules.
    fn claim_decision(&mut self, topic: &TopicName, version: u64, node: &str, at: u64, now: Now) -> HandOffState {
        let Some(views) = self.cluster.as_ref() else { return HandOffState::Nothing };
        let mine = views.current().version();
        // Being taken over or relayed here: the state is on its way (a
        // relay goes on while asked for).
        if let Some(t) = self.taking.get_mut(topic) {
            if t.listing {
                return HandOffState::Refused; // held here once listed
            }
            if t.relay {
                t.deadline_ms = now.unix_ms + RELAY_IDLE_MS;
            }
            // The node this claim waits on asks this node about an earlier
            // run of its own: the two would wait on each other (a node that
            // appears twice in the topic's chain of owners). If this node
            // never held the state in that run, it is further back: the
            // claim goes to the owner before that run.
            let (from, t_at) = (t.from.clone(), t.at);
            if from == node && at < t_at {
                let held_since = self.gave.get(topic).map(|(v, _)| *v);
                let run = views.run_at(topic, at).filter(|r| held_since.is_none_or(|v| v < r.start));
                if let Some((before, before_at)) = run.and_then(|r| r.before) {
                    tracing::debug!(topic = topic.as_str(), from = %before, at = before_at, "claim goes further back");
                    self.claim_from(topic, before, before_at, now);
                }
            }
            return HandOffState::Refused;
        }
        // Held here, given up: given to a claimer later in the chain than
        // the run it was held for.
        if let Some(given) = self.handing.get(topic) {
            if at < given.run_start && version < given.run_end {
                return HandOffState::Refused;
            }
            return self.hand_over(topic, node, mine);
        }
        // Held and sequenced here: given only to a claimer whose view is
        // past this node's current run (its `at` falls in this run); this
        // node forwards to it until its own view catches up.
        if self.owner.owns(topic) {
            let run_start = views.run_at(topic, mine).map_or(u64::MAX, |r| r.start);
            if at < run_start || version <= mine {
                return HandOffState::Refused;
            }
            self.given.insert(topic.clone(), (node.to_string(), version));
            self.give_up(topic, now);
            return self.hand_over(topic, node, mine);
        }
        // Not held here. This node's view is behind the claim: wait for it.
        if at > mine {
            return HandOffState::Refused;
        }
        // Owned here now, and not given away during this run: take it over
        // for this node's own run (a claim about an earlier run is then
        // stale).
        let gave = self.gave.get(topic).map(|(v, _)| *v);
        let current_run = views.run_at(topic, mine).map(|r| r.start);
        if current_run.is_some_and(|start| gave.is_none_or(|g| g < start)) {
            match self.claim_target(topic) {
                Some((from, at)) => self.start_claim(topic, from, at, false, now),
                None => self.taken(topic, None, Carried::default(), now),
            }
            return HandOffState::Refused;
        }
        let Some(run) = views.run_at(topic, at) else {
            // Not owned here at `at`: asked for a node that is gone (by a
            // node that remembers too little to walk past it), or asked
            // amiss; relayed from whoever holds it by this node's views.
            // Too long ago to remember: nothing known of it (the claimer
            // starts it afresh).
            let Some(owner) = views.at(at).and_then(|v| v.owner_of(topic)).map(str::to_string) else {
                return HandOffState::Nothing;
            };
            let source = if owner == node || owner == views.me() || views.current().members().contains(&owner) {
                Source::Unknown
            } else {
                self.source_before(&owner, topic, at)
            };
            return match source {
                // Never back to the claimer: it asked because it could not
                // walk on itself.
                Source::Node(from, _) if from == node => HandOffState::Nothing,
                Source::Node(from, at) => {
                    self.start_claim(topic, from, at, true, now);
                    HandOffState::Refused
                }
                Source::LeftHere | Source::Unknown => HandOffState::Nothing,
            };
        };
        // The state left this node during or after that run: the claim is
        // stale (the claimer's view will move on).
        if let Some((v, to)) = self.gave.get(topic).filter(|(v, _)| *v >= run.start) {
            // Given to a node that is gone since (it died with it, or its
            // lease ran out before it gave it on): nothing to hand on, the
            // claimer starts afresh (announced). Else the claimer's view is
            // behind.
            let gone = *to != node && !views.current().members().contains(to);
            tracing::debug!(topic = topic.as_str(), gave = v, to = %to, gone, "claim after the state left");
            return if gone { HandOffState::Nothing } else { HandOffState::Refused };
        }
        match run.before {
            // Never held in that run: ask the owner before it, and give the
            // state on once here.
            Some((from, at)) => {
                self.start_claim(topic, from, at, true, now);
                HandOffState::Refused
            }
            None => HandOffState::Nothing,
        }
    }
}
