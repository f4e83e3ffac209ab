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

/// The store of node `node` on `database`.
fn open_node(database: &pg::Database, node: &str, mode: OpenMode) -> std::sync::Arc<dyn piivault::store::Store> {
    let backend = StoreBackend::Postgres(database.node(node));
    piivault::store::open(&backend, &StoreSettings::default(), mode, None).unwrap()
}

/// Background-job leases are held by one node at a time, kept by their
/// holder, and given up on release or with the holder's session.
#[tokio::test]
async fn a_background_job_lease_is_one_node_s_until_it_ends() {
    let database = pg::Database::new();
    let open = |node: &str, mode| open_node(&database, node, mode);
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

/// Quota use: each node adds its own and reads the others' sums, never its
/// own; minutes before the window asked are not answered.
#[tokio::test]
async fn quota_use_is_summed_across_the_other_nodes() {
    use piivault::store::QuotaUse;
    let database = pg::Database::new();
    let open = |node: &str, mode| open_node(&database, node, mode);
    let (a, b, c) = (open("a", OpenMode::Create), open("b", OpenMode::Existing), open("c", OpenMode::Existing));
    let now = i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs())
        .unwrap()
        / 60;
    let used = |caller: &str, minute, used| QuotaUse { caller: caller.into(), kind: 0, minute, used };
    assert_eq!(a.share_quota_use(vec![used("x", now, 5), used("x", now - 90, 7)], now - 60).await.unwrap(), []);
    assert_eq!(b.share_quota_use(vec![used("x", now, 3)], now - 60).await.unwrap(), [used("x", now, 5)]);
    // Added to, not replaced; c sees a's and b's summed, a sees b's only.
    assert_eq!(a.share_quota_use(vec![used("x", now, 1)], now - 60).await.unwrap(), [used("x", now, 3)]);
    assert_eq!(c.share_quota_use(Vec::new(), now - 60).await.unwrap(), [used("x", now, 9)]);
    let mut longer = c.share_quota_use(Vec::new(), now - 120).await.unwrap();
    longer.sort_by_key(|u| u.minute);
    assert_eq!(longer, [used("x", now - 90, 7), used("x", now, 9)]);
}

/// A reader connection the server ended while it was idle (a restart, a
/// failover, an administrator) costs no read an error: the read that finds
/// it lost runs again on a new connection.
#[tokio::test]
async fn a_read_on_a_connection_the_server_ended_runs_again() {
    use piivault::audit::Head;
    let database = pg::Database::new();
    let store = open_node(&database, "a", OpenMode::Create);
    // Reads at once, so that every reader thread has its connection.
    let mut reads = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let store = store.clone();
        reads.spawn(async move { store.audit_head().await.unwrap() });
    }
    assert_eq!(reads.join_all().await, vec![Head::GENESIS; 64]);
    pg::admin(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}' AND pid <> pg_backend_pid()",
        database.name
    ));
    for _ in 0..64 {
        assert_eq!(store.audit_head().await.unwrap(), Head::GENESIS);
    }
}

/// A store made by an earlier release (schema version 3) is migrated when
/// a node opens it: the write path's per-row foreign keys go (migration 4),
/// and the store keeps what it held.
#[tokio::test]
async fn a_version_3_store_is_migrated_at_open() {
    let database = pg::Database::new();
    let earlier = [
        include_str!("../migrations/postgres/0001_init.sql"),
        include_str!("../migrations/postgres/0002_quota_use.sql"),
        include_str!("../migrations/postgres/0003_key_notify.sql"),
    ];
    database.sql(&format!(
        "CREATE TABLE piivault_schema (application TEXT NOT NULL, version BIGINT NOT NULL);
         INSERT INTO piivault_schema VALUES ('piivault', 3);
         {}
         INSERT INTO collections (name, created_at) VALUES ('kept', 1);",
        earlier.join("\n")
    ));
    let keys = "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND conrelid IN ('records'::regclass, 'audit_records'::regclass)";
    assert_eq!(database.sql(keys), [[Some("3".to_owned())]]);
    let store = open_node(&database, "a", OpenMode::Existing);
    assert_eq!(database.sql("SELECT version FROM piivault_schema"), [[Some("4".to_owned())]]);
    assert_eq!(database.sql(keys), [[Some("0".to_owned())]]);
    assert_eq!(database.sql("SELECT name FROM collections"), [[Some("kept".to_owned())]]);
    drop(store);
}
