//! Object storage for durable topics: a local directory (the embedded
//! default) or S3 and S3-compatible stores through `aws-sdk-s3`, behind one
//! small API (put, get, list, delete), run on a thread of its own with a
//! small tokio runtime so that nothing here ever runs on a shard's task
//! queues.
//!
//! S3 settings: bucket, prefix, region, an endpoint override and path-style
//! addressing for S3-compatible stores. Credentials come from the standard
//! AWS chain (environment, profile, web identity for Kubernetes workload
//! identity, ECS/IMDS), never from RayFlux's configuration.
//!
//! Uploads larger than [`MULTIPART_THRESHOLD_BYTES`] go in parts of
//! [`PART_BYTES`]. A failed call is retried with exponential backoff up to
//! [`BACKOFF_MAX`], without end for uploads (the store coming back resumes
//! them), [`READ_ATTEMPTS`] times for reads.

pub mod restore;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;

/// Objects larger than this are uploaded in parts.
pub const MULTIPART_THRESHOLD_BYTES: usize = 16 << 20;
/// Part size of a multipart upload (S3's minimum is 5 MiB).
pub const PART_BYTES: usize = 8 << 20;
/// Longest wait between two attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// First wait between two attempts.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// Attempts of a read before it fails.
pub const READ_ATTEMPTS: u32 = 5;
/// Jobs waiting for the worker at most: a shard whose job does not fit
/// tries again later (bounded memory: a job holds a path, not the bytes).
pub const QUEUE_JOBS_MAX: usize = 256;

/// Where objects go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A local directory (the embedded default): keys are relative paths.
    Dir(PathBuf),
    /// S3 or an S3-compatible store.
    S3(S3Config),
}

/// An S3 bucket and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    /// The bucket.
    pub bucket: String,
    /// Prepended to every key (no leading or trailing slash needed).
    pub prefix: String,
    /// The region; the AWS chain's when `None`.
    pub region: Option<String>,
    /// An endpoint override (an S3-compatible store), e.g. `http://127.0.0.1:9000`.
    pub endpoint: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), which most
    /// S3-compatible stores need.
    pub path_style: bool,
}

impl Target {
    /// Parses `s3://bucket/prefix` or a directory path.
    pub fn parse(s: &str) -> Target {
        match s.strip_prefix("s3://") {
            Some(rest) => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                Target::S3(S3Config {
                    bucket: bucket.to_string(),
                    prefix: prefix.trim_matches('/').to_string(),
                    region: None,
                    endpoint: None,
                    path_style: false,
                })
            }
            None => Target::Dir(PathBuf::from(s)),
        }
    }
}

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{what} {key}: {why}")]
pub struct Error {
    /// The operation.
    pub what: &'static str,
    /// The key.
    pub key: String,
    /// The store's words.
    pub why: String,
}

/// A connected store.
#[derive(Debug)]
pub enum ObjectStore {
    /// A directory.
    Dir(PathBuf),
    /// An S3 client, its bucket and prefix.
    S3 { client: aws_sdk_s3::Client, bucket: String, prefix: String },
}

impl ObjectStore {
    /// Connects (for S3: loads the AWS chain's credentials and region).
    pub async fn connect(target: &Target) -> ObjectStore {
        match target {
            Target::Dir(dir) => ObjectStore::Dir(dir.clone()),
            Target::S3(c) => {
                let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
                if let Some(region) = &c.region {
                    loader = loader.region(aws_config::Region::new(region.clone()));
                }
                let shared = loader.load().await;
                let mut config = aws_sdk_s3::config::Builder::from(&shared).force_path_style(c.path_style);
                if shared.region().is_none() {
                    config = config.region(aws_config::Region::new("us-east-1"));
                }
                if let Some(endpoint) = &c.endpoint {
                    config = config.endpoint_url(endpoint);
                }
                let client = aws_sdk_s3::Client::from_conf(config.build());
                ObjectStore::S3 { client, bucket: c.bucket.clone(), prefix: c.prefix.clone() }
            }
        }
    }

    fn full_key(prefix: &str, key: &str) -> String {
        if prefix.is_empty() {
            key.to_string()
        } else {
            format!("{prefix}/{key}")
        }
    }

    /// Stores `body` under `key` (once: no retry here).
    pub async fn put_once(&self, key: &str, body: Bytes) -> Result<(), Error> {
        let fail = |why: String| Error { what: "putting", key: key.to_string(), why };
        match self {
            ObjectStore::Dir(dir) => {
                let path = dir.join(key);
                let tmp = path.with_extension("part");
                if let Some(parent) = path.parent() {
                    tokio::fs::create_dir_all(parent).await.map_err(|e| fail(e.to_string()))?;
                }
                tokio::fs::write(&tmp, &body).await.map_err(|e| fail(e.to_string()))?;
                let file = tokio::fs::File::open(&tmp).await.map_err(|e| fail(e.to_string()))?;
                file.sync_all().await.map_err(|e| fail(e.to_string()))?;
                tokio::fs::rename(&tmp, &path).await.map_err(|e| fail(e.to_string()))
            }
            ObjectStore::S3 { client, bucket, prefix } => {
                let full = Self::full_key(prefix, key);
                if body.len() <= MULTIPART_THRESHOLD_BYTES {
                    client
                        .put_object()
                        .bucket(bucket)
                        .key(&full)
                        .body(ByteStream::from(body))
                        .send()
                        .await
                        .map_err(|e| fail(format!("{e:?}")))?;
                    return Ok(());
                }
                let upload = client
                    .create_multipart_upload()
                    .bucket(bucket)
                    .key(&full)
                    .send()
                    .await
                    .map_err(|e| fail(format!("{e:?}")))?;
                let id = upload.upload_id().unwrap_or_default().to_string();
                let mut parts = Vec::new();
                for (i, chunk) in body.chunks(PART_BYTES).enumerate() {
                    let number = i as i32 + 1;
                    let part = client
                        .upload_part()
                        .bucket(bucket)
                        .key(&full)
                        .upload_id(&id)
                        .part_number(number)
                        .body(ByteStream::from(body.slice_ref(chunk)))
                        .send()
                        .await;
                    match part {
                        Ok(part) => parts.push(
                            CompletedPart::builder()
                                .part_number(number)
                                .set_e_tag(part.e_tag().map(String::from))
                                .build(),
                        ),
                        Err(e) => {
                            let _ =
                                client.abort_multipart_upload().bucket(bucket).key(&full).upload_id(&id).send().await;
                            return Err(fail(format!("{e:?}")));
                        }
                    }
                }
                client
                    .complete_multipart_upload()
                    .bucket(bucket)
                    .key(&full)
                    .upload_id(&id)
                    .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
                    .send()
                    .await
                    .map_err(|e| fail(format!("{e:?}")))?;
                Ok(())
            }
        }
    }

    /// The object under `key`, `None` if there is none.
    pub async fn get_once(&self, key: &str) -> Result<Option<Bytes>, Error> {
        let fail = |why: String| Error { what: "getting", key: key.to_string(), why };
        match self {
            ObjectStore::Dir(dir) => match tokio::fs::read(dir.join(key)).await {
                Ok(body) => Ok(Some(Bytes::from(body))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(fail(e.to_string())),
            },
            ObjectStore::S3 { client, bucket, prefix } => {
                let got = client.get_object().bucket(bucket).key(Self::full_key(prefix, key)).send().await;
                match got {
                    Ok(object) => {
                        let body = object.body.collect().await.map_err(|e| fail(e.to_string()))?;
                        Ok(Some(body.into_bytes()))
                    }
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
                    Err(e) => Err(fail(format!("{e:?}"))),
                }
            }
        }
    }

    /// Keys under `prefix` (relative to the store's own prefix), sorted.
    pub async fn list_once(&self, under: &str) -> Result<Vec<String>, Error> {
        Ok(self.list_sized(under).await?.into_iter().map(|(key, _)| key).collect())
    }

    /// The keys under `under` with their sizes in bytes, sorted.
    pub async fn list_sized(&self, under: &str) -> Result<Vec<(String, u64)>, Error> {
        let fail = |why: String| Error { what: "listing", key: under.to_string(), why };
        let mut keys = Vec::new();
        match self {
            ObjectStore::Dir(dir) => {
                let mut stack = vec![dir.join(under)];
                while let Some(at) = stack.pop() {
                    let mut entries = match tokio::fs::read_dir(&at).await {
                        Ok(entries) => entries,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(fail(e.to_string())),
                    };
                    while let Some(entry) = entries.next_entry().await.map_err(|e| fail(e.to_string()))? {
                        let path = entry.path();
                        if path.is_dir() {
                            stack.push(path);
                        } else if let Ok(rel) = path.strip_prefix(dir) {
                            if path.extension().is_none_or(|e| e != "part") {
                                let size = entry.metadata().await.map_err(|e| fail(e.to_string()))?.len();
                                keys.push((rel.to_string_lossy().into_owned(), size));
                            }
                        }
                    }
                }
            }
            ObjectStore::S3 { client, bucket, prefix } => {
                let full = Self::full_key(prefix, under);
                let mut pages = client.list_objects_v2().bucket(bucket).prefix(&full).into_paginator().send();
                while let Some(page) = pages.next().await {
                    let page = page.map_err(|e| fail(format!("{e:?}")))?;
                    for object in page.contents() {
                        if let Some(key) = object.key() {
                            let rel = if prefix.is_empty() { key } else { &key[prefix.len() + 1..] };
                            let size = object.size().and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
                            keys.push((rel.to_string(), size));
                        }
                    }
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Deletes `key` (absent is fine).
    pub async fn delete_once(&self, key: &str) -> Result<(), Error> {
        let fail = |why: String| Error { what: "deleting", key: key.to_string(), why };
        match self {
            ObjectStore::Dir(dir) => match tokio::fs::remove_file(dir.join(key)).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(fail(e.to_string())),
                _ => Ok(()),
            },
            ObjectStore::S3 { client, bucket, prefix } => {
                client
                    .delete_object()
                    .bucket(bucket)
                    .key(Self::full_key(prefix, key))
                    .send()
                    .await
                    .map_err(|e| fail(format!("{e:?}")))?;
                Ok(())
            }
        }
    }

    /// Stores `body` under `key`, retrying with backoff until it is stored
    /// or `give_up` says so (checked between attempts).
    pub async fn put(&self, key: &str, body: Bytes, give_up: impl Fn() -> bool) -> Result<(), Error> {
        let mut wait = BACKOFF_FIRST;
        loop {
            match self.put_once(key, body.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) if give_up() => return Err(e),
                Err(e) => {
                    tracing::warn!("object store: {e}; retrying in {wait:?}");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// [`ObjectStore::get_once`] with up to [`READ_ATTEMPTS`] attempts.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, Error> {
        let mut wait = BACKOFF_FIRST;
        let mut attempt = 1;
        loop {
            match self.get_once(key).await {
                Err(e) if attempt < READ_ATTEMPTS => {
                    tracing::warn!("object store: {e}; retrying in {wait:?}");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(BACKOFF_MAX);
                    attempt += 1;
                }
                done => return done,
            }
        }
    }
}

/// What a worker job reports.
#[derive(Debug)]
pub struct Done {
    /// The caller's tag.
    pub tag: u64,
    /// The outcome: for `Get` the object (`None`: no such key), for `List`
    /// the keys one per line, else nothing.
    pub result: Result<Option<Bytes>, Error>,
}

/// Where a shard collects its jobs' outcomes (polled by the shard).
pub type Outcomes = Arc<Mutex<Vec<Done>>>;

/// One job for the worker.
#[derive(Debug)]
pub enum Job {
    /// Upload a file's bytes (read when the job runs: queued jobs hold no
    /// bytes) under `key`.
    PutFile { key: String, path: PathBuf, tag: u64, outcomes: Outcomes },
    /// Upload bytes (a manifest) under `key`.
    PutBytes { key: String, body: Bytes, tag: u64, outcomes: Outcomes },
    /// Delete `key`.
    Delete { key: String, tag: u64, outcomes: Outcomes },
    /// Fetch `key`.
    Get { key: String, tag: u64, outcomes: Outcomes },
    /// List the keys under `under`.
    List { under: String, tag: u64, outcomes: Outcomes },
    /// List the keys under `under` with their sizes: a line `key size`
    /// each.
    ListSized { under: String, tag: u64, outcomes: Outcomes },
}

/// A thread with a small tokio runtime that runs jobs one at a time, in
/// order (a segment's upload before the manifest that names it).
#[derive(Debug)]
pub struct Worker {
    jobs: tokio::sync::mpsc::Sender<Job>,
    runtime: tokio::runtime::Handle,
    store: Arc<ObjectStore>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl Worker {
    /// Starts the thread and connects to `target`.
    pub fn start(target: &Target) -> std::io::Result<Worker> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        let store = Arc::new(handle.block_on(ObjectStore::connect(target)));
        let (jobs, mut queue) = tokio::sync::mpsc::channel::<Job>(QUEUE_JOBS_MAX);
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (worker_store, worker_stopping) = (store.clone(), stopping.clone());
        std::thread::Builder::new().name("objstore".into()).spawn(move || {
            runtime.block_on(async move {
                let give_up = || worker_stopping.load(std::sync::atomic::Ordering::Relaxed);
                while let Some(job) = queue.recv().await {
                    let (tag, outcomes, result) = match job {
                        Job::PutFile { key, path, tag, outcomes } => {
                            let result = match tokio::fs::read(&path).await {
                                Ok(body) => worker_store.put(&key, Bytes::from(body), give_up).await,
                                Err(e) => Err(Error { what: "reading", key: path_str(&path), why: e.to_string() }),
                            };
                            (tag, outcomes, result.map(|()| None))
                        }
                        Job::PutBytes { key, body, tag, outcomes } => {
                            (tag, outcomes, worker_store.put(&key, body, give_up).await.map(|()| None))
                        }
                        Job::Delete { key, tag, outcomes } => {
                            (tag, outcomes, worker_store.delete_once(&key).await.map(|()| None))
                        }
                        Job::Get { key, tag, outcomes } => (tag, outcomes, worker_store.get(&key).await),
                        Job::List { under, tag, outcomes } => {
                            let keys = worker_store.list_once(&under).await;
                            (tag, outcomes, keys.map(|k| Some(Bytes::from(k.join("\n")))))
                        }
                        Job::ListSized { under, tag, outcomes } => {
                            let keys = worker_store.list_sized(&under).await;
                            let lines = keys.map(|k| k.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>());
                            (tag, outcomes, lines.map(|l| Some(Bytes::from(l.join("\n")))))
                        }
                    };
                    let mut list = outcomes.lock().unwrap_or_else(|p| p.into_inner());
                    list.push(Done { tag, result });
                    drop(list);
                }
            });
        })?;
        Ok(Worker { jobs, runtime: handle, store, stopping })
    }

    /// Queues a job; gives it back when [`QUEUE_JOBS_MAX`] are waiting.
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        self.jobs.try_send(job).map_err(|e| match e {
            tokio::sync::mpsc::error::TrySendError::Full(job) | tokio::sync::mpsc::error::TrySendError::Closed(job) => {
                job
            }
        })
    }

    /// Runs `f` on the worker's runtime and waits for it (start-up and
    /// restore only: it blocks the calling thread).
    pub fn block_on<T: Send + 'static>(
        &self,
        f: impl FnOnce(Arc<ObjectStore>) -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>> + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        let store = self.store.clone();
        self.runtime.spawn(async move {
            let _ = tx.send(f(store).await);
        });
        rx.recv().expect("the object store thread runs while its worker lives")
    }

    /// From now on failing uploads are given up instead of retried (at
    /// shutdown).
    pub fn stop_retrying(&self) {
        self.stopping.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(Target::parse("/var/lib/x"), Target::Dir("/var/lib/x".into()));
        let Target::S3(c) = Target::parse("s3://bucket/some/prefix/") else { panic!("s3") };
        assert_eq!((c.bucket.as_str(), c.prefix.as_str()), ("bucket", "some/prefix"));
        let Target::S3(c) = Target::parse("s3://bucket") else { panic!("s3") };
        assert_eq!(c.prefix, "");
    }

    #[test]
    fn a_directory_store_round_trips_through_the_worker() {
        let dir = std::env::temp_dir().join(format!("objstore-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let worker = Worker::start(&Target::Dir(dir.clone())).unwrap();
        let outcomes = Outcomes::default();
        let file = dir.join("src.bin");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&file, b"segment bytes").unwrap();
        worker.submit(Job::PutFile { key: "t/1.log".into(), path: file, tag: 7, outcomes: outcomes.clone() }).unwrap();
        worker
            .submit(Job::PutBytes {
                key: "m/1.json".into(),
                body: Bytes::from_static(b"{}"),
                tag: 8,
                outcomes: outcomes.clone(),
            })
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while outcomes.lock().unwrap().len() < 2 {
            assert!(std::time::Instant::now() < deadline, "jobs not done");
            std::thread::park_timeout(Duration::from_millis(5));
        }
        let got = worker.block_on(|s| Box::pin(async move { (s.get("t/1.log").await, s.list_once("").await) }));
        let sized = worker.block_on(|s| Box::pin(async move { s.list_sized("t/").await }));
        assert_eq!(sized.unwrap(), [("t/1.log".to_string(), 13)]);
        assert_eq!(got.0.unwrap().as_deref(), Some(&b"segment bytes"[..]));
        let keys = got.1.unwrap();
        assert!(keys.contains(&"t/1.log".to_string()) && keys.contains(&"m/1.json".to_string()), "{keys:?}");
        let tags: Vec<u64> = outcomes.lock().unwrap().iter().map(|d| d.tag).collect();
        assert_eq!(tags, [7, 8]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
