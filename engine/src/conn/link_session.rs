//! The node link's owner side (`GET /v1/link`): another node of the
//! cluster forwards publishes of topics this node owns and follows those
//! topics for its own subscribers. Each WebSocket binary message is one
//! link frame (`proto::link`). A follow is a subscription like any other
//! (framed once per message for every following node, `Format::Link`),
//! so resumes, durable catch-up and the slow-consumer bound (disconnect at
//! `LINK_SEND_QUEUE_BYTES_MAX`; the follower reconnects and resumes) are
//! the subscribers'.

use super::*;
use proto::link::{self, LinkFrame};

/// The address follows are charged to in the owner's topic table (not the
/// peer node's, which would make its share of the table a limit on how
/// many topics a whole node may follow).
const LINK_CLIENT: std::net::IpAddr = std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);

pub(super) async fn link_message(
    session: &Session,
    follows: &mut HashMap<TopicName, u64>,
    kind: PayloadKind,
    payload: Bytes,
) -> bool {
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
            shard.publish_pipelined(topic, kind, payload, options.into_options(ack), reply).await;
        }
        LinkFrame::Follow { topic, from } => {
            if let Some(sub) = follows.remove(&topic) {
                shard.unsubscribe(&topic, sub); // followed again: from where it asks now
            }
            let request = SubscribeRequest {
                topic: topic.clone(),
                out: session.out.clone(),
                client: LINK_CLIENT,
                format: Format::Link,
                from,
                reply_id: Some(0),
            };
            match shard.subscribe(request).await {
                Ok(granted) => {
                    follows.insert(topic, granted.sub_id);
                }
                Err(e) => {
                    let refused = LinkFrame::Followed { topic, result: Err(e) };
                    session.out.offer_control(ws::encode_data(PayloadKind::Binary, &link::encode(&refused)));
                }
            }
        }
        LinkFrame::Unfollow { topic } => {
            if let Some(sub) = follows.remove(&topic) {
                shard.unsubscribe(&topic, sub);
            }
        }
        LinkFrame::PublishDone { .. }
        | LinkFrame::Followed { .. }
        | LinkFrame::Message { .. }
        | LinkFrame::Gap { .. } => {
            metrics::add(&shard.metrics.protocol_errors, 1);
            session.out.close(close_code::POLICY_VIOLATION, "an owner's frame sent to the owner");
        }
    }
    true
}
