//! One established tunnel: a client and its node, and the byte copying
//! between them, driven by its piper's edge-triggered events
//! ([`crate::pipe`]). Nothing here parses.
//!
//! Per readable side: read into the piper's scratch buffer, one
//! non-blocking send to the other side. Only what the kernel did not take is
//! kept, in a buffer of the direction's own (at most one chunk), and that
//! direction reads nothing more until it is written; the rest of a burst
//! stays in the kernel. A read shorter than the buffer ends the side's turn
//! (the next byte to arrive raises a new edge) unless the event said the
//! peer closed (then it reads to the end, so a FIN that came with the data
//! is not missed). A direction that resumes after waiting for room reads to
//! the end too: the edges that came while it waited were not acted on.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;

use mio::net::TcpStream;

use crate::stats::{self, NodeStats};

/// One side of a tunnel: its socket, and the bytes read from it that the
/// other side's socket has not taken yet.
struct Side {
    stream: TcpStream,
    pending: Vec<u8>,
    /// It sent its FIN (the other side was half-closed).
    ended: bool,
}

/// A client and its node. Side 0 is the client, side 1 the node.
pub struct Tunnel {
    sides: [Side; 2],
    /// Bytes read per side since the counters were last updated.
    unflushed: [u64; 2],
    /// Bytes moved since the last idle sweep (the piper clears it).
    pub active: bool,
    /// The node's counters.
    pub node_stats: Arc<NodeStats>,
}

impl Tunnel {
    /// A tunnel between two connected, registered sockets.
    pub fn new(client: TcpStream, node: TcpStream, node_stats: Arc<NodeStats>) -> Tunnel {
        let side = |stream| Side { stream, pending: Vec::new(), ended: false };
        Tunnel { sides: [side(client), side(node)], unflushed: [0; 2], active: true, node_stats }
    }

    /// Reads from side `from` and sends to the other, until a short read
    /// (or, with `to_the_end`, until the socket has nothing more), the end
    /// of the stream, or a send the other side could not take whole.
    pub fn pump(&mut self, from: usize, scratch: &mut [u8], to_the_end: bool) -> io::Result<()> {
        let to = 1 - from;
        loop {
            if self.sides[from].ended || !self.sides[from].pending.is_empty() {
                return Ok(()); // done, or waiting for room on `to`
            }
            let n = match self.sides[from].stream.read(scratch) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                self.sides[from].ended = true;
                let _ = self.sides[to].stream.shutdown(Shutdown::Write);
                return Ok(());
            }
            self.unflushed[from] += n as u64;
            self.active = true;
            let sent = loop {
                match self.sides[to].stream.write(&scratch[..n]) {
                    Ok(sent) => break sent,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break 0,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            };
            if sent < n {
                self.sides[from].pending.extend_from_slice(&scratch[sent..n]);
                return Ok(());
            }
            if n < scratch.len() && !to_the_end {
                return Ok(());
            }
        }
    }

    /// Writes what side `from` read and the other side had no room for;
    /// once all of it is written, side `from` reads again (to the end: its
    /// edges while it waited were not acted on).
    pub fn resume(&mut self, from: usize, scratch: &mut [u8]) -> io::Result<()> {
        let to = 1 - from;
        if self.sides[from].pending.is_empty() {
            // Nothing waited for room. (Not redundant with the loop below:
            // a socket reports writable with nearly every event, and this
            // must not turn each of them into a read of the other side.)
            return Ok(());
        }
        while !self.sides[from].pending.is_empty() {
            match self.sides[to].stream.write(&self.sides[from].pending) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.sides[from].pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.sides[from].pending = Vec::new(); // an idle tunnel holds no buffer
        self.pump(from, scratch, true)
    }

    /// Both sides ended and nothing is left to write.
    pub fn done(&self) -> bool {
        self.sides.iter().all(|side| side.ended && side.pending.is_empty())
    }

    pub fn shut_both(&self) {
        for side in &self.sides {
            let _ = side.stream.shutdown(Shutdown::Both);
        }
    }

    /// Adds the bytes read since the last call to the node's counters.
    pub fn flush_stats(&mut self) {
        stats::add(&self.node_stats.bytes_to_node, self.unflushed[0]);
        stats::add(&self.node_stats.bytes_from_node, self.unflushed[1]);
        self.unflushed = [0; 2];
    }
}
