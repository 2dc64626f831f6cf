//! A connection's send side: the bounded queue of frames waiting for the
//! socket, and the slow-consumer policy that keeps it bounded.
//!
//! Lives on the connection's shard. Fan-out pushes shared frames (`Rc<Frame>`
//! clones, no copy) and each queue is drained with one gathered socket write
//! per pass, by one of two hands:
//!
//! - **direct**: while the connection's writer is idle (nothing queued,
//!   nothing unsent), the shard's fan-out pass writes the queue itself right
//!   after queueing, with one non-blocking `send` ([`Outbound::take_direct`]).
//!   No task is woken; at 100 subscribers that is 100 task wake-ups saved per
//!   pass.
//! - **writer** (turns run in the session's task): whatever the socket
//!   refuses, control frames (replies,
//!   notices, the close), and anything queued while the writer is busy.
//!
//! One queue, taken from the front by whichever hand holds it, keeps the
//! order; `unsent` bytes always go before anything newer.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;

use crate::limits::{CONTROL_SLACK_BYTES, DROPPED_NOTICE_BYTES_MAX};
use crate::sync::Event;
use crate::topic::TopicName;
use crate::ws::{close_code, Close};

/// What a connection does when its send queue is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SlowConsumerPolicy {
    /// Close the connection with code 4008 and a reason giving the numbers.
    Disconnect,
    /// Skip messages, count them, and tell the client the missed sequence
    /// range (native protocol only; the other paths always disconnect).
    Drop,
}

/// An encoded frame, framed once and shared by every queue it is in: a
/// queue entry is one pointer, and queueing it to a subscriber is one
/// non-atomic reference-count increment.
#[derive(Debug)]
pub struct Frame {
    /// The encoded frame.
    pub bytes: Bytes,
    /// When the message was sequenced (data frames only), for latency.
    pub published_at: Option<Instant>,
}

impl Frame {
    /// A data frame for a message sequenced at `published_at`.
    pub fn data(bytes: Bytes, published_at: Instant) -> Rc<Frame> {
        Rc::new(Frame { bytes, published_at: Some(published_at) })
    }
}

/// The socket a queue in direct mode is written to. Holding it keeps the
/// socket open; the writer drops it when it takes over or the session ends.
pub trait DirectSink {
    /// One non-blocking send: the bytes the socket took now, 0 when full.
    fn try_send(&self, data: &[u8]) -> io::Result<usize>;
}

/// Result of offering a data frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Queued.
    Queued,
    /// Queued, and the queue is in direct mode and was not yet on the
    /// caller's flush list: the caller must list it and call
    /// [`Outbound::take_direct`] (the writer was not woken).
    Flush,
    /// Skipped under the `drop` policy (counted, client told later).
    Dropped,
    /// The queue passed its cap under `disconnect`: the connection is now
    /// closing with 4008 (reported once).
    Disconnected,
    /// The connection is already closing; nothing was queued.
    Closed,
}

/// The send side of one connection.
#[derive(Debug)]
pub struct Outbound {
    /// Frames in order.
    queue: RefCell<VecDeque<Rc<Frame>>>,
    /// Sum of queued frame lengths.
    queued_bytes: Cell<usize>,
    /// Cap on `queued_bytes` for data frames.
    cap_bytes: usize,
    /// What happens at the cap.
    policy: Cell<SlowConsumerPolicy>,
    /// Set once the connection is closing: the close code and reason the
    /// writer sends after flushing what is queued.
    closing: RefCell<Option<Close>>,
    /// Messages skipped under the `drop` policy and not yet reported: at
    /// most one entry per topic, so its size is bounded by the connection's
    /// subscriptions whatever the drop rate.
    missed: RefCell<Vec<Missed>>,
    /// Messages dropped over the connection's life.
    dropped_total: Cell<u64>,
    /// Wakes the writer.
    pub wake_writer: Event,
    /// Set while the writer is idle with nothing queued or unsent: the
    /// shard may then write this queue itself.
    direct: RefCell<Option<Rc<dyn DirectSink>>>,
    /// Whether the queue is on its shard's flush list.
    listed: Cell<bool>,
    /// Bytes the socket refused; the writer sends them before anything
    /// else. Empty (no allocation) except while a write is blocked.
    unsent: RefCell<Unsent>,
    /// Notified when the peer's close arrives ([`Outbound::peer_closed`]),
    /// so that a writer blocked on a full socket stops after the frame in
    /// progress. Separate from `wake_writer`, which every queued frame
    /// notifies: a blocked write is not restarted for those.
    pub peer_close_event: Event,
    /// Set once the peer's close frame arrived.
    peer_closed: Cell<bool>,
    /// Whether consecutive deliveries are packed into batch frames
    /// (native `?delivery=batch`; see [`Outbound::take_batch`]).
    batched: Cell<bool>,
}

/// Bytes a send refused, and where the first whole frame in them starts:
/// a refused send can stop in the middle of a frame, and after the peer's
/// close only that frame may still be finished (RFC 6455 5.5.1).
#[derive(Debug, Default)]
pub struct Unsent {
    /// The refused bytes: the tail of one frame, then whole frames.
    pub bytes: Vec<u8>,
    /// Offset in `bytes` of the first frame boundary (0: it starts on one).
    pub first_boundary: usize,
}

impl Unsent {
    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Keeps `batch[sent..]`, where `batch` starts on a frame boundary.
    fn keep(&mut self, batch: &[u8], sent: usize) {
        if batch.len() <= sent {
            return;
        }
        if self.bytes.is_empty() {
            self.first_boundary = crate::ws::frame_end_at(batch, 0, sent) - sent;
        }
        self.bytes.extend_from_slice(&batch[sent..]);
    }

    /// Where the bytes to send end if the peer has closed and `written`
    /// bytes are out: the end of the frame in progress (`written` itself
    /// when it falls on a boundary).
    pub fn end_after_close(&self, written: usize) -> usize {
        crate::ws::frame_end_at(&self.bytes, self.first_boundary, written)
    }
}

/// Messages of one topic a `drop`-policy subscriber did not get, reported in
/// one notice: `dropped` messages between `from_seq` and `to_seq`
/// (inclusive). When drops are not consecutive (the queue drained a little
/// between them) the range covers the messages delivered in between too;
/// the subscriber has those, with their sequence numbers, and `dropped`
/// says how many are missing. One range per topic keeps the bookkeeping
/// bounded under any flood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missed {
    /// The topic.
    pub topic: TopicName,
    /// First sequence skipped.
    pub from_seq: u64,
    /// Last sequence skipped.
    pub to_seq: u64,
    /// Messages skipped in the range.
    pub dropped: u64,
}

/// How many frames at the front of `queue` form one batch frame of at most
/// `budget` bytes (deliveries only, each one unfragmented data frame), and
/// the batch frame's payload length.
fn batch_run(queue: &VecDeque<Rc<Frame>>, budget: usize) -> (usize, usize) {
    let (mut count, mut body) = (0, 1);
    for frame in queue {
        if frame.published_at.is_none() {
            break;
        }
        let Some(payload) = crate::ws::data_frame_payload(&frame.bytes) else { break };
        let Ok(_) = u32::try_from(payload.len()) else { break };
        let next = body + crate::native::BATCH_RECORD_LEN_BYTES + payload.len();
        if crate::ws::server_header_len(next) + next > budget {
            break;
        }
        (count, body) = (count + 1, next);
    }
    (count, body)
}

impl std::fmt::Debug for dyn DirectSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DirectSink")
    }
}

impl Outbound {
    /// An empty queue with the given cap and policy.
    pub fn new(cap_bytes: usize, policy: SlowConsumerPolicy) -> Outbound {
        Outbound {
            queue: RefCell::new(VecDeque::new()),
            queued_bytes: Cell::new(0),
            cap_bytes,
            policy: Cell::new(policy),
            closing: RefCell::new(None),
            missed: RefCell::new(Vec::new()),
            dropped_total: Cell::new(0),
            wake_writer: Event::default(),
            direct: RefCell::new(None),
            listed: Cell::new(false),
            unsent: RefCell::new(Unsent::default()),
            peer_close_event: Event::default(),
            peer_closed: Cell::new(false),
            batched: Cell::new(false),
        }
    }

    /// Packs consecutive deliveries into batch frames from now on (the
    /// native protocol's `?delivery=batch`).
    pub fn set_batched(&self, batched: bool) {
        self.batched.set(batched);
    }

    /// The writer goes idle: until [`Outbound::stop_direct`], data
    /// frames are written by the shard's fan-out pass through `sink`.
    pub fn start_direct(&self, sink: Rc<dyn DirectSink>) {
        *self.direct.borrow_mut() = Some(sink);
    }

    /// The writer holds the socket again (or is gone): no direct writes.
    pub fn stop_direct(&self) {
        self.direct.borrow_mut().take();
    }

    /// Takes the queue off the flush list and, if it is still in direct
    /// mode, appends one batch of its frames to `buf` (see `take_batch`)
    /// and returns the socket to send it to. The caller sends, then reports
    /// with [`Outbound::sent_direct`].
    pub fn take_direct(
        &self,
        buf: &mut Vec<u8>,
        max_bytes: usize,
        latencies: &mut Vec<Instant>,
    ) -> Option<Rc<dyn DirectSink>> {
        self.listed.set(false);
        // None: the writer took over since the queue was listed.
        let sink = self.direct.borrow().clone()?;
        let start = buf.len();
        self.take_batch(buf, max_bytes, latencies);
        (buf.len() > start).then_some(sink)
    }

    /// After a direct send of `batch`: whatever the socket did not take
    /// (all of it on an error, which the writer then meets itself,
    /// where closing is handled), and any frames past the batch, go to the
    /// writer, which is woken.
    ///
    /// Drops recorded meanwhile go to the writer too: the direct flush
    /// writes data only, and the notice would otherwise wait for the next
    /// reply or ping when the flush emptied the queue.
    pub fn sent_direct(&self, batch: &[u8], sent: io::Result<usize>) {
        let sent = sent.unwrap_or(0).min(batch.len());
        if sent < batch.len() || !self.is_empty() || !self.missed.borrow().is_empty() {
            self.unsent.borrow_mut().keep(batch, sent);
            self.stop_direct();
            self.wake_writer.notify();
        }
    }

    /// Takes the bytes a send refused earlier (empty if none).
    pub fn take_unsent(&self) -> Unsent {
        std::mem::take(&mut *self.unsent.borrow_mut())
    }

    /// Keeps what the socket refused of `batch` (which starts on a frame
    /// boundary: a batch from [`Outbound::take_batch`]) after taking `sent`
    /// bytes, for the writer's next write.
    pub fn keep_unsent(&self, batch: &[u8], sent: usize) {
        self.unsent.borrow_mut().keep(batch, sent);
    }

    /// The slow-consumer policy.
    pub fn policy(&self) -> SlowConsumerPolicy {
        self.policy.get()
    }

    /// Whether runs of deliveries are packed into one frame.
    pub fn is_batched(&self) -> bool {
        self.batched.get()
    }

    /// Changes the slow-consumer policy.
    pub fn set_policy(&self, policy: SlowConsumerPolicy) {
        self.policy.set(policy);
    }

    /// Offers a delivered message's frame; applies the policy at the cap.
    pub fn offer_data(&self, frame: &Rc<Frame>, topic: &TopicName, seq: u64) -> Offer {
        if self.is_closing() {
            return Offer::Closed;
        }
        // An empty queue always takes one frame: a frame can be larger than
        // the cap (a native text envelope JSON-escapes its payload, up to six
        // bytes per byte), and refusing it would cut off a subscriber that is
        // not behind at all. The bound is then cap + one largest frame.
        let queued = self.queued_bytes.get();
        if queued > 0 && queued + frame.bytes.len() > self.cap_bytes {
            return match self.policy.get() {
                SlowConsumerPolicy::Drop => {
                    self.record_missed(topic, seq);
                    Offer::Dropped
                }
                SlowConsumerPolicy::Disconnect => {
                    let reason =
                        format!("slow consumer: {} bytes pending, cap {}", self.queued_bytes.get(), self.cap_bytes);
                    self.close_now(close_code::SLOW_CONSUMER, reason);
                    Offer::Disconnected
                }
            };
        }
        self.queued_bytes.set(queued + frame.bytes.len());
        self.queue.borrow_mut().push_back(frame.clone());
        if self.direct.borrow().is_some() {
            return if self.listed.replace(true) { Offer::Queued } else { Offer::Flush };
        }
        self.wake_writer.notify();
        Offer::Queued
    }

    /// Queues a reply or notice. These are never dropped; a client that lets
    /// them pile up past the cap plus a slack is disconnected (4008).
    /// Returns false if the connection is (now) closing.
    pub fn offer_control(&self, bytes: Bytes) -> bool {
        if self.is_closing() {
            return false;
        }
        if self.queued_bytes.get() + bytes.len() > self.cap_bytes + CONTROL_SLACK_BYTES {
            self.close_now(close_code::SLOW_CONSUMER, "slow consumer: replies not read".into());
            return false;
        }
        self.queued_bytes.set(self.queued_bytes.get() + bytes.len());
        self.queue.borrow_mut().push_back(Rc::new(Frame { bytes, published_at: None }));
        self.wake_writer.notify();
        true
    }

    /// Begins closing after what is queued: the writer flushes, then sends a
    /// close frame with `code` and `reason`. The first close wins.
    pub fn close(&self, code: u16, reason: &str) {
        let mut closing = self.closing.borrow_mut();
        if closing.is_none() {
            *closing = Some(Close { code, reason: reason.to_string() });
            drop(closing);
            self.wake_writer.notify();
        }
    }

    /// The peer's close frame arrived (RFC 6455 5.5.1): nothing more is
    /// queued, frames not yet started are discarded, the frame being written
    /// is finished (see [`Unsent::end_after_close`]), and the writer answers
    /// with a close carrying `code` at once, whatever the topic's rate.
    pub fn peer_closed(&self, code: u16) {
        self.peer_closed.set(true);
        self.close_now(code, String::new());
        self.peer_close_event.notify();
    }

    /// Whether the peer's close frame arrived.
    pub fn is_peer_closed(&self) -> bool {
        self.peer_closed.get()
    }

    /// Closes without flushing: queued frames are discarded (slow consumer).
    fn close_now(&self, code: u16, reason: String) {
        self.queue.borrow_mut().clear();
        self.queued_bytes.set(0);
        *self.closing.borrow_mut() = Some(Close { code, reason });
        self.wake_writer.notify();
    }

    /// Whether a close has begun.
    pub fn is_closing(&self) -> bool {
        self.closing.borrow().is_some()
    }

    /// The close code and reason, once closing.
    pub fn close_reason(&self) -> Option<Close> {
        self.closing.borrow().clone()
    }

    /// Moves frames into `out` (appending their bytes) until this call has
    /// appended `max_bytes` (at least one frame is always taken), and the
    /// publish time of each data frame into `latencies`.
    ///
    /// A batched queue packs each run of two or more consecutive deliveries
    /// that fits into one binary frame: `0x02`, then per delivery its length
    /// (u32 big-endian) and the payload its own frame would have carried
    /// (docs/PROTOCOL.md). Replies and notices end a run and go as they
    /// are, so the order on the wire is the queue's. Nothing waits for a
    /// batch to fill: what was queued when the write happens goes in one
    /// frame (the shard's flush interval decides how often that is).
    pub fn take_batch(&self, out: &mut Vec<u8>, max_bytes: usize, latencies: &mut Vec<Instant>) {
        let start = out.len();
        let mut queue = self.queue.borrow_mut();
        while let Some(front) = queue.front() {
            let used = out.len() - start;
            if used > 0 && used + front.bytes.len() > max_bytes {
                break;
            }
            if self.batched.get() {
                let (count, body) = batch_run(&queue, max_bytes.saturating_sub(used));
                if count >= 2 {
                    crate::ws::append_binary_header(body, out);
                    out.push(crate::native::SERVER_BINARY_BATCH);
                    for frame in queue.drain(..count) {
                        self.queued_bytes.set(self.queued_bytes.get() - frame.bytes.len());
                        // batch_run checked each is one data frame.
                        let payload = crate::ws::data_frame_payload(&frame.bytes).unwrap_or_default();
                        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                        out.extend_from_slice(payload);
                        if let Some(t) = frame.published_at {
                            latencies.push(t);
                        }
                    }
                    continue;
                }
            }
            // front() returned Some just above.
            let frame = queue.pop_front().expect("non-empty");
            self.queued_bytes.set(self.queued_bytes.get() - frame.bytes.len());
            out.extend_from_slice(&frame.bytes);
            if let Some(t) = frame.published_at {
                latencies.push(t);
            }
        }
    }

    /// Whether nothing is queued (unsent bytes aside).
    pub fn is_empty(&self) -> bool {
        self.queue.borrow().is_empty()
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.get()
    }

    /// The cap on queued data bytes.
    pub fn cap_bytes(&self) -> usize {
        self.cap_bytes
    }

    /// Data bytes that fit under the cap now.
    pub fn room(&self) -> usize {
        self.cap_bytes.saturating_sub(self.queued_bytes.get())
    }

    /// Whether `bytes` more fit under the cap now.
    pub fn has_room_for(&self, bytes: usize) -> bool {
        bytes <= self.room()
    }

    /// Messages dropped so far.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total.get()
    }

    /// Takes one missed range not yet reported, if its notice fits: the
    /// notices may use half of the control slack over the cap, so a
    /// subscriber that reads slowly under a flood (its queue always near
    /// the cap) still hears of its drops, and replies keep the other half.
    pub fn next_missed_if_room(&self) -> Option<Missed> {
        if self.queued_bytes.get() + DROPPED_NOTICE_BYTES_MAX > self.cap_bytes + CONTROL_SLACK_BYTES / 2 {
            return None;
        }
        let mut missed = self.missed.borrow_mut();
        (!missed.is_empty()).then(|| missed.remove(0))
    }

    /// Forgets the drops of `topic` not yet reported: the connection left
    /// the topic, and a notice arriving later, perhaps after it subscribed
    /// again to a new epoch of the topic, would name the wrong messages.
    pub fn forget_missed(&self, topic: &TopicName) {
        self.missed.borrow_mut().retain(|m| m.topic != *topic);
    }

    /// Ranges waiting to be reported (at most one per topic).
    pub fn missed_pending(&self) -> usize {
        self.missed.borrow().len()
    }

    fn record_missed(&self, topic: &TopicName, seq: u64) {
        self.dropped_total.set(self.dropped_total.get() + 1);
        let mut missed = self.missed.borrow_mut();
        match missed.iter_mut().find(|m| m.topic == *topic) {
            Some(m) => {
                m.to_seq = seq;
                m.dropped += 1;
            }
            None => missed.push(Missed { topic: topic.clone(), from_seq: seq, to_seq: seq, dropped: 1 }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real server frame of exactly `n` bytes (header included) where a
    /// frame that long exists; a stand-in of `n` bytes otherwise.
    fn frame(n: usize) -> Bytes {
        match n {
            2..=127 => crate::ws::encode_data(crate::message::PayloadKind::Binary, &vec![0; n - 2]),
            130..=65539 => crate::ws::encode_data(crate::message::PayloadKind::Binary, &vec![0; n - 4]),
            _ => Bytes::from(vec![0u8; n]),
        }
    }

    fn data(n: usize) -> Rc<Frame> {
        Frame::data(frame(n), Instant::now())
    }

    /// Splits what `take_batch` wrote into the frames' payloads, unpacking
    /// batch frames: (payloads, frames on the wire).
    fn unpack(mut wire: &[u8]) -> (Vec<Vec<u8>>, usize) {
        let (mut payloads, mut frames) = (Vec::new(), 0);
        while !wire.is_empty() {
            let (header, len) = crate::ws::server_frame_parts(wire).unwrap();
            let payload = &wire[header..header + len];
            frames += 1;
            if wire[0] & 0x0f == 0x2 && payload[0] == crate::native::SERVER_BINARY_BATCH {
                let mut rest = &payload[1..];
                while !rest.is_empty() {
                    let n = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
                    payloads.push(rest[4..4 + n].to_vec());
                    rest = &rest[4 + n..];
                }
            } else {
                payloads.push(payload.to_vec());
            }
            wire = &wire[header + len..];
        }
        (payloads, frames)
    }

    #[test]
    fn a_batched_queue_packs_runs_of_deliveries_and_keeps_replies_in_place() {
        let t = TopicName::new("t").unwrap();
        let delivery = |i: u8, len: usize| {
            Frame::data(crate::ws::encode_data(crate::message::PayloadKind::Binary, &vec![i; len]), Instant::now())
        };
        let reply = |i: u8| crate::ws::encode_data(crate::message::PayloadKind::Text, &[b'{', i]);
        for batched in [false, true] {
            let o = Outbound::new(1 << 20, SlowConsumerPolicy::Disconnect);
            o.set_batched(batched);
            o.offer_data(&delivery(1, 10), &t, 1); // alone before a reply: not batched
            o.offer_control(reply(2));
            for i in 3..=5 {
                o.offer_data(&delivery(i, 200), &t, i as u64); // a run of three
            }
            o.offer_control(reply(6));
            o.offer_data(&delivery(7, 70_000), &t, 7); // a run of two, one large
            o.offer_data(&delivery(8, 1), &t, 8);
            let (mut out, mut lat) = (Vec::new(), Vec::new());
            o.take_batch(&mut out, 1 << 20, &mut lat);
            let (payloads, frames) = unpack(&out);
            let firsts: Vec<u8> = payloads.iter().map(|p| p[p.len() - 1]).collect();
            assert_eq!(firsts, vec![1, 2, 3, 4, 5, 6, 7, 8], "batched {batched}: order kept");
            assert_eq!(payloads[6].len(), 70_000);
            assert_eq!(frames, if batched { 5 } else { 8 });
            assert_eq!(lat.len(), 6, "every delivery's latency counted");
            assert_eq!(o.queued_bytes(), 0);
            assert!(o.is_empty());
        }
    }

    #[test]
    fn a_batch_stays_within_the_write_limit_and_a_single_delivery_goes_unwrapped() {
        let t = TopicName::new("t").unwrap();
        let o = Outbound::new(1 << 20, SlowConsumerPolicy::Disconnect);
        o.set_batched(true);
        for i in 0..10u64 {
            o.offer_data(&data(100), &t, i);
        }
        // 100-byte frames carry 98-byte payloads: a batch record is 102 bytes.
        let (mut out, mut lat) = (Vec::new(), Vec::new());
        o.take_batch(&mut out, 4 + 1 + 3 * 102, &mut lat);
        assert_eq!((unpack(&out).0.len(), unpack(&out).1, lat.len()), (3, 1, 3));
        assert_eq!(out.len(), 4 + 1 + 3 * 102);
        // Too little room for two: one frame, as it is.
        let mut one = Vec::new();
        o.take_batch(&mut one, 150, &mut lat);
        assert_eq!(one.len(), 100);
        // The rest fits in one batch.
        let mut rest = Vec::new();
        o.take_batch(&mut rest, 1 << 20, &mut lat);
        assert_eq!(unpack(&rest), (vec![vec![0u8; 98]; 6], 1));
        assert!(o.is_empty());
    }

    #[test]
    fn drop_policy_counts_ranges_and_stays_bounded() {
        let o = Outbound::new(100, SlowConsumerPolicy::Drop);
        let t = TopicName::new("t").unwrap();
        let offers: Vec<Offer> = (1..=5).map(|s| o.offer_data(&data(40), &t, s)).collect();
        assert_eq!(offers, vec![Offer::Queued, Offer::Queued, Offer::Dropped, Offer::Dropped, Offer::Dropped]);
        assert_eq!(o.queued_bytes(), 80);
        let (mut out, mut lat) = (Vec::new(), Vec::new());
        o.take_batch(&mut out, 1 << 20, &mut lat);
        assert_eq!((out.len(), lat.len()), (80, 2));
        assert_eq!(o.next_missed_if_room(), Some(Missed { topic: t, from_seq: 3, to_seq: 5, dropped: 3 }));
        assert_eq!(o.next_missed_if_room(), None);
        assert_eq!(o.dropped_total(), 3);
    }

    /// A slow reader under a flood: the queue drains a little between drops,
    /// so drops are never consecutive. The bookkeeping stays one range per
    /// topic (it grew by one entry per dropped message before), and the
    /// notice goes out although the queue never falls below half the cap.
    #[test]
    fn interleaved_drops_stay_one_range_per_topic() {
        let o = Outbound::new(1000, SlowConsumerPolicy::Drop);
        let (a, b) = (TopicName::new("a").unwrap(), TopicName::new("b").unwrap());
        let (mut out, mut lat) = (Vec::new(), Vec::new());
        let mut seq = 0;
        for turn in 0..10_000 {
            let order = if turn % 2 == 0 { [&a, &b] } else { [&b, &a] };
            for topic in order {
                seq += 1;
                o.offer_data(&data(100), topic, seq);
            }
            out.clear();
            o.take_batch(&mut out, 100, &mut lat); // the reader takes one frame a turn
        }
        assert!(o.queued_bytes() >= 900, "the queue stays near its cap");
        assert_eq!(o.missed_pending(), 2, "one range per topic");
        let first = o.next_missed_if_room().expect("a notice fits in the slack");
        assert_eq!(first.dropped + o.next_missed_if_room().unwrap().dropped, o.dropped_total());
    }

    #[test]
    fn disconnect_policy_clears_and_closes() {
        let o = Outbound::new(100, SlowConsumerPolicy::Disconnect);
        let t = TopicName::new("t").unwrap();
        assert_eq!(o.offer_data(&data(90), &t, 1), Offer::Queued);
        assert_eq!(o.offer_data(&data(20), &t, 2), Offer::Disconnected);
        assert_eq!(o.offer_data(&data(1), &t, 3), Offer::Closed);
        assert_eq!(o.queued_bytes(), 0);
        assert_eq!(o.close_reason().unwrap().code, close_code::SLOW_CONSUMER);
    }

    #[test]
    fn an_empty_queue_takes_one_frame_larger_than_the_cap() {
        let o = Outbound::new(100, SlowConsumerPolicy::Disconnect);
        let t = TopicName::new("t").unwrap();
        assert_eq!(o.offer_data(&data(600), &t, 1), Offer::Queued);
        assert_eq!(o.offer_data(&data(1), &t, 2), Offer::Disconnected);
    }

    #[test]
    fn control_frames_have_a_slack_then_close() {
        let o = Outbound::new(10, SlowConsumerPolicy::Drop);
        assert!(o.offer_control(frame(CONTROL_SLACK_BYTES)));
        assert!(!o.offer_control(frame(100)));
        assert!(o.is_closing());
    }

    /// A socket stand-in that takes up to `room` bytes per send.
    struct FakeSink {
        room: Cell<usize>,
        fail: bool,
        got: RefCell<Vec<u8>>,
    }

    impl DirectSink for FakeSink {
        fn try_send(&self, data: &[u8]) -> io::Result<usize> {
            if self.fail {
                return Err(io::ErrorKind::ConnectionReset.into());
            }
            let n = data.len().min(self.room.get());
            self.got.borrow_mut().extend_from_slice(&data[..n]);
            Ok(n)
        }
    }

    fn sink(room: usize, fail: bool) -> Rc<FakeSink> {
        Rc::new(FakeSink { room: Cell::new(room), fail, got: RefCell::default() })
    }

    /// One direct flush as the shard does it: take, send, report.
    fn flush(o: &Outbound, max: usize) -> usize {
        let (mut buf, mut lat) = (Vec::new(), Vec::new());
        let Some(s) = o.take_direct(&mut buf, max, &mut lat) else { return 0 };
        o.sent_direct(&buf, s.try_send(&buf));
        buf.len()
    }

    #[test]
    fn direct_mode_lists_once_and_writes_without_the_writer() {
        let o = Outbound::new(1000, SlowConsumerPolicy::Drop);
        let t = TopicName::new("t").unwrap();
        let s = sink(1 << 20, false);
        o.start_direct(s.clone());
        assert_eq!(o.offer_data(&data(10), &t, 1), Offer::Flush);
        assert_eq!(o.offer_data(&data(10), &t, 2), Offer::Queued, "already listed");
        assert_eq!(flush(&o, 1 << 20), 20);
        assert_eq!(s.got.borrow().len(), 20);
        assert!(o.is_empty() && o.take_unsent().is_empty());
        // Still direct, and listed again by the next offer.
        assert_eq!(o.offer_data(&data(10), &t, 3), Offer::Flush);
    }

    #[test]
    fn a_drop_in_direct_mode_wakes_the_writer_even_when_the_flush_empties_the_queue() {
        let o = Outbound::new(100, SlowConsumerPolicy::Drop);
        let t = TopicName::new("t").unwrap();
        o.start_direct(sink(1 << 20, false));
        assert_eq!(o.offer_data(&data(60), &t, 1), Offer::Flush);
        assert_eq!(o.offer_data(&data(60), &t, 2), Offer::Dropped);
        let woken = o.wake_writer.generation();
        assert_eq!(flush(&o, 1 << 20), 60);
        assert!(o.is_empty(), "the flush took everything");
        assert_ne!(o.wake_writer.generation(), woken, "the writer is woken for the notice");
        assert_eq!(o.offer_data(&data(10), &t, 3), Offer::Queued, "the writer holds the socket");
        assert_eq!(o.next_missed_if_room().map(|m| (m.from_seq, m.to_seq)), Some((2, 2)));
    }

    #[test]
    fn what_the_socket_refuses_goes_to_the_writer_first() {
        let o = Outbound::new(1000, SlowConsumerPolicy::Drop);
        let t = TopicName::new("t").unwrap();
        o.start_direct(sink(15, false));
        o.offer_data(&Frame::data(Bytes::from(vec![1u8; 10]), Instant::now()), &t, 1);
        o.offer_data(&Frame::data(Bytes::from(vec![2u8; 10]), Instant::now()), &t, 2);
        flush(&o, 1 << 20);
        assert_eq!(o.take_unsent().bytes, vec![2u8; 5], "the tail the socket did not take");
        assert_eq!(o.offer_data(&data(1), &t, 3), Offer::Queued, "direct mode ended: the writer holds the socket");
    }

    #[test]
    fn the_peers_close_discards_the_queue_and_keeps_only_the_frame_in_progress() {
        let o = Outbound::new(1000, SlowConsumerPolicy::Drop);
        let t = TopicName::new("t").unwrap();
        o.start_direct(sink(15, false));
        for seq in 1..=3 {
            o.offer_data(&data(10), &t, seq);
        }
        flush(&o, 1 << 20); // the socket took one frame and half of the next
        o.offer_data(&data(10), &t, 4); // queued behind the refused bytes
        o.peer_closed(1000);
        assert!(o.is_empty(), "frames not started are discarded");
        assert_eq!(o.offer_data(&data(10), &t, 5), Offer::Closed, "nothing more is queued");
        let unsent = o.take_unsent();
        assert_eq!(unsent.bytes.len(), 15, "the refused tail of frame 2, then frame 3");
        assert_eq!(unsent.end_after_close(0), 5, "only frame 2 is finished");
        assert_eq!(unsent.end_after_close(5), 5);
        assert_eq!(unsent.end_after_close(6), 15);
        assert_eq!(o.close_reason(), Some(Close { code: 1000, reason: String::new() }));
        assert!(o.is_peer_closed());
    }

    #[test]
    fn an_error_leaves_the_whole_batch_to_the_writer() {
        let o = Outbound::new(1000, SlowConsumerPolicy::Drop);
        let t = TopicName::new("t").unwrap();
        o.start_direct(sink(0, true));
        o.offer_data(&data(10), &t, 1);
        flush(&o, 1 << 20);
        assert_eq!(o.take_unsent().bytes.len(), 10);
    }

    #[test]
    fn frames_past_one_batch_go_to_the_writer() {
        let o = Outbound::new(1000, SlowConsumerPolicy::Drop);
        let t = TopicName::new("t").unwrap();
        let s = sink(1 << 20, false);
        o.start_direct(s.clone());
        for seq in 1..=3 {
            o.offer_data(&data(10), &t, seq);
        }
        assert_eq!(flush(&o, 15), 10, "a batch stops before the frame that would pass the limit");
        assert_eq!(o.queued_bytes(), 20, "the rest is left for the writer");
        assert_eq!(o.offer_data(&data(1), &t, 4), Offer::Queued, "and the writer was handed the queue");
    }

    #[test]
    fn after_stop_direct_nothing_is_listed_or_written() {
        let o = Outbound::new(1000, SlowConsumerPolicy::Drop);
        let t = TopicName::new("t").unwrap();
        let s = sink(1 << 20, false);
        o.start_direct(s.clone());
        assert_eq!(o.offer_data(&data(10), &t, 1), Offer::Flush);
        o.stop_direct(); // the writer woke for a control frame before the flush
        assert_eq!(flush(&o, 1 << 20), 0);
        assert!(s.got.borrow().is_empty());
        assert!(!o.is_empty(), "the writer writes it");
    }
}
