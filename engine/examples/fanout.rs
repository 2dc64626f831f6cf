//! A first fan-out measurement (the full load generator is `perf/fluxbench`,
//! a later piece of work): one publisher, N subscribers on one topic over raw
//! topic sockets, against a running node.
//!
//! Usage: cargo run --release --example fanout -- ADDR NODE_PID [SUBSCRIBERS] [SECONDS] [RATE]
//!
//! RATE is messages per second offered by the publisher (0: as fast as the
//! slowest subscriber allows, with a bounded window). Prints delivered
//! messages per second and the node's CPU-seconds per million deliveries
//! (utime + stime from /proc/PID/stat), which stays meaningful when this
//! client, sharing the machine, is the bottleneck.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tungstenite::Message;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr = args.get(1).cloned().unwrap_or_else(|| "127.0.0.1:8080".into());
    let pid: u32 = args.get(2).and_then(|p| p.parse().ok()).expect("node pid");
    let subscribers: usize = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(100);
    let seconds: u64 = args.get(4).and_then(|v| v.parse().ok()).unwrap_or(10);
    let rate: u64 = args.get(5).and_then(|v| v.parse().ok()).unwrap_or(0);
    let topic = format!("fanout{}", std::process::id());
    let delivered = Arc::new(AtomicU64::new(0));
    let min_seen = Arc::new((0..subscribers).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
    let histograms = Arc::new(std::sync::Mutex::new(hdrhistogram::Histogram::<u64>::new(3).unwrap()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for i in 0..subscribers {
        let stream = TcpStream::connect(&addr).unwrap();
        let (mut ws, _) = tungstenite::client(format!("ws://{addr}/v1/topics/{topic}/ws?role=sub"), stream).unwrap();
        let (delivered, min_seen, stop, histograms) =
            (delivered.clone(), min_seen.clone(), stop.clone(), histograms.clone());
        threads.push(std::thread::spawn(move || {
            let mut n = 0u64;
            let mut latency = hdrhistogram::Histogram::<u64>::new(3).unwrap();
            while !stop.load(Ordering::Relaxed) {
                match ws.read() {
                    Ok(Message::Binary(payload)) => {
                        // Latency from the publisher's send time carried in the payload
                        // (same machine, same clock).
                        let sent = u64::from_le_bytes(payload[..8].try_into().unwrap());
                        let _ = latency.record(unix_micros().saturating_sub(sent));
                        n += 1;
                        delivered.fetch_add(1, Ordering::Relaxed);
                        min_seen[i].store(n, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            histograms.lock().unwrap().add(&latency).unwrap();
        }));
    }
    let stream = TcpStream::connect(&addr).unwrap();
    let (mut publisher, _) = tungstenite::client(format!("ws://{addr}/v1/topics/{topic}/ws?role=pub"), stream).unwrap();
    let payload = vec![7u8; 64];
    let cpu_start = cpu_seconds(pid);
    let start = Instant::now();
    let mut sent = 0u64;
    let window = 2000u64;
    while start.elapsed() < Duration::from_secs(seconds) {
        if rate > 0 {
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            if sent >= due {
                let _ = publisher.flush();
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
        } else if sent.is_multiple_of(100) {
            let _ = publisher.flush();
            while sent > window + min_seen.iter().map(|m| m.load(Ordering::Relaxed)).min().unwrap_or(0) {
                std::thread::yield_now();
            }
        }
        let mut payload = payload.clone();
        payload[..8].copy_from_slice(&unix_micros().to_le_bytes());
        publisher.write(Message::binary(payload)).unwrap();
        sent += 1;
    }
    publisher.flush().unwrap();
    let elapsed = start.elapsed().as_secs_f64();
    let got = delivered.load(Ordering::Relaxed);
    let cpu = cpu_seconds(pid) - cpu_start;
    stop.store(true, Ordering::Relaxed);
    // Wake every subscriber so it records its histogram, then merge.
    let _ = publisher.send(Message::binary(unix_micros().to_le_bytes().to_vec()));
    for t in threads {
        let _ = t.join();
    }
    let h = histograms.lock().unwrap();
    println!(
        "latency (send to receive, us): p50={} p90={} p99={} p99.9={} max={}",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.9),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    );
    println!(
        "subscribers={subscribers} published={sent} delivered={got} in {elapsed:.1}s: {:.0} published/s, {:.0} delivered/s; node CPU {cpu:.2}s = {:.3} CPU-s per million deliveries",
        sent as f64 / elapsed,
        got as f64 / elapsed,
        cpu / (got as f64 / 1e6)
    );
    std::process::exit(0);
}

fn unix_micros() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64
}

/// utime + stime of a process, seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}
