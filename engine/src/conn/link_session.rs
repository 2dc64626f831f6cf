//! The node link's owner side (`GET /v1/link`): another node of the
//! cluster forwards publishes of topics this node owns and follows those
//! topics for its own subscribers. Each WebSocket binary message is one
//! link frame (`proto::link`). A follow is a subscription like any other
//! (framed once per message for every following node, `Format::Link`),
//! so resumes, durable catch-up and the slow-consumer bound (disconnect at
//! `LINK_SEND_QUEUE_BYTES_MAX`; the follower reconnects and resumes) are
//! the subscribers'. A follow is granted in a task of its own: the reader
//! never waits for a grant, which may wait for a hand-off that a claim
//! behind it on this same link would answer.

use super::*;
use proto::link::{self, LinkFrame};

/// The address follows are charged to in the owner's topic table (not the
/// peer node's, which would make its share of the table a limit on how
/// many topics a whole node may follow).
const LINK_CLIENT: std::net::IpAddr = std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);

/// A link's follows: by topic, the generation of the latest follow and
/// its subscription once granted.
#[derive(Debug, Default)]
pub(crate) struct Follows {
    by_topic: RefCell<HashMap<TopicName, (u64, Option<u64>)>>,
    next: Cell<u64>,
    /// The link closed: grants that come later are undone at once.
    closed: Cell<bool>,
    /// Consumer group members on the peer node, joined here for it: the
    /// peer's id for each -> the member's id on this shard.
    members: RefCell<HashMap<u64, u64>>,
}

impl Follows {
    /// Unsubscribes every follow (the link closed).
    pub(crate) fn close(&self, shard: &Shard) {
        self.closed.set(true);
        // Its group members leave: what they held goes to the others.
        for (_, sub) in self.members.borrow_mut().drain() {
            shard.leave_group(sub);
        }
        for (topic, (_, sub)) in self.by_topic.borrow_mut().drain() {
            if let Some(sub) = sub {
                shard.unsubscribe(&topic, sub);
            }
        }
    }

    /// Ends `topic`'s follow, granted or not.
    fn end(&self, shard: &Shard, topic: &TopicName) {
        if let Some((_, Some(sub))) = self.by_topic.borrow_mut().remove(topic) {
            shard.unsubscribe(topic, sub);
        }
    }
}

pub(super) async fn link_message(session: &Session, follows: &Rc<Follows>, kind: PayloadKind, payload: Bytes) -> bool {
    let frame = match kind {
        PayloadKind::Binary => link::decode(&payload, Instant::now()),
        PayloadKind::Text => Err(link::LinkError("text frame on a node link")),
    };
    let frame = match frame {
        Ok(frame) => frame,
        Err(e) => {
            metrics::add(&session.shard.metrics.protocol_errors, 1);
            session.out.close(close_code::INVALID_PAYLOAD, &e.to_string());
            return true;
        }
    };
    let shard = &session.shard;
    match frame {
        LinkFrame::Publish { id, topic, ack, kind, payload, options } => {
            let reply = PublishReply::Link { out: session.out.clone(), id };
            let mut options = options.into_options(ack);
            // A request: its answer comes back to this link.
            shard.relay_reply_to(&mut options, session.out.clone());
            shard.publish_pipelined(topic, kind, payload, options, reply).await;
        }
        LinkFrame::Follow { topic, from } => {
            // Followed again: from where it asks now.
            follows.end(shard, &topic);
            let generation = follows.next.get() + 1;
            follows.next.set(generation);
            follows.by_topic.borrow_mut().insert(topic.clone(), (generation, None));
            let request = SubscribeRequest {
                topic: topic.clone(),
                out: session.out.clone(),
                client: LINK_CLIENT,
                format: Format::Link,
                from,
                reply_id: Some(0),
            };
            let (shard, follows, out) = (shard.clone(), follows.clone(), session.out.clone());
            glommio::spawn_local(async move {
                match shard.subscribe(request).await {
                    Ok(granted) => {
                        let mut by_topic = follows.by_topic.borrow_mut();
                        match by_topic.get_mut(&topic) {
                            Some((g, sub)) if *g == generation && !follows.closed.get() => *sub = Some(granted.sub_id),
                            // Unfollowed, followed again or closed meanwhile.
                            _ => {
                                drop(by_topic);
                                shard.unsubscribe(&topic, granted.sub_id);
                            }
                        }
                    }
                    Err(e) => {
                        let mut by_topic = follows.by_topic.borrow_mut();
                        if by_topic.get(&topic).is_some_and(|(g, _)| *g == generation) {
                            by_topic.remove(&topic);
                        }
                        drop(by_topic);
                        let refused = LinkFrame::Followed { topic, result: Err(e) };
                        out.offer_control(ws::encode_data(PayloadKind::Binary, &link::encode(&refused)));
                    }
                }
            })
            .detach();
        }
        LinkFrame::Claim { topic, version, node, at } => {
            shard.claim(topic, version, node, at, session.out.clone());
        }
        LinkFrame::Unfollow { topic } => follows.end(shard, &topic),
        LinkFrame::Offer { topic } => shard.offer(topic),
        LinkFrame::Ask { id, topic, ask } => shard.ask_from_link(topic, ask, session.out.clone(), id),
        LinkFrame::Group { member, op } => group_op(session, follows, member, op),
        // A responder on the peer node answers a request made here.
        LinkFrame::Reply { to, answer } => {
            shard.reply(to, answer, session.out.clone(), None);
        }
        LinkFrame::PublishDone { .. }
        | LinkFrame::Followed { .. }
        | LinkFrame::Message { .. }
        | LinkFrame::Gap { .. }
        | LinkFrame::Restart { .. }
        | LinkFrame::HandOff { .. }
        | LinkFrame::Answered { .. }
        | LinkFrame::Schedules { .. } => {
            metrics::add(&shard.metrics.protocol_errors, 1);
            session.out.close(close_code::POLICY_VIOLATION, "an owner's frame sent to the owner");
        }
    }
    true
}

/// A group frame from the peer node, for its member `member`: joined,
/// left or settled here as a member of this connection (its answer and
/// deliveries go back as group frames, `Broker::join_group_link`).
fn group_op(session: &Session, follows: &Follows, member: u64, op: link::GroupLink) {
    let shard = &session.shard;
    match op {
        link::GroupLink::Join { topic, group, prefetch, settings, dead_letter } => {
            if follows.members.borrow().contains_key(&member) {
                return; // a peer names each member once
            }
            let request = proto::broker::JoinRequest {
                topic,
                group: group.into(),
                out: session.out.clone(),
                prefetch,
                settings,
                dead_letter,
                reply_id: member,
            };
            let sub = shard.join_group_link(request, member);
            tracing::debug!(member, sub, "link group member joins");
            follows.members.borrow_mut().insert(member, sub);
        }
        link::GroupLink::Leave => {
            tracing::debug!(member, "link group member leaves");
            if let Some(sub) = follows.members.borrow_mut().remove(&member) {
                shard.leave_group(sub);
            }
        }
        link::GroupLink::Settle(settle) => {
            if let Some(&sub) = follows.members.borrow().get(&member) {
                shard.settle(sub, settle);
            }
        }
        // Frames only a member's node receives.
        link::GroupLink::Joined(_) | link::GroupLink::Deliver { .. } | link::GroupLink::Lost => {
            metrics::add(&shard.metrics.protocol_errors, 1);
        }
    }
}
