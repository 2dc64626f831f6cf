//! Sans-IO HTTP/1.1: request heads (parsed by `httparse`), routing, and
//! response encoding. Only what FluxNode serves: small JSON and text
//! responses, bodies with Content-Length, and WebSocket upgrades.

use crate::admin::ErrorBody;
use crate::limits::{HTTP_HEADERS_MAX, HTTP_HEAD_BYTES_MAX};

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// `GET`, `POST`, ...
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// The query string without `?` (may be empty).
    pub query: String,
    /// Declared body length; 0 without a Content-Length header.
    pub content_length: usize,
    /// The Content-Type header, lower-cased (empty if absent).
    pub content_type: String,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
    /// Set when the request asks for a WebSocket upgrade.
    pub websocket: Option<Upgrade>,
    /// Sent on by another node of the cluster ([`FORWARDED_HEADER`]): not
    /// to be sent on again.
    pub forwarded: bool,
}

/// The header a node puts on a request it sends on to the node that serves
/// it (a durable topic's owner): that node answers it or refuses it, never
/// sends it on again (views of the member set can differ for a moment).
pub const FORWARDED_HEADER: &str = "x-rayflux-forwarded";

/// Largest response body a node takes from another for a request it sent
/// on (a page of a durable log: at most `READ_MESSAGES_MAX` messages).
pub const FORWARDED_RESPONSE_BYTES_MAX: usize = 64 << 20;

/// A request sent on to another node (see [`FORWARDED_HEADER`]): its
/// method, path, query and body, with `connection: close`.
pub fn forwarded_request(head: &RequestHead, host: &str, body: &[u8]) -> Vec<u8> {
    let target = if head.query.is_empty() { head.path.clone() } else { format!("{}?{}", head.path, head.query) };
    let mut out = format!(
        "{} {target} HTTP/1.1\r\nhost: {host}\r\ncontent-type: {}\r\ncontent-length: {}\r\n{FORWARDED_HEADER}: 1\r\nconnection: close\r\n\r\n",
        head.method,
        if head.content_type.is_empty() { "application/octet-stream" } else { &head.content_type },
        body.len(),
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// A response's status, content type and body.
pub type Response<'a> = (u16, String, &'a [u8]);

/// A response, once `buf` holds it whole (`Ok(None)`: not yet). Bodies
/// need a Content-Length.
pub fn parse_response(buf: &[u8]) -> Result<Option<Response<'_>>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; HTTP_HEADERS_MAX];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= HTTP_HEAD_BYTES_MAX => return Err(HttpError::HeadTooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(HttpError::Malformed("invalid status line or header")),
    };
    let status = response.code.unwrap_or(0);
    let (mut content_type, mut content_length) = (String::new(), None);
    for h in response.headers.iter() {
        let value = std::str::from_utf8(h.value).map_err(|_| HttpError::Malformed("non-UTF-8 header value"))?.trim();
        match h.name.to_ascii_lowercase().as_str() {
            "content-length" => {
                content_length =
                    Some(value.parse::<usize>().map_err(|_| HttpError::Malformed("invalid content-length"))?)
            }
            "transfer-encoding" => return Err(HttpError::TransferEncoding),
            "content-type" => content_type = value.to_string(),
            _ => {}
        }
    }
    let length = content_length.ok_or(HttpError::Malformed("a response without content-length"))?;
    if length > FORWARDED_RESPONSE_BYTES_MAX {
        return Err(HttpError::Malformed("a response body over the forwarding limit"));
    }
    Ok(buf.get(len..len + length).map(|body| (status, content_type, body)))
}

/// The WebSocket part of an upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upgrade {
    /// A valid RFC 6455 upgrade with this `Sec-WebSocket-Key`.
    Valid { key: String },
    /// An upgrade request with a wrong or missing version or key.
    Invalid(&'static str),
}

/// Why a request head was refused; each has an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// Malformed request (400).
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// Request head over `HTTP_HEAD_BYTES_MAX` (431).
    #[error("request head larger than {HTTP_HEAD_BYTES_MAX} bytes")]
    HeadTooLarge,
    /// Chunked or other transfer codings are not supported (501).
    #[error("transfer-encoding is not supported; send Content-Length")]
    TransferEncoding,
}

impl HttpError {
    /// HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Malformed(_) => 400,
            HttpError::HeadTooLarge => 431,
            HttpError::TransferEncoding => 501,
        }
    }
}

/// Parses a request head from the front of `buf`. `Ok(None)`: incomplete.
/// On success returns the head and its length in bytes.
pub fn parse_head(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; HTTP_HEADERS_MAX];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= HTTP_HEAD_BYTES_MAX => return Err(HttpError::HeadTooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
        Err(_) => return Err(HttpError::Malformed("invalid request line or header")),
    };
    if len > HTTP_HEAD_BYTES_MAX {
        return Err(HttpError::HeadTooLarge);
    }
    // httparse guarantees these are set on Complete.
    let method = request.method.unwrap_or("").to_string();
    let target = request.path.unwrap_or("/");
    let http11 = request.version == Some(1);
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (target.to_string(), String::new()),
    };
    let mut content_length = None;
    let mut connection = String::new();
    let mut content_type = String::new();
    let mut forwarded = false;
    let (mut upgrade, mut version, mut key) = (false, None, None);
    for h in request.headers.iter() {
        let value = std::str::from_utf8(h.value).map_err(|_| HttpError::Malformed("non-UTF-8 header value"))?;
        let value = value.trim();
        match h.name.to_ascii_lowercase().as_str() {
            "content-length" => {
                let n = value.parse::<usize>().map_err(|_| HttpError::Malformed("invalid content-length"))?;
                if content_length.is_some_and(|old| old != n) {
                    return Err(HttpError::Malformed("conflicting content-length headers"));
                }
                content_length = Some(n);
            }
            "transfer-encoding" => return Err(HttpError::TransferEncoding),
            "connection" => connection = value.to_ascii_lowercase(),
            "content-type" => content_type = value.to_ascii_lowercase(),
            "upgrade" => upgrade = has_token(value, "websocket"),
            "sec-websocket-version" => version = Some(value.to_string()),
            "sec-websocket-key" => key = Some(value.to_string()),
            FORWARDED_HEADER => forwarded = true,
            _ => {}
        }
    }
    let websocket = (upgrade && has_token(&connection, "upgrade")).then(|| {
        if method != "GET" || !http11 {
            Upgrade::Invalid("a WebSocket upgrade must be GET over HTTP/1.1")
        } else if version.as_deref() != Some("13") {
            Upgrade::Invalid("Sec-WebSocket-Version must be 13")
        } else {
            match key {
                // A key is 16 random bytes in base64: 24 characters.
                Some(k) if k.len() == 24 => Upgrade::Valid { key: k },
                _ => Upgrade::Invalid("missing or malformed Sec-WebSocket-Key"),
            }
        }
    });
    let keep_alive = if http11 { !has_token(&connection, "close") } else { has_token(&connection, "keep-alive") };
    Ok(Some((
        RequestHead {
            method,
            path,
            query,
            content_length: content_length.unwrap_or(0),
            content_type,
            keep_alive,
            websocket,
            forwarded,
        },
        len,
    )))
}

fn has_token(value: &str, token: &str) -> bool {
    value.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Every `name=value` of a query string, percent- and `+`-decoded, in order.
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

/// Looks up `name` in a query string (`a=1&b=2`). No percent-decoding: every
/// parameter FluxNode reads is alphanumeric.
pub fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /healthz`
    Healthz,
    /// `GET /readyz`
    Readyz,
    /// `GET /metrics`
    Metrics,
    /// `GET /v1/latency`: the delivery latency distribution.
    Latency,
    /// `GET /v1/cluster[?topic=T]`: the node's view of its cluster.
    Cluster,
    /// `GET /v1/topics`
    ListTopics,
    /// `GET /v1/topics/{topic}`
    TopicInfo(String),
    /// `POST /v1/topics/{topic}`
    TopicPublish(String),
    /// `PUT /v1/topics/{topic}`: declare a durable topic.
    TopicDeclare(String),
    /// `DELETE /v1/topics/{topic}`: a durable topic's log goes; the topic
    /// stays, ephemeral.
    TopicDelete(String),
    /// `GET /v1/topics/{topic}/messages`: read a durable topic's log.
    TopicRead(String),
    /// `POST /v1/snapshots`: make a snapshot of the durable topics.
    SnapshotCreate,
    /// `GET /v1/snapshots`: the snapshots in the object store.
    SnapshotList,
    /// `GET /v1/snapshots/{id|latest}`: a manifest.
    SnapshotShow(String),
    /// `DELETE /v1/snapshots/{id}`: delete a manifest.
    SnapshotDelete(String),
    /// `GET /v1/topics/{topic}/ws` (upgrade)
    TopicSocket(String),
    /// `POST /publish` (original RayFlux API)
    LegacyPublish,
    /// `GET /subscribe` (original RayFlux API, upgrade)
    LegacySubscribe,
    /// `GET /v1/ws` (native protocol, upgrade)
    NativeSocket,
    /// `GET /v1/link` (another node of the cluster, upgrade)
    NodeLink,
    /// A known path with the wrong method (405).
    MethodNotAllowed,
    /// Anything else (404).
    NotFound,
}

/// Routes a method and path.
pub fn route(method: &str, path: &str) -> Route {
    let get = method == "GET" || method == "HEAD";
    let post = method == "POST";
    let pick = |ok: bool, r: Route| if ok { r } else { Route::MethodNotAllowed };
    match path {
        "/healthz" => pick(get, Route::Healthz),
        "/readyz" => pick(get, Route::Readyz),
        "/metrics" => pick(get, Route::Metrics),
        "/v1/latency" => pick(get, Route::Latency),
        "/v1/cluster" => pick(get, Route::Cluster),
        "/publish" => pick(post, Route::LegacyPublish),
        "/subscribe" => pick(get, Route::LegacySubscribe),
        "/v1/ws" => pick(get, Route::NativeSocket),
        "/v1/link" => pick(get, Route::NodeLink),
        "/v1/topics" | "/v1/topics/" => pick(get, Route::ListTopics),
        "/v1/snapshots" | "/v1/snapshots/" if post => Route::SnapshotCreate,
        "/v1/snapshots" | "/v1/snapshots/" => pick(get, Route::SnapshotList),
        _ => match path.strip_prefix("/v1/topics/") {
            Some(rest) => match rest.split_once('/') {
                None if get => Route::TopicInfo(rest.to_string()),
                None if post => Route::TopicPublish(rest.to_string()),
                None if method == "PUT" => Route::TopicDeclare(rest.to_string()),
                None if method == "DELETE" => Route::TopicDelete(rest.to_string()),
                None => Route::MethodNotAllowed,
                Some((topic, "ws")) => pick(get, Route::TopicSocket(topic.to_string())),
                Some((topic, "messages")) => pick(get, Route::TopicRead(topic.to_string())),
                Some(_) => Route::NotFound,
            },
            None => match path.strip_prefix("/v1/snapshots/") {
                Some(id) if get => Route::SnapshotShow(id.to_string()),
                Some(id) if method == "DELETE" => Route::SnapshotDelete(id.to_string()),
                Some(_) => Route::MethodNotAllowed,
                None => Route::NotFound,
            },
        },
    }
}

/// Encodes a response with a body.
pub fn response(status: u16, content_type: &str, body: &[u8], keep_alive: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + body.len());
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: {}\r\n\r\n",
            reason(status),
            body.len(),
            if keep_alive { "keep-alive" } else { "close" }
        )
        .as_bytes(),
    );
    out.extend_from_slice(body);
    out
}

/// Encodes a response with a JSON body (one of `admin`'s types).
pub fn json(status: u16, value: &impl serde::Serialize, keep_alive: bool) -> Vec<u8> {
    // Serialising plain structs of strings and numbers cannot fail.
    let body = serde_json::to_vec(value).unwrap_or_default();
    response(status, "application/json", &body, keep_alive)
}

/// Encodes a JSON error body `{"error": code, "message": message}`.
pub fn json_error(status: u16, code: &str, message: &str, keep_alive: bool) -> Vec<u8> {
    json(status, &ErrorBody { error: code.to_string(), message: message.to_string() }, keep_alive)
}

/// Encodes the 101 answer to a WebSocket upgrade, with extra headers.
pub fn switching_protocols(client_key: &str, extra_headers: &[(&str, String)]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {}\r\n",
        crate::ws::accept_key(client_key.as_bytes())
    );
    for (name, value) in extra_headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out.into_bytes()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        413 => "Payload Too Large",
        421 => "Misdirected Request",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &str = "GET /v1/topics/a/ws?role=sub&from=3 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

    #[test]
    fn parses_upgrade_split_at_every_byte() {
        let wire = UPGRADE.as_bytes();
        for split in 0..wire.len() {
            assert_eq!(parse_head(&wire[..split]), Ok(None), "split {split}");
        }
        let (head, len) = parse_head(wire).unwrap().unwrap();
        assert_eq!(len, wire.len());
        assert_eq!(head.path, "/v1/topics/a/ws");
        assert_eq!(query_param(&head.query, "from"), Some("3"));
        assert_eq!(query_param(&head.query, "role"), Some("sub"));
        assert_eq!(query_param(&head.query, "nope"), None);
        assert_eq!(head.websocket, Some(Upgrade::Valid { key: "dGhlIHNhbXBsZSBub25jZQ==".into() }));
        assert_eq!(route(&head.method, &head.path), Route::TopicSocket("a".into()));
    }

    #[test]
    fn a_forwarded_request_and_its_response() {
        let wire = b"GET /v1/topics/t/messages?from_seq=3&limit=2 HTTP/1.1\r\nHost: a\r\n\r\n";
        let (head, _) = parse_head(wire).unwrap().unwrap();
        assert!(!head.forwarded);
        let sent = forwarded_request(&head, "10.0.0.2:8080", b"");
        let (again, len) = parse_head(&sent).unwrap().unwrap();
        assert_eq!(len, sent.len());
        assert_eq!((again.path.as_str(), again.query.as_str()), ("/v1/topics/t/messages", "from_seq=3&limit=2"));
        assert!(again.forwarded && !again.keep_alive, "{again:?}");
        let answer = response(421, "application/json", b"{\"error\":1}", false);
        for cut in 0..answer.len() {
            assert_eq!(parse_response(&answer[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(parse_response(&answer), Ok(Some((421, "application/json".to_string(), &b"{\"error\":1}"[..]))));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\n").is_err(), "no content-length");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999\r\n\r\n").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn bad_heads_have_statuses() {
        assert_eq!(parse_head(b"\x00\x01garbage\r\n\r\n").unwrap_err().status(), 400);
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(HTTP_HEAD_BYTES_MAX));
        assert_eq!(parse_head(big.as_bytes()).unwrap_err().status(), 431);
        let chunked = "POST /publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse_head(chunked.as_bytes()).unwrap_err().status(), 501);
        let conflict = "POST /publish HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(parse_head(conflict.as_bytes()).unwrap_err().status(), 400);
        let old = UPGRADE.replace("Version: 13", "Version: 8");
        let (head, _) = parse_head(old.as_bytes()).unwrap().unwrap();
        assert!(matches!(head.websocket, Some(Upgrade::Invalid(_))));
    }

    #[test]
    fn routes() {
        assert_eq!(route("POST", "/publish"), Route::LegacyPublish);
        assert_eq!(route("GET", "/publish"), Route::MethodNotAllowed);
        assert_eq!(route("GET", "/v1/topics/x"), Route::TopicInfo("x".into()));
        assert_eq!(route("POST", "/v1/topics/x"), Route::TopicPublish("x".into()));
        assert_eq!(route("GET", "/v1/topics/x/y"), Route::NotFound);
        assert_eq!(route("GET", "/nope"), Route::NotFound);
        let r = response(200, "text/plain", b"ok", false);
        assert!(r.starts_with(b"HTTP/1.1 200 OK\r\n") && r.ends_with(b"\r\n\r\nok"));
    }
}
