//! One client connection: HTTP requests, then possibly one WebSocket
//! session on one of the three paths. Runs on the shard that accepted it.
//!
//! The socket is shared by two tasks, the reader (this module's session
//! loop) and the writer (which drains the connection's `Outbound`). glommio
//! streams poll readiness separately for reading and writing, so each task
//! borrows the stream only for the length of one `poll` call.

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
use proto::broker::{Format, Granted, PublishReply, SubscribeRequest};
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
use proto::ws::{self, close_code, Decoder, WsEvent};
use serde::Deserialize;

use crate::config::{SlowConsumerPolicy, TopicSockets};
use crate::shard::{AdminConnection, Adoption, Handoff, NodeConnection, Shard};

/// How long the writer waits, after sending a close frame, for the client to
/// answer before the socket is shut: RFC 6455 asks for the close handshake,
/// a stalled client must not hold the connection open.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Close code sent on a raw socket when `?from=N` is older than history.
pub const CLOSE_HISTORY_GAP: u16 = 4010;
/// Close code sent on a raw socket when `?from=N` belongs to another
/// sequence space (`epoch` differs, or N was never assigned here): nothing
/// after N can be recovered.
pub const CLOSE_HISTORY_LOST: u16 = 4011;

/// A socket shared by the reader and writer tasks of one connection.
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
        let upgrade = matches!(route, Route::LegacySubscribe | Route::TopicSocket(_) | Route::NativeSocket);
        if upgrade {
            // A socket the link refuses (its buffer is full) is served here.
            if let Some((owner, seq)) = handoff_target(&shard, &head, &route).and_then(|owner| pass(&shard, &io, owner))
            {
                drop(io); // the link holds the socket now
                return hand_off(&shard, seq, buf, head, client, slot, owner);
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
/// record `seq` (the caller closed its own descriptor); the bytes read past
/// the head and the head itself travel in the shard mesh with the
/// connection's place in the node's count.
fn hand_off(
    shard: &Shard,
    seq: u64,
    buf: BytesMut,
    head: RequestHead,
    client: SocketAddr,
    slot: ConnectionSlot,
    owner: usize,
) {
    let Some(node) = slot.leave() else { return }; // admitted slots always hold one
    metrics::add(&shard.metrics.connections_handed_off, 1);
    shard.hand_off(owner, Handoff { seq, buf: buf.to_vec(), head, client, node });
}

/// Serves a connection a peer handed over (see `hand_off`): the WebSocket
/// handshake and session, as if it had been accepted here.
pub async fn adopt(shard: Rc<Shard>, adoption: Adoption) {
    let Adoption { fd, handoff: Handoff { seq: _, buf, head, client, node } } = adoption;
    let slot = ConnectionSlot::adopted(shard.clone(), node);
    // SAFETY: `fd` is an open TCP socket this task now owns alone.
    let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
    let io = Io(Rc::new(Socket(RefCell::new(stream))));
    let route = http::route(&head.method, &head.path);
    websocket(shard, io, BytesMut::from(&buf[..]), head, route, client, slot).await;
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

/// Answers a plain HTTP request.
async fn respond(shard: &Rc<Shard>, head: &RequestHead, route: Route, body: Bytes, keep_alive: bool) -> Vec<u8> {
    let json = |status, value: serde_json::Value| {
        http::response(status, "application/json", value.to_string().as_bytes(), keep_alive)
    };
    match route {
        Route::Healthz => json(200, serde_json::json!({ "status": "ok" })),
        Route::Readyz => {
            let (status, state) = readiness(shard);
            json(status, serde_json::json!({ "status": state }))
        }
        Route::Metrics | Route::ListTopics | Route::TopicInfo(_) => {
            control(shard, route, &head.query, keep_alive).await
        }
        Route::LegacyPublish => legacy_publish(shard, &body, keep_alive).await,
        Route::TopicPublish(name) => {
            let topic = match TopicName::new(&name) {
                Ok(t) => t,
                Err(e) => return http::json_error(400, "invalid_topic", &e.to_string(), keep_alive),
            };
            let textual = head.content_type.starts_with("text/") || head.content_type.starts_with("application/json");
            let kind =
                if textual && std::str::from_utf8(&body).is_ok() { PayloadKind::Text } else { PayloadKind::Binary };
            match shard.publish(topic.clone(), kind, body).await {
                Ok(seq) => {
                    json(200, serde_json::json!({ "status": "message accepted", "topic": topic.as_str(), "seq": seq }))
                }
                Err(e) => owner_error(e, keep_alive),
            }
        }
        Route::MethodNotAllowed => {
            http::json_error(405, "method_not_allowed", "method not allowed on this path", keep_alive)
        }
        _ => http::json_error(404, "not_found", "no such path", keep_alive),
    }
}

/// Readiness: 503 "not ready" while starting or draining, 503 "full" at the
/// connection limit (alive: FluxBalancer keeps its topics where they are;
/// a Kubernetes Service stops sending it new connections), else 200.
fn readiness(shard: &Shard) -> (u16, &'static str) {
    if !shard.node.ready.load(Ordering::Relaxed) {
        (503, "not ready")
    } else if shard.node.connections.load(Ordering::Relaxed) >= shard.config.connections_max() {
        (503, "full")
    } else {
        (200, "ready")
    }
}

/// Serves one request on a connection admitted over the connection limit
/// (see `ADMIN_CONNECTIONS_RESERVED`): `/healthz`, `/readyz` and `/metrics`
/// are answered as usual, anything else with 503 `too_many_connections`;
/// then the connection closes.
pub async fn serve_admin_only(shard: Rc<Shard>, stream: TcpStream, admin: AdminConnection) {
    let io = Io(Rc::new(Socket(RefCell::new(stream))));
    let mut buf = BytesMut::new();
    let wait = shard.config.handshake_timeout();
    let read = async {
        // FluxBalancer's checks start with a PROXY header (the LOCAL command).
        if shard.config.proxy_protocol() && read_proxy_header(&shard, &io, &mut buf).await.is_err() {
            return Ok(None);
        }
        Ok(read_head(&shard, &io, &mut buf).await.ok().flatten())
    };
    let Ok(Some(head)) = glommio::timer::timeout(wait, read).await else { return };
    let response = match http::route(&head.method, &head.path) {
        route @ (Route::Healthz | Route::Readyz | Route::Metrics) => {
            respond(&shard, &head, route, Bytes::new(), false).await
        }
        _ => http::json_error(503, "too_many_connections", "connection limit reached", false),
    };
    let _ = io.write_all(&response).await;
    drop(admin);
}

/// Answers a control-plane request in the shard's low-share task queue.
async fn control(shard: &Rc<Shard>, route: Route, query: &str, keep_alive: bool) -> Vec<u8> {
    let task_shard = shard.clone();
    let listing = TopicQuery::from_query(query);
    let work = async move {
        let shard = &task_shard;
        let json = |status, value: serde_json::Value| {
            http::response(status, "application/json", value.to_string().as_bytes(), keep_alive)
        };
        match route {
            Route::Metrics => {
                let text = metrics::render_prometheus(&shard.gather_stats(None).await);
                http::response(200, "text/plain; version=0.0.4", text.as_bytes(), keep_alive)
            }
            Route::TopicInfo(name) => match TopicName::new(&name) {
                Err(e) => http::json_error(400, "invalid_topic", &e.to_string(), keep_alive),
                Ok(topic) => {
                    // The smallest name with the topic's name as prefix is
                    // the topic itself, when it exists.
                    let query = TopicQuery { prefix: topic.as_str().to_string(), after: None, limit: 1 };
                    match topic_list(shard, query).await.0.pop() {
                        Some(info) if info["topic"] == topic.as_str() => json(200, info),
                        _ => http::json_error(404, "unknown_topic", "no such topic on this node", keep_alive),
                    }
                }
            },
            _ => match listing {
                Err(why) => http::json_error(400, "bad_request", &why.to_string(), keep_alive),
                Ok(query) => {
                    let (topics, next) = topic_list(shard, query).await;
                    json(200, serde_json::json!({ "topics": topics, "next": next }))
                }
            },
        }
    };
    match glommio::spawn_local_into(work, shard.control_queue) {
        Ok(task) => task.await,
        Err(e) => http::json_error(500, "internal", &format!("cannot schedule: {e}"), false),
    }
}

fn owner_error(e: OwnerError, keep_alive: bool) -> Vec<u8> {
    http::json_error(e.http_status(), e.code(), &e.to_string(), keep_alive)
}

/// The original RayFlux publish body.
#[derive(Deserialize)]
struct LegacyPublish {
    topic: String,
    message: String,
}

async fn legacy_publish(shard: &Rc<Shard>, body: &[u8], keep_alive: bool) -> Vec<u8> {
    let request: LegacyPublish = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return http::json_error(
                400,
                "bad_request",
                &format!("expected {{\"topic\", \"message\"}}: {e}"),
                keep_alive,
            )
        }
    };
    let topic = match TopicName::new(&request.topic) {
        Ok(t) => t,
        Err(e) => return http::json_error(400, "invalid_topic", &e.to_string(), keep_alive),
    };
    if request.message.len() > shard.config.message_bytes_max() {
        return http::json_error(413, "payload_too_large", "message is over the size limit", keep_alive);
    }
    match shard.publish(topic.clone(), PayloadKind::Text, Bytes::from(request.message)).await {
        Ok(seq) => {
            let body = serde_json::json!({ "status": "message accepted", "topic": topic.as_str(), "seq": seq });
            http::response(200, "application/json", body.to_string().as_bytes(), keep_alive)
        }
        Err(e) => owner_error(e, keep_alive),
    }
}

/// One page of the merged view of topics across shards: the owner's
/// figures plus the subscriber count from every shard, and the cursor of
/// the next page (the last name of this one) when there is more.
async fn topic_list(shard: &Rc<Shard>, query: TopicQuery) -> (Vec<serde_json::Value>, Option<String>) {
    let limit = query.limit;
    // One more than the page from each shard tells whether there is more.
    let stats = shard.gather_stats(Some(TopicQuery { limit: limit + 1, ..query })).await;
    let mut subscribers: HashMap<&str, u64> = HashMap::new();
    for s in &stats {
        for (name, n) in &s.local_subscribers {
            *subscribers.entry(name.as_str()).or_default() += n;
        }
    }
    let mut out: Vec<serde_json::Value> = stats
        .iter()
        .flat_map(|s| s.owned_topics.iter())
        .map(|t| {
            serde_json::json!({
                "topic": t.name.as_str(),
                "last_seq": t.last_seq,
                "first_seq": t.first_seq,
                "retained_messages": t.retained_messages,
                "retained_bytes": t.retained_bytes,
                "subscribers": subscribers.get(t.name.as_str()).copied().unwrap_or(0),
                "publish_rate_per_sec": t.publish_rate_per_sec,
                "owner_shard": t.name.owner_shard(shard.shards),
                "epoch": t.epoch.to_string(),
            })
        })
        .collect();
    out.sort_by(|a, b| a["topic"].as_str().cmp(&b["topic"].as_str()));
    let more = out.len() > limit;
    out.truncate(limit);
    let next = more.then(|| out.last().and_then(|t| t["topic"].as_str()).map(str::to_string)).flatten();
    (out, next)
}

/// Which path a WebSocket session speaks, and its per-path state.
#[derive(Debug)]
enum Path {
    /// `/v1/topics/{topic}/ws`.
    Raw { topic: TopicName, publish: bool, sub: Option<u64> },
    /// Original `/subscribe`: the first frame names the topic.
    Legacy { sub: Option<(TopicName, u64)> },
    /// `/v1/ws`: subscriptions by topic.
    Native { subs: HashMap<TopicName, u64> },
}

/// State shared by a session's reader and writer.
#[derive(Debug)]
struct Session {
    /// The shard.
    shard: Rc<Shard>,
    /// The socket.
    io: Io,
    /// Frames waiting to be written.
    out: Rc<Outbound>,
    /// The client's address (FluxBalancer's PROXY header's when relayed):
    /// topics its subscriptions keep alive are charged to it.
    client: std::net::IpAddr,
    /// Set when the reader has finished.
    reader_done: Cell<bool>,
    /// Notified when the reader finishes.
    reader_done_event: Event,
}

async fn websocket(
    shard: Rc<Shard>,
    io: Io,
    buf: BytesMut,
    head: RequestHead,
    route: Route,
    client: SocketAddr,
    slot: ConnectionSlot,
) {
    let key = match &head.websocket {
        Some(Upgrade::Valid { key }) => key.clone(),
        Some(Upgrade::Invalid(why)) => {
            let mut response = http::json_error(400, "bad_upgrade", why, false);
            if why.contains("Version") {
                response = http::json_error(426, "bad_upgrade", why, false);
                let at = response.windows(2).position(|w| w == b"\r\n").unwrap_or(0) + 2;
                response.splice(at..at, b"sec-websocket-version: 13\r\n".iter().copied());
            }
            let _ = io.write_all(&response).await;
            return;
        }
        None => {
            let _ = io
                .write_all(&http::json_error(426, "upgrade_required", "this path needs a WebSocket upgrade", false))
                .await;
            return;
        }
    };
    if shard.shutting_down() {
        let _ = io.write_all(&http::json_error(503, "shutting_down", "the node is shutting down", false)).await;
        return;
    }
    let policy = match http::query_param(&head.query, "slow") {
        Some("drop") if route == Route::NativeSocket => SlowConsumerPolicy::Drop,
        Some("disconnect") => SlowConsumerPolicy::Disconnect,
        None if route == Route::NativeSocket => shard.config.slow_consumer_policy(),
        None => SlowConsumerPolicy::Disconnect,
        Some(_) => {
            let why = "slow must be drop (native protocol only) or disconnect";
            let _ = io.write_all(&http::json_error(400, "bad_request", why, false)).await;
            return;
        }
    };
    let out = Rc::new(Outbound::new(shard.config.send_queue_bytes_max(), policy));
    let session = Rc::new(Session {
        shard: shard.clone(),
        io,
        out,
        client: client.ip(),
        reader_done: Cell::new(false),
        reader_done_event: Event::default(),
    });
    let (path, mut extra_headers, resume_close) = match prepare(&session, &head, route).await {
        Ok(prepared) => prepared,
        Err(response) => {
            let _ = session.io.write_all(&response).await;
            return;
        }
    };
    // Which shard serves this session: for operators and for tests that need
    // subscribers on every shard.
    extra_headers.push(("x-rayflux-shard", shard.id.to_string()));
    // The address the node attributes the connection to: the socket's peer,
    // or the client named by FluxBalancer's PROXY header.
    extra_headers.push(("x-rayflux-client", client.to_string()));
    if session.io.write_all(&http::switching_protocols(&key, &extra_headers)).await.is_err() {
        cleanup(&session, &path);
        return;
    }
    if let Some((code, reason)) = resume_close {
        session.out.close(code, &reason);
    }
    // The session gets a task of its own, sized for the session only: this
    // task's future is sized for its largest state (HTTP handling, the
    // handshake), about 2.5 KB that an idle WebSocket would otherwise keep
    // for its whole life.
    glommio::spawn_local(async move {
        run_session(session, buf, path).await;
        drop(slot);
    })
    .detach();
}

/// What the raw socket's client is told right after the 101 when its
/// resume cannot be served: a close with the code and reason.
type ResumeClose = Option<(u16, String)>;

/// Work before the 101: validates the path's parameters and, for raw
/// subscribers, makes the subscription live. Returns the path state, extra
/// response headers and, for a raw `from` that cannot be served whole, the
/// close that tells the client what it cannot get.
async fn prepare(
    session: &Session,
    head: &RequestHead,
    route: Route,
) -> Result<(Path, Vec<(&'static str, String)>, ResumeClose), Vec<u8>> {
    let bad = |code: &str, why: &str| http::json_error(400, code, why, false);
    match route {
        Route::LegacySubscribe => Ok((Path::Legacy { sub: None }, vec![], None)),
        Route::NativeSocket => Ok((Path::Native { subs: HashMap::new() }, vec![], None)),
        Route::TopicSocket(name) => {
            let topic = TopicName::new(&name).map_err(|e| bad("invalid_topic", &e.to_string()))?;
            let (publish, subscribe) = match http::query_param(&head.query, "role").unwrap_or("pubsub") {
                "pub" => (true, false),
                "sub" => (false, true),
                "pubsub" => (true, true),
                _ => return Err(bad("bad_request", "role must be pub, sub or pubsub")),
            };
            let from = match http::query_param(&head.query, "from") {
                None => None,
                Some(v) => Some(v.parse::<u64>().map_err(|_| bad("bad_request", "from must be a sequence number"))?),
            };
            let epoch = match http::query_param(&head.query, "epoch") {
                None => None,
                Some(v) => Some(v.parse().map_err(|_| bad("bad_request", "epoch must be 16 hex digits"))?),
            };
            if !subscribe {
                return Ok((Path::Raw { topic, publish, sub: None }, vec![], None));
            }
            let resume = from.map(|after_seq| ResumeFrom { after_seq, epoch });
            let granted = session
                .shard
                .subscribe(SubscribeRequest {
                    topic: topic.clone(),
                    out: session.out.clone(),
                    client: session.client,
                    format: Format::Raw,
                    from: resume,
                    reply_id: None,
                })
                .await
                .map_err(|e| owner_error(e, false))?;
            let headers = vec![
                ("x-rayflux-last-seq", granted.last_seq.to_string()),
                ("x-rayflux-epoch", granted.epoch.to_string()),
            ];
            let close = resume_close(&granted, from.unwrap_or(0));
            Ok((Path::Raw { topic, publish, sub: Some(granted.sub_id) }, headers, close))
        }
        _ => Err(http::json_error(404, "not_found", "no such path", false)),
    }
}

/// The close a raw subscriber that resumed after `from` gets right after
/// its 101, when the grant says it cannot have everything it asked for.
fn resume_close(granted: &Granted, from: u64) -> ResumeClose {
    match granted.resumed {
        Resumed::Live | Resumed::Replayed { gap: None } => None,
        Resumed::Replayed { gap: Some(gap) } => {
            let first = gap.to_seq + 1;
            let reason = format!("history gap: first retained seq is {first}; resume with from={}", first - 1);
            Some((CLOSE_HISTORY_GAP, reason))
        }
        Resumed::Lost(why) => {
            let (epoch, last) = (granted.epoch, granted.last_seq);
            let why = why.as_str();
            let reason =
                format!("history lost ({why}): epoch is now {epoch}, last seq {last}; nothing after from={from} can be recovered");
            Some((CLOSE_HISTORY_LOST, reason))
        }
    }
}

async fn run_session(session: Rc<Session>, mut buf: BytesMut, mut path: Path) {
    let shard = session.shard.clone();
    let session_id = shard.next_id();
    shard.sessions.borrow_mut().insert(session_id, session.out.clone());
    let writer = glommio::spawn_local(write_loop(session.clone()));
    read_loop(&session, &mut buf, &mut path).await;
    session.reader_done.set(true);
    session.reader_done_event.notify();
    cleanup(&session, &path);
    writer.await;
    shard.sessions.borrow_mut().remove(&session_id);
}

fn cleanup(session: &Session, path: &Path) {
    let shard = &session.shard;
    match path {
        Path::Raw { topic, sub: Some(id), .. } => shard.unsubscribe(topic, *id),
        Path::Legacy { sub: Some((topic, id)) } => shard.unsubscribe(topic, *id),
        Path::Native { subs } => {
            for (topic, id) in subs {
                shard.unsubscribe(topic, *id);
            }
        }
        _ => {}
    }
}

/// Reads frames until the client closes, breaks the protocol, goes silent,
/// or the session closes from our side.
async fn read_loop(session: &Session, buf: &mut BytesMut, path: &mut Path) {
    let shard = &session.shard;
    let mut decoder = Decoder::new(shard.config.message_bytes_max());
    let mut ping_outstanding = false;
    session.io.set_read_timeout(Some(shard.config.idle_timeout()));
    loop {
        loop {
            let event = match decoder.decode(buf) {
                Ok(Some(event)) => event,
                Ok(None) => break,
                Err(e) => {
                    metrics::add(&shard.metrics.protocol_errors, 1);
                    session.out.close(e.close_code(), &e.to_string());
                    return;
                }
            };
            // Boxed: the event handlers' state (about 700 bytes) exists only
            // while one runs, not in every idle session's read loop.
            if !Box::pin(on_event(session, path, event)).await {
                return;
            }
        }
        release_if_empty(buf);
        if session.out.is_closing() && session.out.is_empty() {
            // Our close frame is out or going; wait briefly for the answer.
            session.io.set_read_timeout(Some(CLOSE_LINGER));
        }
        match session.io.read(shard, buf).await {
            Ok(0) => return,
            Ok(_) => ping_outstanding = false,
            Err(e) if e.kind() == io::ErrorKind::TimedOut && !ping_outstanding && !session.out.is_closing() => {
                ping_outstanding = true;
                session.out.offer_control(ws::encode_ping(b"fluxnode"));
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut && !session.out.is_closing() => {
                session.out.close(close_code::IDLE_TIMEOUT, "idle timeout: no answer to ping");
                session.io.set_read_timeout(Some(CLOSE_LINGER));
            }
            Err(_) => return,
        }
    }
}

/// Handles one client event; false ends the reader.
async fn on_event(session: &Session, path: &mut Path, event: WsEvent) -> bool {
    match event {
        WsEvent::Ping(payload) => {
            session.out.offer_control(ws::encode_pong(&payload));
            true
        }
        WsEvent::Pong => true,
        WsEvent::Close { code } => {
            // Echo the client's code (RFC 6455 5.5.1; the decoder refused
            // codes a peer may not send), without waiting for queued data.
            session.out.peer_closed(code.unwrap_or(close_code::NORMAL));
            false
        }
        WsEvent::Message { kind, payload } => {
            if session.out.is_closing() {
                return true; // draining until the client's close arrives
            }
            match path {
                Path::Raw { topic, publish, .. } => raw_message(session, topic, *publish, kind, payload).await,
                Path::Legacy { sub } => legacy_message(session, sub, payload).await,
                Path::Native { subs } => native_message(session, subs, kind, payload).await,
            }
        }
    }
}

async fn raw_message(session: &Session, topic: &TopicName, publish: bool, kind: PayloadKind, payload: Bytes) -> bool {
    if !publish {
        session.out.close(close_code::POLICY_VIOLATION, "this socket has role=sub: it cannot publish");
        return true;
    }
    let done = PublishReply::CloseOnError(session.out.clone());
    session.shard.publish_pipelined(topic.clone(), kind, payload, done).await;
    true
}

/// The original RayFlux subscribe request (first frame).
#[derive(Deserialize)]
struct LegacySubscribe {
    #[allow(dead_code)] // part of the original API; not used for routing
    subscriber_id: serde_json::Value,
    topic: String,
}

async fn legacy_message(session: &Session, sub: &mut Option<(TopicName, u64)>, payload: Bytes) -> bool {
    if sub.is_some() {
        return true; // the original server ignored later frames too
    }
    let request: LegacySubscribe = match serde_json::from_slice(&payload) {
        Ok(r) => r,
        Err(_) => {
            session
                .out
                .close(close_code::POLICY_VIOLATION, "first frame must be {\"subscriber_id\": ..., \"topic\": ...}");
            return true;
        }
    };
    let topic = match TopicName::new(&request.topic) {
        Ok(t) => t,
        Err(e) => {
            session.out.close(close_code::POLICY_VIOLATION, &format!("invalid topic: {e}"));
            return true;
        }
    };
    let request = SubscribeRequest {
        topic: topic.clone(),
        out: session.out.clone(),
        client: session.client,
        format: Format::Legacy,
        from: None,
        reply_id: None,
    };
    match session.shard.subscribe(request).await {
        Ok(granted) => *sub = Some((topic, granted.sub_id)),
        Err(e) => session.out.close(close_code::TRY_AGAIN_LATER, &e.to_string()),
    }
    true
}

async fn native_message(
    session: &Session,
    subs: &mut HashMap<TopicName, u64>,
    kind: PayloadKind,
    payload: Bytes,
) -> bool {
    let parsed = match kind {
        PayloadKind::Text => native::parse_text(&payload),
        PayloadKind::Binary => native::parse_binary(&payload),
    };
    let out = &session.out;
    let shard = &session.shard;
    let request = match parsed {
        Ok(r) => r,
        Err(bad) => {
            out.offer_control(native::reply_error(bad.id, bad.code, &bad.message));
            return true;
        }
    };
    let topic_of = |id: u64, name: &str| {
        TopicName::new(name).map_err(|e| native::reply_error(Some(id), "invalid_topic", &e.to_string()))
    };
    let reply = match request {
        Request::Ping { id } => native::reply_ok(id, serde_json::json!({ "pong": true })),
        Request::Publish { id, topic, kind, payload } => match topic_of(id, &topic) {
            Err(reply) => reply,
            Ok(topic) => {
                let done = PublishReply::Native { out: out.clone(), id };
                shard.publish_pipelined(topic, kind, payload, done).await;
                return true; // the reply is queued when the owner answers
            }
        },
        Request::Subscribe { id, topic, from_seq, epoch } => match topic_of(id, &topic) {
            Err(reply) => reply,
            Ok(topic) if subs.contains_key(&topic) => {
                native::reply_error(Some(id), "already_subscribed", "already subscribed to this topic")
            }
            Ok(_) if subs.len() >= shard.config.subscriptions_per_connection_max() => {
                let why =
                    format!("at most {} subscriptions per connection", shard.config.subscriptions_per_connection_max());
                native::reply_error(Some(id), "too_many_subscriptions", &why)
            }
            Ok(topic) => {
                let resume = from_seq.map(|after_seq| ResumeFrom { after_seq, epoch });
                let request = SubscribeRequest {
                    topic: topic.clone(),
                    out: out.clone(),
                    client: session.client,
                    format: Format::Native,
                    from: resume,
                    reply_id: Some(id),
                };
                match shard.subscribe(request).await {
                    Ok(granted) => {
                        subs.insert(topic, granted.sub_id);
                        return true; // the ok reply was queued before any message
                    }
                    Err(e) => native::reply_error(Some(id), e.code(), &e.to_string()),
                }
            }
        },
        Request::Unsubscribe { id, topic } => match topic_of(id, &topic) {
            Err(reply) => reply,
            Ok(topic) => match subs.remove(&topic) {
                Some(sub_id) => {
                    shard.unsubscribe(&topic, sub_id);
                    native::reply_ok(id, serde_json::json!({}))
                }
                None => native::reply_error(Some(id), "not_subscribed", "not subscribed to this topic"),
            },
        },
    };
    out.offer_control(reply);
    true
}

/// Drains the session's queue to the socket when the shard's direct flush
/// cannot (see `outbound`): unsent bytes first, then one gathered write per
/// wake-up, then the close frame once closing, then the close handshake's
/// linger. While idle it lets the fan-out pass write directly.
async fn write_loop(session: Rc<Session>) {
    let shard = &session.shard;
    let out = &session.out;
    // Every way out of this task ends direct writes: the queue must not hold
    // the socket open after the session.
    let _direct_off = DirectOff(out);
    let mut published = Vec::new();
    loop {
        out.stop_direct();
        let unsent = out.take_unsent();
        if !unsent.is_empty() {
            let write = glommio::timer::timeout(shard.config.idle_timeout(), async {
                Ok(write_unsent(&session, &unsent).await)
            });
            if !matches!(write.await, Ok(Ok(()))) {
                // The peer stopped reading for a whole idle period, or the socket failed.
                out.close(close_code::SLOW_CONSUMER, "write stalled");
                session.io.shutdown(Shutdown::Both);
                return;
            }
            continue;
        }
        while let Some(missed) = out.next_missed_if_room() {
            out.offer_control(native::dropped_notice(&missed.topic, missed.from_seq, missed.to_seq, missed.dropped));
        }
        if out.is_empty() {
            if let Some((code, reason)) = out.close_reason() {
                let frame = ws::encode_close(code, &reason);
                let sent =
                    glommio::timer::timeout(CLOSE_LINGER, async { Ok(session.io.write_all(&frame).await) }).await;
                if matches!(sent, Ok(Ok(()))) {
                    session.io.shutdown(Shutdown::Write);
                    let _ = glommio::timer::timeout(CLOSE_LINGER, async {
                        while !session.reader_done.get() {
                            session.reader_done_event.wait().await;
                        }
                        Ok(())
                    })
                    .await;
                }
                session.io.shutdown(Shutdown::Both);
                return;
            }
            if session.reader_done.get() {
                return;
            }
            out.start_direct(session.io.0.clone());
            futures_lite::future::or(out.wake_writer.wait(), session.reader_done_event.wait()).await;
            continue;
        }
        // Gather into the shard's scratch buffer and send without blocking:
        // the socket usually takes it all, and then the connection holds no
        // write buffer and no timer is armed. What the socket refuses is
        // kept as unsent and awaited on the next turn.
        published.clear();
        let written = {
            let mut scratch = shard.write_scratch.borrow_mut();
            scratch.clear();
            out.take_batch(&mut scratch, WRITE_BATCH_BYTES_MAX, &mut published);
            let sent = session.io.try_send(&scratch).unwrap_or(0);
            out.keep_unsent(&scratch, sent);
            scratch.len()
        };
        shard.record_written(written, &published, Instant::now());
    }
}

/// Writes bytes a send refused. Once the peer's close has arrived only the
/// frame in progress is finished: a write blocked on a full socket is
/// abandoned (glommio's write waits for readiness and holds no bytes, so
/// dropping it loses nothing) and resumed with the shorter end.
async fn write_unsent(session: &Session, unsent: &Unsent) -> io::Result<()> {
    let out = &session.out;
    let mut written = 0;
    loop {
        let end = if out.is_peer_closed() { unsent.end_after_close(written) } else { unsent.bytes.len() };
        if written >= end {
            return Ok(());
        }
        let write = async { Some(session.io.write_some(&unsent.bytes[written..end]).await) };
        let closed = async {
            if !out.is_peer_closed() {
                out.peer_close_event.wait().await;
            }
            None
        };
        match futures_lite::future::or(write, closed).await {
            Some(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Some(Ok(n)) => written += n,
            Some(Err(e)) => return Err(e),
            None => {} // the peer closed: the end moves in
        }
    }
}

/// Ends a queue's direct mode when its writer task ends, however it ends.
struct DirectOff<'a>(&'a Outbound);

impl Drop for DirectOff<'_> {
    fn drop(&mut self) {
        self.0.stop_direct();
    }
}

impl DirectSink for Socket {
    fn try_send(&self, data: &[u8]) -> io::Result<usize> {
        let stream = self.borrow();
        match socket2::SockRef::from(&*stream).send_with_flags(data, libc::MSG_DONTWAIT) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }
}

/// Drops a connection buffer's allocation once everything in it was used,
/// so that idle connections hold none.
fn release_if_empty(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > 0 {
        *buf = BytesMut::new();
    }
}
