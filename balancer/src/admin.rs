//! The admin API (sans-IO): a request's method, path and body in, a
//! response and possibly a membership change out. Served on its own port by
//! shard 0; `fluxctl` calls it.
//!
//! | Method and path                   | Effect                                   |
//! |-----------------------------------|------------------------------------------|
//! | `GET /healthz`                    | 200 while the balancer runs              |
//! | `GET /readyz`                     | 200 when some node is routable, else 503 |
//! | `GET /metrics`                    | Prometheus text                          |
//! | `GET /v1/nodes`                   | every node, its state and counters       |
//! | `POST /v1/nodes` `{"addr": "h:p"}`| add a node (201; 409 if present)         |
//! | `DELETE /v1/nodes/{addr}`         | remove a node (200; 404 if absent)       |
//! | `POST /v1/nodes/{addr}/drain`     | no new connections; open ones stay       |
//! | `POST /v1/nodes/{addr}/undrain`   | back to normal                           |
//! | `GET /v1/locate?topic=T`          | the node topic T's connections go to now |
//!
//! Errors are JSON `{"error": code, "message": text}` with status 400, 404,
//! 405, 409 or 413 (and 501 for a chunked body, as on the node).

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use proto::admin::{ErrorBody, Located, NodeList};
use proto::http;
use serde::Deserialize;

use crate::membership::{Membership, MembershipError, Source};
use crate::stats::{ShardStats, SHARD_COUNTERS};

/// An admin response.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// Content type.
    pub content_type: &'static str,
    /// Body.
    pub body: String,
}

impl Response {
    fn json(status: u16, value: serde_json::Value) -> Response {
        Response { status, content_type: "application/json", body: value.to_string() }
    }

    fn typed(status: u16, value: &impl serde::Serialize) -> Response {
        // Serialising plain structs of strings and numbers cannot fail.
        let body = serde_json::to_string(value).unwrap_or_default();
        Response { status, content_type: "application/json", body }
    }

    fn error(status: u16, code: &str, message: impl std::fmt::Display) -> Response {
        Response::typed(status, &ErrorBody { error: code.to_string(), message: message.to_string() })
    }

    /// The whole HTTP/1.1 response, closing the connection.
    pub fn to_http(&self) -> Vec<u8> {
        http::response(self.status, self.content_type, self.body.as_bytes(), false)
    }
}

/// What the admin API can see and change. Lives on shard 0.
#[derive(Debug)]
pub struct Context<'a> {
    /// The node set.
    pub membership: &'a mut Membership,
    /// Every shard's counters.
    pub shards: &'a [Arc<ShardStats>],
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddNode {
    addr: String,
}

/// Handles one request. The caller rebuilds and sends the view afterwards
/// (a no-op when nothing routable changed).
pub fn handle(method: &str, path: &str, body: &[u8], ctx: &mut Context<'_>) -> Response {
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        ("GET", ["healthz"]) => Response { status: 200, content_type: "text/plain", body: "ok\n".into() },
        ("GET", ["readyz"]) => {
            let ready = ctx.membership.list().iter().any(|m| m.routable);
            let status = if ready { 200 } else { 503 };
            Response {
                status,
                content_type: "text/plain",
                body: if ready { "ready\n" } else { "no routable node\n" }.into(),
            }
        }
        ("GET", ["metrics"]) => {
            Response { status: 200, content_type: "text/plain; version=0.0.4", body: render_metrics(ctx) }
        }
        ("GET", ["v1", "nodes"]) => Response::typed(200, &NodeList { nodes: ctx.membership.list() }),
        ("POST", ["v1", "nodes"]) => add_node(body, ctx),
        ("GET", ["v1", "locate"]) => locate(query, ctx),
        ("DELETE", ["v1", "nodes", addr]) => with_addr(addr, |a| ctx.membership.remove(a), "removed"),
        ("POST", ["v1", "nodes", addr, "drain"]) => {
            with_addr(addr, |a| ctx.membership.set_draining(a, true), "draining")
        }
        ("POST", ["v1", "nodes", addr, "undrain"]) => {
            with_addr(addr, |a| ctx.membership.set_draining(a, false), "undrained")
        }
        (_, ["healthz" | "readyz" | "metrics"]) | (_, ["v1", "nodes", ..]) => {
            Response::error(405, "method_not_allowed", format!("{method} is not allowed on {path}"))
        }
        _ => Response::error(404, "not_found", format!("no admin route {path}")),
    }
}

/// `GET /v1/locate?topic=T` (or `key=K`, the same hash).
fn locate(query: &str, ctx: &Context<'_>) -> Response {
    let wanted = http::query_pairs(query).into_iter().find(|(k, _)| k == "topic" || k == "key").map(|(_, v)| v);
    let Some(topic) = wanted else {
        return Response::error(400, "bad_request", "give ?topic=NAME");
    };
    let key = crate::route::RouteKey::Topic(topic.clone()).hash_input();
    match ctx.membership.locate(&key) {
        Some(node) => Response::typed(200, &Located { topic, node }),
        None => Response::error(503, "no_node", "no node is routable"),
    }
}

fn add_node(body: &[u8], ctx: &mut Context<'_>) -> Response {
    let request: AddNode = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return Response::error(400, "bad_request", format!("expected {{\"addr\": \"ip:port\"}}: {e}")),
    };
    let addr: SocketAddr = match request.addr.parse() {
        Ok(a) => a,
        Err(_) => return Response::error(400, "bad_request", format!("{:?} is not an ip:port address", request.addr)),
    };
    match ctx.membership.add(addr, Source::Admin) {
        Ok(()) => Response::json(201, serde_json::json!({ "added": addr })),
        Err(e) => membership_error(e),
    }
}

fn with_addr(text: &str, change: impl FnOnce(SocketAddr) -> Result<(), MembershipError>, done: &str) -> Response {
    let addr: SocketAddr = match text.parse() {
        Ok(a) => a,
        Err(_) => return Response::error(400, "bad_request", format!("{text:?} is not an ip:port address")),
    };
    match change(addr) {
        Ok(()) => Response::json(200, serde_json::json!({ done: addr })),
        Err(e) => membership_error(e),
    }
}

fn membership_error(e: MembershipError) -> Response {
    match e {
        MembershipError::NotFound(_) => Response::error(404, "not_found", e),
        MembershipError::Exists(_) => Response::error(409, "exists", e),
        MembershipError::Full => Response::error(409, "full", e),
    }
}

fn render_metrics(ctx: &Context<'_>) -> String {
    let mut out = String::new();
    let per_shard: Vec<[u64; 11]> = ctx.shards.iter().map(|s| s.values()).collect();
    for (i, (name, help, kind)) in SHARD_COUNTERS.iter().enumerate() {
        let total: u64 = per_shard.iter().map(|v| v[i]).sum();
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {total}");
    }
    let m = &*ctx.membership;
    let _ = writeln!(
        out,
        "# HELP fluxbalancer_health_transitions_total Nodes that went down or came back.\n\
         # TYPE fluxbalancer_health_transitions_total counter\nfluxbalancer_health_transitions_total {}",
        m.health_transitions
    );
    let _ = writeln!(
        out,
        "# HELP fluxbalancer_table_rebuilds_total Maglev tables built.\n\
         # TYPE fluxbalancer_table_rebuilds_total counter\nfluxbalancer_table_rebuilds_total {}",
        m.table_rebuilds
    );
    let list = m.list();
    type Field = fn(&crate::membership::MemberInfo) -> u64;
    let per_node: [(&str, &str, &str, Field); 6] = [
        ("fluxbalancer_node_up", "1 when the node is routable.", "gauge", |i| i.routable as u64),
        ("fluxbalancer_node_connections_current", "Piped connections open per node.", "gauge", |i| {
            i.connections_current
        }),
        ("fluxbalancer_node_connections_total", "Piped connections opened per node.", "counter", |i| {
            i.connections_total
        }),
        ("fluxbalancer_node_connect_failures_total", "Failed connects per node.", "counter", |i| i.connect_failures),
        ("fluxbalancer_node_bytes_to_node_total", "Bytes piped from clients to the node.", "counter", |i| {
            i.bytes_to_node
        }),
        ("fluxbalancer_node_bytes_from_node_total", "Bytes piped from the node to clients.", "counter", |i| {
            i.bytes_from_node
        }),
    ];
    for (name, help, kind, value) in per_node {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for info in &list {
            let _ = writeln!(out, "{name}{{node=\"{}\"}} {}", info.addr, value(info));
        }
    }
    out
}

/// A short JSON error response that closes the connection, for clients the
/// balancer refuses before choosing a node (400, 408, 431, 502, 503).
pub fn client_error(status: u16, code: &str, message: &str) -> Vec<u8> {
    http::json_error(status, code, message, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(m: &mut Membership, method: &str, path: &str, body: &str) -> Response {
        let shards = [Arc::new(ShardStats::default())];
        handle(method, path, body.as_bytes(), &mut Context { membership: m, shards: &shards })
    }

    #[test]
    fn locate_names_the_node_the_shards_route_to() {
        let mut m = Membership::new(1, 1, 101);
        assert_eq!(run(&mut m, "GET", "/v1/locate?topic=orders", "").status, 503);
        for port in [7001, 7002, 7003] {
            assert_eq!(run(&mut m, "POST", "/v1/nodes", &format!(r#"{{"addr":"127.0.0.1:{port}"}}"#)).status, 201);
        }
        let view = m.view_if_changed().expect("a view");
        for topic in ["orders", "chat", "a", "b", "c", "d", "e", "f"] {
            let key = crate::route::RouteKey::Topic(topic.to_string()).hash_input();
            let routed = view.table.lookup_index(&key).map(|i| view.addrs[i]);
            let answer = run(&mut m, "GET", &format!("/v1/locate?topic={topic}"), "");
            let located: Located = serde_json::from_str(&answer.body).expect("json");
            assert_eq!(Some(located.node), routed, "{topic}");
        }
        assert_eq!(run(&mut m, "GET", "/v1/locate", "").status, 400);
    }

    #[test]
    fn node_lifecycle() {
        let mut m = Membership::new(1, 1, 101);
        assert_eq!(run(&mut m, "GET", "/readyz", "").status, 503);
        assert_eq!(run(&mut m, "POST", "/v1/nodes", r#"{"addr":"127.0.0.1:7001"}"#).status, 201);
        assert_eq!(run(&mut m, "POST", "/v1/nodes", r#"{"addr":"127.0.0.1:7001"}"#).status, 409);
        assert_eq!(run(&mut m, "GET", "/readyz", "").status, 200);
        assert_eq!(run(&mut m, "POST", "/v1/nodes/127.0.0.1:7001/drain", "").status, 200);
        let listing = run(&mut m, "GET", "/v1/nodes", "");
        assert!(listing.body.contains(r#""draining":true"#), "{}", listing.body);
        assert_eq!(run(&mut m, "POST", "/v1/nodes/127.0.0.1:7001/undrain", "").status, 200);
        assert_eq!(run(&mut m, "DELETE", "/v1/nodes/127.0.0.1:7001", "").status, 200);
        assert_eq!(run(&mut m, "DELETE", "/v1/nodes/127.0.0.1:7001", "").status, 404);
    }

    #[test]
    fn bad_requests() {
        let mut m = Membership::new(1, 1, 101);
        assert_eq!(run(&mut m, "POST", "/v1/nodes", "{").status, 400);
        assert_eq!(run(&mut m, "POST", "/v1/nodes", r#"{"addr":"nohost"}"#).status, 400);
        assert_eq!(run(&mut m, "POST", "/v1/nodes", r#"{"addr":"127.0.0.1:1","x":1}"#).status, 400);
        assert_eq!(run(&mut m, "DELETE", "/v1/nodes/garbage", "").status, 400);
        assert_eq!(run(&mut m, "PUT", "/v1/nodes", "").status, 405);
        assert_eq!(run(&mut m, "GET", "/nope", "").status, 404);
        let metrics = run(&mut m, "GET", "/metrics", "");
        assert!(metrics.body.contains("fluxbalancer_connections_total 0"));
        assert!(metrics.to_http().starts_with(b"HTTP/1.1 200 OK\r\n"));
    }
}
