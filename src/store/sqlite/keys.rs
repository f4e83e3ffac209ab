//! Wrapped key versions: per collection (`keys`) and vault-wide
//! (`vault_keys`, the audit key).

use async_trait::async_trait;
use rusqlite::{OptionalExtension as _, params};

use super::SqliteStore;
use crate::audit::{AuditRecord, Outcome};
use crate::crypto::keyring::KeyPurpose;
use crate::store::{
    CollectionId, KeyInfo, KeyState, KeyStore, KeySummary, RetireRefused, StoreError, StoredKey, WrappedKey, now_micros,
};

#[async_trait]
impl KeyStore for SqliteStore {
    async fn list_keys(&self, collection: CollectionId, purpose: KeyPurpose) -> Result<Vec<KeyInfo>, StoreError> {
        self.read(move |conn| {
            // Index keys count their entries; data keys keep a counter.
            let mut stmt = conn.prepare_cached(
                "SELECT k.version, k.state, k.created_at, k.encryptions,
                        CASE k.purpose WHEN 'index' THEN
                            (SELECT count(*) FROM blind_index b WHERE b.collection_id = k.collection_id AND b.version = k.version)
                        ELSE k.live END
                 FROM keys k WHERE k.collection_id = ?1 AND k.purpose = ?2 ORDER BY k.version",
            )?;
            let rows = stmt.query_map(params![collection.0, purpose], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get(2)?,
                    row.get::<_, i64>(3)?,
                    row.get::<_, i64>(4)?,
                ))
            })?;
            rows.map(|row| {
                let (version, state, created_at, encryptions, records) = row?;
                Ok(KeyInfo {
                    purpose,
                    version: u32::try_from(version).map_err(|_| StoreError::Corrupt)?,
                    state: KeyState::parse(&state).ok_or(StoreError::Corrupt)?,
                    created_at,
                    records: u64::try_from(records).unwrap_or(0),
                    encryptions: u64::try_from(encryptions).unwrap_or(0),
                })
            })
            .collect()
        })
        .await
    }

    async fn add_primary_key(
        &self,
        collection: CollectionId,
        purpose: KeyPurpose,
        version: u32,
        wrapped: Vec<u8>,
        compromised: Option<u32>,
        audit: AuditRecord,
    ) -> Result<(), StoreError> {
        self.write(move |tx| {
            // An old index key only serves lookups until the rebuild has
            // moved its entries: it is retiring from the start.
            let demoted = if purpose == KeyPurpose::Index { KeyState::Retiring } else { KeyState::Active };
            tx.conn
                .prepare_cached(
                    "UPDATE keys SET state = ?3
                     WHERE collection_id = ?1 AND purpose = ?2 AND state = 'primary'",
                )?
                .execute(params![collection.0, purpose, demoted])?;
            if let Some(bad) = compromised {
                tx.conn
                    .prepare_cached(
                        "UPDATE keys SET state = 'compromised'
                         WHERE collection_id = ?1 AND purpose = 'data' AND version = ?2 AND state != 'retired'",
                    )?
                    .execute(params![collection.0, bad])?;
            }
            tx.conn
                .prepare_cached(
                    "INSERT INTO keys (collection_id, purpose, version, state, wrapped, created_at)
                     VALUES (?1, ?2, ?3, 'primary', ?4, ?5)",
                )?
                .execute(params![collection.0, purpose, version, wrapped, now_micros()])?;
            tx.append_audit(&audit)?;
            Ok(())
        })
        .await
    }

    async fn mark_retiring(&self, collection: CollectionId) -> Result<(), StoreError> {
        self.write(move |tx| {
            tx.conn
                .prepare_cached("UPDATE keys SET state = 'retiring' WHERE collection_id = ?1 AND purpose = 'data' AND state = 'active'")?
                .execute([collection.0])?;
            Ok(())
        })
        .await
    }

    async fn retire_key(
        &self,
        collection: CollectionId,
        version: u32,
        audit: AuditRecord,
    ) -> Result<Result<(), RetireRefused>, StoreError> {
        self.write(move |tx| {
            let state: Option<String> = tx
                .conn
                .prepare_cached(
                    "SELECT state FROM keys WHERE collection_id = ?1 AND purpose = 'data' AND version = ?2",
                )?
                .query_row(params![collection.0, version], |row| row.get(0))
                .optional()?;
            let refusal = match state.as_deref() {
                None => Some(RetireRefused::NoSuchVersion),
                Some("primary") => Some(RetireRefused::Primary),
                Some("retired") => Some(RetireRefused::AlreadyRetired),
                Some(_) => {
                    let records: i64 = tx
                        .conn
                        .prepare_cached(
                            "SELECT live FROM keys WHERE collection_id = ?1 AND purpose = 'data' AND version = ?2",
                        )?
                        .query_row(params![collection.0, version], |row| row.get(0))?;
                    (records > 0).then(|| RetireRefused::InUse(u64::try_from(records).unwrap_or(0)))
                }
            };
            if let Some(refusal) = refusal {
                let mut audit = audit;
                Outcome::FailedPrecondition.as_str().clone_into(&mut audit.outcome);
                audit.error_code = refusal.to_string();
                tx.append_audit(&audit)?;
                return Ok(Err(refusal));
            }
            tx.conn
                .prepare_cached(
                    "UPDATE keys SET state = 'retired', wrapped = X'', retired_at = ?3
                     WHERE collection_id = ?1 AND purpose = 'data' AND version = ?2",
                )?
                .execute(params![collection.0, version, now_micros()])?;
            tx.append_audit(&audit)?;
            // The destroyed wrapped key must not outlive this in the WAL.
            *tx.erased = true;
            Ok(Ok(()))
        })
        .await
    }

    async fn wrapped_keys(&self) -> Result<Vec<WrappedKey>, StoreError> {
        self.read(|conn| {
            let mut out = Vec::new();
            let mut stmt = conn.prepare_cached(
                "SELECT k.collection_id, c.name, k.purpose, k.version, k.wrapped
                 FROM keys k JOIN collections c ON c.id = k.collection_id WHERE k.state != 'retired'",
            )?;
            let rows = stmt.query_map([], |row| {
                Ok(WrappedKey {
                    collection: Some(CollectionId(row.get(0)?)),
                    collection_name: row.get(1)?,
                    purpose: row.get(2)?,
                    version: row.get(3)?,
                    wrapped: row.get(4)?,
                })
            })?;
            for row in rows {
                out.push(row?);
            }
            let mut stmt =
                conn.prepare_cached("SELECT purpose, version, wrapped FROM vault_keys WHERE state != 'retired'")?;
            let rows = stmt.query_map([], |row| {
                Ok(WrappedKey {
                    collection: None,
                    collection_name: String::new(),
                    purpose: row.get(0)?,
                    version: row.get(1)?,
                    wrapped: row.get(2)?,
                })
            })?;
            for row in rows {
                out.push(row?);
            }
            Ok(out)
        })
        .await
    }

    async fn rewrap_keys(&self, keys: Vec<WrappedKey>, audit: AuditRecord) -> Result<(), StoreError> {
        self.write(move |tx| {
            for key in &keys {
                let changed = match key.collection {
                    Some(id) => tx
                        .conn
                        .prepare_cached(
                            "UPDATE keys SET wrapped = ?1 WHERE collection_id = ?2 AND purpose = ?3 AND version = ?4",
                        )?
                        .execute(params![key.wrapped, id.0, key.purpose, key.version])?,
                    None => tx
                        .conn
                        .prepare_cached("UPDATE vault_keys SET wrapped = ?1 WHERE purpose = ?2 AND version = ?3")?
                        .execute(params![key.wrapped, key.purpose, key.version])?,
                };
                if changed != 1 {
                    // A key vanished or appeared meanwhile: roll back all.
                    return Err(StoreError::Conflict);
                }
            }
            tx.append_audit(&audit)?;
            // Keys wrapped under the old root must not outlive it in the WAL.
            *tx.erased = true;
            Ok(())
        })
        .await
    }

    async fn load_keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT k.collection_id, c.name, k.purpose, k.version, k.state, k.wrapped
                 FROM keys k JOIN collections c ON c.id = k.collection_id
                 ORDER BY k.collection_id, k.purpose, k.version",
            )?;
            let rows = stmt.query_map([], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, KeyPurpose>(2)?,
                    row.get::<_, i64>(3)?,
                    row.get::<_, KeyState>(4)?,
                    row.get::<_, Vec<u8>>(5)?,
                ))
            })?;
            let mut keys = Vec::new();
            for row in rows {
                let (id, name, purpose, version, state, wrapped) = row?;
                keys.push(StoredKey {
                    collection: CollectionId(id),
                    collection_name: name,
                    purpose,
                    version: u32::try_from(version).map_err(|_| StoreError::Corrupt)?,
                    state,
                    wrapped,
                });
            }
            Ok(keys)
        })
        .await
    }

    async fn vault_key(&self, purpose: KeyPurpose, wrapped: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        self.write(move |tx| {
            tx.conn
                .prepare_cached(
                    "INSERT INTO vault_keys (purpose, version, state, wrapped, created_at)
                     VALUES (?1, 1, 'primary', ?2, ?3) ON CONFLICT (purpose, version) DO NOTHING",
                )?
                .execute(params![purpose, wrapped, now_micros()])?;
            Ok(tx
                .conn
                .prepare_cached("SELECT wrapped FROM vault_keys WHERE purpose = ?1 AND version = 1")?
                .query_row([purpose], |row| row.get(0))?)
        })
        .await
    }

    async fn add_first_key(
        &self,
        collection: CollectionId,
        purpose: KeyPurpose,
        wrapped: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.write(move |tx| {
            tx.conn
                .prepare_cached(
                    "INSERT INTO keys (collection_id, purpose, version, state, wrapped, created_at)
                     SELECT ?1, ?2, 1, 'primary', ?3, ?4
                     WHERE NOT EXISTS (SELECT 1 FROM keys WHERE collection_id = ?1 AND purpose = ?2)",
                )?
                .execute(params![collection.0, purpose, wrapped, now_micros()])?;
            Ok(())
        })
        .await
    }

    async fn key_summary(&self) -> Result<Vec<KeySummary>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT c.name, k.purpose, k.state, count(*), sum(CASE k.purpose WHEN 'data' THEN k.live ELSE 0 END)
                 FROM keys k JOIN collections c ON c.id = k.collection_id
                 GROUP BY c.name, k.purpose, k.state ORDER BY c.name, k.purpose, k.state",
            )?;
            let rows = stmt.query_map([], |row| {
                Ok(KeySummary {
                    collection: row.get(0)?,
                    purpose: row.get(1)?,
                    state: row.get(2)?,
                    versions: u64::try_from(row.get::<_, i64>(3)?).unwrap_or(0),
                    live: u64::try_from(row.get::<_, i64>(4)?).unwrap_or(0),
                })
            })?;
            rows.collect::<Result<_, _>>().map_err(StoreError::from)
        })
        .await
    }

    async fn retire_unused_index_keys(
        &self,
        collection: CollectionId,
        audit: AuditRecord,
    ) -> Result<Vec<u32>, StoreError> {
        self.write(move |tx| {
            let unused: Vec<u32> = {
                let mut stmt = tx.conn.prepare_cached(
                    "SELECT k.version FROM keys k
                     WHERE k.collection_id = ?1 AND k.purpose = 'index' AND k.state NOT IN ('primary', 'retired')
                       AND NOT EXISTS (SELECT 1 FROM blind_index b WHERE b.collection_id = k.collection_id AND b.version = k.version)",
                )?;
                let rows = stmt.query_map([collection.0], |row| row.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            if unused.is_empty() {
                return Ok(unused);
            }
            for version in &unused {
                tx.conn
                    .prepare_cached(
                        "UPDATE keys SET state = 'retired', wrapped = X'', retired_at = ?3
                         WHERE collection_id = ?1 AND purpose = 'index' AND version = ?2",
                    )?
                    .execute(params![collection.0, version, now_micros()])?;
            }
            let mut audit = audit;
            audit.error_code = format!(
                "index key versions {} retired",
                unused.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
            );
            tx.append_audit(&audit)?;
            *tx.erased |= !unused.is_empty();
            Ok(unused)
        })
        .await
    }
}
