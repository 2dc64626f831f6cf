//! The durable-topic admin API: `PUT /v1/topics/{topic}` declares,
//! `DELETE` removes the log, `GET /v1/topics/{topic}/messages` reads it by
//! sequence, time or key (see docs/PROTOCOL.md). Each request goes to the
//! topic's owner shard, which answers from its log in its control queue.

use base64::Engine;
use proto::admin::{SnapshotList, SnapshotMade};
use proto::durable::{DurableSpec, ReadFrom, READ_MESSAGES_MAX};

use super::*;
use crate::durability::{DurableAnswer, DurableAsk};

/// The operation a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// `PUT`.
    Declare,
    /// `DELETE`.
    Delete,
    /// `GET .../messages`.
    Read,
}

/// Default page size of a read.
const READ_PAGE_DEFAULT: usize = 100;

/// Answers one durable-topic request.
pub(crate) async fn respond(
    shard: &Rc<Shard>,
    op: Op,
    topic: TopicName,
    query: &str,
    body: &[u8],
    keep_alive: bool,
) -> Vec<u8> {
    let ask = match op {
        Op::Declare => {
            let spec: DurableSpec = if body.iter().all(u8::is_ascii_whitespace) {
                DurableSpec::default()
            } else {
                match serde_json::from_slice(body) {
                    Ok(spec) => spec,
                    Err(e) => {
                        let why =
                            format!("expected {{\"ack\": \"none\"|\"local\"|\"stored\", \"retention\": {{...}}}}: {e}");
                        return http::json_error(400, "bad_request", &why, keep_alive);
                    }
                }
            };
            DurableAsk::Declare { topic: topic.clone(), spec }
        }
        Op::Delete => DurableAsk::Delete { topic: topic.clone() },
        Op::Read => match read_query(query) {
            Ok((from, limit)) => DurableAsk::Read { topic: topic.clone(), from, limit },
            Err(why) => return http::json_error(400, "bad_request", &why, keep_alive),
        },
    };
    let task_shard = shard.clone();
    let work = async move {
        let answer = task_shard.durable(&topic, ask).await;
        render(&topic, answer, keep_alive)
    };
    match glommio::spawn_local_into(work, shard.control_queue) {
        Ok(task) => task.await,
        Err(e) => http::json_error(500, "internal", &format!("cannot schedule: {e}"), false),
    }
}

/// Answers a snapshot request, in the control queue.
pub(crate) async fn snapshots(shard: &Rc<Shard>, route: Route, keep_alive: bool) -> Vec<u8> {
    // An id names a file in a directory store: letters, digits and '-' only.
    if let Route::SnapshotShow(id) | Route::SnapshotDelete(id) = &route {
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return http::json_error(400, "bad_request", "a snapshot id is letters, digits and '-'", keep_alive);
        }
    }
    let task_shard = shard.clone();
    let work = async move {
        let shard = &task_shard;
        let failed = |why: String| http::json_error(503, "object_store", &why, keep_alive);
        match route {
            Route::SnapshotCreate => match shard.make_snapshot().await {
                Ok(m) => {
                    let made = SnapshotMade {
                        id: m.id.clone(),
                        topics: m.topics.len() as u64,
                        segments: m.topics.iter().map(|t| t.segments.len() as u64).sum(),
                        bytes: m.topics.iter().flat_map(|t| &t.segments).map(|s| s.bytes).sum(),
                    };
                    http::json(201, &made, keep_alive)
                }
                Err(why) => failed(why),
            },
            Route::SnapshotList => match shard.snapshot_ids().await {
                Ok(snapshots) => http::json(200, &SnapshotList { snapshots }, keep_alive),
                Err(why) => failed(why),
            },
            Route::SnapshotShow(id) => match shard.manifest(&id).await {
                Ok(Some(m)) => http::json(200, &m, keep_alive),
                Ok(None) => http::json_error(404, "unknown_snapshot", "no such snapshot", keep_alive),
                Err(why) => failed(why),
            },
            Route::SnapshotDelete(id) => match shard.delete_snapshot(&id).await {
                Ok(()) => http::json(200, &StatusBody { status: "ok".into() }, keep_alive),
                Err(why) => failed(why),
            },
            _ => http::json_error(404, "not_found", "no such path", keep_alive),
        }
    };
    match glommio::spawn_local_into(work, shard.control_queue) {
        Ok(task) => task.await,
        Err(e) => http::json_error(500, "internal", &format!("cannot schedule: {e}"), false),
    }
}

/// `from_seq=N`, `since_ms=T` or `key=K` (with an optional `from_seq`),
/// and `limit`.
fn read_query(query: &str) -> Result<(ReadFrom, usize), String> {
    let (mut from_seq, mut since, mut key, mut limit) = (None, None, None, READ_PAGE_DEFAULT);
    let number = |name: &str, v: &str| v.parse::<u64>().map_err(|_| format!("{name} must be a number"));
    for (name, value) in http::query_pairs(query) {
        match name.as_str() {
            "from_seq" => from_seq = Some(number("from_seq", &value)?),
            "since_ms" => since = Some(number("since_ms", &value)?),
            "key" => key = Some(Bytes::from(value.into_bytes())),
            "limit" => {
                limit = match value.parse::<usize>() {
                    Ok(n) if (1..=READ_MESSAGES_MAX).contains(&n) => n,
                    _ => return Err(format!("limit must be 1..={READ_MESSAGES_MAX}")),
                }
            }
            _ => return Err(format!("unknown parameter {name:?} (from_seq, since_ms, key, limit)")),
        }
    }
    let from = match (key, since) {
        (Some(_), Some(_)) => return Err("key and since_ms do not combine".into()),
        (Some(key), None) => ReadFrom::Key { key, from_seq: from_seq.unwrap_or(0) },
        (None, Some(_)) if from_seq.is_some() => return Err("from_seq and since_ms do not combine".into()),
        (None, Some(ms)) => ReadFrom::Time(ms),
        (None, None) => ReadFrom::Seq(from_seq.unwrap_or(0)),
    };
    Ok((from, limit))
}

fn render(topic: &TopicName, answer: DurableAnswer, keep_alive: bool) -> Vec<u8> {
    match answer {
        DurableAnswer::Done => http::json(200, &StatusBody { status: "ok".into() }, keep_alive),
        DurableAnswer::Failed { status, code, message } => http::json_error(status, code, &message, keep_alive),
        DurableAnswer::Snapshot(_) => http::json_error(500, "internal", "unexpected answer", keep_alive),
        DurableAnswer::Read { epoch, first_seq, last_seq, records, next_seq } => {
            let messages = records
                .into_iter()
                .map(|r| {
                    let key = r.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned());
                    let (data, data_base64) = match (r.kind, std::str::from_utf8(&r.payload)) {
                        (PayloadKind::Text, Ok(text)) => (Some(text.to_string()), None),
                        _ => (None, Some(base64::engine::general_purpose::STANDARD.encode(&r.payload))),
                    };
                    let meta = proto::message::Meta::from_record_headers(r.headers).0.unwrap_or_default();
                    LogMessage {
                        seq: r.seq,
                        ts: r.timestamp_ms,
                        key,
                        data,
                        data_base64,
                        kind: meta.kind.map(|k| k.as_str().to_string()),
                        message_id: meta.id.clone(),
                        headers: meta.headers.iter().cloned().collect(),
                    }
                })
                .collect();
            let page = LogPage {
                topic: topic.as_str().to_string(),
                epoch: epoch.to_string(),
                first_seq,
                last_seq,
                messages,
                next_seq,
            };
            http::json(200, &page, keep_alive)
        }
    }
}
