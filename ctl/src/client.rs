//! HTTP and WebSocket calls to a node or the balancer, and what a failure
//! means for the exit code.

use std::collections::BTreeMap;
use std::time::Duration;

use proto::admin::{ErrorBody, LogPage};
use serde::de::DeserializeOwned;
use tungstenite::Message;

use crate::render;
use crate::Output;

/// How long one HTTP call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a snapshot (the node's own bound is 120 s).
const PATIENT_CALL_TIMEOUT: Duration = Duration::from_secs(150);

/// Why a command failed.
#[derive(Debug)]
pub enum Failure {
    /// The server answered with an error.
    Server { status: u16, code: String, message: String },
    /// The server could not be reached.
    Unreachable { addr: String, why: String },
    /// The server answered something this tool does not understand.
    Protocol(String),
    /// Something on this machine failed (writing an output file).
    Local(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Server { status, code, message } => write!(f, "{status} {code}: {message}"),
            Failure::Unreachable { addr, why } => write!(f, "cannot reach {addr}: {why}"),
            Failure::Protocol(why) => write!(f, "unexpected answer: {why}"),
            Failure::Local(why) => write!(f, "{why}"),
        }
    }
}

impl Failure {
    /// The process exit code (see the crate's documentation).
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Server { .. } | Failure::Protocol(_) | Failure::Local(_) => 1,
            Failure::Unreachable { .. } => 3,
        }
    }
}

/// One server's HTTP API.
#[derive(Debug, Clone)]
pub struct Client {
    addr: String,
    agent: ureq::Agent,
}

impl Client {
    /// A client of `addr` (host:port).
    pub fn new(addr: &str) -> Client {
        Client { addr: addr.to_string(), agent: ureq::AgentBuilder::new().timeout(CALL_TIMEOUT).build() }
    }

    /// The same server, for a call that may take as long as a snapshot
    /// (the node waits up to two minutes for uploads).
    pub fn patient(&self) -> Client {
        Client { addr: self.addr.clone(), agent: ureq::AgentBuilder::new().timeout(PATIENT_CALL_TIMEOUT).build() }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `GET path` as JSON.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Failure> {
        let response = self.agent.get(&self.url(path)).call().map_err(|e| self.failure(e))?;
        response.into_json().map_err(|e| Failure::Protocol(e.to_string()))
    }

    /// `GET path` as text.
    pub fn get_text(&self, path: &str) -> Result<String, Failure> {
        let response = self.agent.get(&self.url(path)).call().map_err(|e| self.failure(e))?;
        response.into_string().map_err(|e| Failure::Protocol(e.to_string()))
    }

    /// `method path` with a JSON body (none for `Null`), answer as JSON.
    pub fn send<T: DeserializeOwned>(&self, method: &str, path: &str, body: &serde_json::Value) -> Result<T, Failure> {
        let request = self.agent.request(method, &self.url(path));
        let response = if body.is_null() { request.call() } else { request.send_json(body) };
        response.map_err(|e| self.failure(e))?.into_json().map_err(|e| Failure::Protocol(e.to_string()))
    }

    /// `POST path` with a text body.
    pub fn publish<T: DeserializeOwned>(&self, path: &str, body: &[u8]) -> Result<T, Failure> {
        let request = self.agent.post(&self.url(path)).set("content-type", "text/plain");
        let response = request.send_bytes(body).map_err(|e| self.failure(e))?;
        response.into_json().map_err(|e| Failure::Protocol(e.to_string()))
    }

    fn failure(&self, e: ureq::Error) -> Failure {
        match e {
            ureq::Error::Status(status, response) => {
                let body = response.into_string().unwrap_or_default();
                match serde_json::from_str::<ErrorBody>(&body) {
                    Ok(err) => Failure::Server { status, code: err.error, message: err.message },
                    Err(_) => Failure::Server { status, code: "http".into(), message: body },
                }
            }
            ureq::Error::Transport(t) => Failure::Unreachable { addr: self.addr.clone(), why: t.to_string() },
        }
    }
}

/// Percent-encodes a query value.
pub fn encode(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// Where `sub` starts.
#[derive(Debug)]
pub struct Start {
    /// After this sequence.
    pub from: Option<u64>,
    /// At this time, ms.
    pub since: Option<u64>,
    /// Every message with this key (a read, not a subscription).
    pub key: Option<String>,
}

/// `fluxctl sub`: a key read pages through the log; anything else
/// subscribes over the native protocol (resuming from `from`, or from the
/// first message at `since`) and prints messages as they come.
pub fn subscribe(node: &Client, topic: &str, start: Start, count: Option<u64>, out: Output) -> Result<(), Failure> {
    let limit = count.unwrap_or(u64::MAX);
    let mut printed = 0;
    if let Some(key) = start.key {
        let mut from = 0;
        loop {
            let path = format!("/v1/topics/{topic}/messages?key={}&from_seq={from}&limit=1000", encode(&key));
            let page: LogPage = node.get(&path)?;
            for m in &page.messages {
                if printed == limit {
                    return Ok(());
                }
                render::log_message(out, m);
                printed += 1;
            }
            match page.next_seq {
                Some(next) => from = next,
                None => return Ok(()),
            }
        }
    }
    let url = format!("ws://{}/v1/ws", node_addr(node));
    let (mut ws, _) = tungstenite::connect(url.as_str())
        .map_err(|e| Failure::Unreachable { addr: node_addr(node).to_string(), why: e.to_string() })?;
    let mut request = serde_json::json!({ "op": "subscribe", "id": 1, "topic": topic });
    if let Some(from) = start.from {
        request["from_seq"] = from.into();
    }
    if let Some(ms) = start.since {
        request["since_ms"] = ms.into();
    }
    ws.send(Message::text(request.to_string())).map_err(|e| Failure::Protocol(e.to_string()))?;
    while printed < limit {
        let frame = ws.read().map_err(|e| Failure::Protocol(format!("connection ended: {e}")))?;
        match frame {
            Message::Text(text) => {
                let v: serde_json::Value =
                    serde_json::from_str(text.as_str()).map_err(|e| Failure::Protocol(e.to_string()))?;
                match v["type"].as_str() {
                    Some("reply") if v["ok"] == false => {
                        return Err(Failure::Server {
                            status: 0,
                            code: v["error"]["code"].as_str().unwrap_or("error").to_string(),
                            message: v["error"]["message"].as_str().unwrap_or_default().to_string(),
                        });
                    }
                    Some("reply") => {
                        for notice in ["gap", "lost"] {
                            if let Some(what) = v.get(notice) {
                                eprintln!("fluxctl: {notice}: {what}");
                            }
                        }
                    }
                    Some("message") => {
                        render::envelope(out, &v);
                        printed += 1;
                    }
                    _ => render::notice(out, &v),
                }
            }
            Message::Binary(bytes) => {
                render::binary_envelope(out, &bytes);
                printed += 1;
            }
            _ => {}
        }
    }
    Ok(())
}

fn node_addr(node: &Client) -> &str {
    &node.addr
}

/// Every sample of a Prometheus text page, by name (labels included).
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// `fluxctl stats`.
pub fn stats(node: &Client, once: bool, interval_ms: u64, out: Output) -> Result<(), Failure> {
    let mut before = parse_metrics(&node.get_text("/metrics")?);
    if once {
        render::totals(out, &before);
        return Ok(());
    }
    let period = Duration::from_millis(interval_ms.max(100));
    loop {
        std::thread::sleep(period);
        let now = parse_metrics(&node.get_text("/metrics")?);
        render::rates(out, &before, &now, period);
        before = now;
    }
}
