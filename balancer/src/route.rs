//! Choosing the routing key of a new connection from the start of its
//! bytes (sans-IO). The balancer reads only the HTTP request head, bounded
//! in size, and never parses anything after it.
//!
//! Rules, first match wins:
//! 1. the topic, when the path names one: `/v1/topics/{topic}` or
//!    `/v1/topics/{topic}/...` (raw sockets and topic publishes), so that a
//!    topic's publishers and subscribers meet on the node that owns it;
//! 2. the `key` query parameter (native `/v1/ws?key=...` clients choose);
//! 3. the client's IP address (not its port, so one client's connections
//!    stay together). The original RayFlux API (`POST /publish`, WebSocket
//!    `/subscribe`) carries its topic in the body or the first frame, so it
//!    is routed by this rule: see docs/PROTOCOL.md, "Through a balancer".

use std::net::IpAddr;

/// Most headers parsed: the node's own limit.
use proto::limits::HTTP_HEADERS_MAX as HEADERS_MAX;
/// Largest request head the balancer reads before choosing: the node's own
/// limit, so that a head the balancer passes is one the node accepts.
pub use proto::limits::HTTP_HEAD_BYTES_MAX as HEAD_BYTES_MAX;

/// The key a connection is routed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteKey {
    /// A topic named in the path.
    Topic(String),
    /// The `key` query parameter.
    Key(String),
    /// The client's address.
    Client(IpAddr),
}

impl RouteKey {
    /// Bytes hashed into the Maglev table. A topic and a `key` with the same
    /// text hash alike, so a native client can send `key=TOPIC` to land on
    /// the topic's node; client addresses are prefixed so that they never
    /// collide with a name.
    pub fn hash_input(&self) -> Vec<u8> {
        match self {
            RouteKey::Topic(t) | RouteKey::Key(t) => t.as_bytes().to_vec(),
            RouteKey::Client(ip) => format!("client:{ip}").into_bytes(),
        }
    }
}

/// Why the head was refused; the balancer answers 400 or 431 and closes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Not an HTTP request head.
    #[error("malformed request head")]
    Malformed,
    /// Longer than `HEAD_BYTES_MAX` without ending.
    #[error("request head larger than {HEAD_BYTES_MAX} bytes")]
    TooLarge,
}

/// Chooses the routing key from the bytes received so far. `Ok(None)`: the
/// head is not complete yet (read more, within the size and time bounds).
pub fn route_key(received: &[u8], client: IpAddr) -> Result<Option<RouteKey>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut request = httparse::Request::new(&mut headers);
    let target = match request.parse(received) {
        Ok(httparse::Status::Complete(_)) => request.path.unwrap_or("/"),
        Ok(httparse::Status::Partial) if received.len() >= HEAD_BYTES_MAX => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed),
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if let Some(rest) = path.strip_prefix("/v1/topics/") {
        let topic = rest.split('/').next().unwrap_or("");
        if !topic.is_empty() {
            return Ok(Some(RouteKey::Topic(topic.to_string())));
        }
    }
    let key = query.split('&').find_map(|pair| pair.strip_prefix("key=")).filter(|k| !k.is_empty());
    Ok(Some(match key {
        Some(k) => RouteKey::Key(k.to_string()),
        None => RouteKey::Client(client),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7));

    fn key(head: &str) -> RouteKey {
        route_key(head.as_bytes(), CLIENT).unwrap().unwrap()
    }

    #[test]
    fn rules_in_order() {
        assert_eq!(key("GET /v1/topics/orders/ws?role=sub HTTP/1.1\r\n\r\n"), RouteKey::Topic("orders".into()));
        assert_eq!(key("POST /v1/topics/orders HTTP/1.1\r\n\r\n"), RouteKey::Topic("orders".into()));
        assert_eq!(key("GET /v1/ws?slow=drop&key=tenant-7 HTTP/1.1\r\n\r\n"), RouteKey::Key("tenant-7".into()));
        assert_eq!(key("POST /publish HTTP/1.1\r\nContent-Length: 5\r\n\r\n"), RouteKey::Client(CLIENT));
        assert_eq!(key("GET /subscribe HTTP/1.1\r\n\r\n"), RouteKey::Client(CLIENT));
        assert_eq!(key("GET /v1/topics/ HTTP/1.1\r\n\r\n"), RouteKey::Client(CLIENT));
        assert_eq!(RouteKey::Topic("a".into()).hash_input(), RouteKey::Key("a".into()).hash_input());
    }

    #[test]
    fn incomplete_at_every_split_then_complete() {
        let head = "GET /v1/topics/t/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n";
        for cut in 0..head.len() {
            assert_eq!(route_key(&head.as_bytes()[..cut], CLIENT), Ok(None), "cut {cut}");
        }
        assert_eq!(route_key(head.as_bytes(), CLIENT), Ok(Some(RouteKey::Topic("t".into()))));
    }

    #[test]
    fn garbage_and_endless_heads_are_refused() {
        assert_eq!(route_key(b"\x16\x03\x01\x02\x00garbage\r\n\r\n", CLIENT), Err(HeadError::Malformed));
        let endless = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(HEAD_BYTES_MAX));
        assert_eq!(route_key(endless.as_bytes(), CLIENT), Err(HeadError::TooLarge));
    }
}
