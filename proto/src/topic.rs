//! Topic names: validation and the stable topic-to-shard mapping.
//!
//! A topic name is 1 to 255 bytes of `[A-Za-z0-9._-]`. Names are keys in
//! hash maps and never used as file paths.

use std::sync::Arc;

use crate::http::query_param;
use crate::limits::{TOPICS_PAGE_DEFAULT, TOPICS_PAGE_MAX, TOPIC_NAME_BYTES_MAX};

/// A validated topic name. Cheap to clone (shared string), `Send` so it can
/// cross shards inside batches. Its stable hash is computed once, when the
/// name is validated: the publish path asks for the owner shard several
/// times (the shell to choose what to wait for, the broker to route).
#[derive(Clone, Debug)]
pub struct TopicName {
    /// The name.
    name: Arc<str>,
    /// `hash::fnv1a` of the name.
    placement: u64,
}

/// Equality, order and hashing are the name's alone (`placement` follows
/// from it), so that maps and ordered sets can be read by `&str`
/// (`Borrow<str>`): listings read name ranges.
impl PartialEq for TopicName {
    fn eq(&self, other: &TopicName) -> bool {
        self.name == other.name
    }
}

impl Eq for TopicName {}

impl PartialOrd for TopicName {
    fn partial_cmp(&self, other: &TopicName) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for TopicName {
    fn cmp(&self, other: &TopicName) -> std::cmp::Ordering {
        self.name.cmp(&other.name)
    }
}

impl std::hash::Hash for TopicName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state);
    }
}

impl std::borrow::Borrow<str> for TopicName {
    fn borrow(&self) -> &str {
        &self.name
    }
}

/// Why a topic name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The name is empty.
    #[error("topic name is empty")]
    Empty,
    /// The name is longer than 255 bytes.
    #[error("topic name is longer than {TOPIC_NAME_BYTES_MAX} bytes")]
    TooLong,
    /// The name has a byte outside `[A-Za-z0-9._-]`.
    #[error("topic name may contain only A-Z a-z 0-9 . _ -")]
    BadCharacter,
}

impl TopicName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<TopicName, TopicError> {
        if name.is_empty() {
            return Err(TopicError::Empty);
        }
        if name.len() > TOPIC_NAME_BYTES_MAX {
            return Err(TopicError::TooLong);
        }
        if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
            return Err(TopicError::BadCharacter);
        }
        Ok(TopicName { name: Arc::from(name), placement: crate::hash::fnv1a(name.as_bytes()) })
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The shard that owns this topic among `shards` shards. FNV-1a: stable
    /// across processes, versions and machines (unlike a seeded hasher), so
    /// every node and tool agrees on ownership.
    pub fn owner_shard(&self, shards: usize) -> usize {
        (self.placement % shards as u64) as usize
    }
}

impl std::fmt::Display for TopicName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// Which topics a listing wants: names starting with `prefix`, after
/// `after` in byte order, at most `limit` of them (a page of
/// `GET /v1/topics`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicQuery {
    /// Names start with this ("" for all).
    pub prefix: String,
    /// The cursor: names sort after this one (the last of the previous page).
    pub after: Option<String>,
    /// Most names in the page.
    pub limit: usize,
}

/// Why a listing's query string was refused (HTTP 400 `bad_request`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// `limit` is not a number from 1 to `TOPICS_PAGE_MAX`.
    #[error("limit must be a number from 1 to {}", TOPICS_PAGE_MAX)]
    Limit,
}

impl TopicQuery {
    /// The listing `GET /v1/topics?prefix=P&after=A&limit=N` asks for
    /// (`limit` defaults to `TOPICS_PAGE_DEFAULT`).
    pub fn from_query(query: &str) -> Result<TopicQuery, QueryError> {
        let limit = match query_param(query, "limit") {
            None => TOPICS_PAGE_DEFAULT,
            Some(v) => match v.parse::<usize>() {
                Ok(n) if (1..=TOPICS_PAGE_MAX).contains(&n) => n,
                _ => return Err(QueryError::Limit),
            },
        };
        let prefix = query_param(query, "prefix").unwrap_or("").to_string();
        let after = query_param(query, "after").map(str::to_string);
        Ok(TopicQuery { prefix, after, limit })
    }

    /// Whether `name` belongs to the listing (before the limit).
    pub fn matches(&self, name: &str) -> bool {
        name.starts_with(&self.prefix) && self.after.as_deref().is_none_or(|after| name > after)
    }

    /// The first `limit` of `items` by name: a linear selection, then a sort
    /// of the page only, so a page costs O(topics), not O(topics log topics).
    pub fn first_page<T>(&self, mut items: Vec<T>, name: impl Fn(&T) -> &str) -> Vec<T> {
        if self.limit == 0 {
            return Vec::new();
        }
        if items.len() > self.limit {
            items.select_nth_unstable_by(self.limit - 1, |a, b| name(a).cmp(name(b)));
            items.truncate(self.limit);
        }
        items.sort_unstable_by(|a, b| name(a).cmp(name(b)));
        items
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_charset() {
        assert!(TopicName::new("orders.eu-west_1").is_ok());
        assert!(TopicName::new(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn refuses_everything_else() {
        assert_eq!(TopicName::new(""), Err(TopicError::Empty));
        assert_eq!(TopicName::new(&"a".repeat(256)), Err(TopicError::TooLong));
        for bad in ["a/b", "../etc", "a b", "é", "a\0", "a*", ">"] {
            assert_eq!(TopicName::new(bad), Err(TopicError::BadCharacter), "{bad:?}");
        }
    }

    #[test]
    fn a_query_pages_by_name() {
        let names: Vec<String> = ["b2", "a1", "b1", "c", "b3", "b10"].iter().map(|s| s.to_string()).collect();
        let query = |after: Option<&str>, limit| TopicQuery { prefix: "b".into(), after: after.map(Into::into), limit };
        let page = |q: &TopicQuery| {
            let matching: Vec<String> = names.iter().filter(|n| q.matches(n)).cloned().collect();
            q.first_page(matching, |n| n.as_str())
        };
        assert_eq!(page(&query(None, 2)), ["b1", "b10"]);
        assert_eq!(page(&query(Some("b10"), 2)), ["b2", "b3"]);
        assert_eq!(page(&query(Some("b3"), 2)), Vec::<String>::new());
        assert_eq!(page(&query(None, 0)), Vec::<String>::new());
    }

    #[test]
    fn ownership_is_stable_and_spreads() {
        let t = TopicName::new("chat").unwrap();
        assert_eq!(t.owner_shard(7), t.owner_shard(7));
        // Known value pins the hash so it cannot change silently between versions.
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[TopicName::new(&format!("t{i}")).unwrap().owner_shard(4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
        assert_eq!(t.owner_shard(7), (crate::hash::fnv1a(b"chat") % 7) as usize, "the cached hash is FNV-1a's");
    }

    #[test]
    fn maps_and_sets_of_names_are_read_by_str() {
        let names = ["b", "a", "c"].map(|n| TopicName::new(n).unwrap());
        let map: std::collections::HashMap<TopicName, usize> = names.iter().cloned().zip(0..).collect();
        assert_eq!(map.get("a"), Some(&1));
        let set: std::collections::BTreeSet<TopicName> = names.into_iter().collect();
        let from: std::ops::Bound<&str> = std::ops::Bound::Included("b");
        let range: Vec<&str> = set.range::<str, _>((from, std::ops::Bound::Unbounded)).map(TopicName::as_str).collect();
        assert_eq!(range, ["b", "c"]);
    }
}
