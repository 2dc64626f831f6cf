//! Every bound the balancer enforces, with the reason for its value. Knobs a
//! operator may change live in [`crate::config`]; these are fixed.

/// Bytes read from one socket per wake-up while piping, into the shard's
/// scratch buffer. Also the most a direction holds in its own buffer when
/// the far side is full (it reads nothing more until that is written), so a
/// connection holds at most two of these, and none while idle.
pub const PIPE_CHUNK_BYTES: usize = 32 << 10;

/// Connections waiting to be accepted per shard listener (the kernel caps
/// it at `net.core.somaxconn`); as glommio's listeners had.
pub const LISTEN_BACKLOG: i32 = 1024;

/// Wait before accepting again after `accept` failed (out of descriptors
/// or memory): long enough not to spin, short next to a client's patience.
pub const ACCEPT_RETRY_MS: u64 = 10;

/// Socket events one piper takes from one `epoll_wait`. More ready sockets
/// wait for the next call; a bigger batch only grows the event array.
pub const PIPE_EVENTS_PER_WAIT: usize = 1024;

/// How often a piper adds its tunnels' byte counts to the nodes' shared
/// counters (so `/metrics` byte counts lag by at most this): once per read
/// was a shared atomic per read, contended by every shard.
pub const PIPE_STATS_FLUSH_MS: u64 = 1_000;

/// Largest admin API request body: a node address in a small JSON object.
pub const ADMIN_BODY_BYTES_MAX: usize = 4 << 10;

/// Time allowed for one admin API request, head and body.
pub const ADMIN_REQUEST_TIMEOUT_MS: u64 = 5_000;

/// Most bytes of a node's `/readyz` answer read by a health check: the
/// status line is all it needs.
pub const HEALTH_RESPONSE_BYTES_MAX: usize = 1 << 10;

/// Nodes tried for one connection when the chosen one refuses it: the
/// chosen node, then the nodes the table would pick with the failed ones
/// removed. Bounds the time a client waits when several nodes are down.
pub const CONNECT_ATTEMPTS_MAX: usize = 3;

/// Fallback tables (the table minus failed nodes) each shard keeps, so that
/// a dead node that still sits in the table costs one build, not one per
/// connection.
pub const FALLBACK_TABLES_MAX: usize = 8;

/// Table updates in flight from the control shard to each other shard.
/// Updates are rare (membership or health changes); a full channel makes the
/// control shard wait, never drop one.
pub const VIEW_CHANNEL_CAPACITY: usize = 4;

/// Most addresses one DNS answer may add: one table holds at most
/// `maglev::NODES_MAX` nodes.
pub const DNS_ADDRESSES_MAX: usize = crate::maglev::NODES_MAX;

const _: () = assert!(CONNECT_ATTEMPTS_MAX >= 1);
