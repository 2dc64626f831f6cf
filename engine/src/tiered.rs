//! Tiered reads, the shell's side: a read or a catch-up that reaches before
//! what a durable topic keeps on disk is served from the segment in the
//! object store. The segment is fetched whole through the node's
//! object-store worker, checked and indexed in bounded steps (the shard
//! yields between them, so live fan-out never waits for a large segment),
//! and kept in a per-shard cache bounded by bytes, so the following pages
//! and catch-up batches of the same segment read memory.
//!
//! Which segment and which records: `proto::durable` (`ReadPlan::archived`,
//! `Fetched`). A segment that cannot be fetched (the store is down, the
//! object was removed by a lifecycle rule, it is damaged) is reported as an
//! error here; catch-ups then skip it and the broker tells the subscriber
//! the exact range as a gap.

use std::collections::VecDeque;
use std::rc::Rc;

use objstore::Job;
use proto::durable::{ArchivedSegment, Fetched, FetchedRead, ReadPlan};
use proto::metrics;
use proto::topic::TopicName;

use crate::archive::segment_key;
use crate::shard::Shard;

/// Bytes of fetched segments a shard keeps for the next pages (with the
/// default 64 MiB segments: two). A single larger segment is still kept,
/// alone, while it is read.
pub const FETCHED_CACHE_BYTES_MAX: usize = 128 << 20;

/// Bytes of a fetched segment checked and indexed between two yields to
/// the shard's other tasks (about a millisecond of CRC32C and parsing).
const INDEX_STEP_BYTES: usize = 256 << 10;

/// A shard's fetched segments, least recently used first.
#[derive(Debug, Default)]
pub struct FetchedCache {
    entries: VecDeque<(TopicName, Rc<Fetched>)>,
    bytes: usize,
}

impl FetchedCache {
    fn get(&mut self, topic: &TopicName, segment: &ArchivedSegment) -> Option<Rc<Fetched>> {
        let i = self.entries.iter().position(|(t, f)| t == topic && f.segment == *segment)?;
        let entry = self.entries.remove(i)?;
        let fetched = entry.1.clone();
        self.entries.push_back(entry);
        Some(fetched)
    }

    fn put(&mut self, topic: TopicName, fetched: Rc<Fetched>) {
        self.bytes += fetched.len();
        self.entries.push_back((topic, fetched));
        while self.bytes > FETCHED_CACHE_BYTES_MAX && self.entries.len() > 1 {
            if let Some((_, old)) = self.entries.pop_front() {
                self.bytes -= old.len();
            }
        }
    }

    /// Forgets a topic's segments (its log was deleted).
    pub fn forget(&mut self, topic: &TopicName) {
        self.entries.retain(|(t, _)| t != topic);
        self.bytes = self.entries.iter().map(|(_, f)| f.len()).sum();
    }
}

impl Shard {
    /// Reads what `plan` asks of its archived segment (`plan.archived`),
    /// fetching the segment unless this shard has it cached. Control queue.
    pub(crate) async fn read_archived(&self, topic: &TopicName, plan: &ReadPlan) -> Result<FetchedRead, String> {
        let Some(segment) = plan.archived else { return Ok(FetchedRead::default()) };
        let cached = self.fetched.borrow_mut().get(topic, &segment);
        let fetched = match cached {
            Some(f) => f,
            None => {
                let fetched = Rc::new(self.fetch_segment(topic, segment).await?);
                self.fetched.borrow_mut().put(topic.clone(), fetched.clone());
                fetched
            }
        };
        Ok(fetched.read(plan))
    }

    /// Fetches an archived segment and checks it record by record.
    async fn fetch_segment(&self, topic: &TopicName, segment: ArchivedSegment) -> Result<Fetched, String> {
        let key = segment_key(&self.store, topic, &segment.info());
        let got = self.run_job(|tag, outcomes| Job::Get { key: key.clone(), tag, outcomes }).await?;
        let bytes = got.ok_or_else(|| format!("{key} is not in the object store"))?;
        let mut fetched = Fetched::new(segment, bytes).map_err(|e| format!("{key}: {e}"))?;
        while !fetched.index_step(INDEX_STEP_BYTES).map_err(|e| format!("{key}: {e}"))? {
            glommio::yield_if_needed().await;
        }
        metrics::add(&self.metrics.segments_fetched, 1);
        metrics::add(&self.metrics.fetched_bytes, fetched.len() as u64);
        tracing::debug!(topic = topic.as_str(), segment = segment.base_seq, bytes = fetched.len(), "segment fetched");
        Ok(fetched)
    }
}
