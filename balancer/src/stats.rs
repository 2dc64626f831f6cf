//! Counters. Each is written by one shard (its own [`ShardStats`]) or by
//! whichever shard pipes to a node ([`NodeStats`]), and read by shard 0 for
//! `/metrics` and the admin API. Atomics with relaxed ordering: counters
//! need no ordering, and they are bumped once per connection or per read,
//! never per byte.

use std::sync::atomic::{AtomicU64, Ordering};

/// Adds to a counter.
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Subtracts from a gauge.
pub fn sub(counter: &AtomicU64, n: u64) {
    counter.fetch_sub(n, Ordering::Relaxed);
}

/// Reads a counter.
pub fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// One shard's counters. Written only by its shard.
#[derive(Debug, Default)]
pub struct ShardStats {
    /// Client connections open on this shard.
    pub connections_current: AtomicU64,
    /// Client connections accepted.
    pub connections_total: AtomicU64,
    /// Refused at the connection limit (503).
    pub connections_rejected: AtomicU64,
    /// Request heads refused: malformed (400) or too large (431).
    pub head_errors: AtomicU64,
    /// Request heads not complete in time (408).
    pub head_timeouts: AtomicU64,
    /// Routed by a topic in the path.
    pub routed_topic: AtomicU64,
    /// Routed by the `key` parameter.
    pub routed_key: AtomicU64,
    /// Routed by client address.
    pub routed_client: AtomicU64,
    /// No node in the table (503).
    pub no_node: AtomicU64,
    /// Every node tried refused or timed out (502).
    pub node_unreachable: AtomicU64,
    /// Connections that went to a node other than the table's first choice
    /// because it refused.
    pub rerouted: AtomicU64,
}

/// One node's counters, shared by every shard that pipes to it.
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Piped connections open to this node.
    pub connections_current: AtomicU64,
    /// Piped connections opened to this node.
    pub connections_total: AtomicU64,
    /// Connect attempts that failed or timed out.
    pub connect_failures: AtomicU64,
    /// Bytes from clients to this node.
    pub bytes_to_node: AtomicU64,
    /// Bytes from this node to clients.
    pub bytes_from_node: AtomicU64,
}

/// Prometheus names, help and type of [`ShardStats`] fields, in order.
pub const SHARD_COUNTERS: [(&str, &str, &str); 11] = [
    ("fluxbalancer_connections_current", "Client connections open.", "gauge"),
    ("fluxbalancer_connections_total", "Client connections accepted.", "counter"),
    ("fluxbalancer_connections_rejected_total", "Connections refused at the connection limit.", "counter"),
    ("fluxbalancer_head_errors_total", "Request heads refused as malformed or too large.", "counter"),
    ("fluxbalancer_head_timeouts_total", "Request heads not received in time.", "counter"),
    ("fluxbalancer_routed_topic_total", "Connections routed by the topic in the path.", "counter"),
    ("fluxbalancer_routed_key_total", "Connections routed by the key parameter.", "counter"),
    ("fluxbalancer_routed_client_total", "Connections routed by client address.", "counter"),
    ("fluxbalancer_no_node_total", "Connections refused because no node was routable.", "counter"),
    ("fluxbalancer_node_unreachable_total", "Connections refused because every node tried failed.", "counter"),
    ("fluxbalancer_rerouted_total", "Connections sent past a node that refused them.", "counter"),
];

impl ShardStats {
    /// Values in [`SHARD_COUNTERS`] order.
    pub fn values(&self) -> [u64; 11] {
        [
            get(&self.connections_current),
            get(&self.connections_total),
            get(&self.connections_rejected),
            get(&self.head_errors),
            get(&self.head_timeouts),
            get(&self.routed_topic),
            get(&self.routed_key),
            get(&self.routed_client),
            get(&self.no_node),
            get(&self.node_unreachable),
            get(&self.rerouted),
        ]
    }
}
