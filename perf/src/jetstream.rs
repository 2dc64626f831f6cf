//! NATS JetStream, the peer of a RayFlux consumer group with acks: a
//! stream on the topic's subject (memory or file storage, work-queue
//! retention: a message acknowledged is removed) and one durable pull
//! consumer with explicit acks that every member pulls from, as a NATS user
//! writes a worker pool. Everything goes through the JetStream API
//! (`$JS.API.*` request subjects) over the same WebSocket protocol as the
//! core NATS target.
//!
//! A member keeps pull requests outstanding for up to its prefetch
//! (`batch` at a time, asking again once half of it arrived), and
//! acknowledges each message with an empty publish to its reply subject
//! (`+ACK`), as `nats.py`'s and `nats.go`'s `Fetch` loops do.

use anyhow::{bail, Context, Result};
use tungstenite::Message;

use crate::{nats, Conn, Target};

/// How long one pull request waits for messages, in nanoseconds (then the
/// server answers 408 and the member asks again).
const PULL_EXPIRES_NS: u64 = 1_000_000_000;
/// Acks queued before a member flushes them.
const ACKS_PER_FLUSH: u32 = 32;

/// The stream's name for `topic` (stream names take no dots).
pub fn stream_name(topic: &str) -> String {
    topic.replace('.', "_")
}

/// A member's pulling: its inbox, its batch and what it still expects.
pub struct Pull {
    stream: String,
    inbox: String,
    batch: u32,
    /// Messages asked for and not yet received.
    outstanding: u32,
    /// Acks written and not yet flushed.
    unflushed: u32,
}

/// Makes the stream and the durable consumer `bench` for `topic`:
/// `storage` is `memory` or `file`; the consumer lets `max_ack_pending`
/// messages be unacknowledged at once (the members' prefetch together).
pub fn create(target: &Target, topic: &str, storage: &str, max_ack_pending: u64) -> Result<()> {
    let stream = stream_name(topic);
    let mut conn = Control::open(target)?;
    let config = serde_json::json!({"name": stream, "subjects": [topic], "storage": storage,
        "retention": "workqueue", "discard": "old", "num_replicas": 1});
    conn.request(&format!("$JS.API.STREAM.CREATE.{stream}"), &config)?;
    let consumer = serde_json::json!({"stream_name": stream, "config": {"durable_name": "bench",
        "ack_policy": "explicit", "max_ack_pending": max_ack_pending, "ack_wait": 30_000_000_000u64,
        "max_deliver": 5, "deliver_policy": "all"}});
    conn.request(&format!("$JS.API.CONSUMER.CREATE.{stream}.bench"), &consumer)?;
    Ok(())
}

/// Deletes `topic`'s stream (after a run).
pub fn delete(target: &Target, topic: &str) -> Result<()> {
    let stream = stream_name(topic);
    Control::open(target)?.request(&format!("$JS.API.STREAM.DELETE.{stream}"), &serde_json::json!({}))?;
    Ok(())
}

/// A connection for API requests, with its reply inbox.
struct Control {
    conn: Conn,
    inbox: String,
}

impl Control {
    fn open(target: &Target) -> Result<Control> {
        let mut conn = Conn::open(target, "_control", false)?;
        let inbox = format!("_INBOX.fluxbench.{}.control", std::process::id());
        conn.nats_command(format!("SUB {inbox} 1\r\n").as_bytes())?;
        Ok(Control { conn, inbox })
    }

    /// One API request and its answer; an answer with `error` fails.
    fn request(&mut self, subject: &str, body: &serde_json::Value) -> Result<serde_json::Value> {
        let body = body.to_string();
        let frame = format!("PUB {subject} {} {}\r\n{body}\r\n", self.inbox, body.len());
        self.conn.nats_command(frame.as_bytes())?;
        self.conn.flush()?;
        loop {
            match self.conn.next_op()? {
                nats::Op::Msg(payload) | nats::Op::MsgReply { payload, .. } => {
                    let answer: serde_json::Value = serde_json::from_slice(&payload).context("a JetStream answer")?;
                    if !answer["error"].is_null() {
                        bail!("{subject}: {}", answer["error"]);
                    }
                    return Ok(answer);
                }
                nats::Op::Status(status) => bail!("{subject}: {status} (is JetStream enabled? nats-server -js)"),
                nats::Op::Err(e) => bail!("{subject}: {e}"),
                _ => {}
            }
        }
    }
}

impl Conn {
    /// A member pulling from `topic`'s stream's consumer `bench`, holding
    /// up to `prefetch` messages.
    pub(crate) fn open_puller(target: &Target, topic: &str, member: usize, prefetch: u32) -> Result<Conn> {
        let mut conn = Conn::open(target, topic, false)?;
        let inbox = format!("_INBOX.fluxbench.{}.{member}", std::process::id());
        conn.nats_command(format!("SUB {inbox} 1\r\n").as_bytes())?;
        let batch = (prefetch / 2).max(1);
        conn.pull = Some(Pull { stream: stream_name(topic), inbox, batch, outstanding: 0, unflushed: 0 });
        conn.ask_more()?;
        conn.flush()?;
        Ok(conn)
    }

    /// The next message for a pulling member, acknowledged (the ack is
    /// queued; flushed every few, and by `flush_acks`).
    pub(crate) fn recv_pulled(&mut self) -> Result<Vec<u8>> {
        loop {
            match self.next_op()? {
                nats::Op::MsgReply { payload, reply } => {
                    self.nats_command(format!("PUB {reply} 0\r\n\r\n").as_bytes())?;
                    let pull = self.pull.as_mut().context("not a puller")?;
                    pull.outstanding = pull.outstanding.saturating_sub(1);
                    pull.unflushed += 1;
                    if pull.unflushed >= ACKS_PER_FLUSH || pull.outstanding <= pull.batch / 2 {
                        self.ask_more()?;
                        self.flush_acks()?;
                    }
                    return Ok(payload);
                }
                nats::Op::Status(_) => {
                    // A pull request ended (expired, or nothing to give):
                    // ask again.
                    if let Some(pull) = self.pull.as_mut() {
                        pull.outstanding = 0;
                    }
                    self.ask_more()?;
                    self.flush_acks()?;
                }
                nats::Op::Ping => {
                    self.nats_command(b"PONG\r\n")?;
                    self.ws.flush()?;
                }
                nats::Op::Err(e) => bail!("NATS error: {e}"),
                _ => {}
            }
        }
    }

    /// Sends the queued acks (and pull requests).
    pub(crate) fn flush_acks(&mut self) -> Result<()> {
        if let Some(pull) = self.pull.as_mut() {
            pull.unflushed = 0;
        }
        self.flush()
    }

    /// Asks for another batch when at most half a batch is outstanding.
    fn ask_more(&mut self) -> Result<()> {
        let Some(pull) = self.pull.as_mut() else { return Ok(()) };
        if pull.outstanding > pull.batch / 2 {
            return Ok(());
        }
        pull.outstanding += pull.batch;
        let body = format!("{{\"batch\":{},\"expires\":{PULL_EXPIRES_NS}}}", pull.batch);
        let frame =
            format!("PUB $JS.API.CONSUMER.MSG.NEXT.{}.bench {} {}\r\n{body}\r\n", pull.stream, pull.inbox, body.len());
        self.ws.write(Message::binary(frame.into_bytes()))?;
        Ok(())
    }
}
