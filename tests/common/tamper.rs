//! The one way tests reach below the vault into the SQLite file: to tamper
//! with it (corrupt a ciphertext, forge an audit row, fake an old schema)
//! or to read what is on disk. Everything else goes through the vault.

use std::path::Path;

#[allow(unused_imports)] // each test crate uses what it needs
pub use rusqlite::{Connection, params};

/// The store's file, read-write, as a foreign process would open it.
pub fn open(path: &Path) -> Connection {
    Connection::open(path).expect("open the SQLite file below the vault")
}

/// The store's file, read-only.
pub fn open_read_only(path: &Path) -> Connection {
    Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open the SQLite file below the vault")
}
