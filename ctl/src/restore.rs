//! `fluxctl snapshot restore` (offline, into an empty data directory, as
//! `etcdutl snapshot restore` does) and the progress bars of the snapshot
//! commands. Progress goes to stderr, and only when stderr is a terminal.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::client::{parse_metrics, Client, Failure};

/// How often `snapshot create` looks at the node's upload counters.
const PROGRESS_POLL: Duration = Duration::from_millis(200);

/// Where a restore reads from and writes to.
#[derive(Debug, Clone, clap::Args)]
pub struct RestoreTarget {
    /// The data directory to restore into (must hold no durable topics).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The object store: a directory, or s3://bucket/prefix (credentials
    /// from the standard AWS chain).
    #[arg(long)]
    pub object_store: String,
    /// Endpoint of an S3-compatible store.
    #[arg(long)]
    pub s3_endpoint: Option<String>,
    /// The S3 region (default: the AWS chain's).
    #[arg(long)]
    pub s3_region: Option<String>,
    /// Path-style S3 addressing (most S3-compatible stores).
    #[arg(long)]
    pub s3_path_style: bool,
}

fn bar(total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

/// Restores snapshot `id` into `target.data_dir`; returns what it did.
pub fn restore(id: &str, target: &RestoreTarget) -> Result<objstore::restore::Restored, Failure> {
    let store = match objstore::Target::parse(&target.object_store) {
        objstore::Target::S3(mut s3) => {
            s3.endpoint = target.s3_endpoint.clone();
            s3.region = target.s3_region.clone();
            s3.path_style = target.s3_path_style;
            objstore::Target::S3(s3)
        }
        dir => dir,
    };
    let worker = objstore::Worker::start(&store).map_err(|e| Failure::Local(format!("object store: {e}")))?;
    let progress = bar(0);
    progress.set_message(format!("restoring {id}"));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let seed = (now.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32);
    let done = objstore::restore::restore(&worker, &target.data_dir, id, seed, now.as_millis() as u64, |p| {
        progress.set_length(p.total_bytes);
        progress.set_position(p.done_bytes);
    });
    progress.finish_and_clear();
    done.map_err(|e| Failure::Local(format!("restore {id}: {e}")))
}

/// Makes a snapshot on `node`, showing the node's upload progress while it
/// waits (from `/metrics`: bytes uploaded since the start against those
/// still waiting).
pub fn create(node: &Client) -> Result<proto::admin::SnapshotMade, Failure> {
    let counters = |node: &Client| -> Option<(f64, f64)> {
        let m = parse_metrics(&node.get_text("/metrics").ok()?);
        Some((*m.get("fluxnode_uploaded_bytes_total")?, *m.get("fluxnode_upload_backlog_bytes")?))
    };
    let start = counters(node).map_or(0.0, |(uploaded, _)| uploaded);
    let progress = bar(0);
    progress.set_message("sealing and uploading");
    let request = {
        let node = node.patient();
        std::thread::spawn(move || node.send("POST", "/v1/snapshots", &serde_json::Value::Null))
    };
    while !request.is_finished() {
        if let Some((uploaded, backlog)) = counters(node) {
            let done = (uploaded - start).max(0.0) as u64;
            progress.set_length(done + backlog as u64);
            progress.set_position(done);
        }
        std::thread::sleep(PROGRESS_POLL);
    }
    progress.finish_and_clear();
    request.join().map_err(|_| Failure::Local("the snapshot request panicked".into()))?
}
