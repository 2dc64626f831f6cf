//! Scheduled delivery, the broker's side: a publish with a due time goes to
//! the topic's owner, which keeps it in the topic's [`Schedules`] and
//! sequences it, as any publish, when its tick reaches the due time. Adds,
//! cancels and listings are answered to the asking connection (its shard
//! keeps the native request id until the owner's answer comes back).
//!
//! Schedules live in memory: a node restart loses the pending ones (durable
//! topics' schedules surviving a restart is not built yet).

use super::*;
use crate::schedule::{Added, Scheduled, Schedules, SCHEDULE_LIST_MAX};

/// What a connection asks of a topic's schedules.
#[derive(Debug, Clone)]
pub enum ScheduleAsk {
    /// Keep `scheduled` (replacing a pending one with its id unless
    /// `if_absent`).
    Add { scheduled: Scheduled, if_absent: bool },
    /// Cancel the pending schedule with this id.
    Cancel { id: String },
    /// List the pending schedules.
    List,
}

impl Broker {
    /// Asks `topic`'s owner to add, cancel or list schedules; the native
    /// reply `id` on `out` comes with the owner's answer.
    pub fn ask_schedules(&mut self, topic: TopicName, ask: ScheduleAsk, out: Rc<Outbound>, id: u64, now: Now) {
        let req = self.next_id();
        self.asking.insert(req, (out, id));
        let owner = topic.owner_shard(self.shards);
        self.send(owner, Item::ScheduleAsk { topic, ask, req }, now);
    }

    /// A fresh schedule id, unique on this node: `s<shard>-<n>`.
    pub fn schedule_id(&mut self) -> String {
        let n = self.next_id();
        format!("s{}-{n}", self.id)
    }

    /// Sequences the schedules of this shard's topics that are due; one the
    /// topic refuses now (full, behind) is tried again at the next tick.
    pub fn tick_schedules(&mut self, now: Now) {
        let topics: Vec<TopicName> = self
            .schedules
            .iter()
            .filter(|(_, s)| s.next_due_ms().is_some_and(|d| d <= now.unix_ms))
            .map(|(t, _)| t.clone())
            .collect();
        for topic in topics {
            let due = self.schedules.get_mut(&topic).map(|s| s.take_due(now.unix_ms)).unwrap_or_default();
            for s in due {
                let options = PublishOptions { key: s.key.clone(), ack: None, reply_to: None, meta: s.meta.clone() };
                if self.sequence(&topic, s.kind, s.payload.clone(), options, now).is_err() {
                    if let Some(table) = self.schedules.get_mut(&topic) {
                        table.put_back(s);
                    }
                }
            }
            if self.schedules.get(&topic).is_some_and(Schedules::is_empty) {
                self.schedules.remove(&topic);
            }
        }
    }

    /// Whether this shard keeps pending schedules (its ticker runs).
    pub fn has_schedules(&self) -> bool {
        !self.schedules.is_empty()
    }

    /// Owner side: a schedule request; asker side: its answer.
    pub(super) fn handle_schedules(&mut self, from: usize, item: Item, now: Now) {
        match item {
            Item::ScheduleAsk { topic, ask, req } => {
                let answer = match ask {
                    ScheduleAsk::Add { scheduled, if_absent } => {
                        let (id, due_ms) = (scheduled.id.clone(), scheduled.due_ms);
                        let added = self.schedules.entry(topic.clone()).or_default().add(scheduled, if_absent);
                        if self.schedules.get(&topic).is_some_and(Schedules::is_empty) {
                            self.schedules.remove(&topic);
                        }
                        match added {
                            Ok(Added::Kept { replaced }) => {
                                Ok(serde_json::json!({"schedule_id": id, "deliver_at": due_ms, "replaced": replaced}))
                            }
                            Ok(Added::Present { due_ms }) => {
                                Ok(serde_json::json!({"schedule_id": id, "deliver_at": due_ms, "present": true}))
                            }
                            Err(e) => Err(("too_many_schedules", e.to_string())),
                        }
                    }
                    ScheduleAsk::Cancel { id } => {
                        let cancelled = self.schedules.get_mut(&topic).and_then(|s| s.cancel(&id));
                        if self.schedules.get(&topic).is_some_and(Schedules::is_empty) {
                            self.schedules.remove(&topic);
                        }
                        match cancelled {
                            Some(s) => Ok(serde_json::json!({"schedule_id": id, "deliver_at": s.due_ms})),
                            None => Err(("not_found", format!("no pending schedule {id:?} on this topic"))),
                        }
                    }
                    ScheduleAsk::List => {
                        let list = self.schedules.get(&topic).map(|s| s.list(SCHEDULE_LIST_MAX)).unwrap_or_default();
                        let pending = self.schedules.get(&topic).map_or(0, Schedules::len);
                        let items: Vec<serde_json::Value> = list
                            .into_iter()
                            .map(|(id, due, bytes)| serde_json::json!({"schedule_id": id, "deliver_at": due, "bytes": bytes}))
                            .collect();
                        Ok(serde_json::json!({"topic": topic.as_str(), "pending": pending, "schedules": items}))
                    }
                };
                let answer = answer.map_err(|(code, message)| (code.to_string(), message));
                self.send(from, Item::ScheduleAnswer { req, answer }, now);
            }
            Item::ScheduleAnswer { req, answer } => {
                let Some((out, id)) = self.asking.remove(&req) else { return };
                let frame = match answer {
                    Ok(fields) => native::reply_ok(id, fields),
                    Err((code, message)) => native::reply_error(Some(id), &code, &message),
                };
                out.offer_control(frame);
            }
            _ => {}
        }
    }
}
