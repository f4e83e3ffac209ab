//! Data-key lifecycle in process: rotate, list, re-encrypt, retire, with
//! traffic going on.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::{Fixture, all_files, contains, who};
use piivault::store::{KeyState, RetireRefused};
use piivault::{PiiValue, Vault, VaultError};

async fn tokenize_many(vault: &Vault, collection: &str, prefix: &str, n: usize) -> Vec<(String, String)> {
    let values: Vec<String> = (0..n).map(|i| format!("{prefix}-{i:05}")).collect();
    let tokens =
        vault.tokenize(&who(), collection, values.iter().map(|v| PiiValue::new(v.clone())).collect()).await.unwrap();
    tokens.into_iter().map(|t| t.unwrap().into_string()).zip(values).collect()
}

async fn assert_all_readable(vault: &Vault, collection: &str, pairs: &[(String, String)]) {
    for chunk in pairs.chunks(1000) {
        let tokens = chunk.iter().map(|(t, _)| t.clone()).collect();
        let back = vault.detokenize(&who(), collection, tokens).await.unwrap();
        for ((_, value), got) in chunk.iter().zip(back) {
            assert!(got.unwrap().expose_secret() == value, "a value did not come back");
        }
    }
}

fn states(keys: &[piivault::store::KeyInfo]) -> Vec<(u32, KeyState, u64, u64)> {
    keys.iter().map(|k| (k.version, k.state, k.records, k.encryptions)).collect()
}

#[tokio::test]
async fn rotate_reencrypt_retire() {
    let fx = Fixture::new();
    let vault = fx.create().await;
    let old = tokenize_many(&vault, "card", "old", 300).await;
    assert_eq!(states(&vault.list_keys(&who(), "card").await.unwrap()), [(1, KeyState::Primary, 300, 300)]);

    assert_eq!(vault.rotate_data_key(&who(), "card").await.unwrap(), 2);
    let new = tokenize_many(&vault, "card", "new", 5).await;
    assert_eq!(
        states(&vault.list_keys(&who(), "card").await.unwrap()),
        [(1, KeyState::Active, 300, 300), (2, KeyState::Primary, 5, 5)]
    );
    assert_all_readable(&vault, "card", &old).await;

    // v1 still holds records: retiring it is refused, with the count.
    let refused = vault.retire_key_version(&who(), "card", 1).await.unwrap_err();
    assert!(matches!(refused, VaultError::RetireRefused(RetireRefused::InUse(300))), "{refused}");
    assert!(matches!(
        vault.retire_key_version(&who(), "card", 2).await.unwrap_err(),
        VaultError::RetireRefused(RetireRefused::Primary)
    ));
    assert!(matches!(
        vault.retire_key_version(&who(), "card", 9).await.unwrap_err(),
        VaultError::RetireRefused(RetireRefused::NoSuchVersion)
    ));

    let mut batches = Vec::new();
    let done = vault.reencrypt(&who(), "card", 128, &mut |p| batches.push(p.moved)).await.unwrap();
    assert_eq!((done.moved, done.unreadable, done.remaining), (300, 0, 0));
    assert_eq!(batches, [128, 256, 300]);
    assert_eq!(
        states(&vault.list_keys(&who(), "card").await.unwrap()),
        [(1, KeyState::Retiring, 0, 300), (2, KeyState::Primary, 305, 305)]
    );
    // Idempotent: a second run finds nothing to do.
    let again = vault.reencrypt(&who(), "card", 128, &mut |_| {}).await.unwrap();
    assert_eq!((again.moved, again.remaining), (0, 0));
    assert_all_readable(&vault, "card", &old).await;
    assert_all_readable(&vault, "card", &new).await;

    // Now v1 can go, and its wrapped key leaves the database file.
    let wrapped_v1: Vec<u8> = common::tamper::open(&fx.db_path())
        .query_row("SELECT wrapped FROM keys WHERE purpose = 'data' AND version = 1 AND collection_id = (SELECT id FROM collections WHERE name = 'card')", [], |r| r.get(0))
        .unwrap();
    vault.retire_key_version(&who(), "card", 1).await.unwrap();
    assert!(matches!(
        vault.retire_key_version(&who(), "card", 1).await.unwrap_err(),
        VaultError::RetireRefused(RetireRefused::AlreadyRetired)
    ));
    assert_eq!(
        states(&vault.list_keys(&who(), "card").await.unwrap()),
        [(1, KeyState::Retired, 0, 300), (2, KeyState::Primary, 305, 305)]
    );
    drop(vault);
    for (path, bytes) in all_files(&fx.dir) {
        assert!(!contains(&bytes, &wrapped_v1), "the retired wrapped key is still in {}", path.display());
    }
    // Reopened: everything still reads; the version number is never reused.
    let vault = fx.open().await;
    assert_all_readable(&vault, "card", &old).await;
    assert_eq!(vault.rotate_data_key(&who(), "card").await.unwrap(), 3);
    // Every key operation is on the audit record.
    let actions: Vec<String> =
        vault.audit_records(0, 10_000).await.unwrap().into_iter().map(|(_, r)| r.action).collect();
    for action in ["rotate_data_key", "list_keys", "reencrypt", "retire_key_version"] {
        assert!(actions.iter().any(|a| a == action), "{action} not audited");
    }
    assert!(vault.verify_audit().await.unwrap().is_ok());
}

/// Rotation and re-encryption while other tasks tokenize and detokenize:
/// no request fails, and afterwards every token ever issued returns its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_and_reencryption_under_load() {
    let fx = Fixture::new();
    let vault = fx.create().await;
    let mut seed = tokenize_many(&vault, "ssn", "seed-a", 1000).await;
    seed.extend(tokenize_many(&vault, "ssn", "seed-b", 1000).await);
    let seeded = Arc::new(seed);
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let issued = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut load = Vec::new();
    for worker in 0..4 {
        let (vault, seeded, stop, failures, issued) =
            (vault.clone(), seeded.clone(), stop.clone(), failures.clone(), issued.clone());
        load.push(tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let value = format!("load-{worker}-{i}");
                match vault.tokenize(&who(), "ssn", vec![PiiValue::new(value.clone())]).await {
                    Ok(mut r) => issued.lock().unwrap().push((r.remove(0).unwrap().into_string(), value)),
                    Err(_) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let (token, value) = &seeded[(worker * 7 + i * 13) % seeded.len()];
                match vault.detokenize(&who(), "ssn", vec![token.clone()]).await {
                    Ok(back) if back[0].as_ref().is_ok_and(|v| v.expose_secret() == value) => {}
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += 1;
            }
        }));
    }
    for _ in 0..3 {
        vault.rotate_data_key(&who(), "ssn").await.unwrap();
        let done = vault.reencrypt(&who(), "ssn", 200, &mut |_| {}).await.unwrap();
        assert_eq!(done.unreadable, 0);
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0, "requests failed during rotation");
    let issued = issued.lock().unwrap().clone();
    assert!(issued.len() > 10, "the load ran ({} values)", issued.len());
    assert_all_readable(&vault, "ssn", &seeded).await;
    assert_all_readable(&vault, "ssn", &issued).await;
    // A final pass leaves nothing under old versions, so they can all retire.
    vault.reencrypt(&who(), "ssn", 500, &mut |_| {}).await.unwrap();
    for version in 1..=3 {
        vault.retire_key_version(&who(), "ssn", version).await.unwrap();
    }
    assert_all_readable(&vault, "ssn", &seeded).await;
    assert_all_readable(&vault, "ssn", &issued).await;
}

/// A suspected leak: the version is marked compromised, a new primary takes
/// over, re-encryption empties the old version by itself, and it can go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compromised_version_is_replaced_and_emptied() {
    let fx = Fixture::new();
    let vault = fx.create().await;
    let old = tokenize_many(&vault, "email", "leak", 700).await;
    assert_eq!(vault.rotate_compromised(&who(), "email", 1).await.unwrap(), 2);
    let after = tokenize_many(&vault, "email", "after", 3).await;
    let mut emptied = false;
    for _ in 0..400 {
        let keys = vault.list_keys(&who(), "email").await.unwrap();
        assert_eq!(keys[0].state, KeyState::Compromised);
        assert_eq!(keys[1].state, KeyState::Primary);
        if keys[0].records == 0 {
            emptied = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(emptied, "re-encryption did not empty the compromised version");
    assert_all_readable(&vault, "email", &old).await;
    assert_all_readable(&vault, "email", &after).await;
    vault.retire_key_version(&who(), "email", 1).await.unwrap();
    assert_eq!(states(&vault.list_keys(&who(), "email").await.unwrap())[0].1, KeyState::Retired);
    assert!(matches!(vault.rotate_compromised(&who(), "email", 1).await.unwrap_err(), VaultError::NoSuchKeyVersion(1)));
    assert_all_readable(&vault, "email", &old).await;
}

/// The live-record counts stay exact through deletes and re-encryption.
#[tokio::test]
async fn live_counts_follow_deletes_and_reencryption() {
    let fx = Fixture::new();
    let vault = fx.create().await;
    let pairs = tokenize_many(&vault, "name", "count", 10).await;
    let gone: Vec<String> = pairs[..3].iter().map(|(t, _)| t.clone()).collect();
    vault.delete(&who(), "name", gone.clone()).await.unwrap();
    vault.delete(&who(), "name", gone).await.unwrap(); // already gone: no change
    assert_eq!(states(&vault.list_keys(&who(), "name").await.unwrap()), [(1, KeyState::Primary, 7, 10)]);
    vault.rotate_data_key(&who(), "name").await.unwrap();
    vault.reencrypt(&who(), "name", 4, &mut |_| {}).await.unwrap();
    vault.delete(&who(), "name", vec![pairs[3].0.clone()]).await.unwrap();
    assert_eq!(
        states(&vault.list_keys(&who(), "name").await.unwrap()),
        [(1, KeyState::Retiring, 0, 10), (2, KeyState::Primary, 6, 7)]
    );
    // The counters agree with the records themselves.
    let db = common::tamper::open(&fx.db_path());
    let live: i64 = db
        .query_row(
            "SELECT count(*) FROM records WHERE key_version = 2 AND ciphertext IS NOT NULL
             AND collection_id = (SELECT id FROM collections WHERE name = 'name')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(live, 6);
}

/// Automatic rotation by count and by age; the count never goes backwards.
#[tokio::test]
async fn automatic_rotation_by_count_and_age() {
    let fx =
        Fixture::with_config("[collections.iban]\nmax_encryptions = 5\n[collections.otp]\nrotate_after = \"1s\"\n");
    let vault = fx.create().await;
    tokenize_many(&vault, "iban", "count", 4).await;
    tokenize_many(&vault, "otp", "age", 1).await;
    assert_eq!(vault.rotate_due().await.unwrap(), []);
    tokenize_many(&vault, "iban", "count-more", 1).await;
    assert_eq!(vault.rotate_due().await.unwrap(), [("iban".to_owned(), 2)]);
    assert_eq!(vault.rotate_due().await.unwrap(), [], "the new primary has sealed nothing yet");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(vault.rotate_due().await.unwrap(), [("otp".to_owned(), 2)]);
    // Collections without a policy are never rotated.
    assert_eq!(vault.list_keys(&who(), "card").await.unwrap().len(), 1);
    drop(vault);
    let vault = fx.open().await;
    assert_eq!(
        states(&vault.list_keys(&who(), "iban").await.unwrap()),
        [(1, KeyState::Active, 5, 5), (2, KeyState::Primary, 0, 0)]
    );
    let automatic = vault
        .audit_records(0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|(_, r)| r.action == "rotate_data_key" && r.caller == "(automatic rotation)")
        .count();
    assert_eq!(automatic, 2);
}

/// Waits (up to 5 s) until no file of the store holds any of `needles`.
async fn assert_gone_from_the_store(fx: &Fixture, needles: &[Vec<u8>], what: &str) {
    let files =
        || all_files(&fx.dir).into_iter().filter(|(p, _)| p.to_string_lossy().contains("vault.db")).collect::<Vec<_>>();
    for _ in 0..100 {
        if files().iter().all(|(_, bytes)| needles.iter().all(|n| !contains(bytes, n))) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let holding: Vec<String> = files()
        .iter()
        .filter(|(_, bytes)| needles.iter().any(|n| contains(bytes, n)))
        .map(|(p, b)| format!("{} ({} bytes)", p.display(), b.len()))
        .collect();
    panic!("{what} still in {holding:?}");
}

/// Re-encryption, retirement and a root rewrap leave no old bytes behind:
/// the ciphertexts moved away from a version, the retired version's wrapped
/// key, and every key wrapped under the old root are gone from the database
/// file and the WAL soon after, with the vault still open.
#[tokio::test]
async fn old_ciphertexts_and_wrapped_keys_leave_the_files() {
    let fx = Fixture::new();
    let vault = fx.create().await;
    let pairs = tokenize_many(&vault, "card", "residue", 3).await;
    let raw = common::tamper::open(&fx.db_path());
    let column = |sql: &str| -> Vec<Vec<u8>> {
        let mut stmt = raw.prepare(sql).unwrap();
        stmt.query_map([], |row| row.get::<_, Vec<u8>>(0)).unwrap().map(Result::unwrap).collect()
    };
    let ciphertexts = column("SELECT ciphertext FROM records WHERE ciphertext IS NOT NULL");
    let v1 = column(
        "SELECT k.wrapped FROM keys k JOIN collections c ON c.id = k.collection_id
         WHERE c.name = 'card' AND k.purpose = 'data' AND k.version = 1",
    );
    assert_eq!((ciphertexts.len(), v1.len()), (3, 1));
    let on_disk = |needle: &[u8]| all_files(&fx.dir).iter().any(|(_, bytes)| contains(bytes, needle));
    assert!(on_disk(&ciphertexts[0]) && on_disk(&v1[0]), "the bytes were never on disk");

    assert_eq!(vault.rotate_data_key(&who(), "card").await.unwrap(), 2);
    let done = vault.reencrypt(&who(), "card", 100, &mut |_| {}).await.unwrap();
    assert_eq!(done.moved, 3);
    assert_gone_from_the_store(&fx, &ciphertexts, "a ciphertext re-encrypted away").await;

    vault.retire_key_version(&who(), "card", 1).await.unwrap();
    assert_gone_from_the_store(&fx, &v1, "the retired version's wrapped key").await;

    let wrapped_under_old_root = column("SELECT wrapped FROM keys WHERE state != 'retired'")
        .into_iter()
        .chain(column("SELECT wrapped FROM vault_keys"))
        .collect::<Vec<_>>();
    assert!(wrapped_under_old_root.len() >= 5, "{}", wrapped_under_old_root.len());
    drop(raw);
    let new_root = piivault::crypto::root::Unlock::RawKey(piivault::crypto::root::RawKey::parse(&[0x77; 32]).unwrap());
    vault.rotate_root(&who(), &new_root, piivault::crypto::root::MIN_KDF).await.unwrap();
    assert_gone_from_the_store(&fx, &wrapped_under_old_root, "a key wrapped under the old root").await;
    assert_all_readable(&vault, "card", &pairs).await;
}

/// A pending `root.sealed.new` while the vault runs (a rotation whose final
/// rename failed) may be the only file that opens the store: another
/// rotation is refused and touches neither file.
#[tokio::test]
async fn a_root_rotation_refuses_to_start_over_a_pending_sealed_file() {
    let fx = Fixture::new();
    let vault = fx.create().await;
    let sealed_path = fx.config.sealed_root.clone();
    let pending = piivault::vault::pending_sealed_path(&sealed_path);
    let sealed = std::fs::read(&sealed_path).ok();
    std::fs::write(&pending, b"the only file that opens the store").unwrap();
    let unlock = piivault::crypto::root::Unlock::RawKey(piivault::crypto::root::RawKey::parse(&[0x78; 32]).unwrap());
    let refused = vault.rotate_root(&who(), &unlock, piivault::crypto::root::MIN_KDF).await.unwrap_err();
    assert!(matches!(refused, VaultError::RotationPending(_)), "{refused}");
    assert!(
        refused.to_string().ends_with("restart the vault (the start completes or discards it) before rotating again")
    );
    assert_eq!(std::fs::read(&pending).unwrap(), b"the only file that opens the store");
    assert_eq!(std::fs::read(&sealed_path).ok(), sealed);
    std::fs::remove_file(&pending).unwrap();
    assert!(vault.rotate_root(&who(), &unlock, piivault::crypto::root::MIN_KDF).await.unwrap() >= 5);
}
