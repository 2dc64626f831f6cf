//! Starting and stopping the balancer: the executors, the view channels
//! from shard 0 to every other shard, the listeners and shutdown.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::channels::shared_channel::{self, SharedReceiver, SharedSender};
use glommio::net::TcpListener;
use glommio::{Latency, Shares};
use runtime::limits::{IO_MEMORY_BYTES_PER_SHARD, SHUTDOWN_POLL_MS};
use runtime::{ServerError, ShardError};

use crate::config::Config;
use crate::control::Control;
use crate::limits::{LISTEN_BACKLOG, VIEW_CHANNEL_CAPACITY};
use crate::membership::{Membership, Source, View};
use crate::pipe::Piper;
use crate::shard::Shard;
use crate::stats::{self, ShardStats};

/// A balancer being started.
#[derive(Debug)]
pub struct Balancer {
    /// The client-facing address actually bound.
    pub local_addr: SocketAddr,
    /// The admin address actually bound.
    pub admin_addr: SocketAddr,
    /// Set to stop.
    pub shutdown: Arc<AtomicBool>,
    /// Hold the ports between resolution and the shards' own binds.
    _reservations: [socket2::Socket; 2],
}

impl Balancer {
    /// Reserves both addresses (resolving port 0) so that shards bind them
    /// with SO_REUSEPORT.
    pub fn bind(config: &Config) -> Result<Balancer, ServerError> {
        let reserve = |addr| runtime::reserve(addr).map_err(|source| ServerError::Bind { addr, source });
        let (listen, local_addr) = reserve(config.listen())?;
        let (admin, admin_addr) = reserve(config.admin_listen())?;
        Ok(Balancer { local_addr, admin_addr, shutdown: Arc::default(), _reservations: [listen, admin] })
    }

    /// Runs until shutdown completes. `on_ready` runs once every shard
    /// accepts connections.
    pub fn run(self, config: Config, on_ready: impl FnOnce(SocketAddr, SocketAddr)) -> Result<(), ServerError> {
        let config = Arc::new(config);
        let mut membership = Membership::new(config.health_rise(), config.health_fall(), config.table_size());
        for &node in config.nodes() {
            // Config deduplicated the list and bounded it by NODES_MAX.
            let _ = membership.add(node, Source::Static);
        }
        // A fresh membership has never built a view, so the first call always
        // returns one (even for an empty node set).
        let first_view = Arc::new(membership.view_if_changed().expect("a fresh membership always builds a view"));
        let shard_stats: Vec<Arc<ShardStats>> = (0..config.shards()).map(|_| Arc::default()).collect();
        let mut senders = Vec::new();
        let mut receivers: Vec<Option<SharedReceiver<Arc<View>>>> = vec![None];
        for _ in 1..config.shards() {
            let (tx, rx) = shared_channel::new_bounded(VIEW_CHANNEL_CAPACITY);
            senders.push(tx);
            receivers.push(Some(rx));
        }
        let bound = Arc::new(AtomicUsize::new(0));
        let mut control_parts = Some((membership, senders));
        let mut receivers = receivers.into_iter();
        let open_files = runtime::raise_open_files_limit() as usize;
        // A descriptor table per shard, as in fluxnode (runtime::start_executors):
        // each proxied connection holds two descriptors on the shard that
        // accepted it, and none moves between shards.
        let handles =
            runtime::start_executors(config.shards(), "fluxbalancer", IO_MEMORY_BYTES_PER_SHARD, true, |index| {
                let parts = if index == 0 { control_parts.take() } else { None };
                let receiver = receivers.next().flatten();
                let setup = ShardSetup {
                    index,
                    config: config.clone(),
                    view: first_view.clone(),
                    shard_stats: shard_stats.clone(),
                    shutdown: self.shutdown.clone(),
                    bound: bound.clone(),
                    addrs: (self.local_addr, self.admin_addr),
                };
                move |_private_table| shard_main(setup, parts, receiver)
            })?;
        if runtime::wait_for_count(&bound, config.shards()) {
            on_ready(self.local_addr, self.admin_addr);
        }
        handles.check_room(open_files, config.connections_max(), 2); // client and node
        Ok(runtime::join_executors(handles)?)
    }
}

/// What each executor starts from.
struct ShardSetup {
    index: usize,
    config: Arc<Config>,
    view: Arc<View>,
    shard_stats: Vec<Arc<ShardStats>>,
    shutdown: Arc<AtomicBool>,
    bound: Arc<AtomicUsize>,
    addrs: (SocketAddr, SocketAddr),
}

async fn shard_main(
    setup: ShardSetup,
    control_parts: Option<(Membership, Vec<SharedSender<Arc<View>>>)>,
    receiver: Option<SharedReceiver<Arc<View>>>,
) -> Result<(), ShardError> {
    let executor = glommio::executor();
    let control_queue = executor.create_task_queue(Shares::Static(100), Latency::NotImportant, "control");
    let id = setup.index;
    let (listen, admin) = setup.addrs;
    let bind_error = |addr, source| ShardError::Bind { shard: id, addr, source };
    let listener = bind_reuse_port(listen).map_err(|e| bind_error(listen, e))?;
    // Started here, on the shard's thread: the piper shares its core and
    // its descriptor table.
    let shard_stats = setup.shard_stats[id].clone();
    let piper = Piper::start(id, listener, setup.config.clone(), setup.view, shard_stats.clone())
        .map_err(|source| ShardError::Thread { shard: id, source })?;
    let shard = Shard::new(id, setup.config.clone(), shard_stats, setup.shutdown, piper);
    let bind = |addr| TcpListener::bind(addr).map_err(|source| bind_error(addr, source.into()));
    if let Some((membership, senders)) = control_parts {
        let admin_listener = bind(admin)?;
        let mut connected = Vec::with_capacity(senders.len());
        for sender in senders {
            connected.push(sender.connect().await);
        }
        let control = Rc::new(Control {
            shard: shard.clone(),
            membership: std::cell::RefCell::new(membership),
            senders: connected,
            shard_stats: setup.shard_stats.clone(),
        });
        spawn_into(control_queue, control.clone().health_loop());
        if let Some(name) = setup.config.dns().map(str::to_string) {
            spawn_into(control_queue, control.clone().dns_loop(name));
        }
        spawn_into(control_queue, control.admin_loop(admin_listener));
    }
    if let Some(receiver) = receiver {
        let receiver = receiver.connect().await;
        let views = shard.clone();
        spawn_into(control_queue, async move {
            while let Some(view) = receiver.recv().await {
                views.install(view);
            }
        });
    }
    setup.bound.fetch_add(1, Ordering::AcqRel);
    while !shard.shutting_down() {
        glommio::timer::sleep(Duration::from_millis(SHUTDOWN_POLL_MS)).await;
    }
    shard.piper.stop_accepting();
    let deadline = Instant::now() + setup.config.drain_timeout();
    while stats::get(&shard.stats.connections_current) > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(SHUTDOWN_POLL_MS)).await;
    }
    shard.piper.stop(); // closes what the drain left open
    Ok(())
}

/// The client-facing listener of one shard: every shard binds the same
/// address with SO_REUSEPORT, and the kernel spreads connections over them.
fn bind_reuse_port(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket)
}

fn spawn_into(queue: glommio::TaskQueueHandle, future: impl std::future::Future<Output = ()> + 'static) {
    if let Ok(task) = glommio::spawn_local_into(future, queue) {
        task.detach();
    }
}
