//! The glommio shell both binaries share (`fluxnode` and `fluxbalancer`):
//! reserving a port for SO_REUSEPORT shards, starting executors one at a
//! time, accepting until shutdown, logging and signals. No protocol here.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use glommio::net::{TcpListener, TcpStream};
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};

use crate::limits::{IO_URING_RING_DEPTH, SHUTDOWN_POLL_MS};

/// Binds `addr` with SO_REUSEPORT without listening, resolving port 0, so
/// that every shard can then bind the same port. Keep the socket until the
/// shards have bound.
pub fn reserve(addr: SocketAddr) -> std::io::Result<(socket2::Socket, SocketAddr)> {
    let domain = if addr.is_ipv6() { socket2::Domain::IPV6 } else { socket2::Domain::IPV4 };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    let local = socket.local_addr()?.as_socket().ok_or_else(|| std::io::Error::other("not an IP socket"))?;
    Ok((socket, local))
}

/// Starts `shards` executors, pinned to cores 0.. when there are enough
/// cores, named `{name}-{index}`. `make(index)` runs here and returns what
/// runs there: a `Send` closure that builds the shard's (non-`Send`) future.
///
/// Executors are created one at a time: each signals from inside its first
/// poll before the next is built. A precaution, not a proven fix: with
/// concurrent creation (LocalExecutorPoolBuilder) fluxnode twice aborted at
/// start-up with "malloc(): unaligned tcache chunk detected" (see "Known
/// problems" in ARCHITECTURE.md).
pub fn start_executors<G, Fut>(
    shards: usize,
    name: &str,
    io_memory: usize,
    mut make: impl FnMut(usize) -> G,
) -> Result<Vec<ExecutorJoinHandle<Result<(), String>>>, String>
where
    G: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>> + 'static,
{
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut handles = Vec::with_capacity(shards);
    for index in 0..shards {
        let placement = if shards <= cores { Placement::Fixed(index) } else { Placement::Unbound };
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let build = make(index);
        let handle = LocalExecutorBuilder::new(placement)
            .name(&format!("{name}-{index}"))
            .io_memory(io_memory)
            .ring_depth(IO_URING_RING_DEPTH)
            .spawn(move || async move {
                let _ = started_tx.send(());
                build().await
            })
            .map_err(|e| e.to_string())?;
        if started_rx.recv_timeout(Duration::from_secs(30)).is_err() {
            return Err(format!("shard {index} did not start"));
        }
        handles.push(handle);
    }
    Ok(handles)
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

/// Waits for every executor; the errors of those that failed, joined.
pub fn join_executors(handles: Vec<ExecutorJoinHandle<Result<(), String>>>) -> Result<(), String> {
    let failed: Vec<String> = handles
        .into_iter()
        .filter_map(|h| match h.join() {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(e) => Some(e.to_string()),
        })
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

/// The next accepted connection, or None once `stopping()` holds (checked
/// every `SHUTDOWN_POLL_MS`). Accept errors (EMFILE and friends) are logged
/// and retried after a short pause instead of spinning.
pub async fn accept_next(listener: &TcpListener, shard: usize, stopping: impl Fn() -> bool) -> Option<TcpStream> {
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
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
                tracing::warn!(shard, "accept failed: {e}");
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
