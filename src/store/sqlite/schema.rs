//! Opening a database file: identity checks, pragmas and migrations.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use rusqlite_migration::{M, MigrationDefinitionError, Migrations};

use super::io_error;
use crate::store::{OpenMode, StoreError};

/// `PRAGMA application_id` of a piivault store: "PIVV".
pub const APPLICATION_ID: i64 = 0x5049_5656;

/// How long a connection waits on a lock held by another process.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema, one entry per file in `migrations/`, in order. The position
/// of the last one is the schema version recorded in `user_version`.
const MIGRATIONS: [&str; 6] = [
    include_str!("../../../migrations/0001_init.sql"),
    include_str!("../../../migrations/0002_audit.sql"),
    include_str!("../../../migrations/0003_key_lifecycle.sql"),
    include_str!("../../../migrations/0004_collections.sql"),
    include_str!("../../../migrations/0005_canonical_tokens.sql"),
    include_str!("../../../migrations/0006_sequenced_records.sql"),
];

/// The version whose migration also runs [`fill_legacy_tokens`].
const CANONICAL_TOKENS_VERSION: usize = 5;

fn migrations() -> Migrations<'static> {
    Migrations::new(
        MIGRATIONS
            .iter()
            .enumerate()
            .map(
                |(i, sql)| {
                    if i + 1 == CANONICAL_TOKENS_VERSION {
                        M::up_with_hook(sql, fill_legacy_tokens)
                    } else {
                        M::up(sql)
                    }
                },
            )
            .collect(),
    )
}

/// Part of migration 5, in its transaction: lists every shaped token issued
/// before it whose writing has separators under its canonical form (see
/// `migrations/0005_canonical_tokens.sql`).
fn fill_legacy_tokens(tx: &rusqlite::Transaction<'_>) -> rusqlite_migration::HookResult {
    let mut select = tx.prepare(
        "SELECT r.collection_id, r.token FROM records r JOIN collections c ON c.id = r.collection_id
         WHERE c.token_kind IN ('digits', 'alphanumeric') OR c.token_kind LIKE 'card:%'",
    )?;
    let mut insert = tx.prepare(
        "INSERT INTO legacy_tokens (collection_id, canonical, token) VALUES (?1, ?2, ?3)
         ON CONFLICT (collection_id, canonical) DO UPDATE SET token = NULL",
    )?;
    // A legacy writing whose canonical form is itself an issued token is
    // ambiguous too: the form stays taken, only exact writings answer.
    let mut issued = tx.prepare("SELECT 1 FROM records WHERE collection_id = ?1 AND token = ?2")?;
    let mut rows = select.query([])?;
    while let Some(row) = rows.next()? {
        let collection: i64 = row.get(0)?;
        let token: String = row.get(1)?;
        if token.bytes().all(|b| b.is_ascii_alphanumeric()) {
            continue;
        }
        let canonical = crate::format::alnum_only(&token);
        let holder = if issued.exists(rusqlite::params![collection, canonical])? { None } else { Some(&token) };
        insert.execute(rusqlite::params![collection, canonical, holder])?;
    }
    Ok(())
}

/// The schema version this build writes.
pub fn schema_version() -> usize {
    MIGRATIONS.len()
}

/// Opens the write connection: creates the file if asked, checks that it is
/// a piivault store of a version this build reads, migrates it, and sets
/// the durability pragmas.
pub(super) fn open_writer(path: &Path, mode: OpenMode) -> Result<Connection, StoreError> {
    match mode {
        OpenMode::Create => create_private_file(path)?,
        OpenMode::Existing => {
            if !path.exists() {
                return Err(StoreError::Missing);
            }
        }
    }
    let mut conn =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(StoreError::from)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // SQLite quietly falls back to read-only when the file or its directory
    // is not writable; a vault that cannot write must not start.
    if conn.is_readonly(rusqlite::MAIN_DB)? {
        return Err(StoreError::ReadOnly);
    }
    check_identity(&conn, mode)?;
    // journal_mode answers with a row, and only takes effect outside a
    // transaction; it must be WAL before anything else is written.
    let journal: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if !journal.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Backend(format!("could not switch to WAL mode (got {journal})")));
    }
    apply_pragmas(&conn)?;
    migrations().to_latest(&mut conn).map_err(|e| match e {
        rusqlite_migration::Error::MigrationDefinition(MigrationDefinitionError::DatabaseTooFarAhead) => {
            StoreError::TooNew { supported: schema_version() }
        }
        rusqlite_migration::Error::RusqliteError { err, .. } => StoreError::from(err),
        other => StoreError::Backend(other.to_string()),
    })?;
    Ok(conn)
}

/// Creates an empty file at `path`, 0600, refusing one that exists: SQLite's
/// -wal and -shm files copy the database file's mode, so they are private
/// too.
pub(super) fn create_private_file(path: &Path) -> Result<(), StoreError> {
    crate::datadir::create_private_empty_file(path).map_err(|e| io_error(&e))
}

/// Opens a read-only connection to a store the writer has already opened.
pub(super) fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    apply_pragmas(&conn)?;
    conn.pragma_update(None, "query_only", true)?;
    Ok(conn)
}

fn apply_pragmas(conn: &Connection) -> Result<(), StoreError> {
    // Acknowledged means durable: every commit reaches the disk.
    conn.pragma_update(None, "synchronous", "FULL")?;
    // Deleted ciphertext is overwritten with zeros, not left in free pages.
    conn.pragma_update(None, "secure_delete", true)?;
    conn.pragma_update(None, "foreign_keys", true)?;
    // Negative: KiB. The default (2 MiB) holds a few thousand records' pages;
    // random tokens touch random pages, so a larger cache saves a read per
    // insert and lookup once the tables outgrow it.
    conn.pragma_update(None, "cache_size", -32_768)?;
    // Savepoints journal the pages they change; in memory, not a temp file.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

/// Refuses a file that is not SQLite, an SQLite database of another
/// application, or a store written by a newer piivault.
fn check_identity(conn: &Connection, mode: OpenMode) -> Result<(), StoreError> {
    let application_id: i64 = conn.query_row("PRAGMA application_id", [], |row| row.get(0))?;
    let user_version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let tables: i64 = conn.query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))?;
    if user_version == 0 {
        // Never migrated: acceptable only as the empty file `init` just made.
        return if mode == OpenMode::Create && tables == 0 && application_id == 0 {
            Ok(())
        } else {
            Err(StoreError::NotAVault)
        };
    }
    if application_id != APPLICATION_ID {
        return Err(StoreError::NotAVault);
    }
    if usize::try_from(user_version).map_or(true, |v| v > schema_version()) {
        return Err(StoreError::TooNew { supported: schema_version() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_valid() {
        migrations().validate().unwrap();
    }

    #[test]
    fn schema_version_matches_migrations() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        let conn = open_writer(&path, OpenMode::Create).unwrap();
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(usize::try_from(version).unwrap(), schema_version());
        let id: i64 = conn.query_row("PRAGMA application_id", [], |r| r.get(0)).unwrap();
        assert_eq!(id, APPLICATION_ID);
        let journal: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(journal, "wal");
        let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!(sync, 2, "synchronous must be FULL");
        let secure: i64 = conn.query_row("PRAGMA secure_delete", [], |r| r.get(0)).unwrap();
        assert_eq!(secure, 1);
    }
}
