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

/// Background-job leases are held by one node at a time, kept by their
/// holder, and given up on release or with the holder's session.
#[tokio::test]
async fn a_background_job_lease_is_one_node_s_until_it_ends() {
    let database = pg::Database::new();
    let open = |node: &str, mode| {
        let backend = StoreBackend::Postgres(database.node(node));
        piivault::store::open(&backend, &StoreSettings::default(), mode, None).unwrap()
    };
    let a = open("a", OpenMode::Create);
    let b = open("b", OpenMode::Existing);
    assert!(a.hold_lease("reencrypt name").await.unwrap());
    assert!(a.hold_lease("reencrypt name").await.unwrap(), "the holder keeps it");
    assert!(!b.hold_lease("reencrypt name").await.unwrap(), "two nodes held one lease");
    // Another job's lease is independent.
    assert!(b.hold_lease("purge").await.unwrap());
    assert!(!a.hold_lease("purge").await.unwrap());

    a.release_lease("reencrypt name").await.unwrap();
    assert!(b.hold_lease("reencrypt name").await.unwrap(), "a released lease was not free");
    assert!(!a.hold_lease("reencrypt name").await.unwrap());

    // A node that stops (its sessions end) gives every lease up.
    drop(b);
    assert!(a.hold_lease("reencrypt name").await.unwrap());
    assert!(a.hold_lease("purge").await.unwrap());
}
