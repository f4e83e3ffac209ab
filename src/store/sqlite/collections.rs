//! Collections and what is recorded about each (token kind, the first
//! canonical index version).

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension as _, params};

use super::SqliteStore;
use crate::crypto::keyring::KeyPurpose;
use crate::store::{CollectionId, CollectionStore, KeyState, StoreError, now_micros};

#[async_trait]
impl CollectionStore for SqliteStore {
    async fn collection_id(&self, name: &str) -> Result<Option<CollectionId>, StoreError> {
        let name = name.to_owned();
        self.read(move |conn| {
            Ok(conn
                .prepare_cached("SELECT id FROM collections WHERE name = ?1")?
                .query_row([&name], |row| row.get(0))
                .optional()?
                .map(CollectionId))
        })
        .await
    }

    async fn create_collection(
        &self,
        name: &str,
        purpose: KeyPurpose,
        wrapped_v1: Vec<u8>,
    ) -> Result<CollectionId, StoreError> {
        let name = name.to_owned();
        self.write(move |tx| {
            let conn = tx.conn;
            let existing: Option<i64> = conn
                .prepare_cached("SELECT id FROM collections WHERE name = ?1")?
                .query_row([&name], |row| row.get(0))
                .optional()?;
            if let Some(id) = existing {
                return Ok(CollectionId(id));
            }
            let now = now_micros();
            conn.prepare_cached("INSERT INTO collections (name, created_at) VALUES (?1, ?2)")?
                .execute(params![name, now])?;
            let id = conn.last_insert_rowid();
            conn.prepare_cached(
                "INSERT INTO keys (collection_id, purpose, version, state, wrapped, created_at)
                 VALUES (?1, ?2, 1, ?3, ?4, ?5)",
            )?
            .execute(params![id, purpose, KeyState::Primary.as_str(), wrapped_v1, now])?;
            Ok(CollectionId(id))
        })
        .await
    }

    async fn token_kind(&self, collection: CollectionId, configured: String) -> Result<String, StoreError> {
        let read = move |conn: &Connection| -> Result<Option<String>, StoreError> {
            Ok(conn
                .prepare_cached("SELECT token_kind FROM collections WHERE id = ?1")?
                .query_row([collection.0], |row| row.get(0))?)
        };
        if let Some(stored) = self.read(read).await? {
            return Ok(stored);
        }
        self.write(move |tx| {
            tx.conn
                .prepare_cached("UPDATE collections SET token_kind = ?2 WHERE id = ?1 AND token_kind IS NULL")?
                .execute(params![collection.0, configured])?;
            read(tx.conn)?.ok_or(StoreError::Corrupt)
        })
        .await
    }

    async fn canonical_index_from(&self, collection: CollectionId) -> Result<Option<u32>, StoreError> {
        self.read(move |conn| {
            Ok(conn
                .prepare_cached("SELECT canonical_index_from FROM collections WHERE id = ?1")?
                .query_row([collection.0], |row| row.get(0))?)
        })
        .await
    }

    async fn set_canonical_index_from(&self, collection: CollectionId, version: u32) -> Result<u32, StoreError> {
        self.write(move |tx| {
            tx.conn
                .prepare_cached(
                    "UPDATE collections SET canonical_index_from = ?2 WHERE id = ?1 AND canonical_index_from IS NULL",
                )?
                .execute(params![collection.0, version])?;
            tx.conn
                .prepare_cached("SELECT canonical_index_from FROM collections WHERE id = ?1")?
                .query_row([collection.0], |row| row.get(0))
                .map_err(StoreError::from)
        })
        .await
    }

    async fn reserve_sequences(&self, collection: CollectionId, shape: u32, n: u64) -> Result<u64, StoreError> {
        let n = i64::try_from(n).map_err(|_| StoreError::Unsupported("reserve that many sequence numbers"))?;
        self.write(move |tx| {
            let next: i64 = tx
                .conn
                .prepare_cached(
                    "INSERT INTO sequences (collection_id, shape, next) VALUES (?1, ?2, 1 + ?3)
                     ON CONFLICT DO UPDATE SET next = next + ?3 RETURNING next",
                )?
                .query_row(params![collection.0, shape, n], |row| row.get(0))?;
            u64::try_from(next - n).map_err(|_| StoreError::Corrupt)
        })
        .await
    }
}
