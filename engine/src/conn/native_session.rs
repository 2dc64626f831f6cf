//! The native protocol's adapter: JSON or binary requests, one reply each.

use super::*;

pub(super) async fn native_message(
    session: &Session,
    subs: &mut HashMap<TopicName, u64>,
    groups: &mut HashMap<(TopicName, String), u64>,
    kind: PayloadKind,
    payload: Bytes,
) -> bool {
    let parsed = match kind {
        PayloadKind::Text => native::parse_text(&payload),
        PayloadKind::Binary => native::parse_binary(&payload),
    };
    let out = &session.out;
    let shard = &session.shard;
    let request = match parsed {
        Ok(r) => r,
        Err(bad) => {
            out.offer_control(native::reply_error(bad.id, bad.code, &bad.message));
            return true;
        }
    };
    let topic_of = |id: u64, name: &str| {
        TopicName::new(name).map_err(|e| native::reply_error(Some(id), "invalid_topic", &e.to_string()))
    };
    let reply = match request {
        Request::Ping { id } => native::reply_ok(id, serde_json::json!({ "pong": true })),
        Request::Publish { id, topic, kind, payload, options } => match topic_of(id, &topic) {
            Err(reply) => reply,
            Ok(topic) => {
                let done = PublishReply::Native { out: out.clone(), id };
                shard.publish_pipelined(topic, kind, payload, options, done).await;
                return true; // the reply is queued when the owner answers
            }
        },
        Request::PublishBatch { id, topic, payloads } => match topic_of(id, &topic) {
            Err(reply) => reply,
            Ok(topic) => {
                // One reply when the last is answered.
                let batch = BatchReply::new(out.clone(), id, payloads.len());
                shard.publish_batch(topic, payloads, batch).await;
                return true;
            }
        },
        Request::Subscribe { id, topic, from_seq, epoch, since_ms } => match topic_of(id, &topic) {
            Err(reply) => reply,
            Ok(topic) if subs.contains_key(&topic) => {
                native::reply_error(Some(id), "already_subscribed", "already subscribed to this topic")
            }
            Ok(_) if subs.len() >= shard.config.subscriptions_per_connection_max() => {
                let why =
                    format!("at most {} subscriptions per connection", shard.config.subscriptions_per_connection_max());
                native::reply_error(Some(id), "too_many_subscriptions", &why)
            }
            Ok(topic) => {
                let resume = match (from_seq, since_ms) {
                    (_, Some(ms)) => Some(ResumeFrom { after_seq: 0, epoch: None, since_ms: Some(ms) }),
                    (Some(after_seq), None) => Some(ResumeFrom { after_seq, epoch, since_ms: None }),
                    (None, None) => None,
                };
                let request = SubscribeRequest {
                    topic: topic.clone(),
                    out: out.clone(),
                    client: session.client,
                    format: Format::Native,
                    from: resume,
                    reply_id: Some(id),
                };
                match shard.subscribe(request).await {
                    Ok(granted) => {
                        subs.insert(topic, granted.sub_id);
                        return true; // the ok reply was queued before any message
                    }
                    Err(e) => native::reply_error(Some(id), e.code(), &e.to_string()),
                }
            }
        },
        Request::Join { id, topic, group, prefetch, settings, dead_letter } => match topic_of(id, &topic) {
            Err(reply) => reply,
            Ok(topic) => {
                let key = (topic.clone(), group.clone());
                let joined = groups.get(&key).is_some_and(|sub| shard.is_member(*sub));
                let dead_letter = dead_letter.unwrap_or_else(|| format!("{}.{group}.dlq", topic.as_str()));
                match TopicName::new(&dead_letter) {
                    _ if joined => native::reply_error(Some(id), "already_subscribed", "already in this group"),
                    _ if subs.len() + groups.len() >= shard.config.subscriptions_per_connection_max() => {
                        let max = shard.config.subscriptions_per_connection_max();
                        native::reply_error(
                            Some(id),
                            "too_many_subscriptions",
                            &format!("at most {max} per connection"),
                        )
                    }
                    Err(e) => native::reply_error(Some(id), "invalid_topic", &format!("dead_letter: {e}")),
                    Ok(dead_letter) => {
                        let request = JoinRequest {
                            topic,
                            group: group.as_str().into(),
                            out: out.clone(),
                            prefetch,
                            settings,
                            dead_letter,
                            reply_id: id,
                        };
                        groups.insert(key, shard.join_group(request));
                        return true; // the owner's answer queues the reply
                    }
                }
            }
        },
        Request::Leave { id, topic, group } => match topic_of(id, &topic) {
            Err(reply) => reply,
            Ok(topic) => match groups.remove(&(topic, group)) {
                Some(sub) if shard.is_member(sub) => {
                    shard.leave_group(sub);
                    native::reply_ok(id, serde_json::json!({}))
                }
                _ => native::reply_error(Some(id), "not_subscribed", "not in this group"),
            },
        },
        Request::Settle { id, topic, group, settle } => {
            let member = TopicName::new(&topic).ok().and_then(|t| groups.get(&(t, group)).copied());
            let settled = member.is_some_and(|sub| shard.settle(sub, settle));
            match (id, settled) {
                (None, _) => return true,
                (Some(id), true) => native::reply_ok(id, serde_json::json!({})),
                (Some(id), false) => native::reply_error(Some(id), "not_subscribed", "not in this group"),
            }
        }
        Request::Ask { id, topic, payload, key, meta, timeout_ms } => match topic_of(id, &topic) {
            Err(reply) => reply,
            Ok(topic) => {
                let kind = PayloadKind::Text;
                let out = out.clone();
                shard.request(RequestSpec { topic, kind, payload, key, meta, timeout_ms, out, id }).await;
                return true; // answered with the responder's reply, or an error
            }
        },
        Request::Schedule { id, topic, payload, key, meta, deliver_at, delay_ms, schedule_id, if_absent } => {
            match topic_of(id, &topic) {
                Err(reply) => reply,
                Ok(topic) => {
                    let now_ms = proto::message::unix_time_ms();
                    let due_ms = deliver_at.unwrap_or_else(|| now_ms.saturating_add(delay_ms.unwrap_or(0)));
                    if due_ms > now_ms.saturating_add(proto::schedule::SCHEDULE_AHEAD_MS_MAX) {
                        native::reply_error(Some(id), "bad_request", "\"deliver_at\" is more than a year ahead")
                    } else {
                        let id_given = schedule_id.unwrap_or_else(|| shard.schedule_id());
                        let kind = PayloadKind::Text;
                        let scheduled = proto::schedule::Scheduled { id: id_given, due_ms, kind, payload, key, meta };
                        shard.ask_schedules(topic, ScheduleAsk::Add { scheduled, if_absent }, out.clone(), id).await;
                        return true; // answered by the owner
                    }
                }
            }
        }
        Request::CancelSchedule { id, topic, schedule_id } => match topic_of(id, &topic) {
            Err(reply) => reply,
            Ok(topic) => {
                shard.ask_schedules(topic, ScheduleAsk::Cancel { id: schedule_id }, out.clone(), id).await;
                return true;
            }
        },
        Request::DeleteGroup { id, topic, group } => match topic_of(id, &topic) {
            Err(reply) => reply,
            Ok(topic) => {
                shard.delete_group(topic, &group, out.clone(), id);
                return true; // answered by the owner
            }
        },
        Request::ListSchedules { id, topic } => match topic_of(id, &topic) {
            Err(reply) => reply,
            Ok(topic) => {
                shard.ask_schedules(topic, ScheduleAsk::List, out.clone(), id).await;
                return true;
            }
        },
        Request::Reply { id, to, answer, ack } => {
            if let Some((topic, group, seq)) = ack {
                let member = TopicName::new(&topic).ok().and_then(|t| groups.get(&(t, group)).copied());
                if let Some(sub) = member {
                    shard.settle(sub, proto::broker::Settle::Ack { seq });
                }
            }
            if !shard.reply(to, answer, out.clone(), id) {
                if let Some(id) = id {
                    out.offer_control(native::reply_error(Some(id), "bad_request", "\"to\" names no requester"));
                }
            }
            return true; // answered once the requester's shard says
        }
        Request::Unsubscribe { id, topic } => match topic_of(id, &topic) {
            Err(reply) => reply,
            Ok(topic) => match subs.remove(&topic) {
                Some(sub_id) => {
                    shard.unsubscribe(&topic, sub_id);
                    native::reply_ok(id, serde_json::json!({}))
                }
                None => native::reply_error(Some(id), "not_subscribed", "not subscribed to this topic"),
            },
        },
    };
    out.offer_control(reply);
    true
}
