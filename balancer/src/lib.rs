//! FluxBalancer: the thin L4 balancer that keeps a topic's clients on the
//! node that owns it. This first piece is the sans-IO node choice; the proxy,
//! membership, health checks and admin API come with the balancer issue.
//!
//! # Layout
//! - [`maglev`]: the Maglev lookup table (NSDI 2016): build from a node set,
//!   look a routing key up, stable across replicas given the same nodes.
//! - [`route`]: the routing key of a new connection, from its request head.

pub mod maglev;
pub mod route;
