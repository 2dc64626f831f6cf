//! Cluster membership from etcd, sans-IO: the JSON bodies a node sends to
//! etcd's v3 HTTP gateway (`/v3/lease/grant`, `/v3/kv/put`,
//! `/v3/kv/range`, `/v3/watch`, `/v3/lease/keepalive`,
//! `/v3/lease/revoke`) and reads back, and [`Members`], the member set a
//! node follows with its version and whether the node must fence itself.
//!
//! Each node keeps one key under `/rayflux/<cluster>/members/`, its
//! address, attached to a lease of [`MEMBER_LEASE_TTL_S`] that it renews
//! every [`KEEPALIVE_EVERY_MS`]. A node that dies stops renewing and etcd
//! deletes its key when the lease expires; a node that stops gracefully
//! revokes its lease. Every node reads the keys once and then watches
//! them: the member set's version is the etcd revision of the last change
//! applied, so nodes that applied the same changes hold the same version
//! and the same set (the set itself, not the number, decides ownership).
//! A node that has not renewed its lease for a whole TTL may have been
//! removed without knowing: it is *fenced* and must not act as any topic's
//! owner until it has registered again. (etcd's own expiry starts from the
//! last renewal it received, never before the node's; clocks are assumed
//! to run at the same rate, as any lease assumes.)
//!
//! Why the HTTP gateway and not the `etcd-client` crate: the crate's gRPC
//! stack needs `protoc` at build time and a tokio runtime; the gateway is
//! etcd's documented JSON mapping of the same API, four calls of which
//! are all a member needs.

use std::collections::BTreeMap;

use base64::Engine;
use serde_json::{json, Value};

use crate::cluster::Topology;
use crate::maglev::MaglevError;

/// A member key's lease, in seconds: a dead node leaves the member set
/// this long after its last renewal.
pub const MEMBER_LEASE_TTL_S: u64 = 5;
/// How often a node renews its lease: five chances per TTL.
pub const KEEPALIVE_EVERY_MS: u64 = 1000;

/// Why etcd's answer could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected answer from etcd: {0}")]
pub struct EtcdError(pub String);

/// The key prefix of `cluster`'s members.
pub fn members_prefix(cluster: &str) -> String {
    format!("/rayflux/{cluster}/members/")
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(text: &str) -> Result<String, EtcdError> {
    let bytes =
        base64::engine::general_purpose::STANDARD.decode(text).map_err(|_| EtcdError(format!("not base64: {text}")))?;
    String::from_utf8(bytes).map_err(|_| EtcdError("a key or value that is not UTF-8".into()))
}

/// The end of the range of keys starting with `prefix` (etcd's
/// `range_end`: the prefix with its last byte incremented).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// `POST /v3/lease/grant`.
pub fn lease_grant_body(ttl_s: u64) -> String {
    json!({ "TTL": ttl_s }).to_string()
}

/// `POST /v3/kv/put`: this node's member key, on its lease.
pub fn put_member_body(prefix: &str, me: &str, lease: u64) -> String {
    json!({ "key": b64(format!("{prefix}{me}").as_bytes()), "value": b64(me.as_bytes()), "lease": lease.to_string() })
        .to_string()
}

/// The key holding `cluster`'s ownership table size (its slots): put by
/// the first node to start and checked by every node after it, since
/// nodes with different tables would each own topics the other owns.
pub fn table_size_key(cluster: &str) -> String {
    format!("/rayflux/{cluster}/table_size")
}

/// `POST /v3/kv/txn`: puts `key` = `value` unless the key exists, else
/// reads it (see [`parse_put_if_absent`]).
pub fn put_if_absent_body(key: &str, value: &str) -> String {
    json!({
        "compare": [{ "key": b64(key.as_bytes()), "result": "EQUAL", "target": "CREATE", "create_revision": "0" }],
        "success": [{ "request_put": { "key": b64(key.as_bytes()), "value": b64(value.as_bytes()) } }],
        "failure": [{ "request_range": { "key": b64(key.as_bytes()) } }],
    })
    .to_string()
}

/// The value that stands after [`put_if_absent_body`]: `value` if it was
/// put, else the one found (the gateway leaves `succeeded` out when false).
pub fn parse_put_if_absent(body: &str, value: &str) -> Result<String, EtcdError> {
    let v = parse(body)?;
    v.get("header").ok_or_else(|| EtcdError(format!("no header in {body}")))?;
    if v.get("succeeded").and_then(Value::as_bool).unwrap_or(false) {
        return Ok(value.to_string());
    }
    let found = v.pointer("/responses/0/response_range/kvs/0/value").and_then(Value::as_str);
    unb64(found.ok_or_else(|| EtcdError(format!("neither put nor found: {body}")))?)
}

/// `POST /v3/kv/range`: every member key.
pub fn range_body(prefix: &str) -> String {
    json!({ "key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix)) }).to_string()
}

/// `POST /v3/watch`: the member keys' changes from `start_revision` on.
pub fn watch_body(prefix: &str, start_revision: u64) -> String {
    json!({ "create_request": {
        "key": b64(prefix.as_bytes()),
        "range_end": b64(&prefix_end(prefix)),
        "start_revision": start_revision.to_string(),
    }})
    .to_string()
}

/// `POST /v3/lease/keepalive` and `POST /v3/lease/revoke`.
pub fn lease_body(lease: u64) -> String {
    json!({ "ID": lease.to_string() }).to_string()
}

/// etcd writes 64-bit numbers as JSON strings.
fn number(v: &Value) -> Option<u64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

fn parse(body: &str) -> Result<Value, EtcdError> {
    serde_json::from_str(body).map_err(|_| EtcdError(body.chars().take(200).collect()))
}

/// The lease a grant returned.
pub fn parse_lease_grant(body: &str) -> Result<u64, EtcdError> {
    let v = parse(body)?;
    v.get("ID").and_then(number).ok_or_else(|| EtcdError(format!("no lease id in {body}")))
}

/// Whether a keepalive found the lease alive (an expired or unknown
/// lease comes back without a TTL).
pub fn parse_keepalive(body: &str) -> Result<bool, EtcdError> {
    let v = parse(body)?;
    let result = v.get("result").ok_or_else(|| EtcdError(format!("no result in {body}")))?;
    Ok(result.get("TTL").and_then(number).is_some_and(|ttl| ttl > 0))
}

/// The revision and the (key, value) pairs a range returned.
pub fn parse_range(body: &str) -> Result<(u64, Vec<(String, String)>), EtcdError> {
    let v = parse(body)?;
    let revision =
        v.pointer("/header/revision").and_then(number).ok_or_else(|| EtcdError(format!("no revision in {body}")))?;
    let mut kvs = Vec::new();
    for kv in v.get("kvs").and_then(Value::as_array).into_iter().flatten() {
        let key = unb64(kv.get("key").and_then(Value::as_str).unwrap_or(""))?;
        let value = unb64(kv.get("value").and_then(Value::as_str).unwrap_or(""))?;
        kvs.push((key, value));
    }
    Ok((revision, kvs))
}

/// One message of a watch stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchUpdate {
    /// The revision it brings the watcher to.
    pub revision: u64,
    /// Keys put (with their value) or deleted (`None`), in order.
    pub events: Vec<(String, Option<String>)>,
    /// The watch was cancelled (compacted past its start, or refused).
    pub canceled: bool,
}

/// Parses one line of a watch stream.
pub fn parse_watch(line: &str) -> Result<WatchUpdate, EtcdError> {
    let v = parse(line)?;
    let result = v.get("result").ok_or_else(|| EtcdError(format!("no result in {line}")))?;
    let revision = result.pointer("/header/revision").and_then(number).unwrap_or(0);
    let mut events = Vec::new();
    for event in result.get("events").and_then(Value::as_array).into_iter().flatten() {
        let kv = event.get("kv").ok_or_else(|| EtcdError("an event without kv".into()))?;
        let key = unb64(kv.get("key").and_then(Value::as_str).unwrap_or(""))?;
        let deleted = event.get("type").and_then(Value::as_str) == Some("DELETE");
        let value = if deleted { None } else { Some(unb64(kv.get("value").and_then(Value::as_str).unwrap_or(""))?) };
        events.push((key, value));
    }
    let canceled = result.get("canceled").and_then(Value::as_bool).unwrap_or(false);
    Ok(WatchUpdate { revision, events, canceled })
}

/// The member set a node follows: keys and their addresses, the version
/// (revision of the last change), and the lease's last renewal.
#[derive(Debug, Clone, Default)]
pub struct Members {
    members: BTreeMap<String, String>,
    version: u64,
    renewed_ms: Option<u64>,
    /// The ownership table's size (0: the default).
    table_size: usize,
}

impl Members {
    /// An empty set whose topologies have tables of `table_size` slots.
    pub fn with_table_size(table_size: usize) -> Members {
        Members { table_size, ..Members::default() }
    }

    /// The set a range read returned at `revision`. True when it differs
    /// from what was held.
    pub fn reset(&mut self, revision: u64, kvs: Vec<(String, String)>) -> bool {
        let next: BTreeMap<String, String> = kvs.into_iter().collect();
        let changed = next != self.members || self.version == 0;
        if changed {
            self.members = next;
            self.version = revision;
        }
        changed
    }

    /// Applies a watch update; true when the set changed.
    pub fn apply(&mut self, update: &WatchUpdate) -> bool {
        let before = self.members.clone();
        for (key, value) in &update.events {
            match value {
                Some(addr) => self.members.insert(key.clone(), addr.clone()),
                None => self.members.remove(key),
            };
        }
        let changed = before != self.members;
        if changed {
            self.version = update.revision;
        }
        changed
    }

    /// The version: etcd's revision of the last change.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The member addresses.
    pub fn addresses(&self) -> Vec<String> {
        self.members.values().cloned().collect()
    }

    /// The topology of this set.
    pub fn topology(&self) -> Result<Topology, MaglevError> {
        let size = if self.table_size == 0 { crate::maglev::TABLE_SIZE_DEFAULT } else { self.table_size };
        Topology::with_table_size(self.version, &self.addresses(), size)
    }

    /// The lease was granted or renewed at `now_ms`.
    pub fn renewed(&mut self, now_ms: u64) {
        self.renewed_ms = Some(now_ms);
    }

    /// Whether the node must not act as an owner: its lease was never
    /// granted, or not renewed for a whole TTL.
    pub fn fenced(&self, now_ms: u64) -> bool {
        self.renewed_ms.is_none_or(|at| now_ms.saturating_sub(at) >= MEMBER_LEASE_TTL_S * 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_and_answers_as_the_gateway_writes_them() {
        let prefix = members_prefix("prod");
        assert_eq!(prefix, "/rayflux/prod/members/");
        assert_eq!(prefix_end(&prefix), b"/rayflux/prod/members0".to_vec());
        let put: Value = serde_json::from_str(&put_member_body(&prefix, "10.0.0.1:8080", 77)).unwrap();
        assert_eq!(unb64(put["key"].as_str().unwrap()).unwrap(), "/rayflux/prod/members/10.0.0.1:8080");
        assert_eq!(put["lease"], "77");
        // Answers copied from etcd 3.4.
        let grant = r#"{"header":{"revision":"3"},"ID":"7587899294450231304","TTL":"5"}"#;
        assert_eq!(parse_lease_grant(grant).unwrap(), 7587899294450231304);
        assert!(parse_keepalive(r#"{"result":{"header":{"revision":"3"},"ID":"7587","TTL":"5"}}"#).unwrap());
        assert!(!parse_keepalive(r#"{"result":{"header":{"revision":"3"},"ID":"123"}}"#).unwrap());
        let range = r#"{"header":{"revision":"9"},"kvs":[{"key":"L3JheWZsdXgvcHJvZC9tZW1iZXJzL2E=","value":"YQ==","mod_revision":"4"}],"count":"1"}"#;
        assert_eq!(parse_range(range).unwrap(), (9, vec![("/rayflux/prod/members/a".into(), "a".into())]));
        assert_eq!(parse_range(r#"{"header":{"revision":"1"}}"#).unwrap(), (1, vec![]));
        let put_event = r#"{"result":{"header":{"revision":"2"},"events":[{"kv":{"key":"YQ==","create_revision":"2","mod_revision":"2","version":"1","value":"eA=="}}]}}"#;
        let delete_event = r#"{"result":{"header":{"revision":"3"},"events":[{"type":"DELETE","kv":{"key":"YQ==","mod_revision":"3"}}]}}"#;
        assert_eq!(
            parse_watch(put_event).unwrap(),
            WatchUpdate { revision: 2, events: vec![("a".into(), Some("x".into()))], canceled: false }
        );
        assert_eq!(parse_watch(delete_event).unwrap().events, vec![("a".into(), None)]);
        let created = r#"{"result":{"header":{"revision":"1"},"created":true}}"#;
        assert_eq!(parse_watch(created).unwrap().events, vec![]);
        assert!(parse_watch("not json").is_err());
        assert!(parse_range(r#"{"header":{"revision":"1"},"kvs":[{"key":"!!","value":""}]}"#).is_err());
    }

    #[test]
    fn a_value_put_only_if_absent_and_the_one_that_stands() {
        let body: Value = serde_json::from_str(&put_if_absent_body(&table_size_key("prod"), "65537")).unwrap();
        assert_eq!(unb64(body["compare"][0]["key"].as_str().unwrap()).unwrap(), "/rayflux/prod/table_size");
        assert_eq!(body["compare"][0]["target"], "CREATE");
        assert_eq!(unb64(body["success"][0]["request_put"]["value"].as_str().unwrap()).unwrap(), "65537");
        // Answers as etcd 3.4's gateway writes them.
        let put = r#"{"header":{"revision":"2"},"succeeded":true,"responses":[{"response_put":{"header":{"revision":"2"}}}]}"#;
        assert_eq!(parse_put_if_absent(put, "65537").unwrap(), "65537");
        let found = r#"{"header":{"revision":"5"},"responses":[{"response_range":{"header":{"revision":"5"},"kvs":[{"key":"eA==","value":"NjU1Mzcz","create_revision":"2"}],"count":"1"}}]}"#;
        assert_eq!(parse_put_if_absent(found, "65537").unwrap(), "655373");
        assert!(parse_put_if_absent(r#"{"header":{"revision":"5"},"responses":[{}]}"#, "1").is_err());
        assert!(parse_put_if_absent(r#"{"error":"etcdserver: too many requests"}"#, "1").is_err());
    }

    #[test]
    fn the_set_its_version_and_fencing() {
        let mut m = Members::default();
        assert!(m.fenced(0), "never registered");
        m.renewed(1_000);
        assert!(!m.fenced(5_999));
        assert!(m.fenced(6_000), "a whole TTL without renewal");
        assert!(m.reset(5, vec![("k/a".into(), "a:1".into()), ("k/b".into(), "b:1".into())]));
        assert_eq!((m.version(), m.addresses()), (5, vec!["a:1".to_string(), "b:1".to_string()]));
        assert!(!m.reset(6, vec![("k/b".into(), "b:1".into()), ("k/a".into(), "a:1".into())]), "same set");
        assert_eq!(m.version(), 5, "a read of the same set keeps the version");
        let join = WatchUpdate { revision: 8, events: vec![("k/c".into(), Some("c:1".into()))], canceled: false };
        assert!(m.apply(&join));
        assert_eq!((m.version(), m.addresses().len()), (8, 3));
        assert!(!m.apply(&join), "a repeated put changes nothing");
        let leave = WatchUpdate { revision: 9, events: vec![("k/a".into(), None)], canceled: false };
        assert!(m.apply(&leave));
        let topology = m.topology().unwrap();
        assert_eq!((topology.version(), topology.members().len()), (9, 2));
    }
}
