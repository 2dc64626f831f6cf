//! The node set and its health (sans-IO). Lives on shard 0, which runs the
//! health checks, DNS and the admin API; every change that alters the set
//! of routable nodes yields a new immutable [`View`] that shard 0 sends to
//! every shard.
//!
//! A node is routable when it is healthy and not draining. Nodes start
//! healthy (as HAProxy's servers do), so a fresh balancer serves at once;
//! `fall` consecutive failed checks take a node out, `rise` passed ones
//! bring it back.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

pub use proto::admin::{Health, MemberInfo, Source};

use crate::maglev::{MaglevError, Table, NODES_MAX};
use crate::stats::NodeStats;

/// Why a membership change was refused; the admin API answers 404 or 409.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// The node is not in the set.
    #[error("node {0} is not a member")]
    NotFound(SocketAddr),
    /// The node is already in the set.
    #[error("node {0} is already a member")]
    Exists(SocketAddr),
    /// The set is full.
    #[error("at most {NODES_MAX} nodes")]
    Full,
}

/// A node's state. Owned by [`Membership`] on shard 0.
#[derive(Debug)]
struct Member {
    /// Where it came from.
    source: Source,
    /// Current verdict.
    health: Health,
    /// Consecutive results that disagree with `health`.
    streak: u32,
    /// Set by the admin API: no new connections.
    draining: bool,
    /// Counters, shared with every shard through the views.
    stats: Arc<NodeStats>,
}

/// The routable nodes and their table, immutable; one per change, shared by
/// every shard (`Arc`), read without locks.
#[derive(Debug)]
pub struct View {
    /// Increases by one per view.
    pub generation: u64,
    /// The Maglev table over `addrs`.
    pub table: Table,
    /// Node addresses in `table.nodes()` order.
    pub addrs: Vec<SocketAddr>,
    /// Node counters in `table.nodes()` order.
    pub stats: Vec<Arc<NodeStats>>,
    /// Table size, for fallback tables.
    pub table_size: usize,
}

impl View {
    /// The table built without the nodes at `excluded` (indices into
    /// `addrs`): what the table will be once health checks take those nodes
    /// out, so a connection sent there now meets the same topic's later
    /// connections. Returns node indices into this view.
    pub fn fallback(&self, excluded: &[usize]) -> Result<FallbackTable, MaglevError> {
        let keep: Vec<usize> = (0..self.addrs.len()).filter(|i| !excluded.contains(i)).collect();
        let names: Vec<&str> = keep.iter().map(|&i| self.table.nodes()[i].as_str()).collect();
        let table = Table::build(&names, self.table_size)?;
        // Table::build sorts names; `keep` is already in sorted order because
        // it is a subsequence of the sorted `nodes()`.
        Ok(FallbackTable { table, indices: keep })
    }
}

/// A table over a subset of a view's nodes.
#[derive(Debug)]
pub struct FallbackTable {
    /// The table.
    pub table: Table,
    /// For each of its nodes, the index in the view.
    pub indices: Vec<usize>,
}

/// The node set. Lives on shard 0.
#[derive(Debug)]
pub struct Membership {
    /// Every member by address (sorted, so listings are stable).
    members: BTreeMap<SocketAddr, Member>,
    /// Passed checks to come back.
    rise: u32,
    /// Failed checks to leave.
    fall: u32,
    /// Maglev table size.
    table_size: usize,
    /// Generation of the last view built.
    generation: u64,
    /// Routable set of the last view built, to skip rebuilds that change
    /// nothing.
    last_routable: Option<Vec<SocketAddr>>,
    /// Health transitions (up to down and back) since start.
    pub health_transitions: u64,
    /// Views built since start.
    pub table_rebuilds: u64,
}

impl Membership {
    /// An empty set. `rise`, `fall` >= 1 and a prime `table_size` are
    /// checked by the config.
    pub fn new(rise: u32, fall: u32, table_size: usize) -> Membership {
        Membership {
            members: BTreeMap::new(),
            rise,
            fall,
            table_size,
            generation: 0,
            last_routable: None,
            health_transitions: 0,
            table_rebuilds: 0,
        }
    }

    /// Adds a node, healthy.
    pub fn add(&mut self, addr: SocketAddr, source: Source) -> Result<(), MembershipError> {
        if self.members.contains_key(&addr) {
            return Err(MembershipError::Exists(addr));
        }
        if self.members.len() >= NODES_MAX {
            return Err(MembershipError::Full);
        }
        let member = Member { source, health: Health::Up, streak: 0, draining: false, stats: Arc::default() };
        self.members.insert(addr, member);
        Ok(())
    }

    /// Removes a node. Its open connections are not touched.
    pub fn remove(&mut self, addr: SocketAddr) -> Result<(), MembershipError> {
        self.members.remove(&addr).map(|_| ()).ok_or(MembershipError::NotFound(addr))
    }

    /// Starts or stops draining a node.
    pub fn set_draining(&mut self, addr: SocketAddr, draining: bool) -> Result<(), MembershipError> {
        let member = self.members.get_mut(&addr).ok_or(MembershipError::NotFound(addr))?;
        member.draining = draining;
        Ok(())
    }

    /// Replaces the DNS-sourced nodes with `addrs`: new ones join healthy,
    /// missing ones leave. A name already present from another source stays
    /// as it is.
    pub fn replace_dns(&mut self, addrs: &[SocketAddr]) {
        self.members.retain(|addr, m| m.source != Source::Dns || addrs.contains(addr));
        for &addr in addrs {
            if !self.members.contains_key(&addr) && self.add(addr, Source::Dns).is_err() {
                break; // full: the rest are ignored, and the count is visible in the listing
            }
        }
    }

    /// Records one health-check result. Returns the new health when this
    /// result changed it.
    pub fn observe(&mut self, addr: SocketAddr, passed: bool) -> Option<Health> {
        let (rise, fall) = (self.rise, self.fall);
        let member = self.members.get_mut(&addr)?;
        let agrees = matches!((member.health, passed), (Health::Up, true) | (Health::Down, false));
        if agrees {
            member.streak = 0;
            return None;
        }
        member.streak += 1;
        let needed = if passed { rise } else { fall };
        if member.streak < needed {
            return None;
        }
        member.streak = 0;
        member.health = if passed { Health::Up } else { Health::Down };
        self.health_transitions += 1;
        Some(member.health)
    }

    /// Every member's address, for the health checks.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.members.keys().copied().collect()
    }

    /// A new view when the routable set changed since the last one.
    pub fn view_if_changed(&mut self) -> Option<View> {
        let routable: Vec<SocketAddr> = self.routable().map(|(a, _)| a).collect();
        if self.last_routable.as_ref() == Some(&routable) {
            return None;
        }
        let mut pairs: Vec<(String, SocketAddr, Arc<NodeStats>)> =
            self.routable().map(|(a, m)| (a.to_string(), a, m.stats.clone())).collect();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        let names: Vec<&str> = pairs.iter().map(|p| p.0.as_str()).collect();
        // Names are distinct socket addresses, at most NODES_MAX of them, and
        // the table size was validated prime: the build cannot fail.
        let table = Table::build(&names, self.table_size).expect("distinct nodes within NODES_MAX, prime size");
        self.generation += 1;
        self.table_rebuilds += 1;
        self.last_routable = Some(routable);
        Some(View {
            generation: self.generation,
            table,
            addrs: pairs.iter().map(|p| p.1).collect(),
            stats: pairs.into_iter().map(|p| p.2).collect(),
            table_size: self.table_size,
        })
    }

    /// The node a routing key's connections go to now (the same table the
    /// shards route with: built from the routable nodes, sorted by address).
    pub fn locate(&self, key: &[u8]) -> Option<SocketAddr> {
        let mut addrs: Vec<SocketAddr> = self.routable().map(|(a, _)| a).collect();
        addrs.sort_by_key(|a| a.to_string());
        let names: Vec<String> = addrs.iter().map(SocketAddr::to_string).collect();
        let table = Table::build(&names, self.table_size).ok()?;
        table.lookup_index(key).map(|i| addrs[i])
    }

    /// The admin API's listing.
    pub fn list(&self) -> Vec<MemberInfo> {
        use crate::stats::get;
        self.members
            .iter()
            .map(|(&addr, m)| MemberInfo {
                addr,
                source: m.source,
                health: m.health,
                draining: m.draining,
                routable: m.health == Health::Up && !m.draining,
                connections_current: get(&m.stats.connections_current),
                connections_total: get(&m.stats.connections_total),
                connect_failures: get(&m.stats.connect_failures),
                bytes_to_node: get(&m.stats.bytes_to_node),
                bytes_from_node: get(&m.stats.bytes_from_node),
            })
            .collect()
    }

    fn routable(&self) -> impl Iterator<Item = (SocketAddr, &Member)> {
        self.members.iter().filter(|(_, m)| m.health == Health::Up && !m.draining).map(|(a, m)| (*a, m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn rise_and_fall_thresholds() {
        let mut m = Membership::new(2, 3, 101);
        m.add(addr(1), Source::Static).unwrap();
        assert_eq!(m.view_if_changed().unwrap().addrs, vec![addr(1)]);
        assert_eq!(m.observe(addr(1), false), None);
        assert_eq!(m.observe(addr(1), false), None);
        assert_eq!(m.observe(addr(1), true), None, "a pass resets the failure streak");
        assert_eq!(m.observe(addr(1), false), None);
        assert_eq!(m.observe(addr(1), false), None);
        assert_eq!(m.observe(addr(1), false), Some(Health::Down));
        assert!(m.view_if_changed().unwrap().addrs.is_empty());
        assert_eq!(m.observe(addr(1), true), None);
        assert_eq!(m.observe(addr(1), true), Some(Health::Up));
        assert_eq!(m.view_if_changed().unwrap().addrs, vec![addr(1)]);
        assert_eq!(m.health_transitions, 2);
        assert_eq!(m.observe(addr(9), true), None, "unknown nodes are ignored");
    }

    #[test]
    fn drain_remove_and_no_op_rebuilds() {
        let mut m = Membership::new(1, 1, 101);
        for p in 1..=3 {
            m.add(addr(p), Source::Static).unwrap();
        }
        assert_eq!(m.add(addr(1), Source::Admin), Err(MembershipError::Exists(addr(1))));
        let first = m.view_if_changed().unwrap();
        assert_eq!(first.addrs.len(), 3);
        assert!(m.view_if_changed().is_none(), "nothing changed");
        m.set_draining(addr(2), true).unwrap();
        assert_eq!(m.view_if_changed().unwrap().addrs, vec![addr(1), addr(3)]);
        assert!(m.list().iter().any(|i| i.addr == addr(2) && i.draining && !i.routable));
        m.remove(addr(3)).unwrap();
        assert_eq!(m.remove(addr(3)), Err(MembershipError::NotFound(addr(3))));
        let v = m.view_if_changed().unwrap();
        assert_eq!((v.addrs.clone(), v.generation), (vec![addr(1)], 3));
    }

    #[test]
    fn dns_replaces_only_its_own_nodes() {
        let mut m = Membership::new(1, 1, 101);
        m.add(addr(1), Source::Static).unwrap();
        m.replace_dns(&[addr(1), addr(2), addr(3)]);
        assert_eq!(m.addrs(), vec![addr(1), addr(2), addr(3)]);
        m.replace_dns(&[addr(3)]);
        assert_eq!(m.addrs(), vec![addr(1), addr(3)], "static node 1 stays, DNS node 2 leaves");
        m.replace_dns(&[]);
        assert_eq!(m.addrs(), vec![addr(1)]);
    }

    #[test]
    fn fallback_matches_the_table_after_removal() {
        let mut m = Membership::new(1, 1, 1009);
        for p in 1..=5 {
            m.add(addr(p), Source::Static).unwrap();
        }
        let view = m.view_if_changed().unwrap();
        let dead = view.addrs.iter().position(|&a| a == addr(3)).unwrap();
        let fallback = view.fallback(&[dead]).unwrap();
        m.observe(addr(3), false);
        let after = m.view_if_changed().unwrap();
        for key in 0..2000u32 {
            let k = key.to_string();
            let via_fallback = view.addrs[fallback.indices[fallback.table.lookup_index(k.as_bytes()).unwrap()]];
            let via_after = after.addrs[after.table.lookup_index(k.as_bytes()).unwrap()];
            assert_eq!(via_fallback, via_after, "key {k}");
        }
    }
}
