//! The raw topic socket's adapter: every data frame is a publish.

use super::*;

pub(super) async fn raw_message(
    session: &Session,
    topic: &TopicName,
    publish: bool,
    kind: PayloadKind,
    payload: Bytes,
) -> bool {
    if !publish {
        session.out.close(close_code::POLICY_VIOLATION, "this socket has role=sub: it cannot publish");
        return true;
    }
    let done = PublishReply::CloseOnError(session.out.clone());
    session.shard.publish_pipelined(topic.clone(), kind, payload, PublishOptions::default(), done).await;
    true
}
