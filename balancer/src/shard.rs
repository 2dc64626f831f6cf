//! One shard's state: its copy of the current view, its fallback tables,
//! its counters and its scratch buffer. Lives on its own executor thread;
//! only that thread touches it (`RefCell`, no locks). The view arrives from
//! shard 0 over a bounded channel.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::config::Config;
use crate::limits::{FALLBACK_TABLES_MAX, PIPE_CHUNK_BYTES};
use crate::membership::{FallbackTable, View};
use crate::pipe::Piper;
use crate::stats::ShardStats;

/// A fallback table, by view generation and failed node indices.
type CachedFallback = (u64, Vec<usize>, Rc<FallbackTable>);

/// A shard of the balancer.
#[derive(Debug)]
pub struct Shard {
    /// Index, 0-based. Shard 0 also runs the control plane.
    pub id: usize,
    /// Shared, read-only configuration.
    pub config: Arc<Config>,
    /// The view new connections are routed by.
    pub view: RefCell<Arc<View>>,
    /// Tables without failed nodes, keyed by view generation and the failed
    /// node indices (sorted); at most `FALLBACK_TABLES_MAX`.
    fallbacks: RefCell<VecDeque<CachedFallback>>,
    /// This shard's counters (read by shard 0 for `/metrics`).
    pub stats: Arc<ShardStats>,
    /// Where a new connection's head is read into: one buffer per shard,
    /// borrowed only inside one poll.
    pub scratch: RefCell<Box<[u8]>>,
    /// The thread that pipes this shard's established tunnels.
    pub piper: Piper,
    /// Set by the signal handler: stop accepting, let connections finish.
    pub shutdown: Arc<AtomicBool>,
}

impl Shard {
    /// A shard starting with `view`.
    pub fn new(
        id: usize,
        config: Arc<Config>,
        view: Arc<View>,
        stats: Arc<ShardStats>,
        shutdown: Arc<AtomicBool>,
        piper: Piper,
    ) -> Rc<Shard> {
        Rc::new(Shard {
            id,
            config,
            view: RefCell::new(view),
            fallbacks: RefCell::default(),
            stats,
            scratch: RefCell::new(vec![0; PIPE_CHUNK_BYTES].into_boxed_slice()),
            piper,
            shutdown,
        })
    }

    /// Whether shutdown has begun.
    pub fn shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    /// Installs a newer view; older ones (late on the channel) are ignored.
    pub fn install(&self, view: Arc<View>) {
        let mut current = self.view.borrow_mut();
        if view.generation > current.generation {
            tracing::debug!(shard = self.id, generation = view.generation, nodes = view.addrs.len(), "new view");
            *current = view;
            self.fallbacks.borrow_mut().clear();
        }
    }

    /// The view's table with the nodes at `failed` (sorted indices) removed.
    pub fn fallback(&self, view: &View, failed: &[usize]) -> Option<Rc<FallbackTable>> {
        let mut cache = self.fallbacks.borrow_mut();
        if let Some((_, _, table)) = cache.iter().find(|(g, f, _)| *g == view.generation && f == failed) {
            return Some(table.clone());
        }
        let table = Rc::new(view.fallback(failed).ok()?);
        if cache.len() >= FALLBACK_TABLES_MAX {
            cache.pop_front();
        }
        cache.push_back((view.generation, failed.to_vec(), table.clone()));
        Some(table)
    }
}
