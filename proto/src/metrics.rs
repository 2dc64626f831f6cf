//! Counters and the publish-to-write latency histogram. Each shard keeps its
//! own (`Cell`s, no atomics on the data path); `/metrics` gathers snapshots
//! from every shard over the shard channels and renders Prometheus text.

use std::cell::{Cell, RefCell};
use std::fmt::Write;
use std::time::Instant;

use hdrhistogram::Histogram;

use crate::owner::TopicStat;

/// Highest latency the histogram tracks, microseconds (one minute).
const LATENCY_US_MAX: u64 = 60_000_000;

/// One shard's counters. Lives on its shard; only that shard writes it.
#[derive(Debug)]
pub struct Metrics {
    /// Open client connections (HTTP and WebSocket).
    pub connections_current: Cell<u64>,
    /// Connections accepted since start.
    pub connections_total: Cell<u64>,
    /// Connections refused at the connection limit.
    pub connections_rejected: Cell<u64>,
    /// Topic sockets handed to the topic's owner shard.
    pub connections_handed_off: Cell<u64>,
    /// Active subscriptions on this shard.
    pub subscriptions_current: Cell<u64>,
    /// Messages sequenced by this shard (as owner).
    pub messages_published: Cell<u64>,
    /// Payload bytes sequenced by this shard.
    pub bytes_published: Cell<u64>,
    /// Message frames written to subscriber sockets.
    pub messages_delivered: Cell<u64>,
    /// Bytes written to client sockets.
    pub bytes_written: Cell<u64>,
    /// Messages skipped under the `drop` policy.
    pub messages_dropped: Cell<u64>,
    /// Connections closed as slow consumers.
    pub slow_consumer_disconnects: Cell<u64>,
    /// Connections closed for protocol errors or bad input.
    pub protocol_errors: Cell<u64>,
    /// Idle topics this shard evicted to make room (copied from its owner
    /// when a snapshot is taken).
    pub topics_evicted: Cell<u64>,
    /// Bytes of sealed segments waiting for or in upload.
    pub upload_backlog_bytes: Cell<u64>,
    /// Bytes of segments uploaded to the object store.
    pub uploaded_bytes: Cell<u64>,
    /// Archived segments fetched back from the object store (tiered reads).
    pub segments_fetched: Cell<u64>,
    /// Bytes of those.
    pub fetched_bytes: Cell<u64>,
    /// Consumer-group messages sent to a dead-letter topic.
    pub dead_letters: Cell<u64>,
    /// Publishes forwarded to the node that owns their topic.
    pub messages_forwarded: Cell<u64>,
    /// Messages received from the node that owns their topic, for this
    /// node's subscribers.
    pub messages_followed: Cell<u64>,
    /// Node links (to other nodes' topics) connected since start.
    pub links_connected: Cell<u64>,
    /// Node links lost (closed, refused, or over their queue bound).
    pub links_lost: Cell<u64>,
    /// Bytes queued on this shard's node links, not yet written.
    pub link_queue_bytes: Cell<u64>,
    /// The cluster topology's version this node acts on.
    pub topology_version: Cell<u64>,
    /// Topic states (numbers, history, a durable log, schedules, groups)
    /// handed to the next owner node.
    pub topics_handed_over: Cell<u64>,
    /// Topic states taken over from the previous owner node.
    pub topics_taken_over: Cell<u64>,
    /// Hand-offs a claimer's link did not take, held again here.
    pub handoffs_returned: Cell<u64>,
    /// Publish-to-write latency, microseconds.
    pub latency_us: RefCell<Histogram<u64>>,
}

/// A snapshot of one shard, sent across shards for `/metrics` and
/// `/v1/topics`.
#[derive(Debug, Clone)]
pub struct ShardStats {
    /// Shard index.
    pub shard: usize,
    /// Counter values, in the order of [`COUNTERS`].
    pub counters: Vec<u64>,
    /// Latency histogram copy.
    pub latency_us: Histogram<u64>,
    /// How many topics this shard owns.
    pub owned_topics_count: usize,
    /// The owned topics a listing asked for (none for `/metrics`).
    pub owned_topics: Vec<TopicStat>,
    /// Local subscriber count per topic on this shard, for the topics a
    /// listing asked for.
    pub local_subscribers: Vec<(String, u64)>,
}

/// Counter names, help text and type, in snapshot order.
pub const COUNTERS: &[(&str, &str, &str)] = &[
    ("fluxnode_connections", "Open client connections.", "gauge"),
    ("fluxnode_connections_accepted_total", "Connections accepted.", "counter"),
    ("fluxnode_connections_rejected_total", "Connections refused at the connection limit.", "counter"),
    ("fluxnode_connections_handed_off_total", "Topic sockets handed to the shard that owns the topic.", "counter"),
    ("fluxnode_subscriptions", "Active subscriptions.", "gauge"),
    ("fluxnode_messages_published_total", "Messages sequenced.", "counter"),
    ("fluxnode_published_bytes_total", "Payload bytes sequenced.", "counter"),
    ("fluxnode_messages_delivered_total", "Message frames written to subscribers.", "counter"),
    ("fluxnode_written_bytes_total", "Bytes written to client sockets.", "counter"),
    ("fluxnode_messages_dropped_total", "Messages skipped for slow consumers (drop policy).", "counter"),
    ("fluxnode_slow_consumer_disconnects_total", "Connections closed as slow consumers.", "counter"),
    ("fluxnode_protocol_errors_total", "Connections closed for bad input.", "counter"),
    ("fluxnode_topics_evicted_total", "Idle topics evicted to make room for new ones.", "counter"),
    ("fluxnode_upload_backlog_bytes", "Bytes of sealed segments waiting for or in upload.", "gauge"),
    ("fluxnode_uploaded_bytes_total", "Bytes of segments uploaded to the object store.", "counter"),
    ("fluxnode_segments_fetched_total", "Archived segments fetched back from the object store.", "counter"),
    ("fluxnode_fetched_bytes_total", "Bytes of archived segments fetched back.", "counter"),
    ("fluxnode_dead_letters_total", "Consumer-group messages sent to a dead-letter topic.", "counter"),
    ("fluxnode_messages_forwarded_total", "Publishes forwarded to the node that owns their topic.", "counter"),
    ("fluxnode_messages_followed_total", "Messages received from the node that owns their topic.", "counter"),
    ("fluxnode_links_connected_total", "Links to other nodes connected.", "counter"),
    ("fluxnode_links_lost_total", "Links to other nodes lost.", "counter"),
    ("fluxnode_link_queue_bytes", "Bytes queued on links to other nodes, not yet written.", "gauge"),
    ("fluxnode_topology_version", "The cluster topology version this node acts on.", "gauge"),
    ("fluxnode_topics_handed_over_total", "Topic states handed to the next owner node.", "counter"),
    ("fluxnode_topics_taken_over_total", "Topic states taken over from the previous owner node.", "counter"),
    ("fluxnode_handoffs_returned_total", "Hand-offs a claimer's link did not take, held again.", "counter"),
];

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            connections_current: Cell::new(0),
            connections_total: Cell::new(0),
            connections_rejected: Cell::new(0),
            connections_handed_off: Cell::new(0),
            subscriptions_current: Cell::new(0),
            messages_published: Cell::new(0),
            bytes_published: Cell::new(0),
            messages_delivered: Cell::new(0),
            bytes_written: Cell::new(0),
            messages_dropped: Cell::new(0),
            slow_consumer_disconnects: Cell::new(0),
            protocol_errors: Cell::new(0),
            topics_evicted: Cell::new(0),
            upload_backlog_bytes: Cell::new(0),
            uploaded_bytes: Cell::new(0),
            segments_fetched: Cell::new(0),
            fetched_bytes: Cell::new(0),
            dead_letters: Cell::new(0),
            messages_forwarded: Cell::new(0),
            messages_followed: Cell::new(0),
            links_connected: Cell::new(0),
            links_lost: Cell::new(0),
            link_queue_bytes: Cell::new(0),
            topology_version: Cell::new(0),
            topics_handed_over: Cell::new(0),
            topics_taken_over: Cell::new(0),
            handoffs_returned: Cell::new(0),
            // 3 significant digits over 1 us..60 s: fixed parameters, cannot fail.
            latency_us: RefCell::new(Histogram::new_with_max(LATENCY_US_MAX, 3).expect("valid histogram bounds")),
        }
    }
}

/// Adds `n` to a counter cell.
pub fn add(cell: &Cell<u64>, n: u64) {
    cell.set(cell.get().wrapping_add(n));
}

/// Subtracts `n` from a gauge cell, saturating at zero.
pub fn sub(cell: &Cell<u64>, n: u64) {
    cell.set(cell.get().saturating_sub(n));
}

/// Publish times per message of one direct flush, counted before they reach
/// the histogram. In one fan-out pass every subscriber of a topic gets the
/// same messages in the same order, so the i-th frame of each connection's
/// batch is nearly always the same message: one compare and one increment
/// per delivery, then one histogram update per message per flush instead of
/// one per delivery.
#[derive(Debug, Default)]
pub struct LatencyTally {
    /// (publish time, count) by position in a connection's batch.
    slots: Vec<(Instant, u64)>,
    /// Entries displaced from a slot by a different message, recorded at
    /// `finish` like the slots.
    spilled: Vec<(Instant, u64)>,
}

/// Positions tallied per flush; frames past it go to `spilled` one by one.
/// At 256 KiB per batch and 64-byte frames a batch holds about 4,000
/// frames; 1,024 slots (16 KiB) cover every batch of a steady fan-out.
const LATENCY_TALLY_SLOTS_MAX: usize = 1024;

impl LatencyTally {
    /// Adds one connection's batch, in the order its frames were written.
    pub fn add(&mut self, published: &[Instant]) {
        for (i, t) in published.iter().enumerate() {
            match self.slots.get_mut(i) {
                Some(slot) if slot.0 == *t => slot.1 += 1,
                Some(slot) => self.spilled.push(std::mem::replace(slot, (*t, 1))),
                None if i < LATENCY_TALLY_SLOTS_MAX => self.slots.push((*t, 1)),
                None => self.spilled.push((*t, 1)),
            }
        }
    }

    /// Records everything tallied as written at `now`, and empties the tally.
    pub fn finish(&mut self, metrics: &Metrics, now: Instant) {
        let mut histogram = metrics.latency_us.borrow_mut();
        for (t, n) in self.slots.drain(..).chain(self.spilled.drain(..)) {
            // Values above the max are clamped rather than lost.
            let us = (now.saturating_duration_since(t).as_micros() as u64).clamp(1, LATENCY_US_MAX);
            let _ = histogram.record_n(us, n);
        }
        // A burst must not keep a large spill buffer for the shard's life.
        if self.spilled.capacity() > LATENCY_TALLY_SLOTS_MAX {
            self.spilled = Vec::new();
        }
    }
}

impl Metrics {
    /// Counter values in [`COUNTERS`] order.
    pub fn counter_values(&self) -> Vec<u64> {
        [
            &self.connections_current,
            &self.connections_total,
            &self.connections_rejected,
            &self.connections_handed_off,
            &self.subscriptions_current,
            &self.messages_published,
            &self.bytes_published,
            &self.messages_delivered,
            &self.bytes_written,
            &self.messages_dropped,
            &self.slow_consumer_disconnects,
            &self.protocol_errors,
            &self.topics_evicted,
            &self.upload_backlog_bytes,
            &self.uploaded_bytes,
            &self.segments_fetched,
            &self.fetched_bytes,
            &self.dead_letters,
            &self.messages_forwarded,
            &self.messages_followed,
            &self.links_connected,
            &self.links_lost,
            &self.link_queue_bytes,
            &self.topology_version,
            &self.topics_handed_over,
            &self.topics_taken_over,
            &self.handoffs_returned,
        ]
        .iter()
        .map(|c| c.get())
        .collect()
    }
}

/// Every shard's delivery latency histogram in one.
fn merged_latency(shards: &[ShardStats]) -> Histogram<u64> {
    let mut merged = Histogram::<u64>::new_with_max(LATENCY_US_MAX, 3).expect("valid histogram bounds");
    for s in shards {
        let _ = merged.add(&s.latency_us);
    }
    merged
}

/// The delivery latency distribution of all shards, merged.
pub fn latency_report(shards: &[ShardStats]) -> crate::admin::LatencyReport {
    let merged = merged_latency(shards);
    let mut total = 0;
    let points = merged
        .iter_quantiles(1)
        .map(|v| {
            total += v.count_since_last_iteration();
            crate::admin::LatencyPoint {
                value_us: merged.highest_equivalent(v.value_iterated_to()),
                quantile: v.quantile_iterated_to(),
                total_count: total,
            }
        })
        .collect();
    crate::admin::LatencyReport { count: merged.len(), points }
}

/// Renders Prometheus text exposition for all shards.
pub fn render_prometheus(shards: &[ShardStats]) -> String {
    let mut out = String::new();
    for (i, (name, help, kind)) in COUNTERS.iter().enumerate() {
        let total: u64 = shards.iter().map(|s| s.counters.get(i).copied().unwrap_or(0)).sum();
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {total}");
    }
    let topics: usize = shards.iter().map(|s| s.owned_topics_count).sum();
    let _ = writeln!(
        out,
        "# HELP fluxnode_topics Topics on this node.\n# TYPE fluxnode_topics gauge\nfluxnode_topics {topics}"
    );
    let merged = merged_latency(shards);
    let name = "fluxnode_delivery_latency_seconds";
    let _ = writeln!(out, "# HELP {name} Publish (sequencing) to socket write latency.\n# TYPE {name} summary");
    for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
        let v = if merged.is_empty() { 0.0 } else { merged.value_at_quantile(q) as f64 / 1e6 };
        let _ = writeln!(out, "{name}{{quantile=\"{q}\"}} {v}");
    }
    let _ = writeln!(out, "{name}_count {}", merged.len());
    let _ = writeln!(out, "{name}_sum {}", merged.mean() * merged.len() as f64 / 1e6);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_sums_across_shards() {
        let a = Metrics::default();
        add(&a.messages_published, 3);
        let mut tally = LatencyTally::default();
        let t0 = Instant::now();
        tally.add(&[t0]);
        tally.finish(&a, t0 + std::time::Duration::from_micros(1500));
        let b = Metrics::default();
        add(&b.messages_published, 4);
        let snap = |m: &Metrics, i| ShardStats {
            shard: i,
            counters: m.counter_values(),
            latency_us: m.latency_us.borrow().clone(),
            owned_topics_count: 0,
            owned_topics: vec![],
            local_subscribers: vec![],
        };
        let text = render_prometheus(&[snap(&a, 0), snap(&b, 1)]);
        assert!(text.contains("fluxnode_messages_published_total 7\n"), "{text}");
        assert!(text.contains("fluxnode_delivery_latency_seconds_count 1\n"), "{text}");
    }

    #[test]
    fn the_tally_records_each_delivery_once() {
        let m = Metrics::default();
        let mut tally = LatencyTally::default();
        let t0 = Instant::now();
        let (a, b, c) = (t0, t0 + std::time::Duration::from_micros(1), t0 + std::time::Duration::from_micros(2));
        tally.add(&[a, b]);
        tally.add(&[a, b]);
        tally.add(&[c]); // a different message in slot 0 spills the first
        tally.add(&[a, b, c]);
        tally.finish(&m, t0 + std::time::Duration::from_millis(5));
        assert_eq!(m.latency_us.borrow().len(), 8);
        assert!(tally.slots.is_empty() && tally.spilled.is_empty());
        let long: Vec<Instant> = (0..LATENCY_TALLY_SLOTS_MAX + 10).map(|_| t0).collect();
        tally.add(&long);
        tally.finish(&m, t0);
        assert_eq!(m.latency_us.borrow().len(), 8 + long.len() as u64);
    }
}
