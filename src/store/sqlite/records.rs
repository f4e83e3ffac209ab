//! Records: one row per token ever issued, kept by its sequence number (its
//! ciphertext cleared on erasure), and the blind index of deterministic
//! collections.

use std::collections::BTreeMap;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension as _, params};

use super::SqliteStore;
use super::writer::WriteTx;
use crate::audit::AuditRecord;
use crate::store::{
    CollectionId, IndexEntry, InsertOutcome, NewRecord, Pending, RecordRef, RecordRow as Row, RecordStore, Reencrypted,
    RenderToken, RowSource, StoreError, StoredRecord, TokenForm, TokenLookup, first_row, now_micros,
};

#[async_trait]
impl RecordStore for SqliteStore {
    async fn insert_records(
        &self,
        collection: CollectionId,
        records: Vec<NewRecord>,
        mut audit: AuditRecord,
        render: RenderToken,
    ) -> Result<Vec<InsertOutcome>, StoreError> {
        self.write(move |tx| {
            let now = now_micros();
            let mut outcomes = Vec::with_capacity(records.len());
            let mut per_version: BTreeMap<u32, i64> = BTreeMap::new();
            let mut located = Vec::with_capacity(records.len());
            for r in records {
                if let Some(index) = &r.index
                    && let Some(existing) = indexed_record(tx, collection, index, now)?
                {
                    audit.tokens.push(render(&existing));
                    located.push(existing.seq);
                    outcomes.push(InsertOutcome::Existing(existing));
                    continue;
                }
                let (check, text, shaped) = match &r.at.token {
                    TokenForm::Sealed(check) => (Some(check.as_slice()), None, None),
                    TokenForm::Shaped(text) | TokenForm::Text(text) => {
                        // A token issued before tokens located their records
                        // may be this text (in this or, before canonical
                        // storage, another writing).
                        let legacy = tx
                            .conn
                            .prepare_cached(
                                "SELECT EXISTS (SELECT 1 FROM records WHERE collection_id = ?1 AND token = ?2)
                                     OR EXISTS (SELECT 1 FROM legacy_tokens WHERE collection_id = ?1 AND canonical = ?2)",
                            )?
                            .query_row(params![collection.0, text], |row| row.get::<_, bool>(0))?;
                        if legacy {
                            outcomes.push(InsertOutcome::Collision);
                            continue;
                        }
                        match &r.at.token {
                            TokenForm::Shaped(_) => (None, None, Some(text.as_str())),
                            _ => (None, Some(text.as_str()), None),
                        }
                    }
                };
                let seq = sql_seq(r.at.seq)?;
                let changed = tx
                    .conn
                    .prepare_cached(
                        "INSERT INTO records (collection_id, seq, token_check, token, shaped, key_version, ciphertext, created_at, expires_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                         ON CONFLICT DO NOTHING",
                    )?
                    .execute(params![
                        collection.0,
                        seq,
                        check,
                        text,
                        shaped,
                        r.key_version,
                        r.ciphertext,
                        now,
                        r.expires_at
                    ])?;
                if changed != 1 {
                    outcomes.push(InsertOutcome::Collision);
                    continue;
                }
                if let Some(index) = &r.index {
                    tx.conn
                        .prepare_cached(
                            "INSERT INTO blind_index (collection_id, version, digest, seq) VALUES (?1, ?2, ?3, ?4)",
                        )?
                        .execute(params![collection.0, index.version, index.digest.as_slice(), seq])?;
                }
                *per_version.entry(r.key_version).or_default() += 1;
                audit.tokens.push(render(&r.at));
                located.push(r.at.seq);
                outcomes.push(InsertOutcome::Inserted);
            }
            count(tx.conn, COUNT_SEALED, collection, &per_version)?;
            tx.append_audit_of(&audit, collection, &located)?;
            Ok(outcomes)
        })
        .await
    }

    async fn get_records(
        &self,
        collection: CollectionId,
        lookups: Vec<TokenLookup>,
    ) -> Result<Vec<Option<StoredRecord>>, StoreError> {
        self.read(move |conn| {
            let now = Some(now_micros());
            lookups
                .iter()
                .map(|lookup| {
                    Ok(find(conn, collection, lookup, |row| row.is_live(now))?.and_then(|row| {
                        let ciphertext = row.ciphertext?;
                        Some(StoredRecord { at: row.at, ciphertext })
                    }))
                })
                .collect()
        })
        .await
    }

    async fn locate_record(
        &self,
        collection: CollectionId,
        lookup: TokenLookup,
    ) -> Result<Option<RecordRef>, StoreError> {
        self.read(move |conn| Ok(find(conn, collection, &lookup, |_| true)?.map(|row| row.at))).await
    }

    async fn delete_records(
        &self,
        collection: CollectionId,
        lookups: Vec<TokenLookup>,
        mut audit: AuditRecord,
    ) -> Result<Vec<bool>, StoreError> {
        self.write(move |tx| {
            let now = Some(now_micros());
            let mut deleted = Vec::with_capacity(lookups.len());
            let mut located = Vec::new();
            for lookup in &lookups {
                let row = find(tx.conn, collection, lookup, |row| row.is_live(now))?;
                let erased = match &row {
                    Some(row) => erase(tx, collection, row)?,
                    None => false,
                };
                if let (true, Some(row)) = (erased, row) {
                    audit.tokens.push(row.at.token.into_text(&lookup.exact));
                    located.push(row.at.seq);
                }
                deleted.push(erased);
            }
            tx.append_audit_of(&audit, collection, &located)?;
            Ok(deleted)
        })
        .await
    }

    async fn purge_expired(
        &self,
        collection: CollectionId,
        now: i64,
        limit: usize,
        mut audit: AuditRecord,
        render: RenderToken,
    ) -> Result<usize, StoreError> {
        self.write(move |tx| {
            let expired: Vec<Row> = {
                let mut stmt = tx.conn.prepare_cached(concat!(
                    "SELECT ",
                    row_columns!(),
                    " FROM records
                     WHERE collection_id = ?1 AND ciphertext IS NOT NULL AND expires_at IS NOT NULL AND expires_at <= ?2
                     LIMIT ?3"
                ))?;
                let limit = i64::try_from(limit).unwrap_or(i64::MAX);
                let rows = stmt.query_map(params![collection.0, now, limit], read_row)?;
                rows.collect::<Result<_, _>>()?
            };
            let mut located = Vec::with_capacity(expired.len());
            for row in expired {
                if erase(tx, collection, &row)? {
                    audit.tokens.push(render(&row.at));
                    located.push(row.at.seq);
                }
            }
            let n = located.len();
            if n > 0 {
                audit.items = u32::try_from(n).unwrap_or(u32::MAX);
                tx.append_audit_of(&audit, collection, &located)?;
            }
            Ok(n)
        })
        .await
    }

    async fn issued_by_length(&self, collection: CollectionId) -> Result<Vec<(usize, u64)>, StoreError> {
        self.read(move |conn| {
            // Canonical tokens are counted by length in SQL; tokens stored
            // with separators (before schema version 5) one by one. Sealed
            // tokens are never shaped; shaped tokens that locate their
            // records are counted by their shape's sequence.
            let mut stmt = conn.prepare_cached(
                "SELECT length(token), CASE WHEN token GLOB '*[^0-9A-Za-z]*' THEN token END, count(*)
                 FROM records WHERE collection_id = ?1 AND token IS NOT NULL GROUP BY 1, 2",
            )?;
            let rows = stmt.query_map([collection.0], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, Option<String>>(1)?, row.get::<_, i64>(2)?))
            })?;
            let mut counts: BTreeMap<usize, u64> = BTreeMap::new();
            for row in rows {
                let (length, legacy, n) = row?;
                let length = match legacy {
                    Some(token) => crate::format::slots_of(&token),
                    None => usize::try_from(length).unwrap_or(0),
                };
                *counts.entry(length).or_default() += u64::try_from(n).unwrap_or(0);
            }
            let mut stmt =
                conn.prepare_cached("SELECT shape, next - 1 FROM sequences WHERE collection_id = ?1 AND shape > 0")?;
            let rows = stmt.query_map([collection.0], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?)))?;
            for row in rows {
                let (shape, used) = row?;
                let shape = usize::try_from(shape).map_err(|_| StoreError::Corrupt)?;
                *counts.entry(shape).or_default() += u64::try_from(used).map_err(|_| StoreError::Corrupt)?;
            }
            Ok(counts.into_iter().collect())
        })
        .await
    }

    async fn records_needing(
        &self,
        collection: CollectionId,
        work: Pending,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        self.read(move |conn| {
            let (mut stmt, version) = match work {
                Pending::Reencryption { primary } => (
                    conn.prepare_cached(concat!(
                        "SELECT ",
                        row_columns!(),
                        " FROM records
                         WHERE collection_id = ?1 AND key_version != ?2 AND ciphertext IS NOT NULL AND seq > ?3
                         ORDER BY seq LIMIT ?4"
                    ))?,
                    primary,
                ),
                Pending::Indexing { version } => (
                    conn.prepare_cached(concat!(
                        "SELECT ",
                        row_columns!(),
                        " FROM records r
                         WHERE r.collection_id = ?1 AND r.ciphertext IS NOT NULL AND r.seq > ?3
                           AND NOT EXISTS (SELECT 1 FROM blind_index b
                                           WHERE b.collection_id = r.collection_id AND b.seq = r.seq AND b.version = ?2)
                         ORDER BY r.seq LIMIT ?4"
                    ))?,
                    version,
                ),
            };
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = stmt.query_map(params![collection.0, version, sql_seq(after_seq)?, limit], read_row)?;
            let mut out = Vec::new();
            for row in rows {
                let row = row?;
                let ciphertext = row.ciphertext.ok_or(StoreError::Corrupt)?;
                out.push(StoredRecord { at: row.at, ciphertext });
            }
            Ok(out)
        })
        .await
    }

    async fn replace_ciphertexts(
        &self,
        collection: CollectionId,
        records: Vec<Reencrypted>,
        audit: AuditRecord,
    ) -> Result<usize, StoreError> {
        self.write(move |tx| {
            let mut stmt = tx.conn.prepare_cached(
                "UPDATE records SET key_version = ?1, ciphertext = ?2
                 WHERE collection_id = ?3 AND seq = ?4 AND key_version = ?5 AND ciphertext IS NOT NULL",
            )?;
            let mut replaced = 0;
            let mut sealed: BTreeMap<u32, i64> = BTreeMap::new();
            let mut removed: BTreeMap<u32, i64> = BTreeMap::new();
            for r in &records {
                if stmt.execute(params![r.to_version, r.ciphertext, collection.0, sql_seq(r.seq)?, r.from_version])?
                    == 1
                {
                    replaced += 1;
                    *sealed.entry(r.to_version).or_default() += 1;
                    *removed.entry(r.from_version).or_default() += 1;
                }
            }
            drop(stmt);
            count(tx.conn, COUNT_SEALED, collection, &sealed)?;
            count(tx.conn, COUNT_REMOVED, collection, &removed)?;
            tx.append_audit(&audit)?;
            // The ciphertexts under the old version (perhaps compromised)
            // must not outlive this in the WAL.
            *tx.erased |= replaced > 0;
            Ok(replaced)
        })
        .await
    }

    async fn index_records(
        &self,
        collection: CollectionId,
        version: u32,
        entries: Vec<(u64, [u8; 32])>,
        audit: AuditRecord,
    ) -> Result<usize, StoreError> {
        self.write(move |tx| {
            let mut indexed = 0;
            for (seq, digest) in &entries {
                let seq = sql_seq(*seq)?;
                let live: bool = tx
                    .conn
                    .prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM records
                         WHERE collection_id = ?1 AND seq = ?2 AND ciphertext IS NOT NULL)",
                    )?
                    .query_row(params![collection.0, seq], |row| row.get(0))?;
                if !live {
                    continue;
                }
                tx.conn
                    .prepare_cached("DELETE FROM blind_index WHERE collection_id = ?1 AND seq = ?2 AND version != ?3")?
                    .execute(params![collection.0, seq, version])?;
                indexed += tx
                    .conn
                    .prepare_cached(
                        "INSERT INTO blind_index (collection_id, version, digest, seq) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT DO NOTHING",
                    )?
                    .execute(params![collection.0, version, digest.as_slice(), seq])?;
            }
            tx.append_audit(&audit)?;
            Ok(indexed)
        })
        .await
    }

    async fn record_counts(&self) -> Result<Vec<(CollectionId, u64)>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT collection_id, count(*) FROM records WHERE ciphertext IS NOT NULL GROUP BY collection_id",
            )?;
            let rows = stmt.query_map([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?)))?;
            rows.map(|row| {
                let (id, n) = row?;
                Ok((CollectionId(id), u64::try_from(n).unwrap_or(0)))
            })
            .collect()
        })
        .await
    }
}

/// A sequence number as SQLite stores it (a positive `INTEGER`).
pub(super) fn sql_seq(seq: u64) -> Result<i64, StoreError> {
    i64::try_from(seq).map_err(|_| StoreError::Unsupported("store a sequence number above 2^63"))
}

/// The columns [`read_row`] reads, in its order (a macro, so that the
/// statements are constants: no query text is formatted per lookup).
macro_rules! row_columns {
    () => {
        "seq, token_check, token, shaped, ciphertext, key_version, expires_at"
    };
}
use row_columns;

/// The record place and token form in columns `first` (`seq`), `first + 1`
/// (`token_check`), `first + 2` (`token`) and `first + 3` (`shaped`):
/// exactly one of the last three is set, or the row is damaged.
pub(super) fn record_ref(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<RecordRef> {
    let seq: i64 = row.get(first)?;
    let token =
        TokenForm::from_columns(row.get(first + 1)?, row.get(first + 2)?, row.get(first + 3)?).ok_or_else(|| {
            rusqlite::Error::InvalidColumnType(first + 1, "token_check".into(), rusqlite::types::Type::Null)
        })?;
    let seq = u64::try_from(seq)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(first, rusqlite::types::Type::Integer, Box::new(e)))?;
    Ok(RecordRef { seq, token })
}

/// Reads [`row_columns`].
fn read_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row { at: record_ref(row, 0)?, ciphertext: row.get(4)?, key_version: row.get(5)?, expires_at: row.get(6)? })
}

/// The rows of one collection, read on one connection.
struct Rows<'c> {
    conn: &'c Connection,
    collection: CollectionId,
}

impl RowSource for Rows<'_> {
    /// None above 2^63, where a token that was never issued may point.
    fn row_at(&mut self, seq: u64) -> Result<Option<Row>, StoreError> {
        let Ok(seq) = i64::try_from(seq) else { return Ok(None) };
        Ok(self
            .conn
            .prepare_cached(concat!("SELECT ", row_columns!(), " FROM records WHERE collection_id = ?1 AND seq = ?2"))?
            .query_row(params![self.collection.0, seq], read_row)
            .optional()?)
    }

    fn row_of_text(&mut self, text: &str) -> Result<Option<Row>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(concat!(
                "SELECT ",
                row_columns!(),
                " FROM records WHERE collection_id = ?1 AND token = ?2"
            ))?
            .query_row(params![self.collection.0, text], read_row)
            .optional()?)
    }

    fn legacy_token(&mut self, canonical: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT token FROM legacy_tokens WHERE collection_id = ?1 AND canonical = ?2")?
            .query_row(params![self.collection.0, canonical], |row| row.get::<_, Option<String>>(0))
            .optional()?
            .flatten())
    }
}

/// [`first_row`] of `collection` on `conn`.
fn find(
    conn: &Connection,
    collection: CollectionId,
    lookup: &TokenLookup,
    wanted: impl Fn(&Row) -> bool,
) -> Result<Option<Row>, StoreError> {
    first_row(&mut Rows { conn, collection }, lookup, wanted)
}

/// The live record a blind index points to, looked up under every live
/// index version. An entry whose record is gone is dropped; one whose
/// record has expired erases it, so the value gets a new token.
fn indexed_record(
    tx: &mut WriteTx<'_>,
    collection: CollectionId,
    index: &IndexEntry,
    now: i64,
) -> Result<Option<RecordRef>, StoreError> {
    for (version, digest) in &index.lookups {
        let seq: Option<i64> = tx
            .conn
            .prepare_cached("SELECT seq FROM blind_index WHERE collection_id = ?1 AND version = ?2 AND digest = ?3")?
            .query_row(params![collection.0, version, digest.as_slice()], |row| row.get(0))
            .optional()?;
        let Some(seq) = seq else { continue };
        let row = Rows { conn: tx.conn, collection }.row_at(u64::try_from(seq).map_err(|_| StoreError::Corrupt)?)?;
        match row {
            Some(row) if row.is_live(Some(now)) => return Ok(Some(row.at)),
            Some(row) if row.is_live(None) => {
                erase(tx, collection, &row)?;
            }
            _ => {
                tx.conn
                    .prepare_cached("DELETE FROM blind_index WHERE collection_id = ?1 AND seq = ?2")?
                    .execute(params![collection.0, seq])?;
            }
        }
    }
    Ok(None)
}

/// Erases `row` if it holds a value: the ciphertext is cleared, the row
/// kept (its sequence number and token are never issued again), its index
/// entries removed, its key version's live count lowered. Returns whether
/// it erased.
fn erase(tx: &mut WriteTx<'_>, collection: CollectionId, row: &Row) -> Result<bool, StoreError> {
    let Some(version) = row.key_version.filter(|_| row.ciphertext.is_some()) else { return Ok(false) };
    let seq = sql_seq(row.at.seq)?;
    tx.conn
        .prepare_cached(
            "UPDATE records SET ciphertext = NULL, key_version = NULL, deleted_at = ?3
             WHERE collection_id = ?1 AND seq = ?2",
        )?
        .execute(params![collection.0, seq, now_micros()])?;
    tx.conn
        .prepare_cached("DELETE FROM blind_index WHERE collection_id = ?1 AND seq = ?2")?
        .execute(params![collection.0, seq])?;
    count(tx.conn, COUNT_REMOVED, collection, &std::iter::once((version, 1)).collect())?;
    *tx.erased = true;
    Ok(true)
}

/// Records newly sealed under versions of `collection`: adds to each
/// version's encryption counter and live-record count. A version no longer
/// in use (retired, being emptied, compromised) counts nothing.
const COUNT_SEALED: &str = "UPDATE keys SET encryptions = encryptions + ?1, live = live + ?1
     WHERE collection_id = ?2 AND purpose = 'data' AND version = ?3 AND state IN ('primary', 'active')";

/// Records that left versions of `collection` (deleted, or re-encrypted
/// onto another version): subtracts from each version's live count.
const COUNT_REMOVED: &str =
    "UPDATE keys SET live = live - ?1 WHERE collection_id = ?2 AND purpose = 'data' AND version = ?3";

/// Applies one of the counter updates above to each version's count; a
/// version that is not there to count is a conflict.
fn count(
    conn: &Connection,
    sql: &str,
    collection: CollectionId,
    per_version: &BTreeMap<u32, i64>,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    for (version, n) in per_version {
        if stmt.execute(params![n, collection.0, version])? != 1 {
            return Err(StoreError::Conflict);
        }
    }
    Ok(())
}
