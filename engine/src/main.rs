//! `fluxnode`: runs one FluxNode. See `fluxnode --help`.

use std::io::Write;
use std::sync::atomic::Ordering;

use clap::Parser;
use fluxnode::config::{Args, Config};
use fluxnode::server::Node;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("FLUXNODE_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
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
    let signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT]);
    match signals {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                let mut received = 0;
                for signal in signals.forever() {
                    received += 1;
                    if received > 1 {
                        eprintln!("fluxnode: second signal {signal}, exiting now");
                        std::process::exit(1);
                    }
                    tracing::info!(signal, "shutting down: draining connections");
                    shared.ready.store(false, Ordering::Release);
                    shared.shutdown.store(true, Ordering::Release);
                }
            });
        }
        Err(e) => tracing::warn!("cannot install signal handlers: {e}"),
    }
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
