//! Collections and what is recorded about each (token kind, the first
//! canonical index version), and the sequences that place their records.

use async_trait::async_trait;

use super::{PostgresStore, stored_u32, stored_u64};
use crate::crypto::keyring::KeyPurpose;
use crate::store::{CollectionId, CollectionStore, KeyState, StoreError, now_micros};

#[async_trait]
impl CollectionStore for PostgresStore {
    async fn collection_id(&self, name: &str) -> Result<Option<CollectionId>, StoreError> {
        let name = name.to_owned();
        self.read(move |tx| {
            let found = tx.query_opt("SELECT id FROM collections WHERE name = $1", &[&name])?;
            Ok(found.map(|row| row.try_get(0)).transpose()?.map(CollectionId))
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
            let now = now_micros();
            // Another node may create it at the same moment: the unique
            // name decides, and the loser reads the winner's id.
            let created = tx.tx.query_opt(
                "INSERT INTO collections (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING RETURNING id",
                &[&name, &now],
            )?;
            let Some(row) = created else {
                let id: i64 = tx.tx.query_one("SELECT id FROM collections WHERE name = $1", &[&name])?.try_get(0)?;
                return Ok(CollectionId(id));
            };
            let id: i64 = row.try_get(0)?;
            tx.tx.execute(
                "INSERT INTO keys (collection_id, purpose, version, state, wrapped, created_at)
                 VALUES ($1, $2, 1, $3, $4, $5)",
                &[&id, &purpose.as_str(), &KeyState::Primary.as_str(), &wrapped_v1, &now],
            )?;
            Ok(CollectionId(id))
        })
        .await
    }

    async fn token_kind(&self, collection: CollectionId, configured: String) -> Result<String, StoreError> {
        let stored = self
            .read(move |tx| {
                Ok(tx.query_one("SELECT token_kind FROM collections WHERE id = $1", &[&collection.0])?.try_get(0)?)
            })
            .await?;
        if let Some(stored) = stored {
            return Ok(stored);
        }
        self.write(move |tx| {
            // The first node to record it wins; every node reads that.
            Ok(tx
                .tx
                .query_one(
                    "UPDATE collections SET token_kind = coalesce(token_kind, $2) WHERE id = $1 RETURNING token_kind",
                    &[&collection.0, &configured],
                )?
                .try_get(0)?)
        })
        .await
    }

    async fn canonical_index_from(&self, collection: CollectionId) -> Result<Option<u32>, StoreError> {
        self.read(move |tx| {
            let from: Option<i64> = tx
                .query_one("SELECT canonical_index_from FROM collections WHERE id = $1", &[&collection.0])?
                .try_get(0)?;
            from.map(stored_u32).transpose()
        })
        .await
    }

    async fn set_canonical_index_from(&self, collection: CollectionId, version: u32) -> Result<u32, StoreError> {
        self.write(move |tx| {
            let from: i64 = tx
                .tx
                .query_one(
                    "UPDATE collections SET canonical_index_from = coalesce(canonical_index_from, $2)
                     WHERE id = $1 RETURNING canonical_index_from",
                    &[&collection.0, &i64::from(version)],
                )?
                .try_get(0)?;
            stored_u32(from)
        })
        .await
    }

    async fn reserve_sequences(&self, collection: CollectionId, shape: u32, n: u64) -> Result<u64, StoreError> {
        let n = i64::try_from(n).map_err(|_| StoreError::Unsupported("reserve that many sequence numbers"))?;
        self.write(move |tx| {
            // The row lock orders nodes that reserve at once: each gets its
            // own block.
            let next: i64 = tx
                .tx
                .query_one(
                    "INSERT INTO sequences (collection_id, shape, next) VALUES ($1, $2, 1 + $3::bigint)
                     ON CONFLICT (collection_id, shape) DO UPDATE SET next = sequences.next + $3 RETURNING next",
                    &[&collection.0, &i64::from(shape), &n],
                )?
                .try_get(0)?;
            stored_u64(next - n)
        })
        .await
    }
}
