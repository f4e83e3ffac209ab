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
    // Blocks of three token-index entries, so that the checks may cross
    // them (built behind the writes: how many are built when a check runs
    // varies, and every answer must be the same either way).
    let settings = StoreSettings { audit_index_block: 3, ..StoreSettings::default() };
    let store = piivault::store::open(&backend, &settings, OpenMode::Create, None).unwrap();
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
/// a node opens it: the write path's per-row foreign keys go (migration
/// 4), the audit index entries become one row per audit record and
/// collection (migration 5), key counts are added to per node (migration
/// 6), and the store keeps what it held.
#[tokio::test]
async fn a_version_3_store_is_migrated_at_open() {
    use piivault::store::{AuditFilter, CollectionId, RecordMatch};
    let database = pg::Database::new();
    let earlier = [
        include_str!("../migrations/postgres/0001_init.sql"),
        include_str!("../migrations/postgres/0002_quota_use.sql"),
        include_str!("../migrations/postgres/0003_key_notify.sql"),
    ];
    // Audit record 1 involves records 5 and 7, record 2 involves 7.
    let mac = format!("'\\x{}'", "00".repeat(32));
    database.sql(&format!(
        "CREATE TABLE piivault_schema (application TEXT NOT NULL, version BIGINT NOT NULL);
         INSERT INTO piivault_schema VALUES ('piivault', 3);
         {}
         INSERT INTO collections (name, created_at) VALUES ('kept', 1);
         INSERT INTO keys (collection_id, purpose, version, state, wrapped, created_at, encryptions, live)
         VALUES (1, 'data', 1, 'primary', '\\x01', 1, 5, 4);
         INSERT INTO audit_chains VALUES ('a', 1);
         INSERT INTO audit (chain, seq, at, caller, action, collection, outcome, record, mac)
         VALUES ('a', 1, 1, 'c', 'detokenize', 'kept', 'OK', '', {mac}),
                ('a', 2, 1, 'c', 'detokenize', 'kept', 'OK', '', {mac});
         INSERT INTO audit_records VALUES ('a', 1, 1, 7), ('a', 1, 1, 5), ('a', 2, 1, 7);",
        earlier.join("\n")
    ));
    let keys = "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND conrelid IN ('records'::regclass, 'audit_records'::regclass)";
    assert_eq!(database.sql(keys), [[Some("3".to_owned())]]);
    let store = open_node(&database, "a", OpenMode::Existing);
    assert_eq!(database.sql("SELECT version FROM piivault_schema"), [[Some("6".to_owned())]]);
    assert_eq!(database.sql("SELECT to_regclass('audit_records') IS NULL"), [[Some("t".to_owned())]]);
    assert_eq!(
        database.sql("SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND conrelid IN ('records'::regclass, 'audit_entries'::regclass)"),
        [[Some("0".to_owned())]]
    );
    assert_eq!(
        database.sql("SELECT audit_seq, record_seqs::text FROM audit_entries ORDER BY audit_seq"),
        [[Some("1".to_owned()), Some("{5,7}".to_owned())], [Some("2".to_owned()), Some("{7}".to_owned())]]
    );
    assert_eq!(database.sql("SELECT name FROM collections"), [[Some("kept".to_owned())]]);
    let saw = |record| AuditFilter { record: RecordMatch::Of(CollectionId(1), record), ..AuditFilter::default() };
    let seqs = |rows: Vec<piivault::store::AuditRow>| rows.into_iter().map(|r| r.seq).collect::<Vec<_>>();
    assert_eq!(seqs(store.query_audit(saw(7), 10).await.unwrap()), [1, 2]);
    assert_eq!(seqs(store.query_audit(saw(5), 10).await.unwrap()), [1]);
    assert_eq!(seqs(store.query_audit(saw(6), 10).await.unwrap()), Vec::<u64>::new());
    // The counts kept before are the version's counts still.
    let keys = store.list_keys(CollectionId(1), piivault::crypto::keyring::KeyPurpose::Data).await.unwrap();
    assert_eq!((keys[0].records, keys[0].encryptions), (4, 5));
    drop(store);
}

/// The token index of each chain is sorted into blocks behind the writes,
/// by its node's indexer: queries find entries in blocks and after them,
/// and the check finds a block that disagrees with its entries, asked
/// through any node.
#[tokio::test]
async fn the_token_index_is_built_behind_the_writes_and_checked() {
    use piivault::store::{AuditFilter, RecordMatch};

    let database = pg::Database::new();
    let open = |node: &str, block: usize, mode| {
        let settings = StoreSettings { audit_index_block: block, ..StoreSettings::default() };
        piivault::store::open(&StoreBackend::Postgres(database.node(node)), &settings, mode, None).unwrap()
    };
    let store = open("a", 2, OpenMode::Create);
    let (id, first) = conformance::tokenized_then_read_twice(store.as_ref()).await;
    // Blocks of 2: audit records 1 (3 entries), 2 and 3 (2 each).
    let blocks = || database.sql("SELECT last_audit_seq, entries FROM audit_index_blocks ORDER BY block");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while blocks().len() < 3 {
        assert!(std::time::Instant::now() < deadline, "the indexer built {:?} in 20 s", blocks());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let n = |s: &str| Some(s.to_owned());
    assert_eq!(blocks(), [[n("1"), n("3")], [n("2"), n("2")], [n("3"), n("2")]]);
    // One more read, of one entry: it waits after the last block.
    let mut read = conformance::audit("detokenize");
    read.tokens = vec!["t0".into()];
    assert_eq!(store.append_read_audit(id, vec![first], read).await.unwrap(), 4);
    let seqs = |seq: u64| {
        let store = store.clone();
        async move {
            let filter = AuditFilter { record: RecordMatch::Of(id, seq), ..AuditFilter::default() };
            store.query_audit(filter, 10).await.unwrap().into_iter().map(|r| r.seq).collect::<Vec<_>>()
        }
    };
    assert_eq!(seqs(first).await, [1, 2, 3, 4]);
    assert_eq!(seqs(first + 1).await, [1, 2, 3]);
    assert_eq!(seqs(first + 2).await, [1]);
    assert_eq!(blocks().len(), 3, "one entry waiting is not a block of 2");
    assert_eq!(store.check_token_index(None).await.unwrap(), None);

    // A block that holds an entry its range does not is found (block 3,
    // from audit record 3 on) ...
    let nth_block = |n: usize| format!("(SELECT block FROM audit_index_blocks ORDER BY block OFFSET {n} LIMIT 1)");
    database.sql(&format!(
        "INSERT INTO audit_index SELECT block, collection_id, 1000, '{{1000}}', '{{3}}' FROM audit_index WHERE block = {}",
        nth_block(2)
    ));
    assert_eq!(store.check_token_index(None).await.unwrap(), Some(3));
    // ... and one whose chunk says it ends before its last record (block
    // 2): a query would not look there for that record.
    database.sql(&format!(
        "ALTER TABLE audit_index DISABLE TRIGGER audit_index_append_only;
         UPDATE audit_index SET last_record_seq = last_record_seq - 1 WHERE block = {};",
        nth_block(1)
    ));
    assert_eq!(store.check_token_index(None).await.unwrap(), Some(2));
    let other = open("b", 2, OpenMode::Existing);
    assert_eq!(other.check_token_index(Some("a".into())).await.unwrap(), Some(2));
    assert_eq!(other.check_token_index(None).await.unwrap(), None, "b's own chain has no block");
}

/// A session of the test's own that holds every data-key row of the
/// database (`FOR UPDATE`, or another lock: [`KeyRowsHeld::locking`])
/// until it is dropped. Held for update: a batch that counts its
/// records under a version waits for it, and the writer with it, so that
/// the requests sent meanwhile queue up for one group commit.
struct KeyRowsHeld {
    release: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KeyRowsHeld {
    fn new(database: &pg::Database) -> Self {
        Self::locking(database, "FOR UPDATE", "")
    }

    /// Holds every data-key row with `lock` until dropped, and runs `last`
    /// in the same transaction just before it commits.
    fn locking(database: &pg::Database, lock: &'static str, last: &'static str) -> Self {
        let url = database.settings.url.clone();
        let (locked_tx, locked) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let mut config: postgres::Config = url.parse().unwrap();
            config.password(std::env::var(pg::PASSWORD_VAR).unwrap());
            let mut client = config.connect(postgres::NoTls).unwrap();
            let mut tx = client.transaction().unwrap();
            tx.batch_execute(&format!("SELECT 1 FROM keys WHERE purpose = 'data' {lock}")).unwrap();
            locked_tx.send(()).unwrap();
            let _ = released.recv();
            tx.batch_execute(last).unwrap();
            tx.commit().unwrap();
        });
        locked.recv().unwrap();
        Self { release: Some(release), thread: Some(thread) }
    }

    /// Waits until a session of `database` waits for this one's lock.
    async fn until_waited_for(&self, database: &pg::Database) {
        for _ in 0..500 {
            let waiting = database.sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
            );
            if waiting == [[Some("1".to_owned())]] {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("the writer never waited for the held key rows");
    }
}

impl Drop for KeyRowsHeld {
    fn drop(&mut self) {
        drop(self.release.take());
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

/// How many transactions wrote the audit records after `after`.
fn audit_transactions(database: &pg::Database, after: u64) -> String {
    let rows = database.sql(&format!("SELECT count(DISTINCT xmin::text) FROM audit WHERE seq > {after}"));
    rows[0][0].clone().unwrap()
}

/// What a queued request answered.
#[derive(Debug)]
enum Answer {
    Tokenized(Result<Vec<piivault::store::InsertOutcome>, piivault::store::StoreError>),
    Read(Result<u64, piivault::store::StoreError>),
}

/// A request to queue: a tokenize of `(token, key version)`s, or a read of
/// the record at a place (its audit record).
enum Request {
    Tokenize(Vec<(&'static str, u32)>),
    Read(u64, &'static str),
}

/// Tells the held requests of [`queued`] apart.
static HELD: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Sends `requests` to `store`'s writer while it waits (on [`KeyRowsHeld`])
/// with a tokenize of its own, so that they queue up for the group commit
/// after that one; returns their answers in their order.
async fn queued(
    database: &pg::Database,
    store: &std::sync::Arc<dyn piivault::store::Store>,
    id: piivault::store::CollectionId,
    requests: Vec<Request>,
) -> Vec<Answer> {
    let held = KeyRowsHeld::new(database);
    let waiting = {
        let store = store.clone();
        let token = format!("held-{}", HELD.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let record = conformance::record(&token, 1, b"held");
        tokio::spawn(async move {
            store.insert_records(id, vec![record], conformance::audit("tokenize"), conformance::render()).await
        })
    };
    held.until_waited_for(database).await;
    let mut sent = Vec::new();
    for request in requests {
        let store = store.clone();
        sent.push(tokio::spawn(async move {
            match request {
                Request::Tokenize(records) => {
                    let records = records.into_iter().map(|(t, v)| conformance::record(t, v, t.as_bytes())).collect();
                    let audit = conformance::audit("tokenize");
                    Answer::Tokenized(store.insert_records(id, records, audit, conformance::render()).await)
                }
                Request::Read(seq, token) => {
                    let mut audit = conformance::audit("detokenize");
                    audit.tokens = vec![token.to_owned()];
                    Answer::Read(store.append_read_audit(id, vec![seq], audit).await)
                }
            }
        }));
    }
    // Each request is on the writer's queue once its task first ran.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    drop(held);
    assert_eq!(waiting.await.unwrap().unwrap(), [piivault::store::InsertOutcome::Inserted]);
    let mut answers = Vec::new();
    for task in sent {
        answers.push(task.await.unwrap());
    }
    answers
}

/// The (action, tokens) of the last `n` audit records, sorted (a group
/// commit's requests are in the trail in any order).
async fn last_listed(store: &dyn piivault::store::Store, n: usize) -> Vec<(String, Vec<String>)> {
    let rows = conformance::chain(store).await;
    let mut listed: Vec<_> = rows[rows.len() - n..].iter().map(|(_, r)| (r.action.clone(), r.tokens.clone())).collect();
    listed.sort();
    listed
}

fn listed(action: &str, tokens: &[&str]) -> (String, Vec<String>) {
    (action.to_owned(), tokens.iter().map(|&t| t.to_owned()).collect())
}

/// A node's store on `database`, ready (see `conformance::ready`), with
/// one record, `token`, stored: the store, the collection and the record's
/// place.
async fn with_a_token(
    database: &pg::Database,
    token: &str,
    ciphertext: &[u8],
) -> (std::sync::Arc<dyn piivault::store::Store>, piivault::store::CollectionId, u64) {
    let store = open_node(database, "main", OpenMode::Create);
    let fresh = conformance::Fresh { store: store.clone(), keep: Box::new(()) };
    let id = conformance::ready(&fresh).await;
    let record = conformance::record(token, 1, ciphertext);
    let seq = record.at.seq;
    let stored = store.insert_records(id, vec![record], conformance::audit("tokenize"), conformance::render()).await;
    assert_eq!(stored.unwrap(), [piivault::store::InsertOutcome::Inserted]);
    (store, id, seq)
}

/// Writes that append (tokenizes of a collection without a blind index,
/// reads' audit records) queued together go in with one statement, in one
/// transaction, each audit record chained in order and indexed under its
/// records; each request answers as if it had gone alone.
#[tokio::test]
async fn writes_queued_together_go_in_together() {
    use piivault::store::{AuditFilter, InsertOutcome, RecordMatch};
    let database = pg::Database::new();
    let (store, id, seen) = with_a_token(&database, "j0", b"j0").await;
    let tokenized_j0 = store.audit_head().await.unwrap().seq;

    let answers = queued(
        &database,
        &store,
        id,
        vec![
            Request::Tokenize(vec![("j1", 1), ("j2", 1)]),
            Request::Read(seen, "j0"),
            Request::Tokenize(vec![("j3", 1)]),
        ],
    )
    .await;
    let [Answer::Tokenized(Ok(two)), Answer::Read(Ok(read_seq)), Answer::Tokenized(Ok(one))] = &answers[..] else {
        panic!("{answers:?}");
    };
    assert_eq!((two, one), (&vec![InsertOutcome::Inserted, InsertOutcome::Inserted], &vec![InsertOutcome::Inserted]));
    // The held request's audit record, then the three queued ones.
    assert_eq!(audit_transactions(&database, tokenized_j0 + 1), "1", "the queued writes were not committed together");
    assert_eq!(
        last_listed(store.as_ref(), 3).await,
        [listed("detokenize", &["j0"]), listed("tokenize", &["j1", "j2"]), listed("tokenize", &["j3"])]
    );
    assert_eq!(
        conformance::read(store.as_ref(), id, &["j1", "j2", "j3"]).await,
        [Some(b"j1".to_vec()), Some(b"j2".to_vec()), Some(b"j3".to_vec())]
    );
    // The read is indexed under the record it read.
    let filter = AuditFilter { record: RecordMatch::Of(id, seen), ..AuditFilter::default() };
    let saw: Vec<u64> = store.query_audit(filter, 10).await.unwrap().iter().map(|r| r.seq).collect();
    assert_eq!(saw, [tokenized_j0, *read_seq]);
    let keys = store.list_keys(id, piivault::crypto::keyring::KeyPurpose::Data).await.unwrap();
    assert_eq!((keys[0].records, keys[0].encryptions), (5, 5), "each record counted once");
}

/// A queued write that cannot go in whole (a token taken, a key version out
/// of use) sends its group commit back to run request by request: only it
/// fails or reports its collision, and the others go in as they would
/// alone.
#[tokio::test]
async fn a_queued_write_that_cannot_go_in_fails_alone() {
    use piivault::store::{InsertOutcome, StoreError};
    let database = pg::Database::new();
    let (store, id, seen) = with_a_token(&database, "taken", b"first").await;

    // Queued as the joined requests of the check above are (each request
    // runs in a savepoint of its own then, so their rows' transaction ids
    // differ and cannot show it; the count of refusals does). A token taken:
    let refusals = || piivault::metrics::metrics().joined_writes_refused.get();
    let before = refusals();
    let answers = queued(
        &database,
        &store,
        id,
        vec![
            Request::Tokenize(vec![("k1", 1)]),
            Request::Tokenize(vec![("k2", 1), ("taken", 1), ("k3", 1)]),
            Request::Read(seen, "taken"),
            Request::Tokenize(vec![("k4", 1)]),
        ],
    )
    .await;
    let [Answer::Tokenized(Ok(k1)), Answer::Tokenized(Ok(collided)), Answer::Read(Ok(_)), Answer::Tokenized(Ok(k4))] =
        &answers[..]
    else {
        panic!("{answers:?}");
    };
    assert_eq!((k1, k4), (&vec![InsertOutcome::Inserted], &vec![InsertOutcome::Inserted]));
    assert_eq!(collided, &[InsertOutcome::Inserted, InsertOutcome::Collision, InsertOutcome::Inserted]);
    assert_eq!(
        last_listed(store.as_ref(), 4).await,
        [
            listed("detokenize", &["taken"]),
            listed("tokenize", &["k1"]),
            listed("tokenize", &["k2", "k3"]),
            listed("tokenize", &["k4"])
        ]
    );
    // (At least: under `cargo test` other checks of this process count
    // theirs too; nextest runs each check in a process of its own.)
    assert!(refusals() > before, "the joined writes were not refused");
    let before = refusals();
    // A key version out of use:
    let answers = queued(
        &database,
        &store,
        id,
        vec![Request::Tokenize(vec![("k5", 1), ("k6", 9)]), Request::Tokenize(vec![("k7", 1)])],
    )
    .await;
    let [Answer::Tokenized(Err(StoreError::Conflict)), Answer::Tokenized(Ok(k7))] = &answers[..] else {
        panic!("{answers:?}");
    };
    assert_eq!(k7, &[InsertOutcome::Inserted]);
    assert!(refusals() > before, "the joined writes were not refused");
    assert_eq!(last_listed(store.as_ref(), 1).await, [listed("tokenize", &["k7"])]);
    assert_eq!(
        conformance::read(store.as_ref(), id, &["taken", "k2", "k3", "k5", "k6", "k7"]).await,
        [Some(b"first".to_vec()), Some(b"k2".to_vec()), Some(b"k3".to_vec()), None, None, Some(b"k7".to_vec())]
    );
    let keys = store.list_keys(id, piivault::crypto::keyring::KeyPurpose::Data).await.unwrap();
    // taken, two held, k1 to k4 and k7.
    assert_eq!((keys[0].records, keys[0].encryptions), (8, 8), "the refused were not counted");
}

/// A data key version's counters are kept per node (migration 6): two
/// nodes sealing under one version never wait for each other, what each
/// counted adds up (its erasures and re-encryptions of the other's records
/// included), and a version taken out of use while a seal waits for it
/// refuses that seal.
#[tokio::test]
async fn key_versions_are_counted_per_node_and_added_up() {
    use piivault::crypto::keyring::KeyPurpose;
    use piivault::store::{InsertOutcome, KeyState, Pending, Reencrypted, Store, StoreError};
    async fn seal(store: &dyn Store, id: piivault::store::CollectionId, token: &str, version: u32) {
        let record = conformance::record(token, version, token.as_bytes());
        let stored = store.insert_records(id, vec![record], conformance::audit("tokenize"), conformance::render());
        let stored = tokio::time::timeout(std::time::Duration::from_secs(10), stored).await;
        assert_eq!(stored.expect("the seal waited").unwrap(), [InsertOutcome::Inserted]);
    }
    let database = pg::Database::new();
    let a = open_node(&database, "a", OpenMode::Create);
    let id = conformance::ready(&conformance::Fresh { store: a.clone(), keep: Box::new(()) }).await;
    let b = open_node(&database, "b", OpenMode::Existing);
    b.install_audit_key(piivault::audit::AuditKey::from_bytes(conformance::AUDIT_KEY)).await.unwrap();
    let counts =
        || database.sql("SELECT chain, version::text, encryptions::text, live::text FROM key_counts ORDER BY 1, 2");
    let row = |chain: &str, version: &str, encryptions: &str, live: &str| {
        [chain, version, encryptions, live].map(|v| Some(v.to_owned())).to_vec()
    };
    let listed = |keys: Vec<piivault::store::KeyInfo>| -> Vec<(u32, KeyState, u64, u64)> {
        keys.into_iter().map(|k| (k.version, k.state, k.records, k.encryptions)).collect()
    };

    seal(a.as_ref(), id, "x1", 1).await;
    seal(a.as_ref(), id, "x2", 1).await;
    seal(b.as_ref(), id, "y1", 1).await;
    // Another node's sealing transaction under version 1, open: a seal
    // through b goes in beside it.
    let sealing = KeyRowsHeld::locking(&database, "FOR SHARE", "");
    seal(b.as_ref(), id, "y2", 1).await;
    drop(sealing);
    assert_eq!(counts(), [row("a", "1", "2", "2"), row("b", "1", "2", "2")]);
    for store in [&a, &b] {
        assert_eq!(listed(store.list_keys(id, KeyPurpose::Data).await.unwrap()), [(1, KeyState::Primary, 4, 4)]);
    }

    // b erases a record a sealed; then every record moves to version 2,
    // through b.
    assert_eq!(
        b.delete_records(id, vec![conformance::lookup("x1")], conformance::audit("delete")).await.unwrap(),
        [true]
    );
    a.add_primary_key(id, KeyPurpose::Data, 2, b"wrapped-v2".to_vec(), None, conformance::audit("rotate"))
        .await
        .unwrap();
    a.mark_retiring(id).await.unwrap();
    let work = b.records_needing(id, Pending::Reencryption { primary: 2 }, 0, 10).await.unwrap();
    let moved: Vec<_> = work
        .iter()
        .map(|r| Reencrypted { seq: r.at.seq, from_version: 1, to_version: 2, ciphertext: r.ciphertext.clone() })
        .collect();
    assert_eq!(b.replace_ciphertexts(id, moved, conformance::audit("reencrypt")).await.unwrap(), 3);
    assert_eq!(counts(), [row("a", "1", "2", "2"), row("b", "1", "2", "-2"), row("b", "2", "3", "3")]);
    assert_eq!(
        listed(a.list_keys(id, KeyPurpose::Data).await.unwrap()),
        [(1, KeyState::Retiring, 0, 4), (2, KeyState::Primary, 3, 3)]
    );
    let summary: Vec<_> = b
        .key_summary()
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.purpose == KeyPurpose::Data)
        .map(|s| (s.state, s.live))
        .collect();
    assert_eq!(summary, [(KeyState::Primary, 3), (KeyState::Retiring, 0)]);
    // Empty by the sum of both nodes' counts, not by either's.
    assert_eq!(a.retire_key(id, 1, conformance::audit("retire")).await.unwrap(), Ok(()));

    // Version 2 marked compromised by a session that held it while a seal
    // under it waited: the seal is refused, and nothing of it is written.
    let taking =
        KeyRowsHeld::locking(&database, "FOR UPDATE", "UPDATE keys SET state = 'compromised' WHERE version = 2");
    let waiting = {
        let a = a.clone();
        let record = conformance::record("z1", 2, b"z1");
        tokio::spawn(async move {
            a.insert_records(id, vec![record], conformance::audit("tokenize"), conformance::render()).await
        })
    };
    taking.until_waited_for(&database).await;
    drop(taking);
    assert!(matches!(waiting.await.unwrap(), Err(StoreError::Conflict)));
    assert_eq!(conformance::read(a.as_ref(), id, &["z1", "y1"]).await, [None, Some(b"y1".to_vec())]);
    assert_eq!(
        listed(b.list_keys(id, KeyPurpose::Data).await.unwrap()),
        [(1, KeyState::Retired, 0, 4), (2, KeyState::Compromised, 3, 3)]
    );
}

/// Only a process that took its chain builds the chain's blocks: one that
/// only reads beside the node (an offline `audit verify`) writes nothing;
/// entries left waiting by an earlier process are sorted once the chain
/// is written again.
#[tokio::test]
async fn a_process_that_never_writes_its_chain_builds_no_block() {
    let database = pg::Database::new();
    let open = |block: usize, mode| {
        let settings = StoreSettings { audit_index_block: block, ..StoreSettings::default() };
        piivault::store::open(&StoreBackend::Postgres(database.node("a")), &settings, mode, None).unwrap()
    };
    let store = open(1_000, OpenMode::Create);
    conformance::tokenized_then_read_twice(store.as_ref()).await;
    drop(store);
    let blocks = || database.sql("SELECT count(*) FROM audit_index_blocks");
    let reader = open(2, OpenMode::Existing);
    assert_eq!(reader.audit_chains().await.unwrap(), ["a"]);
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(blocks(), [[Some("0".to_owned())]], "a process that only read built blocks");
    // A write takes the chain: the seven entries waiting become blocks.
    reader.install_audit_key(piivault::audit::AuditKey::from_bytes(conformance::AUDIT_KEY)).await.unwrap();
    reader.append_audit(conformance::audit("detokenize")).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while blocks() != [[Some("3".to_owned())]] {
        assert!(std::time::Instant::now() < deadline, "built {:?} in 20 s", blocks());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(reader.check_token_index(None).await.unwrap(), None);
}
