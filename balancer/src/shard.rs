//! One shard's glommio side: its counters, the shutdown flag, and the handle
//! on its piper, the thread that accepts and pipes the shard's connections
//! ([`crate::pipe`]). Lives on its own executor thread.

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::config::Config;
use crate::membership::View;
use crate::pipe::Piper;
use crate::stats::ShardStats;

/// A shard of the balancer.
#[derive(Debug)]
pub struct Shard {
    /// Index, 0-based. Shard 0 also runs the control plane.
    pub id: usize,
    /// Shared, read-only configuration.
    pub config: Arc<Config>,
    /// This shard's counters (read by shard 0 for `/metrics`).
    pub stats: Arc<ShardStats>,
    /// The thread that accepts and pipes this shard's connections.
    pub piper: Piper,
    /// Set by the signal handler: stop accepting, let connections finish.
    pub shutdown: Arc<AtomicBool>,
}

impl Shard {
    /// A shard whose connections `piper` serves.
    pub fn new(
        id: usize,
        config: Arc<Config>,
        stats: Arc<ShardStats>,
        shutdown: Arc<AtomicBool>,
        piper: Piper,
    ) -> Rc<Shard> {
        Rc::new(Shard { id, config, stats, piper, shutdown })
    }

    /// Whether shutdown has begun.
    pub fn shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    /// Routes new connections by `view` (older ones, late on the channel,
    /// are ignored by the piper).
    pub fn install(&self, view: Arc<View>) {
        self.piper.install(view);
    }
}
