//! A sans-IO parser for what a NATS server sends (INFO, MSG, HMSG, PING,
//! PONG, +OK, -ERR), fed with the bytes of WebSocket frames in any split.

/// One server operation.
#[derive(Debug, PartialEq, Eq)]
pub enum Op {
    /// A delivered message's payload.
    Msg(Vec<u8>),
    /// A delivered message with a reply subject (JetStream: where its ack
    /// goes; an API answer: the inbox it came to is not needed).
    MsgReply {
        /// The payload.
        payload: Vec<u8>,
        /// The reply subject.
        reply: String,
    },
    /// A message with headers and no payload: a status (JetStream's 404 no
    /// messages, 408 request expired, 409...), its first header line.
    Status(String),
    /// The server pings; answer PONG.
    Ping,
    /// Answer to our PING.
    Pong,
    /// INFO, +OK and anything else that carries nothing for the benchmark.
    Other,
    /// -ERR with the server's text.
    Err(String),
}

/// Accumulates bytes and yields complete operations.
#[derive(Debug, Default)]
pub struct Parser {
    /// Bytes not yet parsed.
    buf: Vec<u8>,
}

impl Parser {
    /// Adds bytes from the server.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete operation, if the buffer holds one.
    pub fn next_op(&mut self) -> Option<Op> {
        let line_end = self.buf.windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&self.buf[..line_end]).unwrap_or("").to_string();
        let mut words = line.split_whitespace();
        let op = match words.next().map(str::to_ascii_uppercase).as_deref() {
            Some(verb @ ("MSG" | "HMSG")) => {
                // MSG <subject> <sid> [reply-to] <#bytes>
                // HMSG <subject> <sid> [reply-to] <#header bytes> <#total bytes>
                let words: Vec<&str> = line.split_whitespace().collect();
                let headed = verb == "HMSG";
                let size: usize = words.last()?.parse().ok()?;
                let header_len: usize = if headed { words.get(words.len() - 2)?.parse().ok()? } else { 0 };
                let reply = (words.len() == if headed { 6 } else { 5 }).then(|| words[3].to_string());
                let start = line_end + 2;
                if self.buf.len() < start + size + 2 {
                    return None;
                }
                let body = self.buf[start..start + size].to_vec();
                self.buf.drain(..start + size + 2);
                if headed && size == header_len {
                    let text = String::from_utf8_lossy(&body);
                    return Some(Op::Status(text.lines().next().unwrap_or_default().to_string()));
                }
                let payload = body[header_len.min(body.len())..].to_vec();
                return Some(match reply {
                    Some(reply) => Op::MsgReply { payload, reply },
                    None => Op::Msg(payload),
                });
            }
            Some("PING") => Op::Ping,
            Some("PONG") => Op::Pong,
            Some("-ERR") => Op::Err(line.clone()),
            _ => Op::Other,
        };
        self.buf.drain(..line_end + 2);
        Some(op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_split_at_every_byte() {
        let wire = b"INFO {\"server_id\":\"x\"}\r\nMSG t 1 4\r\na\r\nb\r\nPING\r\nMSG t 1 r 0\r\n\r\n-ERR 'x'\r\n\
HMSG _i 2 32 32\r\nNATS/1.0 408 Request Timeout\r\n\r\n\r\nHMSG t 1 $JS.ACK.x 12 14\r\nNATS/1.0\r\n\r\nhi\r\n";
        for split in 0..wire.len() {
            let mut p = Parser::default();
            let mut ops = vec![];
            for piece in [&wire[..split], &wire[split..]] {
                p.push(piece);
                while let Some(op) = p.next_op() {
                    ops.push(op);
                }
            }
            assert_eq!(
                ops,
                vec![
                    Op::Other,
                    Op::Msg(b"a\r\nb".to_vec()),
                    Op::Ping,
                    Op::MsgReply { payload: vec![], reply: "r".into() },
                    Op::Err("-ERR 'x'".into()),
                    Op::Status("NATS/1.0 408 Request Timeout".into()),
                    Op::MsgReply { payload: b"hi".to_vec(), reply: "$JS.ACK.x".into() },
                ],
                "split {split}"
            );
        }
    }
}
