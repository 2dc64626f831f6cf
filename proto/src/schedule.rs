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

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;

use crate::message::PayloadKind;

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
        self.by_due.insert((s.due_ms, s.id.clone()));
        self.by_id.insert(s.id.clone(), s);
        Ok(Added::Kept { replaced })
    }

    /// Cancels a pending schedule; what it held.
    pub fn cancel(&mut self, id: &str) -> Option<Scheduled> {
        let s = self.by_id.remove(id)?;
        self.by_due.remove(&(s.due_ms, s.id.clone()));
        self.bytes -= s.payload.len();
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
        assert!(t.is_empty() && t.bytes == 0);
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
