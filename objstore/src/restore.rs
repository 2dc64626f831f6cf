//! Restoring a data directory from a snapshot: used by `fluxnode
//! --restore` (before the shards start) and by `fluxctl snapshot restore`
//! (offline, as `etcdutl snapshot restore` is). Blocking.
//!
//! For each durable topic of the manifest, the segments its retention keeps
//! on disk are downloaded into place; older ones stay in the object store
//! only, listed in the topic's `archived.json`, and reads reach them there
//! (tiered reads). Each topic gets a `meta.json` with a new epoch (the
//! snapshot may be older than what subscribers saw, so numbers after it
//! cannot be trusted to mean the same messages: resumes are told
//! `epoch_changed`) and the clean mark (numbering continues after the last
//! message restored).

use std::path::Path;

use proto::admin::Manifest;
use proto::durable::{left_in_store, ArchivedSegment, TopicMeta, ARCHIVED_FILE};
use proto::message::Epoch;

use crate::Worker;

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The data directory already holds durable topics.
    #[error("{0} already holds durable topics: restore only into an empty data directory")]
    NotEmpty(String),
    /// No such snapshot.
    #[error("no snapshot {0:?} in the object store")]
    Missing(String),
    /// The store or the disk failed.
    #[error("{0}")]
    Failed(String),
}

/// What a restore did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restored {
    /// Durable topics restored.
    pub topics: usize,
    /// Segments downloaded.
    pub segments: usize,
    /// Bytes downloaded.
    pub bytes: u64,
    /// Segments left in the object store (older than retention keeps on
    /// disk), readable from there.
    pub archived: usize,
}

/// How far a restore is, after each segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes downloaded so far.
    pub done_bytes: u64,
    /// Bytes to download in all.
    pub total_bytes: u64,
}

/// Restores every durable topic of snapshot `which` (`latest` or an id)
/// into `data_dir`, which must hold none. `epoch_seed` makes the topics'
/// new epochs (the clock and the process, say); `progress` is called after
/// each segment; `now_ms` applies retention by age.
pub fn restore(
    worker: &Worker,
    data_dir: &Path,
    which: &str,
    epoch_seed: u64,
    now_ms: u64,
    mut progress: impl FnMut(Progress),
) -> Result<Restored, RestoreError> {
    let topics_dir = data_dir.join("topics");
    let occupied = std::fs::read_dir(&topics_dir).map(|mut d| d.next().is_some()).unwrap_or(false);
    if occupied {
        return Err(RestoreError::NotEmpty(topics_dir.display().to_string()));
    }
    let manifest = fetch_manifest(worker, which)?;
    let extent = |s: &proto::admin::ManifestSegment| ArchivedSegment {
        base_seq: s.base_seq,
        last_seq: s.last_seq,
        len: s.bytes,
        first_ms: s.first_ms,
        last_ms: s.last_ms,
    };
    // What each topic leaves in the store, decided before any download so
    // the progress has a total.
    let left: Vec<usize> = manifest
        .topics
        .iter()
        .map(|t| left_in_store(&t.segments.iter().map(extent).collect::<Vec<_>>(), &t.spec.retention, now_ms))
        .collect();
    let total_bytes =
        manifest.topics.iter().zip(&left).flat_map(|(t, &n)| &t.segments[n..]).map(|s| s.bytes).sum::<u64>();
    let mut done = Restored { topics: manifest.topics.len(), ..Restored::default() };
    for (t, &n) in manifest.topics.iter().zip(&left) {
        let dir = topics_dir.join(&t.dir);
        std::fs::create_dir_all(&dir).map_err(|e| RestoreError::Failed(format!("{}: {e}", dir.display())))?;
        for seg in &t.segments[n..] {
            let key = seg.key.clone();
            let body = worker
                .block_on(move |s| Box::pin(async move { s.get(&key).await }))
                .map_err(|e| RestoreError::Failed(e.to_string()))?
                .ok_or_else(|| RestoreError::Failed(format!("segment {} is missing from the store", seg.key)))?;
            if body.len() as u64 != seg.bytes {
                let (got, want) = (body.len(), seg.bytes);
                return Err(RestoreError::Failed(format!("segment {}: {got} bytes, manifest says {want}", seg.key)));
            }
            write_synced(&dir.join(format!("{:020}.log", seg.base_seq)), &body)?;
            done.segments += 1;
            done.bytes += body.len() as u64;
            progress(Progress { done_bytes: done.bytes, total_bytes });
        }
        let archived: Vec<ArchivedSegment> = t.segments[..n].iter().map(extent).collect();
        done.archived += archived.len();
        if !archived.is_empty() {
            write_synced(&dir.join(ARCHIVED_FILE), &serde_json::to_vec(&archived).unwrap_or_default())?;
        }
        let epoch = Epoch(proto::hash::avalanche(epoch_seed ^ proto::hash::fnv1a(t.topic.as_bytes())));
        let meta = TopicMeta { topic: t.topic.clone(), epoch: epoch.to_string(), spec: t.spec, seq_floor: 0 };
        write_synced(&dir.join("meta.json"), &serde_json::to_vec_pretty(&meta).unwrap_or_default())?;
        write_synced(&dir.join("clean"), b"")?;
    }
    Ok(done)
}

/// Snapshot `which` (`latest` or an id) from the store.
fn fetch_manifest(worker: &Worker, which: &str) -> Result<Manifest, RestoreError> {
    let wanted = which.to_string();
    let body = worker
        .block_on(move |s| {
            Box::pin(async move {
                let id = if wanted == "latest" {
                    match s.get("snapshots/latest").await? {
                        Some(id) => String::from_utf8_lossy(&id).trim().to_string(),
                        None => return Ok(None),
                    }
                } else {
                    wanted
                };
                s.get(&format!("snapshots/{id}.json")).await
            })
        })
        .map_err(|e| RestoreError::Failed(e.to_string()))?
        .ok_or_else(|| RestoreError::Missing(which.to_string()))?;
    serde_json::from_slice(&body).map_err(|e| RestoreError::Failed(format!("manifest {which}: {e}")))
}

fn write_synced(path: &Path, body: &[u8]) -> Result<(), RestoreError> {
    let fail = |e: std::io::Error| RestoreError::Failed(format!("{}: {e}", path.display()));
    let file = std::fs::File::create(path).map_err(fail)?;
    std::io::Write::write_all(&mut &file, body).map_err(fail)?;
    file.sync_all().map_err(fail)
}
