//! The audit trail in PostgreSQL: this node's chain in `audit` (the
//! chained encoding plus query columns) and `audit_records` (which audit
//! records involve which records), whose index on the record the database
//! keeps in the same transaction.

use async_trait::async_trait;

use super::append::{Part, write_parts};
use super::records::record_ref;
use super::writer::WriteTx;
use super::{Db, PostgresStore, sql_i64, stored_u64};
use crate::audit::{AuditKey, AuditRecord, Head, MAC_LEN};
use crate::store::{AuditFilter, AuditRow, AuditStore, CollectionId, RecordMatch, StoreError};

impl WriteTx<'_, '_> {
    /// Appends `record` to this node's chain in this transaction: it
    /// commits with the data change or not at all. Without an audit key,
    /// fails.
    pub(super) fn append_audit(&mut self, record: &AuditRecord) -> Result<u64, StoreError> {
        self.append_audit_of(record, CollectionId(0), &[])
    }

    /// [`WriteTx::append_audit`] of a record whose tokens are those of
    /// `collection`'s records at `seqs`: indexed under each.
    pub(super) fn append_audit_of(
        &mut self,
        record: &AuditRecord,
        collection: CollectionId,
        seqs: &[u64],
    ) -> Result<u64, StoreError> {
        // The statement of the joined writes, with this record alone: one
        // round trip, and no entry without its record.
        let part = Part { collection, records: &[], audit: record, read: seqs };
        let written = write_parts(self, &[part])?;
        // With no record to insert, nothing keeps it out: it went in.
        written.audit_seqs.first().copied().ok_or(StoreError::AuditUnavailable)
    }

    /// The next record of this node's chain, `record` as its encoding and
    /// MAC, not yet written: see [`WriteTx::appended`]. Without an audit
    /// key, fails.
    pub(super) fn next_audit<'r>(&mut self, record: &'r AuditRecord) -> Result<NextAudit<'r>, StoreError> {
        if self.audit.key.is_none() {
            return Err(StoreError::AuditUnavailable);
        }
        self.audit.hold(&mut self.tx)?;
        let key = self.audit.key.as_ref().ok_or(StoreError::AuditUnavailable)?;
        let (seq, encoded, mac) = self.audit.tail.next(key, record);
        let seq_sql = i64::try_from(seq).map_err(|_| StoreError::AuditUnavailable)?;
        Ok(NextAudit { record, seq, seq_sql, encoded, mac, mac_sql: mac.to_vec() })
    }

    /// `next` went in with this transaction: it is the chain's head now.
    pub(super) fn appended(&mut self, next: &NextAudit<'_>) -> u64 {
        self.audit.tail.appended(next.seq, next.record, next.mac);
        next.seq
    }
}

/// The places an audit record is indexed under, each once (a request may
/// name a token twice): the index is written without a conflict check,
/// which cost as much as the entry itself.
pub(super) fn index_entries(seqs: impl IntoIterator<Item = u64>) -> Result<Vec<i64>, StoreError> {
    let mut entries = seqs.into_iter().map(sql_i64).collect::<Result<Vec<i64>, _>>()?;
    entries.sort_unstable();
    entries.dedup();
    Ok(entries)
}

/// An audit record numbered, with its MAC, as the next of this node's chain.
pub(super) struct NextAudit<'r> {
    record: &'r AuditRecord,
    pub(super) seq: u64,
    pub(super) seq_sql: i64,
    pub(super) encoded: Vec<u8>,
    mac: [u8; MAC_LEN],
    /// `mac` as the driver takes a bytea (it takes no arrays).
    pub(super) mac_sql: Vec<u8>,
}

impl<'r> NextAudit<'r> {
    /// The record this is the encoding of.
    pub(super) fn record(&self) -> &'r AuditRecord {
        self.record
    }
}

/// What a failed audit insert answers: the database's reason where it is
/// one the caller can act on (full, read-only, busy, away), else that the
/// audit trail is unavailable.
pub(super) fn audit_failed(e: postgres::Error) -> StoreError {
    let error = StoreError::from(e);
    if error.is_unavailable()
        && !matches!(error, StoreError::Full | StoreError::ReadOnly | StoreError::Busy | StoreError::Unreachable)
    {
        tracing::error!(error = %error, "audit insert failed");
        StoreError::AuditUnavailable
    } else {
        error
    }
}

#[async_trait]
impl AuditStore for PostgresStore {
    async fn append_audit(&self, record: AuditRecord) -> Result<u64, StoreError> {
        self.write(move |tx| tx.append_audit(&record)).await
    }

    async fn append_read_audit(
        &self,
        collection: CollectionId,
        seqs: Vec<u64>,
        record: AuditRecord,
    ) -> Result<u64, StoreError> {
        self.append(super::append::Append::read(collection, seqs, record)).await
    }

    async fn install_audit_key(&self, key: AuditKey) -> Result<Head, StoreError> {
        self.write(move |tx| {
            let head = last_head(&mut tx.tx, &tx.audit.chain)?;
            tx.audit.key = Some(key);
            tx.audit.tail.restart_at(head);
            Ok(head)
        })
        .await
    }

    async fn audit_chains(&self) -> Result<Vec<String>, StoreError> {
        let own = self.chain.clone();
        self.read(move |tx| {
            let mut chains = vec![own.clone()];
            for row in tx.query("SELECT chain FROM audit_chains WHERE chain <> $1 ORDER BY chain", &[&own])? {
                chains.push(row.try_get(0)?);
            }
            Ok(chains)
        })
        .await
    }

    async fn audit_head(&self) -> Result<Head, StoreError> {
        let chain = self.chain.clone();
        self.read(move |tx| last_head(tx, &chain)).await
    }

    async fn check_token_index(&self) -> Result<Option<u64>, StoreError> {
        // The searchable index is the database's own index on
        // `audit_records`, written in each record's transaction: nothing is
        // built behind the write path that could fall out of step.
        Ok(None)
    }

    async fn query_audit(&self, filter: AuditFilter, limit: usize) -> Result<Vec<AuditRow>, StoreError> {
        let chain = filter.chain.clone().unwrap_or_else(|| self.chain.clone());
        self.read(move |tx| {
            let after = i64::try_from(filter.after_seq).unwrap_or(i64::MAX);
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let (collection, record_seq) = match filter.record {
                RecordMatch::Any => (None, None),
                RecordMatch::Of(collection, seq) => (Some(collection.0), Some(sql_i64(seq)?)),
                RecordMatch::Unissued => return Ok(Vec::new()),
            };
            // Its filters are optional: planned for the ones given.
            let rows = tx.planned_for_values(|tx| {
                Ok(tx.query(
                    "SELECT a.seq, a.record, a.mac, a.at, a.caller, a.action, a.collection, a.outcome
                 FROM audit a
                 WHERE a.chain = $1 AND a.seq > $2
                   AND ($3::bigint IS NULL OR a.seq IN (
                        SELECT x.audit_seq FROM audit_records x
                        WHERE x.collection_id = $3 AND x.record_seq = $4 AND x.chain = a.chain))
                   AND ($5::text IS NULL OR a.caller = $5)
                   AND ($6::text IS NULL OR a.action = $6)
                   AND ($7::text IS NULL OR a.collection = $7)
                   AND ($8::text IS NULL OR a.outcome = $8)
                   AND ($9::bigint IS NULL OR a.at >= $9)
                   AND ($10::bigint IS NULL OR a.at < $10)
                 ORDER BY a.seq LIMIT $11",
                    &[
                        &chain,
                        &after,
                        &collection,
                        &record_seq,
                        &filter.caller,
                        &filter.action,
                        &filter.collection,
                        &filter.outcome,
                        &filter.since,
                        &filter.until,
                        &limit,
                    ],
                )?)
            })?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                out.push(AuditRow {
                    seq: stored_u64(row.try_get(0)?)?,
                    record: row.try_get(1)?,
                    mac: row.try_get(2)?,
                    at: row.try_get(3)?,
                    caller: row.try_get(4)?,
                    action: row.try_get(5)?,
                    collection: row.try_get(6)?,
                    outcome: row.try_get(7)?,
                    indexed: Vec::new(),
                });
            }
            for row in &mut out {
                let seq = sql_i64(row.seq)?;
                for r in tx.query(
                    "SELECT x.collection_id, r.seq, r.token_check, r.token, r.shaped FROM audit_records x
                     JOIN records r ON r.collection_id = x.collection_id AND r.seq = x.record_seq
                     WHERE x.chain = $1 AND x.audit_seq = $2 ORDER BY x.collection_id, x.record_seq",
                    &[&chain, &seq],
                )? {
                    row.indexed.push((CollectionId(r.try_get(0)?), record_ref(&r, 1)?));
                }
            }
            Ok(out)
        })
        .await
    }
}

/// The last committed record of chain `chain` (the genesis head when it
/// has none).
pub(super) fn last_head(conn: &mut Db<'_, '_>, chain: &str) -> Result<Head, StoreError> {
    let Some(row) =
        conn.query_opt("SELECT seq, mac FROM audit WHERE chain = $1 ORDER BY seq DESC LIMIT 1", &[&chain])?
    else {
        return Ok(Head::GENESIS);
    };
    let mac: [u8; MAC_LEN] = row.try_get::<_, Vec<u8>>(1)?.try_into().map_err(|_| StoreError::Corrupt)?;
    Ok(Head { seq: stored_u64(row.try_get(0)?)?, mac })
}
