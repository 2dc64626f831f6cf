//! The limits of the shell both binaries share, named, with their reasons.

/// Bytes of io_uring registered buffer memory per shard. Neither binary does
/// DMA file IO, and the box's memlock limit is 8 MiB for all shards.
pub const IO_MEMORY_BYTES_PER_SHARD: usize = 256 << 10;
/// How often a shard looks at the process-wide shutdown flag set by the
/// signal thread. Shutdown is rare; 50 ms is prompt and costs nothing.
pub const SHUTDOWN_POLL_MS: u64 = 50;

/// Entries of each io_uring ring (glommio's default is 128). The kernel
/// sizes a ring's cancel hash table from it (clamped to 256 buckets at 4096
/// entries and above), and glommio cancels its preemption timers on every
/// reactor turn: each cancel walks a bucket of the pending socket polls. With
/// 14,000 connections and 128 entries that walk (`io_poll_find`) was 33% of
/// the node's CPU in the 1,000-topic scenario; with 4096, 4%. Costs about
/// 1 MiB of ring memory per shard.
pub const IO_URING_RING_DEPTH: usize = 4096;
