//! The original RayFlux `/subscribe` adapter: the first frame names the
//! topic; later frames are ignored.

use super::*;

/// The original RayFlux subscribe request (first frame).
#[derive(Deserialize)]
pub(super) struct LegacySubscribe {
    #[allow(dead_code)] // part of the original API; not used for routing
    subscriber_id: serde_json::Value,
    topic: String,
}

pub(super) async fn legacy_message(session: &Session, sub: &mut Option<(TopicName, u64)>, payload: Bytes) -> bool {
    if sub.is_some() {
        return true; // the original server ignored later frames too
    }
    let request: LegacySubscribe = match serde_json::from_slice(&payload) {
        Ok(r) => r,
        Err(_) => {
            session
                .out
                .close(close_code::POLICY_VIOLATION, "first frame must be {\"subscriber_id\": ..., \"topic\": ...}");
            return true;
        }
    };
    let topic = match TopicName::new(&request.topic) {
        Ok(t) => t,
        Err(e) => {
            session.out.close(close_code::POLICY_VIOLATION, &format!("invalid topic: {e}"));
            return true;
        }
    };
    let request = SubscribeRequest {
        topic: topic.clone(),
        out: session.out.clone(),
        client: session.client,
        format: Format::Legacy,
        from: None,
        reply_id: None,
    };
    match session.shard.subscribe(request).await {
        Ok(granted) => *sub = Some((topic, granted.sub_id)),
        Err(e) => session.out.close(close_code::TRY_AGAIN_LATER, &e.to_string()),
    }
    true
}
