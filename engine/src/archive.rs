//! Durable topics in the object store, the shell's side: uploading sealed
//! segments, answering publishes at ack `stored`, snapshots (a manifest of
//! every durable topic's uploaded segments at one moment), and restoring a
//! fresh node from one.
//!
//! The node has one object-store worker (`objstore::Worker`: a thread with
//! its own small runtime); shards hand it jobs (a file path, never the
//! bytes, so queued jobs hold no memory) and poll their outcomes in the
//! control queue. Uploads run one at a time, in order, so a segment is in
//! the store before any later one of its topic, and before a manifest that
//! names it.
//!
//! Keys in the store:
//!
//! ```text
//! topics/<topic dir>/<first seq:020>-<last seq:020>.log
//!                                          sealed segments (as on disk)
//! snapshots/<id>.json                      manifests
//! snapshots/latest                         the last manifest's id
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use objstore::{Done, Job, Outcomes, Worker};
pub use proto::admin::{Manifest, ManifestSegment, ManifestTopic};
use proto::durable::{ArchivedSegment, SegmentInfo};
use proto::message::Now;
use proto::metrics;
use proto::topic::TopicName;

use crate::shard::Shard;
use crate::store::Store;

/// How often a shard looks at its uploads' outcomes while any is pending.
const ARCHIVE_POLL_MS: u64 = 5;
/// Longest a snapshot waits for its topics' last segments to be uploaded.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(120);

/// A shard's uploads.
#[derive(Debug, Default)]
pub struct Uploads {
    /// Sealed segments waiting to be handed to the worker, with the
    /// attempts made.
    backlog: VecDeque<(TopicName, SegmentInfo, u32)>,
    /// Handed over, by tag.
    in_flight: HashMap<u64, (TopicName, SegmentInfo, u32)>,
    /// Other jobs (manifests, reads), by tag: their outcome, once done.
    others: HashMap<u64, Option<Done>>,
    /// Where the worker reports.
    outcomes: Outcomes,
    /// The next tag.
    next_tag: u64,
    /// Durable groups' positions to put in the store (the latest save of
    /// each, by key; `None`: delete the key), sent at most every
    /// [`GROUP_UPLOAD_INTERVAL`].
    groups: HashMap<String, Option<Bytes>>,
    /// When group positions were last sent.
    groups_sent: Option<Instant>,
}

/// How often a shard sends its durable groups' changed positions to the
/// object store: a node that dies takes with it at most this much of its
/// groups' progress (their messages are delivered again: at least once),
/// and a busy group costs at most one PUT a second.
pub const GROUP_UPLOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Where `topic`'s durable groups' positions are in the store: beside its
/// segments, named as in its local directory.
fn groups_under(store: &Store, topic: &TopicName) -> String {
    format!("topics/{}/{}/", store.dir_name(topic), crate::store::GROUPS_DIR)
}

/// A durable group's positions in the store.
pub fn group_key(store: &Store, topic: &TopicName, group: &str) -> String {
    groups_under(store, topic) + &crate::store::group_file(group)
}

/// A topic's log as the object store holds it: its segments and its
/// durable groups' positions.
pub type StoredLog = (Vec<ArchivedSegment>, Vec<proto::group::SavedGroup>);

/// A segment's key in the store: its first and last sequence, so an
/// object left by another incarnation of the topic never passes for it.
pub fn segment_key(store: &Store, topic: &TopicName, info: &SegmentInfo) -> String {
    format!("topics/{}/{:020}-{:020}.log", store.dir_name(topic), info.base_seq, info.last_seq)
}

/// Failed uploads of one segment (its file unreadable) before it is left
/// for the next start: it is then neither in any manifest nor expired.
const UPLOAD_ATTEMPTS: u32 = 10;

impl Shard {
    /// The node's object-store worker, if it started.
    fn worker(&self) -> Option<Arc<Worker>> {
        self.node.archive.get().cloned()
    }

    /// Queues a sealed segment for upload.
    pub(crate) fn upload_sealed(&self, topic: &TopicName, info: SegmentInfo) {
        metrics::add(&self.metrics.upload_backlog_bytes, info.len);
        self.uploads.borrow_mut().backlog.push_back((topic.clone(), info, 0));
        self.archive_wake.notify();
    }

    /// Queues a durable group's save (or, with `None`, its removal) for
    /// the object store, when the node has one.
    pub(crate) fn upload_group(&self, topic: &TopicName, group: &str, saved: Option<&proto::group::SavedGroup>) {
        if self.worker().is_none() {
            return;
        }
        let body = saved.map(|s| Bytes::from(serde_json::to_vec(s).unwrap_or_default()));
        self.uploads.borrow_mut().groups.insert(group_key(&self.store, topic, group), body);
        self.archive_wake.notify();
    }

    /// Drops `topic`'s group saves not yet sent: its log went to another
    /// node, whose saves are newer.
    pub(crate) fn forget_group_uploads(&self, topic: &TopicName) {
        let under = groups_under(&self.store, topic);
        self.uploads.borrow_mut().groups.retain(|key, _| !key.starts_with(&under));
    }

    /// Hands queued group saves to the worker, at most every
    /// [`GROUP_UPLOAD_INTERVAL`]. Their outcomes are not awaited: a failed
    /// one leaves the store behind (the next change is sent again).
    fn submit_groups(&self, worker: &Worker) {
        let mut uploads = self.uploads.borrow_mut();
        if uploads.groups.is_empty() || uploads.groups_sent.is_some_and(|at| at.elapsed() < GROUP_UPLOAD_INTERVAL) {
            return;
        }
        uploads.groups_sent = Some(Instant::now());
        let mut keys: Vec<String> = uploads.groups.keys().cloned().collect();
        keys.sort();
        for key in keys {
            let Some(body) = uploads.groups.remove(&key) else { continue };
            let (tag, outcomes) = (uploads.next_tag, uploads.outcomes.clone());
            let job = match body {
                Some(ref body) => Job::PutBytes { key: key.clone(), body: body.clone(), tag, outcomes },
                None => Job::Delete { key: key.clone(), tag, outcomes },
            };
            if worker.submit(job).is_err() {
                uploads.groups.insert(key, body); // the worker's queue is full: later
                break;
            }
            uploads.next_tag += 1;
        }
    }

    /// Whether uploads are waiting or running.
    pub(crate) fn uploading(&self) -> bool {
        let uploads = self.uploads.borrow();
        !uploads.backlog.is_empty() || !uploads.in_flight.is_empty()
    }

    /// The archive task (control queue): hands sealed segments to the
    /// worker, applies their outcomes (answering publishes at ack
    /// `stored`), seals segments that `stored` publishers wait for every
    /// upload interval, and makes periodic snapshots (shard 0).
    pub(crate) async fn archiver(self: Rc<Self>) {
        let Some(worker) = self.worker() else { return };
        let mut last_seal = Instant::now();
        let period = self.config.snapshot_interval();
        let mut next_snapshot = Instant::now() + period;
        loop {
            self.submit_uploads(&worker);
            self.submit_groups(&worker);
            self.collect_outcomes();
            if last_seal.elapsed() >= self.config.upload_interval() {
                last_seal = Instant::now();
                self.broker.borrow_mut().seal_for_stored();
                self.apply();
            }
            if self.id == 0 && !period.is_zero() && Instant::now() >= next_snapshot {
                next_snapshot = Instant::now() + period;
                match self.make_snapshot().await {
                    Ok(m) => tracing::info!(id = m.id, topics = m.topics.len(), "periodic snapshot"),
                    Err(e) => tracing::warn!("periodic snapshot failed: {e}"),
                }
            }
            let busy = self.uploading()
                || !self.uploads.borrow().others.is_empty()
                || !self.uploads.borrow().groups.is_empty()
                || self.broker.borrow().stored_waiting() > 0;
            if busy {
                glommio::timer::sleep(Duration::from_millis(ARCHIVE_POLL_MS)).await;
            } else {
                let wait = if period.is_zero() || self.id != 0 { Duration::from_secs(3600) } else { period };
                let _ = glommio::timer::timeout(wait, async {
                    self.archive_wake.wait().await;
                    Ok(())
                })
                .await;
            }
        }
    }

    fn submit_uploads(&self, worker: &Worker) {
        let mut uploads = self.uploads.borrow_mut();
        while let Some((topic, info, attempts)) = uploads.backlog.pop_front() {
            let tag = uploads.next_tag;
            let key = segment_key(&self.store, &topic, &info);
            let path = self.store.segment_path(&topic, info.base_seq);
            let outcomes = uploads.outcomes.clone();
            match worker.submit(Job::PutFile { key, path, tag, outcomes }) {
                Ok(()) => {
                    uploads.next_tag += 1;
                    uploads.in_flight.insert(tag, (topic, info, attempts));
                }
                Err(_) => {
                    // The worker's queue is full: later.
                    uploads.backlog.push_front((topic, info, attempts));
                    break;
                }
            }
        }
    }

    fn collect_outcomes(&self) {
        let done: Vec<Done> = {
            let uploads = self.uploads.borrow();
            let mut list = uploads.outcomes.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut *list)
        };
        if done.is_empty() {
            return;
        }
        let now = Now::read();
        for d in done {
            let upload = self.uploads.borrow_mut().in_flight.remove(&d.tag);
            match upload {
                Some((topic, info, attempts)) => match &d.result {
                    Ok(_) => {
                        metrics::sub(&self.metrics.upload_backlog_bytes, info.len);
                        metrics::add(&self.metrics.uploaded_bytes, info.len);
                        let mut broker = self.broker.borrow_mut();
                        // Publishers at `stored` are answered only through
                        // the oldest segments that are all uploaded.
                        let through = broker.owner_mut().durable_log_mut(&topic).map(|log| {
                            log.uploaded(info.base_seq);
                            log.uploaded_through()
                        });
                        if let Some(through) = through {
                            broker.stored(&topic, through, now);
                        }
                    }
                    Err(e) => {
                        let gone = !self.store.segment_path(&topic, info.base_seq).exists();
                        if gone || attempts + 1 >= UPLOAD_ATTEMPTS {
                            metrics::sub(&self.metrics.upload_backlog_bytes, info.len);
                            tracing::error!(topic = topic.as_str(), "segment {} not uploaded: {e}", info.base_seq);
                        } else {
                            tracing::warn!(
                                topic = topic.as_str(),
                                "segment {} not uploaded, retrying: {e}",
                                info.base_seq
                            );
                            self.uploads.borrow_mut().backlog.push_back((topic, info, attempts + 1));
                        }
                    }
                },
                None => {
                    let mut uploads = self.uploads.borrow_mut();
                    if let Some(slot) = uploads.others.get_mut(&d.tag) {
                        *slot = Some(d);
                    }
                }
            }
        }
        self.apply();
    }

    /// Runs one non-upload job on the worker and waits for its outcome.
    pub(crate) async fn run_job(&self, make: impl FnOnce(u64, Outcomes) -> Job) -> Result<Option<Bytes>, String> {
        let Some(worker) = self.worker() else { return Err("no object store".into()) };
        let (tag, outcomes) = {
            let mut uploads = self.uploads.borrow_mut();
            let tag = uploads.next_tag;
            uploads.next_tag += 1;
            uploads.others.insert(tag, None);
            (tag, uploads.outcomes.clone())
        };
        let mut job = make(tag, outcomes);
        loop {
            match worker.submit(job) {
                Ok(()) => break,
                Err(back) => {
                    job = back;
                    glommio::timer::sleep(Duration::from_millis(ARCHIVE_POLL_MS)).await;
                }
            }
        }
        self.archive_wake.notify();
        loop {
            self.collect_outcomes();
            let done = {
                let mut uploads = self.uploads.borrow_mut();
                match uploads.others.get(&tag) {
                    Some(Some(_)) => uploads.others.remove(&tag).flatten(),
                    _ => None,
                }
            };
            if let Some(done) = done {
                return done.result.map_err(|e| e.to_string());
            }
            glommio::timer::sleep(Duration::from_millis(ARCHIVE_POLL_MS)).await;
        }
    }

    /// This shard's part of a snapshot: seals every durable topic's active
    /// segment, waits until everything is written and uploaded, and lists
    /// the uploaded segments. Everything acknowledged before the call is in
    /// them.
    pub(crate) async fn snapshot_part(&self) -> Result<Vec<ManifestTopic>, String> {
        let names = self.broker.borrow().owner().durable_names();
        // What each topic's log held when asked: the snapshot waits for
        // that much to be uploaded, not for the node to go quiet. (Not the
        // topic's last sequence: after an unclean stop it skips numbers no
        // record will ever have.)
        let targets: Vec<(TopicName, u64)> = names
            .iter()
            .filter_map(|t| Some((t.clone(), self.broker.borrow().owner().durable(t)?.1.next_seq() - 1)))
            .collect();
        for topic in &names {
            self.broker.borrow_mut().seal(topic);
        }
        self.apply();
        let deadline = Instant::now() + SNAPSHOT_WAIT;
        loop {
            // This may run in the archive task itself: hand uploads over here.
            if let Some(worker) = self.worker() {
                self.submit_uploads(&worker);
            }
            self.collect_outcomes();
            let behind = targets.iter().any(|(topic, target)| {
                let broker = self.broker.borrow();
                let owner = broker.owner();
                let uploaded = owner.durable(topic).map_or(u64::MAX, |(_, log)| log.uploaded_through());
                uploaded < *target && !owner.durable_failed(topic)
            });
            if !behind {
                break;
            }
            if Instant::now() > deadline {
                return Err("segments not uploaded in time (is the object store reachable?)".into());
            }
            glommio::timer::sleep(Duration::from_millis(ARCHIVE_POLL_MS)).await;
        }
        let broker = self.broker.borrow();
        let owner = broker.owner();
        let mut topics = Vec::new();
        for topic in names {
            let (Some((spec, log)), Some(stat)) = (owner.durable(&topic), owner.stat(&topic)) else { continue };
            let segments = log
                .stored_segments()
                .into_iter()
                .map(|s| ManifestSegment {
                    base_seq: s.base_seq,
                    last_seq: s.last_seq,
                    bytes: s.len,
                    key: segment_key(&self.store, &topic, &s.info()),
                    first_ms: s.first_ms,
                    last_ms: s.last_ms,
                })
                .collect();
            topics.push(ManifestTopic {
                topic: topic.as_str().to_string(),
                epoch: stat.epoch.to_string(),
                spec,
                dir: self.store.dir_name(&topic),
                segments,
            });
        }
        Ok(topics)
    }

    /// Makes a snapshot of every shard's durable topics and uploads its
    /// manifest (then `snapshots/latest`).
    pub async fn make_snapshot(self: &Rc<Self>) -> Result<Manifest, String> {
        let mut topics = Vec::new();
        for shard in 0..self.shards {
            topics.extend(self.snapshot_of(shard).await?);
        }
        topics.sort_by(|a, b| a.topic.cmp(&b.topic));
        let created_ms = Now::read().unix_ms;
        let manifest = Manifest { id: format!("{created_ms:013}"), created_ms, topics };
        let body = Bytes::from(serde_json::to_vec_pretty(&manifest).unwrap_or_default());
        let key = format!("snapshots/{}.json", manifest.id);
        self.run_job(|tag, outcomes| Job::PutBytes { key, body, tag, outcomes }).await?;
        let latest = Bytes::from(manifest.id.clone());
        self.run_job(|tag, outcomes| Job::PutBytes { key: "snapshots/latest".into(), body: latest, tag, outcomes })
            .await?;
        Ok(manifest)
    }

    /// `topic`'s segments in the object store, oldest first, each after
    /// the one before (a key from an older incarnation that overlaps is
    /// left out). Their records' times are not known without reading them:
    /// they count as spanning all time (kept by retention by age; a read
    /// by time scans from the oldest).
    pub async fn stored_log(&self, topic: &TopicName) -> Result<StoredLog, String> {
        let under = format!("topics/{}/", self.store.dir_name(topic));
        let listed = self.run_job(|tag, outcomes| Job::ListSized { under: under.clone(), tag, outcomes }).await?;
        let text = String::from_utf8_lossy(listed.as_deref().unwrap_or_default()).into_owned();
        // Its groups' positions (sent by the owners it had).
        let mut groups = Vec::new();
        let group_keys = text.lines().filter_map(|line| line.rsplit_once(' ').map(|(key, _)| key));
        let groups_under = groups_under(&self.store, topic);
        let group_keys = group_keys.filter(|key| key.starts_with(&groups_under));
        for key in group_keys.map(str::to_string).collect::<Vec<_>>() {
            // One group that cannot be had does not keep the topic from
            // its log: that group starts again from its `start` setting.
            let got = self.run_job(|tag, outcomes| Job::Get { key: key.clone(), tag, outcomes }).await;
            match got.map(|body| body.map(|body| serde_json::from_slice::<proto::group::SavedGroup>(&body))) {
                Ok(Some(Ok(saved))) => groups.push(saved),
                Ok(Some(Err(e))) => tracing::warn!(topic = topic.as_str(), key, "a stored group is unreadable: {e}"),
                Ok(None) => {} // deleted meanwhile
                Err(e) => tracing::warn!(topic = topic.as_str(), key, "a stored group could not be read: {e}"),
            }
        }
        groups.truncate(proto::group::GROUPS_PER_TOPIC_MAX);
        let mut segments: Vec<ArchivedSegment> = text
            .lines()
            .filter_map(|line| {
                let (key, size) = line.rsplit_once(' ')?;
                let (first, last) = key.strip_prefix(&under)?.strip_suffix(".log")?.split_once('-')?;
                let (base_seq, last_seq) = (first.parse().ok()?, last.parse().ok()?);
                let len = size.parse().ok()?;
                Some(ArchivedSegment { base_seq, last_seq, len, first_ms: 0, last_ms: u64::MAX })
            })
            .collect();
        segments.sort_by_key(|s| (s.base_seq, s.last_seq));
        let mut kept: Vec<ArchivedSegment> = Vec::with_capacity(segments.len());
        for s in segments {
            if kept.last().is_none_or(|k| s.base_seq > k.last_seq) {
                kept.push(s);
            }
        }
        Ok((kept, groups))
    }

    /// Snapshot ids in the store, oldest first.
    pub async fn snapshot_ids(&self) -> Result<Vec<String>, String> {
        let keys = self.run_job(|tag, outcomes| Job::List { under: "snapshots".into(), tag, outcomes }).await?;
        let text = String::from_utf8_lossy(keys.as_deref().unwrap_or_default()).into_owned();
        Ok(text
            .lines()
            .filter_map(|k| k.strip_prefix("snapshots/")?.strip_suffix(".json"))
            .map(str::to_string)
            .collect())
    }

    /// A manifest from the store (`latest` or an id); `None` if absent.
    pub async fn manifest(&self, which: &str) -> Result<Option<Manifest>, String> {
        let id = if which == "latest" {
            let latest = self.run_job(|tag, o| Job::Get { key: "snapshots/latest".into(), tag, outcomes: o }).await?;
            match latest {
                Some(id) => String::from_utf8_lossy(&id).trim().to_string(),
                None => return Ok(None),
            }
        } else {
            which.to_string()
        };
        let key = format!("snapshots/{id}.json");
        match self.run_job(|tag, outcomes| Job::Get { key, tag, outcomes }).await? {
            None => Ok(None),
            Some(body) => serde_json::from_slice(&body).map(Some).map_err(|e| format!("manifest {id}: {e}")),
        }
    }

    /// Deletes a manifest (its segments stay: later snapshots share them).
    pub async fn delete_snapshot(&self, id: &str) -> Result<(), String> {
        let key = format!("snapshots/{id}.json");
        self.run_job(|tag, outcomes| Job::Delete { key, tag, outcomes }).await.map(|_| ())
    }

    /// At start: marks the recovered topics' sealed segments that are
    /// already in the store as uploaded, and queues the others.
    pub(crate) fn resume_uploads(&self) {
        let Some(worker) = self.worker() else { return };
        let names = self.broker.borrow().owner().durable_names();
        if names.is_empty() {
            return;
        }
        let keys: HashSet<String> = worker
            .block_on(|s| Box::pin(async move { s.list_once("topics").await }))
            .map(|k| k.into_iter().collect())
            .unwrap_or_default();
        let mut broker = self.broker.borrow_mut();
        for topic in names {
            let Some(log) = broker.owner_mut().durable_log_mut(&topic) else { continue };
            for info in log.to_upload() {
                if keys.contains(&segment_key(&self.store, &topic, &info)) {
                    log.uploaded(info.base_seq);
                } else {
                    metrics::add(&self.metrics.upload_backlog_bytes, info.len);
                    self.uploads.borrow_mut().backlog.push_back((topic.clone(), info, 0));
                }
            }
        }
    }
}
