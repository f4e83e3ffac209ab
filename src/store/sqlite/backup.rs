//! Online backup with SQLite's backup API, and the check of a copy.

use std::path::{Path, PathBuf};

use rusqlite::Connection;

use super::{APPLICATION_ID, io_error, schema};
use crate::store::{BackupTaken, StoreError};

/// A new, unused name beside the database for a backup file.
pub(super) fn destination(database: &Path) -> Result<PathBuf, StoreError> {
    let mut suffix = [0u8; 8];
    crate::crypto::fill_random(&mut suffix).map_err(|_| StoreError::Backend("no randomness for a file name".into()))?;
    let mut name = database.file_name().map(std::ffi::OsStr::to_os_string).unwrap_or_default();
    name.push(format!(".backup-{}", hex::encode(suffix)));
    Ok(database.with_file_name(name))
}

/// Copies the whole store (read through `conn`, inside its read
/// transaction, so a consistent snapshot while writes go on) into a new
/// file at `dest` (0600, refused if it exists), in one step.
pub(super) fn copy(conn: &Connection, dest: &Path) -> Result<BackupTaken, StoreError> {
    schema::create_private_file(dest)?;
    let mut out = Connection::open(dest)?;
    let backup = rusqlite::backup::Backup::new(conn, &mut out)?;
    match backup.step(-1)? {
        rusqlite::backup::StepResult::Done => {}
        _ => return Err(StoreError::Busy),
    }
    let pages = u64::try_from(backup.progress().pagecount).unwrap_or(0);
    drop(backup);
    out.pragma_update(None, "journal_mode", "DELETE")?;
    let records: i64 =
        out.query_row("SELECT count(*) FROM records WHERE ciphertext IS NOT NULL", [], |row| row.get(0))?;
    drop(out);
    let bytes = std::fs::metadata(dest).map_err(|e| io_error(&e))?.len();
    Ok(BackupTaken { pages, bytes, records: u64::try_from(records).unwrap_or(0) })
}

/// Checks that the file at `path` is a whole piivault store: its
/// application id, and SQLite's `integrity_check`.
pub fn check_backup(path: &Path) -> Result<(), StoreError> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let id: i64 = conn.query_row("PRAGMA application_id", [], |row| row.get(0))?;
    if id != APPLICATION_ID {
        return Err(StoreError::NotAVault);
    }
    let check: String = conn.query_row("PRAGMA integrity_check", [], |row| row.get(0))?;
    if check == "ok" { Ok(()) } else { Err(StoreError::Corrupt) }
}
