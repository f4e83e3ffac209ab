//! The audit trail in SQLite: `audit` rows (the chained encoding plus query
//! columns) and `audit_tokens` (which records involve which token).

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension as _, params};

use super::SqliteStore;
use super::writer::WriteTx;
use crate::audit::{AuditKey, AuditRecord, Head, MAC_LEN};
use crate::store::{AuditFilter, AuditRow, AuditStore, StoreError};

impl WriteTx<'_> {
    /// Appends `record` to the audit trail in this transaction: it commits
    /// with the data change or not at all. Without an audit key, fails.
    pub(super) fn append_audit(&mut self, record: &AuditRecord) -> Result<u64, StoreError> {
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
            .prepare_cached("INSERT OR IGNORE INTO audit_tokens (token, seq) VALUES (?1, ?2)")
            .map_err(audit_failed)?;
        for token in &record.tokens {
            stmt.execute(params![token, seq_sql]).map_err(audit_failed)?;
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
                "SELECT a.seq, a.record, a.mac, a.at, a.caller, a.action, a.collection, a.outcome,
                        (SELECT group_concat(token, ',') FROM audit_tokens t WHERE t.seq = a.seq)
                 FROM audit a
                 WHERE a.seq > ?1
                   AND (?2 IS NULL OR a.seq IN (SELECT seq FROM audit_tokens WHERE token = ?2))
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
            let rows = stmt.query_map(
                params![
                    after,
                    filter.token,
                    filter.caller,
                    filter.action,
                    filter.collection,
                    filter.outcome,
                    filter.since,
                    filter.until,
                    limit
                ],
                audit_row,
            )?;
            rows.map(|r| r.map_err(StoreError::from)).collect()
        })
        .await
    }

    async fn token_audited(&self, token: String) -> Result<bool, StoreError> {
        self.read(move |conn| {
            Ok(conn
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM audit_tokens WHERE token = ?1)")?
                .query_row([token], |row| row.get(0))?)
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
/// collection, outcome, comma-joined indexed tokens` (tokens never contain
/// a comma).
fn audit_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRow> {
    let indexed: Option<String> = row.get(8)?;
    Ok(AuditRow {
        seq: u64::try_from(row.get::<_, i64>(0)?).unwrap_or(0),
        record: row.get(1)?,
        mac: row.get(2)?,
        at: row.get(3)?,
        caller: row.get(4)?,
        action: row.get(5)?,
        collection: row.get(6)?,
        outcome: row.get(7)?,
        indexed_tokens: indexed.map(|t| t.split(',').map(str::to_owned).collect()).unwrap_or_default(),
    })
}
