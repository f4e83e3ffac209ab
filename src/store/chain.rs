//! The end of an audit chain as a backend's writer sees it: the head as
//! committed, the head including the records of the open transaction, and
//! those records, for the audit sink once they commit. Each backend's
//! writer keeps one; what it keeps beside (SQLite's block heuristic,
//! PostgreSQL's hold on its chain) stays its own. Never holds a key: the
//! MAC key is the writer's, lent to [`ChainTail::next`].

use std::sync::Arc;

use crate::audit::{AuditKey, AuditRecord, AuditSink, Head, MAC_LEN};

pub(crate) struct ChainTail {
    /// The head as committed.
    pub(crate) committed: Head,
    /// The head including the records written in the open transaction.
    pub(crate) tentative: Head,
    /// Records written in the open transaction, for the sink after commit.
    pending: Vec<(u64, AuditRecord, [u8; MAC_LEN])>,
    sink: Option<Arc<AuditSink>>,
}

/// Where a job began on the chain: see [`ChainTail::undo`].
#[derive(Clone, Copy)]
pub(crate) struct Mark {
    tentative: Head,
    pending: usize,
}

impl ChainTail {
    /// At the genesis head, until the store's head is read.
    pub(crate) fn new(sink: Option<Arc<AuditSink>>) -> Self {
        Self { committed: Head::GENESIS, tentative: Head::GENESIS, pending: Vec::new(), sink }
    }

    /// `record` as the next record after the tentative head: its sequence
    /// number, its encoding and its MAC.
    pub(crate) fn next(&self, key: &AuditKey, record: &AuditRecord) -> (u64, Vec<u8>, [u8; MAC_LEN]) {
        let seq = self.tentative.seq + 1;
        let encoded = record.encode(seq);
        let mac = key.chain(&self.tentative.mac, &encoded);
        (seq, encoded, mac)
    }

    /// `record` went in with the open transaction as `seq`: the head now.
    pub(crate) fn appended(&mut self, seq: u64, record: &AuditRecord, mac: [u8; MAC_LEN]) {
        self.tentative = Head { seq, mac };
        if self.sink.is_some() {
            self.pending.push((seq, record.clone(), mac));
        }
    }

    /// Where the chain stands now, for [`ChainTail::undo`].
    pub(crate) fn mark(&self) -> Mark {
        Mark { tentative: self.tentative, pending: self.pending.len() }
    }

    /// Forgets the records appended since `mark` (their job was rolled back).
    pub(crate) fn undo(&mut self, mark: Mark) {
        self.tentative = mark.tentative;
        self.pending.truncate(mark.pending);
    }

    /// The head as the store has it (read at start, or again by a writer
    /// that may have missed others' records): both heads.
    pub(crate) fn restart_at(&mut self, head: Head) {
        self.committed = head;
        self.tentative = head;
    }

    /// The open transaction ended: committed (its records are the chain's
    /// now, and go to the sink) or rolled back.
    pub(crate) fn ended(&mut self, committed: bool) {
        if committed {
            self.committed = self.tentative;
            if let Some(sink) = &self.sink
                && !self.pending.is_empty()
            {
                sink.emit(&self.pending);
            }
        } else {
            self.tentative = self.committed;
        }
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(action: &str) -> AuditRecord {
        AuditRecord { action: action.into(), at_micros: 1, ..AuditRecord::default() }
    }

    #[test]
    fn an_undone_job_leaves_the_chain_where_it_was_and_a_rollback_where_it_committed() {
        let key = AuditKey::from_bytes([3; 32]);
        let mut tail = ChainTail::new(None);
        let (seq, encoded, mac) = tail.next(&key, &record("a"));
        assert_eq!((seq, mac), (1, key.chain(&Head::GENESIS.mac, &encoded)));
        tail.appended(seq, &record("a"), mac);
        tail.ended(true);
        let first = Head { seq: 1, mac };
        assert_eq!((tail.committed, tail.tentative), (first, first));

        let mark = tail.mark();
        let (seq, _, mac) = tail.next(&key, &record("b"));
        assert_eq!(seq, 2);
        tail.appended(seq, &record("b"), mac);
        tail.undo(mark);
        assert_eq!(tail.tentative, first, "an undone record stayed the head");
        // The next record chains from the first again.
        assert_eq!(tail.next(&key, &record("b")).2, mac);

        tail.appended(2, &record("b"), mac);
        tail.ended(false);
        assert_eq!((tail.committed, tail.tentative), (first, first), "a rolled-back record stayed the head");
        tail.restart_at(Head { seq: 9, mac: [1; MAC_LEN] });
        assert_eq!(tail.next(&key, &record("c")).0, 10);
    }
}
