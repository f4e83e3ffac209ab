//! Creating and migrating the schema, under an advisory lock so that nodes
//! starting together apply each migration once.

use crate::store::{OpenMode, StoreError};

/// The schema, one entry per file in `migrations/postgres/`, in order. The
/// position of the last one is the version recorded in `piivault_schema`.
const MIGRATIONS: [&str; 6] = [
    include_str!("../../../migrations/postgres/0001_init.sql"),
    include_str!("../../../migrations/postgres/0002_quota_use.sql"),
    include_str!("../../../migrations/postgres/0003_key_notify.sql"),
    include_str!("../../../migrations/postgres/0004_write_path_keys.sql"),
    include_str!("../../../migrations/postgres/0005_audit_index_blocks.sql"),
    include_str!("../../../migrations/postgres/0006_key_counts.sql"),
];

/// The transaction-level advisory lock every node takes to read and
/// migrate the schema ("PIVV" and "schm").
const SCHEMA_LOCK: i64 = 0x5049_5656_7363_686d;

/// The schema version this build writes.
pub fn schema_version() -> usize {
    MIGRATIONS.len()
}

/// Checks that the database is a piivault store of a version this build
/// reads and migrates it, or (with [`OpenMode::Create`]) makes an empty
/// database one. One transaction: a migration that fails leaves nothing.
pub(super) fn migrate(conn: &mut postgres::Client, mode: OpenMode) -> Result<(), StoreError> {
    let mut tx = conn.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
    let marked: bool = tx.query_one("SELECT to_regclass('piivault_schema') IS NOT NULL", &[])?.try_get(0)?;
    let current = if marked {
        if mode == OpenMode::Create {
            return Err(StoreError::AlreadyExists);
        }
        let row =
            tx.query_opt("SELECT application, version FROM piivault_schema", &[])?.ok_or(StoreError::NotAVault)?;
        if row.try_get::<_, String>(0)? != "piivault" {
            return Err(StoreError::NotAVault);
        }
        usize::try_from(row.try_get::<_, i64>(1)?).map_err(|_| StoreError::NotAVault)?
    } else {
        // Only an empty database becomes a store, and only for `init`.
        let tables: i64 = tx
            .query_one("SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname = current_schema()", &[])?
            .try_get(0)?;
        if tables > 0 {
            return Err(StoreError::NotAVault);
        }
        if mode == OpenMode::Existing {
            return Err(StoreError::Missing);
        }
        tx.batch_execute(
            "CREATE TABLE piivault_schema (application TEXT NOT NULL, version BIGINT NOT NULL);
             INSERT INTO piivault_schema (application, version) VALUES ('piivault', 0);",
        )?;
        0
    };
    if current > schema_version() {
        return Err(StoreError::TooNew { supported: schema_version() });
    }
    if current == schema_version() {
        return Ok(());
    }
    for sql in &MIGRATIONS[current..] {
        tx.batch_execute(sql)?;
    }
    let version = i64::try_from(schema_version()).map_err(|_| StoreError::Corrupt)?;
    tx.execute("UPDATE piivault_schema SET version = $1", &[&version])?;
    tx.commit()?;
    tracing::info!(from = current, to = schema_version(), "store: database schema migrated");
    Ok(())
}
