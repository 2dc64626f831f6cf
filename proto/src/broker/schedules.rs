//! Scheduled delivery, the broker's side: a publish with a due time goes to
//! the topic's owner, which keeps it in the topic's [`Schedules`] and
//! sequences it, as any publish, when its tick reaches the due time. Adds,
//! cancels and listings are answered to the asking connection (its shard
//! keeps the native request id until the owner's answer comes back).
//!
//! An ephemeral topic's schedules live in memory: a node restart loses
//! them. A durable topic's are also journaled: every change (kept,
//! cancelled, fired) becomes a journal record the shell appends next to the
//! log ([`Broker::take_schedule_journal`]), and an add or a cancel is
//! answered only once its record is written ([`Broker::schedules_written`]),
//! as a publish at ack `local` is. At start the shell replays the journal
//! ([`Broker::restore_schedules`]).

use super::*;
use crate::log::Record;
use crate::schedule::{done_record, fired_record, Added, Replayed, Scheduled, Schedules, SCHEDULE_LIST_MAX};

/// A durable topic's schedule changes not yet written, and the answers
/// waiting for them.
#[derive(Debug, Default)]
pub(super) struct Journal {
    records: Vec<Record>,
    /// (asking shard, its request, the answer).
    answers: Vec<(usize, u64, OwnerAnswer)>,
}

/// A durable topic's schedule changes for the shell to append to its
/// journal.
#[derive(Debug)]
pub struct JournalWrite {
    /// The topic.
    pub topic: TopicName,
    /// The records, in order.
    pub records: Vec<Record>,
}

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
        self.asking.insert(req, remote_asks::Asker::Native { out, id });
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
        // Fired before a restart, their messages not known written: again
        // first (at least once).
        let refire: Vec<(TopicName, Vec<(u64, Scheduled)>)> = self.schedule_refire.drain().collect();
        for (topic, list) in refire {
            for (old_seq, s) in list {
                if !self.fire(&topic, &s, now) {
                    self.schedule_refire.entry(topic.clone()).or_default().push((old_seq, s));
                } else if self.owner.durable(&topic).is_some() {
                    // The old firing is settled by the new one.
                    self.schedule_journal.entry(topic.clone()).or_default().records.push(fired_record(old_seq));
                }
            }
        }
        let topics: Vec<TopicName> = self
            .schedules
            .iter()
            .filter(|(_, s)| s.next_due_ms().is_some_and(|d| d <= now.unix_ms))
            .map(|(t, _)| t.clone())
            .collect();
        for topic in topics {
            let due = self.schedules.get_mut(&topic).map(|s| s.take_due(now.unix_ms)).unwrap_or_default();
            for s in due {
                if !self.fire(&topic, &s, now) {
                    if let Some(table) = self.schedules.get_mut(&topic) {
                        table.put_back(s);
                    }
                }
            }
            self.drop_if_unscheduled(&topic);
        }
    }

    /// Forgets `topic`'s table when it holds nothing (the topic is no
    /// longer held for it).
    fn drop_if_unscheduled(&mut self, topic: &TopicName) {
        if self.schedules.get(topic).is_none_or(Schedules::is_empty) {
            self.schedules.remove(topic);
            self.owner.release_for_schedules(topic);
        }
    }

    /// Whether `topic`'s schedules may leave with its state: no add or
    /// cancel is waiting for its journal record (its answer first).
    pub(super) fn schedules_may_leave(&self, topic: &TopicName) -> bool {
        self.schedule_journal.get(topic).is_none_or(|j| j.records.is_empty() && j.answers.is_empty())
    }

    /// `topic` leaves this node: its pending schedules go with its state
    /// (those fired before a restart and not known written among them, due
    /// at once: at least once). A durable topic's journal goes with its
    /// files.
    pub(super) fn schedules_leaving(&mut self, topic: &TopicName) -> Vec<Scheduled> {
        let mut list = self.schedules.remove(topic).map(|mut s| s.take_due(u64::MAX)).unwrap_or_default();
        self.owner.release_for_schedules(topic);
        list.extend(self.schedule_refire.remove(topic).unwrap_or_default().into_iter().map(|(_, s)| s));
        self.schedule_journal.remove(topic);
        self.schedule_fired.remove(topic);
        list
    }

    /// A forwarded schedule failed: kept again, fired at the next tick.
    pub(super) fn schedule_again(&mut self, topic: &TopicName, s: Scheduled) {
        self.schedules.entry(topic.clone()).or_default().put_back(s);
        self.actions.push(Action::Tick);
    }

    /// `topic`'s state arrived with its pending schedules: kept here (a
    /// durable topic's journaled), fired when due.
    pub(super) fn schedules_arrived(&mut self, topic: &TopicName, list: Vec<Scheduled>, now: Now) {
        if list.is_empty() {
            return;
        }
        let durable = self.owner.durable(topic).is_some();
        if self.owner.hold_for_schedules(topic, now.at).is_err() {
            debug_assert!(false, "the topic was adopted just before");
        }
        let table = self.schedules.entry(topic.clone()).or_default();
        let mut records = Vec::new();
        let mut dropped = 0;
        for s in list {
            let record = durable.then(|| s.to_record());
            match table.add(s, false) {
                Ok(_) => records.extend(record),
                // The giver kept them under the same bounds.
                Err(_) => dropped += 1,
            }
        }
        if dropped > 0 {
            tracing::warn!(topic = topic.as_str(), dropped, "schedules handed over past this node's bounds");
        }
        if !records.is_empty() {
            self.schedule_journal.entry(topic.clone()).or_default().records.extend(records);
        }
        self.actions.push(Action::Tick);
    }

    /// Whether this shard keeps pending schedules or journal records to
    /// write, fired schedules whose messages are not yet written, or ones
    /// to fire again (its ticker runs).
    pub fn has_schedules(&self) -> bool {
        !self.schedules.is_empty()
            || !self.schedule_journal.is_empty()
            || !self.schedule_fired.is_empty()
            || !self.schedule_refire.is_empty()
    }

    /// Sequences schedule `s` as any publish (a durable topic's firing is
    /// journaled); false when the topic refuses it now.
    fn fire(&mut self, topic: &TopicName, s: &Scheduled, now: Now) -> bool {
        let options = PublishOptions { key: s.key.clone(), ack: None, reply_to: None, meta: s.meta.clone() };
        if let Some(node) = self.remote_node(topic) {
            // The topic moved and nobody claimed its state yet: the due
            // message goes to the owner as a publish made here would (its
            // arrival there takes the topic over, with the other
            // schedules).
            let held = Held::Schedule { topic: topic.clone(), scheduled: Box::new(s.clone()) };
            self.forward(node, topic.clone(), s.kind, s.payload.clone(), options, held);
            return true;
        }
        match self.sequence(topic, s.kind, s.payload.clone(), options, now) {
            Err(_) => false,
            Ok((seq, _)) => {
                if self.owner.durable(topic).is_some() {
                    self.journal_fired(topic, s, seq);
                }
                true
            }
        }
    }

    /// A durable topic's schedule `s` fired as message `seq`: journaled at
    /// once (it is no longer pending, and its id may be used again), and as
    /// written once its message is (`schedules_fired_written`). A restart
    /// in between fires it again (at least once).
    fn journal_fired(&mut self, topic: &TopicName, s: &Scheduled, seq: u64) {
        self.schedule_journal.entry(topic.clone()).or_default().records.push(s.to_firing_record(seq));
        self.schedule_fired.entry(topic.clone()).or_default().push((seq, s.clone()));
    }

    /// A durable topic's commit through `through_seq` is written: the fired
    /// schedules whose messages it carries are journaled as written.
    pub(super) fn schedules_fired_written(&mut self, topic: &TopicName, through_seq: u64) {
        let Some(fired) = self.schedule_fired.get_mut(topic) else { return };
        let written = fired.partition_point(|(seq, _)| *seq <= through_seq);
        let done: Vec<u64> = fired.drain(..written).map(|(seq, _)| seq).collect();
        if fired.is_empty() {
            self.schedule_fired.remove(topic);
        }
        let journal = self.schedule_journal.entry(topic.clone()).or_default();
        journal.records.extend(done.into_iter().map(fired_record));
    }

    /// Durable topics' schedule changes since the last call, for the shell
    /// to append to their journals; then it reports each topic with
    /// [`Broker::schedules_written`].
    pub fn take_schedule_journal(&mut self) -> Vec<JournalWrite> {
        let mut writes = Vec::new();
        for (topic, journal) in self.schedule_journal.iter_mut() {
            if !journal.records.is_empty() {
                writes.push(JournalWrite { topic: topic.clone(), records: std::mem::take(&mut journal.records) });
            }
        }
        writes
    }

    /// The shell wrote (or failed to write) the records it took for
    /// `topic`: the adds and cancels waiting for them are answered (a
    /// failure is answered `storage_failed`; the change stays in memory).
    pub fn schedules_written(&mut self, topic: &TopicName, ok: bool, now: Now) {
        let Some(journal) = self.schedule_journal.remove(topic) else { return };
        for (from, req, answer) in journal.answers {
            let answer = if ok {
                answer
            } else {
                Err(("storage_failed".to_string(), "the schedule journal could not be written".to_string()))
            };
            self.send(from, Item::OwnerAnswer { req, answer }, now);
        }
    }

    /// The journal records that keep `topic`'s schedules as they are, for
    /// a rewrite of its journal: every pending schedule, and every fired
    /// one whose message is not known written (or is to fire again).
    pub fn schedule_records(&self, topic: &TopicName) -> Vec<Record> {
        let mut records = self.schedules.get(topic).map(Schedules::records).unwrap_or_default();
        let unwritten = self.schedule_fired.get(topic).into_iter().chain(self.schedule_refire.get(topic));
        records.extend(unwritten.flatten().map(|(seq, s)| s.to_firing_record(*seq)));
        records
    }

    /// About how many bytes `topic`'s pending schedules take in a journal,
    /// without building their records.
    pub fn schedule_journal_bytes(&self, topic: &TopicName) -> u64 {
        self.schedules.get(topic).map_or(0, |s| s.record_bytes() as u64)
    }

    /// Restores a durable topic's schedules from its journal, at start:
    /// the pending ones (those over the topic's bounds are dropped and
    /// counted), and the fired ones whose messages were not known written,
    /// fired again at the first tick.
    pub fn restore_schedules(&mut self, topic: &TopicName, replayed: Replayed) -> usize {
        let table = self.schedules.entry(topic.clone()).or_default();
        let dropped = replayed.pending.into_iter().filter(|s| table.add(s.clone(), false).is_err()).count();
        if table.is_empty() {
            self.schedules.remove(topic);
        }
        if !replayed.unwritten.is_empty() {
            self.schedule_refire.entry(topic.clone()).or_default().extend(replayed.unwritten);
        }
        dropped
    }

    /// Owner side: a schedule request from shard `from` (its answer is an
    /// `Item::OwnerAnswer`).
    pub(super) fn handle_schedule_ask(&mut self, from: usize, topic: TopicName, ask: ScheduleAsk, req: u64, now: Now) {
        // A durable topic's change is journaled; its answer waits
        // for the write.
        let mut record = None;
        let durable = self.owner.durable(&topic).is_some();
        let answer = match ask {
            ScheduleAsk::Add { scheduled, if_absent } => {
                let (id, due_ms) = (scheduled.id.clone(), scheduled.due_ms);
                let kept = durable.then(|| scheduled.to_record());
                // The topic is held here while it has schedules.
                let held = self.owner.hold_for_schedules(&topic, now.at).map_err(|e| (e.code(), e.to_string()));
                let added = held.and_then(|()| {
                    let table = self.schedules.entry(topic.clone()).or_default();
                    table.add(scheduled, if_absent).map_err(|e| ("too_many_schedules", e.to_string()))
                });
                if matches!(added, Ok(Added::Kept { .. })) {
                    record = kept;
                }
                self.drop_if_unscheduled(&topic);
                match added {
                    Ok(Added::Kept { replaced }) => {
                        Ok(serde_json::json!({"schedule_id": id, "deliver_at": due_ms, "replaced": replaced}))
                    }
                    Ok(Added::Present { due_ms }) => {
                        Ok(serde_json::json!({"schedule_id": id, "deliver_at": due_ms, "present": true}))
                    }
                    Err(e) => Err(e),
                }
            }
            ScheduleAsk::Cancel { id } => {
                let cancelled = self.schedules.get_mut(&topic).and_then(|s| s.cancel(&id));
                self.drop_if_unscheduled(&topic);
                if cancelled.is_some() && durable {
                    record = Some(done_record(&id));
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
        match record {
            Some(record) => {
                let journal = self.schedule_journal.entry(topic).or_default();
                journal.records.push(record);
                journal.answers.push((from, req, answer));
            }
            None => self.send(from, Item::OwnerAnswer { req, answer }, now),
        }
    }
}
