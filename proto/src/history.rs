//! Per-topic bounded history: a ring of the most recent messages, bounded by
//! count and by payload bytes. Lives on the topic's owner shard.

use std::collections::VecDeque;

use crate::message::Message;

/// The retained tail of one topic. Sequence numbers in the ring are
/// contiguous, so a read from any sequence is an index computation.
#[derive(Debug)]
pub struct History {
    /// Retained messages, oldest first, contiguous sequence numbers.
    ring: VecDeque<Message>,
    /// Sum of retained payload lengths.
    bytes: usize,
    /// Count bound.
    messages_max: usize,
    /// Byte bound.
    bytes_max: usize,
}

/// An inclusive range of sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqRange {
    /// First sequence in the range.
    pub from_seq: u64,
    /// Last sequence in the range.
    pub to_seq: u64,
}

/// What a read after a given sequence returned.
#[derive(Debug)]
pub struct Replay {
    /// Messages after the requested sequence that are still retained.
    pub messages: Vec<Message>,
    /// First sequence still retained (last_seq + 1 when none is).
    pub first_seq: u64,
    /// Set when messages after the requested sequence were already evicted:
    /// the inclusive range the reader can no longer get.
    pub gap: Option<SeqRange>,
}

impl History {
    /// An empty history with the given bounds (both at least 1).
    pub fn new(messages_max: usize, bytes_max: usize) -> History {
        History { ring: VecDeque::new(), bytes: 0, messages_max, bytes_max }
    }

    /// Appends `message`, whose seq must follow the last one, evicting the
    /// oldest messages until both bounds hold. A message larger than the
    /// byte bound is kept alone, so the latest message is always retained.
    pub fn push(&mut self, message: Message) {
        debug_assert!(self.ring.back().is_none_or(|last| last.seq + 1 == message.seq));
        self.bytes += message.payload.len();
        self.ring.push_back(message);
        while self.ring.len() > 1 && (self.ring.len() > self.messages_max || self.bytes > self.bytes_max) {
            if let Some(old) = self.ring.pop_front() {
                self.bytes -= old.payload.len();
            }
        }
    }

    /// Messages with seq greater than `after`, given the topic's last
    /// assigned sequence `last_seq`.
    pub fn after(&self, after: u64, last_seq: u64) -> Replay {
        let first_seq = self.ring.front().map(|m| m.seq).unwrap_or(last_seq + 1);
        let wanted_from = after.saturating_add(1);
        let gap = (wanted_from < first_seq).then(|| SeqRange { from_seq: wanted_from, to_seq: first_seq - 1 });
        let start = wanted_from.max(first_seq);
        let skip = (start - first_seq) as usize;
        let messages = self.ring.iter().skip(skip).cloned().collect();
        Replay { messages, first_seq, gap }
    }

    /// The first retained message at or after `ms`, when the history
    /// reaches back before `ms` (so nothing at or after `ms` was evicted).
    pub fn first_at_or_after(&self, ms: u64) -> Option<u64> {
        if self.ring.front().is_none_or(|m| m.timestamp_ms >= ms) {
            return None;
        }
        let i = self.ring.partition_point(|m| m.timestamp_ms < ms);
        self.ring.get(i).map(|m| m.seq)
    }

    /// Timestamp of the last retained message, if any.
    pub fn last_timestamp_ms(&self) -> Option<u64> {
        self.ring.back().map(|m| m.timestamp_ms)
    }

    /// First retained sequence, if any.
    pub fn first_seq(&self) -> Option<u64> {
        self.ring.front().map(|m| m.seq)
    }

    /// Retained message count.
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// Whether nothing is retained.
    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    /// Retained payload bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::PayloadKind;
    use bytes::Bytes;
    use std::time::Instant;

    fn msg(seq: u64, len: usize) -> Message {
        Message {
            seq,
            timestamp_ms: 0,
            kind: PayloadKind::Binary,
            payload: Bytes::from(vec![0u8; len]),
            key: None,
            reply_to: None,
            meta: None,
            published_at: Instant::now(),
        }
    }

    #[test]
    fn bounded_by_count_and_bytes() {
        let mut h = History::new(3, 1000);
        for s in 1..=5 {
            h.push(msg(s, 10));
        }
        assert_eq!(h.len(), 3);
        assert_eq!(h.first_seq(), Some(3));
        let mut h = History::new(100, 25);
        for s in 1..=5 {
            h.push(msg(s, 10));
        }
        assert_eq!((h.len(), h.bytes()), (2, 20));
        h.push(msg(6, 500));
        assert_eq!((h.len(), h.first_seq()), (1, Some(6)));
    }

    #[test]
    fn replay_from_any_point() {
        let mut h = History::new(3, 1000);
        let r = h.after(0, 0);
        assert!(r.messages.is_empty() && r.gap.is_none() && r.first_seq == 1);
        for s in 1..=5 {
            h.push(msg(s, 1));
        }
        let seqs = |r: &Replay| r.messages.iter().map(|m| m.seq).collect::<Vec<_>>();
        let r = h.after(3, 5);
        assert_eq!((seqs(&r), r.gap), (vec![4, 5], None));
        let r = h.after(5, 5);
        assert!(r.messages.is_empty() && r.gap.is_none());
        let r = h.after(0, 5);
        assert_eq!((seqs(&r), r.gap, r.first_seq), (vec![3, 4, 5], Some(SeqRange { from_seq: 1, to_seq: 2 }), 3));
        let r = h.after(2, 5);
        assert_eq!((seqs(&r), r.gap), (vec![3, 4, 5], None));
        let r = h.after(99, 5);
        assert!(r.messages.is_empty());
        // msg() stamps every message at 0: nothing is before 1, all is at or after 0.
        assert_eq!(h.first_at_or_after(0), None, "the history does not reach before 0");
        assert_eq!(h.first_at_or_after(1), None);
        assert_eq!(h.last_timestamp_ms(), Some(0));
    }
}
