//! The audit trail in SQLite: `audit` rows (the chained encoding plus query
//! columns), `audit_records` (which audit records involve which record, in
//! the order written: every request appends) and `audit_index` (the same,
//! sorted by record in blocks built behind the write path, for "who saw
//! token T").

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension as _, params};

use super::SqliteStore;
use super::records::{record_ref, sql_seq};
use super::writer::WriteTx;
use crate::audit::{AuditKey, AuditRecord, Head, MAC_LEN};
use crate::store::{AuditFilter, AuditRow, AuditStore, CollectionId, RecordMatch, StoreError};

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
        let (seq, encoded, mac) = self.audit.tail.next(key, record);
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
                "INSERT OR IGNORE INTO audit_records (audit_seq, collection_id, record_seq) VALUES (?1, ?2, ?3)",
            )
            .map_err(audit_failed)?;
        for &record_seq in seqs {
            stmt.execute(params![seq_sql, collection.0, sql_seq(record_seq)?]).map_err(audit_failed)?;
        }
        self.audit.unindexed += seqs.len();
        self.audit.tail.appended(seq, record, mac);
        Ok(seq)
    }
}

/// The name of a SQLite store's one chain (a PostgreSQL store's chains are
/// its nodes' names; a single node is `main` there too).
const SQLITE_CHAIN: &str = crate::config::DEFAULT_NODE;

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
            tx.audit.tail.restart_at(head);
            Ok(head)
        })
        .await
    }

    async fn audit_chains(&self) -> Result<Vec<String>, StoreError> {
        Ok(vec![SQLITE_CHAIN.to_owned()])
    }

    async fn audit_head(&self) -> Result<Head, StoreError> {
        self.read(last_head).await
    }

    async fn check_token_index(&self, _chain: Option<String>) -> Result<Option<u64>, StoreError> {
        self.read(first_bad_block).await
    }

    async fn query_audit(&self, filter: AuditFilter, limit: usize) -> Result<Vec<AuditRow>, StoreError> {
        if filter.chain.as_deref().is_some_and(|chain| chain != SQLITE_CHAIN) {
            return Ok(Vec::new());
        }
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT a.seq, a.record, a.mac, a.at, a.caller, a.action, a.collection, a.outcome
                 FROM audit a
                 WHERE a.seq > ?1
                   AND (?2 IS NULL OR a.seq = ?2)
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
            // Every record, or one by one those that involve the record asked.
            let candidates: Vec<Option<i64>> = match filter.record {
                RecordMatch::Any => vec![None],
                RecordMatch::Of(collection, seq) => audit_seqs_of(conn, collection, sql_seq(seq)?)?
                    .into_iter()
                    .filter(|&s| s > after)
                    .map(Some)
                    .collect(),
                RecordMatch::Unissued => Vec::new(),
            };
            let mut out: Vec<AuditRow> = Vec::new();
            for candidate in candidates {
                let left = limit - i64::try_from(out.len()).unwrap_or(i64::MAX);
                if left <= 0 {
                    break;
                }
                let rows = stmt.query_map(
                    params![
                        after,
                        candidate,
                        filter.caller,
                        filter.action,
                        filter.collection,
                        filter.outcome,
                        filter.since,
                        filter.until,
                        left
                    ],
                    audit_row,
                )?;
                for row in rows {
                    out.push(row?);
                }
            }
            drop(stmt);
            let mut indexed = conn.prepare_cached(
                "SELECT x.collection_id, r.seq, r.token_check, r.token, r.shaped FROM audit_records x
                 JOIN records r ON r.collection_id = x.collection_id AND r.seq = x.record_seq
                 WHERE x.audit_seq = ?1 ORDER BY x.collection_id, x.record_seq",
            )?;
            for row in &mut out {
                let refs =
                    indexed.query_map([sql_seq(row.seq)?], |r| Ok((CollectionId(r.get(0)?), record_ref(r, 1)?)))?;
                row.indexed = refs.collect::<Result<_, _>>()?;
            }
            Ok(out)
        })
        .await
    }
}

/// The first audit record of the first block of the searchable index that
/// does not hold exactly the entries of its range of `audit_records`.
fn first_bad_block(conn: &Connection) -> Result<Option<u64>, StoreError> {
    let blocks: Vec<(i64, i64, i64)> = {
        let mut stmt =
            conn.prepare_cached("SELECT block, last_audit_seq, entries FROM audit_index_blocks ORDER BY block")?;
        let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    let mut differ = conn.prepare_cached(
        "SELECT (SELECT count(*) FROM audit_index WHERE block = ?1),
                (SELECT count(*) FROM audit_records WHERE audit_seq > ?2 AND audit_seq <= ?3),
                EXISTS (SELECT collection_id, record_seq, audit_seq FROM audit_records
                        WHERE audit_seq > ?2 AND audit_seq <= ?3
                        EXCEPT SELECT collection_id, record_seq, audit_seq FROM audit_index WHERE block = ?1)",
    )?;
    let mut previous = 0;
    for (block, last, entries) in blocks {
        let (indexed, written, missing): (i64, i64, bool) =
            differ.query_row(params![block, previous, last], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
        if indexed != entries || written != entries || missing || last <= previous {
            return Ok(Some(u64::try_from(previous + 1).unwrap_or(0)));
        }
        previous = last;
    }
    Ok(None)
}

/// The audit records (ascending) that involve record `record_seq` of
/// `collection`: found in each block of the searchable index, then among
/// the entries written after the last block.
fn audit_seqs_of(conn: &Connection, collection: CollectionId, record_seq: i64) -> Result<Vec<i64>, StoreError> {
    let blocks: Vec<i64> = {
        let mut stmt = conn.prepare_cached("SELECT block FROM audit_index_blocks ORDER BY block")?;
        let rows = stmt.query_map([], |row| row.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    let mut found = Vec::new();
    let mut in_block = conn.prepare_cached(
        "SELECT audit_seq FROM audit_index WHERE block = ?1 AND collection_id = ?2 AND record_seq = ?3 ORDER BY audit_seq",
    )?;
    for block in blocks {
        for seq in in_block.query_map(params![block, collection.0, record_seq], |row| row.get(0))? {
            found.push(seq?);
        }
    }
    let mut tail = conn.prepare_cached(
        "SELECT audit_seq FROM audit_records WHERE audit_seq > ?1 AND collection_id = ?2 AND record_seq = ?3
         ORDER BY audit_seq",
    )?;
    for seq in tail.query_map(params![indexed_upto(conn)?, collection.0, record_seq], |row| row.get(0))? {
        found.push(seq?);
    }
    Ok(found)
}

/// The last audit record the searchable index covers (0: none).
fn indexed_upto(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn
        .prepare_cached("SELECT last_audit_seq FROM audit_index_blocks ORDER BY block DESC LIMIT 1")?
        .query_row([], |row| row.get(0))
        .optional()?
        .unwrap_or(0))
}

/// Token-index entries written after the last block.
pub(super) fn unindexed_entries(conn: &Connection) -> Result<usize, StoreError> {
    let n: i64 = conn
        .prepare_cached("SELECT count(*) FROM audit_records WHERE audit_seq > ?1")?
        .query_row([indexed_upto(conn)?], |row| row.get(0))?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Appends blocks to the searchable index while at least `block` entries
/// are waiting (each block whole audit records, sorted by record, in its
/// own transaction); returns the entries left waiting. A failure is logged
/// and retried at the next call: queries scan what is not in a block.
pub(super) fn build_index_blocks(conn: &Connection, block: usize) -> usize {
    loop {
        match build_index_block(conn, block) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                tracing::warn!(error = %e, "store: could not build a block of the audit token index; retrying later");
                if !conn.is_autocommit() {
                    let _ = conn.execute_batch("ROLLBACK");
                }
                return 0;
            }
        }
    }
    unindexed_entries(conn).unwrap_or(0)
}

/// One block, if `block` entries are waiting.
fn build_index_block(conn: &Connection, block: usize) -> Result<bool, StoreError> {
    let upto = indexed_upto(conn)?;
    let offset = i64::try_from(block.saturating_sub(1)).unwrap_or(i64::MAX);
    // The block ends with the audit record that holds its block-th entry.
    let end: Option<i64> = conn
        .prepare_cached(
            "SELECT audit_seq FROM audit_records WHERE audit_seq > ?1 ORDER BY audit_seq LIMIT 1 OFFSET ?2",
        )?
        .query_row(params![upto, offset], |row| row.get(0))
        .optional()?;
    let Some(end) = end else { return Ok(false) };
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let number: i64 =
        conn.query_row("SELECT coalesce(max(block), 0) + 1 FROM audit_index_blocks", [], |row| row.get(0))?;
    let entries = conn
        .prepare_cached(
            "INSERT INTO audit_index (block, collection_id, record_seq, audit_seq)
             SELECT ?1, collection_id, record_seq, audit_seq FROM audit_records
             WHERE audit_seq > ?2 AND audit_seq <= ?3
             ORDER BY collection_id, record_seq, audit_seq",
        )?
        .execute(params![number, upto, end])?;
    conn.prepare_cached("INSERT INTO audit_index_blocks (block, last_audit_seq, entries) VALUES (?1, ?2, ?3)")?
        .execute(params![number, end, i64::try_from(entries).unwrap_or(i64::MAX)])?;
    conn.execute_batch("COMMIT")?;
    Ok(true)
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
