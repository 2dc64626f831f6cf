//! Micro-benchmarks of the per-message and per-delivery hot paths.

use std::rc::Rc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use proto::history::History;
use proto::message::{Message, PayloadKind};
use proto::metrics::{LatencyTally, Metrics};
use proto::outbound::SlowConsumerPolicy;
use proto::outbound::{DirectSink, Frame, Outbound};
use proto::topic::TopicName;
use proto::{http, native, ws};

fn message(seq: u64, len: usize, kind: PayloadKind) -> Message {
    Message {
        seq,
        timestamp_ms: 1_763_800_000_000,
        kind,
        payload: Bytes::from(vec![b'x'; len]),
        key: None,
        reply_to: None,
        meta: None,
        published_at: Instant::now(),
    }
}

fn encoding(c: &mut Criterion) {
    let topic = TopicName::new("bench.topic").expect("valid");
    let mut group = c.benchmark_group("encode");
    for len in [64usize, 4096] {
        group.throughput(Throughput::Bytes(len as u64));
        let m = message(42, len, PayloadKind::Binary);
        group.bench_with_input(BenchmarkId::new("raw_frame", len), &m, |b, m| {
            b.iter(|| ws::encode_data(m.kind, black_box(&m.payload)))
        });
        group.bench_with_input(BenchmarkId::new("native_binary_envelope", len), &m, |b, m| {
            b.iter(|| native::encode_message(&topic, black_box(m)))
        });
        let t = message(42, len, PayloadKind::Text);
        group.bench_with_input(BenchmarkId::new("native_text_envelope", len), &t, |b, m| {
            b.iter(|| native::encode_message(&topic, black_box(m)))
        });
    }
    group.finish();
}

/// A masked client frame, as a browser sends it.
fn client_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut out = vec![0x82];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

fn decoding(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for len in [64usize, 4096] {
        let wire = client_frame(&vec![7u8; len]);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::new("ws_client_frame", len), &wire, |b, wire| {
            let mut decoder = ws::Decoder::new(1 << 20);
            b.iter(|| {
                let mut buf = BytesMut::from(&wire[..]);
                black_box(decoder.decode(&mut buf).expect("valid frame"))
            })
        });
    }
    let publish = br#"{"op":"publish","id":7,"topic":"bench.topic","data":"hello world"}"#;
    group.bench_function("native_publish_request", |b| b.iter(|| native::parse_text(black_box(publish))));
    let head = b"GET /v1/topics/bench.topic/ws?role=sub&from=3 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    group.bench_function("http_upgrade_head", |b| b.iter(|| http::parse_head(black_box(head))));
    group.finish();
}

fn history(c: &mut Criterion) {
    let mut group = c.benchmark_group("history");
    group.bench_function("append_64B_full_ring", |b| {
        let mut h = History::new(1024, 1 << 20);
        let mut seq = 0;
        let payload = Bytes::from(vec![0u8; 64]);
        b.iter(|| {
            seq += 1;
            h.push(Message {
                seq,
                timestamp_ms: 0,
                kind: PayloadKind::Binary,
                payload: payload.clone(),
                key: None,
                reply_to: None,
                meta: None,
                published_at: Instant::now(),
            });
        })
    });
    let mut h = History::new(1024, 1 << 20);
    for seq in 1..=1024 {
        h.push(message(seq, 64, PayloadKind::Binary));
    }
    group.bench_function("replay_last_100_of_1024", |b| b.iter(|| h.after(black_box(924), 1024)));
    group.finish();
}

fn routing(c: &mut Criterion) {
    let topic = TopicName::new("orders.eu-west-1.shipment-events").expect("valid");
    c.bench_function("topic_owner_shard", |b| b.iter(|| black_box(&topic).owner_shard(16)));
    c.bench_function("topic_validate", |b| b.iter(|| TopicName::new(black_box("orders.eu-west-1.shipment-events"))));
}

/// `n` subscriber queues with room for everything a benchmark queues.
fn subscriber_queues(n: usize) -> Vec<Outbound> {
    (0..n).map(|_| Outbound::new(1 << 30, SlowConsumerPolicy::Drop)).collect()
}

/// One shared 64-byte data frame, as fan-out queues it.
fn frame_64() -> Rc<Frame> {
    Frame::data(ws::encode_data(PayloadKind::Binary, &[0u8; 64]), Instant::now())
}

fn fanout_enqueue(c: &mut Criterion) {
    let topic = TopicName::new("bench.topic").expect("valid");
    let mut group = c.benchmark_group("fanout_enqueue");
    for subscribers in [100usize, 1000] {
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_with_input(BenchmarkId::from_parameter(subscribers), &subscribers, |b, &n| {
            let queues = subscriber_queues(n);
            let frame = frame_64();
            let (mut out, mut latencies) = (Vec::new(), Vec::new());
            let mut seq = 0;
            b.iter(|| {
                seq += 1;
                for q in &queues {
                    q.offer_data(&frame, &topic, seq);
                }
                // Drain so queues stay small: one gathered write per queue.
                for q in &queues {
                    out.clear();
                    latencies.clear();
                    q.take_batch(&mut out, 1 << 18, &mut latencies);
                }
            })
        });
    }
    group.finish();
}

/// A socket stand-in for the direct flush: takes every byte, keeps none.
struct NullSink;

impl DirectSink for NullSink {
    fn try_send(&self, data: &[u8]) -> std::io::Result<usize> {
        Ok(black_box(data).len())
    }
}

/// The fan-out path as the node runs it with idle writers: queue one shared
/// frame to every subscriber, then flush each queue directly (gather into
/// the shard's scratch buffer, one send, tally the latencies). The kernel's
/// share of a real send is not in it.
fn fanout_direct_flush(c: &mut Criterion) {
    let topic = TopicName::new("bench.topic").expect("valid");
    let mut group = c.benchmark_group("fanout_direct_flush");
    for subscribers in [100usize, 1000] {
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_with_input(BenchmarkId::from_parameter(subscribers), &subscribers, |b, &n| {
            let queues = subscriber_queues(n);
            let sink: Rc<dyn DirectSink> = Rc::new(NullSink);
            for q in &queues {
                q.start_direct(sink.clone());
            }
            let frame = frame_64();
            let metrics = Metrics::default();
            let mut tally = LatencyTally::default();
            let (mut scratch, mut latencies) = (Vec::new(), Vec::new());
            let mut seq = 0;
            b.iter(|| {
                seq += 1;
                for q in &queues {
                    q.offer_data(&frame, &topic, seq);
                }
                for q in &queues {
                    scratch.clear();
                    latencies.clear();
                    if let Some(s) = q.take_direct(&mut scratch, 1 << 18, &mut latencies) {
                        q.sent_direct(&scratch, s.try_send(&scratch));
                        tally.add(&latencies);
                    }
                }
                tally.finish(&metrics, Instant::now());
            })
        });
    }
    group.finish();
}

criterion_group!(benches, encoding, decoding, history, routing, fanout_enqueue, fanout_direct_flush);
criterion_main!(benches);
