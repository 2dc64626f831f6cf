//! `fluxnode`: runs one FluxNode. See `fluxnode --help`.

use std::io::Write;
use std::sync::atomic::Ordering;

use clap::Parser;
use fluxnode::config::{Args, Config};
use fluxnode::server::Node;
use runtime::or_exit;

fn main() {
    runtime::init_tracing("FLUXNODE_LOG");
    let config = or_exit("fluxnode", 2, Config::from_args(&Args::parse()));
    let node = or_exit("fluxnode", 1, Node::bind(&config));
    let shared = node.shared.clone();
    // Readiness drops first so /readyz answers 503 while connections drain.
    runtime::stop_on_signals("fluxnode", move || {
        shared.ready.store(false, Ordering::Release);
        shared.shutdown.store(true, Ordering::Release);
    });
    let shards = config.shards();
    let on_ready = move |addr| {
        // Tests and scripts read this line: the node accepts from now on.
        println!("fluxnode listening on {addr} with {shards} shards");
        let _ = std::io::stdout().flush();
    };
    or_exit("fluxnode", 1, node.run(config, on_ready));
    tracing::info!("stopped");
}
