//! The cluster at 1,000 nodes, as a model: the sans-IO pieces a topology
//! change and a hand-off run through (`proto::cluster`, `proto::owner`,
//! `proto::link`), measured on this machine at that size, and the link
//! arithmetic of a topic with subscribers on every node. No network and no
//! etcd: their shares are stated as counts (frames, round trips, keys),
//! not timed.
//!
//! `cargo bench -p fluxnode-benches --bench cluster_scale` runs the model
//! at 1,000 nodes and prints a table (`ARCHITECTURE.md` quotes it);
//! `cargo test --all-targets` runs it at 20 nodes as a smoke check.

use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::cluster::{Topology, Views};
use proto::durable::PublishOptions;
use proto::limits::{HISTORY_BYTES_MAX_DEFAULT, HISTORY_MESSAGES_MAX_DEFAULT};
use proto::link::{self, HandOffState, LinkFrame};
use proto::message::{Now, PayloadKind};
use proto::owner::{Owner, OwnerLimits};
use proto::topic::TopicName;

/// Member sets each shard remembers (`proto::cluster::Views`).
const VIEWS_KEPT: usize = 16;

/// A prime ten times the default table: about 655 slots per node at 1,000.
const TABLE_SIZE_LARGE: usize = 655_373;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (nodes, sample) = if full { (1_000, 1_000_000) } else { (20, 10_000) };
    println!("cluster model: {nodes} nodes, {sample} sample topics");
    let members: Vec<String> = (0..nodes).map(address).collect();
    let topics: Vec<TopicName> =
        (0..sample).map(|i| TopicName::new(&format!("orders.{i}")).expect("valid name")).collect();

    // Ownership: the table every node builds from the member set (the
    // default size, and ten times it: Maglev wants many slots per node).
    let mut before = Topology::new(1, &members).expect("valid members");
    for size in [proto::maglev::TABLE_SIZE_DEFAULT, TABLE_SIZE_LARGE] {
        let (table, build) = timed(|| Topology::with_table_size(1, &members, size).expect("valid members"));
        let mut per_node = std::collections::HashMap::new();
        for t in &topics {
            *per_node.entry(table.owner_of(t).unwrap_or_default().to_string()).or_insert(0u64) += 1;
        }
        let mean = sample as f64 / nodes as f64;
        let least = per_node.values().min().copied().unwrap_or(0) as f64;
        let most = per_node.values().max().copied().unwrap_or(0) as f64;
        println!(
            "table of {size} slots: rebuilt in {:.1} ms; topics per node {:.2}x to {:.2}x the mean",
            ms(build),
            least / mean,
            most / mean
        );
        // A node joins, and one leaves: which topics move, between whom.
        let mut joined = members.clone();
        joined.push(address(nodes));
        let after_join = Topology::with_table_size(2, &joined, size).expect("valid members");
        let (moved, astray) = moves(&table, &after_join, &topics, &address(nodes));
        println!(
            "  one node joins: {:.3}% of topics move (ideal 1/(N+1) = {:.3}%), {:.3}% between staying nodes",
            pct(moved, sample),
            100.0 / (nodes + 1) as f64,
            pct(astray, sample)
        );
        let after_leave = Topology::with_table_size(3, &members[1..], size).expect("valid members");
        let (moved, astray) = moves(&table, &after_leave, &topics, &members[0]);
        println!(
            "  one node leaves: {:.3}% of topics move (ideal 1/N = {:.3}%), {:.3}% between staying nodes",
            pct(moved, sample),
            100.0 / nodes as f64,
            pct(astray, sample)
        );
        if size == proto::maglev::TABLE_SIZE_DEFAULT {
            before = table;
        }
    }

    // A shard's views: applying a set, and finding whom to claim from.
    let mut views = Views::new(members[1].clone(), before.clone(), true);
    let mut sets = Vec::new();
    for v in 0..VIEWS_KEPT as u64 {
        let mut m = members.clone();
        m.remove(2 + v as usize % (nodes - 2));
        sets.push(Topology::new(10 + v, &m).expect("valid members"));
    }
    let ((), push) = timed(|| sets.into_iter().for_each(|s| views.push(s)));
    let lookups = topics.len().min(100_000);
    let (_, lookup) = timed(|| {
        let at = views.current().version();
        topics[..lookups].iter().filter(|t| views.run_at(t, at).is_some()).count()
    });
    println!(
        "a shard keeps {VIEWS_KEPT} sets ({:.1} MiB of tables); pushing one: {:.1} us (its table built before); \
         finding whom to claim a topic from: {:.2} us",
        (VIEWS_KEPT * proto::maglev::TABLE_SIZE_DEFAULT * 4) as f64 / (1 << 20) as f64,
        push.as_secs_f64() * 1e6 / VIEWS_KEPT as f64,
        lookup.as_secs_f64() * 1e6 / lookups as f64
    );

    // A hand-off: the giver's state out, the frame both ways, the taker's
    // adoption. Two histories: 1,024 messages of 64 bytes, and 1 MiB.
    for payload in [64usize, HISTORY_BYTES_MAX_DEFAULT / HISTORY_MESSAGES_MAX_DEFAULT] {
        let rounds = if full { 200 } else { 5 };
        let (bytes, per) = hand_off(payload, rounds);
        println!(
            "hand-off of a topic with {HISTORY_MESSAGES_MAX_DEFAULT} retained messages of {payload} B: {:.0} us \
             of CPU (give, encode, decode, adopt), a {:.1} KiB frame; plus one claim round trip",
            per.as_secs_f64() * 1e6,
            bytes as f64 / 1024.0
        );
    }

    // A topic with subscribers on every node: the owner writes one link
    // frame per message to each other node.
    let frame = link::encode(&LinkFrame::Message {
        topic: TopicName::new("orders.7").expect("valid name"),
        message: message(1, 64),
    });
    let ws_header = 2;
    let on_wire = frame.len() + ws_header;
    let rate = 1_000u64;
    let others = (nodes - 1) as u64;
    println!(
        "a 64-byte message on a link: {on_wire} bytes; at {rate} msg/s into a topic followed by every node: \
         the owner writes {} frames/s, {:.1} MB/s; each link {rate} frames/s, {:.1} KB/s",
        rate * others,
        (rate * others * on_wire as u64) as f64 / 1e6,
        (rate * on_wire as u64) as f64 / 1e3
    );
    println!(
        "etcd per membership change: 1 key written (put or delete), {nodes} watch events; steady: {:.0} lease \
         renewals/s (each node every {} ms)",
        nodes as f64 * 1_000.0 / proto::etcd::KEEPALIVE_EVERY_MS as f64,
        proto::etcd::KEEPALIVE_EVERY_MS
    );
}

/// Member `i`'s address.
fn address(i: usize) -> String {
    format!("10.{}.{}.{}:8080", i / 65_536, (i / 256) % 256, i % 256)
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn pct(n: usize, of: usize) -> f64 {
    100.0 * n as f64 / of as f64
}

/// Topics whose owner differs between `a` and `b`, and those of them whose
/// old and new owners both differ from `changed` (moved between nodes that
/// stayed: Maglev's disruption beyond the minimum).
fn moves(a: &Topology, b: &Topology, topics: &[TopicName], changed: &str) -> (usize, usize) {
    let mut moved = 0;
    let mut astray = 0;
    for t in topics {
        let (from, to) = (a.owner_of(t), b.owner_of(t));
        if from != to {
            moved += 1;
            if from != Some(changed) && to != Some(changed) {
                astray += 1;
            }
        }
    }
    (moved, astray)
}

fn message(seq: u64, payload: usize) -> proto::message::Message {
    proto::message::Message {
        seq,
        timestamp_ms: 1_700_000_000_000 + seq,
        kind: PayloadKind::Binary,
        payload: Bytes::from(vec![7u8; payload]),
        key: None,
        reply_to: None,
        meta: None,
        published_at: Instant::now(),
    }
}

/// The CPU of one topic's hand-off with a full history of `payload`-byte
/// messages, averaged over `rounds`, and its frame's size.
fn hand_off(payload: usize, rounds: u32) -> (usize, Duration) {
    let limits = OwnerLimits {
        topics_max: 16,
        history_messages_max: HISTORY_MESSAGES_MAX_DEFAULT,
        history_bytes_max: HISTORY_BYTES_MAX_DEFAULT,
        client_pins_max: 16,
    };
    let topic = TopicName::new("orders.7").expect("valid name");
    let body = Bytes::from(vec![7u8; payload]);
    let mut total = Duration::ZERO;
    let mut bytes = 0;
    for round in 0..rounds {
        let mut giver = Owner::new(limits, 1 + u64::from(round));
        let now = Now::read();
        for _ in 0..HISTORY_MESSAGES_MAX_DEFAULT {
            let published = giver.publish(&topic, PayloadKind::Binary, body.clone(), &PublishOptions::default(), now);
            assert!(published.is_ok(), "a publish within the limits");
        }
        let mut taker = Owner::new(limits, 1_000 + u64::from(round));
        let start = Instant::now();
        let (epoch, last_seq, history) = giver.give_away(&topic).expect("owned");
        let frame = link::encode(&LinkFrame::HandOff {
            topic: topic.clone(),
            state: HandOffState::State {
                epoch,
                last_seq,
                history,
                durable: None,
                schedules: Vec::new(),
                groups: Vec::new(),
            },
        });
        let decoded = link::decode(&Bytes::from(frame.clone()), now.at);
        let Ok(LinkFrame::HandOff { state: HandOffState::State { epoch, last_seq, history, .. }, .. }) = decoded else {
            panic!("the hand-off frame decodes");
        };
        let adopted = taker.adopt(&topic, epoch, last_seq, history, now.at);
        total += start.elapsed();
        assert!(adopted.is_ok() && taker.last_seq(&topic) == Some(last_seq));
        bytes = frame.len();
    }
    (bytes, total / rounds)
}
