//! The control plane, on shard 0 in a low-share task queue: health checks,
//! DNS re-resolution and the admin API. All three change the
//! [`Membership`]; after each change the new view (if the routable set
//! changed) goes to every shard over its bounded channel.

use std::cell::RefCell;
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::shared_channel::ConnectedSender;
use glommio::net::{TcpListener, TcpStream};
use proto::proxy_protocol;

use crate::admin;
use crate::health;
use crate::limits::{ADMIN_BODY_BYTES_MAX, ADMIN_REQUEST_TIMEOUT_MS, DNS_ADDRESSES_MAX, HEALTH_RESPONSE_BYTES_MAX};
use crate::membership::{Health, Membership, View};
use crate::shard::Shard;
use crate::stats::ShardStats;

/// Shard 0's control state.
#[derive(Debug)]
pub struct Control {
    /// Shard 0 itself (gets views directly).
    pub shard: Rc<Shard>,
    /// The node set; borrowed only between awaits.
    pub membership: RefCell<Membership>,
    /// A sender to every other shard.
    pub senders: Vec<ConnectedSender<Arc<View>>>,
    /// Every shard's counters.
    pub shard_stats: Vec<Arc<ShardStats>>,
}

impl Control {
    /// Builds a view if the routable set changed and sends it everywhere.
    pub async fn publish(&self) {
        let view = self.membership.borrow_mut().view_if_changed();
        let Some(view) = view else { return };
        let view = Arc::new(view);
        tracing::info!(generation = view.generation, nodes = ?view.addrs, "routing table rebuilt");
        self.shard.install(view.clone());
        for sender in &self.senders {
            // A send fails only when the receiving shard has exited.
            let _ = sender.send(view.clone()).await;
        }
    }

    /// Checks every node each interval, concurrently, and applies the
    /// verdicts.
    pub async fn health_loop(self: Rc<Self>) {
        let config = self.shard.config.clone();
        while !self.shard.shutting_down() {
            let addrs = self.membership.borrow().addrs();
            let checks: Vec<_> = addrs
                .iter()
                .map(|&addr| glommio::spawn_local(check(addr, config.health_timeout(), config.proxy_protocol())))
                .collect();
            for (addr, check) in addrs.into_iter().zip(checks) {
                let passed = check.await;
                if let Some(health) = self.membership.borrow_mut().observe(addr, passed) {
                    match health {
                        Health::Down => tracing::warn!(node = %addr, "node down: health checks failed"),
                        Health::Up => tracing::info!(node = %addr, "node up: health checks passed"),
                    }
                }
            }
            self.publish().await;
            glommio::timer::sleep(config.health_interval()).await;
        }
    }

    /// Re-resolves the DNS name each interval. A failed lookup keeps the
    /// last answer (a DNS outage must not empty the table).
    pub async fn dns_loop(self: Rc<Self>, name: String) {
        let interval = self.shard.config.dns_interval();
        while !self.shard.shutting_down() {
            let lookup_name = name.clone();
            // getaddrinfo blocks: it runs on glommio's blocking thread pool.
            let resolved = glommio::executor()
                .spawn_blocking(move || lookup_name.to_socket_addrs().map(|a| a.collect::<Vec<SocketAddr>>()))
                .await;
            match resolved {
                Ok(mut addrs) => {
                    addrs.sort();
                    addrs.dedup();
                    addrs.truncate(DNS_ADDRESSES_MAX);
                    self.membership.borrow_mut().replace_dns(&addrs);
                    self.publish().await;
                }
                Err(e) => tracing::warn!(%name, "DNS lookup failed, keeping the last answer: {e}"),
            }
            glommio::timer::sleep(interval).await;
        }
    }

    /// Serves the admin API until shutdown.
    pub async fn admin_loop(self: Rc<Self>, listener: TcpListener) {
        let stopping = || self.shard.shutting_down();
        while let Some(stream) = runtime::accept_next(&listener, self.shard.id, stopping).await {
            let control = self.clone();
            glommio::spawn_local(async move { control.admin_request(stream).await }).detach();
        }
    }

    async fn admin_request(&self, mut stream: TcpStream) {
        let timeout = Duration::from_millis(ADMIN_REQUEST_TIMEOUT_MS);
        let request = glommio::timer::timeout(timeout, async { Ok(read_request(&mut stream).await) }).await;
        let response = match request {
            Ok(Ok(Some((method, path, body)))) => {
                let response = {
                    let mut membership = self.membership.borrow_mut();
                    let mut ctx = admin::Context { membership: &mut membership, shards: &self.shard_stats };
                    admin::handle(&method, &path, &body, &mut ctx)
                };
                if method != "GET" {
                    self.publish().await;
                }
                response.to_http()
            }
            Ok(Ok(None)) => return,
            Ok(Err(status)) => {
                admin::client_error(status, "bad_request", "malformed, oversized or chunked admin request")
            }
            Err(_) => admin::client_error(408, "timeout", "admin request not received in time"),
        };
        let _ = stream.write_all(&response).await;
        let _ = stream.close().await;
    }
}

/// Reads one admin request with the engine's request-head parser (the same
/// bounds, fuzzed): `Ok(None)` if the client left, `Err(status)` on bad
/// input.
async fn read_request(stream: &mut TcpStream) -> Result<Option<(String, String, Vec<u8>)>, u16> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    let (head, head_len) = loop {
        if let Some(parsed) = proto::http::parse_head(&buf).map_err(|e| e.status())? {
            break parsed;
        }
        let n = stream.read(&mut chunk).await.map_err(|_| 400u16)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    if head.content_length > ADMIN_BODY_BYTES_MAX {
        return Err(413);
    }
    while buf.len() < head_len + head.content_length {
        let n = stream.read(&mut chunk).await.map_err(|_| 400u16)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_len..head_len + head.content_length].to_vec();
    // The admin API sees the query too (`/v1/locate?topic=T`).
    let path = if head.query.is_empty() { head.path } else { format!("{}?{}", head.path, head.query) };
    Ok(Some((head.method, path, body)))
}

/// One health check: connect, `GET /readyz`, judge the status line, all
/// within `timeout`.
async fn check(addr: SocketAddr, timeout: Duration, proxy_protocol: bool) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await?;
        let mut request = if proxy_protocol { proxy_protocol::encode_local() } else { Vec::new() };
        request.extend_from_slice(health::REQUEST);
        stream.write_all(&request).await?;
        let mut received = Vec::new();
        let mut chunk = [0u8; 512];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            received.extend_from_slice(&chunk[..n]);
            if let Some(verdict) = health::judge(&received) {
                return Ok(verdict);
            }
            if received.len() >= HEALTH_RESPONSE_BYTES_MAX {
                return Ok(false);
            }
        }
    };
    matches!(glommio::timer::timeout(timeout, async { Ok(attempt.await) }).await, Ok(Ok(true)))
}
