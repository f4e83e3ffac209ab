//! One consistent read of a whole store file, for copying it into another
//! backend (`piivault store copy`): a read transaction, so the vault may
//! serve and write meanwhile, and every table is read as of one moment.

use std::path::Path;

use rusqlite::Connection;
use rusqlite::types::ValueRef;

use super::schema;
use crate::store::StoreError;

/// A stored value, as any backend takes it (no `Debug`: a cell may be a
/// token or a ciphertext).
#[derive(Clone, Copy)]
pub enum Cell<'a> {
    /// No value.
    Null,
    /// An integer column.
    Integer(i64),
    /// A text column (UTF-8).
    Text(&'a str),
    /// A blob column.
    Blob(&'a [u8]),
}

/// A read snapshot of the store at a path.
pub struct Snapshot {
    conn: Connection,
}

impl Snapshot {
    /// Opens the store at `path` read-only and begins the snapshot. The
    /// store must be this build's schema version (a vault opened once by
    /// this piivault is: it migrates).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing);
        }
        let conn = schema::open_reader(path)?;
        let application_id: i64 = conn.query_row("PRAGMA application_id", [], |row| row.get(0))?;
        if application_id != schema::APPLICATION_ID {
            return Err(StoreError::NotAVault);
        }
        let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        if usize::try_from(version).ok() != Some(schema::schema_version()) {
            return Err(StoreError::CannotOpen(format!(
                "the SQLite store is at schema version {version}, not {}: open it once with this piivault (it migrates), then copy",
                schema::schema_version()
            )));
        }
        // A deferred read transaction sees the file as of its first read,
        // whatever the serving vault writes after.
        conn.execute_batch("BEGIN")?;
        Ok(Self { conn })
    }

    /// Calls `each` with every row of `columns` of `table`, in the
    /// snapshot; returns how many rows there were. A text that is not
    /// UTF-8 is damage.
    pub fn rows(
        &self,
        table: &str,
        columns: &str,
        mut each: impl FnMut(&[Cell<'_>]) -> Result<(), StoreError>,
    ) -> Result<u64, StoreError> {
        let mut statement = self.conn.prepare(&format!("SELECT {columns} FROM {table}"))?;
        let width = statement.column_count();
        let mut rows = statement.query([])?;
        let mut n = 0u64;
        while let Some(row) = rows.next()? {
            let cells = (0..width)
                .map(|i| {
                    Ok(match row.get_ref(i)? {
                        ValueRef::Null => Cell::Null,
                        ValueRef::Integer(v) => Cell::Integer(v),
                        ValueRef::Text(text) => Cell::Text(std::str::from_utf8(text).map_err(|_| StoreError::Corrupt)?),
                        ValueRef::Blob(bytes) => Cell::Blob(bytes),
                        ValueRef::Real(_) => return Err(StoreError::Corrupt),
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            each(&cells)?;
            n += 1;
        }
        Ok(n)
    }

    /// Ends the snapshot.
    pub fn end(self) -> Result<(), StoreError> {
        self.conn.execute_batch("COMMIT")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::store::sqlite::{Options, SqliteStore};
    use crate::store::{CollectionStore as _, OpenMode};

    #[tokio::test]
    async fn a_snapshot_reads_a_store_and_refuses_other_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(Snapshot::open(&dir.path().join("none.db")), Err(StoreError::Missing)));

        let other = dir.path().join("other.db");
        Connection::open(&other).unwrap().execute_batch("CREATE TABLE t (x INTEGER)").unwrap();
        assert!(matches!(Snapshot::open(&other), Err(StoreError::NotAVault)));

        let path = dir.path().join("vault.db");
        let options = Options { read_connections: 1, max_group_commit: 8, audit_index_block: 16, sink: None };
        let store = SqliteStore::open(&path, OpenMode::Create, options).unwrap();
        let id = store.create_collection("c", crate::crypto::keyring::KeyPurpose::Data, b"w".to_vec()).await.unwrap();
        let snapshot = Snapshot::open(&path).unwrap();
        let mut seen = Vec::new();
        let n = snapshot
            .rows("collections", "id, name, token_kind", |cells| {
                match cells {
                    [Cell::Integer(i), Cell::Text(name), Cell::Null] => seen.push((*i, (*name).to_owned())),
                    _ => return Err(StoreError::Corrupt),
                }
                Ok(())
            })
            .unwrap();
        assert_eq!((n, seen), (1, vec![(id.0, "c".to_owned())]));
        snapshot.end().unwrap();
    }
}
