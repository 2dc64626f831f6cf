//! Sans-IO WebSocket (RFC 6455), server side: the opening handshake's
//! answer, a decoder for client frames, and encoders for server frames.
//!
//! Header parsing and the accept key come from `tungstenite`; this module
//! adds what a zero-copy server needs and tungstenite's connection type does
//! not give: frames decoded in place from the connection's read buffer, and
//! server frames encoded once into shared `Bytes`. No extensions are
//! negotiated, so any RSV bit is a protocol error.

use std::io::Cursor;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use crate::message::PayloadKind;

/// A close frame's content: the status code and the reason text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    /// The status code (see [`close_code`]).
    pub code: u16,
    /// Words for a person, at most 123 bytes on the wire.
    pub reason: String,
}

/// Close codes FluxNode sends. Standard codes from RFC 6455 section 7.4.1;
/// the 4000-range codes are FluxNode's own, documented in docs/PROTOCOL.md.
pub mod close_code {
    /// Normal closure (the client closed, or the server answers a close).
    pub const NORMAL: u16 = 1000;
    /// The node is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the WebSocket protocol (unmasked frame, bad opcode,
    /// fragmented control frame, RSV bits set, ...).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// The client broke this endpoint's rules (bad first frame on
    /// `/subscribe`, publishing on a `role=sub` socket).
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A message was larger than `message_bytes_max`.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The server failed; not the client's fault.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// The node cannot take this now (topic limit); retry later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The peer was silent for two idle periods (no answer to our ping).
    pub const IDLE_TIMEOUT: u16 = 4001;
    /// The connection's send queue passed its cap (slow consumer).
    pub const SLOW_CONSUMER: u16 = 4008;
    /// A raw socket's resume (`?from=N`) cannot have everything after N:
    /// the reason names the first sequence it can have.
    pub const HISTORY_GAP: u16 = 4010;

    /// Whether a peer may send `code` in a close frame (RFC 6455 7.4.1 and
    /// 7.4.2, and the IANA registry): 1000-1003 and 1007-1014 are defined;
    /// 1004 is reserved; 1005, 1006 and 1015 must never be sent; the rest
    /// of 1000-2999 is reserved for the protocol; 3000-4999 belong to
    /// libraries and applications; nothing else exists. Any other code fails
    /// the connection with 1002, as Autobahn's cases 7.9.x expect.
    pub fn may_be_received(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// What the decoder produced from the client's bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum WsEvent {
    /// A complete data message (fragments reassembled).
    Message { kind: PayloadKind, payload: Bytes },
    /// A ping; answer with a pong carrying the same payload.
    Ping(Bytes),
    /// A pong (answer to our keep-alive ping).
    Pong,
    /// The client closed, with its code if it sent one.
    Close { code: Option<u16> },
}

/// A violation by the client; each maps to a close code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// Broken framing (close 1002).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// Message over the size limit (close 1009).
    #[error("message larger than {0} bytes")]
    TooBig(usize),
    /// Text that is not UTF-8 (close 1007).
    #[error("text frame is not valid UTF-8")]
    InvalidUtf8,
}

impl WsError {
    /// The close code that tells the client about this error.
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::Protocol(_) => close_code::PROTOCOL_ERROR,
            WsError::TooBig(_) => close_code::MESSAGE_TOO_BIG,
            WsError::InvalidUtf8 => close_code::INVALID_PAYLOAD,
        }
    }
}

/// Decodes client frames. One per connection; lives with the connection's
/// reader on its shard.
#[derive(Debug)]
pub struct Decoder {
    /// Largest reassembled message accepted.
    message_bytes_max: usize,
    /// Whether frames must be masked (a server decoding a client's) or
    /// must not be (a node link decoding its owner's frames).
    masked: bool,
    /// A fragmented message being reassembled.
    partial: Option<(PayloadKind, BytesMut)>,
}

impl Decoder {
    /// A decoder that accepts messages up to `message_bytes_max` bytes.
    pub fn new(message_bytes_max: usize) -> Decoder {
        Decoder { message_bytes_max, masked: true, partial: None }
    }

    /// A decoder of a server's frames (unmasked), for a node's link to
    /// another node.
    pub fn of_server_frames(message_bytes_max: usize) -> Decoder {
        Decoder { message_bytes_max, masked: false, partial: None }
    }

    /// Whether no fragmented message is half reassembled: everything the
    /// decoder consumed so far has been returned as events.
    pub fn is_idle(&self) -> bool {
        self.partial.is_none()
    }

    /// Whether `buf` starts with a whole frame (header and payload), as
    /// far as its header can be read.
    pub fn has_whole_frame(buf: &[u8]) -> bool {
        let mut cursor = Cursor::new(buf);
        match FrameHeader::parse(&mut cursor) {
            Ok(Some((_, length))) => (buf.len() as u64).saturating_sub(cursor.position()) >= length,
            _ => false,
        }
    }

    /// Decodes the next event from the front of `buf`, consuming what it
    /// used. `Ok(None)`: more bytes are needed. The size check happens on the
    /// header, before the payload is buffered.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<WsEvent>, WsError> {
        loop {
            let mut cursor = Cursor::new(&buf[..]);
            let (header, length) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => return Ok(None),
                Err(_) => return Err(WsError::Protocol("invalid frame header")),
            };
            let header_len = cursor.position() as usize;
            self.check_header(&header, length)?;
            let length = length as usize;
            if buf.len() < header_len + length {
                buf.reserve(header_len + length - buf.len());
                return Ok(None);
            }
            buf.advance(header_len);
            let mut payload = buf.split_to(length);
            if let Some(mask) = header.mask {
                unmask(&mut payload, mask);
            }
            if let Some(event) = self.on_frame(&header, payload)? {
                return Ok(Some(event));
            }
        }
    }

    fn check_header(&self, header: &FrameHeader, length: u64) -> Result<(), WsError> {
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(WsError::Protocol("RSV bits set without a negotiated extension"));
        }
        if header.mask.is_none() && self.masked {
            return Err(WsError::Protocol("client frames must be masked"));
        }
        if header.mask.is_some() && !self.masked {
            return Err(WsError::Protocol("server frames must not be masked"));
        }
        match header.opcode {
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                Err(WsError::Protocol("reserved opcode"))
            }
            OpCode::Control(_) if !header.is_final || length > 125 => {
                Err(WsError::Protocol("control frames must be final and at most 125 bytes"))
            }
            OpCode::Control(_) => Ok(()),
            OpCode::Data(_) => {
                let already = self.partial.as_ref().map_or(0, |(_, b)| b.len() as u64);
                // Saturating: the 64-bit length is the peer's, up to u64::MAX
                // (found by fuzzing: a plain add overflowed).
                if already.saturating_add(length) > self.message_bytes_max as u64 {
                    Err(WsError::TooBig(self.message_bytes_max))
                } else {
                    Ok(())
                }
            }
        }
    }

    fn on_frame(&mut self, header: &FrameHeader, payload: BytesMut) -> Result<Option<WsEvent>, WsError> {
        let kind = match header.opcode {
            OpCode::Control(Control::Ping) => return Ok(Some(WsEvent::Ping(payload.freeze()))),
            OpCode::Control(Control::Pong) => return Ok(Some(WsEvent::Pong)),
            OpCode::Control(_) => return parse_close(&payload).map(Some),
            OpCode::Data(Data::Continue) => {
                let Some((kind, mut acc)) = self.partial.take() else {
                    return Err(WsError::Protocol("continuation frame without a message"));
                };
                acc.extend_from_slice(&payload);
                if !header.is_final {
                    self.partial = Some((kind, acc));
                    return Ok(None);
                }
                return finish(kind, acc).map(Some);
            }
            OpCode::Data(Data::Text) => PayloadKind::Text,
            OpCode::Data(_) => PayloadKind::Binary,
        };
        if self.partial.is_some() {
            return Err(WsError::Protocol("new message before the fragmented one ended"));
        }
        if !header.is_final {
            self.partial = Some((kind, payload));
            return Ok(None);
        }
        finish(kind, payload).map(Some)
    }
}

fn finish(kind: PayloadKind, payload: BytesMut) -> Result<WsEvent, WsError> {
    if kind == PayloadKind::Text && std::str::from_utf8(&payload).is_err() {
        return Err(WsError::InvalidUtf8);
    }
    Ok(WsEvent::Message { kind, payload: payload.freeze() })
}

fn parse_close(payload: &[u8]) -> Result<WsEvent, WsError> {
    match payload.len() {
        0 => Ok(WsEvent::Close { code: None }),
        1 => Err(WsError::Protocol("close frame with a one-byte payload")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close_code::may_be_received(code) {
                return Err(WsError::Protocol("invalid close code"));
            }
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err(WsError::InvalidUtf8);
            }
            Ok(WsEvent::Close { code: Some(code) })
        }
    }
}

/// XORs the client's mask into `payload`, eight bytes at a time.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3]]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        // chunks_exact_mut yields exactly 8 bytes.
        let word = u64::from_ne_bytes(chunk.try_into().expect("chunk of 8")) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

/// Opcode of a server data frame for a payload kind.
fn data_opcode(kind: PayloadKind) -> OpCode {
    match kind {
        PayloadKind::Text => OpCode::Data(Data::Text),
        PayloadKind::Binary => OpCode::Data(Data::Binary),
    }
}

/// Encodes one unmasked, final server frame: header and payload contiguous,
/// ready to share among every subscriber of the shard.
pub fn encode_data(kind: PayloadKind, payload: &[u8]) -> Bytes {
    encode(data_opcode(kind), &[payload])
}

/// Encodes a data frame whose payload is `parts` concatenated.
pub fn encode_data_parts(kind: PayloadKind, parts: &[&[u8]]) -> Bytes {
    encode(data_opcode(kind), parts)
}

/// Encodes a client's binary frame (a node link's), appending it to `out`.
/// The mask key is zero, so the payload goes unchanged: masking protects
/// browsers' intermediaries from forged requests, and a node is no browser
/// (RFC 6455 section 10.3).
pub fn encode_client_binary(payload: &[u8], out: &mut Vec<u8>) {
    encode_client(OpCode::Data(Data::Binary), payload, out);
}

/// Encodes a client's pong (a node link's), appending it to `out`.
pub fn encode_client_pong(payload: &[u8], out: &mut Vec<u8>) {
    encode_client(OpCode::Control(Control::Pong), payload, out);
}

fn encode_client(opcode: OpCode, payload: &[u8], out: &mut Vec<u8>) {
    let header = FrameHeader { opcode, mask: Some([0; 4]), ..FrameHeader::default() };
    // Writing into a Vec cannot fail.
    header.format(payload.len() as u64, out).expect("write to memory");
    out.extend_from_slice(payload);
}

/// Encodes a close frame. The reason is cut to fit the 123 bytes allowed.
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    encode(OpCode::Control(Control::Close), &[&code.to_be_bytes(), &reason.as_bytes()[..end]])
}

/// Encodes a ping (keep-alive) frame.
pub fn encode_ping(payload: &[u8]) -> Bytes {
    encode(OpCode::Control(Control::Ping), &[payload])
}

/// Encodes a pong answering a ping.
pub fn encode_pong(payload: &[u8]) -> Bytes {
    encode(OpCode::Control(Control::Pong), &[payload])
}

fn encode(opcode: OpCode, parts: &[&[u8]]) -> Bytes {
    let length: usize = parts.iter().map(|p| p.len()).sum();
    let header = FrameHeader { opcode, ..FrameHeader::default() };
    let mut out = BytesMut::with_capacity(header.len(length as u64) + length);
    let mut writer = (&mut out).writer();
    // Writing into a BytesMut cannot fail.
    header.format(length as u64, &mut writer).expect("write to memory");
    for part in parts {
        out.extend_from_slice(part);
    }
    out.freeze()
}

/// The end of the server frame that contains byte `at` of `bytes`, where a
/// frame starts at offset `boundary <= at` (`at` itself if a frame starts
/// there, `bytes.len()` if the frames run past the end). Used to finish the
/// frame in progress, and nothing after it, once the peer has closed.
/// `bytes` holds frames this module encoded; a malformed header ends the
/// walk at `bytes.len()`, never in a panic.
pub fn frame_end_at(bytes: &[u8], boundary: usize, at: usize) -> usize {
    let mut end = boundary;
    while end < at {
        match server_frame_len(&bytes[end.min(bytes.len())..]) {
            Some(len) => end = end.saturating_add(len),
            None => return bytes.len(),
        }
    }
    end.min(bytes.len())
}

/// Length (header and payload) of the unmasked frame at the front of
/// `bytes`, if its header is complete.
fn server_frame_len(bytes: &[u8]) -> Option<usize> {
    let (header, payload) = server_frame_parts(bytes)?;
    payload.checked_add(header)
}

/// Header and payload lengths of the unmasked frame at the front of
/// `bytes`, if its header is complete.
pub(crate) fn server_frame_parts(bytes: &[u8]) -> Option<(usize, usize)> {
    let code = *bytes.get(1)? & 0x7f;
    let (header, payload) = match code {
        126 => (4, u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?]) as u64),
        127 => (10, u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?)),
        n => (2, n as u64),
    };
    Some((header, usize::try_from(payload).ok()?))
}

/// The payload of `frame` when it is exactly one unfragmented, unmasked
/// text or binary frame (as this module encodes them); None otherwise.
pub fn data_frame_payload(frame: &[u8]) -> Option<&[u8]> {
    let first = *frame.first()?;
    let opcode = first & 0x0f;
    let fin = first & 0x80 != 0;
    if !fin || !(opcode == 0x1 || opcode == 0x2) || frame.get(1)? & 0x80 != 0 {
        return None;
    }
    let (header, payload) = server_frame_parts(frame)?;
    (header.checked_add(payload)? == frame.len()).then(|| &frame[header..])
}

/// Bytes of a server frame's header for a payload of `len` bytes.
pub fn server_header_len(len: usize) -> usize {
    FrameHeader::default().len(len as u64)
}

/// Appends the header of an unmasked binary frame whose payload of `len`
/// bytes the caller appends next.
pub fn append_binary_header(len: usize, out: &mut Vec<u8>) {
    let header = FrameHeader { opcode: OpCode::Data(Data::Binary), ..FrameHeader::default() };
    // Writing into a Vec cannot fail.
    header.format(len as u64, out).expect("write to memory");
}

/// The value of `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(client_key: &[u8]) -> String {
    tungstenite::handshake::derive_accept_key(client_key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_frames_payload_is_found_and_a_binary_header_matches_the_encoder() {
        for len in [0, 1, 125, 126, 127, 0xffff, 0x10000, 70_000] {
            let payload = vec![7u8; len];
            let frame = encode_data(PayloadKind::Binary, &payload);
            assert_eq!(data_frame_payload(&frame), Some(&payload[..]), "len {len}");
            let mut header = Vec::new();
            append_binary_header(len, &mut header);
            assert_eq!(header.len(), server_header_len(len));
            assert_eq!(&frame[..header.len()], &header[..], "len {len}");
            let text = encode_data(PayloadKind::Text, &payload);
            assert_eq!(data_frame_payload(&text), Some(&payload[..]));
            // One byte short or long is not one frame.
            assert_eq!(data_frame_payload(&frame[..frame.len() - 1]), None);
        }
        assert_eq!(data_frame_payload(&encode_ping(b"x")), None);
        assert_eq!(data_frame_payload(&encode_close(1000, "")), None);
        assert_eq!(data_frame_payload(&[]), None);
    }

    #[test]
    fn a_whole_frame_is_told_from_a_part_of_one() {
        for len in [0, 5, 125, 126, 70_000] {
            let frame = client_frame(0x2, true, &vec![1u8; len]);
            assert!(Decoder::has_whole_frame(&frame), "len {len}");
            let mut more = frame.clone();
            more.extend_from_slice(&client_frame(0x9, true, b"p"));
            assert!(Decoder::has_whole_frame(&more), "len {len} with more behind");
            for cut in [0, 1, 2, frame.len() - 1] {
                assert!(!Decoder::has_whole_frame(&frame[..cut]), "len {len} cut at {cut}");
            }
        }
    }

    /// A masked client frame, as a browser would send it.
    pub(crate) fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![opcode | if fin { 0x80 } else { 0 }];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn decode_all(bytes: &[u8], max: usize) -> Vec<Result<WsEvent, WsError>> {
        let mut d = Decoder::new(max);
        let mut buf = BytesMut::from(bytes);
        let mut out = vec![];
        loop {
            match d.decode(&mut buf) {
                Ok(Some(e)) => out.push(Ok(e)),
                Ok(None) => return out,
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
        }
    }

    #[test]
    fn decodes_text_binary_and_fragments_split_at_every_byte() {
        let mut wire = client_frame(0x1, true, b"hello");
        wire.extend(client_frame(0x2, false, b"ab"));
        wire.extend(client_frame(0x9, true, b"p"));
        wire.extend(client_frame(0x0, true, b"cd"));
        let want = vec![
            WsEvent::Message { kind: PayloadKind::Text, payload: Bytes::from_static(b"hello") },
            WsEvent::Ping(Bytes::from_static(b"p")),
            WsEvent::Message { kind: PayloadKind::Binary, payload: Bytes::from_static(b"abcd") },
        ];
        for split in 0..wire.len() {
            let mut d = Decoder::new(1024);
            let mut buf = BytesMut::new();
            let mut got = vec![];
            for piece in [&wire[..split], &wire[split..]] {
                buf.extend_from_slice(piece);
                while let Some(e) = d.decode(&mut buf).unwrap() {
                    got.push(e);
                }
            }
            assert_eq!(got, want, "split at {split}");
        }
    }

    /// A node link writes client frames with a zero mask and reads the
    /// owner's unmasked server frames; each decoder refuses the other kind.
    #[test]
    fn link_frames_round_trip_both_ways() {
        let mut wire = Vec::new();
        encode_client_binary(b"forwarded", &mut wire);
        encode_client_pong(b"fluxnode", &mut wire);
        let mut buf = BytesMut::from(&wire[..]);
        let mut server = Decoder::new(1024);
        assert_eq!(
            server.decode(&mut buf).unwrap(),
            Some(WsEvent::Message { kind: PayloadKind::Binary, payload: Bytes::from_static(b"forwarded") })
        );
        assert_eq!(server.decode(&mut buf).unwrap(), Some(WsEvent::Pong));
        let mut client = Decoder::of_server_frames(1024);
        let mut buf = BytesMut::from(&encode_data(PayloadKind::Binary, b"followed")[..]);
        assert_eq!(
            client.decode(&mut buf).unwrap(),
            Some(WsEvent::Message { kind: PayloadKind::Binary, payload: Bytes::from_static(b"followed") })
        );
        let mut buf = BytesMut::from(&wire[..]);
        assert!(client.decode(&mut buf).is_err(), "a masked frame from an owner is refused");
        let mut buf = BytesMut::from(&encode_data(PayloadKind::Binary, b"x")[..]);
        assert!(Decoder::new(1024).decode(&mut buf).is_err(), "an unmasked frame from a client is refused");
    }

    #[test]
    fn large_lengths_and_unmasking() {
        let payload: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
        let got = decode_all(&client_frame(0x2, true, &payload), 1 << 20);
        assert_eq!(got, vec![Ok(WsEvent::Message { kind: PayloadKind::Binary, payload: payload.into() })]);
    }

    #[test]
    fn violations_map_to_close_codes() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (vec![0x82, 0x01, b'x'], close_code::PROTOCOL_ERROR), // unmasked
            (client_frame(0x3, true, b""), close_code::PROTOCOL_ERROR), // reserved opcode
            (client_frame(0x0, true, b"x"), close_code::PROTOCOL_ERROR), // stray continuation
            (client_frame(0x9, false, b""), close_code::PROTOCOL_ERROR), // fragmented ping
            (client_frame(0x9, true, &[0; 126]), close_code::PROTOCOL_ERROR), // big control
            (client_frame(0x1 | 0x40, true, b"x"), close_code::PROTOCOL_ERROR), // rsv1
            (client_frame(0x1, true, &[0xff, 0xfe]), close_code::INVALID_PAYLOAD),
            (client_frame(0x2, true, &[0; 11]), close_code::MESSAGE_TOO_BIG),
            (client_frame(0x8, true, &[3]), close_code::PROTOCOL_ERROR),
        ];
        // Close codes a peer may not send (Autobahn 7.9.x), each failing
        // with 1002; the codes it may send are accepted and reported.
        let mut cases = cases;
        for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
            cases.push((client_frame(0x8, true, &bad.to_be_bytes()), close_code::PROTOCOL_ERROR));
        }
        for good in [1000u16, 1001, 1002, 1003, 1007, 1010, 1011, 1012, 1014, 3000, 3999, 4000, 4999] {
            let got = decode_all(&client_frame(0x8, true, &good.to_be_bytes()), 10);
            assert_eq!(got, vec![Ok(WsEvent::Close { code: Some(good) })], "code {good}");
        }
        for (wire, code) in cases {
            let got = decode_all(&wire, 10);
            match got.last() {
                Some(Err(e)) => assert_eq!(e.close_code(), code, "{wire:x?}"),
                other => panic!("{wire:x?}: expected an error, got {other:?}"),
            }
        }
        let mut two = client_frame(0x2, false, &[0; 6]);
        two.extend(client_frame(0x0, true, &[0; 6]));
        assert_eq!(decode_all(&two, 10).last(), Some(&Err(WsError::TooBig(10))));
    }

    #[test]
    fn oversized_frame_is_refused_from_its_header_alone() {
        let mut d = Decoder::new(100);
        // Header announcing 1 GiB, no payload: refused before buffering.
        let mut buf = BytesMut::from(&[0x82u8, 0x80 | 127, 0, 0, 0, 0, 0x40, 0, 0, 0, 1, 2, 3, 4][..]);
        assert_eq!(d.decode(&mut buf), Err(WsError::TooBig(100)));
    }

    #[test]
    fn length_near_u64_max_during_a_fragmented_message_is_too_big() {
        let mut wire = client_frame(0x2, false, b"ab");
        // A continuation announcing u64::MAX bytes.
        wire.extend_from_slice(&[0x80, 0x80 | 127]);
        wire.extend_from_slice(&u64::MAX.to_be_bytes());
        wire.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(decode_all(&wire, 4096).last(), Some(&Err(WsError::TooBig(4096))));
    }

    #[test]
    fn frame_end_at_finds_the_frame_in_progress() {
        let mut wire = encode_data(PayloadKind::Text, b"abc").to_vec(); // 5 bytes
        wire.extend_from_slice(&encode_data(PayloadKind::Binary, &[7; 300])); // 304 bytes
        wire.extend_from_slice(&encode_ping(b"")); // 2 bytes
        assert_eq!(frame_end_at(&wire, 0, 0), 0, "on a boundary nothing is in progress");
        assert_eq!(frame_end_at(&wire, 0, 1), 5);
        assert_eq!(frame_end_at(&wire, 0, 5), 5);
        assert_eq!(frame_end_at(&wire, 0, 6), 309);
        assert_eq!(frame_end_at(&wire, 5, 308), 309);
        assert_eq!(frame_end_at(&wire, 0, 310), 311);
        // Garbage never panics and never points past the bytes.
        assert_eq!(frame_end_at(&[0x82, 127, 0xff], 0, 1), 3);
        assert_eq!(frame_end_at(&[0x82, 127, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], 0, 1), 10);
    }

    #[test]
    fn close_frames_and_encoding() {
        let got = decode_all(&client_frame(0x8, true, &[0x03, 0xe8, b'o', b'k']), 10);
        assert_eq!(got, vec![Ok(WsEvent::Close { code: Some(1000) })]);
        assert_eq!(&encode_data(PayloadKind::Text, b"hi")[..], &[0x81, 2, b'h', b'i']);
        let long = encode_data(PayloadKind::Binary, &[7; 300]);
        assert_eq!(&long[..4], &[0x82, 126, 1, 44]);
        let close = encode_close(4008, &"x".repeat(500));
        assert_eq!(close.len(), 2 + 2 + 123);
        assert_eq!(accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }
}
