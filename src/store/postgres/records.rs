//! Records: one row per token ever issued, kept by its sequence number (its
//! ciphertext cleared on erasure), and the blind index of deterministic
//! collections, whose primary key decides across nodes which token a value
//! has.

use std::collections::BTreeMap;

use async_trait::async_trait;

use super::append::{Append, Part};
use super::writer::WriteTx;
use super::{Db, PostgresStore, sql_i64, stored_u32, stored_u64};
use crate::audit::AuditRecord;
use crate::store::{
    CollectionId, IndexEntry, InsertOutcome, NewRecord, Pending, RecordRef, RecordRow as Row, RecordStore, Reencrypted,
    RenderToken, RowSource, StoreError, StoredRecord, TokenForm, TokenLookup, first_row, now_micros,
};

#[async_trait]
impl RecordStore for PostgresStore {
    async fn insert_records(
        &self,
        collection: CollectionId,
        records: Vec<NewRecord>,
        audit: AuditRecord,
        render: RenderToken,
    ) -> Result<Vec<InsertOutcome>, StoreError> {
        // Records that append (no blind index to decide on) may go in
        // together with other requests' in one statement.
        if records.iter().all(|r| r.index.is_none()) {
            return self.append(Append::insert(collection, records, audit, render)).await;
        }
        self.write(move |tx| insert_records(tx, collection, records, audit, &render)).await
    }

    async fn get_records(
        &self,
        collection: CollectionId,
        lookups: Vec<TokenLookup>,
    ) -> Result<Vec<Option<StoredRecord>>, StoreError> {
        self.read(move |tx| {
            let now = Some(now_micros());
            // Every place the tokens name, read in one statement: a request
            // of many tokens is one round trip, not one per token.
            let places: Vec<i64> = lookups
                .iter()
                .flat_map(|l| l.sealed.map(|s| s.seq).into_iter().chain(l.placed.iter().copied()))
                .filter_map(|seq| i64::try_from(seq).ok())
                .collect();
            let mut rows = Prefetched { rows: std::collections::HashMap::new(), db: Rows { conn: tx, collection } };
            for row in rows.db.conn.query(
                concat!("SELECT ", row_columns!(), " FROM records WHERE collection_id = $1 AND seq = ANY($2)"),
                &[&collection.0, &places],
            )? {
                let row = read_row(&row)?;
                rows.rows.insert(row.at.seq, row);
            }
            lookups
                .iter()
                .map(|lookup| {
                    Ok(first_row(&mut rows, lookup, |row| row.is_live(now))?.and_then(|row| {
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
        self.read(move |tx| Ok(find(tx, collection, &lookup, |_| true)?.map(|row| row.at))).await
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
                let row = find(&mut tx.tx, collection, lookup, |row| row.is_live(now))?;
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
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            // SKIP LOCKED: another node's purge takes other rows.
            let expired = tx
                .tx
                .query(
                    concat!(
                        "SELECT ",
                        row_columns!(),
                        " FROM records
                         WHERE collection_id = $1 AND ciphertext IS NOT NULL AND expires_at IS NOT NULL AND expires_at <= $2
                         LIMIT $3 FOR UPDATE SKIP LOCKED"
                    ),
                    &[&collection.0, &now, &limit],
                )?
                .iter()
                .map(read_row)
                .collect::<Result<Vec<_>, _>>()?;
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
        self.read(move |tx| {
            // Canonical tokens are counted by length in SQL; tokens stored
            // with separators one by one. Shaped tokens that locate their
            // records are counted by their shape's sequence.
            let mut counts: BTreeMap<usize, u64> = BTreeMap::new();
            for row in tx.query(
                "SELECT length(token)::bigint, CASE WHEN token ~ '[^0-9A-Za-z]' THEN token END, count(*)
                 FROM records WHERE collection_id = $1 AND token IS NOT NULL GROUP BY 1, 2",
                &[&collection.0],
            )? {
                let length = match row.try_get::<_, Option<String>>(1)? {
                    Some(token) => crate::format::slots_of(&token),
                    None => usize::try_from(row.try_get::<_, i64>(0)?).unwrap_or(0),
                };
                *counts.entry(length).or_default() += stored_u64(row.try_get(2)?)?;
            }
            for row in tx.query(
                "SELECT shape, next - 1 FROM sequences WHERE collection_id = $1 AND shape > 0",
                &[&collection.0],
            )? {
                let shape = usize::try_from(row.try_get::<_, i64>(0)?).map_err(|_| StoreError::Corrupt)?;
                *counts.entry(shape).or_default() += stored_u64(row.try_get(1)?)?;
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
        // Planned for the place it pages from: a generic plan sorts every
        // record after it for each page.
        self.read(move |tx| {
            tx.planned_for_values(|tx| {
                let (sql, version) = match work {
                    Pending::Reencryption { primary } => (
                        concat!(
                            "SELECT ",
                            row_columns!(),
                            " FROM records
                         WHERE collection_id = $1 AND key_version != $2 AND ciphertext IS NOT NULL AND seq > $3
                         ORDER BY seq LIMIT $4"
                        ),
                        primary,
                    ),
                    Pending::Indexing { version } => (
                        concat!(
                            "SELECT ",
                            row_columns!(),
                            " FROM records r
                         WHERE r.collection_id = $1 AND r.ciphertext IS NOT NULL AND r.seq > $3
                           AND NOT EXISTS (SELECT 1 FROM blind_index b
                                           WHERE b.collection_id = r.collection_id AND b.seq = r.seq AND b.version = $2)
                         ORDER BY r.seq LIMIT $4"
                        ),
                        version,
                    ),
                };
                let limit = i64::try_from(limit).unwrap_or(i64::MAX);
                let mut out = Vec::new();
                for row in tx.query(sql, &[&collection.0, &i64::from(version), &sql_i64(after_seq)?, &limit])? {
                    let row = read_row(&row)?;
                    let ciphertext = row.ciphertext.ok_or(StoreError::Corrupt)?;
                    out.push(StoredRecord { at: row.at, ciphertext });
                }
                Ok(out)
            })
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
            let mut replaced = 0;
            let mut sealed: BTreeMap<u32, i64> = BTreeMap::new();
            let mut removed: BTreeMap<u32, i64> = BTreeMap::new();
            for r in &records {
                let changed = tx.tx.execute(
                    "UPDATE records SET key_version = $1, ciphertext = $2
                     WHERE collection_id = $3 AND seq = $4 AND key_version = $5 AND ciphertext IS NOT NULL",
                    &[
                        &i64::from(r.to_version),
                        &r.ciphertext,
                        &collection.0,
                        &sql_i64(r.seq)?,
                        &i64::from(r.from_version),
                    ],
                )?;
                if changed == 1 {
                    replaced += 1;
                    *sealed.entry(r.to_version).or_default() += 1;
                    *removed.entry(r.from_version).or_default() += 1;
                }
            }
            count(&mut tx.tx, &tx.audit.chain, COUNT_SEALED, collection, &sealed)?;
            count(&mut tx.tx, &tx.audit.chain, COUNT_REMOVED, collection, &removed)?;
            tx.append_audit(&audit)?;
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
                let seq = sql_i64(*seq)?;
                let live = tx.tx.query_opt(
                    "SELECT 1 FROM records WHERE collection_id = $1 AND seq = $2 AND ciphertext IS NOT NULL FOR UPDATE",
                    &[&collection.0, &seq],
                )?;
                if live.is_none() {
                    continue;
                }
                tx.tx.execute(
                    "DELETE FROM blind_index WHERE collection_id = $1 AND seq = $2 AND version != $3",
                    &[&collection.0, &seq, &i64::from(version)],
                )?;
                indexed += tx.tx.execute(
                    "INSERT INTO blind_index (collection_id, version, digest, seq) VALUES ($1, $2, $3, $4)
                     ON CONFLICT DO NOTHING",
                    &[&collection.0, &i64::from(version), &digest.as_slice(), &seq],
                )?;
            }
            tx.append_audit(&audit)?;
            Ok(usize::try_from(indexed).unwrap_or(usize::MAX))
        })
        .await
    }

    async fn record_counts(&self) -> Result<Vec<(CollectionId, u64)>, StoreError> {
        self.read(|tx| {
            tx.query(
                "SELECT collection_id, count(*) FROM records WHERE ciphertext IS NOT NULL GROUP BY collection_id",
                &[],
            )?
            .iter()
            .map(|row| Ok((CollectionId(row.try_get(0)?), stored_u64(row.try_get(1)?)?)))
            .collect()
        })
        .await
    }
}

/// [`RecordStore::insert_records`] as one job of its own, in `tx`.
pub(super) fn insert_records(
    tx: &mut WriteTx<'_, '_>,
    collection: CollectionId,
    records: Vec<NewRecord>,
    mut audit: AuditRecord,
    render: &RenderToken,
) -> Result<Vec<InsertOutcome>, StoreError> {
    let now = now_micros();
    let mut outcomes = Vec::with_capacity(records.len());
    let mut per_version: BTreeMap<u32, i64> = BTreeMap::new();
    let mut located = Vec::with_capacity(records.len());
    // Without blind indexes, every record goes in, is counted and
    // audited with one statement; a deterministic collection's
    // records go one by one.
    let bulk = if records.iter().all(|r| r.index.is_none()) {
        let listed = audit.tokens.len();
        audit.tokens.extend(records.iter().map(|r| render(&r.at)));
        let part = Part { collection, records: &records, audit: &audit, read: &[] };
        let written = super::append::write_parts(tx, &[part])?;
        let (inserted, audited) = (written.inserted, written.audited);
        if audited {
            return Ok(records.iter().map(|_| InsertOutcome::Inserted).collect());
        }
        // A place or token was taken: the audit record lists the
        // records that went in, and goes in after them.
        audit.tokens.truncate(listed);
        Some(inserted)
    } else {
        None
    };
    for r in records {
        if let Some(inserted) = &bulk {
            if inserted.contains(&r.at.seq) {
                audit.tokens.push(render(&r.at));
                located.push(r.at.seq);
                outcomes.push(InsertOutcome::Inserted);
            } else {
                outcomes.push(InsertOutcome::Collision);
            }
            continue;
        }
        if let Some(index) = &r.index
            && let Some(existing) = indexed_record(tx, collection, index, now)?
        {
            audit.tokens.push(render(&existing));
            located.push(existing.seq);
            outcomes.push(InsertOutcome::Existing(existing));
            continue;
        }
        let (check, text, shaped) = r.at.token.columns();
        let seq = sql_i64(r.at.seq)?;
        // A token issued before tokens located their records may be
        // this text (in this or, before canonical storage, another
        // writing): then nothing is inserted.
        let changed = tx.tx.execute(
                "INSERT INTO records (collection_id, seq, token_check, token, shaped, key_version, ciphertext, created_at, expires_at)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9
                 WHERE $10::text IS NULL OR NOT (
                     EXISTS (SELECT 1 FROM records WHERE collection_id = $1 AND token = $10)
                     OR EXISTS (SELECT 1 FROM legacy_tokens WHERE collection_id = $1 AND canonical = $10))
                 ON CONFLICT DO NOTHING",
                &[
                    &collection.0,
                    &seq,
                    &check,
                    &text,
                    &shaped,
                    &i64::from(r.key_version),
                    &r.ciphertext,
                    &now,
                    &r.expires_at,
                    &text.or(shaped),
                ],
            )?;
        if changed != 1 {
            outcomes.push(InsertOutcome::Collision);
            continue;
        }
        if let Some(index) = &r.index {
            // Another node may have indexed the value since the
            // lookup above (this insert waited for its commit): its
            // record is the value's, and this one is taken back.
            let indexed = tx.tx.execute(
                "INSERT INTO blind_index (collection_id, version, digest, seq) VALUES ($1, $2, $3, $4)
                     ON CONFLICT DO NOTHING",
                &[&collection.0, &i64::from(index.version), &index.digest.as_slice(), &seq],
            )?;
            if indexed != 1 {
                tx.tx.execute("DELETE FROM records WHERE collection_id = $1 AND seq = $2", &[&collection.0, &seq])?;
                match indexed_record(tx, collection, index, now)? {
                    Some(existing) => {
                        audit.tokens.push(render(&existing));
                        located.push(existing.seq);
                        outcomes.push(InsertOutcome::Existing(existing));
                    }
                    None => outcomes.push(InsertOutcome::Collision),
                }
                continue;
            }
        }
        *per_version.entry(r.key_version).or_default() += 1;
        audit.tokens.push(render(&r.at));
        located.push(r.at.seq);
        outcomes.push(InsertOutcome::Inserted);
    }
    count(&mut tx.tx, &tx.audit.chain, COUNT_SEALED, collection, &per_version)?;
    tx.append_audit_of(&audit, collection, &located)?;
    Ok(outcomes)
}

/// The columns [`read_row`] reads, in its order (a macro, so that the
/// statements are constants).
macro_rules! row_columns {
    () => {
        "seq, token_check, token, shaped, ciphertext, key_version, expires_at"
    };
}
use row_columns;

/// The record place and token form in columns `first` (`seq`), `first + 1`
/// (`token_check`), `first + 2` (`token`) and `first + 3` (`shaped`):
/// exactly one of the last three is set, or the row is damaged.
pub(super) fn record_ref(row: &postgres::Row, first: usize) -> Result<RecordRef, StoreError> {
    let seq = stored_u64(row.try_get(first)?)?;
    let token = TokenForm::from_columns(row.try_get(first + 1)?, row.try_get(first + 2)?, row.try_get(first + 3)?)
        .ok_or(StoreError::Corrupt)?;
    Ok(RecordRef { seq, token })
}

/// Reads [`row_columns`].
fn read_row(row: &postgres::Row) -> Result<Row, StoreError> {
    Ok(Row {
        at: record_ref(row, 0)?,
        ciphertext: row.try_get(4)?,
        key_version: row.try_get::<_, Option<i64>>(5)?.map(stored_u32).transpose()?,
        expires_at: row.try_get(6)?,
    })
}

/// The rows of one collection, read in one transaction.
struct Rows<'c, 'a, 't> {
    conn: &'c mut Db<'a, 't>,
    collection: CollectionId,
}

impl Rows<'_, '_, '_> {
    fn one(&mut self, sql: &'static str, key: &(dyn postgres::types::ToSql + Sync)) -> Result<Option<Row>, StoreError> {
        self.conn.query_opt(sql, &[&self.collection.0, key])?.as_ref().map(read_row).transpose()
    }
}

impl RowSource for Rows<'_, '_, '_> {
    /// None above 2^63, where a token that was never issued may point.
    fn row_at(&mut self, seq: u64) -> Result<Option<Row>, StoreError> {
        let Ok(seq) = i64::try_from(seq) else { return Ok(None) };
        self.one(concat!("SELECT ", row_columns!(), " FROM records WHERE collection_id = $1 AND seq = $2"), &seq)
    }

    fn row_of_text(&mut self, text: &str) -> Result<Option<Row>, StoreError> {
        self.one(concat!("SELECT ", row_columns!(), " FROM records WHERE collection_id = $1 AND token = $2"), &text)
    }

    fn legacy_token(&mut self, canonical: &str) -> Result<Option<String>, StoreError> {
        let found = self.conn.query_opt(
            "SELECT token FROM legacy_tokens WHERE collection_id = $1 AND canonical = $2",
            &[&self.collection.0, &canonical],
        )?;
        Ok(found.map(|row| row.try_get::<_, Option<String>>(0)).transpose()?.flatten())
    }
}

/// Rows read ahead by place, and the rest from the database.
struct Prefetched<'c, 'a, 't> {
    rows: std::collections::HashMap<u64, Row>,
    db: Rows<'c, 'a, 't>,
}

impl RowSource for Prefetched<'_, '_, '_> {
    /// Every place was read ahead: one not there has no row.
    fn row_at(&mut self, seq: u64) -> Result<Option<Row>, StoreError> {
        Ok(self.rows.get(&seq).cloned())
    }

    fn row_of_text(&mut self, text: &str) -> Result<Option<Row>, StoreError> {
        self.db.row_of_text(text)
    }

    fn legacy_token(&mut self, canonical: &str) -> Result<Option<String>, StoreError> {
        self.db.legacy_token(canonical)
    }
}

/// [`first_row`] of `collection` in `conn`'s transaction.
fn find(
    conn: &mut Db<'_, '_>,
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
    tx: &mut WriteTx<'_, '_>,
    collection: CollectionId,
    index: &IndexEntry,
    now: i64,
) -> Result<Option<RecordRef>, StoreError> {
    for (version, digest) in &index.lookups {
        let found = tx.tx.query_opt(
            "SELECT seq FROM blind_index WHERE collection_id = $1 AND version = $2 AND digest = $3",
            &[&collection.0, &i64::from(*version), &digest.as_slice()],
        )?;
        let Some(found) = found else { continue };
        let seq: i64 = found.try_get(0)?;
        match (Rows { conn: &mut tx.tx, collection }).row_at(stored_u64(seq)?)? {
            Some(row) if row.is_live(Some(now)) => return Ok(Some(row.at)),
            Some(row) if row.is_live(None) => {
                erase(tx, collection, &row)?;
            }
            _ => {
                tx.tx
                    .execute("DELETE FROM blind_index WHERE collection_id = $1 AND seq = $2", &[&collection.0, &seq])?;
            }
        }
    }
    Ok(None)
}

/// Erases `row` if it holds a value: the ciphertext is cleared, the row
/// kept (its sequence number and token are never issued again), its index
/// entries removed, its key version's live count lowered. Returns whether
/// it erased (another node may have erased it first).
fn erase(tx: &mut WriteTx<'_, '_>, collection: CollectionId, row: &Row) -> Result<bool, StoreError> {
    let Some(version) = row.key_version.filter(|_| row.ciphertext.is_some()) else { return Ok(false) };
    let seq = sql_i64(row.at.seq)?;
    let changed = tx.tx.execute(
        "UPDATE records SET ciphertext = NULL, key_version = NULL, deleted_at = $3
         WHERE collection_id = $1 AND seq = $2 AND ciphertext IS NOT NULL",
        &[&collection.0, &seq, &now_micros()],
    )?;
    if changed != 1 {
        return Ok(false);
    }
    tx.tx.execute("DELETE FROM blind_index WHERE collection_id = $1 AND seq = $2", &[&collection.0, &seq])?;
    count(&mut tx.tx, &tx.audit.chain, COUNT_REMOVED, collection, &std::iter::once((version, 1)).collect())?;
    Ok(true)
}

/// Records newly sealed under versions of `collection`: adds to each
/// version's encryption counter and live-record count, in the row of the
/// writer's chain (`$4`; see `migrations/postgres/0006_key_counts.sql`).
/// Only a primary or active version takes records: another node may have
/// retired the version, marked it compromised or begun emptying it since
/// this node loaded its keys ([`count`] refuses then, and nothing is
/// written). The share lock on the version's row keeps it in use until
/// this transaction ends; other nodes sealing under it take the same lock
/// and do not wait for this one.
const COUNT_SEALED: &str = "INSERT INTO key_counts (collection_id, purpose, version, chain, encryptions, live)
     SELECT k.collection_id, k.purpose, k.version, $4, $1, $1 FROM keys k
     WHERE k.collection_id = $2 AND k.purpose = 'data' AND k.version = $3 AND k.state IN ('primary', 'active')
     FOR SHARE OF k
     ON CONFLICT (collection_id, purpose, version, chain) DO UPDATE
     SET encryptions = key_counts.encryptions + excluded.encryptions, live = key_counts.live + excluded.live";

/// Records that left versions of `collection` (deleted, or re-encrypted
/// onto another version): subtracts from each version's live count, in
/// the row of the writer's chain.
const COUNT_REMOVED: &str = "INSERT INTO key_counts (collection_id, purpose, version, chain, encryptions, live)
     VALUES ($2, 'data', $3, $4, 0, -$1::bigint)
     ON CONFLICT (collection_id, purpose, version, chain) DO UPDATE SET live = key_counts.live + excluded.live";

/// Adds records newly sealed to each version's counts: see [`COUNT_SEALED`].
pub(super) fn count_sealed(
    conn: &mut Db<'_, '_>,
    chain: &str,
    collection: CollectionId,
    per_version: &BTreeMap<u32, i64>,
) -> Result<(), StoreError> {
    count(conn, chain, COUNT_SEALED, collection, per_version)
}

/// Applies one of the counter updates above to each version's count in
/// `chain`'s row; a version that is not there to count (see
/// [`COUNT_SEALED`]) is a conflict.
fn count(
    conn: &mut Db<'_, '_>,
    chain: &str,
    sql: &'static str,
    collection: CollectionId,
    per_version: &BTreeMap<u32, i64>,
) -> Result<(), StoreError> {
    for (version, n) in per_version {
        if conn.execute(sql, &[n, &collection.0, &i64::from(*version), &chain])? != 1 {
            return Err(StoreError::Conflict);
        }
    }
    Ok(())
}
