//! `fluxbalancer`: runs one balancer. See `fluxbalancer --help`.

use std::io::Write;
use std::sync::atomic::Ordering;

use clap::Parser;
use fluxbalancer::config::{Args, Config};
use fluxbalancer::server::Balancer;

fn main() {
    fluxnode::runtime::init_tracing("FLUXBALANCER_LOG");
    let args = Args::parse();
    let config = match Config::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fluxbalancer: {e}");
            std::process::exit(2);
        }
    };
    let balancer = match Balancer::bind(&config) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("fluxbalancer: {e}");
            std::process::exit(1);
        }
    };
    let shutdown = balancer.shutdown.clone();
    // No new connections from now on; open ones get drain_timeout to end.
    fluxnode::runtime::stop_on_signals("fluxbalancer", move || shutdown.store(true, Ordering::Release));
    let shards = config.shards;
    let on_ready = move |addr, admin| {
        // Tests and scripts read this line: the balancer accepts from now on.
        println!("fluxbalancer listening on {addr} (admin {admin}) with {shards} shards");
        let _ = std::io::stdout().flush();
    };
    if let Err(e) = balancer.run(config, on_ready) {
        eprintln!("fluxbalancer: {e}");
        std::process::exit(1);
    }
    tracing::info!("stopped");
}
