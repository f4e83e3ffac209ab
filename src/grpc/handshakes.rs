//! Refused TLS handshakes, kept off the write path, and the per-source cap
//! on handshakes in progress.
//!
//! An unauthenticated peer must not be able to cause a durable write per
//! connection: the first refusal of each source and reason in a window is
//! audited at once, and the rest of that window's are counted and audited
//! as one summary record when the window ends. Sources are addresses (IPv6
//! by /64); the table is bounded, and sources beyond it share one entry.
//! Every refusal is still counted in metrics and towards the source's alert.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::alerts::Subject;

/// Sources and reasons tracked at once within a window; beyond, refusals
/// are summarised under one shared entry.
const MAX_ENTRIES: usize = 1024;

/// What the shared entry is recorded as.
const OTHER_SOURCES: &str = "(other sources)";

/// Handshakes in progress from one source at most: more are closed at
/// accept, so one address cannot hold the server's connection slots.
pub const MAX_PENDING_PER_SOURCE: usize = 32;

/// One window's refused handshakes beyond the first of each source and
/// reason.
#[derive(Default)]
pub struct HandshakeLedger {
    counts: Mutex<HashMap<(String, String), u64>>,
}

/// What to do with one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The first of its source and reason in this window: audit it now.
    First,
    /// Counted into the window's summary.
    Counted,
}

impl HandshakeLedger {
    /// Notes one refused handshake from `source` for `reason`.
    pub fn note(&self, source: &Subject, reason: &str) -> Refusal {
        let mut counts = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (source.to_string(), reason.to_owned());
        if let Some(n) = counts.get_mut(&key) {
            *n += 1;
            return Refusal::Counted;
        }
        if counts.len() >= MAX_ENTRIES {
            *counts.entry((OTHER_SOURCES.to_owned(), String::new())).or_default() += 1;
            return Refusal::Counted;
        }
        counts.insert(key, 0);
        Refusal::First
    }

    /// Ends the window: `(source, reason, refusals beyond the first)` for
    /// every entry that has any, and a fresh window.
    pub fn drain(&self) -> Vec<(String, String, u64)> {
        let mut counts = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out: Vec<_> =
            counts.drain().filter(|(_, n)| *n > 0).map(|((source, reason), n)| (source, reason, n)).collect();
        out.sort();
        out
    }
}

/// Handshakes in progress per source.
#[derive(Default)]
pub struct PendingHandshakes {
    by_source: Mutex<HashMap<Subject, usize>>,
}

impl PendingHandshakes {
    /// A place for one more handshake from `source`, or `None` when it
    /// already has [`MAX_PENDING_PER_SOURCE`]. The place is given back when
    /// the guard drops.
    pub fn enter(self: &Arc<Self>, source: Subject) -> Option<PendingGuard> {
        let mut by_source = self.by_source.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = by_source.entry(source.clone()).or_default();
        if *n >= MAX_PENDING_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(PendingGuard { pending: self.clone(), source })
    }
}

/// One handshake's place under [`MAX_PENDING_PER_SOURCE`].
pub struct PendingGuard {
    pending: Arc<PendingHandshakes>,
    source: Subject,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut by_source = self.pending.by_source.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_refusal_is_recorded_the_rest_summarised() {
        let ledger = HandshakeLedger::default();
        let a = Subject::peer("192.0.2.1".parse().unwrap());
        let b = Subject::peer("2001:db8::1".parse().unwrap());
        assert_eq!(ledger.note(&a, "junk"), Refusal::First);
        for _ in 0..9_999 {
            assert_eq!(ledger.note(&a, "junk"), Refusal::Counted);
        }
        assert_eq!(ledger.note(&a, "timeout"), Refusal::First);
        assert_eq!(ledger.note(&b, "junk"), Refusal::First);
        assert_eq!(ledger.note(&Subject::peer("2001:db8::2".parse().unwrap()), "junk"), Refusal::Counted, "same /64");
        assert_eq!(
            ledger.drain(),
            [("192.0.2.1".into(), "junk".into(), 9_999), ("2001:db8::/64".into(), "junk".into(), 1)]
        );
        // A new window: the first is recorded again.
        assert_eq!(ledger.note(&a, "junk"), Refusal::First);
        assert_eq!(ledger.drain(), []);
    }

    #[test]
    fn the_table_is_bounded() {
        let ledger = HandshakeLedger::default();
        for i in 0..(u32::try_from(MAX_ENTRIES).unwrap() + 500) {
            ledger.note(&Subject::peer(std::net::IpAddr::V4(i.into())), "junk");
        }
        let drained = ledger.drain();
        assert_eq!(drained, [(OTHER_SOURCES.into(), String::new(), 500)]);
    }

    #[test]
    fn pending_handshakes_are_capped_per_source() {
        let pending = Arc::new(PendingHandshakes::default());
        let a = Subject::peer("192.0.2.1".parse().unwrap());
        let guards: Vec<_> = (0..MAX_PENDING_PER_SOURCE).map(|_| pending.enter(a.clone()).unwrap()).collect();
        assert!(pending.enter(a.clone()).is_none());
        assert!(pending.enter(Subject::peer("192.0.2.2".parse().unwrap())).is_some(), "another source has its own");
        drop(guards);
        assert!(pending.enter(a).is_some());
        assert!(pending.by_source.lock().unwrap().len() <= 1);
    }
}
