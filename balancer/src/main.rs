//! `fluxbalancer`: runs one balancer. See `fluxbalancer --help`.

use std::io::Write;
use std::sync::atomic::Ordering;

use clap::Parser;
use fluxbalancer::config::{Args, Config};
use fluxbalancer::server::Balancer;
use runtime::or_exit;

fn main() {
    runtime::init_tracing("FLUXBALANCER_LOG");
    let config = or_exit("fluxbalancer", 2, Config::from_args(&Args::parse()));
    let balancer = or_exit("fluxbalancer", 1, Balancer::bind(&config));
    let shutdown = balancer.shutdown.clone();
    // No new connections from now on; open ones get drain_timeout to end.
    runtime::stop_on_signals("fluxbalancer", move || shutdown.store(true, Ordering::Release));
    let shards = config.shards();
    let on_ready = move |addr, admin| {
        // Tests and scripts read this line: the balancer accepts from now on.
        println!("fluxbalancer listening on {addr} (admin {admin}) with {shards} shards");
        let _ = std::io::stdout().flush();
    };
    or_exit("fluxbalancer", 1, balancer.run(config, on_ready));
    tracing::info!("stopped");
}
