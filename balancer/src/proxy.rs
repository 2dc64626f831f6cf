//! One client connection: read its request head (bounded in size and time),
//! choose a node by its routing key, connect, replay the head, then pipe
//! bytes both ways until both sides are done. Runs on the shard that
//! accepted it; nothing after the head is parsed.
//!
//! Piping copies through the shard's scratch buffer: read, then one
//! non-blocking `send` of what arrived. Only when the far side's socket
//! buffer is full does a direction keep the unsent rest in a buffer of its
//! own (at most one chunk), and it reads nothing more until that is
//! written: memory per connection is bounded and zero while idle.
//! ARCHITECTURE.md says why this beat `splice(2)` here.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::task::Poll;

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use proto::proxy_protocol;

use crate::admin::client_error;
use crate::limits::CONNECT_ATTEMPTS_MAX;
use crate::membership::View;
use crate::route::{self, HeadError, RouteKey};
use crate::shard::Shard;
use crate::stats;

/// Serves one accepted client connection until it closes.
pub async fn serve(shard: Rc<Shard>, client: TcpStream) {
    let _ = client.set_nodelay(true);
    let (Ok(peer), Ok(local)) = (client.peer_addr(), client.local_addr()) else {
        return; // the client already left
    };
    let client = RefCell::new(client);
    let mut head = Vec::new();
    let Some(key) = read_head(&shard, &client, &mut head, peer).await else {
        return;
    };
    let counter = match &key {
        RouteKey::Topic(_) => &shard.stats.routed_topic,
        RouteKey::Key(_) => &shard.stats.routed_key,
        RouteKey::Client(_) => &shard.stats.routed_client,
    };
    stats::add(counter, 1);
    let view = shard.view.borrow().clone();
    let (index, upstream) = match connect(&shard, &view, &key).await {
        Ok(chosen) => chosen,
        Err(response) => {
            let _ = write_all(&client, &response).await;
            return;
        }
    };
    tracing::debug!(shard = shard.id, client = %peer, node = %view.addrs[index], ?key, "piping");
    let node = view.stats[index].clone();
    stats::add(&node.connections_current, 1);
    stats::add(&node.connections_total, 1);
    let mut first = if shard.config.proxy_protocol() { proxy_protocol::encode_proxy(peer, local) } else { Vec::new() };
    first.extend_from_slice(&head);
    stats::add(&node.bytes_to_node, head.len() as u64);
    drop(head);
    let upstream = RefCell::new(upstream);
    if write_all(&upstream, &first).await.is_ok() {
        drop(first);
        let progress = Cell::new(0u64);
        let piping = futures_lite::future::zip(
            pump(&shard, &client, &upstream, &node.bytes_to_node, &progress),
            pump(&shard, &upstream, &client, &node.bytes_from_node, &progress),
        );
        let idle = watchdog(shard.config.tunnel_idle_timeout(), &progress, [&client, &upstream]);
        futures_lite::future::or(
            async {
                piping.await;
            },
            idle,
        )
        .await;
    }
    stats::sub(&node.connections_current, 1);
}

/// Reads until the head names a routing key. Answers and returns None on a
/// bad or slow head, or when the client leaves first.
async fn read_head(
    shard: &Shard,
    client: &RefCell<TcpStream>,
    head: &mut Vec<u8>,
    peer: SocketAddr,
) -> Option<RouteKey> {
    let reading = async {
        loop {
            let n = read_into(shard, client, head).await?;
            if n == 0 {
                return Ok::<_, io::Error>(None);
            }
            match route::route_key(head, peer.ip()) {
                Ok(Some(key)) => return Ok(Some(Ok(key))),
                Ok(None) => continue,
                Err(e) => return Ok(Some(Err(e))),
            }
        }
    };
    let outcome = glommio::timer::timeout(shard.config.head_timeout(), async { Ok(reading.await) }).await;
    let (status, code, message) = match outcome {
        Ok(Ok(Some(Ok(key)))) => return Some(key),
        Ok(Ok(None)) | Ok(Err(_)) => {
            tracing::debug!(shard = shard.id, client = %peer, "client left before its request head ended");
            return None;
        }
        Ok(Ok(Some(Err(e @ HeadError::Malformed)))) => (400, "bad_request", e.to_string()),
        Ok(Ok(Some(Err(e @ HeadError::TooLarge)))) => (431, "head_too_large", e.to_string()),
        Err(_) => (408, "timeout", "request head not received in time".to_string()),
    };
    let counter = if status == 408 { &shard.stats.head_timeouts } else { &shard.stats.head_errors };
    stats::add(counter, 1);
    let _ = write_all(client, &client_error(status, code, &message)).await;
    None
}

/// Connects to the key's node; when it refuses, to the node the table
/// would choose without it, up to `CONNECT_ATTEMPTS_MAX` nodes. Err holds
/// the response for the client (503 with no node, 502 when all failed).
async fn connect(shard: &Shard, view: &Arc<View>, key: &RouteKey) -> Result<(usize, TcpStream), Vec<u8>> {
    let hash_input = key.hash_input();
    let mut failed: Vec<usize> = Vec::new();
    for attempt in 0..CONNECT_ATTEMPTS_MAX {
        let index = if attempt == 0 {
            view.table.lookup_index(&hash_input)
        } else {
            shard.fallback(view, &failed).and_then(|f| f.table.lookup_index(&hash_input).map(|i| f.indices[i]))
        };
        let Some(index) = index else { break };
        match TcpStream::connect_timeout(view.addrs[index], shard.config.connect_timeout()).await {
            Ok(stream) => {
                if attempt > 0 {
                    stats::add(&shard.stats.rerouted, 1);
                }
                let _ = stream.set_nodelay(true);
                return Ok((index, stream));
            }
            Err(e) => {
                tracing::debug!(shard = shard.id, node = %view.addrs[index], "connect failed: {e}");
                stats::add(&view.stats[index].connect_failures, 1);
                failed.push(index);
                failed.sort_unstable();
            }
        }
    }
    if failed.is_empty() {
        stats::add(&shard.stats.no_node, 1);
        Err(client_error(503, "no_node", "no routable node"))
    } else {
        stats::add(&shard.stats.node_unreachable, 1);
        Err(client_error(502, "node_unreachable", "no node accepted the connection"))
    }
}

/// Closes both sockets once no byte moved either way for a whole `idle`
/// period (so after between one and two periods of silence), then waits for
/// the pumps to notice. One timer per connection per period, instead of a
/// read timeout re-armed on every read: that showed up as 4 to 5% of the
/// balancer's CPU (glommio's timer map and clock reads) under fan-out.
async fn watchdog(idle: std::time::Duration, progress: &Cell<u64>, sides: [&RefCell<TcpStream>; 2]) {
    let mut last = progress.get();
    loop {
        glommio::timer::sleep(idle).await;
        let now = progress.get();
        if now == last {
            for side in sides {
                shutdown(side, Shutdown::Both);
            }
            std::future::pending::<()>().await;
        }
        last = now;
    }
}

/// Copies `from` to `to` until `from` ends (then half-closes `to`) or
/// either fails (then shuts both, which ends the other direction too).
/// Every read adds to `progress`, the watchdog's sign of life.
async fn pump(
    shard: &Shard,
    from: &RefCell<TcpStream>,
    to: &RefCell<TcpStream>,
    bytes: &AtomicU64,
    progress: &Cell<u64>,
) {
    let mut pending: Vec<u8> = Vec::new();
    let outcome: io::Result<()> = async {
        loop {
            let n = poll_fn(|cx| {
                let mut scratch = shard.scratch.borrow_mut();
                match Pin::new(&mut *from.borrow_mut()).poll_read(cx, &mut scratch[..]) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        let sent = match try_send(to, &scratch[..n]) {
                            Ok(sent) => sent,
                            Err(e) => return Poll::Ready(Err(e)),
                        };
                        if sent < n {
                            pending.extend_from_slice(&scratch[sent..n]);
                        }
                        Poll::Ready(Ok(n))
                    }
                    other => other,
                }
            })
            .await?;
            if n == 0 {
                shutdown(to, Shutdown::Write);
                return Ok(());
            }
            stats::add(bytes, n as u64);
            progress.set(progress.get() + n as u64);
            if !pending.is_empty() {
                write_all(to, &pending).await?;
                pending = Vec::new();
            }
        }
    }
    .await;
    if outcome.is_err() {
        shutdown(from, Shutdown::Both);
        shutdown(to, Shutdown::Both);
    }
}

/// Reads once into the shard's scratch buffer and appends to `buf`.
async fn read_into(shard: &Shard, stream: &RefCell<TcpStream>, buf: &mut Vec<u8>) -> io::Result<usize> {
    poll_fn(|cx| {
        let mut scratch = shard.scratch.borrow_mut();
        let polled = Pin::new(&mut *stream.borrow_mut()).poll_read(cx, &mut scratch[..]);
        if let Poll::Ready(Ok(n)) = polled {
            buf.extend_from_slice(&scratch[..n]);
        }
        polled
    })
    .await
}

/// One non-blocking `send`: the bytes the kernel took now.
fn try_send(stream: &RefCell<TcpStream>, data: &[u8]) -> io::Result<usize> {
    let stream = stream.borrow();
    match socket2::SockRef::from(&*stream).send_with_flags(data, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(e),
    }
}

/// Writes everything, waiting for room.
pub async fn write_all(stream: &RefCell<TcpStream>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let n = poll_fn(|cx| Pin::new(&mut *stream.borrow_mut()).poll_write(cx, data)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
    }
    Ok(())
}

/// Shuts a socket now (glommio's own shutdown is async only in name).
fn shutdown(stream: &RefCell<TcpStream>, how: Shutdown) {
    let stream = stream.borrow();
    let _ = socket2::SockRef::from(&*stream).shutdown(how);
}
