//! Starting and stopping a node: the executor pool, the channel mesh, the
//! listeners, and graceful shutdown.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::channels::channel_mesh::MeshBuilder;
use glommio::net::TcpListener;
use glommio::{Latency, Shares};
use proto::limits::SHARD_CHANNEL_BATCHES;
use proto::metrics;
use proto::ws::close_code;
use runtime::fdpass::{LinkMatrix, Links};
use runtime::limits::{IO_MEMORY_BYTES_PER_SHARD, SHUTDOWN_POLL_MS};
use runtime::{ExecutorError, ServerError, ShardError};

use crate::config::{Config, TopicSockets};
use crate::shard::{AdminConnection, Batch, NodeConnection, NodeShared, Shard};

/// How long a node waits for etcd at start before it gives up.
const ETCD_START_WAIT: Duration = Duration::from_secs(10);

/// A node being started: the address actually bound and the shared flags.
#[derive(Debug)]
pub struct Node {
    /// The bound address (port resolved if 0 was asked).
    pub local_addr: SocketAddr,
    /// Flags shared with the shards.
    pub shared: Arc<NodeShared>,
    /// Shards that finished binding.
    bound: Arc<AtomicUsize>,
    /// Holds the port between resolution and the shards' own binds.
    _reservation: socket2::Socket,
}

impl Node {
    /// Reserves the listening address (resolving port 0) so that every shard
    /// binds the same port with SO_REUSEPORT.
    pub fn bind(config: &Config) -> Result<Node, ServerError> {
        let addr = config.listen();
        let (socket, local_addr) = runtime::reserve(addr).map_err(|source| ServerError::Bind { addr, source })?;
        Ok(Node { local_addr, shared: Arc::new(NodeShared::default()), bound: Arc::default(), _reservation: socket })
    }

    /// Runs the shards until shutdown completes. Blocks the calling thread.
    /// `on_ready` runs once every shard is accepting connections.
    pub fn run(self, config: Config, on_ready: impl FnOnce(SocketAddr)) -> Result<(), ServerError> {
        // The object store's worker thread, and a restore, before any shard.
        let worker = objstore::Worker::start(config.object_store())
            .map_err(|e| ServerError::Storage(format!("cannot start the object store worker: {e}")))?;
        if let Some(which) = config.restore() {
            let seed = crate::shard::epoch_seed(0);
            let now_ms = proto::message::Now::read().unix_ms;
            let mut reported = 0;
            let done = objstore::restore::restore(&worker, config.data_dir(), which, seed, now_ms, |p| {
                // A line per tenth of the download.
                let tenth = (p.done_bytes * 10).checked_div(p.total_bytes).unwrap_or(10);
                if tenth > reported {
                    reported = tenth;
                    tracing::info!(done_bytes = p.done_bytes, total_bytes = p.total_bytes, "restoring");
                }
            })
            .map_err(|e| ServerError::Storage(format!("restore {which}: {e}")))?;
            let objstore::restore::Restored { topics, segments, bytes, archived } = done;
            tracing::info!(topics, segments, bytes, archived, "restored snapshot {which}");
            eprintln!(
                "restored snapshot {which}: {topics} topics, {segments} segments, {bytes} bytes; \
                 {archived} older segments left in the object store"
            );
        }
        let _ = self.shared.archive.set(Arc::new(worker));
        let clustered = config.etcd().is_some() || config.static_peers();
        if clustered && !config.durable_topics().is_empty() && !config.object_store_named() {
            tracing::warn!(
                "durable topics in a cluster move through the object store the nodes share, and none was named: \
                 this node's own directory is used, so a durable topic that moves to another node will not find \
                 its earlier records there; give every node the same --object-store"
            );
        }
        if let Some((endpoint, cluster)) = config.etcd() {
            let me = config.advertise().to_string();
            let shared =
                crate::membership::start(endpoint.to_string(), cluster, me, config.table_size(), ETCD_START_WAIT)
                    .map_err(ServerError::Storage)?;
            tracing::info!(version = shared.version(), members = ?shared.topology().members(), "joined the cluster");
            let _ = self.shared.cluster.set(shared);
        }
        let config = Arc::new(config);
        let shards = config.shards();
        let mesh = MeshBuilder::<Batch, _>::full(config.shards(), SHARD_CHANNEL_BATCHES);
        let drained = Arc::new(AtomicUsize::new(0));
        let addr = self.local_addr;
        let open_files = runtime::raise_open_files_limit() as usize;
        // Topic sockets move between shards' descriptor tables over these.
        let links = if shards > 1 && config.topic_sockets() == TopicSockets::Owner {
            Some(Arc::new(LinkMatrix::new(shards).map_err(|e| ServerError::Executor(ExecutorError::Links(e)))?))
        } else {
            None
        };
        let executors = runtime::start_executors(shards, "fluxnode", IO_MEMORY_BYTES_PER_SHARD, true, |_| {
            let (config, mesh, shared, bound, drained, links) =
                (config.clone(), mesh.clone(), self.shared.clone(), self.bound.clone(), drained.clone(), links.clone());
            move |private_table| {
                let start = ShardStart { addr, bound, drained, links, private_table };
                shard_main(config, mesh, shared, start)
            }
        })?;
        executors.check_room(open_files, config.connections_max(), 1);
        let private = executors.private_count();
        // Readiness waits for every shard's listener.
        let all_bound = runtime::wait_for_count(&self.bound, shards);
        self.shared.ready.store(all_bound && !self.shared.shutdown.load(Ordering::Acquire), Ordering::Release);
        // Every shard claimed its links before binding; once none uses this
        // table, its copies go.
        if let Some(links) = links.filter(|_| all_bound && private == shards).and_then(|l| Arc::try_unwrap(l).ok()) {
            links.release();
        }
        if all_bound {
            on_ready(self.local_addr);
        }
        Ok(runtime::join_executors(executors)?)
    }
}

/// What a shard starts from besides the configuration and the mesh.
struct ShardStart {
    /// The address every shard binds (SO_REUSEPORT).
    addr: SocketAddr,
    /// Shards that finished binding.
    bound: Arc<AtomicUsize>,
    /// Shards that finished draining.
    drained: Arc<AtomicUsize>,
    /// The hand-off links, if topic sockets move to their owner.
    links: Option<Arc<LinkMatrix>>,
    /// Whether this shard runs with a descriptor table of its own.
    private_table: bool,
}

/// Serves the connections peers hand over to `shard`, each in a task of
/// its own, as if this shard had accepted them.
async fn adopter(shard: Rc<Shard>, data_queue: glommio::TaskQueueHandle) {
    loop {
        for adoption in shard.adoptions().await {
            if let Ok(task) = glommio::spawn_local_into(crate::conn::adopt(shard.clone(), adoption), data_queue) {
                task.detach();
            }
        }
    }
}

/// One shard's life: join the mesh, start tasks, accept until shutdown,
/// drain.
async fn shard_main(
    config: Arc<Config>,
    mesh: MeshBuilder<Batch, glommio::channels::channel_mesh::Full>,
    shared: Arc<NodeShared>,
    start: ShardStart,
) -> Result<(), ShardError> {
    let ShardStart { addr, bound, drained, links, private_table } = start;
    let executor = glommio::executor();
    let data_queue =
        executor.create_task_queue(Shares::Static(1000), Latency::Matters(Duration::from_millis(1)), "data");
    let control_queue = executor.create_task_queue(Shares::Static(100), Latency::NotImportant, "control");
    let (senders, mut receivers) = mesh.join().await.map_err(|_| ShardError::Mesh)?;
    let id = senders.peer_id();
    let shards = config.shards();
    let links = links.map_or_else(|| Links::none(shards), |l| l.claim(id, private_table));
    let shard = Shard::new(id, shards, config.clone(), shared.clone(), Some(senders), control_queue, links);
    // Durable topics come back before the shard serves anything.
    shard.recover_durable().map_err(|e| ShardError::Storage { shard: id, message: e.to_string() })?;
    shard.resume_uploads();
    shard.start(receivers.streams(), data_queue);
    let adopting = shard.clone();
    glommio::spawn_local_into(adopter(adopting, data_queue), data_queue).map(|t| t.detach()).ok();
    let listener =
        TcpListener::bind(addr).map_err(|source| ShardError::Bind { shard: id, addr, source: source.into() })?;
    bound.fetch_add(1, Ordering::AcqRel);
    tracing::debug!(shard = id, %addr, "shard listening");
    accept_loop(&shard, &listener, data_queue).await;
    drop(listener);
    drain(&shard).await;
    drained.fetch_add(1, Ordering::AcqRel);
    // Stay up (serving peers' in-flight work) until every shard drained.
    let deadline = Instant::now() + shard.config.drain_timeout();
    while drained.load(Ordering::Acquire) < shards && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(SHUTDOWN_POLL_MS)).await;
    }
    shard.close_durable().await;
    Ok(())
}

async fn accept_loop(shard: &Rc<Shard>, listener: &TcpListener, data_queue: glommio::TaskQueueHandle) {
    let max = shard.config.connections_max();
    while let Some(stream) = runtime::accept_next(listener, shard.id, || shard.may_stop_accepting()).await {
        let Some(place) = NodeConnection::take(&shard.node, max) else {
            metrics::add(&shard.metrics.connections_rejected, 1);
            match AdminConnection::take(&shard.node) {
                // Health, readiness and metrics are answered even when full.
                Some(admin) => {
                    let serve = crate::conn::serve_admin_only(shard.clone(), stream, admin);
                    if let Ok(task) = glommio::spawn_local_into(serve, data_queue) {
                        task.detach();
                    }
                }
                None => reject(stream),
            }
            continue;
        };
        let slot = crate::conn::ConnectionSlot::admitted(shard.clone(), place);
        let spawned = glommio::spawn_local_into(crate::conn::serve(shard.clone(), stream, slot), data_queue);
        if let Ok(task) = spawned {
            task.detach();
        }
    }
}

/// Answers 503 on a connection over the limit without reading from it.
fn reject(stream: glommio::net::TcpStream) {
    glommio::spawn_local(async move {
        let mut stream = stream;
        let body = proto::http::json_error(503, "too_many_connections", "connection limit reached", false);
        let _ = futures_lite::AsyncWriteExt::write_all(&mut stream, &body).await;
    })
    .detach();
}

/// Graceful shutdown of one shard: close every session with 1001 after its
/// queue flushes, and wait for them up to the drain timeout.
async fn drain(shard: &Rc<Shard>) {
    shard.node.ready.store(false, Ordering::Release);

    let sessions: Vec<_> = shard.sessions.borrow().values().cloned().collect();
    tracing::info!(shard = shard.id, sessions = sessions.len(), "draining");
    for out in &sessions {
        out.close(close_code::GOING_AWAY, "server shutting down");
    }
    let deadline = Instant::now() + shard.config.drain_timeout();
    while !shard.sessions.borrow().is_empty() && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(SHUTDOWN_POLL_MS)).await;
    }
}
