//! Records: one row per token ever issued (its ciphertext cleared on
//! erasure), and the blind index of deterministic collections.

use std::collections::BTreeMap;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension as _, params};

use super::SqliteStore;
use super::writer::WriteTx;
use crate::audit::AuditRecord;
use crate::store::{
    CollectionId, IndexEntry, InsertOutcome, NewRecord, Pending, RecordStore, Reencrypted, StoreError, StoredRecord,
    TokenLookup, now_micros,
};

#[async_trait]
impl RecordStore for SqliteStore {
    async fn insert_records(
        &self,
        collection: CollectionId,
        records: Vec<NewRecord>,
        mut audit: AuditRecord,
    ) -> Result<Vec<InsertOutcome>, StoreError> {
        self.write(move |tx| {
            let now = now_micros();
            let mut outcomes = Vec::with_capacity(records.len());
            let mut per_version: BTreeMap<u32, i64> = BTreeMap::new();
            for r in &records {
                if let Some(index) = &r.index
                    && let Some(token) = indexed_token(tx, collection, index, now)?
                {
                    outcomes.push(InsertOutcome::Existing(token));
                    continue;
                }
                // A token issued before canonical storage may hold this
                // canonical form in another writing.
                let legacy = tx
                    .conn
                    .prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM legacy_tokens WHERE collection_id = ?1 AND canonical = ?2)",
                    )?
                    .query_row(params![collection.0, r.token], |row| row.get::<_, bool>(0))?;
                if legacy {
                    outcomes.push(InsertOutcome::Collision);
                    continue;
                }
                let changed = tx
                    .conn
                    .prepare_cached(
                        "INSERT INTO records (collection_id, token, key_version, ciphertext, created_at, expires_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                         ON CONFLICT (collection_id, token) DO NOTHING",
                    )?
                    .execute(params![collection.0, r.token, r.key_version, r.ciphertext, now, r.expires_at])?;
                if changed != 1 {
                    outcomes.push(InsertOutcome::Collision);
                    continue;
                }
                if let Some(index) = &r.index {
                    tx.conn
                        .prepare_cached(
                            "INSERT INTO blind_index (collection_id, version, digest, token) VALUES (?1, ?2, ?3, ?4)",
                        )?
                        .execute(params![collection.0, index.version, index.digest.as_slice(), r.token])?;
                }
                *per_version.entry(r.key_version).or_default() += 1;
                outcomes.push(InsertOutcome::Inserted);
            }
            count(tx.conn, COUNT_SEALED, collection, &per_version)?;
            audit.tokens = records
                .iter()
                .zip(&outcomes)
                .filter_map(|(r, o)| match o {
                    InsertOutcome::Inserted => Some(r.token.clone()),
                    InsertOutcome::Existing(token) => Some(token.clone()),
                    InsertOutcome::Collision => None,
                })
                .collect();
            tx.append_audit(&audit)?;
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
            let now = now_micros();
            let mut stmt = conn.prepare_cached(
                "SELECT ciphertext FROM records
                 WHERE collection_id = ?1 AND token = ?2 AND ciphertext IS NOT NULL
                   AND (expires_at IS NULL OR expires_at > ?3)",
            )?;
            let mut find = |token: &str| -> Result<Option<StoredRecord>, StoreError> {
                let found =
                    stmt.query_row(params![collection.0, token, now], |row| row.get::<_, Vec<u8>>(0)).optional()?;
                Ok(found.map(|ciphertext| StoredRecord { token: token.to_owned(), ciphertext }))
            };
            lookups
                .iter()
                .map(|lookup| {
                    for token in lookup.candidates() {
                        if let Some(found) = find(token)? {
                            return Ok(Some(found));
                        }
                    }
                    match legacy_token(conn, collection, lookup)? {
                        Some(token) => find(&token),
                        None => Ok(None),
                    }
                })
                .collect()
        })
        .await
    }

    async fn delete_records(
        &self,
        collection: CollectionId,
        lookups: Vec<TokenLookup>,
        mut audit: AuditRecord,
    ) -> Result<Vec<bool>, StoreError> {
        self.write(move |tx| {
            let now = now_micros();
            let mut deleted = Vec::with_capacity(lookups.len());
            for lookup in &lookups {
                let mut erased = None;
                for token in lookup.candidates() {
                    if erase(tx, collection, token, Some(now))? {
                        erased = Some(token.to_owned());
                        break;
                    }
                }
                if erased.is_none()
                    && let Some(token) = legacy_token(tx.conn, collection, lookup)?
                    && erase(tx, collection, &token, Some(now))?
                {
                    erased = Some(token);
                }
                deleted.push(erased.is_some());
                audit.tokens.extend(erased);
            }
            tx.append_audit(&audit)?;
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
    ) -> Result<usize, StoreError> {
        self.write(move |tx| {
            let expired: Vec<String> = {
                let mut stmt = tx.conn.prepare_cached(
                    "SELECT token FROM records
                     WHERE collection_id = ?1 AND ciphertext IS NOT NULL AND expires_at IS NOT NULL AND expires_at <= ?2
                     LIMIT ?3",
                )?;
                let limit = i64::try_from(limit).unwrap_or(i64::MAX);
                let rows = stmt.query_map(params![collection.0, now, limit], |row| row.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            let mut purged = Vec::with_capacity(expired.len());
            for token in expired {
                if erase(tx, collection, &token, None)? {
                    purged.push(token);
                }
            }
            let n = purged.len();
            if n > 0 {
                audit.items = u32::try_from(n).unwrap_or(u32::MAX);
                audit.tokens = purged;
                tx.append_audit(&audit)?;
            }
            Ok(n)
        })
        .await
    }

    async fn issued_by_length(&self, collection: CollectionId) -> Result<Vec<(usize, u64)>, StoreError> {
        self.read(move |conn| {
            // Canonical tokens are counted by length in SQL; tokens stored
            // with separators (before schema version 5) one by one.
            let mut stmt = conn.prepare_cached(
                "SELECT length(token), CASE WHEN token GLOB '*[^0-9A-Za-z]*' THEN token END, count(*)
                 FROM records WHERE collection_id = ?1 GROUP BY 1, 2",
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
            Ok(counts.into_iter().collect())
        })
        .await
    }

    async fn records_needing(
        &self,
        collection: CollectionId,
        work: Pending,
        after_token: String,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.read(move |conn| {
            let (mut stmt, version) = match work {
                Pending::Reencryption { primary } => (
                    conn.prepare_cached(
                        "SELECT token, ciphertext FROM records
                         WHERE collection_id = ?1 AND key_version != ?2 AND ciphertext IS NOT NULL AND token > ?3
                         ORDER BY token LIMIT ?4",
                    )?,
                    primary,
                ),
                Pending::Indexing { version } => (
                    conn.prepare_cached(
                        "SELECT r.token, r.ciphertext FROM records r
                         WHERE r.collection_id = ?1 AND r.ciphertext IS NOT NULL AND r.token > ?3
                           AND NOT EXISTS (SELECT 1 FROM blind_index b
                                           WHERE b.collection_id = r.collection_id AND b.token = r.token AND b.version = ?2)
                         ORDER BY r.token LIMIT ?4",
                    )?,
                    version,
                ),
            };
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = stmt
                .query_map(params![collection.0, version, after_token, limit], |row| Ok((row.get(0)?, row.get(1)?)))?;
            rows.map(|r| r.map_err(StoreError::from)).collect()
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
                 WHERE collection_id = ?3 AND token = ?4 AND key_version = ?5 AND ciphertext IS NOT NULL",
            )?;
            let mut replaced = 0;
            let mut sealed: BTreeMap<u32, i64> = BTreeMap::new();
            let mut removed: BTreeMap<u32, i64> = BTreeMap::new();
            for r in &records {
                if stmt.execute(params![r.to_version, r.ciphertext, collection.0, r.token, r.from_version])? == 1 {
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
        entries: Vec<(String, [u8; 32])>,
        audit: AuditRecord,
    ) -> Result<usize, StoreError> {
        self.write(move |tx| {
            let mut indexed = 0;
            for (token, digest) in &entries {
                let live: bool = tx
                    .conn
                    .prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM records
                         WHERE collection_id = ?1 AND token = ?2 AND ciphertext IS NOT NULL)",
                    )?
                    .query_row(params![collection.0, token], |row| row.get(0))?;
                if !live {
                    continue;
                }
                tx.conn
                    .prepare_cached(
                        "DELETE FROM blind_index WHERE collection_id = ?1 AND token = ?2 AND version != ?3",
                    )?
                    .execute(params![collection.0, token, version])?;
                indexed += tx
                    .conn
                    .prepare_cached(
                        "INSERT INTO blind_index (collection_id, version, digest, token) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT DO NOTHING",
                    )?
                    .execute(params![collection.0, version, digest.as_slice(), token])?;
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

/// The token issued before canonical storage that `lookup`'s canonical
/// form stands for, if there is exactly one.
fn legacy_token(
    conn: &Connection,
    collection: CollectionId,
    lookup: &TokenLookup,
) -> Result<Option<String>, StoreError> {
    let Some(canonical) = &lookup.canonical else { return Ok(None) };
    Ok(conn
        .prepare_cached("SELECT token FROM legacy_tokens WHERE collection_id = ?1 AND canonical = ?2")?
        .query_row(params![collection.0, canonical], |row| row.get::<_, Option<String>>(0))
        .optional()?
        .flatten())
}

/// The live token a blind index points to, looked up under every live index
/// version. An entry whose record is gone is dropped; one whose record has
/// expired erases it, so the value gets a new token.
fn indexed_token(
    tx: &mut WriteTx<'_>,
    collection: CollectionId,
    index: &IndexEntry,
    now: i64,
) -> Result<Option<String>, StoreError> {
    for (version, digest) in &index.lookups {
        let token: Option<String> = tx
            .conn
            .prepare_cached("SELECT token FROM blind_index WHERE collection_id = ?1 AND version = ?2 AND digest = ?3")?
            .query_row(params![collection.0, version, digest.as_slice()], |row| row.get(0))
            .optional()?;
        let Some(token) = token else { continue };
        let expires_at: Option<Option<i64>> = tx
            .conn
            .prepare_cached(
                "SELECT expires_at FROM records WHERE collection_id = ?1 AND token = ?2 AND ciphertext IS NOT NULL",
            )?
            .query_row(params![collection.0, token], |row| row.get(0))
            .optional()?;
        match expires_at {
            Some(None) => return Ok(Some(token)),
            Some(Some(at)) if at > now => return Ok(Some(token)),
            Some(Some(_)) => {
                erase(tx, collection, &token, None)?;
            }
            None => {
                tx.conn
                    .prepare_cached("DELETE FROM blind_index WHERE collection_id = ?1 AND token = ?2")?
                    .execute(params![collection.0, token])?;
            }
        }
    }
    Ok(None)
}

/// Erases the record behind `token` if it is live (and, with `unexpired_at`,
/// not expired at that time): the ciphertext is cleared, the token row kept,
/// its index entries removed, its key version's live count lowered. Returns
/// whether it erased.
fn erase(
    tx: &mut WriteTx<'_>,
    collection: CollectionId,
    token: &str,
    unexpired_at: Option<i64>,
) -> Result<bool, StoreError> {
    let version: Option<u32> = tx
        .conn
        .prepare_cached(
            "SELECT key_version FROM records
             WHERE collection_id = ?1 AND token = ?2 AND ciphertext IS NOT NULL
               AND (?3 IS NULL OR expires_at IS NULL OR expires_at > ?3)",
        )?
        .query_row(params![collection.0, token, unexpired_at], |row| row.get(0))
        .optional()?;
    let Some(version) = version else { return Ok(false) };
    tx.conn
        .prepare_cached(
            "UPDATE records SET ciphertext = NULL, key_version = NULL, deleted_at = ?3
             WHERE collection_id = ?1 AND token = ?2",
        )?
        .execute(params![collection.0, token, now_micros()])?;
    tx.conn
        .prepare_cached("DELETE FROM blind_index WHERE collection_id = ?1 AND token = ?2")?
        .execute(params![collection.0, token])?;
    count(tx.conn, COUNT_REMOVED, collection, &std::iter::once((version, 1)).collect())?;
    *tx.erased = true;
    Ok(true)
}

/// Records newly sealed under versions of `collection`: adds to each
/// version's encryption counter and live-record count.
const COUNT_SEALED: &str = "UPDATE keys SET encryptions = encryptions + ?1, live = live + ?1
     WHERE collection_id = ?2 AND purpose = 'data' AND version = ?3";

/// Records that left versions of `collection` (deleted, or re-encrypted
/// onto another version): subtracts from each version's live count.
const COUNT_REMOVED: &str =
    "UPDATE keys SET live = live - ?1 WHERE collection_id = ?2 AND purpose = 'data' AND version = ?3";

/// Applies one of the counter updates above to each version's count.
fn count(
    conn: &Connection,
    sql: &str,
    collection: CollectionId,
    per_version: &BTreeMap<u32, i64>,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    for (version, n) in per_version {
        stmt.execute(params![n, collection.0, version])?;
    }
    Ok(())
}
