//! A shard's links to the other nodes of its cluster (the follower side;
//! the owner side is `conn/link_session.rs`). One WebSocket connection per
//! shard and node, made when the broker first sends the node a frame
//! (`Action::Link`), to the node's `GET /v1/link`. The broker's frames are
//! appended to the link's queue as client WebSocket frames and written in
//! batches (everything queued in one `write`); what the owner sends back
//! is decoded here and handed to the broker (`Broker::link_frame`).
//!
//! A link that cannot connect, closes, stays silent past
//! `LINK_SILENCE_MAX`, or queues more than `LINK_QUEUE_BYTES_MAX` is given
//! up: its queue is dropped and the broker told (`Broker::link_down`:
//! forwarded publishes fail with `owner_unreachable`, follows are asked
//! again), then it reconnects after a backoff.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use proto::limits::LINK_QUEUE_BYTES_MAX;
use proto::link::{self, LinkFrame};
use proto::message::{Now, PayloadKind};
use proto::metrics;
use proto::sync::Event;
use proto::ws::{self, Decoder, WsEvent};

use crate::shard::Shard;

/// How long a connection attempt may take.
const LINK_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Backoff between attempts: doubles from the first to the last.
const LINK_BACKOFF_FIRST: Duration = Duration::from_millis(50);
const LINK_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// The owner pings a link it has heard nothing from for its idle timeout
/// (30 s by default); a link that hears nothing for this long is dead.
const LINK_SILENCE_MAX: Duration = Duration::from_secs(75);
/// Largest frame accepted from an owner (a message at the size ceiling
/// with its record framing).
const LINK_FRAME_BYTES_MAX: usize = proto::log::RECORD_BODY_BYTES_MAX + 4096;
/// Fixed handshake key: the owner checks the upgrade, not the key.
const LINK_KEY: &str = "cmF5Zmx1eC1ub2RlLWxpbms=";

/// This shard's links, by node address.
#[derive(Debug, Default)]
pub struct NodeLinks {
    /// The shard, set when it starts (links run tasks that call it).
    shard: RefCell<Weak<Shard>>,
    links: RefCell<HashMap<String, Rc<NodeLink>>>,
}

/// One link's queue and state.
#[derive(Debug)]
struct NodeLink {
    node: String,
    /// Client frames waiting to be written.
    queue: RefCell<Vec<u8>>,
    /// Wakes the writer (frames queued) and the backoff (queue over its
    /// bound).
    wake: Event,
    /// The queue passed `LINK_QUEUE_BYTES_MAX`: give the link up.
    overflow: Cell<bool>,
}

impl NodeLinks {
    /// Sets the shard whose broker the links answer to.
    pub fn start(&self, shard: &Rc<Shard>) {
        *self.shard.borrow_mut() = Rc::downgrade(shard);
    }

    /// Queues `frame` for `node`, making the link if needed.
    pub fn send(&self, node: String, frame: &LinkFrame) {
        let link = match self.links.borrow_mut().entry(node) {
            std::collections::hash_map::Entry::Occupied(e) => e.get().clone(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let link = Rc::new(NodeLink {
                    node: e.key().clone(),
                    queue: RefCell::default(),
                    wake: Event::default(),
                    overflow: Cell::new(false),
                });
                let shard = self.shard.borrow().clone();
                let task = run(shard, link.clone());
                glommio::spawn_local(task).detach();
                e.insert(link).clone()
            }
        };
        let mut queue = link.queue.borrow_mut();
        let before = queue.len();
        if before >= LINK_QUEUE_BYTES_MAX {
            link.overflow.set(true);
        } else {
            ws::encode_client_binary(&link::encode(frame), &mut queue);
        }
        if let Some(shard) = self.shard.borrow().upgrade() {
            metrics::add(&shard.metrics.link_queue_bytes, (queue.len() - before) as u64);
        }
        link.wake.notify();
    }
}

/// Connects, serves and reconnects one link for the shard's life.
async fn run(shard: Weak<Shard>, link: Rc<NodeLink>) {
    let mut backoff = LINK_BACKOFF_FIRST;
    loop {
        let Some(strong) = shard.upgrade() else { return };
        if strong.shutting_down() {
            return;
        }
        drop(strong);
        match connect(&link.node).await {
            Ok((stream, buf)) => {
                if let Some(s) = shard.upgrade() {
                    metrics::add(&s.metrics.links_connected, 1);
                }
                tracing::info!(node = %link.node, "link to node connected");
                backoff = LINK_BACKOFF_FIRST;
                let why = serve(&shard, &link, stream, buf).await;
                tracing::warn!(node = %link.node, "link to node lost: {why}");
            }
            Err(e) => tracing::debug!(node = %link.node, "link to node refused: {e}"),
        }
        let Some(s) = shard.upgrade() else { return };
        give_up(&s, &link);
        drop(s);
        // Waits out the backoff, or less if the queue overflows meanwhile
        // (what queued is then failed at once rather than held).
        let _ = glommio::timer::timeout(backoff, async {
            while !link.overflow.get() {
                link.wake.wait().await;
            }
            Ok(())
        })
        .await;
        backoff = (backoff * 2).min(LINK_BACKOFF_MAX);
        if link.overflow.get() {
            if let Some(s) = shard.upgrade() {
                give_up(&s, &link);
            }
        }
    }
}

/// Drops what the link queued and tells the broker.
fn give_up(shard: &Shard, link: &NodeLink) {
    let dropped = std::mem::take(&mut *link.queue.borrow_mut()).len();
    link.overflow.set(false);
    metrics::sub(&shard.metrics.link_queue_bytes, dropped as u64);
    metrics::add(&shard.metrics.links_lost, 1);
    shard.link_down(&link.node);
}

/// Opens the connection and upgrades it to `/v1/link`; returns what was
/// read past the response head.
async fn connect(node: &str) -> io::Result<(TcpStream, BytesMut)> {
    let mut stream =
        TcpStream::connect_timeout(node, LINK_CONNECT_TIMEOUT).await.map_err(|e| io::Error::other(e.to_string()))?;
    stream.set_nodelay(true).map_err(|e| io::Error::other(e.to_string()))?;
    let request = format!(
        "GET /v1/link HTTP/1.1\r\nhost: {node}\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-key: {LINK_KEY}\r\nsec-websocket-version: 13\r\n\r\n"
    );
    futures_lite::AsyncWriteExt::write_all(&mut stream, request.as_bytes()).await?;
    stream.set_read_timeout(Some(LINK_CONNECT_TIMEOUT)).map_err(|e| io::Error::other(e.to_string()))?;
    let mut buf = BytesMut::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let end = loop {
        let n = futures_lite::AsyncReadExt::read(&mut stream, &mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if buf.len() > proto::limits::HTTP_HEAD_BYTES_MAX {
            return Err(io::Error::other("response head too long"));
        }
    };
    if !buf.starts_with(b"HTTP/1.1 101") {
        let line = String::from_utf8_lossy(&buf[..buf.iter().position(|&b| b == b'\r').unwrap_or(0)]).to_string();
        return Err(io::Error::other(format!("upgrade refused: {line}")));
    }
    let rest = buf.split_off(end);
    stream.set_read_timeout(Some(LINK_SILENCE_MAX)).map_err(|e| io::Error::other(e.to_string()))?;
    Ok((stream, rest))
}

/// Runs a connected link until it fails; says why.
async fn serve(shard: &Weak<Shard>, link: &Rc<NodeLink>, stream: TcpStream, buf: BytesMut) -> String {
    let stream = Rc::new(RefCell::new(stream));
    let reader = read_loop(shard, link, stream.clone(), buf);
    let writer = write_loop(shard, link, stream);
    futures_lite::future::or(reader, writer).await
}

/// Writes the link's queue, everything queued in one write. Paced as the
/// fan-out's writes are (`flush_interval_us`): while frames come faster
/// than one per interval, what arrives until it has passed since the
/// previous write joins the next one; nothing waits when they come slower.
/// Unpaced, a forwarded publish cost a write and its ring enters of its
/// own on the publisher's node (ARCHITECTURE.md).
async fn write_loop(shard: &Weak<Shard>, link: &NodeLink, stream: Rc<RefCell<TcpStream>>) -> String {
    let interval = shard.upgrade().map(|s| s.config.flush_interval()).unwrap_or_default();
    let mut last_write: Option<Instant> = None;
    let mut batch = Vec::new();
    loop {
        if link.overflow.get() {
            return "queue over its bound".into();
        }
        if link.queue.borrow().is_empty() {
            link.wake.wait().await;
            continue;
        }
        if let Some(since) = last_write.map(|t| t.elapsed()).filter(|since| *since < interval) {
            glommio::timer::sleep(interval - since).await;
            continue;
        }
        std::mem::swap(&mut batch, &mut *link.queue.borrow_mut());
        if let Some(s) = shard.upgrade() {
            metrics::sub(&s.metrics.link_queue_bytes, batch.len() as u64);
        }
        let mut data = &batch[..];
        while !data.is_empty() {
            match poll_fn(|cx| Pin::new(&mut *stream.borrow_mut()).poll_write(cx, data)).await {
                Ok(0) => return "write returned 0".into(),
                Ok(n) => data = &data[n..],
                Err(e) => return format!("write: {e}"),
            }
        }
        batch.clear();
        last_write = Some(Instant::now());
    }
}

async fn read_loop(shard: &Weak<Shard>, link: &NodeLink, stream: Rc<RefCell<TcpStream>>, mut buf: BytesMut) -> String {
    let mut decoder = Decoder::of_server_frames(LINK_FRAME_BYTES_MAX);
    let mut chunk = vec![0u8; 64 << 10];
    let mut frames = Vec::new();
    loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(WsEvent::Message { kind: PayloadKind::Binary, payload })) => {
                    match link::decode(&payload, std::time::Instant::now()) {
                        Ok(frame) => frames.push(frame),
                        Err(e) => return deliver_then(shard, link, &mut frames, e.to_string()),
                    }
                }
                Ok(Some(WsEvent::Message { .. })) => {
                    return deliver_then(shard, link, &mut frames, "text frame on a link".into())
                }
                Ok(Some(WsEvent::Ping(payload))) => {
                    let mut queue = link.queue.borrow_mut();
                    let before = queue.len();
                    ws::encode_client_pong(&payload, &mut queue);
                    // Counted as queued, as the writer subtracts what it takes.
                    if let Some(s) = shard.upgrade() {
                        metrics::add(&s.metrics.link_queue_bytes, (queue.len() - before) as u64);
                    }
                    link.wake.notify();
                }
                Ok(Some(WsEvent::Pong)) => {}
                Ok(Some(WsEvent::Close { code })) => {
                    return deliver_then(shard, link, &mut frames, format!("closed by the owner ({code:?})"))
                }
                Ok(None) => break,
                Err(e) => return deliver_then(shard, link, &mut frames, e.to_string()),
            }
        }
        if !frames.is_empty() {
            let Some(s) = shard.upgrade() else { return "shard gone".into() };
            s.link_frames(&link.node, &mut frames);
        }
        let read = poll_fn(|cx| Pin::new(&mut *stream.borrow_mut()).poll_read(cx, &mut chunk[..])).await;
        match read {
            Ok(0) => return "closed".into(),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return format!("read: {e}"),
        }
    }
}

/// The link ends (`why`): what came before in the same read still counts
/// (a leaving node's last hand-off, then its close), handed on first.
fn deliver_then(shard: &Weak<Shard>, link: &NodeLink, frames: &mut Vec<LinkFrame>, why: String) -> String {
    if let Some(s) = shard.upgrade().filter(|_| !frames.is_empty()) {
        s.link_frames(&link.node, frames);
    }
    why
}

impl Shard {
    /// Frames from owner node `node`, in order.
    pub(crate) fn link_frames(&self, node: &str, frames: &mut Vec<LinkFrame>) {
        let now = Now::read();
        {
            let mut broker = self.broker.borrow_mut();
            for frame in frames.drain(..) {
                broker.link_frame(node, frame, now);
            }
        }
        self.apply();
    }

    /// `node` claims `topic` (see `Broker::claim`); answered on `out`.
    pub(crate) fn claim(
        &self,
        topic: proto::topic::TopicName,
        version: u64,
        node: String,
        at: u64,
        out: std::rc::Rc<proto::outbound::Outbound>,
    ) {
        // Counted until its answer is on the link (`Action::ClaimAnswered`).
        self.node.claims_unanswered.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.broker.borrow_mut().claim(topic, version, node, at, out, Now::read());
        self.apply();
    }

    /// A node that gave `topic` up offers it to this one (see
    /// `Broker::offer`).
    pub(crate) fn offer(&self, topic: proto::topic::TopicName) {
        self.broker.borrow_mut().offer(topic, Now::read());
        self.apply();
    }

    /// The link to `node` was given up (see the module's doc).
    pub(crate) fn link_down(&self, node: &str) {
        self.broker.borrow_mut().link_down(node, Now::read());
        self.apply();
    }
}
