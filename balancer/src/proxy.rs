//! One client connection: read its request head (bounded in size and time),
//! choose a node by its routing key, connect, replay the head, then hand
//! both sockets to the shard's piper ([`crate::pipe`]), which copies bytes
//! both ways until both sides are done. Runs on the shard that accepted it;
//! nothing after the head is parsed.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use proto::proxy_protocol;

use crate::admin::client_error;
use crate::limits::CONNECT_ATTEMPTS_MAX;
use crate::membership::View;
use crate::pipe::NewTunnel;
use crate::route::{self, HeadError, RouteKey};
use crate::shard::Shard;
use crate::stats;

/// How [`serve`] left a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Served {
    /// Closed here (refused, failed, or the client left); counted down by
    /// the caller.
    Closed,
    /// Handed to the shard's piper, which counts it down when it closes.
    Piped,
}

/// Serves one accepted client connection up to the hand-over to the piper.
pub async fn serve(shard: Rc<Shard>, client: TcpStream) -> Served {
    let _ = client.set_nodelay(true);
    let (Ok(peer), Ok(local)) = (client.peer_addr(), client.local_addr()) else {
        return Served::Closed; // the client already left
    };
    let client = RefCell::new(client);
    let mut head = Vec::new();
    let Some(key) = read_head(&shard, &client, &mut head, peer).await else {
        return Served::Closed;
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
            return Served::Closed;
        }
    };
    tracing::debug!(shard = shard.id, client = %peer, node = %view.addrs[index], ?key, "piping");
    let node = view.stats[index].clone();
    stats::add(&node.connections_total, 1);
    let mut first = if shard.config.proxy_protocol() { proxy_protocol::encode_proxy(peer, local) } else { Vec::new() };
    first.extend_from_slice(&head);
    stats::add(&node.bytes_to_node, head.len() as u64);
    drop(head);
    let upstream = RefCell::new(upstream);
    if write_all(&upstream, &first).await.is_err() {
        return Served::Closed;
    }
    // The piper gets duplicates; glommio's own descriptors close as these
    // streams drop (no operation of theirs is in flight any more).
    let duplicate = |stream: &RefCell<TcpStream>| socket2::SockRef::from(&*stream.borrow()).try_clone();
    let (Ok(client), Ok(upstream)) = (duplicate(&client), duplicate(&upstream)) else {
        return Served::Closed;
    };
    stats::add(&node.connections_current, 1);
    let tunnel = NewTunnel { client, node: upstream, node_stats: node.clone() };
    match shard.piper.adopt(tunnel) {
        Ok(()) => Served::Piped,
        Err(_) => {
            stats::sub(&node.connections_current, 1);
            Served::Closed
        }
    }
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
