//! RayFlux's sans-IO core, shared by FluxNode and FluxBalancer: everything
//! here takes bytes, inputs and the time and returns values or actions. No
//! runtime, socket or clock lives here (the shells read the clocks and hand
//! in a `message::Now`), so every module is unit-tested, and the brokers of
//! several shards run together in a seeded simulation
//! (`engine/tests/simulation.rs`).
//!
//! # Layout
//!
//! - [`limits`]: every limit, named, with its reason.
//! - [`admin`]: the JSON bodies of the node's and the balancer's HTTP APIs.
//! - [`topic`]: topic names and their owner shard.
//! - [`hash`]: the stable hashes the node and the balancer agree on.
//! - [`maglev`]: the Maglev table the balancer routes by and a cluster
//!   derives topic ownership from.
//! - [`cluster`]: a cluster's agreed member set, its version, and which
//!   node owns a topic.
//! - [`ws`]: WebSocket frames: client decoder, server encoders, close codes.
//! - [`http`]: request heads, routes, responses.
//! - [`native`]: the native protocol's requests, replies and envelopes.
//! - [`proxy_protocol`]: PROXY protocol v2 headers, both ways.
//! - [`message`]: a sequenced message, epochs, the time as an input.
//! - [`history`]: the bounded per-topic ring.
//! - [`owner`]: the sequencer for the topics a shard owns.
//! - [`log`]: the durable log's record format, torn-tail detection and
//!   sparse index.
//! - [`durable`]: a durable topic's segmented log: appends, aligned write
//!   jobs, rolling, retention, recovery, read plans by sequence, time and key.
//! - [`group`]: one consumer group of a topic (segments, prefetch, acks,
//!   redelivery, dead letters), kept by the topic's owner.
//! - [`request`]: request/reply's answer type and limits.
//! - [`schedule`]: one topic's pending scheduled messages.
//! - [`broker`]: a shard's data-plane decisions (sequence, subscribe,
//!   resume, fan out, answer) as a state machine: inputs and the time in,
//!   actions out.
//! - [`outbound`]: a connection's bounded send queue and slow-consumer policy.
//! - [`metrics`], [`sync`]: counters and histograms; shard-local
//!   runtime-agnostic wake-ups (`Event`, `Slot`).

pub mod admin;
pub mod broker;
pub mod cluster;
pub mod durable;
pub mod etcd;
pub mod group;
pub mod hash;
pub mod history;
pub mod http;
pub mod limits;
pub mod link;
pub mod log;
pub mod maglev;
pub mod message;
pub mod metrics;
pub mod native;
pub mod outbound;
pub mod owner;
pub mod proxy_protocol;
pub mod request;
pub mod schedule;
pub mod sync;
pub mod topic;
pub mod ws;
