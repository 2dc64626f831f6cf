//! fluxctl: the operator's tool for FluxNode and FluxBalancer. It talks to
//! their HTTP APIs with the body types of `proto::admin` (the same types the
//! servers render), and to a node's native WebSocket for `sub`.
//!
//! Exit codes: 0 done; 1 the server answered with an error (its status,
//! code and message are printed); 2 bad usage (clap); 3 the server could
//! not be reached.

mod client;
mod render;
mod restore;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

use client::{Client, Failure};

const EXAMPLES: &str = "\
Examples:
  fluxctl topics list --prefix orders
  fluxctl topics create orders --ack local --max-age-ms 604800000
  fluxctl pub orders 'placed' --key order-17
  fluxctl sub orders --from 0 --count 10
  fluxctl sub orders --key order-17            # every event of one aggregate
  fluxctl stats                                # live rates, Ctrl-C to stop
  fluxctl latency --hgrm node.hgrm --plot node.svg
  fluxctl snapshot create && fluxctl snapshot list
  fluxctl snapshot restore latest --data-dir /var/lib/fluxnode --object-store s3://bucket/node-a
  fluxctl topology show --balancer 127.0.0.1:9081
  fluxctl completions bash > /etc/bash_completion.d/fluxctl";

/// The operator's tool for RayFlux.
#[derive(Debug, Parser)]
#[command(name = "fluxctl", version, about, after_help = EXAMPLES)]
struct Cli {
    /// A node's HTTP address (host:port).
    #[arg(long, env = "FLUXCTL_NODE", default_value = "127.0.0.1:8080", global = true)]
    node: String,
    /// The balancer's admin address (host:port).
    #[arg(long, env = "FLUXCTL_BALANCER", default_value = "127.0.0.1:9081", global = true)]
    balancer: String,
    /// How to print results.
    #[arg(long, short, value_enum, default_value = "table", global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// The servers' JSON, one document (or one line per message).
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List, show, create (make durable) and delete topics.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Publish one message.
    Pub {
        /// The topic.
        topic: String,
        /// The payload (sent as text).
        data: String,
        /// Routing key / aggregate id.
        #[arg(long)]
        key: Option<String>,
        /// Acknowledgement level on a durable topic: none or local.
        #[arg(long)]
        ack: Option<String>,
    },
    /// Print a topic's messages: live (optionally resuming), from a time,
    /// or every message with a key (durable topics).
    Sub {
        /// The topic.
        topic: String,
        /// Resume after this sequence number (0: from the oldest retained).
        #[arg(long, conflicts_with_all = ["since", "key"])]
        from: Option<u64>,
        /// Start at the first message at or after this time (ms since the
        /// Unix epoch; durable topics).
        #[arg(long, conflicts_with = "key")]
        since: Option<u64>,
        /// Print every message with this key, in order, and stop (durable
        /// topics).
        #[arg(long)]
        key: Option<String>,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Live rates of a node, refreshing in place (Ctrl-C stops).
    Stats {
        /// Print one snapshot of the totals and stop.
        #[arg(long)]
        once: bool,
        /// Refresh period, ms.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
    /// A node's delivery latency percentiles (publish to socket write),
    /// every shard merged: a table, and optionally a `.hgrm` file and an SVG
    /// plot of the distribution.
    Latency {
        /// Also write the distribution in HdrHistogram's `.hgrm` text form.
        #[arg(long, value_name = "FILE")]
        hgrm: Option<std::path::PathBuf>,
        /// Also write an SVG plot of the distribution (latency against
        /// percentile, log scale).
        #[arg(long, value_name = "FILE")]
        plot: Option<std::path::PathBuf>,
    },
    /// Snapshots of the durable topics in the object store (create, list,
    /// show, delete through a node; restore offline into a data directory,
    /// or start a node on an empty one with `fluxnode --restore ID`).
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
    /// The balancer's nodes.
    Topology {
        #[command(subcommand)]
        command: TopologyCommand,
    },
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum TopicsCommand {
    /// One page of topics, in name order.
    List {
        /// Only names starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Most topics to list (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this name (the `next` of the previous page).
        #[arg(long)]
        after: Option<String>,
    },
    /// One topic: sequence range, subscribers, rate, durability.
    Show {
        /// The topic.
        topic: String,
    },
    /// Make a topic durable (or change its declaration).
    Create {
        /// The topic.
        topic: String,
        /// Default acknowledgement level: none or local.
        #[arg(long, default_value = "local")]
        ack: String,
        /// Drop log segments older than this, ms.
        #[arg(long)]
        max_age_ms: Option<u64>,
        /// Keep about this many bytes of log.
        #[arg(long)]
        max_bytes: Option<u64>,
        /// Keep about this many messages of log.
        #[arg(long)]
        max_messages: Option<u64>,
    },
    /// Delete a durable topic's log (the topic stays, ephemeral).
    Delete {
        /// The topic.
        topic: String,
    },
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Make a snapshot now (waits until every segment is uploaded, with a
    /// progress bar on a terminal).
    Create,
    /// The snapshots in the object store, oldest first.
    List,
    /// One snapshot's manifest (`latest` or an id).
    Show {
        /// `latest` or an id.
        id: String,
    },
    /// Delete a snapshot's manifest (its segments stay).
    Delete {
        /// The id.
        id: String,
    },
    /// Restore a snapshot into an empty data directory, offline (then start
    /// fluxnode on it): the segments each topic's retention keeps on disk
    /// are downloaded, older ones stay in the store and are read from there.
    Restore {
        /// `latest` or an id.
        id: String,
        #[command(flatten)]
        target: restore::RestoreTarget,
    },
}

#[derive(Debug, Subcommand)]
enum TopologyCommand {
    /// Every node the balancer knows, its health and traffic.
    Show,
    /// Add a node.
    Add {
        /// ip:port
        addr: String,
    },
    /// Remove a node (its open connections stay).
    Remove {
        /// ip:port
        addr: String,
    },
    /// Stop sending new connections to a node.
    Drain {
        /// ip:port
        addr: String,
    },
    /// Make a drained node routable again.
    Undrain {
        /// ip:port
        addr: String,
    },
    /// The node a topic's connections go to now.
    Locate {
        /// The topic.
        topic: String,
    },
    /// The cluster as `--node` sees it: membership, version, each member's
    /// health and traffic between nodes, and with `--topic` its owner.
    Cluster {
        /// Also show which member owns this topic.
        #[arg(long)]
        topic: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("fluxctl: {failure}");
            ExitCode::from(failure.exit_code())
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let node = Client::new(&cli.node);
    let out = cli.output;
    match cli.command {
        Command::Topics { command } => match command {
            TopicsCommand::List { prefix, limit, after } => {
                let mut path = format!("/v1/topics?limit={limit}&prefix={}", client::encode(&prefix));
                if let Some(after) = after {
                    path.push_str(&format!("&after={}", client::encode(&after)));
                }
                let page: proto::admin::TopicPage = node.get(&path)?;
                render::topic_page(out, &page);
            }
            TopicsCommand::Show { topic } => {
                let info: proto::admin::TopicInfo = node.get(&format!("/v1/topics/{topic}"))?;
                render::topic(out, &info);
            }
            TopicsCommand::Create { topic, ack, max_age_ms, max_bytes, max_messages } => {
                let body = serde_json::json!({
                    "ack": ack,
                    "retention": {"max_age_ms": max_age_ms, "max_bytes": max_bytes, "max_messages": max_messages},
                });
                let status: proto::admin::StatusBody = node.send("PUT", &format!("/v1/topics/{topic}"), &body)?;
                render::status(out, &format!("{topic} is durable"), &status);
            }
            TopicsCommand::Delete { topic } => {
                let status: proto::admin::StatusBody =
                    node.send("DELETE", &format!("/v1/topics/{topic}"), &serde_json::Value::Null)?;
                render::status(out, &format!("{topic}: log deleted"), &status);
            }
        },
        Command::Pub { topic, data, key, ack } => {
            let mut path = format!("/v1/topics/{topic}");
            let params: Vec<String> = [("key", key), ("ack", ack)]
                .into_iter()
                .filter_map(|(n, v)| v.map(|v| format!("{n}={}", client::encode(&v))))
                .collect();
            if !params.is_empty() {
                path = format!("{path}?{}", params.join("&"));
            }
            let answer: proto::admin::PublishAnswer = node.publish(&path, data.as_bytes())?;
            render::published(out, &answer);
        }
        Command::Sub { topic, from, since, key, count } => {
            client::subscribe(&node, &topic, client::Start { from, since, key }, count, out)?
        }
        Command::Stats { once, interval_ms } => client::stats(&node, once, interval_ms, out)?,
        Command::Latency { hgrm, plot } => {
            let report: proto::admin::LatencyReport = node.get("/v1/latency")?;
            render::latency(out, &report);
            let write = |path: &std::path::Path, body: String| {
                std::fs::write(path, body).map_err(|e| Failure::Local(format!("{}: {e}", path.display())))
            };
            if let Some(path) = hgrm {
                write(&path, render::hgrm(&report))?;
            }
            if let Some(path) = plot {
                write(&path, render::plot_svg(&report))?;
            }
        }
        Command::Snapshot { command } => match command {
            SnapshotCommand::Create => render::snapshot_made(out, &restore::create(&node)?),
            SnapshotCommand::Restore { id, target } => {
                let done = restore::restore(&id, &target)?;
                render::restored(out, &id, &target.data_dir, &done);
            }
            SnapshotCommand::List => {
                let list: proto::admin::SnapshotList = node.get("/v1/snapshots")?;
                render::snapshot_list(out, &list);
            }
            SnapshotCommand::Show { id } => {
                let manifest: proto::admin::Manifest = node.get(&format!("/v1/snapshots/{id}"))?;
                render::manifest(out, &manifest);
            }
            SnapshotCommand::Delete { id } => {
                let status: proto::admin::StatusBody =
                    node.send("DELETE", &format!("/v1/snapshots/{id}"), &serde_json::Value::Null)?;
                render::status(out, &format!("snapshot {id} deleted"), &status);
            }
        },
        Command::Topology { command } => {
            let balancer = Client::new(&cli.balancer);
            match command {
                TopologyCommand::Show => {
                    let list: proto::admin::NodeList = balancer.get("/v1/nodes")?;
                    render::nodes(out, &list);
                }
                TopologyCommand::Add { addr } => {
                    let body = serde_json::json!({ "addr": addr });
                    let v: serde_json::Value = balancer.send("POST", "/v1/nodes", &body)?;
                    render::value(out, &format!("added {addr}"), &v);
                }
                TopologyCommand::Remove { addr } => {
                    let v: serde_json::Value =
                        balancer.send("DELETE", &format!("/v1/nodes/{addr}"), &serde_json::Value::Null)?;
                    render::value(out, &format!("removed {addr}"), &v);
                }
                TopologyCommand::Drain { addr } => {
                    let v: serde_json::Value =
                        balancer.send("POST", &format!("/v1/nodes/{addr}/drain"), &serde_json::Value::Null)?;
                    render::value(out, &format!("draining {addr}"), &v);
                }
                TopologyCommand::Cluster { topic } => {
                    let query = topic.map(|t| format!("?topic={}", client::encode(&t))).unwrap_or_default();
                    let view: proto::admin::ClusterBody = node.get(&format!("/v1/cluster{query}"))?;
                    let members: Vec<render::MemberRow> = view
                        .members
                        .iter()
                        .map(|m| {
                            let member = Client::new(m);
                            let ready = member.get_text("/readyz").is_ok();
                            let seen: Option<proto::admin::ClusterBody> = member.get("/v1/cluster").ok();
                            let metrics = member.get_text("/metrics").map(|t| client::parse_metrics(&t)).ok();
                            let metric = |name: &str| metrics.as_ref().and_then(|m| m.get(name).copied());
                            render::MemberRow {
                                addr: m.clone(),
                                health: match (&seen, ready) {
                                    (None, _) => "unreachable",
                                    (Some(_), true) => "ready",
                                    (Some(_), false) => "not ready",
                                }
                                .into(),
                                version: seen.map(|s| s.version),
                                forwarded: metric("fluxnode_messages_forwarded_total").map(|v| v as u64),
                                followed: metric("fluxnode_messages_followed_total").map(|v| v as u64),
                                links_lost: metric("fluxnode_links_lost_total").map(|v| v as u64),
                            }
                        })
                        .collect();
                    render::cluster(out, &view, &members);
                }
                TopologyCommand::Locate { topic } => {
                    let located: proto::admin::Located =
                        balancer.get(&format!("/v1/locate?topic={}", client::encode(&topic)))?;
                    render::located(out, &located);
                }
                TopologyCommand::Undrain { addr } => {
                    let v: serde_json::Value =
                        balancer.send("POST", &format!("/v1/nodes/{addr}/undrain"), &serde_json::Value::Null)?;
                    render::value(out, &format!("{addr} routable again"), &v);
                }
            }
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "fluxctl", &mut std::io::stdout());
        }
    }
    Ok(())
}
