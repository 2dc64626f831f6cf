//! Moving a socket from one shard's descriptor table to another's.
//!
//! Every shard runs with a descriptor table of its own (`runtime`), so a
//! descriptor number means nothing on another shard: a topic socket handed
//! to its owner shard (`conn::hand_off`) travels as `SCM_RIGHTS` over a
//! Unix `SOCK_SEQPACKET` pair, one per ordered pair of shards, made before
//! the shards start. Each record is the hand-off's sequence number (8 bytes,
//! little-endian) with one descriptor; the `Item::Handoff` that names that
//! number follows in the shard mesh. While a record is in flight the kernel
//! holds the socket, so the sender closes its own descriptor at once.
//!
//! Sequenced packets keep records whole; a pair made by `socketpair` is not
//! bound by `net.unix.max_dgram_qlen` (that limit applies only to senders
//! the receiver is not connected to), only by the socket buffer, and a full
//! buffer answers `EWOULDBLOCK`: the accepting shard then serves the
//! connection itself. The two calls are `nix`'s `sendmsg` and `recvmsg`
//! (already in the build through glommio); an earlier hand-written `libc`
//! version needed five `unsafe` blocks for the control-message layout.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// The bytes of one record besides its descriptor: the sequence number.
const RECORD_BYTES: usize = 8;

/// Sends `fd` over `link` as record `seq`, without blocking.
pub fn send_fd(link: BorrowedFd<'_>, seq: u64, fd: BorrowedFd<'_>) -> io::Result<()> {
    let bytes = seq.to_le_bytes();
    let fds = [fd.as_raw_fd()];
    let sent = sendmsg::<()>(
        link.as_raw_fd(),
        &[IoSlice::new(&bytes)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    if sent == RECORD_BYTES {
        Ok(())
    } else {
        Err(io::Error::other("short hand-off record"))
    }
}

/// Receives the next record from `link`, without blocking: its sequence
/// number and descriptor (close-on-exec). A record without exactly one
/// descriptor (the kernel drops them when this table is full, setting
/// `MSG_CTRUNC`) or of another size is `InvalidData`; whatever it carried is
/// closed.
pub fn recv_fd(link: BorrowedFd<'_>) -> io::Result<(u64, OwnedFd)> {
    let mut bytes = [0u8; RECORD_BYTES + 1];
    let mut control = nix::cmsg_space!([RawFd; 1]);
    let (received, truncated, mut fds) = {
        let mut iov = [IoSliceMut::new(&mut bytes)];
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
        let msg = recvmsg::<()>(link.as_raw_fd(), &mut iov, Some(&mut control), flags)?;
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs() {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: the kernel just installed these descriptors in
                // this table for us; nothing else owns them.
                fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        (msg.bytes, msg.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC), fds)
    };
    if received == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if received != RECORD_BYTES || truncated || fds.len() != 1 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "hand-off record without exactly one socket"));
    }
    let seq = u64::from_le_bytes(bytes[..RECORD_BYTES].try_into().unwrap_or_default());
    Ok((seq, fds.remove(0)))
}

/// The hand-off links of a node: for each ordered pair of shards (a, b), a
/// connected pair whose first end shard a sends on and whose second shard b
/// receives on. Made in the starting thread's table before the shards start,
/// so every shard's private copy of that table holds them all; each shard
/// then keeps its own ends (`claim`). Holds plain numbers: which table may
/// close them is decided by `claim` and `release`, never by a `Drop`.
#[derive(Debug)]
pub struct LinkMatrix {
    shards: usize,
    /// `(send end, receive end)` for pair (a, b) at `a * shards + b`; unused
    /// on the diagonal.
    ends: Vec<(RawFd, RawFd)>,
}

impl LinkMatrix {
    /// Makes the links for `shards` shards (`2 * shards * (shards - 1)`
    /// descriptors).
    pub fn new(shards: usize) -> io::Result<LinkMatrix> {
        let mut matrix = LinkMatrix { shards, ends: vec![(-1, -1); shards * shards] };
        for a in 0..shards {
            for b in (0..shards).filter(|&b| b != a) {
                match pair() {
                    Ok(ends) => matrix.ends[a * shards + b] = ends,
                    Err(e) => {
                        matrix.release();
                        return Err(e);
                    }
                }
            }
        }
        Ok(matrix)
    }

    /// Shard `me`'s ends. With `private_table` (the shard runs with its own
    /// copy of the table the links were made in), it also closes its copies
    /// of every other end; without, it leaves them, as they are the other
    /// shards' ends too.
    pub fn claim(&self, me: usize, private_table: bool) -> Links {
        let mut links = Links::none(self.shards);
        for a in 0..self.shards {
            for b in (0..self.shards).filter(|&b| b != a) {
                let (send, recv) = self.ends[a * self.shards + b];
                // SAFETY: the numbers are open pair ends in this table (made
                // by `new`, never closed in a table a shard still uses); each
                // is owned here at most once, by the one shard it belongs to,
                // or closed once in this private table.
                unsafe {
                    if a == me {
                        links.send[b] = Some(OwnedFd::from_raw_fd(send));
                    } else if private_table {
                        libc::close(send);
                    }
                    if b == me {
                        links.recv[a] = Some(OwnedFd::from_raw_fd(recv));
                    } else if private_table {
                        libc::close(recv);
                    }
                }
            }
        }
        links
    }

    /// Closes every end in the calling thread's table: for the starting
    /// thread once every shard has claimed its ends in a private table.
    pub fn release(self) {
        for &(send, recv) in &self.ends {
            for fd in [send, recv].into_iter().filter(|&fd| fd >= 0) {
                // SAFETY: an end `new` made in this table and no one here owns.
                unsafe { libc::close(fd) };
            }
        }
    }
}

/// A connected `SOCK_SEQPACKET` pair, close-on-exec and non-blocking.
fn pair() -> io::Result<(RawFd, RawFd)> {
    use std::os::fd::IntoRawFd;
    let (a, b) = socket2::Socket::pair(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None)?;
    a.set_nonblocking(true)?;
    b.set_nonblocking(true)?;
    Ok((a.into_raw_fd(), b.into_raw_fd()))
}

/// One shard's hand-off links: where it sends to each peer and receives from
/// each, and the next sequence number per peer.
#[derive(Debug)]
pub struct Links {
    send: Vec<Option<OwnedFd>>,
    recv: Vec<Option<OwnedFd>>,
    next: Vec<std::cell::Cell<u64>>,
}

impl Links {
    /// No links (one shard, or hand-offs off): every send fails.
    pub fn none(shards: usize) -> Links {
        Links {
            send: (0..shards).map(|_| None).collect(),
            recv: (0..shards).map(|_| None).collect(),
            next: (0..shards).map(|_| std::cell::Cell::new(0)).collect(),
        }
    }

    /// Sends `fd` to shard `to`; the sequence number the receiver must ask
    /// for. The caller may close `fd` as soon as this returns.
    pub fn send(&self, to: usize, fd: BorrowedFd<'_>) -> io::Result<u64> {
        let link = self.send.get(to).and_then(Option::as_ref).ok_or_else(|| io::Error::other("no hand-off link"))?;
        let seq = self.next[to].get();
        send_fd(link.as_fd(), seq, fd)?;
        self.next[to].set(seq + 1);
        Ok(seq)
    }

    /// The socket shard `from` sent as record `seq`. Earlier records still
    /// waiting (their `Item::Handoff` was lost, at shutdown) are closed on
    /// the way.
    pub fn receive(&self, from: usize, seq: u64) -> io::Result<OwnedFd> {
        let link = self.recv.get(from).and_then(Option::as_ref).ok_or_else(|| io::Error::other("no hand-off link"))?;
        loop {
            let (got, fd) = recv_fd(link.as_fd())?;
            match got.cmp(&seq) {
                std::cmp::Ordering::Less => continue,
                std::cmp::Ordering::Equal => return Ok(fd),
                std::cmp::Ordering::Greater => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "hand-off record missing"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn pipe() -> (std::fs::File, std::fs::File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both are fresh descriptors owned by nobody else.
        unsafe { (std::fs::File::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) }
    }

    #[test]
    fn a_descriptor_crosses_and_still_works() {
        let matrix = LinkMatrix::new(2).unwrap();
        let (zero, one) = (matrix.claim(0, false), matrix.claim(1, false));
        let (mut reader, writer) = pipe();
        let seq = zero.send(1, writer.as_fd()).unwrap();
        drop(writer); // the record holds the pipe's write end
        let received = one.receive(0, seq).unwrap();
        std::fs::File::from(received).write_all(b"moved").unwrap();
        let mut got = String::new();
        reader.read_to_string(&mut got).unwrap();
        assert_eq!(got, "moved");
    }

    #[test]
    fn records_stay_whole_and_in_order_and_orphans_are_skipped() {
        let matrix = LinkMatrix::new(3).unwrap();
        let (two, zero, _one) = (matrix.claim(2, false), matrix.claim(0, false), matrix.claim(1, false));
        let pipes: Vec<_> = (0..3).map(|_| pipe()).collect();
        let seqs: Vec<u64> = pipes.iter().map(|(_, w)| two.send(0, w.as_fd()).unwrap()).collect();
        assert_eq!(seqs, [0, 1, 2]);
        // Record 0's item was lost: asking for 1 closes 0 on the way.
        let one = zero.receive(2, 1).unwrap();
        let two_fd = zero.receive(2, 2).unwrap();
        assert!(zero.receive(2, 3).is_err(), "nothing left");
        let inode = |fd: BorrowedFd<'_>| std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(inode(one.as_fd()).ino(), inode(pipes[1].1.as_fd()).ino());
        assert_eq!(inode(two_fd.as_fd()).ino(), inode(pipes[2].1.as_fd()).ino());
    }

    #[test]
    fn an_empty_link_would_block_and_a_missing_one_errs() {
        let matrix = LinkMatrix::new(2).unwrap();
        let (zero, one) = (matrix.claim(0, false), matrix.claim(1, false));
        let e = one.receive(0, 0).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        let (_r, w) = pipe();
        assert!(zero.send(0, w.as_fd()).is_err(), "no link to itself");
        assert!(Links::none(2).send(1, w.as_fd()).is_err());
    }

    #[test]
    fn a_full_link_refuses_instead_of_blocking() {
        let matrix = LinkMatrix::new(2).unwrap();
        let zero = matrix.claim(0, false);
        let _one = matrix.claim(1, false);
        let (_r, w) = pipe();
        let mut sent = 0;
        let refused = loop {
            match zero.send(1, w.as_fd()) {
                Ok(_) => sent += 1,
                Err(e) => break e,
            }
            assert!(sent < 1_000_000, "never refused");
        };
        assert_eq!(refused.kind(), io::ErrorKind::WouldBlock);
        // More than max_dgram_qlen (10 here): the pair is bounded by its buffer.
        assert!(sent > 10, "refused after {sent}");
    }
}
