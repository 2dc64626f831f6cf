//! A session's writer: drains the connection's send queue to the socket
//! when the fan-out's direct flush cannot, and closes.
//!
//! The writer is not a task of its own. It runs in the session's task, in
//! turns: a turn starts when the send queue wakes the writer and ends when
//! the queue is empty again and the fan-out may write to the socket
//! directly. Between turns an idle session holds no writer state (see
//! `Writer`).

use std::future::Future;
use std::task::{Context, Poll};

use super::*;

/// How a writer turn ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Turn {
    /// The queue is empty and direct writes are on: nothing to do until the
    /// queue wakes the writer again.
    Idle,
    /// The connection is closed or shut (or the reader is done): no more
    /// turns.
    Finished,
}

/// A session's writer between and during turns: the turn in progress,
/// boxed (a turn's state is several hundred bytes that an idle session
/// would otherwise carry), and the queue's wake-up generation it last saw.
pub(super) struct Writer<'a> {
    /// The session written to.
    session: &'a Session,
    /// The turn in progress.
    turn: Option<Pin<Box<dyn Future<Output = Turn> + 'a>>>,
    /// The send queue's wake-up generation when the last turn ended; None
    /// before the first turn.
    seen: Option<u64>,
    /// Set when a turn finished the connection.
    finished: bool,
}

impl std::fmt::Debug for Writer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("busy", &self.turn.is_some()).field("finished", &self.finished).finish()
    }
}

impl<'a> Writer<'a> {
    pub(super) fn new(session: &'a Session) -> Writer<'a> {
        Writer { session, turn: None, seen: None, finished: false }
    }

    /// Runs turns while there is work; ready once a turn has finished the
    /// connection. Between turns the task is woken by the queue's next
    /// wake-up, or must be polled again once the reader is done.
    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.finished {
                return Poll::Ready(());
            }
            if self.turn.is_none() {
                let wake = &self.session.out.wake_writer;
                if let Some(seen) = self.seen {
                    if !self.session.reader_done.get() && wake.poll_since(seen, cx).is_pending() {
                        return Poll::Pending;
                    }
                }
            }
            let session = self.session;
            let turn = self.turn.get_or_insert_with(|| Box::pin(write_turn(session)));
            session.writing.set(true);
            let Poll::Ready(ended) = turn.as_mut().poll(cx) else { return Poll::Pending };
            self.turn = None;
            session.writing.set(false);
            // Nothing ran between the turn's last look at the queue and
            // now: wake-ups before this one are handled.
            self.seen = Some(self.session.out.wake_writer.generation());
            self.finished = ended == Turn::Finished;
        }
    }
}

/// One writer turn: unsent bytes first, then one gathered write per round,
/// then the close frame once closing, then the close handshake's linger.
/// Ends idle, with direct writes on, once the queue is empty.
pub(super) async fn write_turn(session: &Session) -> Turn {
    let shard = &session.shard;
    let out = &session.out;
    let mut published = Vec::new();
    loop {
        out.stop_direct();
        let unsent = out.take_unsent();
        if !unsent.is_empty() {
            let write = glommio::timer::timeout(shard.config.idle_timeout(), async {
                Ok(write_unsent(session, &unsent).await)
            });
            if !matches!(write.await, Ok(Ok(()))) {
                // The peer stopped reading for a whole idle period, or the socket failed.
                out.close(close_code::SLOW_CONSUMER, "write stalled");
                session.io.shutdown(Shutdown::Both);
                return Turn::Finished;
            }
            continue;
        }
        while let Some(missed) = out.next_missed_if_room() {
            out.offer_control(native::dropped_notice(&missed.topic, missed.from_seq, missed.to_seq, missed.dropped));
        }
        if out.is_empty() {
            if let Some(Close { code, reason }) = out.close_reason() {
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
                return Turn::Finished;
            }
            if session.reader_done.get() {
                return Turn::Finished;
            }
            out.start_direct(session.io.0.clone());
            return Turn::Idle;
        }
        // Gather into the shard's scratch buffer and send without blocking:
        // the socket usually takes it all, and then the connection holds no
        // write buffer and no timer is armed. What the socket refuses is
        // kept as unsent and awaited on the next round.
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
        if !out.is_empty() {
            // More queued and the socket took it all: a client that reads
            // as fast as the node writes would keep this turn going until
            // the queue is empty without a single await, and the session's
            // reader (a close, a ping) and the shard's other tasks would
            // wait behind it. One yield per full write batch (256 KiB).
            futures_lite::future::yield_now().await;
        }
    }
}

/// Writes bytes a send refused. Once the peer's close has arrived only the
/// frame in progress is finished: a write blocked on a full socket is
/// abandoned (glommio's write waits for readiness and holds no bytes, so
/// dropping it loses nothing) and resumed with the shorter end.
pub(super) async fn write_unsent(session: &Session, unsent: &Unsent) -> io::Result<()> {
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

/// Ends a queue's direct mode when its session ends, however it ends: the
/// queue must not hold the socket open after the session.
pub(super) struct DirectOff<'a>(pub(super) &'a Outbound);

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
