//! Scheduled delivery, sans-IO: one topic's pending schedules, kept by its
//! owner shard. A publish with `deliver_at` (or `delay_ms`) is kept here
//! instead of being sequenced; when the time (an input, never a clock read
//! here) reaches it, the broker sequences it as any publish, so plain
//! subscribers, consumer groups and durable logs see it then.
//!
//! Each schedule has an id, the client's or one made here. A new schedule
//! with the id of a pending one replaces it (a debounce, a rescheduled
//! reminder), unless it asks `if_absent`: then the pending one stays. A
//! schedule can be cancelled by id and the pending ones listed.
//!
//! A durable topic's schedules are also kept in a journal next to its log:
//! records in the log's own format (checksummed, so a torn tail is found):
//! one per schedule kept ([`Scheduled::to_record`]), one per schedule
//! cancelled ([`done_record`]), and for one that fires, one when it fires
//! (carrying it and its message's number, [`Scheduled::to_firing_record`])
//! and one once that message is written ([`fired_record`]). [`replay`]
//! turns a journal back into the pending schedules and the fired ones
//! whose messages may not have been written (to fire again: at least
//! once; their ids may be in use again by then).

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;

use crate::log::Record;
use crate::message::{
    Meta, PayloadKind, SCHEDULE_DONE_HEADER, SCHEDULE_FIRED_HEADER, SCHEDULE_FIRING_HEADER, SCHEDULE_ID_HEADER,
};

/// Pending schedules of one topic: past this a schedule is refused
/// (`too_many_schedules`).
pub const SCHEDULES_PER_TOPIC_MAX: usize = 100_000;
/// Payload bytes pending in one topic's schedules (as above).
pub const SCHEDULED_BYTES_PER_TOPIC_MAX: usize = 64 << 20;
/// Bytes of a schedule id.
pub const SCHEDULE_ID_BYTES_MAX: usize = 128;
/// Furthest ahead a schedule may be set (a year).
pub const SCHEDULE_AHEAD_MS_MAX: u64 = 366 * 24 * 3_600_000;
/// Most schedules one listing returns.
pub const SCHEDULE_LIST_MAX: usize = 1_000;

/// A scheduled message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduled {
    /// Its id.
    pub id: String,
    /// When it is due, ms since the Unix epoch.
    pub due_ms: u64,
    /// Text or binary.
    pub kind: PayloadKind,
    /// The payload.
    pub payload: Bytes,
    /// Its routing key.
    pub key: Option<Bytes>,
    /// Its kind, id and headers.
    pub meta: Option<std::sync::Arc<crate::message::Meta>>,
}

impl Scheduled {
    /// Its journal record: sequence 0, its due time as the timestamp, its
    /// id as the first header, then its metadata's headers.
    pub fn to_record(&self) -> Record {
        self.record(SCHEDULE_ID_HEADER, 0)
    }

    /// Its journal record when it fires as message `seq` (not yet
    /// written): as [`Scheduled::to_record`], under another header name,
    /// numbered `seq`.
    pub fn to_firing_record(&self, seq: u64) -> Record {
        self.record(SCHEDULE_FIRING_HEADER, seq)
    }

    /// The schedule a [`Scheduled::to_record`] record holds; `None` for
    /// another record.
    pub fn from_record(r: Record) -> Option<Scheduled> {
        let (name, id) = r.headers.first().cloned()?;
        (name == SCHEDULE_ID_HEADER).then(|| Scheduled::from_any_record(r, id))
    }

    /// The schedule of a journal record whose first header (its id, `id`)
    /// is dropped.
    fn from_any_record(mut r: Record, id: String) -> Scheduled {
        r.headers.remove(0);
        let (meta, _) = Meta::from_record_headers(r.headers);
        Scheduled { id, due_ms: r.timestamp_ms, kind: r.kind, payload: r.payload, key: r.key, meta }
    }

    fn record(&self, first_header: &str, seq: u64) -> Record {
        let mut headers = vec![(first_header.to_string(), self.id.clone())];
        headers.extend(self.meta.as_ref().map(|m| m.to_record_headers()).unwrap_or_default());
        Record {
            seq,
            timestamp_ms: self.due_ms,
            kind: self.kind,
            key: self.key.clone(),
            headers,
            payload: self.payload.clone(),
        }
    }
}

/// The journal record saying that the message numbered `seq`, a fired
/// schedule's, is written.
pub fn fired_record(seq: u64) -> Record {
    Record {
        seq,
        timestamp_ms: 0,
        kind: PayloadKind::Binary,
        key: None,
        headers: vec![(SCHEDULE_FIRED_HEADER.to_string(), String::new())],
        payload: Bytes::new(),
    }
}

/// What a journal holds: the pending schedules, and the fired ones whose
/// messages were not known written.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Pending, by due time.
    pub pending: Vec<Scheduled>,
    /// Fired, message not known written: to fire again, with the number
    /// its message had.
    pub unwritten: Vec<(u64, Scheduled)>,
}

/// The journal record saying schedule `id` is no longer pending.
pub fn done_record(id: &str) -> Record {
    Record {
        seq: 0,
        timestamp_ms: 0,
        kind: PayloadKind::Binary,
        key: None,
        headers: vec![(SCHEDULE_DONE_HEADER.to_string(), id.to_string())],
        payload: Bytes::new(),
    }
}

/// What a journal's records (in order) leave: pending schedules, and fired
/// ones whose messages were not known written. Other records are skipped.
pub fn replay(records: impl IntoIterator<Item = Record>) -> Replayed {
    let mut live: HashMap<String, Scheduled> = HashMap::new();
    let mut firing: std::collections::BTreeMap<u64, Scheduled> = std::collections::BTreeMap::new();
    let scheduled = |r: Record, id: String| Scheduled::from_any_record(r, id);
    for r in records {
        let Some((name, id)) = r.headers.first().cloned() else { continue };
        match name.as_str() {
            SCHEDULE_DONE_HEADER => {
                live.remove(&id);
            }
            SCHEDULE_ID_HEADER => {
                live.insert(id.clone(), scheduled(r, id));
            }
            SCHEDULE_FIRING_HEADER => {
                live.remove(&id);
                firing.insert(r.seq, scheduled(r, id));
            }
            SCHEDULE_FIRED_HEADER => {
                firing.remove(&r.seq);
            }
            _ => {}
        }
    }
    let mut pending: Vec<Scheduled> = live.into_values().collect();
    pending.sort_by(|a, b| (a.due_ms, &a.id).cmp(&(b.due_ms, &b.id)));
    Replayed { pending, unwritten: firing.into_iter().collect() }
}

/// What [`Schedules::add`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Added {
    /// Kept (`replaced`: a pending one with its id was dropped for it).
    Kept { replaced: bool },
    /// `if_absent` and one with its id is pending: nothing changed; when
    /// that one is due.
    Present { due_ms: u64 },
}

/// Why a schedule was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The topic has its schedules (count or bytes).
    #[error("the topic has {SCHEDULES_PER_TOPIC_MAX} schedules or {SCHEDULED_BYTES_PER_TOPIC_MAX} bytes pending")]
    TooMany,
}

/// One topic's pending schedules.
#[derive(Debug, Default)]
pub struct Schedules {
    by_id: HashMap<String, Scheduled>,
    /// (due, id), earliest first.
    by_due: BTreeSet<(u64, String)>,
    bytes: usize,
    /// About the bytes the pending schedules take as journal records.
    record_bytes: usize,
}

/// About the bytes `s` takes as a journal record (its fields plus the
/// record's framing and header names).
pub fn record_size(s: &Scheduled) -> usize {
    let headers = s.meta.as_ref().map_or(0, |m| {
        m.headers.iter().map(|(n, v)| n.len() + v.len() + 8).sum::<usize>() + m.id.as_ref().map_or(0, |i| i.len() + 32)
    });
    64 + s.id.len() + s.key.as_ref().map_or(0, |k| k.len()) + s.payload.len() + headers
}

impl Schedules {
    /// Adds (or replaces) a schedule.
    pub fn add(&mut self, s: Scheduled, if_absent: bool) -> Result<Added, ScheduleError> {
        if let Some(old) = self.by_id.get(&s.id) {
            if if_absent {
                return Ok(Added::Present { due_ms: old.due_ms });
            }
        }
        let old_len = self.by_id.get(&s.id).map_or(0, |o| o.payload.len());
        let new = !self.by_id.contains_key(&s.id);
        if (new && self.by_id.len() >= SCHEDULES_PER_TOPIC_MAX)
            || self.bytes - old_len + s.payload.len() > SCHEDULED_BYTES_PER_TOPIC_MAX
        {
            return Err(ScheduleError::TooMany);
        }
        let replaced = self.cancel(&s.id).is_some();
        self.bytes += s.payload.len();
        self.record_bytes += record_size(&s);
        self.by_due.insert((s.due_ms, s.id.clone()));
        self.by_id.insert(s.id.clone(), s);
        Ok(Added::Kept { replaced })
    }

    /// Cancels a pending schedule; what it held.
    pub fn cancel(&mut self, id: &str) -> Option<Scheduled> {
        let s = self.by_id.remove(id)?;
        self.by_due.remove(&(s.due_ms, s.id.clone()));
        self.bytes -= s.payload.len();
        self.record_bytes -= record_size(&s);
        Some(s)
    }

    /// Takes the schedules due at `now_ms`, earliest first.
    pub fn take_due(&mut self, now_ms: u64) -> Vec<Scheduled> {
        let due: Vec<String> = self.by_due.iter().take_while(|(d, _)| *d <= now_ms).map(|(_, id)| id.clone()).collect();
        due.iter().filter_map(|id| self.cancel(id)).collect()
    }

    /// Puts back a schedule that was due but could not be sequenced now
    /// (the topic refused it for a while): tried again at the next tick.
    pub fn put_back(&mut self, s: Scheduled) {
        if !self.by_id.contains_key(&s.id) {
            self.bytes += s.payload.len();
            self.record_bytes += record_size(&s);
            self.by_due.insert((s.due_ms, s.id.clone()));
            self.by_id.insert(s.id.clone(), s);
        }
    }

    /// The earliest due time.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.by_due.first().map(|(d, _)| *d)
    }

    /// Pending schedules, earliest first, at most `limit`: (id, due, bytes).
    pub fn list(&self, limit: usize) -> Vec<(String, u64, usize)> {
        self.by_due
            .iter()
            .take(limit.min(SCHEDULE_LIST_MAX))
            .filter_map(|(due, id)| Some((id.clone(), *due, self.by_id.get(id)?.payload.len())))
            .collect()
    }

    /// Every pending schedule's journal record (to rewrite a journal with
    /// only what is pending).
    pub fn records(&self) -> Vec<Record> {
        self.by_due.iter().filter_map(|(_, id)| Some(self.by_id.get(id)?.to_record())).collect()
    }

    /// About the bytes the pending schedules take as journal records.
    pub fn record_bytes(&self) -> usize {
        self.record_bytes
    }

    /// Pending schedules.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether none is pending.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(id: &str, due_ms: u64) -> Scheduled {
        let payload = Bytes::from(id.to_string());
        Scheduled { id: id.into(), due_ms, kind: PayloadKind::Text, payload, key: None, meta: None }
    }

    #[test]
    fn due_in_order_replaced_kept_if_absent_and_cancelled() {
        let mut t = Schedules::default();
        assert_eq!(t.add(s("a", 30), false), Ok(Added::Kept { replaced: false }));
        assert_eq!(t.add(s("b", 10), false), Ok(Added::Kept { replaced: false }));
        assert_eq!(t.add(s("c", 20), false), Ok(Added::Kept { replaced: false }));
        assert_eq!(t.add(s("a", 5), false), Ok(Added::Kept { replaced: true }), "same id: replaced");
        assert_eq!(t.add(s("b", 99), true), Ok(Added::Present { due_ms: 10 }), "if_absent keeps the pending one");
        assert_eq!(t.next_due_ms(), Some(5));
        assert_eq!(t.cancel("c").map(|c| c.due_ms), Some(20));
        assert!(t.cancel("c").is_none());
        assert_eq!(t.list(10), vec![("a".to_string(), 5, 1), ("b".to_string(), 10, 1)]);
        assert!(t.take_due(4).is_empty());
        let due: Vec<String> = t.take_due(10).into_iter().map(|d| d.id).collect();
        assert_eq!(due, ["a", "b"]);
        assert!(t.is_empty() && t.bytes == 0 && t.record_bytes == 0);
    }

    #[test]
    fn a_journal_replays_to_what_is_pending() {
        let meta = Meta { kind: None, id: Some("m1".into()), headers: vec![("h".into(), "v".into())] };
        let with_meta = Scheduled { meta: Some(std::sync::Arc::new(meta)), key: Some("k".into()), ..s("a", 30) };
        let journal = vec![
            with_meta.to_record(),
            s("b", 10).to_record(),
            s("c", 20).to_record(),
            done_record("b"),
            s("c", 25).to_record(), // replaced
            done_record("nope"),
            s("f", 5).to_record(),
            s("f", 5).to_firing_record(40), // fired, written
            fired_record(40),
            s("g", 6).to_record(),
            s("g", 6).to_firing_record(41), // fired, not known written
            s("g", 50).to_record(),         // its id in use again
        ];
        // Through the log's codec, as on disk.
        let mut bytes = Vec::new();
        for r in &journal {
            crate::log::encode(r, &mut bytes).unwrap();
        }
        let scan = crate::log::scan(&Bytes::from(bytes));
        assert!(scan.torn.is_none());
        let replayed = replay(scan.records.into_iter().map(|(_, r)| r));
        assert_eq!(replayed.pending, vec![s("c", 25), with_meta, s("g", 50)]);
        assert_eq!(replayed.unwritten, vec![(41, s("g", 6))]);
    }

    #[test]
    fn bounded() {
        let mut t = Schedules::default();
        for i in 0..SCHEDULES_PER_TOPIC_MAX {
            t.add(s(&i.to_string(), 1), false).unwrap();
        }
        assert_eq!(t.add(s("one more", 1), false), Err(ScheduleError::TooMany));
        assert!(t.add(s("7", 2), false).is_ok(), "a replacement fits");
        assert_eq!(t.len(), SCHEDULES_PER_TOPIC_MAX);
    }
}
