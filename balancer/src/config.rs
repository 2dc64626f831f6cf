//! Configuration: command-line flags and an optional TOML file, merged and
//! validated once into [`Config`]. A flag beats the file, the file beats
//! the default; unknown keys in the file are refused.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use runtime::config::read_file;
pub use runtime::config::ConfigError;
use runtime::pick;

use crate::maglev;

/// Most shards: one per core; more would only share cores.
pub const SHARDS_MAX: usize = 256;

/// Command-line flags. Every knob is also a key of the TOML file, with the
/// same name in snake_case (`--node` is the list `nodes`).
#[derive(Debug, Default, Parser)]
#[command(name = "fluxbalancer", version, about = "FluxBalancer: L4 Maglev balancer in front of FluxNodes")]
pub struct Args {
    /// TOML file with any of the settings below; flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address clients connect to. [default: 0.0.0.0:9080]
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Admin API, /healthz and /metrics. Keep it private. [default: 127.0.0.1:9081]
    #[arg(long)]
    pub admin_listen: Option<SocketAddr>,
    /// Number of shards (one pinned thread each). [default: all online cores]
    #[arg(long)]
    pub shards: Option<usize>,
    /// A node, host:port; repeat for more. Names are resolved once at start.
    #[arg(long = "node")]
    pub nodes: Vec<String>,
    /// A DNS name, host:port, re-resolved on an interval (a Kubernetes
    /// headless Service lists its ready pods).
    #[arg(long)]
    pub dns: Option<String>,
    /// DNS re-resolution interval, ms. [default: 5000]
    #[arg(long)]
    pub dns_interval_ms: Option<u64>,
    /// Maglev table size, a prime. [default: 65537]
    #[arg(long)]
    pub table_size: Option<usize>,
    /// Health-check interval per node, ms. [default: 2000]
    #[arg(long)]
    pub health_interval_ms: Option<u64>,
    /// Time one health check (connect plus GET /readyz) may take, ms. [default: 1000]
    #[arg(long)]
    pub health_timeout_ms: Option<u64>,
    /// Consecutive passed checks that bring a down node back. [default: 2]
    #[arg(long)]
    pub health_rise: Option<u32>,
    /// Consecutive failed checks that take a node out. [default: 3]
    #[arg(long)]
    pub health_fall: Option<u32>,
    /// Send a PROXY protocol v2 header to nodes (run them with --proxy-protocol).
    #[arg(long)]
    pub proxy_protocol: bool,
    /// Time a client has to send its request head, ms. [default: 10000]
    #[arg(long)]
    pub head_timeout_ms: Option<u64>,
    /// Time allowed to connect to a node, ms. [default: 2000]
    #[arg(long)]
    pub connect_timeout_ms: Option<u64>,
    /// A piped connection with no bytes either way for this long (checked
    /// once per period, so closed after one to two periods) is closed, ms.
    /// FluxNode pings idle WebSockets far more often. [default: 600000]
    #[arg(long)]
    pub tunnel_idle_timeout_ms: Option<u64>,
    /// Most client connections (each also holds one node connection, so two
    /// file descriptors). [default: 8192]
    #[arg(long)]
    pub connections_max: Option<usize>,
    /// Time shutdown waits for piped connections to end, ms. [default: 10000]
    #[arg(long)]
    pub drain_timeout_ms: Option<u64>,
}

/// The TOML file: the same knobs as [`Args`], all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    shards: Option<usize>,
    #[serde(default)]
    nodes: Vec<String>,
    dns: Option<String>,
    dns_interval_ms: Option<u64>,
    table_size: Option<usize>,
    health_interval_ms: Option<u64>,
    health_timeout_ms: Option<u64>,
    health_rise: Option<u32>,
    health_fall: Option<u32>,
    proxy_protocol: Option<bool>,
    head_timeout_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
    tunnel_idle_timeout_ms: Option<u64>,
    connections_max: Option<usize>,
    drain_timeout_ms: Option<u64>,
}

/// A validated configuration, shared read-only by every shard.
#[derive(Clone, Debug)]
pub struct Config {
    /// Client-facing address, bound by every shard with SO_REUSEPORT.
    listen: SocketAddr,
    /// Admin address, served by shard 0.
    admin_listen: SocketAddr,
    /// Number of shards, 1..=SHARDS_MAX.
    shards: usize,
    /// Static nodes, resolved.
    nodes: Vec<SocketAddr>,
    /// DNS name to re-resolve, `host:port`.
    dns: Option<String>,
    /// DNS re-resolution interval.
    dns_interval: Duration,
    /// Maglev table size (prime).
    table_size: usize,
    /// Health-check interval.
    health_interval: Duration,
    /// Time one health check may take.
    health_timeout: Duration,
    /// Passed checks to come back.
    health_rise: u32,
    /// Failed checks to leave.
    health_fall: u32,
    /// Whether nodes get a PROXY v2 header.
    proxy_protocol: bool,
    /// Time for the client's request head.
    head_timeout: Duration,
    /// Time to connect to a node.
    connect_timeout: Duration,
    /// Silence both ways that closes a piped connection.
    tunnel_idle_timeout: Duration,
    /// Most client connections.
    connections_max: usize,
    /// Time shutdown waits for connections.
    drain_timeout: Duration,
}

/// Read access: the fields are private, so a `Config` exists only as
/// [`Config::from_args`] made it, valid.
impl Config {
    /// Client-facing address, bound by every shard with SO_REUSEPORT.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Admin address, served by shard 0.
    pub fn admin_listen(&self) -> SocketAddr {
        self.admin_listen
    }

    /// Number of shards, 1..=SHARDS_MAX.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// Static nodes, resolved.
    pub fn nodes(&self) -> &[SocketAddr] {
        &self.nodes
    }

    /// DNS name to re-resolve, `host:port`.
    pub fn dns(&self) -> Option<&str> {
        self.dns.as_deref()
    }

    /// DNS re-resolution interval.
    pub fn dns_interval(&self) -> Duration {
        self.dns_interval
    }

    /// Maglev table size (prime).
    pub fn table_size(&self) -> usize {
        self.table_size
    }

    /// Health-check interval.
    pub fn health_interval(&self) -> Duration {
        self.health_interval
    }

    /// Time one health check may take.
    pub fn health_timeout(&self) -> Duration {
        self.health_timeout
    }

    /// Passed checks to come back.
    pub fn health_rise(&self) -> u32 {
        self.health_rise
    }

    /// Failed checks to leave.
    pub fn health_fall(&self) -> u32 {
        self.health_fall
    }

    /// Whether nodes get a PROXY v2 header.
    pub fn proxy_protocol(&self) -> bool {
        self.proxy_protocol
    }

    /// Time for the client's request head.
    pub fn head_timeout(&self) -> Duration {
        self.head_timeout
    }

    /// Time to connect to a node.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Silence both ways that closes a piped connection.
    pub fn tunnel_idle_timeout(&self) -> Duration {
        self.tunnel_idle_timeout
    }

    /// Most client connections.
    pub fn connections_max(&self) -> usize {
        self.connections_max
    }

    /// Time shutdown waits for connections.
    pub fn drain_timeout(&self) -> Duration {
        self.drain_timeout
    }
}

impl Config {
    /// Merges flags over the file over defaults, resolves static nodes, and
    /// validates.
    pub fn from_args(args: &Args) -> Result<Config, ConfigError> {
        let file: FileConfig = read_file(args.config.as_deref())?;
        let ms = Duration::from_millis;
        let names = if args.nodes.is_empty() { &file.nodes } else { &args.nodes };
        let config = Config {
            listen: pick!(args, file, listen, SocketAddr::from(([0, 0, 0, 0], 9080))),
            admin_listen: pick!(args, file, admin_listen, SocketAddr::from(([127, 0, 0, 1], 9081))),
            shards: pick!(args, file, shards, online_cores()),
            nodes: resolve_all(names)?,
            dns: args.dns.clone().or(file.dns),
            dns_interval: ms(pick!(args, file, dns_interval_ms, 5_000)),
            table_size: pick!(args, file, table_size, maglev::TABLE_SIZE_DEFAULT),
            health_interval: ms(pick!(args, file, health_interval_ms, 2_000)),
            health_timeout: ms(pick!(args, file, health_timeout_ms, 1_000)),
            health_rise: pick!(args, file, health_rise, 2),
            health_fall: pick!(args, file, health_fall, 3),
            proxy_protocol: args.proxy_protocol || file.proxy_protocol.unwrap_or(false),
            head_timeout: ms(pick!(args, file, head_timeout_ms, 10_000)),
            connect_timeout: ms(pick!(args, file, connect_timeout_ms, 2_000)),
            tunnel_idle_timeout: ms(pick!(args, file, tunnel_idle_timeout_ms, 600_000)),
            connections_max: pick!(args, file, connections_max, 8_192),
            drain_timeout: ms(pick!(args, file, drain_timeout_ms, 10_000)),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let fail = |m: String| Err(ConfigError::Invalid(m));
        if self.shards == 0 || self.shards > SHARDS_MAX {
            return fail(format!("shards must be 1..={SHARDS_MAX}, got {}", self.shards));
        }
        if self.nodes.is_empty() && self.dns.is_none() {
            return fail("give at least one --node or a --dns name".into());
        }
        if self.nodes.len() > maglev::NODES_MAX {
            return fail(format!("at most {} nodes", maglev::NODES_MAX));
        }
        if let Err(e) = maglev::Table::build::<&str>(&[], self.table_size) {
            return fail(e.to_string());
        }
        if self.health_rise == 0 || self.health_fall == 0 {
            return fail("health_rise and health_fall must be at least 1".into());
        }
        if self.connections_max < self.shards {
            return fail("connections_max must be at least one per shard".into());
        }
        for (name, value) in [
            ("dns_interval_ms", self.dns_interval),
            ("health_interval_ms", self.health_interval),
            ("health_timeout_ms", self.health_timeout),
            ("head_timeout_ms", self.head_timeout),
            ("connect_timeout_ms", self.connect_timeout),
            ("tunnel_idle_timeout_ms", self.tunnel_idle_timeout),
            ("drain_timeout_ms", self.drain_timeout),
        ] {
            if value.is_zero() {
                return fail(format!("{name} must be at least 1"));
            }
        }
        Ok(())
    }

    /// Connections each shard may hold.
    pub fn connections_per_shard_max(&self) -> usize {
        self.connections_max / self.shards
    }
}

/// Resolves `host:port` names once; every address a name has becomes a node.
fn resolve_all(names: &[String]) -> Result<Vec<SocketAddr>, ConfigError> {
    let mut nodes = Vec::new();
    for name in names {
        let addrs =
            name.to_socket_addrs().map_err(|e| ConfigError::Invalid(format!("node {name:?} does not resolve: {e}")))?;
        for addr in addrs {
            if !nodes.contains(&addr) {
                nodes.push(addr);
            }
        }
    }
    Ok(nodes)
}

fn online_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(SHARDS_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["fluxbalancer"];
        v.extend_from_slice(extra);
        Args::parse_from(v)
    }

    #[test]
    fn defaults_with_one_node() {
        let c = Config::from_args(&args(&["--node", "127.0.0.1:8080"])).expect("valid");
        assert_eq!(c.listen.port(), 9080);
        assert_eq!(c.nodes, vec![SocketAddr::from(([127, 0, 0, 1], 8080))]);
        assert_eq!(c.table_size, maglev::TABLE_SIZE_DEFAULT);
    }

    #[test]
    fn file_flags_and_refusals() {
        let dir = std::env::temp_dir().join(format!("fluxbalancer-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, "nodes = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\nshards = 1\nhealth_rise = 5\n").unwrap();
        let c = Config::from_args(&args(&["--config", good.to_str().unwrap(), "--health-rise", "1"])).unwrap();
        assert_eq!((c.nodes.len(), c.shards, c.health_rise), (2, 1, 1));
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "nodez = []\n").unwrap();
        assert!(matches!(
            Config::from_args(&args(&["--config", bad.to_str().unwrap()])),
            Err(ConfigError::Parse { .. })
        ));
        assert!(Config::from_args(&args(&[])).is_err(), "no nodes and no DNS");
        assert!(Config::from_args(&args(&["--node", "127.0.0.1:1", "--table-size", "65536"])).is_err());
        assert!(Config::from_args(&args(&["--node", "127.0.0.1:1", "--health-fall", "0"])).is_err());
        assert!(Config::from_args(&args(&["--node", "no such host.invalid:1"])).is_err());
        assert!(Config::from_args(&args(&["--dns", "localhost:1"])).is_ok());
    }
}
