//! The store conformance suite: drives the [`Store`] interface directly,
//! below the vault, and every backend must pass it unchanged. A backend's
//! test file calls [`conformance_suite!`] with a function that makes a new,
//! empty store (audit key not yet installed).

#![allow(dead_code)] // each backend's crate runs every check, through the macro

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use piivault::audit::{AuditKey, AuditRecord, Head};
use piivault::crypto::keyring::KeyPurpose;
use piivault::store::{
    AuditFilter, CollectionId, IndexEntry, InsertOutcome, KeyState, NewRecord, Pending, RecordMatch, RecordRef,
    Reencrypted, RenderToken, RetireRefused, Store, StoreError, StoredRecord, TokenForm, TokenLookup, WrappedKey,
};
use piivault::token::Sealed;

/// A new, empty store and whatever keeps it alive (a directory, a
/// database).
pub struct Fresh {
    pub store: Arc<dyn Store>,
    pub keep: Box<dyn std::any::Any + Send>,
}

/// Generates one `#[tokio::test]` per check, each on a fresh store from
/// `$fresh`.
#[macro_export]
macro_rules! conformance_suite {
    ($fresh:path) => {
        $crate::conformance_suite!(@each $fresh;
            records_round_trip_in_the_order_asked,
            a_taken_token_fails_alone,
            a_record_under_a_version_out_of_use_fails_alone,
            sealed_records_are_found_by_place_and_random_half,
            shaped_records_are_found_by_place_and_whole_token,
            sequence_numbers_are_never_handed_out_twice,
            one_value_gets_one_token_under_concurrency,
            expired_records_answer_like_unknown_ones_and_are_purged,
            erased_tokens_are_gone_and_never_issued_again,
            key_versions_follow_their_lifecycle,
            a_rewrap_replaces_every_key_or_none,
            no_audit_key_no_write,
            the_audit_trail_chains_and_answers_queries,
            who_saw_a_token_is_answered_across_the_index_and_its_tail,
            pending_work_is_paged_in_record_order,
            index_entries_move_to_a_new_version,
            collection_facts_are_recorded_once,
            backup_follows_the_capabilities,
        );
    };
    (@each $fresh:path; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $check() {
                conformance::$check($fresh()).await;
            }
        )*
    };
}

/// The audit key of every check's store.
pub const AUDIT_KEY: [u8; 32] = [7; 32];

pub fn audit(action: &str) -> AuditRecord {
    AuditRecord {
        at_micros: 1_700_000_000_000_000,
        caller: "spiffe://conformance/writer".into(),
        action: action.into(),
        collection: "c".into(),
        items: 1,
        outcome: "OK".into(),
        ..AuditRecord::default()
    }
}

/// Sequence numbers for the text records of every check (unique across
/// them; each check's store is its own).
static NEXT_SEQ: AtomicU64 = AtomicU64::new(1);

/// A record whose token is kept as text, at a new sequence number.
pub fn record(token: &str, version: u32, ciphertext: &[u8]) -> NewRecord {
    at(
        RecordRef { seq: NEXT_SEQ.fetch_add(1, Ordering::Relaxed), token: TokenForm::Text(token.into()) },
        version,
        ciphertext,
    )
}

/// A record at `at`.
fn at(at: RecordRef, version: u32, ciphertext: &[u8]) -> NewRecord {
    NewRecord { at, key_version: version, ciphertext: ciphertext.to_vec(), expires_at: None, index: None }
}

/// A sealed record: found by `seq` and `check`.
fn sealed(seq: u64, check: [u8; 8], ciphertext: &[u8]) -> NewRecord {
    at(RecordRef { seq, token: TokenForm::Sealed(check) }, 1, ciphertext)
}

pub fn lookup(token: &str) -> TokenLookup {
    TokenLookup { sealed: None, placed: Vec::new(), exact: token.into(), canonical: None }
}

fn lookup_sealed(seq: u64, check: [u8; 8]) -> TokenLookup {
    TokenLookup { sealed: Some(Sealed { seq, check }), placed: Vec::new(), exact: format!("s{seq}"), canonical: None }
}

/// A shaped token as presented: `exact` (its writing), at `placed`.
fn lookup_shaped(placed: &[u64], exact: &str, canonical: &str) -> TokenLookup {
    TokenLookup { sealed: None, placed: placed.to_vec(), exact: exact.into(), canonical: Some(canonical.into()) }
}

/// A shaped record at `seq`, keeping `text`.
fn shaped(seq: u64, text: &str, ciphertext: &[u8]) -> NewRecord {
    at(RecordRef { seq, token: TokenForm::Shaped(text.into()) }, 1, ciphertext)
}

/// How these checks write a record's token: its text, or `s<seq>` for a
/// sealed one (the vault seals it under the token key).
fn name(at: &RecordRef) -> String {
    match &at.token {
        TokenForm::Text(text) | TokenForm::Shaped(text) => text.clone(),
        TokenForm::Sealed(_) => format!("s{}", at.seq),
    }
}

pub fn render() -> RenderToken {
    Box::new(name)
}

/// `(token, ciphertext)` of records read back.
fn named(records: &[StoredRecord]) -> Vec<(String, Vec<u8>)> {
    records.iter().map(|r| (name(&r.at), r.ciphertext.clone())).collect()
}

fn now() -> i64 {
    i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros()).unwrap()
}

/// A store with its audit key installed and collection `c` (data key v1).
pub async fn ready(fresh: &Fresh) -> CollectionId {
    let head = fresh.store.install_audit_key(AuditKey::from_bytes(AUDIT_KEY)).await.unwrap();
    assert_eq!(head, Head::GENESIS);
    fresh.store.create_collection("c", KeyPurpose::Data, b"wrapped-v1".to_vec()).await.unwrap()
}

/// A trail of seven token-index entries in three audit records: the
/// tokenize of records `t0`, `t1` and `t2` at three places in a row from
/// the one returned (audit record 1), then two reads of `t0` and `t1` (2
/// and 3). Installs the audit key and makes collection `c` first.
pub async fn tokenized_then_read_twice(store: &dyn Store) -> (CollectionId, u64) {
    store.install_audit_key(AuditKey::from_bytes(AUDIT_KEY)).await.unwrap();
    let id = store.create_collection("c", KeyPurpose::Data, b"wrapped-v1".to_vec()).await.unwrap();
    let first = store.reserve_sequences(id, 0, 3).await.unwrap();
    let records =
        (0..3).map(|i| at(RecordRef { seq: first + i, token: TokenForm::Text(format!("t{i}")) }, 1, b"ct")).collect();
    store.insert_records(id, records, audit("tokenize"), render()).await.unwrap();
    for _ in 0..2 {
        let mut read = audit("detokenize");
        read.tokens = vec!["t0".into(), "t1".into()];
        store.append_read_audit(id, vec![first, first + 1], read).await.unwrap();
    }
    (id, first)
}

/// The ciphertexts `get_records` answers for `tokens`.
pub async fn read(store: &dyn Store, id: CollectionId, tokens: &[&str]) -> Vec<Option<Vec<u8>>> {
    let found = store.get_records(id, tokens.iter().map(|t| lookup(t)).collect()).await.unwrap();
    found.into_iter().map(|r| r.map(|r| r.ciphertext)).collect()
}

/// Every audit row, checked as one chain; returns them.
pub async fn chain(store: &dyn Store) -> Vec<(u64, AuditRecord)> {
    let rows = store.query_audit(AuditFilter::default(), 10_000).await.unwrap();
    let head = piivault::audit::verify(
        &AuditKey::from_bytes(AUDIT_KEY),
        rows.iter().map(|r| (r.seq, r.record.clone(), r.mac.clone())),
    )
    .unwrap();
    assert_eq!(head, store.audit_head().await.unwrap());
    rows.iter().map(|r| (r.seq, AuditRecord::decode(&r.record).unwrap().1)).collect()
}

pub async fn records_round_trip_in_the_order_asked(fresh: Fresh) {
    let id = ready(&fresh).await;
    let store = fresh.store.as_ref();
    let batch = vec![record("t0", 1, b"ct0"), record("t1", 1, b"ct1"), record("t2", 1, b"ct2")];
    let outcomes = store.insert_records(id, batch, audit("tokenize"), render()).await.unwrap();
    assert_eq!(outcomes, [InsertOutcome::Inserted, InsertOutcome::Inserted, InsertOutcome::Inserted]);
    assert_eq!(read(store, id, &["t2", "nope", "t0"]).await, [Some(b"ct2".to_vec()), None, Some(b"ct0".to_vec())]);
    assert_eq!(store.record_counts().await.unwrap(), [(id, 3)]);
    assert_eq!(store.collection_id("c").await.unwrap(), Some(id));
    assert_eq!(store.collection_id("d").await.unwrap(), None);
    // Creating it again (another process got there first) finds it.
    assert_eq!(store.create_collection("c", KeyPurpose::Data, b"other".to_vec()).await.unwrap(), id);
    let other = store.create_collection("d", KeyPurpose::Data, b"wrapped-d".to_vec()).await.unwrap();
    assert_ne!(other, id);
    // Collections do not see each other's records.
    assert_eq!(read(store, other, &["t0"]).await, [None]);
    let rows = chain(store).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1.tokens, ["t0", "t1", "t2"]);
}

pub async fn a_taken_token_fails_alone(fresh: Fresh) {
    let id = ready(&fresh).await;
    let store = fresh.store.as_ref();
    store.insert_records(id, vec![record("t1", 1, b"first")], audit("tokenize"), render()).await.unwrap();
    let batch = vec![record("t2", 1, b"ct2"), record("t1", 1, b"second"), record("t3", 1, b"ct3")];
    let outcomes = store.insert_records(id, batch, audit("tokenize"), render()).await.unwrap();
    assert_eq!(outcomes, [InsertOutcome::Inserted, InsertOutcome::Collision, InsertOutcome::Inserted]);
    assert_eq!(read(store, id, &["t1"]).await, [Some(b"first".to_vec())]);
    let rows = chain(store).await;
    assert_eq!(rows[1].1.tokens, ["t2", "t3"], "the audit record lists what was handed out");
}

pub async fn sealed_records_are_found_by_place_and_random_half(fresh: Fresh) {
    let id = ready(&fresh).await;
    let store = fresh.store.as_ref();
    let first = store.reserve_sequences(id, 0, 3).await.unwrap();
    let check = |i: u8| [i; 8];
    let batch = (0..3)
        .map(|i| sealed(first + i, check(u8::try_from(i).unwrap() + 1), &[b'v', u8::try_from(i).unwrap()]))
        .collect();
    let outcomes = store.insert_records(id, batch, audit("tokenize"), render()).await.unwrap();
    assert_eq!(outcomes, [const { InsertOutcome::Inserted }; 3]);
    let found = store
        .get_records(
            id,
            vec![
                lookup_sealed(first + 2, check(3)),
                lookup_sealed(first + 2, check(4)), // the wrong random half
                lookup_sealed(first + 7, check(3)), // no such place
                lookup_sealed(first, check(1)),
            ],
        )
        .await
        .unwrap();
    let found: Vec<Option<(RecordRef, Vec<u8>)>> = found.into_iter().map(|r| r.map(|r| (r.at, r.ciphertext))).collect();
    assert_eq!(
        found,
        [
            Some((RecordRef { seq: first + 2, token: TokenForm::Sealed(check(3)) }, b"v\x02".to_vec())),
            None,
            None,
            Some((RecordRef { seq: first, token: TokenForm::Sealed(check(1)) }, b"v\x00".to_vec())),
        ]
    );
    // A place that is taken is a collision, whatever the random half.
    let again = store.insert_records(id, vec![sealed(first + 1, check(9), b"x")], audit("tokenize"), render()).await;
    assert_eq!(again.unwrap(), [InsertOutcome::Collision]);
    // A delete with the wrong random half erases nothing.
    let deleted = store
        .delete_records(
            id,
            vec![lookup_sealed(first + 1, check(9)), lookup_sealed(first + 1, check(2))],
            audit("delete"),
        )
        .await
        .unwrap();
    assert_eq!(deleted, [false, true]);
    let located = store.locate_record(id, lookup_sealed(first + 1, check(2))).await.unwrap();
    assert_eq!(
        located,
        Some(RecordRef { seq: first + 1, token: TokenForm::Sealed(check(2)) }),
        "deleted, still issued"
    );
    assert_eq!(store.locate_record(id, lookup_sealed(first + 1, check(1))).await.unwrap(), None);
    // The audit records list the tokens as rendered, and are indexed by place.
    let rows = chain(store).await;
    let names: Vec<String> = (0..3).map(|i| format!("s{}", first + i)).collect();
    assert_eq!(rows[0].1.tokens, names);
    assert_eq!(rows[2].1.tokens, [format!("s{}", first + 1)]);
    let about = store
        .query_audit(AuditFilter { record: RecordMatch::Of(id, first + 1), ..AuditFilter::default() }, 10)
        .await
        .unwrap();
    assert_eq!(
        about.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [1, 3],
        "issued, then deleted (the collision is not on it)"
    );
}

pub async fn shaped_records_are_found_by_place_and_whole_token(fresh: Fresh) {
    let id = ready(&fresh).await;
    let store = fresh.store.as_ref();
    let shape = 16u64 << 48;
    let first = shape | store.reserve_sequences(id, 16, 2).await.unwrap();
    let batch = vec![shaped(first, "9674467744990004", b"ct0"), shaped(first + 1, "9674467744990012", b"ct1")];
    let outcomes = store.insert_records(id, batch, audit("tokenize"), render()).await.unwrap();
    assert_eq!(outcomes, [InsertOutcome::Inserted, InsertOutcome::Inserted]);
    let found = store
        .get_records(
            id,
            vec![
                // In another writing: compared in canonical form.
                lookup_shaped(&[first + 1], "9674 4677 4499 0012", "9674467744990012"),
                // The right place, another token (a kept digit changed).
                lookup_shaped(&[first + 1], "9674467744990013", "9674467744990013"),
                // The first of two places holds nothing; the second does.
                lookup_shaped(&[first + 9, first], "9674467744990004", "9674467744990004"),
                // Not at its place, and not found by its text either.
                lookup_shaped(&[], "9674467744990004", "9674467744990004"),
            ],
        )
        .await
        .unwrap();
    let found: Vec<Option<Vec<u8>>> = found.into_iter().map(|r| r.map(|r| r.ciphertext)).collect();
    assert_eq!(found, [Some(b"ct1".to_vec()), None, Some(b"ct0".to_vec()), None]);
    // A token issued before tokens located their records, with the same
    // text, is a collision (the caller takes the next number).
    store.insert_records(id, vec![record("5555444433332222", 1, b"old")], audit("tokenize"), render()).await.unwrap();
    let clash = store
        .insert_records(id, vec![shaped(first + 2, "5555444433332222", b"new")], audit("tokenize"), render())
        .await
        .unwrap();
    assert_eq!(clash, [InsertOutcome::Collision]);
    assert_eq!(read(store, id, &["5555444433332222"]).await, [Some(b"old".to_vec())]);
    // Deleted, the record is still where its token says (never reissued).
    let deleted = store
        .delete_records(id, vec![lookup_shaped(&[first], "9674467744990004", "9674467744990004")], audit("delete"))
        .await
        .unwrap();
    assert_eq!(deleted, [true]);
    let located =
        store.locate_record(id, lookup_shaped(&[first], "9674-4677-4499-0004", "9674467744990004")).await.unwrap();
    assert_eq!(located, Some(RecordRef { seq: first, token: TokenForm::Shaped("9674467744990004".into()) }));
    // Counted against the space of 16 letters and digits: the numbers the
    // shape reserved, and the old token's length.
    assert_eq!(store.issued_by_length(id).await.unwrap(), [(16, 3)]);
    let rows = chain(store).await;
    assert_eq!(rows[0].1.tokens, ["9674467744990004", "9674467744990012"]);
    assert_eq!(rows.last().unwrap().1.tokens, ["9674467744990004"]);
}

pub async fn sequence_numbers_are_never_handed_out_twice(fresh: Fresh) {
    let id = ready(&fresh).await;
    let other = fresh.store.create_collection("d", KeyPurpose::Data, b"w".to_vec()).await.unwrap();
    let tasks: Vec<_> = (0..8u64)
        .map(|i| {
            let store = fresh.store.clone();
            tokio::spawn(async move { (store.reserve_sequences(id, 0, i + 1).await.unwrap(), i + 1) })
        })
        .collect();
    let mut blocks = Vec::new();
    for task in tasks {
        blocks.push(task.await.unwrap());
    }
    blocks.sort_unstable();
    assert_eq!(blocks[0].0, 1, "numbering starts at 1");
    for pair in blocks.windows(2) {
        assert_eq!(pair[0].0 + pair[0].1, pair[1].0, "blocks are disjoint and leave no gap: {blocks:?}");
    }
    // Each collection counts on its own, and so does each shape.
    assert_eq!(fresh.store.reserve_sequences(other, 0, 5).await.unwrap(), 1);
    assert_eq!(fresh.store.reserve_sequences(other, 0, 1).await.unwrap(), 6);
    assert_eq!(fresh.store.reserve_sequences(other, 16, 100).await.unwrap(), 1);
    assert_eq!(fresh.store.reserve_sequences(id, 16, 1).await.unwrap(), 1);
    assert_eq!(fresh.store.reserve_sequences(other, 16, 1).await.unwrap(), 101);
    assert_eq!(fresh.store.reserve_sequences(other, 0, 1).await.unwrap(), 7);
}

pub async fn one_value_gets_one_token_under_concurrency(fresh: Fresh) {
    let id = ready(&fresh).await;
    store_index_key(&fresh, id).await;
    let digest = [9u8; 32];
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let store = fresh.store.clone();
            tokio::spawn(async move {
                let mut r = record(&format!("d{i:02}"), 1, b"ct");
                r.index = Some(IndexEntry { version: 1, digest, lookups: vec![(1, digest)] });
                store.insert_records(id, vec![r], audit("tokenize"), render()).await.unwrap().remove(0)
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    let inserted = outcomes.iter().filter(|o| **o == InsertOutcome::Inserted).count();
    assert_eq!(inserted, 1, "{outcomes:?}");
    let tokens: Vec<String> = chain(fresh.store.as_ref()).await.into_iter().map(|(_, r)| r.tokens[0].clone()).collect();
    let winner = (0..16).find(|i| outcomes[*i] == InsertOutcome::Inserted).unwrap();
    for (i, outcome) in outcomes.iter().enumerate() {
        match outcome {
            InsertOutcome::Existing(at) => assert_eq!(name(at), format!("d{winner:02}")),
            _ => assert_eq!(i, winner),
        }
    }
    // Every request's audit record lists the one token.
    assert_eq!(tokens, vec![format!("d{winner:02}"); 16]);
    assert_eq!(fresh.store.record_counts().await.unwrap(), [(id, 1)]);
}

async fn store_index_key(fresh: &Fresh, id: CollectionId) {
    fresh.store.add_first_key(id, KeyPurpose::Index, b"wrapped-index".to_vec()).await.unwrap();
    // Only once: a second call keeps the first.
    fresh.store.add_first_key(id, KeyPurpose::Index, b"other".to_vec()).await.unwrap();
    let keys = fresh.store.list_keys(id, KeyPurpose::Index).await.unwrap();
    assert_eq!(keys.iter().map(|k| (k.version, k.state)).collect::<Vec<_>>(), [(1, KeyState::Primary)]);
}

pub async fn expired_records_answer_like_unknown_ones_and_are_purged(fresh: Fresh) {
    let id = ready(&fresh).await;
    let store = fresh.store.as_ref();
    let mut gone = record("old", 1, b"ct-old");
    gone.expires_at = Some(now() - 1_000_000);
    let mut later = record("later", 1, b"ct-later");
    later.expires_at = Some(now() + 3_600_000_000);
    store
        .insert_records(id, vec![gone, later, record("kept", 1, b"ct-kept")], audit("tokenize"), render())
        .await
        .unwrap();
    assert_eq!(
        read(store, id, &["old", "later", "kept"]).await,
        [None, Some(b"ct-later".to_vec()), Some(b"ct-kept".to_vec())]
    );
    // An expired token cannot be deleted (it is not live) ...
    assert_eq!(store.delete_records(id, vec![lookup("old")], audit("delete")).await.unwrap(), [false]);
    // ... it is purged, with its own record.
    assert_eq!(store.purge_expired(id, now(), 10, audit("purge"), render()).await.unwrap(), 1);
    let head = store.audit_head().await.unwrap();
    assert_eq!(store.purge_expired(id, now(), 10, audit("purge"), render()).await.unwrap(), 0);
    assert_eq!(store.audit_head().await.unwrap(), head, "nothing purged, nothing recorded");
    let rows = chain(store).await;
    let purge = &rows.last().unwrap().1;
    assert_eq!((purge.action.as_str(), purge.items, purge.tokens.clone()), ("purge", 1, vec!["old".to_owned()]));
    assert_eq!(store.record_counts().await.unwrap(), [(id, 2)]);
    // Its token is never issued again.
    let again = store.insert_records(id, vec![record("old", 1, b"new")], audit("tokenize"), render()).await.unwrap();
    assert_eq!(again, [InsertOutcome::Collision]);
}

pub async fn erased_tokens_are_gone_and_never_issued_again(fresh: Fresh) {
    let id = ready(&fresh).await;
    let store = fresh.store.as_ref();
    store
        .insert_records(id, vec![record("a", 1, b"ct-a"), record("b", 1, b"ct-b")], audit("tokenize"), render())
        .await
        .unwrap();
    let deleted =
        store.delete_records(id, vec![lookup("a"), lookup("a"), lookup("zz")], audit("delete")).await.unwrap();
    assert_eq!(deleted, [true, false, false]);
    assert_eq!(read(store, id, &["a", "b"]).await, [None, Some(b"ct-b".to_vec())]);
    let again = store.insert_records(id, vec![record("a", 1, b"new")], audit("tokenize"), render()).await.unwrap();
    assert_eq!(again, [InsertOutcome::Collision]);
    let rows = chain(store).await;
    assert_eq!(rows[1].1.tokens, ["a"], "the delete record lists the tokens it erased");
    let keys = store.list_keys(id, KeyPurpose::Data).await.unwrap();
    assert_eq!((keys[0].records, keys[0].encryptions), (1, 2), "live and ever-sealed counts");
    // What the backend promises about residue is stated, either way.
    let caps = store.capabilities();
    assert!(!caps.backend.is_empty());
}

/// A record sealed under a key version that is not in use (here one never
/// added; on a shared store, one another node retired) is a conflict, and
/// nothing of its request is written. Requests written beside it, before
/// or after it in one group commit, are not touched.
pub async fn a_record_under_a_version_out_of_use_fails_alone(fresh: Fresh) {
    let id = ready(&fresh).await;
    let store = fresh.store.as_ref();
    let insert = |records| store.insert_records(id, records, audit("tokenize"), render());
    let (before, refused, after) = tokio::join!(
        insert(vec![record("g1", 1, b"a")]),
        insert(vec![record("b1", 1, b"b"), record("b2", 9, b"c")]),
        insert(vec![record("g2", 1, b"d")]),
    );
    assert!(matches!(refused, Err(StoreError::Conflict)), "{refused:?}");
    assert_eq!((before.unwrap(), after.unwrap()), (vec![InsertOutcome::Inserted], vec![InsertOutcome::Inserted]));
    // Refused last in its group.
    let (kept, last) = tokio::join!(insert(vec![record("g3", 1, b"e")]), insert(vec![record("b3", 9, b"f")]));
    assert_eq!(kept.unwrap(), [InsertOutcome::Inserted]);
    assert!(matches!(last, Err(StoreError::Conflict)), "{last:?}");

    assert_eq!(
        read(store, id, &["g1", "g2", "g3", "b1", "b2", "b3"]).await,
        [Some(b"a".to_vec()), Some(b"d".to_vec()), Some(b"e".to_vec()), None, None, None]
    );
    let keys = store.list_keys(id, KeyPurpose::Data).await.unwrap();
    assert_eq!((keys.len(), keys[0].records, keys[0].encryptions), (1, 3, 3), "the refused were not counted");
    let mut tokens: Vec<_> = chain(store).await.into_iter().flat_map(|(_, r)| r.tokens).collect();
    tokens.sort();
    assert_eq!(tokens, ["g1", "g2", "g3"], "only the written requests are in the trail");
}

pub async fn key_versions_follow_their_lifecycle(fresh: Fresh) {
    let id = ready(&fresh).await;
    let store = fresh.store.as_ref();
    let states = |keys: Vec<piivault::store::KeyInfo>| -> Vec<(u32, KeyState, u64)> {
        keys.into_iter().map(|k| (k.version, k.state, k.records)).collect()
    };
    store.insert_records(id, vec![record("r1", 1, b"ct")], audit("tokenize"), render()).await.unwrap();
    store.add_primary_key(id, KeyPurpose::Data, 2, b"wrapped-v2".to_vec(), None, audit("rotate")).await.unwrap();
    assert_eq!(
        states(store.list_keys(id, KeyPurpose::Data).await.unwrap()),
        [(1, KeyState::Active, 1), (2, KeyState::Primary, 0)]
    );
    // A version another rotation took is a conflict, and nothing changes.
    let taken = store.add_primary_key(id, KeyPurpose::Data, 2, b"again".to_vec(), None, audit("rotate")).await;
    assert!(matches!(taken, Err(StoreError::Conflict)), "{taken:?}");
    assert_eq!(store.list_keys(id, KeyPurpose::Data).await.unwrap().len(), 2);

    assert_eq!(store.retire_key(id, 2, audit("retire")).await.unwrap(), Err(RetireRefused::Primary));
    assert_eq!(store.retire_key(id, 9, audit("retire")).await.unwrap(), Err(RetireRefused::NoSuchVersion));
    assert_eq!(store.retire_key(id, 1, audit("retire")).await.unwrap(), Err(RetireRefused::InUse(1)));
    // A refusal is on the trail once, as refused.
    let rows = chain(store).await;
    let refused: Vec<_> = rows.iter().filter(|(_, r)| r.action == "retire").map(|(_, r)| r.outcome.clone()).collect();
    assert_eq!(refused, ["FAILED_PRECONDITION"; 3]);

    store.mark_retiring(id).await.unwrap();
    assert_eq!(store.list_keys(id, KeyPurpose::Data).await.unwrap()[0].state, KeyState::Retiring);
    let work = store.records_needing(id, Pending::Reencryption { primary: 2 }, 0, 10).await.unwrap();
    assert_eq!(named(&work), [("r1".to_owned(), b"ct".to_vec())]);
    let seq = work[0].at.seq;
    let moved = Reencrypted { seq, from_version: 1, to_version: 2, ciphertext: b"ct2".to_vec() };
    // Read under version 3 (stale): not replaced.
    let stale = Reencrypted { seq, from_version: 3, to_version: 2, ciphertext: b"x".to_vec() };
    assert_eq!(store.replace_ciphertexts(id, vec![stale], audit("reencrypt")).await.unwrap(), 0);
    assert_eq!(store.replace_ciphertexts(id, vec![moved], audit("reencrypt")).await.unwrap(), 1);
    assert_eq!(read(store, id, &["r1"]).await, [Some(b"ct2".to_vec())]);
    assert_eq!(store.retire_key(id, 1, audit("retire")).await.unwrap(), Ok(()));
    assert_eq!(store.retire_key(id, 1, audit("retire")).await.unwrap(), Err(RetireRefused::AlreadyRetired));
    assert_eq!(
        states(store.list_keys(id, KeyPurpose::Data).await.unwrap()),
        [(1, KeyState::Retired, 0), (2, KeyState::Primary, 1)]
    );
    // A retired key's material is gone from what can be loaded or re-wrapped.
    let wrapped: Vec<_> = store.wrapped_keys().await.unwrap().into_iter().map(|k| (k.purpose, k.version)).collect();
    assert_eq!(wrapped, [(KeyPurpose::Data, 2)]);
    let loaded = store.load_keys().await.unwrap();
    let v1 = loaded.iter().find(|k| k.version == 1).unwrap();
    assert!(v1.wrapped.is_empty() && v1.state == KeyState::Retired);

    // A compromised mark on rotation.
    store.add_primary_key(id, KeyPurpose::Data, 3, b"wrapped-v3".to_vec(), Some(2), audit("rotate")).await.unwrap();
    assert_eq!(
        states(store.list_keys(id, KeyPurpose::Data).await.unwrap()),
        [(1, KeyState::Retired, 0), (2, KeyState::Compromised, 1), (3, KeyState::Primary, 0)]
    );
    let summary = store.key_summary().await.unwrap();
    let data: Vec<_> =
        summary.iter().filter(|s| s.purpose == KeyPurpose::Data).map(|s| (s.state, s.versions, s.live)).collect();
    assert_eq!(data, [(KeyState::Compromised, 1, 1), (KeyState::Primary, 1, 0), (KeyState::Retired, 1, 0)]);
}

pub async fn a_rewrap_replaces_every_key_or_none(fresh: Fresh) {
    let id = ready(&fresh).await;
    let store = fresh.store.as_ref();
    let audit_wrapped = store.vault_key(KeyPurpose::Audit, b"audit-v1".to_vec()).await.unwrap();
    assert_eq!(audit_wrapped, b"audit-v1");
    // Asked again, the stored one answers.
    assert_eq!(store.vault_key(KeyPurpose::Audit, b"other".to_vec()).await.unwrap(), b"audit-v1");
    let mut keys = store.wrapped_keys().await.unwrap();
    assert_eq!(keys.len(), 2);
    for key in &mut keys {
        key.wrapped = [b"new-".as_slice(), &key.wrapped].concat();
    }
    // One key that is not there: nothing changes.
    let mut with_ghost: Vec<WrappedKey> = keys
        .iter()
        .map(|k| WrappedKey {
            collection: k.collection,
            collection_name: k.collection_name.clone(),
            purpose: k.purpose,
            version: k.version,
            wrapped: k.wrapped.clone(),
        })
        .collect();
    with_ghost.push(WrappedKey {
        collection: Some(id),
        collection_name: "c".into(),
        purpose: KeyPurpose::Data,
        version: 42,
        wrapped: b"ghost".to_vec(),
    });
    let refused = store.rewrap_keys(with_ghost, audit("rotate_root_key")).await;
    assert!(matches!(refused, Err(StoreError::Conflict)), "{refused:?}");
    assert_eq!(store.vault_key(KeyPurpose::Audit, Vec::new()).await.unwrap(), b"audit-v1");
    store.rewrap_keys(keys, audit("rotate_root_key")).await.unwrap();
    assert_eq!(store.vault_key(KeyPurpose::Audit, Vec::new()).await.unwrap(), b"new-audit-v1");
    let loaded = store.load_keys().await.unwrap();
    assert_eq!(loaded.iter().map(|k| k.wrapped.clone()).collect::<Vec<_>>(), [b"new-wrapped-v1".to_vec()]);
    assert_eq!(chain(store).await.len(), 1, "only the committed rewrap is on the trail");
}

pub async fn no_audit_key_no_write(fresh: Fresh) {
    let store = fresh.store.as_ref();
    let id = store.create_collection("c", KeyPurpose::Data, b"w".to_vec()).await.unwrap();
    let refused = store.insert_records(id, vec![record("t", 1, b"ct")], audit("tokenize"), render()).await;
    assert!(matches!(refused, Err(StoreError::AuditUnavailable)), "{refused:?}");
    assert!(matches!(store.append_audit(audit("detokenize")).await, Err(StoreError::AuditUnavailable)));
    assert_eq!(read(store, id, &["t"]).await, [None], "nothing written without its record");
    assert_eq!(store.audit_head().await.unwrap(), Head::GENESIS);
}

pub async fn the_audit_trail_chains_and_answers_queries(fresh: Fresh) {
    let id = ready(&fresh).await;
    let store = fresh.store.as_ref();
    store
        .insert_records(id, vec![record("x1", 1, b"a"), record("x2", 1, b"b")], audit("tokenize"), render())
        .await
        .unwrap();
    let mut read_x2 = audit("detokenize");
    read_x2.caller = "spiffe://conformance/reader".into();
    read_x2.tokens = vec!["x2".into()];
    let x2 = store.locate_record(id, lookup("x2")).await.unwrap().unwrap();
    assert_eq!(x2.token, TokenForm::Text("x2".into()));
    assert_eq!(store.append_read_audit(id, vec![x2.seq], read_x2).await.unwrap(), 2);
    let mut denied = audit("detokenize");
    denied.outcome = "PERMISSION_DENIED".into();
    assert_eq!(store.append_audit(denied).await.unwrap(), 3);
    let rows = chain(store).await;
    assert_eq!(rows.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 2, 3]);

    let seqs = |filter: AuditFilter, limit: usize| async move {
        store.query_audit(filter, limit).await.unwrap().into_iter().map(|r| r.seq).collect::<Vec<_>>()
    };
    let x1 = store.locate_record(id, lookup("x1")).await.unwrap().unwrap();
    assert_eq!(seqs(AuditFilter { record: RecordMatch::Of(id, x2.seq), ..AuditFilter::default() }, 10).await, [1, 2]);
    assert_eq!(seqs(AuditFilter { record: RecordMatch::Of(id, x1.seq), ..AuditFilter::default() }, 10).await, [1]);
    assert_eq!(
        seqs(AuditFilter { record: RecordMatch::Unissued, ..AuditFilter::default() }, 10).await,
        Vec::<u64>::new()
    );
    assert_eq!(store.locate_record(id, lookup("never")).await.unwrap(), None);
    assert_eq!(
        seqs(AuditFilter { caller: Some("spiffe://conformance/reader".into()), ..AuditFilter::default() }, 10).await,
        [2]
    );
    assert_eq!(
        seqs(AuditFilter { outcome: Some("PERMISSION_DENIED".into()), ..AuditFilter::default() }, 10).await,
        [3]
    );
    assert_eq!(seqs(AuditFilter { action: Some("detokenize".into()), ..AuditFilter::default() }, 10).await, [2, 3]);
    assert_eq!(seqs(AuditFilter { after_seq: 1, ..AuditFilter::default() }, 1).await, [2]);
    let at = 1_700_000_000_000_000;
    assert_eq!(seqs(AuditFilter { since: Some(at + 1), ..AuditFilter::default() }, 10).await, Vec::<u64>::new());
    assert_eq!(seqs(AuditFilter { until: Some(at + 1), ..AuditFilter::default() }, 10).await, [1, 2, 3]);
    // One process writes this store: one chain, its own, named as one node
    // would be; another chain's name reads nothing.
    let chains = store.audit_chains().await.unwrap();
    assert_eq!(chains, ["main"]);
    assert_eq!(seqs(AuditFilter { chain: Some(chains[0].clone()), ..AuditFilter::default() }, 10).await, [1, 2, 3]);
    assert_eq!(
        seqs(AuditFilter { chain: Some("elsewhere".into()), ..AuditFilter::default() }, 10).await,
        Vec::<u64>::new()
    );
    let rows = store.query_audit(AuditFilter::default(), 3).await.unwrap();
    let indexed: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            r.indexed
                .iter()
                .map(|(c, at)| {
                    assert_eq!(*c, id);
                    name(at)
                })
                .collect()
        })
        .collect();
    assert_eq!(indexed, [vec!["x1", "x2"], vec!["x2"], vec![]]);
    // The installed head follows the trail after a reinstall.
    let head = store.install_audit_key(AuditKey::from_bytes(AUDIT_KEY)).await.unwrap();
    assert_eq!(head.seq, 3);
    assert_eq!(store.append_audit(audit("detokenize")).await.unwrap(), 4);
    assert_eq!(chain(store).await.len(), 4);
}

pub async fn who_saw_a_token_is_answered_across_the_index_and_its_tail(fresh: Fresh) {
    let id = ready(&fresh).await;
    let store = fresh.store.as_ref();
    let batch = (0..5).map(|i| record(&format!("w{i}"), 1, b"ct")).collect();
    store.insert_records(id, batch, audit("tokenize"), render()).await.unwrap();
    let at = |t: &str| {
        let t = t.to_owned();
        async move { store.locate_record(id, lookup(&t)).await.unwrap().unwrap().seq }
    };
    let (w0, w3) = (at("w0").await, at("w3").await);
    // Twenty reads, each of w0 and one other token.
    let mut reads_of_w3 = Vec::new();
    for i in 0..20u64 {
        let other = at(&format!("w{}", 1 + i % 4)).await;
        let mut read = audit("detokenize");
        read.tokens = vec!["w0".into(), format!("w{}", 1 + i % 4)];
        let seq = store.append_read_audit(id, vec![w0, other], read).await.unwrap();
        if other == w3 {
            reads_of_w3.push(seq);
        }
    }
    let seqs = |record: u64, after: u64, limit: usize| async move {
        let filter = AuditFilter { record: RecordMatch::Of(id, record), after_seq: after, ..AuditFilter::default() };
        store.query_audit(filter, limit).await.unwrap().into_iter().map(|r| r.seq).collect::<Vec<_>>()
    };
    // A read that names a token twice is found once under it.
    let mut twice = audit("detokenize");
    twice.tokens = vec!["w3".into(), "w3".into()];
    reads_of_w3.push(store.append_read_audit(id, vec![w3, w3], twice).await.unwrap());
    assert_eq!(seqs(w0, 0, 100).await, (1..=21).collect::<Vec<u64>>(), "the tokenize and every read");
    assert_eq!(seqs(w3, 0, 100).await, [vec![1], reads_of_w3.clone()].concat());
    assert_eq!(seqs(w0, 10, 3).await, [11, 12, 13], "paged");
    // The blocks hold exactly what the trail says.
    assert_eq!(store.check_token_index(None).await.unwrap(), None);
    let rows = chain(store).await;
    assert_eq!(rows.len(), 22);
    // The query with another filter still narrows.
    let filter =
        AuditFilter { record: RecordMatch::Of(id, w3), action: Some("tokenize".into()), ..AuditFilter::default() };
    assert_eq!(store.query_audit(filter, 10).await.unwrap().iter().map(|r| r.seq).collect::<Vec<_>>(), [1]);
}

pub async fn pending_work_is_paged_in_record_order(fresh: Fresh) {
    let id = ready(&fresh).await;
    let store = fresh.store.as_ref();
    let batch = ["p3", "p1", "p4", "p2"].iter().map(|t| record(t, 1, t.as_bytes())).collect();
    store.insert_records(id, batch, audit("tokenize"), render()).await.unwrap();
    store.delete_records(id, vec![lookup("p4")], audit("delete")).await.unwrap();
    store.add_primary_key(id, KeyPurpose::Data, 2, b"v2".to_vec(), None, audit("rotate")).await.unwrap();
    let work = Pending::Reencryption { primary: 2 };
    let page = store.records_needing(id, work, 0, 2).await.unwrap();
    assert_eq!(named(&page).into_iter().map(|(t, _)| t).collect::<Vec<_>>(), ["p3", "p1"], "in the order added");
    let next = store.records_needing(id, work, page[1].at.seq, 2).await.unwrap();
    assert_eq!(named(&next), [("p2".to_owned(), b"p2".to_vec())], "erased records need nothing");
    assert!(store.records_needing(id, work, next[0].at.seq, 2).await.unwrap().is_empty());
    assert_eq!(store.issued_by_length(id).await.unwrap(), [(2, 4)], "every token ever issued counts");
}

pub async fn index_entries_move_to_a_new_version(fresh: Fresh) {
    let id = ready(&fresh).await;
    store_index_key(&fresh, id).await;
    let store = fresh.store.as_ref();
    let old = [1u8; 32];
    let mut r = record("i1", 1, b"ct");
    r.index = Some(IndexEntry { version: 1, digest: old, lookups: vec![(1, old)] });
    store.insert_records(id, vec![r, record("i2", 1, b"ct2")], audit("tokenize"), render()).await.unwrap();
    store.add_primary_key(id, KeyPurpose::Index, 2, b"index-v2".to_vec(), None, audit("rotate")).await.unwrap();
    let states: Vec<_> = store
        .list_keys(id, KeyPurpose::Index)
        .await
        .unwrap()
        .into_iter()
        .map(|k| (k.version, k.state, k.records))
        .collect();
    assert_eq!(states, [(1, KeyState::Retiring, 1), (2, KeyState::Primary, 0)]);
    let work = store.records_needing(id, Pending::Indexing { version: 2 }, 0, 10).await.unwrap();
    assert_eq!(named(&work).into_iter().map(|(t, _)| t).collect::<Vec<_>>(), ["i1", "i2"]);
    let new = [2u8; 32];
    // i1 moves; a record that is not there is skipped.
    let entries = vec![(work[0].at.seq, new), (u64::from(u32::MAX), [3u8; 32])];
    assert_eq!(store.index_records(id, 2, entries, audit("reindex")).await.unwrap(), 1);
    assert_eq!(store.retire_unused_index_keys(id, audit("reindex")).await.unwrap(), [1]);
    // The value is found under the new digest only.
    let mut probe = record("i9", 1, b"ct9");
    probe.index = Some(IndexEntry { version: 2, digest: new, lookups: vec![(2, new)] });
    assert_eq!(
        store.insert_records(id, vec![probe], audit("tokenize"), render()).await.unwrap(),
        [InsertOutcome::Existing(work[0].at.clone())]
    );
}

pub async fn collection_facts_are_recorded_once(fresh: Fresh) {
    let id = ready(&fresh).await;
    let store = fresh.store.as_ref();
    assert_eq!(store.token_kind(id, "random".into()).await.unwrap(), "random");
    assert_eq!(store.token_kind(id, "digits".into()).await.unwrap(), "random", "the first recorded kind stays");
    assert_eq!(store.canonical_index_from(id).await.unwrap(), None);
    assert_eq!(store.set_canonical_index_from(id, 3).await.unwrap(), 3);
    assert_eq!(store.set_canonical_index_from(id, 5).await.unwrap(), 3);
    assert_eq!(store.canonical_index_from(id).await.unwrap(), Some(3));
}

pub async fn backup_follows_the_capabilities(fresh: Fresh) {
    let id = ready(&fresh).await;
    let store = fresh.store.as_ref();
    store
        .insert_records(id, vec![record("b1", 1, b"x"), record("b2", 1, b"y")], audit("tokenize"), render())
        .await
        .unwrap();
    store.delete_records(id, vec![lookup("b2")], audit("delete")).await.unwrap();
    if store.capabilities().file_backup {
        let (path, taken) = store.backup().await.unwrap();
        assert_eq!(taken.records, 1);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), taken.bytes);
        piivault::store::check_backup(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
    } else {
        assert!(matches!(store.backup().await, Err(StoreError::Unsupported(_))));
    }
}
