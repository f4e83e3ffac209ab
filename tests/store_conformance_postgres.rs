//! The store conformance suite (tests/conformance) against the PostgreSQL
//! backend: a real server (scripts/test-postgres), a database per check,
//! through `store::open` as the vault opens it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod conformance;
#[path = "common/postgres.rs"]
mod pg;

use piivault::config::{StoreBackend, StoreSettings};
use piivault::store::OpenMode;

fn postgres() -> conformance::Fresh {
    let database = pg::Database::new();
    let backend = StoreBackend::Postgres(database.settings.clone());
    let store = piivault::store::open(&backend, &StoreSettings::default(), OpenMode::Create, None).unwrap();
    conformance::Fresh { store, keep: Box::new(database) }
}

conformance_suite!(postgres);
