//! FluxBalancer: the thin L4 balancer that keeps a topic's clients on the
//! node that owns it. It reads only a new connection's HTTP request head,
//! picks a node with a Maglev table over the healthy nodes, and then pipes
//! bytes. One epoll thread per core for the data plane; glommio, like the
//! engine, for the control plane.
//!
//! # Layout
//! Sans-IO cores:
//! - [`maglev`]: the Maglev lookup table (NSDI 2016).
//! - [`route`]: the routing key of a new connection, from its request head.
//! - [`membership`]: the node set, health thresholds, draining, and the
//!   immutable views shards route by.
//! - [`health`]: the health-check request and verdict.
//! - [`admin`]: the admin API and `/metrics`.
//!
//! The shell:
//! - [`config`]: flags and TOML, validated once.
//! - [`limits`]: fixed bounds and why.
//! - [`stats`]: the counters.
//! - [`shard`]: per-shard state.
//! - [`pipe`]: each shard's piper thread, the data plane: accept, head,
//!   connect, then a [`tunnel`] per connection.
//! - [`tunnel`]: copying bytes between a client and its node.
//! - [`control`]: shard 0's health checks, DNS and admin server.
//! - [`server`]: executors, channels, listeners, shutdown.

pub mod admin;
pub mod config;
pub mod control;
pub mod health;
pub mod limits;
pub use proto::maglev;
pub mod membership;
pub mod pipe;
pub mod route;
pub mod server;
pub mod shard;
pub mod stats;
pub mod tunnel;
