//! FluxNode: the RayFlux engine. A thread-per-core WebSocket pub/sub node
//! on glommio: every topic is owned by one shard, which sequences it and
//! keeps its history; messages cross shards in batches over bounded SPSC
//! channels and are framed once per shard, shared by every subscriber.
//!
//! See `ARCHITECTURE.md` for the design and `docs/PROTOCOL.md` for the wire
//! protocols.
//!
//! # Layout
//!
//! This crate is the node's shell. Its decisions live in `proto` (sans-IO:
//! codecs, topics, history, the sequencer, the broker, send queues,
//! limits); the glommio plumbing it shares with `fluxbalancer` lives in
//! `runtime` (executors, descriptor tables, fd passing, accept loop,
//! signals). Along the publish path, in order:
//!
//! - [`conn`]: one connection: HTTP (`rest`), then a WebSocket session
//!   (`session`) whose frames go to one adapter per protocol
//!   (`raw_session`, `native_session`, `legacy_session`), which hands
//!   publishes and subscribes to the shard; the `writer` task sends what the
//!   direct flush could not.
//! - [`shard`]: the glommio shell around one `proto::broker::Broker`: carries
//!   its actions out (outboxes to peers, direct flushes, awaited answers).
//! - [`server`]: executors, the channel mesh, listeners, graceful shutdown.
//! - [`config`]: flags and TOML merged and validated into `Config`.

pub mod archive;
pub mod config;
pub mod conn;
pub mod durability;
pub mod membership;
pub mod node_link;
pub mod server;
pub mod shard;
pub mod store;
pub mod tiered;
