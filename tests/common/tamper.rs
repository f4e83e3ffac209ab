//! The one way tests reach below the vault into the SQLite file: to tamper
//! with it (corrupt a ciphertext, forge an audit row, fake an old schema)
//! or to read what is on disk. Everything else goes through the vault.

use std::path::Path;

#[allow(unused_imports)] // each test crate uses what it needs
pub use rusqlite::{Connection, params};

/// The store's file, read-write, as a foreign process would open it.
#[allow(dead_code)] // each test crate uses what it needs
pub fn open(path: &Path) -> Connection {
    Connection::open(path).expect("open the SQLite file below the vault")
}

/// `(collection id, sequence number)` of the `n`-th record (from 0, in the
/// order records were added) of collection `name`: how a test finds the
/// row of a token the vault sealed (its text is not stored).
#[allow(dead_code)] // each test crate uses what it needs
pub fn nth_record(conn: &Connection, name: &str, n: i64) -> (i64, i64) {
    conn.query_row(
        "SELECT r.collection_id, r.seq FROM records r JOIN collections c ON c.id = r.collection_id
         WHERE c.name = ?1 ORDER BY r.seq LIMIT 1 OFFSET ?2",
        params![name, n],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )
    .expect("the collection has that many records")
}

/// The store's file, read-only.
pub fn open_read_only(path: &Path) -> Connection {
    Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open the SQLite file below the vault")
}
