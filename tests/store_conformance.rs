//! The store conformance suite (tests/conformance) against the SQLite
//! backend: a real file on disk, through `store::open` as the vault opens it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod conformance;

use piivault::config::{StoreBackend, StoreSettings};
use piivault::store::OpenMode;

fn sqlite() -> conformance::Fresh {
    let dir = tempfile::tempdir().unwrap();
    let backend = StoreBackend::Sqlite { path: dir.path().join("vault.db") };
    // Blocks of three token-index entries, so that the checks cross them.
    let settings = StoreSettings { audit_index_block: 3, ..StoreSettings::default() };
    let store = piivault::store::open(&backend, &settings, OpenMode::Create, None).unwrap();
    conformance::Fresh { store, keep: Box::new(dir) }
}

conformance_suite!(sqlite);
