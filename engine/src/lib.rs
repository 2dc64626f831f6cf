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
//! Sans-IO cores (pure, unit-tested, no sockets or clocks of their own):
//! - [`limits`]: every limit, named, with its reason.
//! - [`config`]: flags and TOML merged and validated into `Config`.
//! - [`topic`]: topic names and the topic-to-shard hash.
//! - [`ws`]: WebSocket frames: client decoder, server encoders, close codes.
//! - [`http`]: request heads, routes, responses.
//! - [`native`]: the native protocol's requests, replies and envelopes.
//! - [`history`]: the bounded per-topic ring.
//! - [`owner`]: the sequencer for the topics a shard owns.
//! - [`broker`]: a shard's data-plane decisions (sequence, subscribe,
//!   resume, fan out, answer) as a state machine: inputs and the time in,
//!   actions out.
//! - [`outbound`]: a connection's bounded send queue and slow-consumer policy.
//! - [`proxy_protocol`]: PROXY protocol v2 headers from FluxBalancer.
//! - [`message`], [`metrics`], [`sync`]: shared types, counters, shard-local sync.
//!
//! The shell:
//! - [`shard`]: the glommio shell around a broker: its tasks, the channel
//!   mesh between shards, and what crosses it.
//! - [`conn`]: one connection: HTTP, then a WebSocket session.
//! - [`fdpass`]: moving a socket between shards' descriptor tables.
//! - [`server`]: executors, mesh, listeners, graceful shutdown.
//! - [`runtime`]: the glommio shell shared with `fluxbalancer`: port
//!   reservation, executor start, accept loop, logging, signals.

pub mod broker;
pub mod config;
pub mod conn;
pub mod fdpass;
pub mod history;
pub mod http;
pub mod limits;
pub mod message;
pub mod metrics;
pub mod native;
pub mod outbound;
pub mod owner;
pub mod proxy_protocol;
pub mod runtime;
pub mod server;
pub mod shard;
pub mod sync;
pub mod topic;
pub mod ws;
