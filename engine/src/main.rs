//! `fluxnode`: runs one FluxNode. See `fluxnode --help`.

use std::io::Write;
use std::sync::atomic::Ordering;

use clap::Parser;
use fluxnode::config::{Args, Config};
use fluxnode::server::Node;

fn main() {
    fluxnode::runtime::init_tracing("FLUXNODE_LOG");
    let args = Args::parse();
    let config = match Config::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fluxnode: {e}");
            std::process::exit(2);
        }
    };
    let node = match Node::bind(&config) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("fluxnode: {e}");
            std::process::exit(1);
        }
    };
    let shared = node.shared.clone();
    // Readiness drops first so /readyz answers 503 while connections drain.
    fluxnode::runtime::stop_on_signals("fluxnode", move || {
        shared.ready.store(false, Ordering::Release);
        shared.shutdown.store(true, Ordering::Release);
    });
    let shards = config.shards;
    let on_ready = move |addr| {
        // Tests and scripts read this line: the node accepts from now on.
        println!("fluxnode listening on {addr} with {shards} shards");
        let _ = std::io::stdout().flush();
    };
    if let Err(e) = node.run(config, on_ready) {
        eprintln!("fluxnode: {e}");
        std::process::exit(1);
    }
    tracing::info!("stopped");
}
