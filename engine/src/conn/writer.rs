//! A session's writer task: drains the connection's send queue to the
//! socket, sends what the direct flush could not, and closes.

use super::*;

/// Drains the session's queue to the socket when the shard's direct flush
/// cannot (see `outbound`): unsent bytes first, then one gathered write per
/// wake-up, then the close frame once closing, then the close handshake's
/// linger. While idle it lets the fan-out pass write directly.
pub(super) async fn write_loop(session: Rc<Session>) {
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

/// Ends a queue's direct mode when its writer task ends, however it ends.
pub(super) struct DirectOff<'a>(&'a Outbound);

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
