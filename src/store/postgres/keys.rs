//! Wrapped key versions: per collection (`keys`) and vault-wide
//! (`vault_keys`, the audit key).

use async_trait::async_trait;

use super::{PostgresStore, stored_u32, stored_u64};
use crate::audit::{AuditRecord, Outcome};
use crate::crypto::keyring::KeyPurpose;
use crate::store::{
    CollectionId, KeyInfo, KeyState, KeyStore, KeySummary, RetireRefused, StoreError, StoredKey, WrappedKey, now_micros,
};

/// `keys k` with each version's counts from every chain as `c`: a data key
/// version's counts are its row's plus theirs (see
/// `migrations/postgres/0006_key_counts.sql`).
macro_rules! keys_counted {
    () => {
        "keys k LEFT JOIN LATERAL (
             SELECT sum(n.encryptions)::bigint AS encryptions, sum(n.live)::bigint AS live FROM key_counts n
             WHERE n.collection_id = k.collection_id AND n.purpose = k.purpose AND n.version = k.version) c ON true"
    };
}

fn purpose_of(row: &postgres::Row, column: usize) -> Result<KeyPurpose, StoreError> {
    KeyPurpose::parse(row.try_get(column)?).ok_or(StoreError::Corrupt)
}

fn state_of(row: &postgres::Row, column: usize) -> Result<KeyState, StoreError> {
    KeyState::parse(row.try_get(column)?).ok_or(StoreError::Corrupt)
}

#[async_trait]
impl KeyStore for PostgresStore {
    async fn list_keys(&self, collection: CollectionId, purpose: KeyPurpose) -> Result<Vec<KeyInfo>, StoreError> {
        self.read(move |tx| {
            // Index keys count their entries; data keys keep a counter.
            let rows = tx.query(
                concat!(
                    "SELECT k.version, k.state, k.created_at, k.encryptions + coalesce(c.encryptions, 0),
                            CASE k.purpose WHEN 'index' THEN
                                (SELECT count(*) FROM blind_index b WHERE b.collection_id = k.collection_id AND b.version = k.version)
                            ELSE k.live + coalesce(c.live, 0) END
                     FROM ",
                    keys_counted!(),
                    " WHERE k.collection_id = $1 AND k.purpose = $2 ORDER BY k.version"
                ),
                &[&collection.0, &purpose.as_str()],
            )?;
            rows.iter()
                .map(|row| {
                    Ok(KeyInfo {
                        purpose,
                        version: stored_u32(row.try_get(0)?)?,
                        state: state_of(row, 1)?,
                        created_at: row.try_get(2)?,
                        encryptions: stored_u64(row.try_get(3)?)?,
                        records: stored_u64(row.try_get(4)?)?,
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
            tx.tx.execute(
                "UPDATE keys SET state = $3 WHERE collection_id = $1 AND purpose = $2 AND state = 'primary'",
                &[&collection.0, &purpose.as_str(), &demoted.as_str()],
            )?;
            if let Some(bad) = compromised {
                tx.tx.execute(
                    "UPDATE keys SET state = 'compromised'
                     WHERE collection_id = $1 AND purpose = 'data' AND version = $2 AND state != 'retired'",
                    &[&collection.0, &i64::from(bad)],
                )?;
            }
            // A version another node took first is a unique violation: a
            // conflict, and nothing of this one is written.
            tx.tx.execute(
                "INSERT INTO keys (collection_id, purpose, version, state, wrapped, created_at)
                 VALUES ($1, $2, $3, 'primary', $4, $5)",
                &[&collection.0, &purpose.as_str(), &i64::from(version), &wrapped, &now_micros()],
            )?;
            tx.append_audit(&audit)?;
            Ok(())
        })
        .await
    }

    async fn mark_retiring(&self, collection: CollectionId) -> Result<(), StoreError> {
        self.write(move |tx| {
            tx.tx.execute(
                "UPDATE keys SET state = 'retiring' WHERE collection_id = $1 AND purpose = 'data' AND state = 'active'",
                &[&collection.0],
            )?;
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
            // Locked: a record sealed under it by another node meanwhile
            // waits for this decision, or this one waits for it.
            let state = tx.tx.query_opt(
                "SELECT state FROM keys WHERE collection_id = $1 AND purpose = 'data' AND version = $2 FOR UPDATE",
                &[&collection.0, &i64::from(version)],
            )?;
            let refusal = match &state {
                None => Some(RetireRefused::NoSuchVersion),
                Some(row) => match state_of(row, 0)? {
                    KeyState::Primary => Some(RetireRefused::Primary),
                    KeyState::Retired => Some(RetireRefused::AlreadyRetired),
                    _ => {
                        // A statement of its own, after the lock: its
                        // snapshot holds every count of the transactions
                        // that sealed under the version before it.
                        let row = tx.tx.query_one(
                            concat!(
                                "SELECT k.live + coalesce(c.live, 0) FROM ",
                                keys_counted!(),
                                " WHERE k.collection_id = $1 AND k.purpose = 'data' AND k.version = $2"
                            ),
                            &[&collection.0, &i64::from(version)],
                        )?;
                        let live = stored_u64(row.try_get(0)?)?;
                        (live > 0).then_some(RetireRefused::InUse(live))
                    }
                },
            };
            if let Some(refusal) = refusal {
                let mut audit = audit;
                Outcome::FailedPrecondition.as_str().clone_into(&mut audit.outcome);
                audit.error_code = refusal.to_string();
                tx.append_audit(&audit)?;
                return Ok(Err(refusal));
            }
            tx.tx.execute(
                "UPDATE keys SET state = 'retired', wrapped = '\\x'::bytea, retired_at = $3
                 WHERE collection_id = $1 AND purpose = 'data' AND version = $2",
                &[&collection.0, &i64::from(version), &now_micros()],
            )?;
            tx.append_audit(&audit)?;
            Ok(Ok(()))
        })
        .await
    }

    async fn wrapped_keys(&self) -> Result<Vec<WrappedKey>, StoreError> {
        self.read(|tx| {
            let mut out = Vec::new();
            for row in tx.query(
                "SELECT k.collection_id, c.name, k.purpose, k.version, k.wrapped
                 FROM keys k JOIN collections c ON c.id = k.collection_id WHERE k.state != 'retired'",
                &[],
            )? {
                out.push(WrappedKey {
                    collection: Some(CollectionId(row.try_get(0)?)),
                    collection_name: row.try_get(1)?,
                    purpose: purpose_of(&row, 2)?,
                    version: stored_u32(row.try_get(3)?)?,
                    wrapped: row.try_get(4)?,
                });
            }
            for row in tx.query("SELECT purpose, version, wrapped FROM vault_keys WHERE state != 'retired'", &[])? {
                out.push(WrappedKey {
                    collection: None,
                    collection_name: String::new(),
                    purpose: purpose_of(&row, 0)?,
                    version: stored_u32(row.try_get(1)?)?,
                    wrapped: row.try_get(2)?,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn rewrap_keys(&self, keys: Vec<WrappedKey>, audit: AuditRecord) -> Result<(), StoreError> {
        self.write(move |tx| {
            for key in &keys {
                let version = i64::from(key.version);
                let changed = match key.collection {
                    Some(id) => tx.tx.execute(
                        "UPDATE keys SET wrapped = $1
                         WHERE collection_id = $2 AND purpose = $3 AND version = $4 AND state != 'retired'",
                        &[&key.wrapped, &id.0, &key.purpose.as_str(), &version],
                    )?,
                    None => tx.tx.execute(
                        "UPDATE vault_keys SET wrapped = $1 WHERE purpose = $2 AND version = $3",
                        &[&key.wrapped, &key.purpose.as_str(), &version],
                    )?,
                };
                if changed != 1 {
                    // A key vanished or appeared meanwhile: roll back all.
                    return Err(StoreError::Conflict);
                }
            }
            tx.append_audit(&audit)?;
            Ok(())
        })
        .await
    }

    async fn load_keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        self.read(|tx| {
            tx.query(
                "SELECT k.collection_id, c.name, k.purpose, k.version, k.state, k.wrapped
                 FROM keys k JOIN collections c ON c.id = k.collection_id
                 ORDER BY k.collection_id, k.purpose, k.version",
                &[],
            )?
            .iter()
            .map(|row| {
                Ok(StoredKey {
                    collection: CollectionId(row.try_get(0)?),
                    collection_name: row.try_get(1)?,
                    purpose: purpose_of(row, 2)?,
                    version: stored_u32(row.try_get(3)?)?,
                    state: state_of(row, 4)?,
                    wrapped: row.try_get(5)?,
                })
            })
            .collect()
        })
        .await
    }

    async fn vault_key(&self, purpose: KeyPurpose, wrapped: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        self.write(move |tx| {
            tx.tx.execute(
                "INSERT INTO vault_keys (purpose, version, state, wrapped, created_at)
                 VALUES ($1, 1, 'primary', $2, $3) ON CONFLICT (purpose, version) DO NOTHING",
                &[&purpose.as_str(), &wrapped, &now_micros()],
            )?;
            Ok(tx
                .tx
                .query_one("SELECT wrapped FROM vault_keys WHERE purpose = $1 AND version = 1", &[&purpose.as_str()])?
                .try_get(0)?)
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
            tx.tx.execute(
                "INSERT INTO keys (collection_id, purpose, version, state, wrapped, created_at)
                 SELECT $1, $2, 1, 'primary', $3, $4
                 WHERE NOT EXISTS (SELECT 1 FROM keys WHERE collection_id = $1 AND purpose = $2)
                 ON CONFLICT DO NOTHING",
                &[&collection.0, &purpose.as_str(), &wrapped, &now_micros()],
            )?;
            Ok(())
        })
        .await
    }

    async fn key_summary(&self) -> Result<Vec<KeySummary>, StoreError> {
        self.read(|tx| {
            tx.query(
                concat!(
                    "SELECT l.name, k.purpose, k.state, count(*),
                            coalesce(sum(CASE k.purpose WHEN 'data' THEN k.live + coalesce(c.live, 0) ELSE 0 END), 0)::bigint
                     FROM ",
                    keys_counted!(),
                    " JOIN collections l ON l.id = k.collection_id
                     GROUP BY l.name, k.purpose, k.state ORDER BY l.name, k.purpose, k.state"
                ),
                &[],
            )?
            .iter()
            .map(|row| {
                Ok(KeySummary {
                    collection: row.try_get(0)?,
                    purpose: purpose_of(row, 1)?,
                    state: state_of(row, 2)?,
                    versions: stored_u64(row.try_get(3)?)?,
                    live: stored_u64(row.try_get(4)?)?,
                })
            })
            .collect()
        })
        .await
    }

    async fn retire_unused_index_keys(
        &self,
        collection: CollectionId,
        audit: AuditRecord,
    ) -> Result<Vec<u32>, StoreError> {
        self.write(move |tx| {
            let unused = tx
                .tx
                .query(
                    "UPDATE keys k SET state = 'retired', wrapped = '\\x'::bytea, retired_at = $2
                     WHERE k.collection_id = $1 AND k.purpose = 'index' AND k.state NOT IN ('primary', 'retired')
                       AND NOT EXISTS (SELECT 1 FROM blind_index b
                                       WHERE b.collection_id = k.collection_id AND b.version = k.version)
                     RETURNING k.version",
                    &[&collection.0, &now_micros()],
                )?
                .iter()
                .map(|row| stored_u32(row.try_get(0)?))
                .collect::<Result<Vec<u32>, _>>()?;
            let mut unused = unused;
            unused.sort_unstable();
            if unused.is_empty() {
                return Ok(unused);
            }
            let mut audit = audit;
            audit.error_code = format!(
                "index key versions {} retired",
                unused.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
            );
            tx.append_audit(&audit)?;
            Ok(unused)
        })
        .await
    }
}
