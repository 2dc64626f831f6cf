//! One client connection: HTTP requests, then possibly one WebSocket
//! session on one of the three paths. Runs on the shard that accepted it,
//! or on the shard it was handed to (a topic socket before its 101, a
//! native socket at its first request).
//!
//! This module holds the connection itself (admission, the PROXY header,
//! request heads and bodies, the hand-off of a topic socket to its owner
//! shard); `rest` answers plain HTTP requests; `session` runs a WebSocket
//! session and hands each frame to its protocol's adapter (`raw_session`,
//! `legacy_session`, `native_session`), which calls the shard; `writer` drains the send queue.
//!
//! The socket is shared by the session's reader, its writer (which drains
//! the connection's `Outbound`; both run in the session's one task) and the
//! shard's direct flush. glommio streams poll readiness separately for
//! reading and writing, so each borrows the stream only for the length of
//! one `poll` call.

pub(crate) mod durable_api;
mod forward;
mod legacy_session;
mod link_session;
mod native_session;
mod raw_session;
mod rest;
mod session;
mod writer;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use proto::admin::{DurableInfo, LogMessage, LogPage, PublishAnswer, StatusBody, TopicInfo, TopicPage};
use proto::broker::{
    BatchReply, Format, Granted, JoinRequest, PublishOptions, PublishReply, RequestSpec, ScheduleAsk, SubscribeRequest,
};
use proto::http::{self, RequestHead, Route, Upgrade};
use proto::limits::{HTTP_BODY_SLACK_BYTES, WRITE_BATCH_BYTES_MAX};
use proto::message::PayloadKind;
use proto::metrics;
use proto::native::{self, Request};
use proto::outbound::{DirectSink, Outbound, Unsent};
use proto::owner::{OwnerError, ResumeFrom, Resumed};
use proto::proxy_protocol::{self, ProxyError, ProxyHeader};
use proto::sync::Event;
use proto::topic::{TopicName, TopicQuery};
use proto::ws::{self, close_code, Close, Decoder, WsEvent};
use serde::Deserialize;

use crate::config::{SlowConsumerPolicy, TopicSockets};
use crate::shard::{AdminConnection, Adoption, Handoff, HandoffStage, NodeConnection, Shard};

use legacy_session::legacy_message;
use link_session::link_message;

/// Largest body of a durable topic's declaration (`PUT /v1/topics/{topic}`):
/// a few JSON fields.
const DECLARE_BODY_BYTES_MAX: usize = 4096;
use native_session::native_message;
use raw_session::raw_message;
pub use rest::serve_admin_only;
use rest::{owner_error, respond};
use session::{websocket, Session};
use writer::{DirectOff, Writer};

/// How long the writer waits, after sending a close frame, for the client to
/// answer before the socket is shut: RFC 6455 asks for the close handshake,
/// a stalled client must not hold the connection open.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Close code sent on a raw socket when `?from=N` is older than history.
pub const CLOSE_HISTORY_GAP: u16 = close_code::HISTORY_GAP;

/// Close code sent on a raw socket when `?from=N` belongs to another
/// sequence space (`epoch` differs, or N was never assigned here): nothing
/// after N can be recovered.
pub const CLOSE_HISTORY_LOST: u16 = 4011;

/// A socket shared by the reader and the writer of one connection (one
/// task) and the shard's direct flush.
#[derive(Clone, Debug)]
struct Io(Rc<Socket>);

/// The connection's socket, shared by its reader, its writer and the
/// shard's direct flush (all on one thread, never across an await).
#[derive(Debug)]
struct Socket(RefCell<TcpStream>);

impl std::ops::Deref for Socket {
    type Target = RefCell<TcpStream>;
    fn deref(&self) -> &RefCell<TcpStream> {
        &self.0
    }
}

impl Io {
    /// Reads into the shard's scratch buffer and appends what arrived to
    /// `buf`; 0 means end of stream. glommio polls readiness and passes the
    /// buffer to `recv` only when data is there, so no buffer is held while
    /// the connection is idle.
    async fn read(&self, shard: &Shard, buf: &mut BytesMut) -> io::Result<usize> {
        poll_fn(|cx| {
            let mut scratch = shard.read_scratch.borrow_mut();
            let polled = Pin::new(&mut *self.0.borrow_mut()).poll_read(cx, &mut scratch[..]);
            if let std::task::Poll::Ready(Ok(n)) = polled {
                buf.extend_from_slice(&scratch[..n]);
            }
            polled
        })
        .await
    }

    /// One non-blocking `send`: the bytes the kernel took now (0 when the
    /// socket buffer is full).
    fn try_send(&self, data: &[u8]) -> io::Result<usize> {
        self.0.try_send(data)
    }

    /// One write: the bytes the socket took (waits while it takes none).
    async fn write_some(&self, data: &[u8]) -> io::Result<usize> {
        poll_fn(|cx| Pin::new(&mut *self.0.borrow_mut()).poll_write(cx, data)).await
    }

    async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = self.write_some(data).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            data = &data[n..];
        }
        Ok(())
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) {
        let _ = self.0.borrow().set_read_timeout(timeout);
    }

    /// Shuts the socket down now. glommio emulates shutdown synchronously
    /// anyway; doing it through socket2 keeps the stream borrow short.
    fn shutdown(&self, how: Shutdown) {
        let stream = self.0.borrow();
        let _ = socket2::SockRef::from(&*stream).shutdown(how);
    }
}

/// One open client connection in the shard's count (and the node's):
/// created at accept, dropped when the connection is gone, whichever task
/// holds it last.
#[derive(Debug)]
pub struct ConnectionSlot {
    /// The shard that counts the connection.
    shard: Rc<Shard>,
    /// The connection's place in the node-wide count; taken along when the
    /// connection moves to another shard.
    node: Option<NodeConnection>,
}

impl ConnectionSlot {
    /// A connection the accept loop admitted, with its place in the node's
    /// count.
    pub fn admitted(shard: Rc<Shard>, node: NodeConnection) -> ConnectionSlot {
        metrics::add(&shard.metrics.connections_current, 1);
        metrics::add(&shard.metrics.connections_total, 1);
        ConnectionSlot { shard, node: Some(node) }
    }

    /// A connection a peer handed over, with its place in the node's count.
    fn adopted(shard: Rc<Shard>, node: NodeConnection) -> ConnectionSlot {
        metrics::add(&shard.metrics.connections_current, 1);
        ConnectionSlot { shard, node: Some(node) }
    }

    /// The connection moves to another shard: it leaves this shard's count
    /// and takes its place in the node's along.
    fn leave(mut self) -> Option<NodeConnection> {
        self.node.take()
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        metrics::sub(&self.shard.metrics.connections_current, 1);
    }
}

/// Serves one accepted connection: HTTP requests here; a WebSocket session
/// continues in a task of its own (see `websocket`), and this task ends.
pub async fn serve(shard: Rc<Shard>, stream: TcpStream, slot: ConnectionSlot) {
    let _ = stream.set_nodelay(true);
    let Ok(mut client) = stream.peer_addr() else {
        return; // the client already left
    };
    let io = Io(Rc::new(Socket(RefCell::new(stream))));
    let mut buf = BytesMut::new();
    if shard.config.proxy_protocol() {
        let wait = shard.config.handshake_timeout();
        match glommio::timer::timeout(wait, async { Ok(read_proxy_header(&shard, &io, &mut buf).await) }).await {
            Ok(Ok(ProxyHeader::Proxy { client: relayed })) => client = relayed,
            Ok(Ok(ProxyHeader::Local)) => {}
            Ok(Err(Some(e))) => {
                metrics::add(&shard.metrics.protocol_errors, 1);
                let _ = io.write_all(&http::json_error(400, "bad_proxy_header", &e.to_string(), false)).await;
                return;
            }
            Ok(Err(None)) | Err(_) => return,
        }
    }
    let mut first = true;
    loop {
        let wait = if first { shard.config.handshake_timeout() } else { shard.config.idle_timeout() };
        let head = match glommio::timer::timeout(wait, async { Ok(read_head(&shard, &io, &mut buf).await) }).await {
            Ok(Ok(Some(head))) => head,
            Ok(Ok(None)) => return, // clean end between requests
            Ok(Err(e)) => {
                metrics::add(&shard.metrics.protocol_errors, 1);
                let _ = io.write_all(&http::json_error(e.status(), "bad_request", &e.to_string(), false)).await;
                return;
            }
            Err(_) => {
                if first || !buf.is_empty() {
                    let _ = io
                        .write_all(&http::json_error(408, "timeout", "request head not received in time", false))
                        .await;
                }
                return;
            }
        };
        first = false;
        let keep_alive = head.keep_alive && !shard.shutting_down();
        let route = http::route(&head.method, &head.path);
        let upgrade =
            matches!(route, Route::LegacySubscribe | Route::TopicSocket(_) | Route::NativeSocket | Route::NodeLink);
        if upgrade {
            // A socket the link refuses (its buffer is full) is served here.
            if let Some((owner, seq)) = handoff_target(&shard, &head, &route).and_then(|owner| pass(&shard, &io, owner))
            {
                drop(io); // the link holds the socket now
                let stage = HandoffStage::Upgrade { head, client };
                return hand_off(&shard, seq, buf.to_vec(), stage, slot, owner);
            }
            return websocket(shard, io, buf, head, route, client, slot).await;
        }
        let response = match request_body(&shard, &io, &mut buf, &head, &route).await {
            Ok(body) => respond(&shard, &head, route, body, keep_alive).await,
            Err(response) => {
                let _ = io.write_all(&response).await;
                return;
            }
        };
        if io.write_all(&response).await.is_err() || !keep_alive {
            return;
        }
        release_if_empty(&mut buf);
    }
}

/// The shard to hand this upgrade to, if another shard should serve it: a
/// valid topic-socket upgrade whose topic another shard owns, with
/// `topic_sockets = owner`. Everything else (errors included) is answered
/// here.
fn handoff_target(shard: &Shard, head: &RequestHead, route: &Route) -> Option<usize> {
    if shard.shards < 2 || shard.config.topic_sockets() != TopicSockets::Owner || shard.shutting_down() {
        return None;
    }
    let Route::TopicSocket(name) = route else { return None };
    if !matches!(head.websocket, Some(Upgrade::Valid { .. })) {
        return None;
    }
    let owner = TopicName::new(name).ok()?.owner_shard(shard.shards);
    (owner != shard.id).then_some(owner)
}

/// Sends the connection's socket to shard `owner`'s descriptor table; the
/// record number, or None if the link refused it.
fn pass(shard: &Shard, io: &Io, owner: usize) -> Option<(usize, u64)> {
    let raw = io.0.borrow().as_raw_fd();
    // SAFETY: `raw` is the open socket `io` owns, and `io` outlives this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(raw) };
    match shard.pass_socket(owner, fd) {
        Ok(seq) => Some((owner, seq)),
        Err(e) => {
            tracing::debug!(shard = shard.id, owner, "hand-off refused, serving here: {e}");
            None
        }
    }
}

/// Hands the connection to shard `owner`: its socket went ahead as link
/// record `seq` (the caller closed its own descriptor or is about to); the
/// bytes read and not used, and how far the connection got, travel in the
/// shard mesh with the connection's place in the node's count.
fn hand_off(shard: &Shard, seq: u64, buf: Vec<u8>, stage: HandoffStage, slot: ConnectionSlot, owner: usize) {
    let Some(node) = slot.leave() else { return }; // admitted slots always hold one
    metrics::add(&shard.metrics.connections_handed_off, 1);
    shard.hand_off(owner, Handoff { seq, buf, stage, node });
}

/// Serves a connection a peer handed over (see `hand_off`) as if it had
/// been accepted here: the WebSocket handshake and session, or a native
/// session from its first request on.
pub async fn adopt(shard: Rc<Shard>, adoption: Adoption) {
    let Adoption { fd, handoff: Handoff { seq: _, buf, stage, node } } = adoption;
    let slot = ConnectionSlot::adopted(shard.clone(), node);
    // SAFETY: `fd` is an open TCP socket this task now owns alone.
    let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
    let io = Io(Rc::new(Socket(RefCell::new(stream))));
    match stage {
        HandoffStage::Upgrade { head, client } => {
            let route = http::route(&head.method, &head.path);
            websocket(shard, io, BytesMut::from(&buf[..]), head, route, client, slot).await;
        }
        HandoffStage::Native { client, policy, batched } => {
            session::adopt_native(shard, io, BytesMut::from(&buf[..]), client, policy, batched, slot);
        }
    }
}

/// Reads the PROXY v2 header and leaves what follows it in `buf`.
/// `Err(None)`: the peer closed first.
async fn read_proxy_header(shard: &Shard, io: &Io, buf: &mut BytesMut) -> Result<ProxyHeader, Option<ProxyError>> {
    loop {
        if let Some((header, len)) = proxy_protocol::parse(buf).map_err(Some)? {
            buf.advance(len);
            return Ok(header);
        }
        if matches!(io.read(shard, buf).await, Ok(0) | Err(_)) {
            return Err(None);
        }
    }
}

/// Reads one request head. `Ok(None)`: the peer closed before sending one.
async fn read_head(shard: &Shard, io: &Io, buf: &mut BytesMut) -> Result<Option<RequestHead>, http::HttpError> {
    loop {
        if let Some((head, len)) = http::parse_head(buf)? {
            buf.advance(len);
            return Ok(Some(head));
        }
        match io.read(shard, buf).await {
            Ok(0) | Err(_) if buf.is_empty() => return Ok(None),
            Ok(0) | Err(_) => return Err(http::HttpError::Malformed("connection closed mid-request")),
            Ok(_) => {}
        }
    }
}

/// Reads the body of a request that has one, within the size limits.
async fn request_body(
    shard: &Shard,
    io: &Io,
    buf: &mut BytesMut,
    head: &RequestHead,
    route: &Route,
) -> Result<Bytes, Vec<u8>> {
    let limit = match route {
        Route::LegacyPublish => shard.config.message_bytes_max() + HTTP_BODY_SLACK_BYTES,
        Route::TopicPublish(_) => shard.config.message_bytes_max(),
        Route::TopicDeclare(_) => DECLARE_BODY_BYTES_MAX,
        _ => 0,
    };
    if head.content_length > limit {
        let message = format!("body of {} bytes is over the limit of {limit}", head.content_length);
        return Err(http::json_error(413, "payload_too_large", &message, false));
    }
    let want = head.content_length;
    let read = glommio::timer::timeout(shard.config.handshake_timeout(), async {
        while buf.len() < want {
            match io.read(shard, buf).await {
                Ok(0) | Err(_) => return Ok(false),
                Ok(_) => {}
            }
        }
        Ok(true)
    });
    match read.await {
        Ok(true) => Ok(buf.split_to(want).freeze()),
        _ => Err(http::json_error(408, "timeout", "request body not received in time", false)),
    }
}

/// Drops a connection buffer's allocation once everything in it was used,
/// so that idle connections hold none.
fn release_if_empty(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > 0 {
        *buf = BytesMut::new();
    }
}
