//! The sequencer: topics this shard owns. Sans-IO; the shard shell calls it
//! and routes what it returns.
//!
//! Lives on the topic's owner shard only; nothing else touches it.

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;

use crate::history::History;
use crate::message::{unix_time_ms, Message, PayloadKind};
use crate::topic::TopicName;

/// Why the owner refused a publish or subscribe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OwnerError {
    /// The node holds `topics_max` topics already (client may retry later; 503).
    #[error("too many topics on this node")]
    TooManyTopics,
}

/// What a subscribing shard learns when it registers for a topic.
#[derive(Debug, Clone)]
pub struct Grant {
    /// Last sequence assigned so far (0: none yet).
    pub last_seq: u64,
    /// First sequence still retained (last_seq + 1 when history is empty).
    pub first_seq: u64,
    /// Retained messages after the requested `from_seq`, in order.
    pub replay: Vec<Message>,
    /// Requested messages already evicted (inclusive range), if any.
    pub gap: Option<(u64, u64)>,
}

/// A snapshot of one owned topic for `/v1/topics`.
#[derive(Debug, Clone)]
pub struct TopicStat {
    /// Topic name.
    pub name: TopicName,
    /// Last assigned sequence.
    pub last_seq: u64,
    /// First retained sequence.
    pub first_seq: u64,
    /// Retained messages and bytes.
    pub retained_messages: usize,
    /// Retained payload bytes.
    pub retained_bytes: usize,
    /// Messages per second over the last complete one-second window.
    pub publish_rate_per_sec: u64,
    /// Shards with subscribers, as a bit mask.
    pub subscriber_shards: u64,
}

/// One owned topic.
#[derive(Debug)]
struct OwnedTopic {
    /// Last assigned sequence; the next message gets `last_seq + 1`.
    last_seq: u64,
    /// Retained messages.
    history: History,
    /// Bit i set: shard i has at least one subscriber.
    subscriber_shards: u64,
    /// Start of the current rate window.
    window_start: Instant,
    /// Publishes in the current window.
    window_count: u64,
    /// Publishes in the last complete window.
    last_window_rate: u64,
}

/// All topics owned by one shard.
#[derive(Debug)]
pub struct Owner {
    /// Owned topics by name.
    topics: HashMap<TopicName, OwnedTopic, ahash::RandomState>,
    /// Most topics this shard may own.
    topics_max: usize,
    /// History bounds for new topics.
    history_messages_max: usize,
    /// History bounds for new topics.
    history_bytes_max: usize,
}

impl Owner {
    /// An owner with no topics.
    pub fn new(topics_max: usize, history_messages_max: usize, history_bytes_max: usize) -> Owner {
        Owner { topics: HashMap::default(), topics_max, history_messages_max, history_bytes_max }
    }

    /// Sequences a message: assigns the next sequence and a timestamp, keeps
    /// it in history, and returns it with the mask of subscribing shards.
    pub fn publish(
        &mut self,
        topic: &TopicName,
        kind: PayloadKind,
        payload: Bytes,
        now: Instant,
    ) -> Result<(Message, u64), OwnerError> {
        let t = self.topic_mut(topic, now)?;
        t.last_seq += 1;
        let message = Message { seq: t.last_seq, timestamp_ms: unix_time_ms(), kind, payload, published_at: now };
        t.history.push(message.clone());
        if now.duration_since(t.window_start).as_secs() >= 1 {
            t.last_window_rate = t.window_count;
            t.window_count = 0;
            t.window_start = now;
        }
        t.window_count += 1;
        Ok((message, t.subscriber_shards))
    }

    /// Registers `shard` as subscribing and answers with the topic's
    /// position and, when `from_seq` is given, the retained messages after it.
    pub fn subscribe(
        &mut self,
        topic: &TopicName,
        shard: usize,
        from_seq: Option<u64>,
        now: Instant,
    ) -> Result<Grant, OwnerError> {
        let t = self.topic_mut(topic, now)?;
        t.subscriber_shards |= 1 << shard;
        let last_seq = t.last_seq;
        Ok(match from_seq {
            Some(after) => {
                let replay = t.history.after(after, last_seq);
                Grant { last_seq, first_seq: replay.first_seq, replay: replay.messages, gap: replay.gap }
            }
            None => Grant {
                last_seq,
                first_seq: t.history.first_seq().unwrap_or(last_seq + 1),
                replay: Vec::new(),
                gap: None,
            },
        })
    }

    /// Removes `shard` from the topic's subscribing shards.
    pub fn unsubscribe(&mut self, topic: &TopicName, shard: usize) {
        if let Some(t) = self.topics.get_mut(topic) {
            t.subscriber_shards &= !(1 << shard);
        }
    }

    /// Snapshot of every owned topic.
    pub fn stats(&self) -> Vec<TopicStat> {
        self.topics.iter().map(|(name, t)| stat(name, t)).collect()
    }

    /// Snapshot of one owned topic, if it exists.
    pub fn stat(&self, topic: &TopicName) -> Option<TopicStat> {
        self.topics.get(topic).map(|t| stat(topic, t))
    }

    /// Number of owned topics.
    pub fn len(&self) -> usize {
        self.topics.len()
    }

    /// Whether no topic is owned.
    pub fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }

    fn topic_mut(&mut self, topic: &TopicName, now: Instant) -> Result<&mut OwnedTopic, OwnerError> {
        if !self.topics.contains_key(topic) {
            if self.topics.len() >= self.topics_max {
                return Err(OwnerError::TooManyTopics);
            }
            self.topics.insert(
                topic.clone(),
                OwnedTopic {
                    last_seq: 0,
                    history: History::new(self.history_messages_max, self.history_bytes_max),
                    subscriber_shards: 0,
                    window_start: now,
                    window_count: 0,
                    last_window_rate: 0,
                },
            );
        }
        // Inserted just above when missing.
        Ok(self.topics.get_mut(topic).expect("present"))
    }
}

fn stat(name: &TopicName, t: &OwnedTopic) -> TopicStat {
    TopicStat {
        name: name.clone(),
        last_seq: t.last_seq,
        first_seq: t.history.first_seq().unwrap_or(t.last_seq + 1),
        retained_messages: t.history.len(),
        retained_bytes: t.history.bytes(),
        publish_rate_per_sec: t.last_window_rate,
        subscriber_shards: t.subscriber_shards,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_without_gaps_and_tracks_subscribers() {
        let mut o = Owner::new(2, 10, 1000);
        let t = TopicName::new("a").expect("valid name");
        let now = Instant::now();
        let (m1, mask) = o.publish(&t, PayloadKind::Text, Bytes::from_static(b"x"), now).expect("publish");
        assert_eq!((m1.seq, mask), (1, 0));
        let g = o.subscribe(&t, 3, None, now).expect("publish");
        assert_eq!((g.last_seq, g.first_seq, g.replay.len()), (1, 1, 0));
        let (m2, mask) = o.publish(&t, PayloadKind::Text, Bytes::from_static(b"y"), now).expect("publish");
        assert_eq!((m2.seq, mask), (2, 0b1000));
        let g = o.subscribe(&t, 0, Some(0), now).expect("publish");
        assert_eq!(g.replay.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1, 2]);
        o.unsubscribe(&t, 3);
        assert_eq!(o.stat(&t).expect("topic exists").subscriber_shards, 1);
    }

    #[test]
    fn topic_limit() {
        let mut o = Owner::new(1, 10, 1000);
        let now = Instant::now();
        o.publish(&TopicName::new("a").expect("valid name"), PayloadKind::Text, Bytes::new(), now).expect("publish");
        let err = o.publish(&TopicName::new("b").expect("valid name"), PayloadKind::Text, Bytes::new(), now);
        assert_eq!(err.unwrap_err(), OwnerError::TooManyTopics);
    }
}
