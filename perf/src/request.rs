//! The request scenario: requesters send requests open-loop to one topic,
//! responders (one consumer group) answer each with its own payload, and a
//! request's latency is from its scheduled send time to its reply (the
//! round trip, coordinated omission corrected).
//!
//! - RayFlux: requesters use the native `request` op (one connection each,
//!   many requests in flight, told apart by id); responders are members of
//!   group `bench` (prefetch as given) and answer with `reply`, which also
//!   acknowledges the request's delivery.
//! - NATS: responders are a queue group (`SUB topic bench`) answering to
//!   each message's reply subject; requesters publish with a reply subject
//!   under one wildcard inbox subscription each (`_INBOX.x.*`), as the
//!   NATS clients' request multiplexer does.
//!
//! A request without a reply by the end of the quiet period counts as lost
//! (RayFlux answers a timeout after 5 s: also lost).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use tungstenite::Message;

use crate::scenario::{decode, encode, is_read_timeout, Shape, QUIET_SECONDS};
use crate::{nats, process_cpu_seconds, unix_micros, Conn, Kind, Run, Target};

/// How the request scenario's responders take requests.
#[derive(Clone, Copy, Debug)]
pub struct RequestShape {
    /// Responders (members of one group).
    pub responders: usize,
    /// RayFlux: requests a responder holds unanswered at most.
    pub prefetch: u32,
}

/// How long a RayFlux request waits for its reply.
const REQUEST_TIMEOUT_MS: u64 = 5_000;
/// A requester's nap when it has nothing to send or read (its socket is
/// non-blocking: a read timeout would round up to the kernel's tick, 4 ms
/// here, and measure the client instead of the server).
const REQUESTER_NAP: Duration = Duration::from_micros(20);

/// Runs the request scenario once: `shape.publishers` requesters at
/// `shape.rate` requests per second together.
pub fn run(target: &Target, shape: &Shape, topic: &str, request: RequestShape, turn: usize) -> Result<Run> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut responders = Vec::new();
    for _ in 0..request.responders {
        let conn = Conn::open_member(target, topic, request.prefetch)?;
        conn.ws.get_ref().set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = stop.clone();
        responders.push(std::thread::spawn(move || respond(conn, &stop)));
    }
    let requesters_n = shape.publishers.max(1) as u64;
    let expected = shape.rate * shape.seconds;
    let mut requesters = Vec::new();
    for r in 0..requesters_n {
        let mut conn = Conn::open_native(target, topic)?;
        if target.kind == Kind::Nats {
            conn.nats_start(Some(format!("SUB {}.* 1\r\n", inbox(r))))?;
        }
        conn.ws.get_ref().set_nonblocking(true)?;
        requesters.push(conn);
    }
    let cpu_server_start = target.server_cpu_seconds()?;
    let cpu_client_start = process_cpu_seconds(std::process::id())?;
    let start = Instant::now();
    let start_unix_us = unix_micros();
    let (rate, seconds, payload) = (shape.rate, shape.seconds, shape.payload);
    let threads: Vec<_> = requesters
        .into_iter()
        .enumerate()
        .map(|(r, conn)| {
            let r = r as u64;
            // Requester r sends requests k = r, r + n, r + 2n, ...
            let ks: Vec<u64> = (r..expected).step_by(requesters_n as usize).collect();
            std::thread::spawn(move || request_loop(conn, r, ks, rate, seconds, payload, start, start_unix_us))
        })
        .collect();
    // Rates are per second of the schedule (requests offered over it).
    let mut run = Run::new(&target.name, &shape.name, turn, expected, shape.seconds as f64)?;
    for t in threads {
        let (answered, latency) = t.join().map_err(|_| anyhow::anyhow!("requester panicked"))??;
        run.delivered += answered;
        run.latency_us.add(&latency)?;
    }
    run.lost = expected - run.delivered;
    if let (Some(now), Some(before)) = (target.server_cpu_seconds()?, cpu_server_start) {
        run.server_cpu_seconds = Some(now - before);
    }
    run.client_cpu_seconds = process_cpu_seconds(std::process::id())? - cpu_client_start;
    stop.store(true, Ordering::Relaxed);
    for r in responders {
        let _ = r.join();
    }
    Ok(run)
}

/// NATS: requester `r`'s inbox prefix.
fn inbox(r: u64) -> String {
    format!("_INBOX.fluxbench{}.{r}", std::process::id())
}

/// One requester: sends its requests when due, reads replies in between;
/// the number answered and their round trips.
#[allow(clippy::too_many_arguments)]
fn request_loop(
    mut conn: Conn,
    r: u64,
    ks: Vec<u64>,
    rate: u64,
    seconds: u64,
    payload: usize,
    start: Instant,
    start_unix_us: u64,
) -> Result<(u64, Histogram<u64>)> {
    let mut latency = Histogram::<u64>::new(3)?;
    let mut waiting: HashSet<u64> = HashSet::with_capacity(ks.len());
    let mut next = 0;
    let give_up = start + Duration::from_secs(seconds + QUIET_SECONDS);
    let mut answered = 0;
    while (next < ks.len() || !waiting.is_empty()) && Instant::now() < give_up {
        let elapsed_us = start.elapsed().as_micros() as u64;
        let mut busy = false;
        while next < ks.len() && ks[next] * 1_000_000 / rate <= elapsed_us {
            let k = ks[next];
            let body = encode(r, k, start_unix_us + k * 1_000_000 / rate, payload);
            send_request(&mut conn, r, k, &body)?;
            waiting.insert(k);
            next += 1;
            busy = true;
        }
        match conn.flush() {
            Err(e) if is_read_timeout(&e) => {} // the socket is full: next turn
            other => other?,
        }
        loop {
            match recv_reply(&mut conn) {
                Ok(Some(data)) => {
                    busy = true;
                    if let Some((_, k, due)) = decode(&data) {
                        if waiting.remove(&k) {
                            answered += 1;
                            let _ = latency.record(unix_micros().saturating_sub(due).max(1));
                        }
                    }
                }
                Ok(None) => busy = true,
                Err(e) if is_read_timeout(&e) => break,
                Err(e) => return Err(e),
            }
        }
        if !busy {
            std::thread::sleep(REQUESTER_NAP);
        }
    }
    Ok((answered, latency))
}

fn send_request(conn: &mut Conn, r: u64, k: u64, body: &[u8]) -> Result<()> {
    let text = String::from_utf8_lossy(body);
    match conn.kind {
        Kind::Rayflux => {
            let request = serde_json::json!({"op":"request","id":k,"topic":conn.subject,"data":text,
                "timeout_ms":REQUEST_TIMEOUT_MS});
            conn.ws.write(Message::text(request.to_string()))?;
        }
        Kind::Nats => {
            let frame = format!("PUB {} {}.{k} {}\r\n{text}\r\n", conn.subject, inbox(r), body.len());
            conn.nats_command(frame.as_bytes())?;
        }
    }
    Ok(())
}

/// A requester's next reply's payload (`None`: something else arrived).
fn recv_reply(conn: &mut Conn) -> Result<Option<Vec<u8>>> {
    match conn.kind {
        Kind::Rayflux => match conn.ws.read()? {
            Message::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(&t)?;
                if v["type"] == "reply" && v["ok"] == true {
                    return Ok(v["data"].as_str().map(|d| d.as_bytes().to_vec()));
                }
                Ok(None)
            }
            _ => Ok(None),
        },
        Kind::Nats => match conn.next_op()? {
            nats::Op::Msg(payload) | nats::Op::MsgReply { payload, .. } => Ok(Some(payload)),
            nats::Op::Ping => {
                conn.nats_command(b"PONG\r\n")?;
                conn.flush()?;
                Ok(None)
            }
            nats::Op::Err(e) => bail!("NATS error: {e}"),
            _ => Ok(None),
        },
    }
}

/// A responder: answers every request with its own payload until `stop`.
fn respond(mut conn: Conn, stop: &AtomicBool) -> Result<()> {
    while !stop.load(Ordering::Relaxed) {
        let answered = match conn.kind {
            Kind::Rayflux => match conn.ws.read() {
                Ok(Message::Text(t)) => {
                    let m: serde_json::Value = serde_json::from_str(&t)?;
                    if m["type"] != "message" {
                        continue;
                    }
                    let to = m["reply_to"].as_str().context("a request without reply_to")?;
                    let reply = serde_json::json!({"op":"reply","to":to,"data":m["data"],"topic":m["topic"],
                        "group":"bench","seq":m["seq"]});
                    conn.ws.write(Message::text(reply.to_string()))?;
                    true
                }
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    false
                }
                Err(e) => return Err(e.into()),
            },
            Kind::Nats => match conn.next_op() {
                Ok(nats::Op::MsgReply { payload, reply }) => {
                    let mut frame = format!("PUB {reply} {}\r\n", payload.len()).into_bytes();
                    frame.extend_from_slice(&payload);
                    frame.extend_from_slice(b"\r\n");
                    conn.nats_command(&frame)?;
                    true
                }
                Ok(nats::Op::Ping) => {
                    conn.nats_command(b"PONG\r\n")?;
                    false
                }
                Ok(_) => continue,
                Err(e) if is_read_timeout(&e) => false,
                Err(e) => return Err(e),
            },
        };
        // Each answer goes at once (a responder does not know whether
        // another request is coming), as NATS clients flush a reply.
        if answered {
            conn.flush()?;
        }
    }
    Ok(())
}
