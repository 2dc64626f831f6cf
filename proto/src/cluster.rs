//! A cluster's topology, sans-IO: the member set the nodes agree on (from a
//! coordination service: etcd's member keys under leases, a Kubernetes
//! headless Service, or a static list), its version (etcd's revision of
//! that set; a static list's is 1), and the topic ownership derived from
//! it with the same Maglev table the balancer routes by
//! ([`crate::maglev`]), so a client the balancer steers by topic lands on
//! the topic's owner.
//!
//! Two nodes holding the same version hold the same member set and so the
//! same owner for every topic: ownership needs no agreement beyond the
//! set's. A node acts as a topic's owner only under the version it was
//! granted ownership in; a hand-off between versions is fenced by it (the
//! old owner stops sequencing before the new one starts from the number
//! the old one reached). This module answers "who owns it under version
//! v" and "what moves from v to w"; the node's shell and the hand-off
//! state machine act on the answers.

use crate::maglev::{MaglevError, Table, TABLE_SIZE_DEFAULT};
use crate::topic::TopicName;

/// One version of the member set, with its ownership table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    version: u64,
    table: Table,
    /// Its table's slots (every member of a cluster, and its balancer,
    /// must use the same).
    table_size: usize,
}

/// A topic whose owner changes between two topologies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    /// The topic.
    pub topic: TopicName,
    /// Its owner before (`None`: there was no member).
    pub from: Option<String>,
    /// Its owner after (`None`: no member is left).
    pub to: Option<String>,
}

impl Topology {
    /// The topology of `members` (node addresses, `host:port`) at
    /// `version`.
    pub fn new<S: AsRef<str>>(version: u64, members: &[S]) -> Result<Topology, MaglevError> {
        Topology::with_table_size(version, members, TABLE_SIZE_DEFAULT)
    }

    /// As [`Topology::new`], with a table of `table_size` slots (a prime).
    pub fn with_table_size<S: AsRef<str>>(
        version: u64,
        members: &[S],
        table_size: usize,
    ) -> Result<Topology, MaglevError> {
        Ok(Topology { version, table: Table::build(members, table_size)?, table_size })
    }

    /// Its table's size in slots.
    pub fn table_size(&self) -> usize {
        self.table_size
    }

    /// Its version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Its members, sorted.
    pub fn members(&self) -> &[String] {
        self.table.nodes()
    }

    /// The node that owns `topic` (`None` when there is no member). The
    /// same key the balancer hashes for a topic named in a path.
    pub fn owner_of(&self, topic: &TopicName) -> Option<&str> {
        self.table.lookup(topic.as_str().as_bytes())
    }

    /// Whether `node` owns `topic`.
    pub fn owns(&self, node: &str, topic: &TopicName) -> bool {
        self.owner_of(topic) == Some(node)
    }

    /// The topics of `topics` whose owner differs in `next`: what a
    /// topology change hands off.
    pub fn moves<'a>(&self, next: &Topology, topics: impl IntoIterator<Item = &'a TopicName>) -> Vec<Move> {
        topics
            .into_iter()
            .filter_map(|topic| {
                let (from, to) = (self.owner_of(topic), next.owner_of(topic));
                (from != to).then(|| Move {
                    topic: topic.clone(),
                    from: from.map(str::to_string),
                    to: to.map(str::to_string),
                })
            })
            .collect()
    }
}

/// Earlier member sets a node remembers, besides its current one: how far
/// back a topic's hand-off can be traced (a topic untouched across more
/// changes than this is taken over as new). Each set holds a Maglev table
/// (256 KiB at the default size): 4 MiB per shard.
pub const VIEW_HISTORY_MAX: usize = 16;

/// A node's run of ownership of a topic: consecutive member sets (views)
/// under which it owned the topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// The version of the run's first view.
    pub start: u64,
    /// Who owned the topic in the view just before the run, and that
    /// view's version: whom to claim the topic from. `None` when the run
    /// reaches back past the remembered views.
    pub before: Option<(String, u64)>,
}

/// The member sets one node has applied, newest last: its current view
/// and up to [`VIEW_HISTORY_MAX`] earlier ones. Every node applies every
/// set in order (etcd's revisions), so two nodes' views agree wherever
/// both remember them; a topic's owners over time form one chain that any
/// node can trace back.
#[derive(Debug)]
pub struct Views {
    me: String,
    /// Oldest first; the last is the current view.
    views: std::collections::VecDeque<Topology>,
}

impl Views {
    /// Node `me`'s views, starting at `current`. A node that joins a
    /// changing cluster starts from the set without itself, one version
    /// earlier (what the others held before it joined): it claims its
    /// topics from their owners so far.
    pub fn new(me: String, current: Topology, joined: bool) -> Views {
        let mut views = std::collections::VecDeque::new();
        if joined {
            let others: Vec<&String> = current.members().iter().filter(|m| **m != me).collect();
            let version = current.version().saturating_sub(1);
            if let Ok(before) = Topology::with_table_size(version, &others, current.table_size()) {
                if !before.members().is_empty() {
                    views.push_back(before);
                }
            }
        }
        views.push_back(current);
        Views { me, views }
    }

    /// This node's address.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The current view.
    pub fn current(&self) -> &Topology {
        self.views.back().expect("a current view is always held")
    }

    /// The oldest remembered view's version.
    pub fn oldest_version(&self) -> u64 {
        self.views.front().map_or(0, Topology::version)
    }

    /// A new current view; the oldest is forgotten past the bound.
    pub fn push(&mut self, next: Topology) {
        self.views.push_back(next);
        while self.views.len() > VIEW_HISTORY_MAX + 1 {
            self.views.pop_front();
        }
    }

    /// Whether this node owns `topic` in the current view.
    pub fn mine(&self, topic: &TopicName) -> bool {
        self.current().owns(&self.me, topic)
    }

    /// This node's run of `topic` that includes the view in force at
    /// version `at` (the newest view no newer than `at`); `None` when this
    /// node did not own the topic then, or no view that old is remembered.
    pub fn run_at(&self, topic: &TopicName, at: u64) -> Option<Run> {
        self.run_by(&self.me, topic, at)
    }

    /// The view in force at version `at` (the newest no newer), if
    /// remembered.
    pub fn at(&self, at: u64) -> Option<&Topology> {
        self.views.iter().rev().find(|v| v.version() <= at)
    }

    /// `node`'s run of `topic` that includes the view in force at version
    /// `at`, as this node remembers the views (see [`Views::run_at`]).
    pub fn run_by(&self, node: &str, topic: &TopicName, at: u64) -> Option<Run> {
        let mut older = self.views.iter().rev().skip_while(|v| v.version() > at).peekable();
        older.peek().filter(|v| v.owns(node, topic))?;
        let mut start = at;
        for view in older {
            match view.owner_of(topic) {
                Some(owner) if owner == node => start = view.version(),
                Some(owner) => return Some(Run { start, before: Some((owner.to_string(), view.version())) }),
                None => return Some(Run { start, before: None }),
            }
        }
        Some(Run { start, before: None })
    }

    /// The version of the first remembered view after this node's latest
    /// run of `topic` ended (the current version if it owns it now, or
    /// never did).
    pub fn latest_run_end(&self, topic: &TopicName) -> u64 {
        let mut end = self.current().version();
        let mut newer: Option<u64> = None;
        for view in self.views.iter().rev() {
            if view.owns(&self.me, topic) {
                if let Some(v) = newer {
                    end = v;
                }
                break;
            }
            newer = Some(view.version());
        }
        end
    }

    /// This node's latest run of `topic` (the current one if it owns it).
    pub fn latest_run(&self, topic: &TopicName) -> Option<Run> {
        let at = self.views.iter().rev().find(|v| v.owns(&self.me, topic))?.version();
        self.run_at(topic, at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (the simulation's, inlined: no
    /// dependency for a test).
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((self.0 >> 33) % n as u64) as usize
        }
    }

    fn topics(n: usize) -> Vec<TopicName> {
        (0..n).map(|i| TopicName::new(&format!("orders.{i}")).expect("valid")).collect()
    }

    fn node(i: usize) -> String {
        format!("10.0.{}.{}:8080", i / 250, i % 250 + 1)
    }

    #[test]
    fn the_same_member_set_gives_the_same_owner_in_any_order() {
        let a = Topology::new(7, &["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]).unwrap();
        let b = Topology::new(7, &["10.0.0.3:8080", "10.0.0.1:8080", "10.0.0.2:8080"]).unwrap();
        let ts = topics(1_000);
        for t in &ts {
            assert_eq!(a.owner_of(t), b.owner_of(t));
            assert!(a.owner_of(t).is_some());
        }
        // The balancer's table over the same names routes a topic path there.
        let routed = Table::build(&["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"], TABLE_SIZE_DEFAULT).unwrap();
        assert!(ts.iter().all(|t| routed.lookup(t.as_str().as_bytes()) == a.owner_of(t)));
        assert!(a.moves(&b, &ts).is_empty());
        let empty = Topology::new::<&str>(1, &[]).unwrap();
        assert_eq!(empty.owner_of(&ts[0]), None);
        assert_eq!(empty.moves(&a, &ts).len(), ts.len(), "from no member: everything gets an owner");
    }

    /// Seeded walk of topology changes (a node added or removed, 3 to 40
    /// nodes, 4,000 topics, a 5,003-slot table): after each, every topic
    /// has exactly one owner, a member; on an addition the new node takes
    /// under 2/n of the topics, on a removal every topic of the removed
    /// node moves; and few topics move between staying nodes (Maglev's
    /// disruption is small, not zero: at most 73 of 4,000, 1.8%, when this
    /// was written; the bound is 4%). Each of those is a hand-off too.
    #[test]
    fn topology_changes_move_what_they_touch_and_little_else() {
        let ts = topics(4_000);
        let mut rng = Rng(42);
        let mut members: Vec<String> = (0..3).map(node).collect();
        let mut next_node = 3;
        let mut current = Topology::with_table_size(1, &members, 5_003).unwrap();
        for version in 2..60 {
            let grow = members.len() < 3 || (members.len() < 40 && rng.below(2) == 0);
            let mut next_members = members.clone();
            let (added, removed) = if grow {
                next_members.push(node(next_node));
                next_node += 1;
                (next_members.last().cloned(), None)
            } else {
                let gone = next_members.swap_remove(rng.below(next_members.len()));
                (None, Some(gone))
            };
            let next = Topology::with_table_size(version, &next_members, 5_003).unwrap();
            for t in &ts {
                let owner = next.owner_of(t).expect("an owner");
                assert!(next_members.iter().any(|m| m == owner), "version {version}: {owner} is no member");
            }
            let moves = current.moves(&next, &ts);
            let n = next_members.len();
            if let Some(new) = &added {
                // Maglev's disruption is small, not zero: a few slots
                // change hands between staying nodes too.
                let to_new = moves.iter().filter(|m| m.to.as_deref() == Some(new)).count();
                let others = moves.len() - to_new;
                let share = to_new as f64 / ts.len() as f64;
                assert!(share < 2.0 / n as f64, "version {version}: {share:.3} of topics moved to the new node of {n}");
                assert!(others * 25 <= ts.len(), "version {version}: {others} topics moved between staying nodes");
            }
            if let Some(gone) = &removed {
                let theirs = ts.iter().filter(|t| current.owner_of(t) == Some(gone)).count();
                let of_gone = moves.iter().filter(|m| m.from.as_deref() == Some(gone)).count();
                assert_eq!(of_gone, theirs, "version {version}: every topic of the removed node moves");
                let others = moves.len() - of_gone;
                assert!(others * 25 <= ts.len(), "version {version}: {others} topics of staying nodes moved");
            }
            members = next_members;
            current = next;
        }
    }

    /// The owner of `topic` in a 1-member set is that member: views of
    /// single members make a topic's chain of owners explicit.
    fn alone(version: u64, member: &str) -> Topology {
        Topology::new(version, &[member]).expect("one member")
    }

    #[test]
    fn a_run_names_the_owner_before_it() {
        let t = TopicName::new("orders").expect("valid");
        let mut views = Views::new("b".into(), alone(3, "a"), false);
        views.push(alone(5, "b"));
        views.push(alone(6, "b"));
        views.push(alone(9, "c"));
        views.push(alone(12, "b"));
        // The current run (12) came after c's.
        assert_eq!(views.run_at(&t, 12), Some(Run { start: 12, before: Some(("c".into(), 9)) }));
        assert_eq!(views.latest_run(&t), views.run_at(&t, 12));
        // The run in force at 7 (views 5 and 6) came after a's.
        assert_eq!(views.run_at(&t, 7), Some(Run { start: 5, before: Some(("a".into(), 3)) }));
        // Not b's at 9 or at 3; nothing remembered before 3.
        assert_eq!(views.run_at(&t, 10), None);
        assert_eq!(views.run_at(&t, 3), None);
        assert_eq!(views.run_at(&t, 2), None);
        assert!(views.mine(&t));
    }

    #[test]
    fn a_run_older_than_the_remembered_views_has_no_owner_before_it() {
        let t = TopicName::new("orders").expect("valid");
        let mut views = Views::new("b".into(), alone(1, "b"), false);
        for v in 2..40 {
            views.push(alone(v, "b"));
        }
        assert_eq!(views.oldest_version(), 40 - VIEW_HISTORY_MAX as u64 - 1);
        assert_eq!(views.run_at(&t, 39), Some(Run { start: views.oldest_version(), before: None }));
    }

    #[test]
    fn a_joining_node_starts_from_the_set_without_itself() {
        let t = TopicName::new("orders").expect("valid");
        let views = Views::new("b".into(), alone(7, "b"), true);
        // The set without b is empty: nothing before.
        assert_eq!(views.run_at(&t, 7), Some(Run { start: 7, before: None }));
        let both = Topology::new(7, &["a", "b"]).expect("two");
        let views = Views::new("b".into(), both.clone(), true);
        if both.owns("b", &t) {
            assert_eq!(views.run_at(&t, 7), Some(Run { start: 7, before: Some(("a".into(), 6)) }));
        } else {
            assert_eq!(views.run_at(&t, 7), None);
        }
    }
}
