//! A connection's send side: the bounded queue of frames waiting for the
//! socket, and the slow-consumer policy that keeps it bounded.
//!
//! Lives on the connection's shard. Fan-out pushes shared frames (`Bytes`
//! clones, no copy); the connection's writer task drains them, gathering
//! into one socket write per wake-up.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

use crate::config::SlowConsumerPolicy;
use crate::limits::CONTROL_SLACK_BYTES;
use crate::sync::Event;
use crate::topic::TopicName;
use crate::ws::close_code;

/// A frame waiting to be written.
#[derive(Debug)]
pub struct QueuedFrame {
    /// The encoded frame, shared with every other subscriber.
    pub bytes: Bytes,
    /// When the message was sequenced (data frames only), for latency.
    pub published_at: Option<Instant>,
}

/// Result of offering a data frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Queued.
    Queued,
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
    queue: RefCell<VecDeque<QueuedFrame>>,
    /// Sum of queued frame lengths.
    queued_bytes: Cell<usize>,
    /// Cap on `queued_bytes` for data frames.
    cap_bytes: usize,
    /// What happens at the cap.
    policy: Cell<SlowConsumerPolicy>,
    /// Set once the connection is closing: the close code and reason the
    /// writer sends after flushing what is queued.
    closing: RefCell<Option<(u16, String)>>,
    /// Missed ranges per topic under the `drop` policy, not yet reported.
    missed: RefCell<Vec<(TopicName, u64, u64)>>,
    /// Messages dropped over the connection's life.
    dropped_total: Cell<u64>,
    /// Wakes the writer.
    pub wake_writer: Event,
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
        }
    }

    /// Changes the slow-consumer policy.
    pub fn set_policy(&self, policy: SlowConsumerPolicy) {
        self.policy.set(policy);
    }

    /// Offers a delivered message's frame; applies the policy at the cap.
    pub fn offer_data(&self, bytes: Bytes, topic: &TopicName, seq: u64, published_at: Instant) -> Offer {
        if self.is_closing() {
            return Offer::Closed;
        }
        // An empty queue always takes one frame: a frame can be larger than
        // the cap (a native text envelope JSON-escapes its payload, up to six
        // bytes per byte), and refusing it would cut off a subscriber that is
        // not behind at all. The bound is then cap + one largest frame.
        let queued = self.queued_bytes.get();
        if queued > 0 && queued + bytes.len() > self.cap_bytes {
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
        self.push(QueuedFrame { bytes, published_at: Some(published_at) });
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
        self.push(QueuedFrame { bytes, published_at: None });
        true
    }

    /// Begins closing after what is queued: the writer flushes, then sends a
    /// close frame with `code` and `reason`. The first close wins.
    pub fn close(&self, code: u16, reason: &str) {
        let mut closing = self.closing.borrow_mut();
        if closing.is_none() {
            *closing = Some((code, reason.to_string()));
            drop(closing);
            self.wake_writer.notify();
        }
    }

    /// Closes without flushing: queued frames are discarded (slow consumer).
    fn close_now(&self, code: u16, reason: String) {
        self.queue.borrow_mut().clear();
        self.queued_bytes.set(0);
        *self.closing.borrow_mut() = Some((code, reason));
        self.wake_writer.notify();
    }

    /// Whether a close has begun.
    pub fn is_closing(&self) -> bool {
        self.closing.borrow().is_some()
    }

    /// The close code and reason, once closing.
    pub fn close_reason(&self) -> Option<(u16, String)> {
        self.closing.borrow().clone()
    }

    /// Moves frames into `out` (appending their bytes) until `max_bytes` is
    /// reached, and the publish time of each data frame into `latencies`.
    pub fn take_batch(&self, out: &mut Vec<u8>, max_bytes: usize, latencies: &mut Vec<Instant>) {
        let mut queue = self.queue.borrow_mut();
        while let Some(front) = queue.front() {
            if !out.is_empty() && out.len() + front.bytes.len() > max_bytes {
                break;
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

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queue.borrow().is_empty()
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.get()
    }

    /// Messages dropped so far.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total.get()
    }

    /// Takes the missed ranges not yet reported, once the queue has room
    /// for the notices (below half the cap).
    pub fn take_missed_if_room(&self) -> Vec<(TopicName, u64, u64)> {
        if self.queued_bytes.get() > self.cap_bytes / 2 {
            return Vec::new();
        }
        std::mem::take(&mut *self.missed.borrow_mut())
    }

    fn push(&self, frame: QueuedFrame) {
        self.queued_bytes.set(self.queued_bytes.get() + frame.bytes.len());
        self.queue.borrow_mut().push_back(frame);
        self.wake_writer.notify();
    }

    fn record_missed(&self, topic: &TopicName, seq: u64) {
        self.dropped_total.set(self.dropped_total.get() + 1);
        let mut missed = self.missed.borrow_mut();
        match missed.iter_mut().find(|(t, _, _)| t == topic) {
            Some((_, _, to)) if *to + 1 == seq => *to = seq,
            _ => missed.push((topic.clone(), seq, seq)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Bytes {
        Bytes::from(vec![0u8; n])
    }

    #[test]
    fn drop_policy_counts_ranges_and_stays_bounded() {
        let o = Outbound::new(100, SlowConsumerPolicy::Drop);
        let t = TopicName::new("t").unwrap();
        let now = Instant::now();
        let offers: Vec<Offer> = (1..=5).map(|s| o.offer_data(frame(40), &t, s, now)).collect();
        assert_eq!(offers, vec![Offer::Queued, Offer::Queued, Offer::Dropped, Offer::Dropped, Offer::Dropped]);
        assert_eq!(o.queued_bytes(), 80);
        assert!(o.take_missed_if_room().is_empty(), "no notice while the queue is over half full");
        let (mut out, mut lat) = (Vec::new(), Vec::new());
        o.take_batch(&mut out, 1 << 20, &mut lat);
        assert_eq!((out.len(), lat.len()), (80, 2));
        assert_eq!(o.take_missed_if_room(), vec![(t, 3, 5)]);
        assert_eq!(o.dropped_total(), 3);
    }

    #[test]
    fn disconnect_policy_clears_and_closes() {
        let o = Outbound::new(100, SlowConsumerPolicy::Disconnect);
        let t = TopicName::new("t").unwrap();
        let now = Instant::now();
        assert_eq!(o.offer_data(frame(90), &t, 1, now), Offer::Queued);
        assert_eq!(o.offer_data(frame(20), &t, 2, now), Offer::Disconnected);
        assert_eq!(o.offer_data(frame(1), &t, 3, now), Offer::Closed);
        assert_eq!(o.queued_bytes(), 0);
        assert_eq!(o.close_reason().unwrap().0, close_code::SLOW_CONSUMER);
    }

    #[test]
    fn an_empty_queue_takes_one_frame_larger_than_the_cap() {
        let o = Outbound::new(100, SlowConsumerPolicy::Disconnect);
        let t = TopicName::new("t").unwrap();
        let now = Instant::now();
        assert_eq!(o.offer_data(frame(600), &t, 1, now), Offer::Queued);
        assert_eq!(o.offer_data(frame(1), &t, 2, now), Offer::Disconnected);
    }

    #[test]
    fn control_frames_have_a_slack_then_close() {
        let o = Outbound::new(10, SlowConsumerPolicy::Drop);
        assert!(o.offer_control(frame(CONTROL_SLACK_BYTES)));
        assert!(!o.offer_control(frame(100)));
        assert!(o.is_closing());
    }
}
