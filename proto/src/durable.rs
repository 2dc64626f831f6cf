//! Durable topics' logs, sans-IO: what one topic's segmented log holds and
//! what the shell must write, read, cut or delete. Records go in (encoded by
//! [`crate::log`]); write jobs, read plans and expired segments come out.
//! The shell (`engine/src/store.rs`) owns the files and the clock.
//!
//! A topic's log is a list of segments, each named by its first sequence.
//! The last is active: appends go to it until it reaches
//! [`LogLimits::segment_bytes_max`] or [`LogLimits::segment_age_ms`], then
//! the next append opens a new one and the old one is sealed (cut to its
//! exact length once written). Writes are direct I/O, so every write job
//! starts at an aligned offset and is padded with zeros to an aligned
//! length: the last partial block already on disk is written again with the
//! new records after it ([`WRITE_ALIGN_BYTES`]). Zeros after the last record
//! read as a clean end (a record never has length 0).
//!
//! Three indexes, all in memory and rebuilt from the segments on recovery:
//! the sparse index per segment (sequence and time to offset), the
//! segment list (sequence to segment) and the key index (every record's
//! location per key, so a key read touches only that key's records).

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::log::{self, Record, SparseIndex, Torn};

/// Alignment of direct-I/O writes: offsets and lengths are multiples of it
/// (4 KiB covers every logical block size Linux devices use).
pub const WRITE_ALIGN_BYTES: usize = 4096;
/// Default segment size before it rolls: large enough that a segment's
/// open, seal and upload are rare, small enough to read whole on recovery.
pub const SEGMENT_BYTES_MAX_DEFAULT: u64 = 64 << 20;
/// Default segment age before it rolls (retention by age works in whole
/// segments, so this is its granularity): one hour.
pub const SEGMENT_AGE_MS_DEFAULT: u64 = 3_600_000;
/// One sparse-index entry per this many bytes of segment.
pub const INDEX_EVERY_BYTES: usize = 4096;
/// Most messages of one topic sequenced and not yet written. Past it (or
/// past [`UNWRITTEN_BYTES_MAX`]) publishes are refused with
/// `storage_behind` (503, retry). It also bounds the sequences a
/// crash can leave assigned but unwritten: after an unclean stop the
/// topic continues this many sequences later, so no acknowledged number
/// is ever given to another message (see [`TopicLog::recover`]).
pub const UNWRITTEN_MESSAGES_MAX: u64 = 65_536;
/// Most payload bytes of one topic sequenced and not yet written: what a
/// slow disk may make the node hold for it (twice: message and record).
pub const UNWRITTEN_BYTES_MAX: usize = 64 << 20;
/// Largest read plan: bytes of records one read returns at most.
pub const READ_BYTES_MAX: usize = 4 << 20;
/// Smallest catch-up batch, bytes (a record longer than the batch is read
/// alone).
pub const CATCH_UP_BYTES_MIN: usize = 4 << 10;
/// Most messages one read returns.
pub const READ_MESSAGES_MAX: usize = 10_000;

/// When a publisher hears back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AckLevel {
    /// Once sequenced: nothing waits for the disk. A process crash loses
    /// what was not yet written (at most [`UNWRITTEN_MESSAGES_MAX`]).
    None,
    /// Once written, and fsynced under the `always` fsync policy: survives
    /// a process crash; a power failure too under `always`.
    Local,
    /// Once the segment holding it is in the object store: survives the
    /// loss of the node's disk. The segment is sealed early (within the
    /// upload interval) when a publisher waits at this level.
    Stored,
}

impl AckLevel {
    /// Parses the wire name (`none`, `local`, `stored`).
    pub fn parse(s: &str) -> Result<AckLevel, AckError> {
        match s {
            "none" => Ok(AckLevel::None),
            "local" => Ok(AckLevel::Local),
            "stored" => Ok(AckLevel::Stored),
            _ => Err(AckError::Unknown),
        }
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            AckLevel::None => "none",
            AckLevel::Local => "local",
            AckLevel::Stored => "stored",
        }
    }
}

/// What a publish may say besides its payload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishOptions {
    /// The routing key / aggregate id (kept in a durable topic's log and
    /// key index).
    pub key: Option<Bytes>,
    /// When to answer, on a durable topic; its default when `None`.
    /// Ephemeral topics answer once sequenced, whatever it says.
    pub ack: Option<AckLevel>,
    /// A request's return address (request/reply): the topic must have a
    /// consumer group with a member to answer it.
    pub reply_to: Option<crate::message::ReplyTo>,
    /// Kind, id and headers.
    pub meta: Option<std::sync::Arc<crate::message::Meta>>,
}

/// Why an acknowledgement level was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// Not one of the names.
    #[error("ack must be none, local or stored")]
    Unknown,
}

/// When written records are fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Every group commit ends with an fdatasync before anyone is answered.
    Always,
    /// Group commits only write; a timer fsyncs every interval.
    Interval,
}

/// How much of a durable topic is kept. Whole sealed segments go, oldest
/// first, while the segments after them still hold a size or count bound,
/// or once their newest message is older than the age bound (as Kafka's
/// retention works); the active segment always stays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    /// Drop segments whose newest message is older than this, ms.
    pub max_age_ms: Option<u64>,
    /// Keep this many bytes, and at most one segment more.
    pub max_bytes: Option<u64>,
    /// Keep this many messages, and at most one segment more.
    pub max_messages: Option<u64>,
}

/// A durable topic's declaration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DurableSpec {
    /// Retention bounds.
    #[serde(default)]
    pub retention: Retention,
    /// Acknowledgement level of publishes that do not name one.
    #[serde(default = "default_ack")]
    pub ack: AckLevel,
}

fn default_ack() -> AckLevel {
    AckLevel::Local
}

impl Default for DurableSpec {
    fn default() -> DurableSpec {
        DurableSpec { retention: Retention::default(), ack: AckLevel::Local }
    }
}

/// Segment rolling bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// Roll when the active segment reaches this many bytes.
    pub segment_bytes_max: u64,
    /// Roll when the active segment's first record is this old, ms.
    pub segment_age_ms: u64,
}

impl Default for LogLimits {
    fn default() -> LogLimits {
        LogLimits { segment_bytes_max: SEGMENT_BYTES_MAX_DEFAULT, segment_age_ms: SEGMENT_AGE_MS_DEFAULT }
    }
}

/// Where a record with a key lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KeyLoc {
    seq: u64,
    offset: u64,
    len: u32,
}

/// The file next to a topic's segments that lists its archived segments.
pub const ARCHIVED_FILE: &str = "archived.json";

/// A durable topic's `meta.json`, next to its segments (written by the
/// node, and by a restore).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopicMeta {
    /// The topic's name.
    pub topic: String,
    /// Its sequence space, kept across restarts (16 hex digits).
    pub epoch: String,
    /// Its declaration.
    pub spec: DurableSpec,
    /// The last sequence the topic had assigned when it was declared
    /// durable: numbering never restarts below it, even over an empty log.
    #[serde(default)]
    pub seq_floor: u64,
}

/// One segment's state.
#[derive(Debug)]
struct Segment {
    /// Sequence of its first record (its name).
    base_seq: u64,
    /// Sequence of its last record.
    last_seq: u64,
    /// Timestamp of its first and last record, ms.
    first_ms: u64,
    last_ms: u64,
    /// Records in it.
    messages: u64,
    /// Bytes of records appended (written or not).
    len: u64,
    /// Bytes handed to write jobs.
    written: u64,
    /// Bytes known written (and fsynced under `always`): reads stop here.
    durable: u64,
    /// Records appended and not yet in a write job.
    unwritten: Vec<u8>,
    /// Its last write job went out with `seal`: nothing is appended to it
    /// any more.
    sealed: bool,
    /// It is in the object store.
    uploaded: bool,
    /// The bytes of the last partial aligned block handed to a write job
    /// (from `align_down(written)` to `written`): the next job starts there.
    tail: Vec<u8>,
    /// Sequence and time to offset.
    index: SparseIndex,
}

impl Segment {
    fn new(base_seq: u64, first_ms: u64) -> Segment {
        Segment {
            base_seq,
            last_seq: base_seq.saturating_sub(1),
            first_ms,
            last_ms: first_ms,
            messages: 0,
            len: 0,
            written: 0,
            durable: 0,
            unwritten: Vec::new(),
            sealed: false,
            uploaded: false,
            tail: Vec::new(),
            index: SparseIndex::new(INDEX_EVERY_BYTES),
        }
    }
}

/// One write the shell must make, then report with [`TopicLog::written`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteJob {
    /// The segment's first sequence (its file name).
    pub segment: u64,
    /// Where to write: aligned.
    pub offset: u64,
    /// What to write: aligned length, zero-padded after `end`.
    pub bytes: Vec<u8>,
    /// The segment's length in records once written.
    pub end: u64,
    /// The segment is sealed: cut its file to `end` after this write (and
    /// upload it). A seal job may carry no bytes.
    pub seal: bool,
    /// The segment's last sequence once this job is written.
    pub last_seq: u64,
}

/// A sealed segment, for uploads and manifests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Its first sequence (its name).
    pub base_seq: u64,
    /// Its last sequence.
    pub last_seq: u64,
    /// Its length, bytes.
    pub len: u64,
}

/// A segment that retention removed from local disk after it was
/// uploaded: still read from the object store (tiered reads). The shell
/// keeps a topic's list next to its segments, so it survives a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedSegment {
    /// Its first sequence (its name).
    pub base_seq: u64,
    /// Its last sequence.
    pub last_seq: u64,
    /// Its length, bytes.
    pub len: u64,
    /// Timestamp of its first and last record, ms.
    pub first_ms: u64,
    /// Timestamp of its last record, ms.
    pub last_ms: u64,
}

impl ArchivedSegment {
    /// Its name and extent, as uploaded.
    pub fn info(&self) -> SegmentInfo {
        SegmentInfo { base_seq: self.base_seq, last_seq: self.last_seq, len: self.len }
    }
}

/// A durable topic's log as its hand-off to the next owner node carries
/// it: its declaration and its segments, every one of them in the object
/// store (the giving node uploads them first), so the next owner reads
/// them from there (tiered reads) and appends after them, and its
/// consumer groups' positions, so that they go on where they stood
/// (what they held unacknowledged is delivered again). Nodes of a
/// cluster share one object store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurableHandOff {
    /// Its declaration.
    pub spec: DurableSpec,
    /// Its segments, oldest first, all in the object store.
    pub segments: Vec<ArchivedSegment>,
    /// Its consumer groups (at most `group::GROUPS_PER_TOPIC_MAX`).
    pub groups: Vec<crate::group::SavedGroup>,
}

/// Segments a hand-off carries at most (40 bytes each: 2.6 MB). A log with
/// more hands off its newest; older ones stay in the object store but are
/// no longer listed (a read from before them is told the gap).
pub const HANDOFF_SEGMENTS_MAX: usize = 65_536;

/// A byte range of one segment to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRange {
    /// The segment's first sequence (its file name).
    pub segment: u64,
    /// Start offset.
    pub offset: u64,
    /// Length, bytes.
    pub len: u64,
}

/// What a read asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadFrom {
    /// Records with sequence >= this.
    Seq(u64),
    /// Records with timestamp >= this, ms.
    Time(u64),
    /// Records with this key and sequence >= `from_seq`.
    Key { key: Bytes, from_seq: u64 },
}

/// A read's plan: the ranges to read, in log order, and how to filter the
/// records found in them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadPlan {
    /// Ranges to read; each starts at a record.
    pub ranges: Vec<ReadRange>,
    /// Keep records with sequence >= this.
    pub from_seq: u64,
    /// Keep records with sequence <= this.
    pub to_seq: u64,
    /// Keep records with timestamp >= this.
    pub from_ms: u64,
    /// Keep only records with this key.
    pub key: Option<Bytes>,
    /// Stop after this many records.
    pub limit: usize,
    /// Read this segment from the object store instead of `ranges` (the
    /// reader is before what is on disk); see [`Fetched::read`].
    pub archived: Option<ArchivedSegment>,
    /// About how many bytes of records to read from an archived segment.
    pub max_bytes: usize,
}

impl ReadPlan {
    /// The same plan with its ranges extended to `bytes` each (for a
    /// record longer than the first plan's budget), within `log`'s
    /// written bytes.
    pub fn grown(&self, log: &TopicLog, bytes: u64) -> ReadPlan {
        let ranges = self
            .ranges
            .iter()
            .map(|r| {
                let durable =
                    log.segments.iter().find(|s| s.base_seq == r.segment).map_or(r.offset + r.len, |s| s.durable);
                ReadRange { len: bytes.max(r.len).min(durable - r.offset), ..*r }
            })
            .collect();
        ReadPlan { ranges, key: self.key.clone(), ..*self }
    }

    /// Whether `record` is one the reader asked for.
    pub fn wants(&self, record: &Record) -> bool {
        record.seq >= self.from_seq
            && record.seq <= self.to_seq
            && record.timestamp_ms >= self.from_ms
            && self.key.as_ref().is_none_or(|k| record.key.as_ref() == Some(k))
    }
}

/// What recovery found in one topic's segments.
#[derive(Debug)]
pub struct Recovered {
    /// The log, ready for appends after `next_seq - 1`.
    pub log: TopicLog,
    /// The sequence the next message gets.
    pub next_seq: u64,
    /// Segments whose tail was not whole: cut the file to this length.
    pub cut: Vec<(u64, u64, Torn)>,
    /// Segments after a damaged one: not trusted, delete them.
    pub dropped: Vec<u64>,
    /// The last records, for the in-memory history (at most `tail_max`).
    pub tail: Vec<Record>,
}

/// One durable topic's log.
#[derive(Debug)]
pub struct TopicLog {
    /// Oldest first; the last is active.
    segments: VecDeque<Segment>,
    /// Segments before the first on disk, only in the object store, oldest
    /// first; the last ends just before the first on disk.
    archived: VecDeque<ArchivedSegment>,
    /// Where each key's records lie, oldest first.
    keys: HashMap<Bytes, Vec<KeyLoc>, ahash::RandomState>,
    /// Bounds.
    limits: LogLimits,
    /// Scratch for encoding.
    scratch: Vec<u8>,
    /// Seal the active segment at the next `take_writes`.
    seal_requested: bool,
}

impl TopicLog {
    /// An empty log.
    pub fn new(limits: LogLimits) -> TopicLog {
        TopicLog {
            segments: VecDeque::new(),
            archived: VecDeque::new(),
            keys: HashMap::default(),
            limits,
            scratch: Vec::new(),
            seal_requested: false,
        }
    }

    /// Appends a record (its sequence after every one before), rolling to a
    /// new segment first when the active one is full or old. The record is
    /// not readable until a write job carrying it is reported written.
    pub fn append(&mut self, record: &Record) -> Result<(), log::EncodeError> {
        self.scratch.clear();
        log::encode(record, &mut self.scratch)?;
        let roll = self.segments.back().is_none_or(|s| {
            s.sealed
                || s.messages > 0
                    && (s.len >= self.limits.segment_bytes_max
                        || record.timestamp_ms.saturating_sub(s.first_ms) >= self.limits.segment_age_ms)
        });
        if roll {
            self.segments.push_back(Segment::new(record.seq, record.timestamp_ms));
        }
        let Some(seg) = self.segments.back_mut() else { return Ok(()) };
        if seg.messages == 0 {
            seg.first_ms = record.timestamp_ms;
        }
        let offset = seg.len;
        seg.index.appended(record.seq, record.timestamp_ms, offset as usize);
        seg.unwritten.extend_from_slice(&self.scratch);
        seg.len += self.scratch.len() as u64;
        seg.last_seq = record.seq;
        seg.last_ms = record.timestamp_ms;
        seg.messages += 1;
        if let Some(key) = &record.key {
            let loc = KeyLoc { seq: record.seq, offset, len: self.scratch.len() as u32 };
            self.keys.entry(key.clone()).or_default().push(loc);
        }
        Ok(())
    }

    /// The writes that carry every record appended since the last call, one
    /// per segment with unwritten records or a seal due, oldest first.
    pub fn take_writes(&mut self) -> Vec<WriteJob> {
        let active = self.segments.len().saturating_sub(1);
        let seal_active = std::mem::take(&mut self.seal_requested);
        let mut jobs = Vec::new();
        for (i, seg) in self.segments.iter_mut().enumerate() {
            let seal = !seg.sealed && seg.messages > 0 && (i < active || seal_active);
            if seg.unwritten.is_empty() && !seal {
                continue;
            }
            let offset = align_down(seg.written);
            let mut bytes = Vec::new();
            if !seg.unwritten.is_empty() {
                bytes = std::mem::take(&mut seg.tail);
                bytes.extend_from_slice(&seg.unwritten);
                seg.unwritten.clear();
                seg.written = seg.len;
                let whole = align_down(seg.len) - offset;
                seg.tail = bytes[whole as usize..].to_vec();
                bytes.resize(align_up(bytes.len() as u64) as usize, 0);
            }
            seg.sealed |= seal;
            let job = WriteJob { segment: seg.base_seq, offset, bytes, end: seg.len, seal, last_seq: seg.last_seq };
            jobs.push(job);
        }
        jobs
    }

    /// Seals the active segment at the next `take_writes` (for an upload
    /// that cannot wait for it to fill); false when it holds nothing.
    pub fn seal_active(&mut self) -> bool {
        let due = self.segments.back().is_some_and(|s| !s.sealed && s.messages > 0);
        self.seal_requested |= due;
        due
    }

    /// Notes that a sealed segment is in the object store.
    pub fn uploaded(&mut self, segment: u64) {
        if let Some(seg) = self.segments.iter_mut().find(|s| s.base_seq == segment) {
            seg.uploaded = true;
        }
    }

    /// The last sequence of the oldest segments that are all in the object
    /// store (0 when the oldest is not): what `stored` may answer through.
    pub fn uploaded_through(&self) -> u64 {
        self.segments.iter().take_while(|s| s.uploaded).last().map_or(0, |s| s.last_seq)
    }

    /// Sealed segments not yet uploaded (after a restart: all of them).
    pub fn to_upload(&self) -> Vec<SegmentInfo> {
        self.segments.iter().filter(|s| s.sealed && !s.uploaded && s.durable == s.len).map(info).collect()
    }

    /// Every segment in the object store that a manifest lists, oldest
    /// first: the archived ones, then the oldest on disk that are all
    /// uploaded (never one after a segment that is not there).
    pub fn stored_segments(&self) -> Vec<ArchivedSegment> {
        let on_disk = self.segments.iter().take_while(|s| s.uploaded).map(|s| ArchivedSegment {
            base_seq: s.base_seq,
            last_seq: s.last_seq,
            len: s.len,
            first_ms: s.first_ms,
            last_ms: s.last_ms,
        });
        self.archived.iter().copied().chain(on_disk).collect()
    }

    /// Notes that a write job's bytes are on disk (fsynced when the policy
    /// says so): its records can be read.
    pub fn written(&mut self, segment: u64, end: u64) {
        if let Some(seg) = self.segments.iter_mut().find(|s| s.base_seq == segment) {
            seg.durable = seg.durable.max(end);
        }
    }

    /// Segments to delete under `retention` at `now_ms`, oldest first; they
    /// are forgotten here (the shell deletes the files). With `archiving`,
    /// only segments already in the object store go, and they stay
    /// readable from there ([`TopicLog::archived`]).
    pub fn expire(&mut self, retention: &Retention, now_ms: u64, archiving: bool) -> Vec<u64> {
        let mut gone = Vec::new();
        while self.segments.len() > 1 {
            let Some(oldest) = self.segments.front() else { break };
            // As Kafka does: a segment goes when the rest still holds the bound.
            let over_bytes = retention.max_bytes.is_some_and(|max| self.bytes() - oldest.len >= max);
            let over_messages = retention.max_messages.is_some_and(|max| self.messages() - oldest.messages >= max);
            let over_age = retention.max_age_ms.is_some_and(|max| now_ms.saturating_sub(oldest.last_ms) > max);
            let whole = oldest.durable == oldest.len && (!archiving || oldest.uploaded);
            if !whole || !(over_bytes || over_messages || over_age) {
                break;
            }
            gone.push(oldest.base_seq);
            if archiving {
                self.archived.push_back(ArchivedSegment {
                    base_seq: oldest.base_seq,
                    last_seq: oldest.last_seq,
                    len: oldest.len,
                    first_ms: oldest.first_ms,
                    last_ms: oldest.last_ms,
                });
            }
            self.segments.pop_front();
        }
        if !gone.is_empty() {
            let first = self.first_seq();
            self.keys.retain(|_, locs| {
                locs.retain(|l| l.seq >= first);
                !locs.is_empty()
            });
        }
        gone
    }

    /// The ranges to read for `from`, at most `limit` records and about
    /// [`READ_BYTES_MAX`] bytes, over what is on disk only.
    pub fn plan(&self, from: ReadFrom, limit: usize) -> ReadPlan {
        let limit = limit.clamp(1, READ_MESSAGES_MAX);
        let mut plan = ReadPlan {
            ranges: Vec::new(),
            from_seq: 0,
            to_seq: u64::MAX,
            from_ms: 0,
            key: None,
            limit,
            archived: None,
            max_bytes: READ_BYTES_MAX,
        };
        match from {
            ReadFrom::Key { key, from_seq } if self.archived_holding(from_seq).is_some() => {
                // The key index covers what is on disk: an archived segment
                // is scanned, about `max_bytes` a page.
                plan.archived = self.archived_holding(from_seq);
                plan.from_seq = from_seq;
                plan.key = Some(key);
            }
            ReadFrom::Seq(seq) if self.archived_holding(seq).is_some() => {
                plan.archived = self.archived_holding(seq);
                plan.from_seq = seq;
            }
            ReadFrom::Time(ms) if self.archived.back().is_some_and(|a| a.last_ms >= ms) => {
                plan.archived = self.archived.iter().find(|a| a.last_ms >= ms).copied();
                plan.from_ms = ms;
            }
            ReadFrom::Key { key, from_seq } => {
                let locs = self.keys.get(&key).map(Vec::as_slice).unwrap_or(&[]);
                let start = locs.partition_point(|l| l.seq < from_seq);
                let mut bytes = 0;
                for loc in locs[start..].iter().take(limit) {
                    let Some(seg) = self.segment_of(loc.seq) else { continue };
                    if loc.offset + u64::from(loc.len) > seg.durable || bytes >= READ_BYTES_MAX {
                        break;
                    }
                    bytes += loc.len as usize;
                    plan.ranges.push(ReadRange { segment: seg.base_seq, offset: loc.offset, len: u64::from(loc.len) });
                }
                plan.from_seq = from_seq;
                plan.key = Some(key);
            }
            ReadFrom::Seq(seq) => {
                plan.from_seq = seq;
                let first = self.segments.partition_point(|s| s.last_seq < seq);
                let start = |s: &Segment| s.index.offset_for_seq(seq) as u64;
                self.plan_segments(first, start, READ_BYTES_MAX as u64, &mut plan.ranges);
            }
            ReadFrom::Time(ms) => {
                plan.from_ms = ms;
                let first = self.segments.partition_point(|s| s.last_ms < ms);
                let start = |s: &Segment| s.index.offset_for_time(ms) as u64;
                self.plan_segments(first, start, READ_BYTES_MAX as u64, &mut plan.ranges);
            }
        }
        plan
    }

    /// The ranges holding sequences `from_seq..=to_seq`, about `max_bytes`
    /// of them at most (at least one record's worth): a catch-up batch.
    pub fn plan_range(&self, from_seq: u64, to_seq: u64, max_bytes: usize) -> ReadPlan {
        // A record longer than the budget is cut and not returned: the
        // shell reads again with a larger one (see `grown`).
        let budget = max_bytes.max(CATCH_UP_BYTES_MIN);
        let mut plan = ReadPlan {
            ranges: Vec::new(),
            from_seq,
            to_seq,
            from_ms: 0,
            key: None,
            limit: READ_MESSAGES_MAX,
            archived: self.archived_holding(from_seq),
            max_bytes: budget,
        };
        if plan.archived.is_none() {
            let first = self.segments.partition_point(|s| s.last_seq < from_seq);
            let start = |s: &Segment| s.index.offset_for_seq(from_seq) as u64;
            self.plan_segments(first, start, budget as u64, &mut plan.ranges);
        }
        plan
    }

    /// The archived segment holding `seq` or the first after it, when `seq`
    /// is before what is on disk.
    fn archived_holding(&self, seq: u64) -> Option<ArchivedSegment> {
        if seq >= self.first_seq() {
            return None;
        }
        self.archived.iter().find(|a| a.last_seq >= seq).copied()
    }

    /// Segments only in the object store, oldest first.
    pub fn archived(&self) -> impl Iterator<Item = &ArchivedSegment> {
        self.archived.iter()
    }

    /// Takes a recovered list of archived segments (kept by the shell):
    /// those that end before the first segment on disk, in order, without
    /// overlaps.
    pub fn set_archived(&mut self, list: impl IntoIterator<Item = ArchivedSegment>) {
        let first_local = self.segments.front().map_or(u64::MAX, |s| s.base_seq);
        self.archived.clear();
        for a in list {
            let after_last = self.archived.back().is_none_or(|b| a.base_seq > b.last_seq);
            if a.last_seq < first_local && a.base_seq <= a.last_seq && after_last {
                self.archived.push_back(a);
            }
        }
    }

    /// First sequence a read can reach: in the object store when segments
    /// were archived, else on disk.
    pub fn first_readable_seq(&self) -> u64 {
        self.archived.front().map_or_else(|| self.first_seq(), |a| a.base_seq)
    }

    /// Bytes of the archived segments.
    pub fn archived_bytes(&self) -> u64 {
        self.archived.iter().map(|a| a.len).sum()
    }

    /// Ranges from segment `first` on, starting in it at `start(seg)`,
    /// until `budget` bytes.
    fn plan_segments(&self, first: usize, start: impl Fn(&Segment) -> u64, budget: u64, ranges: &mut Vec<ReadRange>) {
        let mut budget = budget;
        for (i, seg) in self.segments.iter().enumerate().skip(first) {
            let offset = if i == first { start(seg).min(seg.durable) } else { 0 };
            let len = (seg.durable - offset).min(budget);
            if len == 0 {
                break;
            }
            ranges.push(ReadRange { segment: seg.base_seq, offset, len });
            budget -= len;
            if budget == 0 || seg.durable < seg.len {
                break;
            }
        }
    }

    /// The segment holding `seq`, if retained.
    fn segment_of(&self, seq: u64) -> Option<&Segment> {
        let i = self.segments.partition_point(|s| s.last_seq < seq);
        self.segments.get(i).filter(|s| s.base_seq <= seq)
    }

    /// First retained sequence (the next one when the log is empty).
    pub fn first_seq(&self) -> u64 {
        self.segments.iter().find(|s| s.messages > 0).map_or(self.next_seq(), |s| s.base_seq)
    }

    /// The sequence after the last appended (after the last archived
    /// when nothing is on disk: a log taken over from another node).
    pub fn next_seq(&self) -> u64 {
        match self.segments.back() {
            Some(s) => s.last_seq + 1,
            None => self.archived.back().map_or(1, |a| a.last_seq + 1),
        }
    }

    /// Whether every record is in the object store: nothing sealed or
    /// open is waiting for its upload (what a hand-off to another node
    /// needs). An empty active segment counts as stored.
    pub fn all_stored(&self) -> bool {
        self.segments.iter().all(|s| s.messages == 0 || (s.uploaded && s.sealed))
    }

    /// A log that holds nothing on disk, only `segments` in the object
    /// store (taken over from another node): appends go after them.
    pub fn in_store(limits: LogLimits, segments: impl IntoIterator<Item = ArchivedSegment>) -> TopicLog {
        let mut log = TopicLog::new(limits);
        log.set_archived(segments);
        log
    }

    /// The last record's sequence, on disk or archived (0 when none).
    pub fn last_record_seq(&self) -> u64 {
        let on_disk = self.segments.iter().rev().find(|s| s.messages > 0).map_or(0, |s| s.last_seq);
        on_disk.max(self.archived.back().map_or(0, |a| a.last_seq))
    }

    /// Bytes of records retained.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Records retained.
    pub fn messages(&self) -> u64 {
        self.segments.iter().map(|s| s.messages).sum()
    }

    /// A sequence after which every record at or after `ms` lies (a lower
    /// bound from the sparse index: records of up to one index step before
    /// `ms` may follow it); the one before the log's first when none is
    /// known older.
    pub fn seq_bound_before_time(&self, ms: u64) -> u64 {
        if self.archived.back().is_some_and(|a| a.last_ms >= ms) {
            // In the object store: no index in memory, so from the start of
            // the archived segment that reaches `ms`.
            let holding = self.archived.iter().find(|a| a.last_ms >= ms);
            return holding.map_or(0, |a| a.base_seq.saturating_sub(1));
        }
        let first = self.first_seq().saturating_sub(1);
        let i = self.segments.partition_point(|s| s.last_ms < ms);
        let Some(seg) = self.segments.get(i) else { return self.next_seq().saturating_sub(1) };
        match seg.index.entry_before_time(ms) {
            Some(seq) => seq - 1,
            None if i > 0 => self.segments[i - 1].last_seq,
            None => first,
        }
    }

    /// Segments retained.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Records with `key` and sequence >= `from_seq`.
    pub fn key_records(&self, key: &Bytes, from_seq: u64) -> usize {
        self.keys.get(key).map_or(0, |locs| locs.len() - locs.partition_point(|l| l.seq < from_seq))
    }

    /// Distinct keys indexed.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Rebuilds a log from its segments' contents (oldest first, each with
    /// its first sequence), as found on disk after a stop. A torn or damaged
    /// tail is cut; segments after a damaged one are dropped (never a
    /// silent hole in the middle). After an unclean stop (`clean` false)
    /// the next sequence skips [`UNWRITTEN_MESSAGES_MAX`], past any number
    /// a publisher may have been told and the crash lost. `tail_max` bounds
    /// the records returned for the in-memory history; their payloads are
    /// copies, so the segments' buffers are not kept.
    pub fn recover(
        segments: impl IntoIterator<Item = (u64, Bytes)>,
        clean: bool,
        seq_floor: u64,
        limits: LogLimits,
        tail_max: usize,
    ) -> Recovered {
        let mut log = TopicLog::new(limits);
        let mut cut = Vec::new();
        let mut dropped = Vec::new();
        let mut tail: VecDeque<Record> = VecDeque::new();
        let mut damaged = false;
        for (base, bytes) in segments {
            if damaged {
                dropped.push(base);
                continue;
            }
            let scan = log::scan(&bytes);
            let padding = bytes[scan.whole_bytes..].iter().all(|&b| b == 0);
            if let Some(torn) = scan.torn {
                cut.push((base, scan.whole_bytes as u64, torn));
                // Zeros are the padding of the last aligned write: a clean end.
                damaged = !padding;
            }
            if scan.records.is_empty() {
                dropped.push(base);
                continue;
            }
            let mut seg = Segment::new(base, 0);
            for (offset, record) in &scan.records {
                seg.index.appended(record.seq, record.timestamp_ms, *offset);
                if seg.messages == 0 {
                    seg.first_ms = record.timestamp_ms;
                }
                seg.messages += 1;
                seg.last_seq = record.seq;
                seg.last_ms = record.timestamp_ms;
                if let Some(key) = &record.key {
                    let next = scan.records.get((seg.messages) as usize).map_or(scan.whole_bytes, |r| r.0);
                    let len = (next - offset) as u32;
                    let loc = KeyLoc { seq: record.seq, offset: *offset as u64, len };
                    log.keys.entry(Bytes::copy_from_slice(key)).or_default().push(loc);
                }
            }
            seg.len = scan.whole_bytes as u64;
            seg.written = seg.len;
            seg.durable = seg.len;
            // All but the last were sealed; the last is marked below.
            seg.sealed = true;
            let whole = align_down(seg.len) as usize;
            seg.tail = bytes[whole..scan.whole_bytes].to_vec();
            for (_, record) in scan.records.iter().rev().take(tail_max).rev() {
                if tail.len() == tail_max {
                    tail.pop_front();
                }
                tail.push_back(Record { payload: Bytes::copy_from_slice(&record.payload), ..record.clone() });
            }
            log.segments.push_back(seg);
        }
        // Every recovered segment stays sealed (its file was cut to its
        // records): appends go to a new one, so a segment already in the
        // object store never changes under its key.
        let skip = if clean { 0 } else { UNWRITTEN_MESSAGES_MAX };
        let next_seq = log.next_seq().max(seq_floor + 1) + skip;
        Recovered { log, next_seq, cut, dropped, tail: tail.into() }
    }
}

/// An archived segment fetched back from the object store, indexed for
/// reads. The shell fetches it, calls [`Fetched::index_step`] until it is
/// whole (in bounded steps, between which it yields), caches it, and serves
/// archived read plans from it with [`Fetched::read`].
#[derive(Debug)]
pub struct Fetched {
    /// The segment it is.
    pub segment: ArchivedSegment,
    bytes: Bytes,
    index: SparseIndex,
    /// Offset up to which records are checked and indexed.
    indexed_to: usize,
    /// Sequence of the last record indexed.
    last_indexed: u64,
}

/// Why a fetched object is not the archived segment it should be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// Its length is not the segment's.
    #[error("{got} bytes where the segment had {want}")]
    Length {
        /// Bytes fetched.
        got: usize,
        /// Bytes the segment had.
        want: u64,
    },
    /// A record in it is damaged.
    #[error("damaged record at offset {offset}: {torn:?}")]
    Damaged {
        /// Where.
        offset: usize,
        /// How.
        torn: Torn,
    },
    /// Its records do not end at the segment's last sequence.
    #[error("records end at {got}, the segment at {want}")]
    LastSeq {
        /// Last sequence found.
        got: u64,
        /// The segment's.
        want: u64,
    },
}

/// What [`Fetched::read`] found.
#[derive(Debug, Default)]
pub struct FetchedRead {
    /// The records the plan wants, in order.
    pub records: Vec<Record>,
    /// The sequence to continue from (the one after the last record looked
    /// at): a read that reached the segment's end continues after it.
    pub next_seq: u64,
}

impl Fetched {
    /// A fetched object, not yet checked; `Err` when its length is wrong.
    pub fn new(segment: ArchivedSegment, bytes: Bytes) -> Result<Fetched, FetchError> {
        if bytes.len() as u64 != segment.len {
            return Err(FetchError::Length { got: bytes.len(), want: segment.len });
        }
        Ok(Fetched { segment, bytes, index: SparseIndex::new(INDEX_EVERY_BYTES), indexed_to: 0, last_indexed: 0 })
    }

    /// Checks and indexes about `budget` more bytes of records: `Ok(true)`
    /// once the whole segment is, `Err` when it is not the segment.
    pub fn index_step(&mut self, budget: usize) -> Result<bool, FetchError> {
        let stop = self.indexed_to.saturating_add(budget.max(1));
        while self.indexed_to < self.bytes.len() && self.indexed_to < stop {
            let at = self.indexed_to;
            let (record, next) =
                log::read_one(&self.bytes, at).map_err(|torn| FetchError::Damaged { offset: at, torn })?;
            self.index.appended(record.seq, record.timestamp_ms, at);
            self.last_indexed = record.seq;
            self.indexed_to = next;
        }
        let done = self.indexed_to == self.bytes.len();
        if done && self.last_indexed != self.segment.last_seq {
            return Err(FetchError::LastSeq { got: self.last_indexed, want: self.segment.last_seq });
        }
        Ok(done)
    }

    /// Bytes it holds (for the shell's cache bound).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The records of this segment that `plan` wants (its `archived` is this
    /// segment), starting from the sparse index: at most `plan.limit`, and
    /// about `plan.max_bytes` of records looked at (at least one), not
    /// counting those before the plan's start. Payloads share the fetched
    /// buffer. Call once indexed.
    pub fn read(&self, plan: &ReadPlan) -> FetchedRead {
        let mut at = if plan.from_ms > 0 {
            self.index.offset_for_time(plan.from_ms)
        } else {
            self.index.offset_for_seq(plan.from_seq)
        };
        let mut out = FetchedRead { records: Vec::new(), next_seq: self.segment.last_seq + 1 };
        let mut looked = 0;
        while at < self.bytes.len() {
            let Ok((record, next)) = log::read_one(&self.bytes, at) else { break };
            let before_start = record.seq < plan.from_seq || record.timestamp_ms < plan.from_ms;
            if record.seq > plan.to_seq {
                out.next_seq = record.seq;
                break;
            }
            if !before_start {
                if looked >= plan.max_bytes || out.records.len() >= plan.limit {
                    out.next_seq = record.seq;
                    break;
                }
                looked += next - at;
            }
            if plan.wants(&record) {
                out.records.push(record);
            }
            at = next;
        }
        out
    }
}

/// How many of a restored topic's segments (oldest first, as a snapshot
/// lists them) stay in the object store only: those `retention` would
/// have expired from disk at `now_ms` (the rule of [`TopicLog::expire`]).
/// The newest always comes to disk.
pub fn left_in_store(segments: &[ArchivedSegment], retention: &Retention, now_ms: u64) -> usize {
    let mut bytes: u64 = segments.iter().map(|s| s.len).sum();
    let mut messages: u64 = segments.iter().map(|s| s.last_seq + 1 - s.base_seq).sum();
    let mut left = 0;
    for s in segments.iter().take(segments.len().saturating_sub(1)) {
        let count = s.last_seq + 1 - s.base_seq;
        let over_bytes = retention.max_bytes.is_some_and(|max| bytes - s.len >= max);
        let over_messages = retention.max_messages.is_some_and(|max| messages - count >= max);
        let over_age = retention.max_age_ms.is_some_and(|max| s.last_ms > 0 && now_ms.saturating_sub(s.last_ms) > max);
        if !(over_bytes || over_messages || over_age) {
            break;
        }
        bytes -= s.len;
        messages -= count;
        left += 1;
    }
    left
}

fn info(s: &Segment) -> SegmentInfo {
    SegmentInfo { base_seq: s.base_seq, last_seq: s.last_seq, len: s.len }
}

fn align_down(v: u64) -> u64 {
    v - v % WRITE_ALIGN_BYTES as u64
}

fn align_up(v: u64) -> u64 {
    v.div_ceil(WRITE_ALIGN_BYTES as u64) * WRITE_ALIGN_BYTES as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::PayloadKind;

    fn record(seq: u64, key: Option<&str>, len: usize) -> Record {
        Record {
            seq,
            timestamp_ms: 1_000 + seq,
            kind: PayloadKind::Binary,
            key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
            headers: Vec::new(),
            payload: Bytes::from(vec![(seq % 251) as u8; len]),
        }
    }

    /// A file as the shell writes it: each job at its offset, sealed
    /// segments cut to their end.
    fn apply(files: &mut HashMap<u64, Vec<u8>>, log: &mut TopicLog) {
        for job in log.take_writes() {
            assert_eq!(job.offset % WRITE_ALIGN_BYTES as u64, 0);
            assert_eq!(job.bytes.len() % WRITE_ALIGN_BYTES, 0);
            let file = files.entry(job.segment).or_default();
            let end = job.offset as usize + job.bytes.len();
            if file.len() < end && !job.bytes.is_empty() {
                file.resize(end, 0);
            }
            if !job.bytes.is_empty() {
                file[job.offset as usize..end].copy_from_slice(&job.bytes);
            }
            if job.seal {
                file.truncate(job.end as usize);
            }
            log.written(job.segment, job.end);
        }
    }

    fn read(files: &HashMap<u64, Vec<u8>>, plan: &ReadPlan) -> Vec<Record> {
        let mut out = Vec::new();
        for r in &plan.ranges {
            let bytes = Bytes::copy_from_slice(&files[&r.segment][r.offset as usize..(r.offset + r.len) as usize]);
            out.extend(log::scan(&bytes).records.into_iter().map(|(_, rec)| rec).filter(|rec| plan.wants(rec)));
        }
        out.truncate(plan.limit);
        out
    }

    fn sorted(files: &HashMap<u64, Vec<u8>>) -> Vec<(u64, Bytes)> {
        let mut all: Vec<_> = files.iter().map(|(k, v)| (*k, Bytes::copy_from_slice(v))).collect();
        all.sort_by_key(|(k, _)| *k);
        all
    }

    #[test]
    fn group_commits_rewrite_the_partial_block_and_reads_see_only_written_records() {
        let limits = LogLimits { segment_bytes_max: 10_000, segment_age_ms: u64::MAX };
        let mut log = TopicLog::new(limits);
        let mut files = HashMap::new();
        for seq in 1..=300 {
            log.append(&record(seq, Some(["a", "b", "c"][seq as usize % 3]), 100 + seq as usize % 37)).unwrap();
            if seq % 7 == 0 {
                apply(&mut files, &mut log);
            }
        }
        // 295 records written; 296..=300 appended only.
        let all = read(&files, &log.plan(ReadFrom::Seq(1), 10_000));
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), (1..=294).collect::<Vec<_>>());
        apply(&mut files, &mut log);
        let all = read(&files, &log.plan(ReadFrom::Seq(1), 10_000));
        assert_eq!(all.len(), 300);
        assert!(log.segment_count() > 3, "rolled by size: {}", log.segment_count());
        let from = read(&files, &log.plan(ReadFrom::Seq(123), 5));
        assert_eq!(from.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![123, 124, 125, 126, 127]);
        let since = read(&files, &log.plan(ReadFrom::Time(1_000 + 250), 10_000));
        assert_eq!(since.first().map(|r| r.seq), Some(250));
        // A subscription from that time starts at or before 250.
        let bound = log.seq_bound_before_time(1_000 + 250);
        assert!(bound < 250 && bound > 200, "{bound}");
        assert_eq!(log.seq_bound_before_time(0), 0);
        let b = read(&files, &log.plan(ReadFrom::Key { key: Bytes::from_static(b"b"), from_seq: 0 }, 10_000));
        assert_eq!(b.len(), 100);
        assert!(b.iter().all(|r| r.seq % 3 == 1));
        assert!(b.windows(2).all(|w| w[0].seq < w[1].seq));
    }

    #[test]
    fn recovery_rebuilds_the_same_log_and_cuts_a_torn_tail_at_every_length() {
        let limits = LogLimits { segment_bytes_max: 3_000, segment_age_ms: u64::MAX };
        let mut log = TopicLog::new(limits);
        let mut files = HashMap::new();
        for seq in 1..=60 {
            log.append(&record(seq, Some(if seq % 2 == 0 { "even" } else { "odd" }), 90)).unwrap();
            apply(&mut files, &mut log);
        }
        let clean = TopicLog::recover(sorted(&files), true, 0, limits, 10);
        assert_eq!(clean.next_seq, 61);
        assert!(clean.cut.iter().all(|c| c.2 == Torn::BadLength), "only padding: {:?}", clean.cut);
        assert_eq!(clean.tail.iter().map(|r| r.seq).collect::<Vec<_>>(), (51..=60).collect::<Vec<_>>());
        let even = clean.log.plan(ReadFrom::Key { key: Bytes::from_static(b"even"), from_seq: 0 }, 100);
        assert_eq!(read(&files, &even).len(), 30);
        // Cut the last segment at every length: recovery keeps exactly the
        // whole records, and an unclean stop skips ahead.
        let last = *files.keys().max().unwrap();
        let full = files[&last].clone();
        let whole = log::scan(&Bytes::from(full.clone())).whole_bytes;
        for cut_at in 0..whole {
            let mut torn = files.clone();
            torn.get_mut(&last).unwrap().truncate(cut_at);
            let r = TopicLog::recover(sorted(&torn), false, 0, limits, 10);
            let kept = log::scan(&Bytes::copy_from_slice(&full[..cut_at])).records.len() as u64;
            let last_kept = if kept == 0 { last - 1 } else { last + kept - 1 };
            assert_eq!(r.log.next_seq(), last_kept + 1, "cut at {cut_at}");
            assert_eq!(r.next_seq, last_kept + 1 + UNWRITTEN_MESSAGES_MAX);
        }
        // A floor from the topic's declaration holds even over an empty log,
        // and a crash skips from there too.
        assert_eq!(TopicLog::recover(Vec::new(), true, 100, limits, 10).next_seq, 101);
        assert_eq!(TopicLog::recover(Vec::new(), false, 100, limits, 10).next_seq, 101 + UNWRITTEN_MESSAGES_MAX);
        // Recovered segments stay sealed: the next append opens a new one.
        let mut again = TopicLog::recover(sorted(&files), true, 0, limits, 10).log;
        let before = again.segment_count();
        again.append(&record(61, None, 10)).unwrap();
        assert_eq!(again.segment_count(), before + 1);
        assert_eq!(again.to_upload().len(), before, "every recovered segment is offered for upload");
    }

    #[test]
    fn a_sealed_segment_is_offered_for_upload_once_and_retention_waits_for_it() {
        let limits = LogLimits { segment_bytes_max: 1 << 20, segment_age_ms: u64::MAX };
        let mut log = TopicLog::new(limits);
        let mut files = HashMap::new();
        assert!(!log.seal_active(), "nothing to seal");
        for seq in 1..=5 {
            log.append(&record(seq, None, 10)).unwrap();
        }
        apply(&mut files, &mut log);
        assert!(log.to_upload().is_empty(), "the active segment is not sealed");
        assert!(log.seal_active());
        let jobs = log.take_writes();
        assert_eq!(jobs.len(), 1);
        assert!(jobs[0].seal && jobs[0].bytes.is_empty() && jobs[0].last_seq == 5);
        log.written(jobs[0].segment, jobs[0].end);
        assert_eq!(log.to_upload(), [SegmentInfo { base_seq: 1, last_seq: 5, len: jobs[0].end }]);
        // The next append opens a new segment.
        log.append(&record(6, None, 10)).unwrap();
        apply(&mut files, &mut log);
        assert_eq!(log.segment_count(), 2);
        assert!(log.take_writes().is_empty(), "a seal goes out once");
        let keep_one = Retention { max_messages: Some(1), ..Retention::default() };
        assert!(log.expire(&keep_one, 0, true).is_empty(), "not uploaded yet");
        log.uploaded(1);
        assert_eq!(log.stored_segments().len(), 1);
        assert_eq!(log.expire(&keep_one, 0, true), [1]);
    }

    #[test]
    fn retention_drops_whole_sealed_segments_and_their_keys() {
        let limits = LogLimits { segment_bytes_max: 2_000, segment_age_ms: u64::MAX };
        let mut log = TopicLog::new(limits);
        let mut files = HashMap::new();
        for seq in 1..=100 {
            log.append(&record(seq, Some(&format!("k{}", seq / 10)), 100)).unwrap();
        }
        apply(&mut files, &mut log);
        let keys_before = log.key_count();
        let gone = log.expire(&Retention { max_messages: Some(40), ..Retention::default() }, 0, false);
        assert!(!gone.is_empty());
        assert!(log.messages() <= 40 + 20, "{}", log.messages());
        assert!(log.messages() >= 40);
        assert!(log.key_count() < keys_before);
        assert_eq!(log.first_seq(), gone.last().map(|_| log.segments[0].base_seq).unwrap());
        let rest = read(&files, &log.plan(ReadFrom::Seq(0), 10_000));
        assert_eq!(rest.first().map(|r| r.seq), Some(log.first_seq()));
        // Age: everything but the active segment.
        log.expire(&Retention { max_age_ms: Some(10), ..Retention::default() }, 10_000, false);
        assert_eq!(log.segment_count(), 1);
    }

    /// A fetched archived segment as the shell gets it from the store.
    fn fetch(files: &HashMap<u64, Vec<u8>>, a: ArchivedSegment) -> Fetched {
        let mut f = Fetched::new(a, Bytes::copy_from_slice(&files[&a.base_seq])).unwrap();
        while !f.index_step(1_000).unwrap() {}
        f
    }

    /// Reads everything `from` asks for, page by page, through archived
    /// segments and then the disk, as the shell does.
    fn read_all(files: &HashMap<u64, Vec<u8>>, log: &TopicLog, from: ReadFrom) -> Vec<u64> {
        let mut seqs = Vec::new();
        let mut plan = log.plan(from.clone(), 7);
        let mut pages = 0;
        while let Some(a) = plan.archived {
            pages += 1;
            assert!(pages < 1_000, "pages do not advance");
            let page = fetch(files, a).read(&plan);
            seqs.extend(page.records.iter().map(|r| r.seq));
            let next = page.next_seq;
            plan = match &from {
                ReadFrom::Key { key, .. } => log.plan(ReadFrom::Key { key: key.clone(), from_seq: next }, 7),
                _ => log.plan(ReadFrom::Seq(next), 7),
            };
        }
        let mut from_seq = plan.from_seq;
        loop {
            let page = read(files, &plan);
            let Some(last) = page.last().map(|r| r.seq) else { break };
            seqs.extend(page.iter().map(|r| r.seq));
            from_seq = from_seq.max(last + 1);
            plan = match &from {
                ReadFrom::Key { key, .. } => log.plan(ReadFrom::Key { key: key.clone(), from_seq }, 7),
                _ => log.plan(ReadFrom::Seq(from_seq), 7),
            };
        }
        seqs
    }

    #[test]
    fn segments_retention_removes_after_upload_stay_readable_from_the_store() {
        let limits = LogLimits { segment_bytes_max: 2_000, segment_age_ms: u64::MAX };
        let mut log = TopicLog::new(limits);
        let mut files = HashMap::new();
        for seq in 1..=100 {
            log.append(&record(seq, Some(&format!("k{}", seq % 3)), 100)).unwrap();
        }
        apply(&mut files, &mut log);
        for info in log.to_upload() {
            log.uploaded(info.base_seq);
        }
        let gone = log.expire(&Retention { max_messages: Some(30), ..Retention::default() }, 0, true);
        assert!(gone.len() >= 3, "{gone:?}");
        let archived: Vec<_> = log.archived().copied().collect();
        assert_eq!(archived.iter().map(|a| a.base_seq).collect::<Vec<_>>(), gone);
        assert_eq!(log.first_readable_seq(), 1);
        assert!(log.first_seq() > 1);
        assert_eq!(archived.last().unwrap().last_seq + 1, log.first_seq(), "no hole between store and disk");
        // Every record, in order, from the start, from the middle of an
        // archived segment, and by key.
        assert_eq!(read_all(&files, &log, ReadFrom::Seq(0)), (1..=100).collect::<Vec<_>>());
        assert_eq!(read_all(&files, &log, ReadFrom::Seq(12)), (12..=100).collect::<Vec<_>>());
        let k1: Vec<u64> = (1..=100).filter(|s| s % 3 == 1).collect();
        let key = Bytes::from_static(b"k1");
        assert_eq!(read_all(&files, &log, ReadFrom::Key { key, from_seq: 0 }), k1);
        // From a time: the archived segment that reaches it.
        let plan = log.plan(ReadFrom::Time(1_000 + 20), 10);
        let a = plan.archived.expect("archived");
        let page = fetch(&files, a).read(&plan);
        assert_eq!(page.records.first().map(|r| r.seq), Some(20));
        assert!(log.seq_bound_before_time(1_020) < 20);
        // A catch-up batch in the store.
        let plan = log.plan_range(5, 9, 1 << 20);
        let page = fetch(&files, plan.archived.unwrap()).read(&plan);
        assert_eq!(page.records.iter().map(|r| r.seq).collect::<Vec<_>>(), [5, 6, 7, 8, 9]);
        assert_eq!(page.next_seq, 10);
        // The list survives a restart: only what ends before the disk.
        let mut other = TopicLog::new(limits);
        other.set_archived(archived.iter().copied());
        assert_eq!(other.archived().count(), archived.len());
        log.set_archived(archived.iter().copied().chain(archived.iter().copied()));
        assert_eq!(log.archived().count(), archived.len(), "overlaps dropped");
    }

    #[test]
    fn a_fetched_object_that_is_not_the_segment_is_refused() {
        let limits = LogLimits { segment_bytes_max: 2_000, segment_age_ms: u64::MAX };
        let mut log = TopicLog::new(limits);
        let mut files = HashMap::new();
        for seq in 1..=40 {
            log.append(&record(seq, None, 100)).unwrap();
        }
        apply(&mut files, &mut log);
        let info = log.to_upload()[0];
        let a = ArchivedSegment {
            base_seq: info.base_seq,
            last_seq: info.last_seq,
            len: info.len,
            first_ms: 0,
            last_ms: 0,
        };
        let bytes = files[&a.base_seq].clone();
        assert!(matches!(Fetched::new(a, Bytes::from(bytes[..10].to_vec())), Err(FetchError::Length { .. })));
        let mut damaged = bytes.clone();
        damaged[50] ^= 1;
        let mut f = Fetched::new(a, Bytes::from(damaged)).unwrap();
        assert!(matches!(f.index_step(usize::MAX), Err(FetchError::Damaged { .. })));
        let wrong = ArchivedSegment { last_seq: a.last_seq + 1, ..a };
        let mut f = Fetched::new(wrong, Bytes::from(bytes)).unwrap();
        assert!(matches!(f.index_step(usize::MAX), Err(FetchError::LastSeq { .. })));
    }
}
