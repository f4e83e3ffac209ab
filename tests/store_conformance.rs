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

#[path = "common/tamper.rs"]
mod tamper;

/// SQLite only: a backlog of token-index entries (a trail just migrated,
/// or one written with larger blocks) is sorted into blocks when the store
/// opens, before anything is served, not by the first write.
#[tokio::test]
async fn a_token_index_backlog_is_built_when_the_store_opens() {
    use piivault::store::{AuditFilter, RecordMatch};

    let dir = tempfile::tempdir().unwrap();
    let backend = StoreBackend::Sqlite { path: dir.path().join("vault.db") };
    let open = |block: usize, mode: OpenMode| {
        let settings = StoreSettings { audit_index_block: block, ..StoreSettings::default() };
        piivault::store::open(&backend, &settings, mode, None).unwrap()
    };
    let store = open(1_000, OpenMode::Create);
    let (id, first) = conformance::tokenized_then_read_twice(store.as_ref()).await;
    let blocks = || {
        tamper::open_read_only(&dir.path().join("vault.db"))
            .query_row("SELECT count(*) FROM audit_index_blocks", [], |r| r.get::<_, i64>(0))
            .unwrap()
    };
    assert_eq!(blocks(), 0, "7 entries: no block of 1,000 yet");
    drop(store);
    // Reopened with blocks of 2: records 1 (3 entries), 2 and 3 (2 each).
    let store = open(2, OpenMode::Existing);
    assert_eq!(blocks(), 3);
    assert_eq!(store.check_token_index(None).await.unwrap(), None);
    let filter = AuditFilter { record: RecordMatch::Of(id, first + 1), ..AuditFilter::default() };
    let seqs: Vec<u64> = store.query_audit(filter, 10).await.unwrap().into_iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
}
