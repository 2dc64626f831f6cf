//! Topics owned by another node of the cluster, the broker's side.
//!
//! Every node serves every topic. A topic's owner node (the member the
//! cluster's Maglev table gives it, [`crate::cluster::Topology`]) sequences
//! it; on every other node the topic's owner *shard* keeps a copy (a
//! mirror) instead of sequencing:
//!
//! - a publish is forwarded to the owner node over the node link
//!   ([`Action::Link`], [`LinkFrame::Publish`]), and its answer
//!   ([`LinkFrame::PublishDone`]) goes to the publisher as a local owner's
//!   would. The link is one FIFO per shard and node, so a publisher's
//!   messages keep their order.
//! - while any shard of this node subscribes, the mirror follows the topic
//!   on its owner ([`LinkFrame::Follow`]) once for the whole node, keeps
//!   the owner's messages in its history under the owner's numbers and
//!   epoch, and hands them to the subscribing shards as a local owner does
//!   (`Item::Deliver`). Subscribes wait until the follow is live and the
//!   replay it asked for has arrived, then are granted from the mirror's
//!   history: resumes, gaps and epochs mean the same on every node.
//! - when the link to the owner fails ([`Broker::link_down`]), forwarded
//!   publishes not yet answered fail with `owner_unreachable` (the
//!   publisher may retry: at least once), and each mirror follows again
//!   after the last number it has, so its subscribers get what they missed
//!   from the owner's history, or a gap notice for what the owner no longer
//!   holds.
//!
//! Consumer groups, requests, schedules and group deletion work through any
//! node (`remote_groups`, `requests`, `remote_asks`); a durable topic's
//! admin API is served on the owner node only for now: asked elsewhere it
//! is refused with `owned_elsewhere`.

use super::*;
use crate::cluster::{Topology, Views};
use crate::link::{LinkFrame, LinkOptions};

/// A topic of another node followed by this shard.
#[derive(Debug)]
pub(super) struct Mirror {
    /// The owner node.
    pub(super) node: String,
    /// Subscribes (with their asking shard) waiting for the follow.
    pub(super) queued: Vec<(usize, Item)>,
    /// The owner's last number when the follow went live; `None` until
    /// it answers. Subscribes wait until the mirror has reached it.
    until: Option<u64>,
    /// Where the follow asked to resume.
    asked: Option<ResumeFrom>,
}

impl Mirror {
    /// A copy that follows `node` from `asked` (its follow just sent).
    pub(super) fn following(node: String, asked: Option<ResumeFrom>) -> Mirror {
        Mirror { node, queued: Vec::new(), until: None, asked }
    }
}

impl Broker {
    /// Makes this broker a member `me` of a cluster of `topology`'s members:
    /// topics another member owns are forwarded and followed. With
    /// `dynamic` (membership from etcd) the set may change later
    /// ([`Broker::set_topology`]), and this node's first set is taken as a
    /// change from the same set without it (a node joining claims its
    /// topics from their owners so far).
    pub fn set_cluster(&mut self, me: String, topology: Topology, dynamic: bool) {
        if !dynamic && topology.members().len() <= 1 {
            self.cluster = None;
            return;
        }
        self.cluster = Some(Views::new(me, topology, dynamic));
    }

    /// The cluster's topology this broker acts on, if in a cluster.
    pub fn topology(&self) -> Option<&Topology> {
        self.cluster.as_ref().map(Views::current)
    }

    /// The node that owns `topic`, when it is not this one.
    pub(super) fn remote_node(&self, topic: &TopicName) -> Option<String> {
        if !self.given.is_empty() {
            if let Some((node, _)) = self.given.get(topic) {
                return Some(node.clone());
            }
        }
        let view = self.cluster.as_ref()?;
        let owner = view.current().owner_of(topic)?;
        (owner != view.me()).then(|| owner.to_string())
    }

    /// Whether `topic`'s copy is live (its follow answered and its replay
    /// arrived).
    pub(super) fn mirror_live(&self, topic: &TopicName) -> bool {
        let Some(m) = self.mirrors.get(topic) else { return false };
        m.until.is_some_and(|until| self.owner.last_seq(topic).is_some_and(|last| last >= until))
    }

    /// Sends a publish to its topic's owner node `node` (another one);
    /// `held` gets its answer.
    pub(super) fn forward(
        &mut self,
        node: String,
        topic: TopicName,
        kind: PayloadKind,
        payload: Bytes,
        options: PublishOptions,
        held: Held,
    ) {
        let id = self.next_id();
        self.forwarded.insert(id, (node.clone(), held));
        metrics::add(&self.metrics.messages_forwarded, 1);
        let frame =
            LinkFrame::Publish { id, topic, ack: options.ack, kind, payload, options: LinkOptions::of(&options) };
        self.actions.push(Action::Link { node, frame });
    }

    /// A subscribe from shard `from` for a topic of `node` whose copy is
    /// not live: queued, and the follow asked for if it was not.
    pub(super) fn mirror_subscribe(&mut self, node: String, from: usize, item: Item) {
        let Item::Subscribe { topic, .. } = &item else { return };
        let topic = topic.clone();
        if let Some(m) = self.mirrors.get_mut(&topic) {
            m.queued.push((from, item));
            return;
        }
        // Resume after what this node's copy has, else from the start of
        // the owner's retained history: the copy serves later resumes here
        // as the owner would (a copy that started live would answer a
        // resume from before it with a gap the owner does not have).
        let asked = match self.owner.mirror_position(&topic) {
            Some((epoch, last)) => Some(ResumeFrom { after_seq: last, epoch: Some(epoch), since_ms: None }),
            None => Some(ResumeFrom { after_seq: 0, epoch: None, since_ms: None }),
        };
        self.mirrors
            .insert(topic.clone(), Mirror { node: node.clone(), queued: vec![(from, item)], until: None, asked });
        self.send_follow(node, topic, asked);
    }

    /// Shard `from` left `topic`: its queued subscribes go, and the follow
    /// ends when no shard of this node subscribes any more.
    pub(super) fn mirror_unsubscribed(&mut self, from: usize, topic: &TopicName) {
        let subscribed = self.owner.subscriber_shards(topic) != 0;
        let Some(m) = self.mirrors.get_mut(topic) else { return };
        m.queued.retain(|(shard, _)| *shard != from);
        if !subscribed && m.queued.is_empty() {
            let node = m.node.clone();
            self.mirrors.remove(topic);
            self.actions.push(Action::Link { node, frame: LinkFrame::Unfollow { topic: topic.clone() } });
        }
    }

    /// A frame from owner node `node` over the link.
    pub fn link_frame(&mut self, node: &str, frame: LinkFrame, now: Now) {
        match frame {
            LinkFrame::PublishDone { id, result } => {
                if let Some((_, held)) = self.forwarded.remove(&id) {
                    self.answer(held, result, now);
                }
            }
            LinkFrame::Answered { id, answer } => self.remote_answered(node, id, answer, now),
            LinkFrame::Schedules { topic, list } => self.schedules_ahead(node, topic, list),
            LinkFrame::Followed { topic, result } => {
                // Every follow gets one answer, in order, even one unfollowed
                // since: only the last one's (and the messages after it)
                // counts.
                let key = (node.to_string(), topic.clone());
                let unanswered = self.follows_out.get_mut(&key).map(|n| {
                    *n = n.saturating_sub(1);
                    *n
                });
                if unanswered.unwrap_or(0) == 0 {
                    self.follows_out.remove(&key);
                } else {
                    return;
                }
                let Some(m) = self.mirrors.get(&topic).filter(|m| m.node == node && m.until.is_none()) else {
                    return;
                };
                let started = result.and_then(|(epoch, last)| {
                    let restarted = self.owner.mirror_start(&topic, epoch, last, m.asked, now.at)?;
                    Ok((epoch, last, restarted))
                });
                match started {
                    Ok((epoch, last, restarted)) => {
                        // The owner's sequence space changed since this
                        // copy's: follow again from its start, so that what
                        // it holds of the new space comes too.
                        let changed = m.asked.is_some_and(|a| a.epoch.is_some_and(|e| e != epoch));
                        if let Some(m) = self.mirrors.get_mut(&topic) {
                            if changed && last > 0 {
                                m.asked = Some(ResumeFrom { after_seq: 0, epoch: Some(epoch), since_ms: None });
                                let (node, asked) = (m.node.clone(), m.asked);
                                self.send_follow(node, topic.clone(), asked);
                            } else {
                                m.until = Some(last);
                            }
                        }
                        // Live subscribers of the old sequence space learn of
                        // the new one before its first message.
                        let position = self.owner.last_seq(&topic).unwrap_or(last);
                        for shard in (0..self.shards).filter(|s| restarted & (1 << s) != 0) {
                            let item = Item::Restarted { topic: topic.clone(), epoch, last_seq: position };
                            self.send(shard, item, now);
                        }
                        self.mirror_release(&topic, now);
                    }
                    Err(e) => {
                        let Some(m) = self.mirrors.remove(&topic) else { return };
                        for (from, item) in m.queued {
                            if let Item::Subscribe { req, .. } = item {
                                self.send(from, Item::SubscribeDone { topic: topic.clone(), req, result: Err(e) }, now);
                            }
                        }
                        if self.owner.subscriber_shards(&topic) != 0 {
                            // Live subscribers of an earlier follow: keep trying.
                            self.mirrors.insert(topic.clone(), Mirror { until: None, queued: Vec::new(), ..m });
                            self.follow_again(&topic);
                        } else {
                            self.actions.push(Action::Link { node: m.node, frame: LinkFrame::Unfollow { topic } });
                        }
                    }
                }
            }
            LinkFrame::Message { topic, message } => {
                if !self.mirrors.get(&topic).is_some_and(|m| m.node == node && m.until.is_some()) {
                    return;
                }
                if let Some(accepted) = self.owner.mirror_accept(&topic, message) {
                    let crate::owner::MirrorAccepted { epoch, subscriber_shards: shards, skipped, message } = accepted;
                    metrics::add(&self.metrics.messages_followed, 1);
                    // A jump the owner did not announce is told all the same.
                    if let Some(gap) = skipped {
                        for shard in (0..self.shards).filter(|s| shards & (1 << s) != 0) {
                            self.send(shard, Item::Gap { topic: topic.clone(), epoch, gap }, now);
                        }
                    }
                    for shard in (0..self.shards).filter(|s| shards & (1 << s) != 0) {
                        self.send(shard, Item::Deliver { topic: topic.clone(), epoch, message: message.clone() }, now);
                    }
                }
                self.mirror_release(&topic, now);
            }
            LinkFrame::Gap { topic, to_seq, .. } => {
                if self.mirrors.get(&topic).is_some_and(|m| m.node == node && m.until.is_some()) {
                    if let Some((epoch, gap, shards)) = self.owner.mirror_gap(&topic, to_seq) {
                        for shard in (0..self.shards).filter(|s| shards & (1 << s) != 0) {
                            self.send(shard, Item::Gap { topic: topic.clone(), epoch, gap }, now);
                        }
                    }
                    self.mirror_release(&topic, now);
                }
            }
            LinkFrame::HandOff { topic, state } => self.handed_off(node, &topic, state, now),
            LinkFrame::Group { member, op } => self.remote_group_frame(node, member, op, now),
            LinkFrame::Restart { topic } => {
                if self.mirrors.get(&topic).is_some_and(|m| m.node == node) {
                    self.follow_again(&topic);
                }
            }
            // Frames only an owner receives.
            LinkFrame::Publish { .. }
            | LinkFrame::Follow { .. }
            | LinkFrame::Unfollow { .. }
            | LinkFrame::Claim { .. }
            | LinkFrame::Offer { .. }
            | LinkFrame::Ask { .. } => {}
            // The answer to a request this node forwarded: to its requester.
            LinkFrame::Reply { to, answer } => {
                if to.shard < self.shards {
                    self.send(to.shard, Item::Reply { to, answer, back: 0 }, now);
                }
            }
        }
    }

    /// The link to `node` failed: publishes awaiting its answer fail with
    /// `owner_unreachable`, and every copy of its topics follows again
    /// after what it has (the shell reconnects and sends it).
    pub fn link_down(&mut self, node: &str, now: Now) {
        // In id order (publish order), and below in name order: the same
        // on every run.
        let mut failed: Vec<u64> = self.forwarded.iter().filter(|(_, (n, _))| n == node).map(|(id, _)| *id).collect();
        failed.sort_unstable();
        for id in failed {
            if let Some((_, held)) = self.forwarded.remove(&id) {
                self.answer(held, Err(OwnerError::OwnerUnreachable), now);
            }
        }
        let mut topics: Vec<TopicName> =
            self.mirrors.iter().filter(|(_, m)| m.node == node).map(|(t, _)| t.clone()).collect();
        topics.sort();
        // A new link: no answer comes for what the old one carried.
        self.follows_out.retain(|(n, _), _| n != node);
        for topic in topics {
            self.follow_again(&topic);
        }
        self.claims_link_down(node, now);
        self.remote_groups_link_down(node, now);
        self.remote_asks_link_down(node, now);
        // Schedules sent ahead of a state that will not come on this link.
        self.schedules_arriving.retain(|(n, _), _| n != node);
    }

    /// Asks the owner again for `topic`, after what the copy has.
    pub(super) fn follow_again(&mut self, topic: &TopicName) {
        let position = self.owner.mirror_position(topic);
        let Some(m) = self.mirrors.get_mut(topic) else { return };
        m.until = None;
        if let Some((epoch, last)) = position {
            m.asked = Some(ResumeFrom { after_seq: last, epoch: Some(epoch), since_ms: None });
        }
        let (node, asked) = (m.node.clone(), m.asked);
        self.send_follow(node, topic.clone(), asked);
    }

    /// Sends a follow of `topic` to `node`, counted until answered.
    pub(super) fn send_follow(&mut self, node: String, topic: TopicName, from: Option<ResumeFrom>) {
        *self.follows_out.entry((node.clone(), topic.clone())).or_insert(0) += 1;
        self.actions.push(Action::Link { node, frame: LinkFrame::Follow { topic, from } });
    }

    /// Grants the subscribes queued on `topic` once its copy is live.
    fn mirror_release(&mut self, topic: &TopicName, now: Now) {
        if !self.mirror_live(topic) {
            return;
        }
        let queued = self.mirrors.get_mut(topic).map(|m| std::mem::take(&mut m.queued)).unwrap_or_default();
        for (from, item) in queued {
            self.handle(from, item, now);
        }
    }
}
