//! The durable topics' files: the shell around `proto::durable`. The broker
//! decides what to write; this module writes it (direct I/O where the file
//! system allows, buffered io_uring writes where it does not), fsyncs,
//! cuts, deletes, reads back and recovers after a stop.
//!
//! On disk, under `data_dir/topics/`, one directory per durable topic:
//!
//! ```text
//! <hash>-<name>/meta.json        the topic's name, epoch and declaration
//! <hash>-<name>/<seq:020>.log    segments, named by their first sequence
//! <hash>-<name>/clean            present only after a clean stop
//! <hash>-<name>/archived.json    segments only in the object store
//! <hash>-<name>/groups/<hash>.json  a consumer group's positions
//! <hash>-<name>/schedules.journal  pending schedules' journal (log records)
//! ```
//!
//! The directory name is the topic's stable hash (16 hex digits) and its
//! name cut to 64 bytes, so it is unique, short and readable; `meta.json`
//! holds the whole name. Directories do not depend on the shard count: at
//! start each shard recovers the topics it owns.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use bytes::Bytes;
use glommio::io::{BufferedFile, DmaFile, OpenOptions};
use proto::durable::{ArchivedSegment, FsyncPolicy, LogLimits, ReadPlan, Recovered, TopicLog, WriteJob, ARCHIVED_FILE};
use proto::group::SavedGroup;
use proto::log::{self, Record};
use proto::message::Epoch;
use proto::topic::TopicName;

pub use proto::durable::DurableSpec;

pub use proto::durable::TopicMeta as Meta;

/// The directory of a topic's saved consumer groups.
pub(crate) const GROUPS_DIR: &str = "groups";
/// A topic's schedule journal.
const SCHEDULES_FILE: &str = "schedules.journal";
/// A schedule journal is rewritten with only what is pending once it holds
/// this much more than that (and twice as much).
const SCHEDULE_JOURNAL_SLACK_BYTES: u64 = 1 << 20;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A `meta.json` could not be read.
    #[error("{path}: {why}")]
    Meta {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { what, path: path.to_path_buf(), source }
}

fn gio<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(glommio::GlommioError<()>) -> StoreError + 'a {
    move |e| StoreError::Io { what, path: path.to_path_buf(), source: e.into() }
}

/// An open segment file.
#[derive(Debug)]
enum SegmentFile {
    /// `O_DIRECT`: the page cache is bypassed.
    Direct(DmaFile),
    /// Where the file system refuses `O_DIRECT` (tmpfs, some overlays).
    Buffered(BufferedFile),
}

impl SegmentFile {
    async fn open(path: &Path) -> Result<SegmentFile, StoreError> {
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true);
        match options.dma_open(path).await {
            Ok(file) => Ok(SegmentFile::Direct(file)),
            Err(_) => options.buffered_open(path).await.map(SegmentFile::Buffered).map_err(gio("opening", path)),
        }
    }

    async fn write(&self, job: &WriteJob, path: &Path) -> Result<(), StoreError> {
        match self {
            SegmentFile::Direct(file) => {
                let mut buf = file.alloc_dma_buffer(job.bytes.len());
                buf.as_bytes_mut().copy_from_slice(&job.bytes);
                file.write_at(buf, job.offset).await.map_err(gio("writing", path))?;
            }
            SegmentFile::Buffered(file) => {
                file.write_at(job.bytes.clone(), job.offset).await.map_err(gio("writing", path))?;
            }
        }
        Ok(())
    }

    async fn sync(&self, path: &Path) -> Result<(), StoreError> {
        match self {
            SegmentFile::Direct(file) => file.fdatasync().await,
            SegmentFile::Buffered(file) => file.fdatasync().await,
        }
        .map_err(gio("syncing", path))
    }

    /// Cuts the file to `len` (a seal: rare). Through a second descriptor:
    /// glommio's truncate needs a blocking-thread pool the shards do not
    /// run; the fsync that follows on this one covers the new size.
    fn truncate(len: u64, path: &Path) -> Result<(), StoreError> {
        let file = std::fs::OpenOptions::new().write(true).open(path).map_err(io("opening", path))?;
        file.set_len(len).map_err(io("cutting", path))
    }

    async fn close(self) {
        let _ = match self {
            SegmentFile::Direct(file) => file.close().await,
            SegmentFile::Buffered(file) => file.close().await,
        };
    }
}

/// One shard's durable files.
#[derive(Debug)]
pub struct Store {
    /// `data_dir/topics`.
    root: PathBuf,
    /// Open segments by topic and first sequence (the active ones, and a
    /// sealed one until its last write).
    open: RefCell<HashMap<(TopicName, u64), Rc<SegmentFile>>>,
    /// Files written since the last fsync (policy `interval`).
    unsynced: RefCell<Vec<Rc<SegmentFile>>>,
    /// Schedule journals appended since the last fsync (policy `interval`).
    unsynced_journals: RefCell<std::collections::HashSet<PathBuf>>,
    /// When to fsync.
    fsync: FsyncPolicy,
}

/// A durable topic found on disk at start, recovered.
#[derive(Debug)]
pub struct Found {
    /// The topic.
    pub topic: TopicName,
    /// Its declaration.
    pub spec: DurableSpec,
    /// Its epoch.
    pub epoch: Epoch,
    /// Its log and next sequence.
    pub recovered: Recovered,
    /// Its numbering floor (see [`Meta::seq_floor`]).
    pub seq_floor: u64,
}

impl Store {
    /// A store under `data_dir` (nothing is created until a durable topic is).
    pub fn new(data_dir: &Path, fsync: FsyncPolicy) -> Store {
        Store {
            root: data_dir.join("topics"),
            open: RefCell::default(),
            unsynced: RefCell::default(),
            unsynced_journals: RefCell::default(),
            fsync,
        }
    }

    /// The directory of `topic`.
    pub fn dir(&self, topic: &TopicName) -> PathBuf {
        self.root.join(self.dir_name(topic))
    }

    /// The name of `topic`'s directory (also its place in the object store).
    pub fn dir_name(&self, topic: &TopicName) -> String {
        let name = topic.as_str();
        let cut = &name[..name.len().min(64)];
        format!("{:016x}-{cut}", proto::hash::fnv1a(name.as_bytes()))
    }

    /// Where segment `base` of `topic` lives.
    pub(crate) fn segment_path(&self, topic: &TopicName, base: u64) -> PathBuf {
        self.dir(topic).join(format!("{base:020}.log"))
    }

    /// Creates `topic`'s directory and writes its `meta.json` (atomically:
    /// a temporary file, fsynced, renamed).
    pub fn write_meta(
        &self,
        topic: &TopicName,
        epoch: Epoch,
        spec: DurableSpec,
        seq_floor: u64,
    ) -> Result<(), StoreError> {
        let dir = self.dir(topic);
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        let meta = Meta { topic: topic.as_str().to_string(), epoch: epoch.to_string(), spec, seq_floor };
        write_atomic(&dir, "meta.json", &serde_json::to_vec_pretty(&meta).unwrap_or_default())?;
        sync_dir(&self.root)
    }

    /// Writes `topic`'s list of archived segments (`archived.json`,
    /// atomically), before their files are removed: a crash in between
    /// leaves a segment both listed and on disk, and recovery keeps the disk.
    pub fn write_archived(&self, topic: &TopicName, list: &[ArchivedSegment]) -> Result<(), StoreError> {
        write_atomic(&self.dir(topic), ARCHIVED_FILE, &serde_json::to_vec(list).unwrap_or_default())
    }

    /// Saves a durable consumer group's positions (`groups/<hash>.json`,
    /// atomically: a crash leaves the previous save or this one).
    pub fn write_group(&self, topic: &TopicName, saved: &SavedGroup) -> Result<(), StoreError> {
        let dir = self.dir(topic).join(GROUPS_DIR);
        if !dir.exists() {
            std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
            sync_dir(&self.dir(topic))?;
        }
        write_atomic(&dir, &group_file(&saved.group), &serde_json::to_vec(saved).unwrap_or_default())
    }

    /// Deletes a durable group's saved positions (the group was removed).
    pub fn delete_group(&self, topic: &TopicName, group: &str) -> Result<(), StoreError> {
        let path = self.dir(topic).join(GROUPS_DIR).join(group_file(group));
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("deleting", &path)(e)),
        }
    }

    /// Moves a group's save that could not be used aside
    /// (`<hash>.json.corrupt`), so that a new save does not overwrite it
    /// and an operator can look at it.
    pub fn put_group_aside(&self, topic: &TopicName, group: &str) {
        let path = self.dir(topic).join(GROUPS_DIR).join(group_file(group));
        put_aside(&path);
    }

    /// The consumer groups saved for `topic` (at start; blocking reads). A
    /// file that cannot be parsed is moved aside (`.corrupt`) and logged as
    /// an error.
    pub fn read_groups(&self, topic: &TopicName) -> Result<Vec<SavedGroup>, StoreError> {
        let dir = self.dir(topic).join(GROUPS_DIR);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("listing", &dir)(e)),
        };
        let mut groups = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue; // a temporary file a crash left
            }
            let body = std::fs::read(&path).map_err(io("reading", &path))?;
            match serde_json::from_slice(&body) {
                Ok(saved) => groups.push(saved),
                // Not the node's to guess: kept aside, loudly; the group
                // starts again from its `start` when a member joins.
                Err(e) => {
                    tracing::error!(
                        topic = topic.as_str(),
                        "group save {} unreadable ({e}): moved aside",
                        path.display()
                    );
                    put_aside(&path);
                }
            }
        }
        Ok(groups)
    }

    /// Appends schedule records to `topic`'s journal (the adds and cancels
    /// they carry are answered after), fsynced as the log is: at once under
    /// `--fsync always`, with the next interval fsync under `interval` (a
    /// `kill -9` loses nothing written; a power loss, at most an
    /// interval). Returns the journal's length.
    pub fn append_schedules(&self, topic: &TopicName, records: &[Record]) -> Result<u64, StoreError> {
        let mut bytes = Vec::new();
        for r in records {
            log::encode(r, &mut bytes)
                .map_err(|e| StoreError::Meta { path: self.dir(topic), why: format!("a schedule record: {e:?}") })?;
        }
        let path = self.dir(topic).join(SCHEDULES_FILE);
        let mut file =
            std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(io("opening", &path))?;
        std::io::Write::write_all(&mut file, &bytes).map_err(io("writing", &path))?;
        match self.fsync {
            FsyncPolicy::Always => file.sync_data().map_err(io("syncing", &path))?,
            FsyncPolicy::Interval => {
                self.unsynced_journals.borrow_mut().insert(path.clone());
            }
        }
        let len = file.metadata().map_err(io("reading", &path))?.len();
        Ok(len)
    }

    /// Whether a journal of `len` bytes should be rewritten with only the
    /// `live` bytes pending.
    pub fn schedule_journal_bloated(len: u64, live: u64) -> bool {
        len > 2 * live + SCHEDULE_JOURNAL_SLACK_BYTES
    }

    /// Rewrites `topic`'s schedule journal with `records` only
    /// (atomically).
    pub fn rewrite_schedules(&self, topic: &TopicName, records: &[Record]) -> Result<(), StoreError> {
        let mut bytes = Vec::new();
        for r in records {
            log::encode(r, &mut bytes)
                .map_err(|e| StoreError::Meta { path: self.dir(topic), why: format!("a schedule record: {e:?}") })?;
        }
        write_atomic(&self.dir(topic), SCHEDULES_FILE, &bytes)
    }

    /// The records of `topic`'s schedule journal, up to a torn tail (a
    /// crash during an append: those records were never answered).
    pub fn read_schedules(&self, topic: &TopicName) -> Result<Vec<Record>, StoreError> {
        let path = self.dir(topic).join(SCHEDULES_FILE);
        let body = match std::fs::read(&path) {
            Ok(body) => Bytes::from(body),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("reading", &path)(e)),
        };
        let scan = log::scan(&body);
        if let Some(torn) = scan.torn {
            // A torn tail (a crash mid-append) held nothing anyone was told;
            // the file is kept aside all the same, since the rewrite at
            // start drops what follows it.
            let aside = self.dir(topic).join(format!("{SCHEDULES_FILE}.corrupt"));
            tracing::warn!(
                topic = topic.as_str(),
                "schedule journal cut at {} of {} bytes ({torn:?}); the file is kept as {}",
                scan.whole_bytes,
                body.len(),
                aside.display()
            );
            std::fs::write(&aside, &body).map_err(io("writing", &aside))?;
        }
        Ok(scan.records.into_iter().map(|(_, r)| r).collect())
    }

    /// Deletes `topic`'s directory and everything in it.
    pub async fn delete(&self, topic: &TopicName) -> Result<(), StoreError> {
        let keys: Vec<_> = self.open.borrow().keys().filter(|(t, _)| t == topic).cloned().collect();
        for key in keys {
            let removed = self.open.borrow_mut().remove(&key);
            if let Some(file) = removed {
                if let Ok(file) = Rc::try_unwrap(file) {
                    file.close().await;
                }
            }
        }
        let dir = self.dir(topic);
        std::fs::remove_dir_all(&dir).map_err(io("deleting", &dir))?;
        sync_dir(&self.root)
    }

    /// Removes `topic`'s files at once (its log moved to another node, or
    /// a stale incarnation of it is replaced by one taken over): open
    /// segments are dropped, not flushed (a moved log's segments are all
    /// sealed and in the object store). Blocking, and short: a directory
    /// of sealed files.
    pub fn forget(&self, topic: &TopicName) -> Result<(), StoreError> {
        self.open.borrow_mut().retain(|(t, _), _| t != topic);
        let dir = self.dir(topic);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => sync_dir(&self.root),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("deleting", &dir)(e)),
        }
    }

    /// Writes one topic's share of a group commit; fsyncs it under the
    /// `always` policy. Sealed segments are cut to their length and closed.
    pub async fn write(&self, topic: &TopicName, jobs: &[WriteJob]) -> Result<(), StoreError> {
        for job in jobs {
            let path = self.segment_path(topic, job.segment);
            let key = (topic.clone(), job.segment);
            let existing = self.open.borrow().get(&key).cloned();
            let file = match existing {
                Some(file) => file,
                None => {
                    let file = Rc::new(SegmentFile::open(&path).await?);
                    self.open.borrow_mut().insert(key.clone(), file.clone());
                    if job.offset == 0 {
                        // A new segment: its directory entry must survive too.
                        sync_dir(&self.dir(topic))?;
                    }
                    file
                }
            };
            if !job.bytes.is_empty() {
                file.write(job, &path).await?;
            }
            if job.seal {
                SegmentFile::truncate(job.end, &path)?;
            }
            match self.fsync {
                FsyncPolicy::Always => file.sync(&path).await?,
                FsyncPolicy::Interval => self.unsynced.borrow_mut().push(file.clone()),
            }
            if job.seal {
                self.open.borrow_mut().remove(&key);
            }
        }
        Ok(())
    }

    /// Fsyncs every file written since the last call (policy `interval`).
    pub async fn sync_written(&self) -> Result<(), StoreError> {
        let files = std::mem::take(&mut *self.unsynced.borrow_mut());
        let mut seen: Vec<*const SegmentFile> = Vec::new();
        for file in files {
            if seen.contains(&Rc::as_ptr(&file)) {
                continue;
            }
            seen.push(Rc::as_ptr(&file));
            file.sync(&self.root).await?;
        }
        let journals = std::mem::take(&mut *self.unsynced_journals.borrow_mut());
        for path in journals {
            match std::fs::File::open(&path) {
                Ok(file) => file.sync_data().map_err(io("syncing", &path))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {} // deleted with its topic
                Err(e) => return Err(io("opening", &path)(e)),
            }
        }
        Ok(())
    }

    /// Deletes expired segments of `topic`.
    pub fn remove_segments(&self, topic: &TopicName, bases: &[u64]) {
        for base in bases {
            let path = self.segment_path(topic, *base);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!("cannot delete expired segment {}: {e}", path.display());
            }
        }
    }

    /// Reads what `plan` asks for from `topic`'s segments (a plan covers
    /// only bytes already written). A segment deleted meanwhile by
    /// retention ends the read early. With the records, whether any whole
    /// record was seen at all (wanted or not).
    pub async fn read(&self, topic: &TopicName, plan: &ReadPlan) -> Result<(Vec<Record>, bool), StoreError> {
        let mut out = Vec::new();
        let mut whole_seen = false;
        // Each segment is opened once per read (a key read touches many
        // records of few segments).
        let mut open: Option<(u64, BufferedFile)> = None;
        for range in &plan.ranges {
            let path = self.segment_path(topic, range.segment);
            if open.as_ref().is_none_or(|(segment, _)| *segment != range.segment) {
                if let Some((_, file)) = open.take() {
                    let _ = file.close().await;
                }
                // Through the page cache: a direct read can be refused where
                // the same file is open for polled direct writes.
                match BufferedFile::open(&path).await {
                    Ok(file) => open = Some((range.segment, file)),
                    Err(_) => break, // deleted by retention meanwhile
                }
            }
            let Some((_, file)) = &open else { break };
            let read = file.read_at(range.offset, range.len as usize).await.map_err(gio("reading", &path))?;
            let bytes = Bytes::copy_from_slice(&read);
            let scan = log::scan(&bytes);
            whole_seen |= !scan.records.is_empty();
            for (_, record) in scan.records {
                if plan.wants(&record) {
                    out.push(record);
                    if out.len() >= plan.limit {
                        break;
                    }
                }
            }
            if out.len() >= plan.limit {
                break;
            }
        }
        if let Some((_, file)) = open {
            let _ = file.close().await;
        }
        Ok((out, whole_seen))
    }

    /// Recovers every durable topic on disk that `owns` says is this
    /// shard's: reads its segments, cuts torn tails, deletes segments after
    /// damage, and marks it unclean until the next clean stop. Runs once at
    /// start, before the shard serves; reads are blocking (start only).
    pub fn recover(
        &self,
        owns: impl Fn(&TopicName) -> bool,
        limits: LogLimits,
        tail_max: usize,
    ) -> Result<Vec<Found>, StoreError> {
        let mut found = Vec::new();
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
            Err(e) => return Err(io("listing", &self.root)(e)),
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            let meta_path = dir.join("meta.json");
            let Ok(body) = std::fs::read(&meta_path) else { continue };
            let meta: Meta = serde_json::from_slice(&body)
                .map_err(|e| StoreError::Meta { path: meta_path.clone(), why: e.to_string() })?;
            let topic = TopicName::new(&meta.topic)
                .map_err(|e| StoreError::Meta { path: meta_path.clone(), why: e.to_string() })?;
            if !owns(&topic) {
                continue;
            }
            let epoch: Epoch = meta
                .epoch
                .parse()
                .map_err(|_| StoreError::Meta { path: meta_path.clone(), why: "bad epoch".into() })?;
            let mut bases: Vec<u64> = std::fs::read_dir(&dir)
                .map_err(io("listing", &dir))?
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
                .collect();
            bases.sort_unstable();
            // One segment in memory at a time: each is read when recovery
            // reaches it and dropped after (the index keeps no reference).
            let failed = std::cell::RefCell::new(None);
            let segments = bases.iter().map(|&base| {
                let path = self.segment_path(&topic, base);
                match std::fs::read(&path) {
                    Ok(body) => (base, Bytes::from(body)),
                    Err(e) => {
                        failed.borrow_mut().get_or_insert(io("reading", &path)(e));
                        (base, Bytes::new())
                    }
                }
            });
            let marker = dir.join("clean");
            let clean = marker.exists();
            let mut recovered = TopicLog::recover(segments, clean, meta.seq_floor, limits, tail_max);
            let archived_path = dir.join(ARCHIVED_FILE);
            if let Ok(body) = std::fs::read(&archived_path) {
                let list: Vec<ArchivedSegment> = serde_json::from_slice(&body)
                    .map_err(|e| StoreError::Meta { path: archived_path.clone(), why: e.to_string() })?;
                recovered.log.set_archived(list);
            }
            if let Some(e) = failed.into_inner() {
                return Err(e); // before any cut or delete
            }
            for (base, len, why) in &recovered.cut {
                let path = self.segment_path(&topic, *base);
                if !matches!(why, log::Torn::BadLength) || *len == 0 {
                    tracing::warn!(topic = topic.as_str(), "cutting {} at {len} ({why:?})", path.display());
                }
                let file = std::fs::OpenOptions::new().write(true).open(&path).map_err(io("opening", &path))?;
                file.set_len(*len).map_err(io("cutting", &path))?;
                file.sync_all().map_err(io("syncing", &path))?;
            }
            for base in &recovered.dropped {
                let path = self.segment_path(&topic, *base);
                tracing::warn!(topic = topic.as_str(), "removing {} (after damage, or empty)", path.display());
                std::fs::remove_file(&path).map_err(io("deleting", &path))?;
            }
            if clean {
                std::fs::remove_file(&marker).map_err(io("deleting", &marker))?;
                sync_dir(&dir)?;
            }
            found.push(Found { topic, spec: meta.spec, epoch, recovered, seq_floor: meta.seq_floor });
        }
        Ok(found)
    }

    /// Marks `topic` stopped cleanly: everything sequenced was written
    /// and fsynced, so the next start needs no sequence skip.
    pub async fn mark_clean(&self, topic: &TopicName) -> Result<(), StoreError> {
        self.sync_written().await?;
        let dir = self.dir(topic);
        let marker = dir.join("clean");
        std::fs::File::create(&marker).map_err(io("creating", &marker))?;
        sync_dir(&dir)
    }
}

/// A group's save file name: its name's stable hash.
pub(crate) fn group_file(group: &str) -> String {
    format!("{:016x}.json", proto::hash::fnv1a(group.as_bytes()))
}

/// Renames `path` to `<path>.corrupt` (best effort: logged).
fn put_aside(path: &Path) {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".corrupt");
    if let Err(e) = std::fs::rename(path, &aside) {
        tracing::error!("could not move {} aside: {e}", path.display());
    }
}

/// Writes `dir/name` atomically: a temporary file, fsynced, renamed, and
/// the directory fsynced.
fn write_atomic(dir: &Path, name: &str, body: &[u8]) -> Result<(), StoreError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let file = std::fs::File::create(&tmp).map_err(io("creating", &tmp))?;
    std::io::Write::write_all(&mut &file, body).map_err(io("writing", &tmp))?;
    file.sync_all().map_err(io("syncing", &tmp))?;
    std::fs::rename(&tmp, dir.join(name)).map_err(io("renaming", &tmp))?;
    sync_dir(dir)
}

/// Fsyncs a directory, so that entries made or removed in it survive.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("syncing", dir))
}
