//! The audit trail in SQLite: `audit` rows (the chained encoding plus query
//! columns) and `audit_records` (which audit records involve which record,
//! keyed by the record's place, so a tokenize appends there too).

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension as _, params};

use super::SqliteStore;
use super::records::sql_seq;
use super::writer::WriteTx;
use crate::audit::{AuditKey, AuditRecord, Head, MAC_LEN};
use crate::store::{AuditFilter, AuditRow, AuditStore, CollectionId, RecordMatch, RecordRef, StoreError, TokenForm};

impl WriteTx<'_> {
    /// Appends `record` to the audit trail in this transaction: it commits
    /// with the data change or not at all. Without an audit key, fails.
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
        let key = self.audit.key.as_ref().ok_or(StoreError::AuditUnavailable)?;
        let seq = self.audit.tentative.seq + 1;
        let encoded = record.encode(seq);
        let mac = key.chain(&self.audit.tentative.mac, &encoded);
        let seq_sql = i64::try_from(seq).map_err(|_| StoreError::AuditUnavailable)?;
        let audit_failed = |e: rusqlite::Error| {
            let error = StoreError::from(e);
            if error.is_unavailable() && !matches!(error, StoreError::Full | StoreError::ReadOnly | StoreError::Busy) {
                tracing::error!(error = %error, "audit insert failed");
                StoreError::AuditUnavailable
            } else {
                error
            }
        };
        self.conn
            .prepare_cached(
                "INSERT INTO audit (seq, at, caller, action, collection, outcome, record, mac)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    seq_sql,
                    record.at_micros,
                    record.caller,
                    record.action,
                    record.collection,
                    record.outcome,
                    encoded,
                    mac.as_slice()
                ])
            })
            .map_err(audit_failed)?;
        let mut stmt = self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO audit_records (collection_id, record_seq, audit_seq) VALUES (?1, ?2, ?3)",
            )
            .map_err(audit_failed)?;
        for &record_seq in seqs {
            stmt.execute(params![collection.0, sql_seq(record_seq)?, seq_sql]).map_err(audit_failed)?;
        }
        self.audit.tentative = Head { seq, mac };
        if self.audit.sink.is_some() {
            self.audit.pending.push((seq, record.clone(), mac));
        }
        Ok(seq)
    }
}

#[async_trait]
impl AuditStore for SqliteStore {
    async fn append_audit(&self, record: AuditRecord) -> Result<u64, StoreError> {
        self.write(move |tx| tx.append_audit(&record)).await
    }

    async fn append_read_audit(
        &self,
        collection: CollectionId,
        seqs: Vec<u64>,
        record: AuditRecord,
    ) -> Result<u64, StoreError> {
        self.write(move |tx| tx.append_audit_of(&record, collection, &seqs)).await
    }

    async fn install_audit_key(&self, key: AuditKey) -> Result<Head, StoreError> {
        self.write(move |tx| {
            let head = last_head(tx.conn)?;
            tx.audit.key = Some(key);
            tx.audit.committed = head;
            tx.audit.tentative = head;
            Ok(head)
        })
        .await
    }

    async fn audit_head(&self) -> Result<Head, StoreError> {
        self.read(last_head).await
    }

    async fn query_audit(&self, filter: AuditFilter, limit: usize) -> Result<Vec<AuditRow>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT a.seq, a.record, a.mac, a.at, a.caller, a.action, a.collection, a.outcome
                 FROM audit a
                 WHERE a.seq > ?1
                   AND (?2 IS NULL OR a.seq IN (SELECT audit_seq FROM audit_records
                                                WHERE collection_id = ?2 AND record_seq = ?10))
                   AND (?3 IS NULL OR a.caller = ?3)
                   AND (?4 IS NULL OR a.action = ?4)
                   AND (?5 IS NULL OR a.collection = ?5)
                   AND (?6 IS NULL OR a.outcome = ?6)
                   AND (?7 IS NULL OR a.at >= ?7)
                   AND (?8 IS NULL OR a.at < ?8)
                 ORDER BY a.seq LIMIT ?9",
            )?;
            let after = i64::try_from(filter.after_seq).unwrap_or(i64::MAX);
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let (record_collection, record_seq) = match filter.record {
                RecordMatch::Any => (None, None),
                RecordMatch::Of(collection, seq) => (Some(collection.0), Some(sql_seq(seq)?)),
                RecordMatch::Unissued => return Ok(Vec::new()),
            };
            let rows = stmt.query_map(
                params![
                    after,
                    record_collection,
                    filter.caller,
                    filter.action,
                    filter.collection,
                    filter.outcome,
                    filter.since,
                    filter.until,
                    limit,
                    record_seq
                ],
                audit_row,
            )?;
            let mut out: Vec<AuditRow> = rows.collect::<Result<_, _>>()?;
            drop(stmt);
            let mut indexed = conn.prepare_cached(
                "SELECT x.collection_id, r.seq, r.token_check, r.token FROM audit_records x
                 JOIN records r ON r.collection_id = x.collection_id AND r.seq = x.record_seq
                 WHERE x.audit_seq = ?1",
            )?;
            for row in &mut out {
                let refs = indexed.query_map([sql_seq(row.seq)?], |r| {
                    let check: Option<[u8; crate::token::CHECK_BYTES]> = r.get(2)?;
                    let token = match check {
                        Some(check) => TokenForm::Sealed(check),
                        None => TokenForm::Text(r.get(3)?),
                    };
                    let seq = u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0);
                    Ok((CollectionId(r.get(0)?), RecordRef { seq, token }))
                })?;
                row.indexed = refs.collect::<Result<_, _>>()?;
            }
            Ok(out)
        })
        .await
    }
}

/// The last audit record's number and MAC (the genesis head when empty).
fn last_head(conn: &Connection) -> Result<Head, StoreError> {
    let last = conn
        .prepare_cached("SELECT seq, mac FROM audit ORDER BY seq DESC LIMIT 1")?
        .query_row([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?)))
        .optional()?;
    let Some((seq, mac)) = last else { return Ok(Head::GENESIS) };
    let mac: [u8; MAC_LEN] = mac.try_into().map_err(|_| StoreError::Corrupt)?;
    Ok(Head { seq: u64::try_from(seq).map_err(|_| StoreError::Corrupt)?, mac })
}

/// An `audit` row selected as `seq, record, mac, at, caller, action,
/// collection, outcome` (its index entries are read after).
fn audit_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRow> {
    Ok(AuditRow {
        seq: u64::try_from(row.get::<_, i64>(0)?).unwrap_or(0),
        record: row.get(1)?,
        mac: row.get(2)?,
        at: row.get(3)?,
        caller: row.get(4)?,
        action: row.get(5)?,
        collection: row.get(6)?,
        outcome: row.get(7)?,
        indexed: Vec::new(),
    })
}
