//! The durable log's record format (issue 13's first piece): how one
//! sequenced message is laid out in a segment, how a segment is read back,
//! and where a torn tail starts. Sans-IO: records in, bytes out; bytes in,
//! records and the length that is whole out. The shell that appends
//! segments to disk, fsyncs and uploads them comes later.
//!
//! One record, little-endian:
//!
//! ```text
//! len    u32  bytes after this field (crc .. payload)
//! crc    u32  CRC32C of the bytes after this field (seq .. payload)
//! seq    u64
//! ts_ms  u64  milliseconds since the Unix epoch, as sequenced
//! kind   u8   0 text, 1 binary
//! klen   u16  key length (0: no key)
//! key    klen bytes
//! hcount u16  headers
//!   per header: nlen u16, name, vlen u32, value
//! payload     the rest
//! ```
//!
//! A crash can leave a record half written at the end of the last segment.
//! [`scan`] stops at the first record whose length runs past the data or
//! whose checksum does not match, and reports how many bytes are whole:
//! the shell cuts the file there. A length or checksum that is wrong in
//! the middle of a segment is the same to the reader: everything from
//! there on is not trusted.

use bytes::Bytes;

use crate::message::PayloadKind;

/// Bytes before a record's checksummed body: `len` and `crc`.
const FRAME_BYTES: usize = 8;
/// Fixed fields of the body: seq, ts, kind, key length, header count.
const FIXED_BODY_BYTES: usize = 8 + 8 + 1 + 2 + 2;
/// Largest record body accepted when reading: a message at its ceiling plus
/// room for a key and headers. Anything longer is a torn or foreign length.
pub const RECORD_BODY_BYTES_MAX: usize = crate::limits::MESSAGE_BYTES_MAX_CEILING + (64 << 10);

/// One message as the log keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its sequence number in its topic.
    pub seq: u64,
    /// When it was sequenced, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// Text or binary.
    pub kind: PayloadKind,
    /// The routing key / aggregate id, if any.
    pub key: Option<Bytes>,
    /// String headers (metadata), in the order given.
    pub headers: Vec<(String, String)>,
    /// The payload.
    pub payload: Bytes,
}

/// Why a record cannot be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The key is longer than 65,535 bytes.
    #[error("key longer than 65535 bytes")]
    KeyTooLong,
    /// More than 65,535 headers, or a name longer than 65,535 bytes.
    #[error("too many headers, or a header name longer than 65535 bytes")]
    Headers,
    /// The record would be longer than [`RECORD_BODY_BYTES_MAX`].
    #[error("record longer than the log accepts")]
    TooLong,
}

/// Appends `record` to `out`.
pub fn encode(record: &Record, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let key = record.key.as_deref().unwrap_or(&[]);
    let key_len = u16::try_from(key.len()).map_err(|_| EncodeError::KeyTooLong)?;
    let header_count = u16::try_from(record.headers.len()).map_err(|_| EncodeError::Headers)?;
    let headers_len: usize = record.headers.iter().map(|(n, v)| 2 + n.len() + 4 + v.len()).sum();
    let body_len = FIXED_BODY_BYTES + key.len() + headers_len + record.payload.len();
    if body_len > RECORD_BODY_BYTES_MAX {
        return Err(EncodeError::TooLong);
    }
    let start = out.len();
    out.reserve(FRAME_BYTES + body_len);
    out.extend_from_slice(&((4 + body_len) as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]); // the checksum, once the body is written
    out.extend_from_slice(&record.seq.to_le_bytes());
    out.extend_from_slice(&record.timestamp_ms.to_le_bytes());
    out.push(match record.kind {
        PayloadKind::Text => 0,
        PayloadKind::Binary => 1,
    });
    out.extend_from_slice(&key_len.to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&header_count.to_le_bytes());
    for (name, value) in &record.headers {
        let name_len = u16::try_from(name.len()).map_err(|_| EncodeError::Headers)?;
        out.extend_from_slice(&name_len.to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value.as_bytes());
    }
    out.extend_from_slice(&record.payload);
    let crc = crc32c::crc32c(&out[start + FRAME_BYTES..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// What reading a segment found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// The whole records, in order, with their offsets in the segment.
    pub records: Vec<(usize, Record)>,
    /// Bytes from the start that hold whole records: cut the file here.
    pub whole_bytes: usize,
    /// Why reading stopped before the end, if it did.
    pub torn: Option<Torn>,
}

/// Why a segment's tail is not trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Torn {
    /// Fewer bytes than the length field says (a write cut short).
    Short,
    /// A length below the fixed fields or above [`RECORD_BODY_BYTES_MAX`].
    BadLength,
    /// The checksum does not match the bytes.
    Checksum,
    /// The checksum matched but the fields do not fit the length, or a
    /// header is not UTF-8.
    Malformed,
}

/// Reads every whole record of `segment` (shared, so payloads are slices of
/// it, not copies), stopping at the first that is not.
pub fn scan(segment: &Bytes) -> Scan {
    let mut records = Vec::new();
    let mut at = 0;
    let torn = loop {
        if at == segment.len() {
            break None;
        }
        match read_one(segment, at) {
            Ok((record, next)) => {
                records.push((at, record));
                at = next;
            }
            Err(torn) => break Some(torn),
        }
    };
    Scan { records, whole_bytes: at, torn }
}

/// The record at `at` of `segment` (payload shared, not copied) and the
/// offset after it.
pub fn read_one(segment: &Bytes, at: usize) -> Result<(Record, usize), Torn> {
    let rest = &segment[at..];
    if rest.len() < FRAME_BYTES {
        return Err(Torn::Short);
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().unwrap_or_default()) as usize;
    if !(4 + FIXED_BODY_BYTES..=4 + RECORD_BODY_BYTES_MAX).contains(&len) {
        return Err(Torn::BadLength);
    }
    if rest.len() < 4 + len {
        return Err(Torn::Short);
    }
    let crc = u32::from_le_bytes(rest[4..8].try_into().unwrap_or_default());
    let body_start = at + FRAME_BYTES;
    let body_end = at + 4 + len;
    if crc32c::crc32c(&segment[body_start..body_end]) != crc {
        return Err(Torn::Checksum);
    }
    let record = parse_body(&segment.slice(body_start..body_end)).ok_or(Torn::Malformed)?;
    Ok((record, body_end))
}

/// The fields of a checksummed body.
fn parse_body(body: &Bytes) -> Option<Record> {
    let mut r = Reader { body, at: 0 };
    let seq = r.u64()?;
    let timestamp_ms = r.u64()?;
    let kind = match r.bytes(1)?[0] {
        0 => PayloadKind::Text,
        1 => PayloadKind::Binary,
        _ => return None,
    };
    let key_len = r.u16()? as usize;
    let key = if key_len > 0 { Some(r.slice(key_len)?) } else { None };
    let header_count = r.u16()?;
    let mut headers = Vec::with_capacity(usize::from(header_count).min(64));
    for _ in 0..header_count {
        let name_len = r.u16()? as usize;
        let name = String::from_utf8(r.bytes(name_len)?.to_vec()).ok()?;
        let value_len = r.u32()? as usize;
        let value = String::from_utf8(r.bytes(value_len)?.to_vec()).ok()?;
        headers.push((name, value));
    }
    let payload = body.slice(r.at..);
    Some(Record { seq, timestamp_ms, kind, key, headers, payload })
}

/// A cursor over a body; every read is bounds-checked.
struct Reader<'a> {
    body: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn bytes(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.at.checked_add(n)?;
        let out = self.body.get(self.at..end)?;
        self.at = end;
        Some(out)
    }

    fn slice(&mut self, n: usize) -> Option<Bytes> {
        let start = self.at;
        self.bytes(n)?;
        Some(self.body.slice(start..self.at))
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.bytes(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.bytes(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.bytes(8)?.try_into().ok()?))
    }
}

/// A sparse index of one segment: every `every_bytes` or so, the first
/// record at or after that point, so that a read from a sequence number or
/// a time starts near it instead of at the segment's start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SparseIndex {
    /// (seq, timestamp ms, offset), in log order.
    entries: Vec<(u64, u64, usize)>,
    /// Offset after the last indexed entry's span.
    next_at: usize,
    /// Distance between entries, bytes.
    every_bytes: usize,
}

impl SparseIndex {
    /// An empty index with an entry about every `every_bytes` (at least 1).
    pub fn new(every_bytes: usize) -> SparseIndex {
        SparseIndex { entries: Vec::new(), next_at: 0, every_bytes: every_bytes.max(1) }
    }

    /// Notes a record appended at `offset`.
    pub fn appended(&mut self, seq: u64, timestamp_ms: u64, offset: usize) {
        if offset >= self.next_at {
            self.entries.push((seq, timestamp_ms, offset));
            self.next_at = offset + self.every_bytes;
        }
    }

    /// Where to start reading for the first record with sequence >= `seq`.
    pub fn offset_for_seq(&self, seq: u64) -> usize {
        let i = self.entries.partition_point(|e| e.0 <= seq);
        i.checked_sub(1).map_or(0, |i| self.entries[i].2)
    }

    /// Where to start reading for the first record at or after `ms`
    /// (timestamps never go back within a topic).
    pub fn offset_for_time(&self, ms: u64) -> usize {
        let i = self.entries.partition_point(|e| e.1 < ms);
        i.checked_sub(1).map_or(0, |i| self.entries[i].2)
    }

    /// The sequence of the last entry sequenced before `ms`, if any.
    pub fn entry_before_time(&self, ms: u64) -> Option<u64> {
        let i = self.entries.partition_point(|e| e.1 < ms);
        i.checked_sub(1).map(|i| self.entries[i].0)
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, key: Option<&'static str>, payload: &'static str) -> Record {
        Record {
            seq,
            timestamp_ms: 1_700_000_000_000 + seq * 10,
            kind: if seq.is_multiple_of(2) { PayloadKind::Text } else { PayloadKind::Binary },
            key: key.map(|k| Bytes::from_static(k.as_bytes())),
            headers: if seq.is_multiple_of(3) { vec![("type".into(), "OrderPlaced".into())] } else { Vec::new() },
            payload: Bytes::from_static(payload.as_bytes()),
        }
    }

    fn segment(n: u64) -> (Vec<Record>, Vec<u8>) {
        let records: Vec<Record> = (1..=n).map(|s| record(s, (s % 2 == 1).then_some("order-7"), "hello")).collect();
        let mut out = Vec::new();
        for r in &records {
            encode(r, &mut out).expect("encodes");
        }
        (records, out)
    }

    #[test]
    fn records_read_back_as_written() {
        let (records, bytes) = segment(10);
        let scan = scan(&Bytes::from(bytes.clone()));
        assert_eq!(scan.torn, None);
        assert_eq!(scan.whole_bytes, bytes.len());
        assert_eq!(scan.records.into_iter().map(|(_, r)| r).collect::<Vec<_>>(), records);
    }

    #[test]
    fn a_tail_cut_anywhere_keeps_exactly_the_whole_records() {
        let (records, bytes) = segment(5);
        let ends: Vec<usize> = {
            let scan = scan(&Bytes::from(bytes.clone()));
            scan.records.iter().map(|(at, _)| *at).skip(1).chain([bytes.len()]).collect()
        };
        for cut in 0..=bytes.len() {
            let scan = scan(&Bytes::copy_from_slice(&bytes[..cut]));
            let whole = ends.iter().filter(|&&end| end <= cut).count();
            assert_eq!(scan.records.len(), whole, "cut at {cut}");
            assert_eq!(scan.whole_bytes, if whole == 0 { 0 } else { ends[whole - 1] }, "cut at {cut}");
            assert_eq!(scan.torn.is_some(), cut != scan.whole_bytes, "cut at {cut}");
            assert!(scan.records.iter().zip(&records).all(|((_, a), b)| a == b));
        }
    }

    #[test]
    fn a_flipped_bit_stops_the_read_at_its_record() {
        let (_, bytes) = segment(4);
        let offsets: Vec<usize> = scan(&Bytes::from(bytes.clone())).records.iter().map(|(at, _)| *at).collect();
        for (i, &at) in offsets.iter().enumerate() {
            let mut bad = bytes.clone();
            bad[at + 12] ^= 0x40; // inside the body: the sequence number
            let scan = scan(&Bytes::from(bad));
            assert_eq!((scan.records.len(), scan.whole_bytes, scan.torn), (i, at, Some(Torn::Checksum)));
        }
        let mut bad = bytes.clone();
        bad[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(scan(&Bytes::from(bad)).torn, Some(Torn::BadLength));
    }

    #[test]
    fn limits_are_refused_when_writing() {
        let mut r = record(1, None, "x");
        r.key = Some(Bytes::from(vec![b'k'; 70_000]));
        assert_eq!(encode(&r, &mut Vec::new()), Err(EncodeError::KeyTooLong));
        let mut r = record(1, None, "x");
        r.payload = Bytes::from(vec![0; RECORD_BODY_BYTES_MAX]);
        assert_eq!(encode(&r, &mut Vec::new()), Err(EncodeError::TooLong));
    }

    #[test]
    fn the_sparse_index_finds_a_start_at_or_before_the_target() {
        let (_, bytes) = segment(100);
        let all = scan(&Bytes::from(bytes));
        let mut index = SparseIndex::new(300);
        for (at, r) in &all.records {
            index.appended(r.seq, r.timestamp_ms, *at);
        }
        assert!(index.len() > 3 && index.len() < 100, "sparse: {} entries", index.len());
        for (at, r) in &all.records {
            let start = index.offset_for_seq(r.seq);
            assert!(start <= *at && *at - start < 300 + 200, "seq {}: start {start}, record at {at}", r.seq);
            let start = index.offset_for_time(r.timestamp_ms);
            assert!(start <= *at, "ts {}: start {start}, record at {at}", r.timestamp_ms);
        }
        assert_eq!(index.offset_for_seq(0), 0);
    }

    #[test]
    fn mutated_segments_never_panic_and_keep_only_what_a_writer_wrote() {
        let (_, bytes) = segment(6);
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..5_000 {
            let mut bad = bytes.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() % bad.len() as u64) as usize;
                match next() % 3 {
                    0 => bad[at] ^= 1 << (next() % 8),
                    1 => bad.truncate(at),
                    _ => bad.insert(at, next() as u8),
                }
                if bad.is_empty() {
                    break;
                }
            }
            let scan = scan(&Bytes::from(bad.clone()));
            assert!(scan.whole_bytes <= bad.len());
            let mut again = Vec::new();
            for (_, record) in &scan.records {
                encode(record, &mut again).expect("a record read back encodes");
            }
            assert_eq!(&again[..], &bad[..scan.whole_bytes]);
        }
    }
}
