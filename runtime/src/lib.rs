//! The glommio shell both binaries share (`fluxnode` and `fluxbalancer`):
//! reserving a port for SO_REUSEPORT shards, starting executors one at a
//! time (each with a descriptor table of its own), moving sockets between
//! those tables ([`fdpass`]), accepting until shutdown, logging, signals,
//! and the start-up errors both report. No protocol here.

pub mod config;
pub mod fdpass;
pub mod limits;
pub mod woken;

/// Why one shard's future ended in error.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// Its listener could not be bound.
    #[error("shard {shard}: cannot bind {addr}: {source}")]
    Bind { shard: usize, addr: SocketAddr, source: std::io::Error },
    /// It could not join the channel mesh between shards.
    #[error("cannot join the shard mesh")]
    Mesh,
    /// A helper thread of its own could not be started.
    #[error("shard {shard}: cannot start a helper thread: {source}")]
    Thread { shard: usize, source: std::io::Error },
    /// Its durable topics could not be recovered.
    #[error("shard {shard}: durable topics not recovered: {message}")]
    Storage { shard: usize, message: String },
}

/// Why executors could not be started, or how one ended.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// glommio refused to make the executor (io_uring, memlock).
    #[error("shard {shard}: cannot make its executor: {reason}")]
    Make { shard: usize, reason: String },
    /// The executor's thread could not be started.
    #[error("cannot start an executor thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The executor was not made within 30 s.
    #[error("shard {shard} was not made within 30 s")]
    NotMade { shard: usize },
    /// A shard did not start within 30 s.
    #[error("a shard did not start within 30 s")]
    NotStarted,
    /// Start-up stopped before this executor was told to go.
    #[error("start-up abandoned")]
    Abandoned,
    /// The hand-off links between shards could not be made.
    #[error("hand-off links: {0}")]
    Links(#[source] std::io::Error),
    /// A shard's future failed.
    #[error(transparent)]
    Shard(#[from] ShardError),
    /// An executor's thread panicked.
    #[error("an executor panicked")]
    Panicked,
}

/// Why a binary could not run (both report the same way).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listening address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    /// The executors could not start, or one failed.
    #[error("cannot start executors: {0}")]
    Executor(#[from] ExecutorError),
    /// Durable storage could not be prepared (object store, restore).
    #[error("{0}")]
    Storage(String),
}

/// The value of `result`, or: print `program: error` and exit with
/// `status` (2 for a bad configuration, 1 otherwise).
pub fn or_exit<T, E: std::fmt::Display>(program: &str, status: i32, result: Result<T, E>) -> T {
    match result {
        Ok(value) => value,
        Err(e) => {
            eprintln!("{program}: {e}");
            std::process::exit(status);
        }
    }
}

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};

use crate::limits::{IO_URING_RING_DEPTH, SHUTDOWN_POLL_MS};

/// Binds `addr` with SO_REUSEPORT without listening, resolving port 0, so
/// that every shard can then bind the same port. Keep the socket until the
/// shards have bound.
///
/// SO_REUSEPORT would also let a second process join a port another
/// process already serves (the kernel then spreads connections over both,
/// and two nodes sequence the same topics). So a named port is refused with
/// `AddrInUse` while something keeps accepting connections on it (see
/// `someone_listens`). A test bind without SO_REUSEPORT is no good: after
/// a `kill -9` the dead node's accepted sockets linger (FIN_WAIT2,
/// TIME_WAIT) while their clients hang on, and that bind fails until they
/// expire, where a restart must work at once. What is left is a narrow
/// race: two nodes starting at the same instant, neither listening yet.
pub fn reserve(addr: SocketAddr) -> std::io::Result<(socket2::Socket, SocketAddr)> {
    if addr.port() != 0 && someone_listens(addr) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another process already accepts connections on this port",
        ));
    }
    let domain = if addr.is_ipv6() { socket2::Domain::IPV6 } else { socket2::Domain::IPV4 };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    let local = socket.local_addr()?.as_socket().ok_or_else(|| std::io::Error::other("not an IP socket"))?;
    Ok((socket, local))
}

/// How long a listener may go on accepting after its process died. A
/// process's io_uring is torn down after it exits, asynchronously, and a
/// pending accept or poll there keeps the listening socket open meanwhile:
/// seen here, a node restarted right after `kill -9` connected to its
/// predecessor's listener. A live node answers for the whole period.
const DEAD_LISTENER_GRACE: Duration = Duration::from_secs(2);
/// Pause between two connection attempts while waiting it out.
const DEAD_LISTENER_RETRY: Duration = Duration::from_millis(50);

/// Whether connections to `addr` (to loopback for a wildcard address) are
/// still accepted after [`DEAD_LISTENER_GRACE`]. Loopback answers or
/// refuses at once; the timeout bounds odd set-ups.
fn someone_listens(addr: SocketAddr) -> bool {
    let mut target = addr;
    if addr.ip().is_unspecified() {
        target.set_ip(if addr.is_ipv6() {
            std::net::Ipv6Addr::LOCALHOST.into()
        } else {
            std::net::Ipv4Addr::LOCALHOST.into()
        });
    }
    let deadline = std::time::Instant::now() + DEAD_LISTENER_GRACE;
    loop {
        match std::net::TcpStream::connect_timeout(&target, Duration::from_secs(1)) {
            // A connection to itself is no listener: with nothing listening
            // Linux may pick the port as the source port (simultaneous open).
            Ok(stream) if stream.local_addr().ok() == stream.peer_addr().ok() => return false,
            Ok(_) if std::time::Instant::now() >= deadline => return true,
            Ok(_) => std::thread::sleep(DEAD_LISTENER_RETRY),
            Err(_) => return false,
        }
    }
}

/// Running executors: their threads, and which of them run with a
/// descriptor table of their own.
#[derive(Debug)]
pub struct Executors {
    handles: Vec<std::thread::JoinHandle<Result<(), ExecutorError>>>,
    /// Per executor: whether it runs with a private descriptor table.
    private_tables: Vec<bool>,
}

/// Starts `shards` executors, pinned to cores 0.. when there are enough
/// cores, named `{name}-{index}`. `make(index)` runs here and returns what
/// runs there: a `Send` closure that builds the shard's (non-`Send`) future,
/// told whether the shard's descriptor table is its own.
///
/// With `private_tables`, each executor thread leaves the process's shared
/// descriptor table for a copy of its own (`unshare(CLONE_FILES)`) before
/// its future starts. The open-files limit bounds each table, not the
/// process, so a node of N shards holds N times as many connections. A
/// descriptor number then means something on its own shard only (see
/// `fdpass` for the hand-off). Every executor is
/// made (its ring, and the eventfd other threads write to wake it) before
/// any leaves the shared table, so those numbers mean the same in every
/// copy. (glommio's placeholder notifier for disconnected channels is made
/// lazily, maybe in one shard's copy; it is never written to.) If `unshare`
/// is refused (a seccomp profile), that shard stays on the shared table and
/// the node says so in its log.
///
/// Executors are created one at a time. A precaution, not a proven fix:
/// with concurrent creation (LocalExecutorPoolBuilder) fluxnode twice
/// aborted at start-up with "malloc(): unaligned tcache chunk detected" (see
/// "Known problems" in ARCHITECTURE.md).
pub fn start_executors<G, Fut>(
    shards: usize,
    name: &str,
    io_memory: usize,
    private_tables: bool,
    mut make: impl FnMut(usize) -> G,
) -> Result<Executors, ExecutorError>
where
    G: FnOnce(bool) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), ShardError>> + 'static,
{
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut handles = Vec::with_capacity(shards);
    let mut go = Vec::with_capacity(shards);
    let (started_tx, started_rx) = std::sync::mpsc::channel::<(usize, bool)>();
    for index in 0..shards {
        let placement = if shards <= cores { Placement::Fixed(index) } else { Placement::Unbound };
        let (made_tx, made_rx) = std::sync::mpsc::channel::<Result<(), ExecutorError>>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let started_tx = started_tx.clone();
        let build = make(index);
        let executor_name = format!("{name}-{index}");
        let handle = std::thread::Builder::new()
            .name(executor_name.clone())
            .spawn(move || {
                let made = LocalExecutorBuilder::new(placement)
                    .name(&executor_name)
                    .io_memory(io_memory)
                    .ring_depth(IO_URING_RING_DEPTH)
                    .make()
                    .map_err(|e| e.to_string());
                let executor = match made {
                    Ok(executor) => {
                        let _ = made_tx.send(Ok(()));
                        executor
                    }
                    Err(reason) => {
                        let _ = made_tx.send(Err(ExecutorError::Make { shard: index, reason: reason.clone() }));
                        return Err(ExecutorError::Make { shard: index, reason });
                    }
                };
                go_rx.recv().map_err(|_| ExecutorError::Abandoned)?;
                let private = private_tables && leave_shared_table(index);
                executor.run(async move {
                    let _ = started_tx.send((index, private));
                    build(private).await.map_err(ExecutorError::Shard)
                })
            })
            .map_err(ExecutorError::Thread)?;
        match made_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(ExecutorError::NotMade { shard: index }),
        }
        handles.push(handle);
        go.push(go_tx);
    }
    for go_tx in go {
        let _ = go_tx.send(());
    }
    let mut private = vec![false; shards];
    for _ in 0..shards {
        let (index, own_table) =
            started_rx.recv_timeout(Duration::from_secs(30)).map_err(|_| ExecutorError::NotStarted)?;
        private[index] = own_table;
    }
    Ok(Executors { handles, private_tables: private })
}

impl Executors {
    /// How many executors run with a descriptor table of their own.
    pub fn private_count(&self) -> usize {
        self.private_tables.iter().filter(|&&p| p).count()
    }

    /// Logs the descriptor tables and warns if `connections_max`
    /// connections of `descriptors_each` cannot fit under `open_files` per
    /// table.
    pub fn check_room(&self, open_files: usize, connections_max: usize, descriptors_each: usize) {
        let private = self.private_count();
        let room = open_files * private.max(1) / descriptors_each.max(1);
        tracing::info!(
            executors = self.private_tables.len(),
            private_tables = private,
            open_files_per_table = open_files,
            "descriptor tables"
        );
        if connections_max > room {
            tracing::warn!(
                connections_max,
                "the open-files limit ({open_files} per table, {private} private tables) allows about {room} connections"
            );
        }
    }
}

/// Gives the calling thread a private copy of the descriptor table; whether
/// it did.
fn leave_shared_table(shard: usize) -> bool {
    // SAFETY: unshare(CLONE_FILES) only copies this thread's table.
    if unsafe { libc::unshare(libc::CLONE_FILES) } == 0 {
        return true;
    }
    let e = std::io::Error::last_os_error();
    tracing::warn!(shard, "unshare(CLONE_FILES) refused ({e}): this shard shares the process's descriptor table");
    false
}

/// Raises the open-files soft limit to the hard limit (as Go programs such
/// as nats-server do at start); the soft limit afterwards.
pub fn raise_open_files_limit() -> u64 {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
        limit.rlim_cur
    }
}

/// Blocks until `count` reaches `target` or 30 s pass (readiness: every
/// shard has bound its listener). Whether it got there.
pub fn wait_for_count(count: &std::sync::atomic::AtomicUsize, target: usize) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while count.load(Ordering::Acquire) < target && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    count.load(Ordering::Acquire) >= target
}

/// Waits for every executor; the first error of those that failed (the
/// others are logged).
pub fn join_executors(executors: Executors) -> Result<(), ExecutorError> {
    let mut first = None;
    for handle in executors.handles {
        let failed = match handle.join() {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(_) => ExecutorError::Panicked,
        };
        if first.is_some() {
            tracing::error!("{failed}");
        } else {
            first = Some(failed);
        }
    }
    first.map_or(Ok(()), Err)
}

/// The next accepted connection, or None once `stopping()` holds (checked
/// every `SHUTDOWN_POLL_MS`). Accept errors (EMFILE and friends) are retried
/// after a short pause instead of spinning, and logged at most once a second
/// (a full descriptor table fails every retry).
pub async fn accept_next(listener: &TcpListener, shard: usize, stopping: impl Fn() -> bool) -> Option<TcpStream> {
    let mut logged: Option<std::time::Instant> = None;
    let mut unlogged = 0u64;
    loop {
        // The stop check's ticks poll this task every 50 ms; the accept
        // must not register again on each (see `woken`).
        let accept = woken::WhenWoken::new(listener.accept());
        let accepted = futures_lite::future::or(async { Some(accept.await) }, async {
            while !stopping() {
                glommio::timer::sleep(Duration::from_millis(SHUTDOWN_POLL_MS)).await;
            }
            None
        })
        .await;
        match accepted {
            None => return None,
            Some(Ok(stream)) => return Some(stream),
            Some(Err(e)) => {
                if logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                    tracing::warn!(shard, repeated = unlogged, "accept failed: {e}");
                    (logged, unlogged) = (Some(std::time::Instant::now()), 0);
                } else {
                    unlogged += 1;
                }
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Logs to stderr at the level named by the environment variable `filter_var`
/// (default `info`).
pub fn init_tracing(filter_var: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env(filter_var).unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
}

/// On the first SIGTERM or SIGINT, runs `on_first` (which starts a graceful
/// stop); on a second, exits at once with status 1.
pub fn stop_on_signals(program: &'static str, on_first: impl Fn() + Send + 'static) {
    use signal_hook::consts::{SIGINT, SIGTERM};
    match signal_hook::iterator::Signals::new([SIGTERM, SIGINT]) {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                for (received, signal) in signals.forever().enumerate() {
                    if received > 0 {
                        eprintln!("{program}: second signal {signal}, exiting now");
                        std::process::exit(1);
                    }
                    tracing::info!(signal, "shutting down");
                    on_first();
                }
            });
        }
        Err(e) => tracing::warn!("cannot install signal handlers: {e}"),
    }
}
