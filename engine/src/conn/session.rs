//! A WebSocket session: the upgrade, the reader loop, and which protocol
//! adapter each frame goes to (`raw_session`, `legacy_session`,
//! `native_session`).

use std::future::Future;
use std::task::Poll;

use super::*;

/// Which path a WebSocket session speaks, and its per-path state.
#[derive(Debug)]
pub(super) enum Path {
    /// `/v1/topics/{topic}/ws`.
    Raw { topic: TopicName, publish: bool, sub: Option<u64> },
    /// Original `/subscribe`: the first frame names the topic.
    Legacy { sub: Option<(TopicName, u64)> },
    /// `/v1/ws`: subscriptions by topic, consumer-group memberships by
    /// topic and group (boxed: the two maps would make every session's
    /// path, whatever its kind, 100 bytes).
    Native(Box<NativeState>),
    /// `/v1/link`: another node's follows.
    Link { follows: Rc<super::link_session::Follows> },
}

/// A native session's subscriptions and group memberships.
#[derive(Debug, Default)]
pub(super) struct NativeState {
    /// Subscription ids by topic.
    pub(super) subs: HashMap<TopicName, u64>,
    /// Membership ids by topic and group.
    pub(super) groups: HashMap<(TopicName, String), u64>,
}

/// State shared by a session's reader and writer.
#[derive(Debug)]
pub(super) struct Session {
    /// The shard.
    pub(super) shard: Rc<Shard>,
    /// The socket.
    pub(super) io: Io,
    /// Frames waiting to be written.
    pub(super) out: Rc<Outbound>,
    /// The client's address (FluxBalancer's PROXY header's when relayed):
    /// topics its subscriptions keep alive are charged to it.
    pub(super) client: std::net::IpAddr,
    /// Set when the reader has finished.
    pub(super) reader_done: Cell<bool>,
    /// Notified when the reader finishes.
    pub(super) reader_done_event: Event,
    /// Set while a writer turn is in progress (it may hold bytes taken
    /// from the queue and not yet written): such a session does not move.
    pub(super) writing: Cell<bool>,
}

impl Session {
    /// A session on `io` for `client`, its send queue capped at
    /// `queue_bytes_max` with `policy`, deliveries packed if `batched`.
    fn new(
        shard: Rc<Shard>,
        io: Io,
        client: std::net::IpAddr,
        queue_bytes_max: usize,
        policy: SlowConsumerPolicy,
        batched: bool,
    ) -> Rc<Session> {
        let out = Rc::new(Outbound::new(queue_bytes_max, policy));
        out.set_batched(batched);
        Rc::new(Session {
            shard,
            io,
            out,
            client,
            reader_done: Cell::new(false),
            reader_done_event: Event::default(),
            writing: Cell::new(false),
        })
    }
}

pub(super) async fn websocket(
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
    // A stopping node still takes links: the nodes taking its topics over
    // claim them while it drains.
    if shard.shutting_down() && route != Route::NodeLink {
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
    // Native subscribers may take their deliveries packed several to a
    // frame; every other path sends one frame per message.
    let batched = match http::query_param(&head.query, "delivery") {
        None | Some("single") => false,
        Some("batch") if route == Route::NativeSocket => true,
        Some(_) => {
            let why = "delivery must be single or batch (native protocol only)";
            let _ = io.write_all(&http::json_error(400, "bad_request", why, false)).await;
            return;
        }
    };
    let queue_bytes_max = if route == Route::NodeLink {
        proto::limits::LINK_SEND_QUEUE_BYTES_MAX
    } else {
        shard.config.send_queue_bytes_max()
    };
    let session = Session::new(shard.clone(), io, client.ip(), queue_bytes_max, policy, batched);
    let (path, mut extra_headers, resume_close) = match prepare(&session, &head, route).await {
        Ok(prepared) => prepared,
        Err(response) => {
            let _ = session.io.write_all(&response).await;
            return;
        }
    };
    // Which shard serves this session (a native socket may still move at
    // its first request): for operators and for tests that need
    // subscribers on every shard.
    extra_headers.push(("x-rayflux-shard", shard.id.to_string()));
    // The address the node attributes the connection to: the socket's peer,
    // or the client named by FluxBalancer's PROXY header.
    extra_headers.push(("x-rayflux-client", client.to_string()));
    if session.io.write_all(&http::switching_protocols(&key, &extra_headers)).await.is_err() {
        cleanup(&session, &path);
        return;
    }
    if let Some(Close { code, reason }) = resume_close {
        session.out.close(code, &reason);
    }
    // The session gets a task of its own, sized for the session only: this
    // task's future is sized for its largest state (HTTP handling, the
    // handshake), about 2.5 KB that an idle WebSocket would otherwise keep
    // for its whole life. The session's reader and writer share that task
    // (see `run_session`).
    glommio::spawn_local(run_session(session, buf, path, slot)).detach();
}

/// What the raw socket's client is told right after the 101 when its
/// resume cannot be served: a close with the code and reason.
pub(super) type ResumeClose = Option<Close>;

/// Work before the 101: validates the path's parameters and, for raw
/// subscribers, makes the subscription live. Returns the path state, extra
/// response headers and, for a raw `from` that cannot be served whole, the
/// close that tells the client what it cannot get.
pub(super) async fn prepare(
    session: &Session,
    head: &RequestHead,
    route: Route,
) -> Result<(Path, Vec<(&'static str, String)>, ResumeClose), Vec<u8>> {
    let bad = |code: &str, why: &str| http::json_error(400, code, why, false);
    match route {
        Route::LegacySubscribe => Ok((Path::Legacy { sub: None }, vec![], None)),
        Route::NativeSocket => Ok((Path::Native(Box::default()), vec![], None)),
        Route::NodeLink => Ok((Path::Link { follows: Rc::default() }, vec![], None)),
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
            let since = match http::query_param(&head.query, "since") {
                None => None,
                Some(v) => {
                    Some(v.parse::<u64>().map_err(|_| bad("bad_request", "since must be ms since the Unix epoch"))?)
                }
            };
            let resume = match (from, since) {
                (Some(_), Some(_)) => return Err(bad("bad_request", "from and since do not combine")),
                (_, Some(ms)) => Some(ResumeFrom { after_seq: 0, epoch: None, since_ms: Some(ms) }),
                (Some(after_seq), None) => Some(ResumeFrom { after_seq, epoch, since_ms: None }),
                (None, None) => None,
            };
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
pub(super) fn resume_close(granted: &Granted, from: u64) -> ResumeClose {
    match granted.resumed {
        Resumed::Live | Resumed::Replayed { gap: None } => None,
        Resumed::Replayed { gap: Some(gap) } => {
            let first = gap.to_seq + 1;
            let reason = format!("history gap: first retained seq is {first}; resume with from={}", first - 1);
            Some(Close { code: CLOSE_HISTORY_GAP, reason })
        }
        Resumed::Lost(why) => {
            let (epoch, last) = (granted.epoch, granted.last_seq);
            let why = why.as_str();
            let reason =
                format!("history lost ({why}): epoch is now {epoch}, last seq {last}; nothing after from={from} can be recovered");
            Some(Close { code: CLOSE_HISTORY_LOST, reason })
        }
    }
}

/// Runs a session in one task: the reader, and the writer's turns whenever
/// the send queue has work the fan-out's direct flush could not do. Both are
/// polled on every wake-up of the task; an idle session is one read future
/// and no writer state. The connection slot is held to the end, or handed
/// on with the socket when the session moves to another shard (`Moved`).
///
/// A plain function returning an `async move` block: an `async fn` would
/// keep its arguments twice in the future (as arguments and as the locals
/// they are moved into), 168 bytes more in every idle session.
#[allow(clippy::manual_async_fn)]
pub(super) fn run_session(
    session: Rc<Session>,
    mut buf: BytesMut,
    mut path: Path,
    slot: ConnectionSlot,
) -> impl Future<Output = ()> {
    // Listed before the task runs: a drain that starts meanwhile closes it
    // too (it closes the sessions it finds listed).
    let session_id = session.shard.next_id();
    session.shard.sessions.borrow_mut().insert(session_id, session.out.clone());
    async move {
        let _direct_off = DirectOff(&session.out);
        let mut writer = Writer::new(&session);
        let moved = {
            let mut reader = std::pin::pin!(read_loop(&session, &mut buf, &mut path));
            poll_fn(|cx| {
                // The reader first: a close that arrived ends the writer's
                // work before it writes another batch. The writer's
                // readiness does not end the session: the reader does.
                if let Poll::Ready(moved) = reader.as_mut().poll(cx) {
                    return Poll::Ready(moved);
                }
                let _ = writer.poll(cx);
                Poll::Pending
            })
            .await
        };
        session.reader_done.set(true);
        session.reader_done_event.notify();
        cleanup(&session, &path);
        // Nothing is queued to a session that moved and no writer turn was
        // in progress (`native_move_target`): the writer ends without
        // touching the socket.
        poll_fn(|cx| writer.poll(cx)).await;
        session.shard.sessions.borrow_mut().remove(&session_id);
        match moved {
            Some(Moved { owner, seq, bytes }) => {
                let out = &session.out;
                let stage =
                    HandoffStage::Native { client: session.client, policy: out.policy(), batched: out.is_batched() };
                hand_off(&session.shard, seq, bytes, stage, slot, owner);
            }
            None => drop(slot),
        }
    }
}

/// A native session whose socket went to its first topic's owner shard
/// (link record `seq`), with the bytes from its first request on.
pub(super) struct Moved {
    owner: usize,
    seq: u64,
    bytes: Vec<u8>,
}

/// The shard a native session should move to before its first request is
/// handled: the owner of the topic that request names, when another shard
/// owns it and the session has nothing that would have to move with it
/// (nothing queued, no write in progress, not closing). Only requests
/// that tie the connection to one topic's traffic count (publish, publish
/// batch, subscribe, join). The reader asks only where moves are on
/// (`read_loop`'s `may_move`).
fn native_move_target(session: &Session, kind: PayloadKind, payload: &Bytes) -> Option<usize> {
    let shard = &session.shard;
    if shard.shutting_down() || !session.out.is_empty() || session.out.is_closing() || session.writing.get() {
        return None;
    }
    let request = match kind {
        PayloadKind::Text => native::parse_text(payload),
        PayloadKind::Binary => native::parse_binary(payload),
    }
    .ok()?;
    let topic = match &request {
        Request::Publish { topic, .. }
        | Request::PublishBatch { topic, .. }
        | Request::Subscribe { topic, .. }
        | Request::Join { topic, .. } => topic,
        _ => return None,
    };
    let owner = TopicName::new(topic).ok()?.owner_shard(shard.shards);
    (owner != shard.id).then_some(owner)
}

/// Serves a native session another shard moved here at its first request
/// (see `Moved`): the session goes on from that request as if it had
/// started here.
pub(super) fn adopt_native(
    shard: Rc<Shard>,
    io: Io,
    buf: BytesMut,
    client: std::net::IpAddr,
    policy: SlowConsumerPolicy,
    batched: bool,
    slot: ConnectionSlot,
) {
    let queue_bytes_max = shard.config.send_queue_bytes_max();
    let session = Session::new(shard, io, client, queue_bytes_max, policy, batched);
    if session.shard.shutting_down() {
        // Moved while this shard began its drain: it closes as the
        // sessions the drain found do, its request unread.
        session.out.close(close_code::GOING_AWAY, "server shutting down");
    }
    glommio::spawn_local(run_session(session, buf, Path::Native(Box::default()), slot)).detach();
}

pub(super) fn cleanup(session: &Session, path: &Path) {
    let shard = &session.shard;
    match path {
        Path::Raw { topic, sub: Some(id), .. } => shard.unsubscribe(topic, *id),
        Path::Legacy { sub: Some((topic, id)) } => shard.unsubscribe(topic, *id),
        Path::Link { follows } => follows.close(shard),
        Path::Native(native) => {
            let NativeState { subs, groups } = &**native;
            for (topic, id) in subs {
                shard.unsubscribe(topic, *id);
            }
            for id in groups.values() {
                shard.leave_group(*id);
            }
        }
        _ => {}
    }
}

/// Reads frames until the client closes, breaks the protocol, goes silent,
/// or the session closes from our side; or, for a native session whose
/// first request names a topic another shard owns, until its socket went
/// there (`Moved`, with the bytes from that request on, unhandled).
pub(super) async fn read_loop(session: &Session, buf: &mut BytesMut, path: &mut Path) -> Option<Moved> {
    let shard = &session.shard;
    let mut decoder = Decoder::new(shard.config.message_bytes_max());
    let mut ping_outstanding = false;
    // Until the first message: a native session may still move.
    let mut may_move =
        matches!(path, Path::Native(_)) && shard.shards > 1 && shard.config.topic_sockets() == TopicSockets::Owner;
    session.io.set_read_timeout(Some(shard.config.idle_timeout()));
    loop {
        loop {
            // What the first message's frame starts with, in case the
            // session moves: copied before the first message only, and only
            // when a whole frame is there (not on each part of a long one).
            let before = (may_move && decoder.is_idle() && Decoder::has_whole_frame(buf)).then(|| buf.to_vec());
            let event = match decoder.decode(buf) {
                Ok(Some(event)) => event,
                Ok(None) => break,
                Err(e) => {
                    metrics::add(&shard.metrics.protocol_errors, 1);
                    session.out.close(e.close_code(), &e.to_string());
                    return None;
                }
            };
            if let (WsEvent::Message { kind, payload }, true) = (&event, may_move) {
                may_move = false;
                if let (Some(owner), Some(bytes)) = (native_move_target(session, *kind, payload), before) {
                    // A socket the link refuses (its buffer is full) is served here.
                    if let Some((owner, seq)) = super::pass(shard, &session.io, owner) {
                        return Some(Moved { owner, seq, bytes });
                    }
                }
            }
            // Boxed: the event handlers' state (about 700 bytes) exists only
            // while one runs, not in every idle session's read loop.
            if !Box::pin(on_event(session, path, event)).await {
                return None;
            }
        }
        release_if_empty(buf);
        if matches!(path, Path::Raw { publish: true, .. }) && !session.out.is_closing() {
            shard.paced_read().await;
        }
        if session.out.is_closing() && session.out.is_empty() {
            // Our close frame is out or going; wait briefly for the answer.
            session.io.set_read_timeout(Some(CLOSE_LINGER));
        }
        match session.io.read(shard, buf).await {
            Ok(0) => return None,
            Ok(_) => ping_outstanding = false,
            Err(e) if e.kind() == io::ErrorKind::TimedOut && !ping_outstanding && !session.out.is_closing() => {
                ping_outstanding = true;
                session.out.offer_control(ws::encode_ping(b"fluxnode"));
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut && !session.out.is_closing() => {
                session.out.close(close_code::IDLE_TIMEOUT, "idle timeout: no answer to ping");
                session.io.set_read_timeout(Some(CLOSE_LINGER));
            }
            Err(_) => return None,
        }
    }
}

/// Handles one client event; false ends the reader.
pub(super) async fn on_event(session: &Session, path: &mut Path, event: WsEvent) -> bool {
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
                Path::Native(native) => {
                    let NativeState { subs, groups } = &mut **native;
                    native_message(session, subs, groups, kind, payload).await
                }
                Path::Link { follows } => link_message(session, follows, kind, payload).await,
            }
        }
    }
}
