//! A topic changing owner, the broker's side: when the member set changes
//! ([`Broker::set_topology`]), the topics whose owner changes move.
//!
//! - The previous owner stops sequencing each of its topics that now
//!   belongs to another node at once (it keeps its state, as a copy) and
//!   forwards publishes to the new owner from then on; a topic it has
//!   subscribers for is followed on the new owner like any copy.
//! - The new owner takes a topic over on its first publish or subscribe
//!   (or a follow from another node): it claims the topic from its
//!   previous owner ([`LinkFrame::Claim`], with the topology version) and
//!   holds what asks for the topic until the answer
//!   ([`LinkFrame::HandOff`]): the topic's epoch, last number and history
//!   (it continues them: numbers never go back or repeat, subscribers see
//!   no gap), or "nothing" (a new topic), or "refused" (the previous owner
//!   still owns it under a topology at least as new: the claimer's view is
//!   behind; it asks again).
//! - A claim from a node whose view is *newer* than the previous owner's
//!   is honoured at once (the previous owner gives the topic away before
//!   its own view changes): a version is the etcd revision of the member
//!   set, and a newer version was agreed by etcd, so the old owner never
//!   sequences the topic again and two owners never sequence it under one
//!   version.
//! - When the previous owner cannot be reached and is no longer a member
//!   (it died: its lease expired), the new owner starts the topic afresh in
//!   a new sequence space; its followers are told (`lost`). While it is a
//!   member and silent, publishes wait up to [`HANDOFF_WAIT_MS`] and then
//!   fail with `owner_unreachable`; the claim is asked again.
//!
//! Not handed off yet: consumer groups, schedules and durable logs of a
//! moving topic (they stay with the previous owner).

use super::*;
use crate::cluster::Topology;
use crate::link::{HandOffState, LinkFrame};

/// How long publishes and subscribes of a topic being taken over wait for
/// the previous owner's hand-off before they fail (`owner_unreachable`).
pub const HANDOFF_WAIT_MS: u64 = 5_000;
/// How often an unanswered or refused claim is asked again.
pub const CLAIM_RETRY_MS: u64 = 250;
/// Publishes and subscribes a topic being taken over holds at most (past
/// it they fail at once): a claim that takes long cannot grow memory.
pub const TAKING_QUEUE_MAX: usize = 10_000;

/// A topic this shard owns under the current topology and is taking over.
#[derive(Debug)]
pub(super) struct Taking {
    /// Its previous owner.
    from: String,
    /// What waits for the hand-off, in arrival order.
    pending: Vec<Pending>,
    /// When pending publishes and subscribes fail.
    deadline_ms: u64,
    /// When the claim is asked again.
    retry_ms: u64,
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
        let Some(view) = self.cluster.as_mut() else {
            return;
        };
        if topology.version() <= view.topology.version() && topology.members() == view.topology.members() {
            return;
        }
        let previous = std::mem::replace(&mut view.topology, topology);
        view.previous = Some(previous);
        self.given.clear();
        // Topics owned here that now belong elsewhere.
        for topic in self.owner.owned_names() {
            let Some(node) = self.remote_node(&topic) else { continue };
            self.give_up(&topic, node);
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
                    // is claimed from the node it was copied from.
                    self.actions
                        .push(Action::Link { node: node.clone(), frame: LinkFrame::Unfollow { topic: topic.clone() } });
                    if let Some(m) = self.mirrors.remove(&topic) {
                        for (from, item) in m.queued {
                            self.take_over(&topic, Pending::Item { from, item }, now);
                        }
                    }
                    if !self.taking.contains_key(&topic) {
                        self.start_claim(&topic, node, now);
                    }
                }
            }
        }
    }

    /// This node lost (or regained) its membership lease: while fenced it
    /// sequences nothing.
    pub fn set_fenced(&mut self, fenced: bool) {
        self.fenced = fenced;
    }

    /// Topics given up and not yet claimed, and topics being taken over
    /// (whose state, once here, is to be handed on): a leaving node waits
    /// for both.
    pub fn handing_over(&self) -> usize {
        self.handing.len() + self.taking.len()
    }

    /// Whether this node is fenced.
    pub(super) fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// Stops owning `topic` (its new owner is `node`): kept as a copy,
    /// handed off when `node` claims it; followed there if subscribed here.
    fn give_up(&mut self, topic: &TopicName, node: String) {
        if self.owner.give_away(topic).is_none() {
            return;
        }
        self.handing.insert(topic.clone(), node.clone());
        if self.owner.subscriber_shards(topic) != 0 && !self.mirrors.contains_key(topic) {
            let asked = self.owner.mirror_position(topic).map(|(epoch, last)| ResumeFrom {
                after_seq: last,
                epoch: Some(epoch),
                since_ms: None,
            });
            self.mirrors.insert(topic.clone(), mirrors::Mirror::following(node.clone(), asked));
            self.actions.push(Action::Link { node, frame: LinkFrame::Follow { topic: topic.clone(), from: asked } });
        }
    }

    /// Whether a publish or subscribe of `topic` must wait for a hand-off:
    /// this node owns it under the current topology, holds no owned state
    /// for it, and the previous topology gave it to another node.
    pub(super) fn needs_hand_off(&self, topic: &TopicName) -> bool {
        // Outside a cluster (the publish path of a single node) nothing to
        // look up.
        let Some(view) = self.cluster.as_ref() else { return false };
        if !self.taking.is_empty() && self.taking.contains_key(topic) {
            return true;
        }
        let Some(previous) = view.previous.as_ref() else { return false };
        // Cheapest first: most topics kept their owner.
        previous.owner_of(topic).is_some_and(|p| p != view.me)
            && view.topology.owns(&view.me, topic)
            && !self.owner.owns(topic)
    }

    /// Holds a subscribe until `topic`'s hand-off.
    pub(super) fn take_over_item(&mut self, from: usize, topic: &TopicName, item: Item, now: Now) {
        self.take_over(topic, Pending::Item { from, item }, now);
    }

    /// Holds `pending` until `topic`'s hand-off (claiming it if not yet).
    pub(super) fn take_over(&mut self, topic: &TopicName, pending: Pending, now: Now) {
        if !self.taking.contains_key(topic) {
            let from = self
                .cluster
                .as_ref()
                .and_then(|v| v.previous.as_ref())
                .and_then(|p| p.owner_of(topic))
                .map(str::to_string);
            let Some(from) = from else {
                self.release(pending, now);
                return;
            };
            self.start_claim(topic, from, now);
        }
        let full = self.taking.get(topic).is_some_and(|t| t.pending.len() >= TAKING_QUEUE_MAX);
        if full {
            self.fail(pending, OwnerError::OwnerUnreachable, now);
            return;
        }
        if let Some(t) = self.taking.get_mut(topic) {
            t.pending.push(pending);
        }
    }

    fn start_claim(&mut self, topic: &TopicName, from: String, now: Now) {
        let ms = now.unix_ms;
        let taking = Taking {
            from: from.clone(),
            pending: Vec::new(),
            deadline_ms: ms + HANDOFF_WAIT_MS,
            retry_ms: ms + CLAIM_RETRY_MS,
        };
        self.taking.insert(topic.clone(), taking);
        self.send_claim(topic, from);
    }

    fn send_claim(&mut self, topic: &TopicName, from: String) {
        let Some(view) = self.cluster.as_ref() else { return };
        tracing::debug!(topic = topic.as_str(), from = %from, version = view.topology.version(), "claiming");
        let frame = LinkFrame::Claim { topic: topic.clone(), version: view.topology.version(), node: view.me.clone() };
        self.actions.push(Action::Link { node: from, frame });
    }

    /// The previous owner answered a claim of `topic`.
    pub(super) fn handed_off(&mut self, node: &str, topic: &TopicName, state: HandOffState, now: Now) {
        if self.taking.get(topic).is_none_or(|t| t.from != node) {
            return;
        }
        let what = match &state {
            HandOffState::Nothing => "nothing".to_string(),
            HandOffState::Refused => "refused".to_string(),
            HandOffState::State { last_seq, .. } => format!("state through {last_seq}"),
        };
        tracing::info!(topic = topic.as_str(), from = node, "hand-off: {what}");
        match state {
            HandOffState::Refused => {
                if let Some(t) = self.taking.get_mut(topic) {
                    t.retry_ms = now.unix_ms + CLAIM_RETRY_MS;
                }
            }
            HandOffState::Nothing => self.taken(topic, None, now),
            HandOffState::State { epoch, last_seq, history } => {
                self.taken(topic, Some((epoch, last_seq, history)), now)
            }
        }
    }

    /// `topic` is owned here now: continue the handed-off state, or start
    /// afresh (a copy held here moves to a new sequence space); then what
    /// waited goes through.
    fn taken(&mut self, topic: &TopicName, state: Option<(Epoch, u64, Vec<Message>)>, now: Now) {
        let Some(taking) = self.taking.remove(topic) else { return };
        match state {
            Some((epoch, last_seq, history)) => match self.owner.adopt(topic, epoch, last_seq, history, now.at) {
                Ok(adopted) => {
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
                }
                Err(e) => {
                    for pending in taking.pending {
                        self.fail(pending, e, now);
                    }
                    return;
                }
            },
            None => {
                // Held from now on as owned (an empty topic if nothing was
                // here), so that it is not claimed again.
                if let Err(e) = self.owner.ensure(topic, now.at) {
                    for pending in taking.pending {
                        self.fail(pending, e, now);
                    }
                    return;
                }
                let restarted = self.owner.take_fresh(topic, now.at);
                if let Some(epoch) = self.owner.epoch_of(topic).filter(|_| restarted != 0) {
                    for shard in (0..self.shards).filter(|s| restarted & (1 << s) != 0) {
                        self.send(shard, Item::Restarted { topic: topic.clone(), epoch, last_seq: 0 }, now);
                    }
                }
            }
        }
        // Owned here only for a moment: the topology moved on meanwhile.
        if let Some(node) = self.remote_node(topic) {
            self.give_up(topic, node);
        }
        for pending in taking.pending {
            self.release(pending, now);
        }
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

    fn fail(&mut self, pending: Pending, e: OwnerError, now: Now) {
        match pending {
            Pending::Publish { held, .. } => self.answer(held, Err(e), now),
            Pending::Item { from, item: Item::Subscribe { topic, req, .. } } => {
                self.send(from, Item::SubscribeDone { topic, req, result: Err(e) }, now);
            }
            Pending::Item { .. } => {}
        }
    }

    /// Claims and deadlines: a claim not answered is asked again; past the
    /// deadline, what waits fails, unless the previous owner is gone (no
    /// longer a member and its link down), when the topic starts afresh.
    pub fn cluster_tick(&mut self, now: Now) {
        let mut due: Vec<TopicName> = self
            .taking
            .iter()
            .filter(|(_, t)| now.unix_ms >= t.retry_ms || now.unix_ms >= t.deadline_ms)
            .map(|(topic, _)| topic.clone())
            .collect();
        due.sort();
        for topic in due {
            let Some(t) = self.taking.get_mut(&topic) else { continue };
            let from = t.from.clone();
            let member = self.cluster.as_ref().is_some_and(|v| v.topology.members().contains(&from));
            if now.unix_ms >= t.deadline_ms {
                if !member {
                    tracing::warn!(topic = topic.as_str(), from = %from, "no hand-off from a gone owner: the topic starts afresh");
                    self.taken(&topic, None, now);
                    continue;
                }
                let pending = std::mem::take(&mut t.pending);
                t.deadline_ms = now.unix_ms + HANDOFF_WAIT_MS;
                for p in pending {
                    self.fail(p, OwnerError::OwnerUnreachable, now);
                }
            }
            if let Some(t) = self.taking.get_mut(&topic) {
                t.retry_ms = now.unix_ms + CLAIM_RETRY_MS;
            }
            self.send_claim(&topic, from);
        }
    }

    /// The link to `node` failed: topics claimed from it that it can no
    /// longer answer for (it is not a member) start afresh.
    pub(super) fn claims_link_down(&mut self, node: &str, now: Now) {
        let member = self.cluster.as_ref().is_some_and(|v| v.topology.members().iter().any(|m| m == node));
        if member {
            return; // asked again at the next retry
        }
        let mut gone: Vec<TopicName> =
            self.taking.iter().filter(|(_, t)| t.from == node).map(|(t, _)| t.clone()).collect();
        gone.sort();
        for topic in gone {
            tracing::warn!(topic = topic.as_str(), from = node, "previous owner gone: the topic starts afresh");
            self.taken(&topic, None, now);
        }
    }

    /// A link session of this node got `node`'s claim of `topic` at
    /// topology `version`: the topic's owner shard answers on `out`.
    pub fn claim(&mut self, topic: TopicName, version: u64, node: String, out: Rc<Outbound>, now: Now) {
        let req = self.next_id();
        self.claims.insert(req, out);
        let owner = topic.owner_shard(self.shards);
        self.send(owner, Item::Claim { topic, version, node, req }, now);
    }

    /// The owner shard's answer to a claim: written to the claiming link.
    pub(super) fn claim_answered(&mut self, req: u64, topic: TopicName, state: HandOffState) {
        if let Some(out) = self.claims.remove(&req) {
            let frame = LinkFrame::HandOff { topic, state };
            out.offer_control(ws::encode_data(PayloadKind::Binary, &crate::link::encode(&frame)));
        }
    }

    /// `node` claims `topic` at topology `version` (its link session on
    /// this node asked, request `req` of shard `from`).
    pub(super) fn answer_claim(
        &mut self,
        from: usize,
        topic: TopicName,
        version: u64,
        node: String,
        req: u64,
        now: Now,
    ) {
        // Still taking it over from its own previous owner: the state is on
        // its way here; once it arrives it is handed on (see `taken`).
        if self.taking.contains_key(&topic) {
            tracing::debug!(topic = topic.as_str(), version, "claim of a topic being taken over: ask again");
            self.send(from, Item::HandOffAnswer { req, topic, state: HandOffState::Refused }, now);
            return;
        }
        let state = if let Some(_node) = self.handing.remove(&topic) {
            self.owner.handed_state(&topic)
        } else if self.owner.owns(&topic) {
            let mine_now = self.cluster.as_ref().is_some_and(|v| v.topology.owns(&v.me, &topic));
            let newer = self.cluster.as_ref().is_some_and(|v| version > v.topology.version());
            if mine_now && !newer {
                tracing::debug!(topic = topic.as_str(), version, "claim refused");
                self.send(from, Item::HandOffAnswer { req, topic, state: HandOffState::Refused }, now);
                return;
            }
            // The claimer's topology is newer than this node's: give the
            // topic away now, forward to the claimer until this node's view
            // catches up.
            self.given.insert(topic.clone(), node.clone());
            self.give_up(&topic, node);
            self.handing.remove(&topic);
            self.owner.handed_state(&topic)
        } else {
            None
        };
        let state = match state {
            Some((epoch, last_seq, history)) => HandOffState::State { epoch, last_seq, history },
            None => HandOffState::Nothing,
        };
        tracing::debug!(topic = topic.as_str(), version, "claim answered");
        self.send(from, Item::HandOffAnswer { req, topic, state }, now);
    }
}
