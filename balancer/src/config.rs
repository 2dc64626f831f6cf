//! Configuration: command-line flags and an optional TOML file, merged and
//! validated once into [`Config`]. A flag beats the file, the file beats
//! the default; unknown keys in the file are refused.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

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
    pub listen: SocketAddr,
    /// Admin address, served by shard 0.
    pub admin_listen: SocketAddr,
    /// Number of shards, 1..=SHARDS_MAX.
    pub shards: usize,
    /// Static nodes, resolved.
    pub nodes: Vec<SocketAddr>,
    /// DNS name to re-resolve, `host:port`.
    pub dns: Option<String>,
    /// DNS re-resolution interval.
    pub dns_interval: Duration,
    /// Maglev table size (prime).
    pub table_size: usize,
    /// Health-check interval.
    pub health_interval: Duration,
    /// Time one health check may take.
    pub health_timeout: Duration,
    /// Passed checks to come back.
    pub health_rise: u32,
    /// Failed checks to leave.
    pub health_fall: u32,
    /// Whether nodes get a PROXY v2 header.
    pub proxy_protocol: bool,
    /// Time for the client's request head.
    pub head_timeout: Duration,
    /// Time to connect to a node.
    pub connect_timeout: Duration,
    /// Silence both ways that closes a piped connection.
    pub tunnel_idle_timeout: Duration,
    /// Most client connections.
    pub connections_max: usize,
    /// Time shutdown waits for connections.
    pub drain_timeout: Duration,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named by `--config` could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The file is not valid TOML, or has an unknown key or a wrong type.
    #[error("invalid config file {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    /// A value is out of range, or a node name does not resolve.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Merges flags over the file over defaults, resolves static nodes, and
    /// validates.
    pub fn from_args(args: &Args) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                toml::from_str::<FileConfig>(&text)
                    .map_err(|source| ConfigError::Parse { path: path.clone(), source })?
            }
            None => FileConfig::default(),
        };
        let ms = Duration::from_millis;
        macro_rules! pick {
            ($field:ident, $default:expr) => {
                args.$field.or(file.$field).unwrap_or($default)
            };
        }
        let names = if args.nodes.is_empty() { &file.nodes } else { &args.nodes };
        let config = Config {
            listen: pick!(listen, SocketAddr::from(([0, 0, 0, 0], 9080))),
            admin_listen: pick!(admin_listen, SocketAddr::from(([127, 0, 0, 1], 9081))),
            shards: pick!(shards, online_cores()),
            nodes: resolve_all(names)?,
            dns: args.dns.clone().or(file.dns),
            dns_interval: ms(pick!(dns_interval_ms, 5_000)),
            table_size: pick!(table_size, maglev::TABLE_SIZE_DEFAULT),
            health_interval: ms(pick!(health_interval_ms, 2_000)),
            health_timeout: ms(pick!(health_timeout_ms, 1_000)),
            health_rise: pick!(health_rise, 2),
            health_fall: pick!(health_fall, 3),
            proxy_protocol: args.proxy_protocol || file.proxy_protocol.unwrap_or(false),
            head_timeout: ms(pick!(head_timeout_ms, 10_000)),
            connect_timeout: ms(pick!(connect_timeout_ms, 2_000)),
            tunnel_idle_timeout: ms(pick!(tunnel_idle_timeout_ms, 600_000)),
            connections_max: pick!(connections_max, 8_192),
            drain_timeout: ms(pick!(drain_timeout_ms, 10_000)),
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
