//! Writes that append, and that a group commit joins into one statement:
//! the records of a collection without a blind index with their audit
//! record (a tokenize), and a read's audit record (a detokenize).
//!
//! Alone in a group commit, such a write is a job like any other. Two or
//! more in one group commit go in with one statement ahead of the batch's
//! other jobs, so that a batch of single-value requests costs the
//! database one statement, not a savepoint and a statement each (the
//! writer is one connection: its round trips are what bounds it). That
//! statement writes every record, every audit record (chained in order)
//! and every audit index entry, or no audit record at all: if a token was
//! taken, a key version is out of use or the database refused, the writer
//! rolls the transaction back and runs the batch again job by job, where
//! each write meets its own outcome. Nothing here ever answers a request
//! for a write that is not committed.

use std::borrow::Cow;
use std::collections::HashSet;

use tokio::sync::oneshot;

use super::writer::WriteTx;
use super::{sql_i64, stored_u64};
use crate::audit::AuditRecord;
use crate::store::{CollectionId, InsertOutcome, NewRecord, RenderToken, StoreError, now_micros};

/// One write that appends: see the module's doc.
pub(super) struct Append {
    collection: CollectionId,
    /// The records to insert (none for a read), none with a blind index.
    records: Vec<NewRecord>,
    /// The request's audit record, without the tokens of `records` (they
    /// are listed as they are written).
    audit: AuditRecord,
    /// The places a read's audit record is indexed under.
    read: Vec<u64>,
    answer: Answer,
}

enum Answer {
    Insert {
        render: RenderToken,
        reply: oneshot::Sender<Result<Vec<InsertOutcome>, StoreError>>,
        output: Option<Vec<InsertOutcome>>,
    },
    Read {
        reply: oneshot::Sender<Result<u64, StoreError>>,
        output: Option<u64>,
    },
}

impl Append {
    /// A tokenize's records and audit record; `records` have no blind index.
    pub(super) fn insert(
        collection: CollectionId,
        records: Vec<NewRecord>,
        audit: AuditRecord,
        render: RenderToken,
    ) -> (Self, oneshot::Receiver<Result<Vec<InsertOutcome>, StoreError>>) {
        let (reply, answer) = oneshot::channel();
        let answer_to = Answer::Insert { render, reply, output: None };
        (Self { collection, records, audit, read: Vec::new(), answer: answer_to }, answer)
    }

    /// The audit record of a read of `collection`'s records at `seqs`.
    pub(super) fn read(
        collection: CollectionId,
        seqs: Vec<u64>,
        audit: AuditRecord,
    ) -> (Self, oneshot::Receiver<Result<u64, StoreError>>) {
        let (reply, answer) = oneshot::channel();
        (
            Self { collection, records: Vec::new(), audit, read: seqs, answer: Answer::Read { reply, output: None } },
            answer,
        )
    }
}

/// Alone, or run again after the joined statement was refused: the write
/// as a job of its own, with the outcome of each record.
impl<'a, 't> crate::store::job::WriteJob<WriteTx<'a, 't>> for Append {
    fn apply(&mut self, tx: &mut WriteTx<'a, 't>) -> Result<(), StoreError> {
        let audit = std::mem::take(&mut self.audit);
        match &mut self.answer {
            Answer::Insert { render, output, .. } => {
                let records = std::mem::take(&mut self.records);
                *output = Some(super::records::insert_records(tx, self.collection, records, audit, render)?);
            }
            Answer::Read { output, .. } => *output = Some(tx.append_audit_of(&audit, self.collection, &self.read)?),
        }
        Ok(())
    }

    fn finish(self: Box<Self>, outcome: Result<(), StoreError>) {
        // The requester may have gone away: its write stands all the same.
        match self.answer {
            Answer::Insert { reply, output, .. } => {
                let _ = reply.send(outcome.and_then(|()| output.ok_or(StoreError::Closed)));
            }
            Answer::Read { reply, output } => {
                let _ = reply.send(outcome.and_then(|()| output.ok_or(StoreError::Closed)));
            }
        }
    }
}

/// Writes `appends` with one statement in `tx`, first in its transaction.
/// Refused ([`StoreError::Conflict`] when not every one of them went in
/// whole), the transaction holds part of them and must be rolled back.
pub(super) fn write_joined(tx: &mut WriteTx<'_, '_>, appends: &mut [Append]) -> Result<(), StoreError> {
    // Each audit record lists its tokens as written; the appends keep
    // theirs as they came, for the job-by-job run if this one is refused.
    let audits: Vec<Cow<'_, AuditRecord>> = appends
        .iter()
        .map(|a| match &a.answer {
            Answer::Insert { render, .. } => {
                let mut audit = a.audit.clone();
                audit.tokens.extend(a.records.iter().map(|r| render(&r.at)));
                Cow::Owned(audit)
            }
            Answer::Read { .. } => Cow::Borrowed(&a.audit),
        })
        .collect();
    let written = {
        let parts: Vec<Part<'_>> = appends
            .iter()
            .zip(&audits)
            .map(|(a, audit)| Part { collection: a.collection, records: &a.records, audit, read: &a.read })
            .collect();
        write_parts(tx, &parts)?
    };
    drop(audits);
    // The audit records went in only if every record did.
    if !written.audited {
        return Err(StoreError::Conflict);
    }
    for (append, seq) in appends.iter_mut().zip(written.audit_seqs) {
        match &mut append.answer {
            Answer::Insert { output, .. } => {
                *output = Some(append.records.iter().map(|_| InsertOutcome::Inserted).collect());
            }
            Answer::Read { output, .. } => *output = Some(seq),
        }
    }
    Ok(())
}

/// The records of one collection to insert, and the audit record that
/// lists their tokens (or, for a read, the tokens read at `read`).
pub(super) struct Part<'p> {
    pub(super) collection: CollectionId,
    pub(super) records: &'p [NewRecord],
    pub(super) audit: &'p AuditRecord,
    pub(super) read: &'p [u64],
}

/// What [`write_parts`] wrote.
pub(super) struct Written {
    /// The places of the records inserted: telling for the parts of one
    /// collection (two collections' places may be equal).
    pub(super) inserted: HashSet<u64>,
    /// Whether the audit records went in: every record went in, under a
    /// key version in use.
    pub(super) audited: bool,
    /// Each part's audit sequence number, if they went in.
    pub(super) audit_seqs: Vec<u64>,
}

/// Inserts every part's records in one statement, each unless its place
/// or token text is taken, or its text is a token issued before tokens
/// located their records, and each only under a key version in use (the
/// batch counts them, see `writer::count_batch`). If every record went in
/// under a version in use, the same statement appends each part's audit
/// record, in order, as the next of this node's chain, with its index
/// entries; otherwise none. A version that is not there to count is a
/// conflict.
pub(super) fn write_parts(tx: &mut WriteTx<'_, '_>, parts: &[Part<'_>]) -> Result<Written, StoreError> {
    if tx.audit.key.is_none() {
        return Err(StoreError::AuditUnavailable);
    }
    // The chain is taken (and its head read) before the start is noted: a
    // statement that writes no audit record leaves it taken.
    tx.audit.hold(&mut tx.tx)?;
    let before = tx.audit.before_job();
    let now = now_micros();
    let mut r = RecordColumns::default();
    let mut nexts = Vec::with_capacity(parts.len());
    let (mut entry_seqs, mut entry_collections, mut entry_records) = (Vec::new(), Vec::new(), Vec::new());
    for part in parts {
        for record in part.records {
            r.push(part.collection, record)?;
        }
        let next = tx.next_audit(part.audit)?;
        tx.appended(&next);
        for seq in
            super::audit::index_entries(part.records.iter().map(|rec| rec.at.seq).chain(part.read.iter().copied()))?
        {
            entry_seqs.push(next.seq_sql);
            entry_collections.push(part.collection.0);
            entry_records.push(seq);
        }
        nexts.push(next);
    }
    let expected = i64::try_from(r.seqs.len()).map_err(|_| StoreError::Corrupt)?;
    let mut a = AuditColumns::default();
    for next in &nexts {
        a.push(next);
    }
    let chain = &tx.audit.chain;
    let params: [&(dyn postgres::types::ToSql + Sync); 22] = [
        &now,
        &r.collections,
        &r.seqs,
        &r.checks,
        &r.texts,
        &r.shapeds,
        &r.versions,
        &r.ciphertexts,
        &r.expiries,
        &expected,
        chain,
        &a.seqs,
        &a.ats,
        &a.callers,
        &a.actions,
        &a.collections,
        &a.outcomes,
        &a.records,
        &a.macs,
        &entry_seqs,
        &entry_collections,
        &entry_records,
    ];
    let row = tx.tx.query_one(JOINED, &params).map_err(super::audit::audit_failed)?;
    let audit_seqs: Vec<u64> = nexts.iter().map(|n| n.seq).collect();
    drop(nexts);
    // A version that is not there to count is a conflict.
    if !row.try_get::<_, bool>(2)? {
        tx.audit.job_failed(before);
        return Err(StoreError::Conflict);
    }
    let collections = row.try_get::<_, Option<Vec<i64>>>(0)?.unwrap_or_default();
    let seqs = row.try_get::<_, Option<Vec<i64>>>(1)?.unwrap_or_default();
    if collections.len() != seqs.len() {
        return Err(StoreError::Corrupt);
    }
    let went_in: HashSet<(i64, i64)> = collections.into_iter().zip(seqs).collect();
    let audited = row.try_get::<_, i64>(3)? == i64::try_from(parts.len()).map_err(|_| StoreError::Corrupt)?;
    if !audited {
        tx.audit.job_failed(before);
    }
    // Counted by the batch, once per version, just before it commits.
    for part in parts {
        for record in part.records {
            if went_in.contains(&(part.collection.0, sql_i64(record.at.seq)?)) {
                *tx.sealed.entry(part.collection.0).or_default().entry(record.key_version).or_default() += 1;
            }
        }
    }
    if audited {
        tx.audit.entries_written(entry_seqs.len());
    }
    let inserted = went_in.into_iter().map(|(_, seq)| stored_u64(seq)).collect::<Result<HashSet<u64>, _>>()?;
    Ok(Written { inserted, audited, audit_seqs: if audited { audit_seqs } else { Vec::new() } })
}

/// The records, column by column (the driver binds arrays, and `unnest`
/// reads them back as rows).
#[derive(Default)]
struct RecordColumns<'r> {
    collections: Vec<i64>,
    seqs: Vec<i64>,
    checks: Vec<Option<&'r [u8]>>,
    texts: Vec<Option<&'r str>>,
    shapeds: Vec<Option<&'r str>>,
    versions: Vec<i64>,
    ciphertexts: Vec<&'r [u8]>,
    expiries: Vec<Option<i64>>,
}

impl<'r> RecordColumns<'r> {
    fn push(&mut self, collection: CollectionId, r: &'r NewRecord) -> Result<(), StoreError> {
        let (check, text, shaped) = r.at.token.columns();
        self.collections.push(collection.0);
        self.seqs.push(sql_i64(r.at.seq)?);
        self.checks.push(check);
        self.texts.push(text);
        self.shapeds.push(shaped);
        self.versions.push(i64::from(r.key_version));
        self.ciphertexts.push(r.ciphertext.as_slice());
        self.expiries.push(r.expires_at);
        Ok(())
    }
}

/// The audit records, column by column.
#[derive(Default)]
struct AuditColumns<'a> {
    seqs: Vec<i64>,
    ats: Vec<i64>,
    callers: Vec<&'a str>,
    actions: Vec<&'a str>,
    collections: Vec<&'a str>,
    outcomes: Vec<&'a str>,
    records: Vec<&'a [u8]>,
    macs: Vec<&'a [u8]>,
}

impl<'a> AuditColumns<'a> {
    fn push(&mut self, next: &'a super::audit::NextAudit<'_>) {
        let record = next.record();
        self.seqs.push(next.seq_sql);
        self.ats.push(record.at_micros);
        self.callers.push(&record.caller);
        self.actions.push(&record.action);
        self.collections.push(&record.collection);
        self.outcomes.push(&record.outcome);
        self.records.push(&next.encoded);
        self.macs.push(&next.mac_sql);
    }
}

/// See [`write_parts`]. The records go in, their versions are checked to
/// be in use and, if every record went in under one, the audit records and
/// their index entries too: one round trip.
const JOINED: &str = "WITH inserted AS (
         INSERT INTO records (collection_id, seq, token_check, token, shaped, key_version, ciphertext, created_at, expires_at)
         SELECT u.collection_id, u.seq, u.token_check, u.token, u.shaped, u.key_version, u.ciphertext, $1, u.expires_at
         FROM unnest($2::bigint[], $3::bigint[], $4::bytea[], $5::text[], $6::text[], $7::bigint[], $8::bytea[], $9::bigint[])
              AS u (collection_id, seq, token_check, token, shaped, key_version, ciphertext, expires_at)
         -- OFFSET 0: an index probe per record, never a (generic) plan
         -- that hashes the whole collection's tokens first.
         WHERE coalesce(u.token, u.shaped) IS NULL OR NOT (
             EXISTS (SELECT 1 FROM records r
                     WHERE r.collection_id = u.collection_id AND r.token = coalesce(u.token, u.shaped) OFFSET 0)
             OR EXISTS (SELECT 1 FROM legacy_tokens l
                        WHERE l.collection_id = u.collection_id AND l.canonical = coalesce(u.token, u.shaped) OFFSET 0))
         ON CONFLICT DO NOTHING
         RETURNING collection_id, seq, key_version
     ), used AS (
         SELECT DISTINCT collection_id, key_version FROM inserted
     ), counted AS (
         SELECT 1 FROM keys k JOIN used ON k.collection_id = used.collection_id AND k.version = used.key_version
         WHERE k.purpose = 'data' AND k.state IN ('primary', 'active')
     ), complete AS (
         SELECT (SELECT count(*) FROM inserted) = $10
                AND (SELECT count(*) FROM used) = (SELECT count(*) FROM counted) AS ok
     ), entry AS (
         INSERT INTO audit (chain, seq, at, caller, action, collection, outcome, record, mac)
         SELECT $11, a.seq, a.at, a.caller, a.action, a.collection, a.outcome, a.record, a.mac
         FROM unnest($12::bigint[], $13::bigint[], $14::text[], $15::text[], $16::text[], $17::text[], $18::bytea[], $19::bytea[])
              AS a (seq, at, caller, action, collection, outcome, record, mac), complete
         WHERE complete.ok
         RETURNING seq
     ), indexed AS (
         -- An audit record's records: one row per collection (in no
         -- particular order: the blocks sort them).
         INSERT INTO audit_entries (chain, audit_seq, collection_id, record_seqs)
         SELECT $11, x.audit_seq, x.collection_id, array_agg(x.record_seq)
         FROM unnest($20::bigint[], $21::bigint[], $22::bigint[]) AS x (audit_seq, collection_id, record_seq), complete
         WHERE complete.ok
         GROUP BY x.audit_seq, x.collection_id
     )
     SELECT i.collections, i.seqs,
            (SELECT count(*) FROM used) = (SELECT count(*) FROM counted),
            (SELECT count(*) FROM entry)
     FROM (SELECT array_agg(collection_id) AS collections, array_agg(seq) AS seqs FROM inserted) i";
