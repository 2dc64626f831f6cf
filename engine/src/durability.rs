//! A shard's durable topics, the shell's side: the committer task that
//! writes each group commit the broker hands it and reports it back, the
//! keeper task (interval fsyncs, retention by age), recovery at start, the
//! clean mark at stop, and the owner's answers to declare, delete and read
//! requests from any shard.
//!
//! Group commit: publishes append to their topic's log in memory as they
//! are sequenced (`proto::owner`); the committer takes everything appended
//! since its last pass, writes it (and fsyncs it under `--fsync always`),
//! then reports it, which delivers the messages and answers their
//! publishers. Publishes sequenced while a pass is being written wait for
//! the next pass, so one fsync covers every publisher of that moment.

use std::collections::HashSet;
use std::rc::Rc;
use std::time::{Duration, Instant};

use proto::broker::LogRead;
use proto::durable::{DurableSpec, FsyncPolicy, ReadFrom, SegmentInfo};
use proto::log::Record;
use proto::log::RECORD_BODY_BYTES_MAX;
use proto::message::Message;
use proto::message::{Epoch, Now};
use proto::outbound::Outbound;
use proto::owner::DurableMove;
use proto::sync::Slot;
use proto::topic::TopicName;
use runtime::limits::SHUTDOWN_POLL_MS;

use crate::shard::{Awaited, CatchUpWork, Item, Shard};
use crate::store::StoreError;

/// How often the keeper applies retention by age.
const RETENTION_CHECK_MS: u64 = 1_000;
/// How often a subscriber catching up looks for room in its queue.
const CATCH_UP_POLL_MS: u64 = 2;

/// A request to a durable topic's owner shard.
#[derive(Debug)]
pub enum DurableAsk {
    /// Make the topic durable (or change its declaration).
    Declare { topic: TopicName, spec: DurableSpec },
    /// Delete the topic's log; the topic stays, ephemeral.
    Delete { topic: TopicName },
    /// Read up to `limit` records of the log.
    Read { topic: TopicName, from: ReadFrom, limit: usize },
    /// This shard's part of a snapshot (to every shard).
    Snapshot,
}

/// The owner's answer.
#[derive(Debug)]
pub enum DurableAnswer {
    /// Declared or deleted.
    Done,
    /// Refused: the HTTP status, code and message to show.
    Failed { status: u16, code: &'static str, message: String },
    /// What a read found.
    Read {
        /// The topic's sequence space.
        epoch: Epoch,
        /// First sequence in the log.
        first_seq: u64,
        /// Last sequence written.
        last_seq: u64,
        /// The records, in order.
        records: Vec<Record>,
        /// Where the next page starts (`from_seq`), when more may match.
        next_seq: Option<u64>,
    },
    /// A shard's part of a snapshot.
    Snapshot(Result<Vec<crate::archive::ManifestTopic>, String>),
}

impl DurableAnswer {
    /// Bytes an answer holds, for the outbox's bound.
    pub fn cost_bytes(&self) -> usize {
        match self {
            DurableAnswer::Read { records, .. } => records.iter().map(|r| r.payload.len() + 64).sum(),
            _ => 0,
        }
    }

    fn failed(status: u16, code: &'static str, message: impl Into<String>) -> DurableAnswer {
        DurableAnswer::Failed { status, code, message: message.into() }
    }
}

impl Shard {
    /// Asks `topic`'s owner shard (maybe this one) to declare, delete or
    /// read it.
    pub async fn durable(self: &Rc<Self>, topic: &TopicName, ask: DurableAsk) -> DurableAnswer {
        self.durable_on(topic.owner_shard(self.shards), ask).await
    }

    /// Asks shard `shard` (maybe this one) for its part of a snapshot.
    pub(crate) async fn snapshot_of(
        self: &Rc<Self>,
        shard: usize,
    ) -> Result<Vec<crate::archive::ManifestTopic>, String> {
        match self.durable_on(shard, DurableAsk::Snapshot).await {
            DurableAnswer::Snapshot(part) => part,
            other => Err(format!("unexpected answer {other:?}")),
        }
    }

    /// Carries out `ask` on shard `shard`: here, or through its durable task.
    async fn durable_on(self: &Rc<Self>, shard: usize, ask: DurableAsk) -> DurableAnswer {
        if shard == self.id {
            return self.serve_durable(ask).await;
        }
        let req = self.next_id();
        let slot = Slot::default();
        self.awaited.borrow_mut().insert(req, Awaited::Durable(slot.clone()));
        self.send(shard, Item::DurableRequest { req, ask: Box::new(ask) });
        slot.wait().await
    }

    /// Serves peers' durable requests, in the control queue.
    pub(crate) async fn durable_server(self: Rc<Self>) {
        loop {
            let wanted = std::mem::take(&mut *self.durable_requests.borrow_mut());
            let listings = std::mem::take(&mut *self.store_listings.borrow_mut());
            if wanted.is_empty() && listings.is_empty() {
                self.durable_wake.wait().await;
                continue;
            }
            for topic in listings {
                let listed = self.stored_log(&topic).await;
                self.broker.borrow_mut().stored_listed(&topic, listed, Now::read());
                self.apply();
            }
            for (from, req, ask) in wanted {
                let answer = self.serve_durable(ask).await;
                self.send(from, Item::DurableReply { req, answer: Box::new(answer) });
            }
        }
    }

    /// Carries out a durable request on this (owner) shard.
    async fn serve_durable(&self, ask: DurableAsk) -> DurableAnswer {
        match ask {
            DurableAsk::Snapshot => DurableAnswer::Snapshot(self.snapshot_part().await),
            DurableAsk::Declare { topic, spec } => {
                let now = Instant::now();
                let declared =
                    self.broker.borrow_mut().owner_mut().declare_durable(&topic, spec, None, self.log_limits, now);
                if let Err(e) = declared {
                    return DurableAnswer::failed(e.http_status(), e.code(), e.to_string());
                }
                let epoch = self.broker.borrow().owner().stat(&topic).map(|s| s.epoch);
                let Some(epoch) = epoch else { return DurableAnswer::failed(500, "internal", "topic vanished") };
                let floor = self.broker.borrow().owner().last_seq(&topic).unwrap_or(0);
                match self.store.write_meta(&topic, epoch, spec, floor) {
                    Ok(()) => DurableAnswer::Done,
                    Err(e) => {
                        self.broker.borrow_mut().owner_mut().undeclare_durable(&topic);
                        DurableAnswer::failed(500, "storage_failed", e.to_string())
                    }
                }
            }
            DurableAsk::Delete { topic } => {
                if self.broker.borrow().owner().durable(&topic).is_none() {
                    return DurableAnswer::failed(404, "not_durable", "no durable topic of that name on this node");
                }
                if !self.broker.borrow_mut().owner_mut().undeclare_durable(&topic) {
                    return DurableAnswer::failed(409, "busy", "messages are still being written; retry");
                }
                self.broker.borrow_mut().topic_undeclared(&topic);
                self.fetched.borrow_mut().forget(&topic);
                match self.store.delete(&topic).await {
                    Ok(()) => DurableAnswer::Done,
                    Err(e) => DurableAnswer::failed(500, "storage_failed", e.to_string()),
                }
            }
            DurableAsk::Read { topic, from, limit } => {
                let (plan, total, epoch, first_seq, last_seq) = {
                    let broker = self.broker.borrow();
                    let owner = broker.owner();
                    let (Some((_, log)), Some(stat)) = (owner.durable(&topic), owner.stat(&topic)) else {
                        return DurableAnswer::failed(404, "not_durable", "no durable topic of that name on this node");
                    };
                    let total = match &from {
                        ReadFrom::Key { key, from_seq } => Some(log.key_records(key, *from_seq)),
                        _ => None,
                    };
                    (log.plan(from, limit), total, stat.epoch, log.first_readable_seq(), stat.last_seq)
                };
                if plan.archived.is_some() {
                    // Before what is on disk: from the object store.
                    return match self.read_archived(&topic, &plan).await {
                        Ok(page) => {
                            let next_seq = (page.next_seq <= last_seq).then_some(page.next_seq);
                            DurableAnswer::Read { epoch, first_seq, last_seq, records: page.records, next_seq }
                        }
                        Err(e) => DurableAnswer::failed(503, "store_unavailable", e),
                    };
                }
                match self.store.read(&topic, &plan).await {
                    Err(e) => DurableAnswer::failed(500, "storage_failed", e.to_string()),
                    Ok((records, _)) => {
                        let last = records.last().map_or(0, |r| r.seq);
                        let more = match total {
                            Some(total) => records.len() < total,
                            None => !records.is_empty() && last < last_seq,
                        };
                        let next_seq = more.then_some(last + 1);
                        DurableAnswer::Read { epoch, first_seq, last_seq, records, next_seq }
                    }
                }
            }
        }
    }

    /// The catch-up task (control queue): starts a task for each read and
    /// each wait for room.
    pub(crate) async fn catcher(self: Rc<Self>) {
        loop {
            let work = std::mem::take(&mut *self.catch_ups.borrow_mut());
            if work.is_empty() {
                self.catch_up_wake.wait().await;
                continue;
            }
            for w in work {
                match w {
                    CatchUpWork::Read(read) => self.spawn_log_read(read),
                    CatchUpWork::Next { topic, req, out } => self.spawn_catch_up(topic, req, out),
                }
            }
        }
    }

    /// Reads a catch-up batch from a durable topic's log (control queue)
    /// and hands it to the broker. A first record longer than the batch's
    /// budget is read with a larger one.
    pub(crate) fn spawn_log_read(self: &Rc<Self>, read: LogRead) {
        let shard = self.clone();
        let work = async move {
            let plan_from = |from_seq: u64| {
                let broker = shard.broker.borrow();
                let log = broker.owner().durable(&read.topic).map(|(_, log)| log);
                log.map(|log| log.plan_range(from_seq, read.to_seq, read.max_bytes))
            };
            let mut plan = plan_from(read.from_seq);
            // Archived segments first (tiered reads); one that cannot be
            // fetched is skipped, and the broker reports its range as a gap.
            while let Some((segment, archived)) = plan.as_ref().and_then(|p| Some((p.archived?, p))) {
                match shard.read_archived(&read.topic, archived).await {
                    Ok(page) if !page.records.is_empty() => {
                        shard.caught_up_batch(&read, page.records);
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(topic = read.topic.as_str(), "catch-up from the object store: {e}"),
                }
                if segment.last_seq >= read.to_seq {
                    plan = None;
                    break;
                }
                plan = plan_from(segment.last_seq + 1);
            }
            let mut records = Vec::new();
            if let Some(mut plan) = plan {
                let mut budget = read.max_bytes.max(proto::durable::CATCH_UP_BYTES_MIN) as u64;
                loop {
                    let whole_seen;
                    (records, whole_seen) = match shard.store.read(&read.topic, &plan).await {
                        Ok(read) => read,
                        Err(e) => {
                            tracing::warn!(topic = read.topic.as_str(), "catch-up read failed: {e}");
                            (Vec::new(), true)
                        }
                    };
                    // Grow only when the first record was cut short by the
                    // budget (a range with no wanted record is no reason).
                    let cut = plan.ranges.first().map_or(0, |r| r.len);
                    if whole_seen || cut < budget || budget >= RECORD_BODY_BYTES_MAX as u64 {
                        break;
                    }
                    budget *= 4;
                    let grown =
                        shard.broker.borrow().owner().durable(&read.topic).map(|(_, log)| plan.grown(log, budget));
                    match grown {
                        Some(grown) => plan = grown,
                        None => break,
                    }
                }
            }
            shard.caught_up_batch(&read, records);
        };
        glommio::spawn_local_into(work, self.control_queue).map(|t| t.detach()).ok();
    }

    /// Hands a catch-up batch read from the log to the broker.
    fn caught_up_batch(&self, read: &LogRead, records: Vec<Record>) {
        let at = Instant::now();
        let messages = records.into_iter().map(|r| Message::from_record(r, at)).collect();
        self.broker.borrow_mut().log_read(&read.topic, read.id, messages, Now::read());
        self.apply();
    }

    /// Waits (control queue) until a subscriber catching up has drained its
    /// queue to half its cap, then asks for its next batch.
    pub(crate) fn spawn_catch_up(self: &Rc<Self>, topic: TopicName, req: u64, out: Rc<Outbound>) {
        let shard = self.clone();
        let work = async move {
            loop {
                if out.is_closing() || !shard.broker.borrow().catching_up(&topic, req) {
                    return;
                }
                let room = out.room();
                if room >= out.cap_bytes() / 2 {
                    shard.broker.borrow_mut().catch_up(&topic, req, room, Now::read());
                    shard.apply();
                    return;
                }
                glommio::timer::sleep(Duration::from_millis(CATCH_UP_POLL_MS)).await;
            }
        };
        glommio::spawn_local_into(work, self.control_queue).map(|t| t.detach()).ok();
    }

    /// Writes each group commit the broker hands over and reports it.
    pub(crate) async fn committer(self: Rc<Self>) {
        loop {
            let commits = self.broker.borrow_mut().take_commits();
            if commits.is_empty() {
                self.commit_wake.wait().await;
                continue;
            }
            self.committing.set(true);
            for commit in &commits {
                let result = self.store.write(&commit.topic, &commit.jobs).await;
                let result_ok = result.is_ok();
                let now = Now::read();
                match result {
                    Ok(()) => self.broker.borrow_mut().committed(commit, now),
                    Err(e) => {
                        tracing::error!(topic = commit.topic.as_str(), "durable write failed: {e}");
                        self.broker.borrow_mut().commit_failed(commit, now);
                    }
                }
                self.apply();
                let sealed: Vec<_> = commit.jobs.iter().filter(|j| j.seal).collect();
                if result_ok && !sealed.is_empty() {
                    for job in sealed {
                        let info = SegmentInfo { base_seq: job.segment, last_seq: job.last_seq, len: job.end };
                        self.upload_sealed(&commit.topic, info);
                    }
                    self.expire(&commit.topic, now.unix_ms);
                }
            }
            self.committing.set(false);
            if self.broker.borrow().stored_waiting() > 0 {
                // Publishers wait at ack `stored`: the archive task seals
                // their segments within the upload interval.
                self.archive_wake.notify();
            }
        }
    }

    /// Fsyncs under `--fsync interval`, and applies retention by age.
    pub(crate) async fn log_keeper(self: Rc<Self>) {
        let tick = match self.config.fsync() {
            FsyncPolicy::Interval => self.config.fsync_interval(),
            FsyncPolicy::Always => Duration::from_millis(RETENTION_CHECK_MS),
        };
        let mut last_retention = Instant::now();
        loop {
            glommio::timer::sleep(tick).await;
            if self.config.fsync() == FsyncPolicy::Interval {
                if let Err(e) = self.store.sync_written().await {
                    tracing::error!(shard = self.id, "interval fsync failed: {e}");
                }
            }
            if last_retention.elapsed() >= Duration::from_millis(RETENTION_CHECK_MS) {
                last_retention = Instant::now();
                let now_ms = Now::read().unix_ms;
                let names = self.broker.borrow().owner().durable_names();
                for topic in names {
                    self.expire(&topic, now_ms);
                }
            }
        }
    }

    /// Drops `topic`'s segments its retention no longer keeps.
    fn expire(&self, topic: &TopicName, now_ms: u64) {
        let (gone, archived) = {
            let mut broker = self.broker.borrow_mut();
            let owner = broker.owner_mut();
            let Some((spec, _)) = owner.durable(topic) else { return };
            match owner.durable_log_mut(topic) {
                // Only segments already in the object store go; they stay
                // readable from there.
                Some(log) => {
                    let gone = log.expire(&spec.retention, now_ms, true);
                    (gone, log.archived().copied().collect::<Vec<_>>())
                }
                None => return,
            }
        };
        if gone.is_empty() {
            return;
        }
        match self.store.write_archived(topic, &archived) {
            Ok(()) => self.store.remove_segments(topic, &gone),
            // Their files stay until a restart finds them again.
            Err(e) => tracing::error!(topic = topic.as_str(), "archived segments not recorded: {e}"),
        }
    }

    /// Makes `topic`'s files follow its log to or from another node of the
    /// cluster (see `proto::owner::DurableMove`). Runs in `apply`, before
    /// any commit can write the topic's segments. A failure is logged: the
    /// log goes on in memory and its next commit fails (`storage_failed`).
    pub(crate) fn durable_moved(&self, moved: DurableMove) {
        let (topic, outcome) = match moved {
            DurableMove::Left { topic } => {
                self.forget_group_uploads(&topic);
                let done = self.store.forget(&topic);
                tracing::info!(topic = topic.as_str(), "durable log handed to the next owner; local files removed");
                (topic, done)
            }
            DurableMove::Taken { topic, epoch, spec, floor, segments } => {
                let count = segments.len();
                let done = self
                    .store
                    .forget(&topic)
                    .and_then(|()| self.store.write_meta(&topic, epoch, spec, floor))
                    .and_then(|()| self.store.write_archived(&topic, &segments));
                tracing::info!(topic = topic.as_str(), segments = count, floor, "durable log taken over");
                (topic, done)
            }
        };
        self.fetched.borrow_mut().forget(&topic);
        if let Err(e) = outcome {
            tracing::error!(topic = topic.as_str(), "durable log's files not moved: {e}");
        }
    }

    /// Asks the durable task to list `topic`'s segments in the object store
    /// for the broker (a durable topic taken over without its state).
    pub(crate) fn list_stored(&self, topic: TopicName) {
        self.store_listings.borrow_mut().push(topic);
        self.durable_wake.notify();
    }

    /// Recovers the durable topics on disk that this shard owns, and
    /// declares the configured ones found nowhere. Runs before the shard
    /// serves. In a cluster, configured topics are declared where they are
    /// sequenced instead, at their first publish there (see
    /// `Owner::set_durable_config`).
    pub fn recover_durable(&self) -> Result<(), StoreError> {
        let (id, shards) = (self.id, self.shards);
        let found =
            self.store.recover(|t| t.owner_shard(shards) == id, self.log_limits, self.config.history_messages_max())?;
        let now = Instant::now();
        let configured = self.config.durable_topics();
        let mut seen = HashSet::new();
        for f in found {
            let spec = configured.iter().find(|(t, _)| *t == f.topic).map_or(f.spec, |(_, s)| *s);
            let (next, messages) = (f.recovered.next_seq, f.recovered.log.messages());
            let mut broker = self.broker.borrow_mut();
            if let Err(e) =
                broker.owner_mut().declare_durable(&f.topic, spec, Some((f.epoch, f.recovered)), self.log_limits, now)
            {
                tracing::error!(topic = f.topic.as_str(), "durable topic not recovered: {e}");
                continue;
            }
            tracing::info!(shard = id, topic = f.topic.as_str(), messages, next_seq = next, "durable topic recovered");
            // Pending schedules back from the journal, which is rewritten
            // with only them (a torn tail gone).
            let replayed = proto::schedule::replay(self.store.read_schedules(&f.topic)?);
            if replayed != proto::schedule::Replayed::default() {
                let (count, refire) = (replayed.pending.len(), replayed.unwritten.len());
                let dropped = broker.restore_schedules(&f.topic, replayed);
                tracing::info!(topic = f.topic.as_str(), count, refire, dropped, "schedules restored");
            }
            self.store.rewrite_schedules(&f.topic, &broker.schedule_records(&f.topic))?;
            for saved in self.store.read_groups(&f.topic)? {
                let name = saved.group.clone();
                match broker.restore_group(&f.topic, saved, Now::read()) {
                    Ok(()) => tracing::info!(topic = f.topic.as_str(), group = name, "consumer group restored"),
                    Err(e) => {
                        tracing::error!(topic = f.topic.as_str(), group = name, "consumer group not restored: {e}");
                        self.store.put_group_aside(&f.topic, &name);
                    }
                }
            }
            if spec != f.spec {
                self.store.write_meta(&f.topic, f.epoch, spec, f.seq_floor)?;
            }
            seen.insert(f.topic);
        }
        if self.broker.borrow().topology().is_some() {
            let mine = configured.iter().filter(|(t, _)| t.owner_shard(shards) == id).cloned();
            self.broker.borrow_mut().owner_mut().set_durable_config(self.log_limits, mine);
            return Ok(());
        }
        for (topic, spec) in configured.iter().filter(|(t, _)| t.owner_shard(shards) == id && !seen.contains(t)) {
            let mut broker = self.broker.borrow_mut();
            if let Err(e) = broker.owner_mut().declare_durable(topic, *spec, None, self.log_limits, now) {
                tracing::error!(topic = topic.as_str(), "durable topic not declared: {e}");
                continue;
            }
            let epoch = broker.owner().stat(topic).map(|s| s.epoch);
            let floor = broker.owner().last_seq(topic).unwrap_or(0);
            drop(broker);
            if let Some(epoch) = epoch {
                self.store.write_meta(topic, epoch, *spec, floor)?;
            }
        }
        Ok(())
    }

    /// Saves the durable consumer groups whose positions moved (at most
    /// every `GROUP_SAVE_INTERVAL_MS`, or all of them when `force`). A
    /// failed save is logged; the group goes on and the next save retries.
    pub(crate) fn save_groups(&self, force: bool) {
        let deletes = self.broker.borrow_mut().take_group_deletes();
        for job in deletes {
            self.upload_group(&job.topic, &job.group, None);
            let deleted = self.store.delete_group(&job.topic, &job.group);
            if let Err(e) = &deleted {
                tracing::error!(
                    topic = job.topic.as_str(),
                    group = job.group,
                    "removed group's positions not deleted: {e}"
                );
            }
            // Answers a waiting `delete_group` (applied by the ticker).
            self.broker.borrow_mut().group_save_deleted(job, deleted.is_ok(), Now::read());
        }
        let saves = self.broker.borrow_mut().take_group_saves(Now::read(), force);
        for save in saves {
            self.upload_group(&save.topic, &save.saved.group, Some(&save.saved));
            if let Err(e) = self.store.write_group(&save.topic, &save.saved) {
                tracing::error!(
                    topic = save.topic.as_str(),
                    group = save.saved.group,
                    "group positions not saved: {e}"
                );
                self.broker.borrow_mut().group_save_failed(&save.topic, &save.saved.group);
            }
        }
    }

    /// Appends durable topics' schedule changes to their journals, then
    /// lets the broker answer the adds and cancels that waited for them.
    /// No await between the two: nothing else changes the schedules
    /// meanwhile.
    pub(crate) fn write_schedule_journals(&self) {
        let writes = self.broker.borrow_mut().take_schedule_journal();
        for write in writes {
            let written = self.store.append_schedules(&write.topic, &write.records);
            let ok = match written {
                Ok(len) => {
                    let live_bytes = self.broker.borrow().schedule_journal_bytes(&write.topic);
                    if crate::store::Store::schedule_journal_bloated(len, live_bytes) {
                        let live = self.broker.borrow().schedule_records(&write.topic);
                        if let Err(e) = self.store.rewrite_schedules(&write.topic, &live) {
                            tracing::warn!(topic = write.topic.as_str(), "schedule journal not rewritten: {e}");
                        }
                    }
                    true
                }
                // A failed append may have left half a record, after which
                // the journal would not read: write it anew from the table
                // (which holds these changes), or report the failure.
                Err(e) => {
                    tracing::error!(topic = write.topic.as_str(), "schedule journal append failed: {e}; rewriting it");
                    let live = self.broker.borrow().schedule_records(&write.topic);
                    match self.store.rewrite_schedules(&write.topic, &live) {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::error!(topic = write.topic.as_str(), "schedule journal not written: {e}");
                            false
                        }
                    }
                }
            };
            self.broker.borrow_mut().schedules_written(&write.topic, ok, Now::read());
        }
    }

    /// At a graceful stop: waits (up to the drain timeout) until every
    /// sequenced durable message is written, then marks each durable topic
    /// clean, so the next start continues its sequence without a skip.
    pub async fn close_durable(&self) {
        let deadline = Instant::now() + self.config.drain_timeout();
        let busy = || self.committing.get() || self.broker.borrow().owner().has_commits();
        while busy() && Instant::now() < deadline {
            glommio::timer::sleep(Duration::from_millis(SHUTDOWN_POLL_MS)).await;
        }
        if busy() {
            tracing::warn!(shard = self.id, "durable writes still running at the drain deadline: not marked clean");
            return;
        }
        self.save_groups(true);
        self.write_schedule_journals();
        let names = self.broker.borrow().owner().durable_names();
        for topic in names {
            if self.broker.borrow().owner().durable_failed(&topic) {
                tracing::warn!(topic = topic.as_str(), "a write failed: not marked clean");
                continue;
            }
            if let Err(e) = self.store.mark_clean(&topic).await {
                tracing::warn!(topic = topic.as_str(), "not marked clean: {e}");
            }
        }
    }
}
