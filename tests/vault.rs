//! The vault core end to end in process: real SQLite file, real keys.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::{detokenize_strings, tokenize_ok, values, who};

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{Fixture, Tmpfs, all_files, contains};
use piivault::crypto::CryptoError;
use piivault::store::StoreError;
use piivault::token::{RandomTokens, Token, TokenGenerator, TokenPrefix, token_from_bytes};
use piivault::{ItemError, ItemErrorCode, PiiValue, Vault, VaultError};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};

#[tokio::test]
async fn every_sample_collection_round_trips_in_order() {
    let fx = Fixture::new();
    let vault = fx.create().await;
    let samples = [
        ("card", vec!["4111 1111 1111 1111", "5500-0000-0000-0004"]),
        ("ssn", vec!["078-05-1120", "219-09-9999"]),
        ("email", vec!["jane.doe@example.org", "ÉLODIE@exemple.fr"]),
        ("phone", vec!["+44 20 7946 0958", "+81 3-1234-5678"]),
        ("name", vec!["Zoë Ångström", "李小龍", "محمد", "🙂 emoji name"]),
    ];
    for (collection, items) in samples {
        let tokens = tokenize_ok(&vault, collection, &items).await;
        assert_eq!(tokens.len(), items.len());
        for (token, value) in tokens.iter().zip(&items) {
            assert!(token.starts_with(&format!("{collection}_")), "{token}");
            assert!(!token.contains(value));
            let parsed: Token = token.parse().unwrap();
            assert_eq!(parsed.prefix(), collection);
        }
        let back = detokenize_strings(&vault, collection, &tokens).await;
        let expected: Vec<Result<String, ItemError>> = items.iter().map(|v| Ok((*v).to_owned())).collect();
        assert_eq!(back, expected, "collection {collection}");
    }
}

#[tokio::test]
async fn the_same_value_gets_a_new_token_each_time() {
    let fx = Fixture::new();
    let vault = fx.create().await;
    let tokens = tokenize_ok(&vault, "email", &["same@example.org"; 3]).await;
    let distinct: HashSet<_> = tokens.iter().collect();
    assert_eq!(distinct.len(), 3, "tokens must not be derived from the value");
}

#[test]
fn any_utf8_value_up_to_the_limit_round_trips() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fx = Fixture::new();
    let vault = rt.block_on(fx.create());
    let max = fx.config.limits.max_value_bytes;
    let strategy = prop::collection::vec(any::<char>(), 1..=max / 4)
        .prop_map(String::from_iter)
        .prop_filter("within the limit", move |s| s.len() <= max)
        // A value of nothing but whitespace is refused (BlankValue).
        .prop_filter("not blank", |s| !s.trim().is_empty());
    let mut runner = TestRunner::new(ProptestConfig { cases: 96, ..ProptestConfig::default() });
    runner
        .run(&strategy, |value| {
            let got = rt.block_on(async {
                let token = vault.tokenize(&who(), "name", vec![PiiValue::new(value.clone())]).await.unwrap();
                let token = token.into_iter().next().unwrap().unwrap();
                let back = vault.detokenize(&who(), "name", vec![token.into_string()]).await.unwrap();
                back.into_iter().next().unwrap().unwrap().expose_secret().to_owned()
            });
            prop_assert!(got == value, "value did not round-trip");
            Ok(())
        })
        .unwrap();
}

#[test]
fn any_batch_round_trips_in_order() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fx = Fixture::new();
    let vault = rt.block_on(fx.create());
    // Blank values are refused, so every value has something but spaces.
    let strategy = prop::collection::vec("\\PC{0,20}[^\\s]\\PC{0,19}", 1..120);
    let mut runner = TestRunner::new(ProptestConfig { cases: 48, ..ProptestConfig::default() });
    runner
        .run(&strategy, |batch| {
            let back = rt.block_on(async {
                let tokens = vault
                    .tokenize(&who(), "card", batch.iter().map(|v| PiiValue::new(v.clone())).collect())
                    .await
                    .unwrap();
                let tokens: Vec<String> = tokens.into_iter().map(|t| t.unwrap().into_string()).collect();
                prop_assert_eq!(tokens.iter().collect::<HashSet<_>>().len(), batch.len());
                let back = vault.detokenize(&who(), "card", tokens).await.unwrap();
                Ok(back.into_iter().map(|v| v.unwrap().expose_secret().to_owned()).collect::<Vec<_>>())
            })?;
            prop_assert!(back == batch, "batch did not round-trip in order");
            Ok(())
        })
        .unwrap();
}

#[tokio::test]
async fn concurrent_single_requests_are_group_committed_and_all_durable() {
    let fx = Fixture::new();
    let vault = fx.create().await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let vault = vault.clone();
        tasks.push(tokio::spawn(async move {
            let value = format!("concurrent value {i}");
            let token = vault.tokenize(&who(), "name", vec![PiiValue::new(value.clone())]).await.unwrap();
            (value, token.into_iter().next().unwrap().unwrap().into_string())
        }));
    }
    let mut pairs = Vec::new();
    for task in tasks {
        pairs.push(task.await.unwrap());
    }
    drop(vault);
    let vault = fx.open().await;
    let tokens: Vec<String> = pairs.iter().map(|(_, t)| t.clone()).collect();
    let back = detokenize_strings(&vault, "name", &tokens).await;
    let expected: Vec<Result<String, ItemError>> = pairs.iter().map(|(v, _)| Ok(v.clone())).collect();
    assert_eq!(back, expected);
}

#[tokio::test]
async fn unknown_deleted_malformed_and_foreign_tokens_are_all_not_found() {
    let fx = Fixture::new();
    let vault = fx.create().await;
    let card = tokenize_ok(&vault, "card", &["4111111111111111", "4000056655665556"]).await;
    let ssn = tokenize_ok(&vault, "ssn", &["078-05-1120"]).await;
    assert_eq!(vault.delete(&who(), "card", vec![card[1].clone()]).await.unwrap(), vec![Ok(())]);

    let unknown = token_from_bytes(&"card".parse::<TokenPrefix>().unwrap(), &[7; 16]).into_string();
    let ssn_as_card = format!("card{}", &ssn[0][3..]); // right prefix, body of another collection's token
    let asked = vec![
        card[0].clone(),
        unknown,
        card[1].clone(), // deleted
        ssn[0].clone(),  // foreign collection
        ssn_as_card,
        "not a token".to_owned(),
        String::new(),
        "card_".repeat(1000),
    ];
    let back = detokenize_strings(&vault, "card", &asked).await;
    assert_eq!(back[0], Ok("4111111111111111".to_owned()));
    for (i, item) in back.iter().enumerate().skip(1) {
        assert_eq!(item, &Err(ItemError::NotFound), "item {i}");
        assert_eq!(item.as_ref().unwrap_err().code(), ItemErrorCode::NotFound);
    }
    // The foreign token is still fine in its own collection.
    assert_eq!(detokenize_strings(&vault, "ssn", &ssn).await, vec![Ok("078-05-1120".to_owned())]);
}

#[tokio::test]
async fn delete_answers_per_item_and_only_once() {
    let fx = Fixture::new();
    let vault = fx.create().await;
    let tokens = tokenize_ok(&vault, "phone", &["+1 555 0100", "+1 555 0101"]).await;
    let result = vault
        .delete(&who(), "phone", vec![tokens[0].clone(), "junk".to_owned(), tokens[0].clone(), tokens[1].clone()])
        .await
        .unwrap();
    assert_eq!(result, vec![Ok(()), Err(ItemError::NotFound), Err(ItemError::NotFound), Ok(())]);
    let back = detokenize_strings(&vault, "phone", &tokens).await;
    assert_eq!(back, vec![Err(ItemError::NotFound), Err(ItemError::NotFound)]);
}

#[tokio::test]
async fn invalid_values_fail_alone_and_limits_are_enforced() {
    let fx = Fixture::new();
    let vault = fx.create().await;
    let max = fx.config.limits.max_value_bytes;
    let at_limit = "x".repeat(max);
    let over = "y".repeat(max + 1);
    let multibyte_over = "é".repeat(max / 2 + 1); // max/2+1 chars, max+2 bytes
    let result = vault
        .tokenize(
            &who(),
            "name",
            vec![
                PiiValue::from("ok"),
                PiiValue::from(""),
                PiiValue::new(at_limit.clone()),
                PiiValue::new(over),
                PiiValue::new(multibyte_over),
            ],
        )
        .await
        .unwrap();
    assert!(result[0].is_ok());
    assert_eq!(result[1], Err(ItemError::EmptyValue));
    assert_eq!(result[1].as_ref().unwrap_err().code(), ItemErrorCode::InvalidValue);
    assert!(result[2].is_ok());
    assert_eq!(result[3], Err(ItemError::ValueTooLong { max }));
    assert_eq!(result[4], Err(ItemError::ValueTooLong { max }));
    let stored = [result[0].clone().unwrap().into_string(), result[2].clone().unwrap().into_string()];
    assert_eq!(detokenize_strings(&vault, "name", &stored).await, vec![Ok("ok".to_owned()), Ok(at_limit)]);
    assert_eq!(vault.record_counts().await.unwrap().iter().find(|(c, _)| c == "name").unwrap().1, 2);

    // Whole-request refusals change nothing.
    let limit = fx.config.limits.max_items_per_call;
    assert!(matches!(vault.tokenize(&who(), "name", Vec::new()).await, Err(VaultError::EmptyRequest)));
    assert!(matches!(vault.detokenize(&who(), "name", Vec::new()).await, Err(VaultError::EmptyRequest)));
    assert!(matches!(vault.delete(&who(), "name", Vec::new()).await, Err(VaultError::EmptyRequest)));
    let too_many: Vec<PiiValue> = (0..=limit).map(|i| PiiValue::new(i.to_string())).collect();
    assert!(matches!(
        vault.tokenize(&who(), "name", too_many).await,
        Err(VaultError::TooManyItems { got, max }) if got == limit + 1 && max == limit
    ));
    let too_many_tokens = vec![stored[0].clone(); limit + 1];
    assert!(matches!(
        vault.detokenize(&who(), "name", too_many_tokens.clone()).await,
        Err(VaultError::TooManyItems { .. })
    ));
    assert!(matches!(vault.delete(&who(), "name", too_many_tokens).await, Err(VaultError::TooManyItems { .. })));
    assert!(matches!(vault.tokenize(&who(), "nope", values(&["v"])).await, Err(VaultError::UnknownCollection)));
    assert!(matches!(
        vault.detokenize(&who(), "nope", vec![stored[0].clone()]).await,
        Err(VaultError::UnknownCollection)
    ));
    assert!(matches!(vault.delete(&who(), "CARD", vec![stored[0].clone()]).await, Err(VaultError::UnknownCollection)));
    assert_eq!(vault.record_counts().await.unwrap().iter().map(|(_, n)| n).sum::<u64>(), 2);
    assert_eq!(detokenize_strings(&vault, "name", &stored[..1]).await, vec![Ok("ok".to_owned())]);
}

#[tokio::test]
async fn configured_limits_apply() {
    let fx = Fixture::with_config("[limits]\nmax_items_per_call = 3\nmax_value_bytes = 5\n");
    let vault = fx.create().await;
    let result = vault.tokenize(&who(), "ssn", values(&["12345", "123456"])).await.unwrap();
    assert!(result[0].is_ok());
    assert_eq!(result[1], Err(ItemError::ValueTooLong { max: 5 }));
    assert!(matches!(
        vault.tokenize(&who(), "ssn", values(&["1", "2", "3", "4"])).await,
        Err(VaultError::TooManyItems { got: 4, max: 3 })
    ));
}

/// Hands out the same token for its first `repeats` draws, then random ones.
struct Repeating {
    repeats: usize,
    calls: AtomicUsize,
}

impl TokenGenerator for Repeating {
    fn fill(&self, buf: &mut [u8]) -> Result<(), CryptoError> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.repeats {
            buf.fill(0xab);
            Ok(())
        } else {
            RandomTokens.fill(buf)
        }
    }
}

/// Lets the test keep a handle on the generator it gives the vault.
struct Shared(Arc<Repeating>);

impl TokenGenerator for Shared {
    fn fill(&self, buf: &mut [u8]) -> Result<(), CryptoError> {
        self.0.fill(buf)
    }
}

/// A collection of shaped tokens (placed by FF1, not sealed).
const PIN: &str = "[collections.pin]\nformat = \"digits\"\nmin_len = 9\n";

#[tokio::test]
async fn shaped_tokens_are_unique_by_construction_and_draw_nothing() {
    let fx = Fixture::with_config(PIN);
    // A source that only repeats itself: shaped tokens never use it.
    let generator = Arc::new(Repeating { repeats: usize::MAX, calls: AtomicUsize::new(0) });
    let vault = fx.create_with(Box::new(Shared(generator.clone()))).await;
    let values_in = ["123456789", "123456789", "987654321", "111-22-3333"];
    let tokens = tokenize_ok(&vault, "pin", &values_in).await;
    assert_eq!(generator.calls.load(Ordering::SeqCst), 0, "no draw for a shaped token");
    let distinct: std::collections::HashSet<&String> = tokens.iter().collect();
    assert_eq!(distinct.len(), 4, "the same value twice still gets two tokens: {tokens:?}");
    assert!(tokens[3].len() == 11 && tokens[3].as_bytes()[3] == b'-' && tokens[3].as_bytes()[6] == b'-', "{tokens:?}");
    let back = detokenize_strings(&vault, "pin", &tokens).await;
    assert_eq!(back, values_in.iter().map(|v| Ok((*v).to_owned())).collect::<Vec<_>>());
    // In another writing, the same token; one digit changed, another place
    // or none, and never this record.
    let bare = tokens[3].replace('-', "");
    assert_eq!(detokenize_strings(&vault, "pin", &[bare]).await, vec![Ok("111-22-3333".to_owned())]);
    let mut forged = tokens[0].clone().into_bytes();
    forged[8] = if forged[8] == b'0' { b'1' } else { b'0' };
    let forged = String::from_utf8(forged).unwrap();
    assert_eq!(detokenize_strings(&vault, "pin", &[forged]).await, vec![Err(ItemError::NotFound)]);
}

#[tokio::test]
async fn a_deleted_shaped_token_is_never_reissued() {
    let fx = Fixture::with_config(PIN);
    let vault = fx.create().await;
    let first = tokenize_ok(&vault, "pin", &["123456789"]).await;
    assert_eq!(vault.delete(&who(), "pin", first.clone()).await.unwrap(), vec![Ok(())]);
    assert_eq!(detokenize_strings(&vault, "pin", &first).await, vec![Err(ItemError::NotFound)]);
    // The same value again, and after a restart: other numbers, other tokens.
    let again = tokenize_ok(&vault, "pin", &["123456789"]).await;
    drop(vault);
    let vault = fx.open().await;
    let after_restart = tokenize_ok(&vault, "pin", &["123456789"]).await;
    assert_ne!(again, first);
    assert_ne!(after_restart, first);
    assert_ne!(after_restart, again);
    assert_eq!(detokenize_strings(&vault, "pin", &first).await, vec![Err(ItemError::NotFound)]);
    assert_eq!(
        detokenize_strings(&vault, "pin", &[again[0].clone(), after_restart[0].clone()]).await,
        vec![Ok("123456789".to_owned()), Ok("123456789".to_owned())]
    );
}

#[tokio::test]
async fn default_tokens_are_unique_by_construction_without_retries() {
    let fx = Fixture::new();
    // A source that only ever repeats itself: the random halves are all
    // equal, the tokens still differ (their sequence numbers do), and
    // nothing is drawn twice.
    let generator = Arc::new(Repeating { repeats: usize::MAX, calls: AtomicUsize::new(0) });
    let vault = fx.create_with(Box::new(Shared(generator.clone()))).await;
    let tokens = tokenize_ok(&vault, "card", &["first", "second", "third"]).await;
    assert_eq!(generator.calls.load(Ordering::SeqCst), 3, "one draw per token");
    let distinct: std::collections::HashSet<&String> = tokens.iter().collect();
    assert_eq!(distinct.len(), 3, "{tokens:?}");
    assert!(tokens.iter().all(|t| t.starts_with("card_") && t.len() == 5 + 22), "{tokens:?}");
    let back = detokenize_strings(&vault, "card", &tokens).await;
    assert_eq!(back, vec![Ok("first".to_owned()), Ok("second".to_owned()), Ok("third".to_owned())]);
    // A token with its body changed opens to another place, or the same
    // place with another random half: unknown either way.
    let mut forged = tokens[0].clone().into_bytes();
    forged[10] = if forged[10] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    assert_eq!(detokenize_strings(&vault, "card", &[forged]).await, vec![Err(ItemError::NotFound)]);
}

#[tokio::test]
async fn no_file_in_the_data_directory_contains_a_tokenized_value() {
    let fx = Fixture::new();
    let vault = fx.create().await;
    let secrets = [
        "4929-3815-7744-2291-PIIVAULT",
        "jane.q.unguessable@example.org",
        "Unguessable Surname Ölafsdóttir",
        "999-88-7777-piivault",
    ];
    let mut tokens = Vec::new();
    for (collection, value) in ["card", "email", "name", "ssn"].into_iter().zip(secrets) {
        tokens.push((collection, tokenize_ok(&vault, collection, &[value]).await));
    }
    // While open (the WAL holds the newest pages) ...
    let files = all_files(&fx.dir);
    assert!(files.iter().any(|(p, _)| p.ends_with("vault.db-wal")), "expected a WAL file");
    for (path, bytes) in &files {
        for secret in secrets {
            assert!(!contains(bytes, secret.as_bytes()), "a value is in clear in {}", path.display());
        }
    }
    // ... and after close, when the WAL is checkpointed into vault.db and
    // removed.
    drop(vault);
    let files = all_files(&fx.dir);
    assert!(files.iter().any(|(p, b)| p.ends_with("vault.db") && b.len() > 4096));
    assert!(!files.iter().any(|(p, _)| p.ends_with("vault.db-wal")), "the WAL should be checkpointed on close");
    for (path, bytes) in &files {
        for secret in secrets {
            assert!(!contains(bytes, secret.as_bytes()), "a value is in clear in {}", path.display());
        }
    }
    let vault = fx.open().await;
    for ((collection, token), value) in tokens.iter().zip(secrets) {
        assert_eq!(detokenize_strings(&vault, collection, token).await, vec![Ok(value.to_owned())]);
    }
}

#[tokio::test]
async fn reopening_returns_every_acknowledged_value() {
    let fx = Fixture::new();
    let vault = fx.create().await;
    let tokens = tokenize_ok(&vault, "email", &["a@example.org", "b@example.org", "c@example.org"]).await;
    vault.delete(&who(), "email", vec![tokens[1].clone()]).await.unwrap();
    drop(vault);
    let vault = fx.open().await;
    let back = detokenize_strings(&vault, "email", &tokens).await;
    assert_eq!(back, vec![Ok("a@example.org".into()), Err(ItemError::NotFound), Ok("c@example.org".into())]);
}

fn raw_db(fx: &Fixture) -> common::tamper::Connection {
    common::tamper::open(&fx.db_path())
}

#[tokio::test]
async fn a_corrupted_or_moved_ciphertext_fails_only_its_own_item() {
    let fx = Fixture::new();
    let vault = fx.create().await;
    let tokens = tokenize_ok(&vault, "card", &["4111111111111111", "5500000000000004", "340000000000009"]).await;
    let other = tokenize_ok(&vault, "ssn", &["078-05-1120"]).await;
    drop(vault);
    {
        let db = raw_db(&fx);
        // Records are kept in the order they were added.
        let first = common::tamper::nth_record(&db, "card", 0);
        let third = common::tamper::nth_record(&db, "card", 2);
        let ssn = common::tamper::nth_record(&db, "ssn", 0);
        // Flip one bit of the first record.
        let mut ct: Vec<u8> = db
            .query_row(
                "SELECT ciphertext FROM records WHERE collection_id = ?1 AND seq = ?2",
                [first.0, first.1],
                |r| r.get(0),
            )
            .unwrap();
        ct[20] ^= 0x04;
        db.execute(
            "UPDATE records SET ciphertext = ?1 WHERE collection_id = ?2 AND seq = ?3",
            common::tamper::params![ct, first.0, first.1],
        )
        .unwrap();
        // Move the ssn record's ciphertext onto the third card token.
        db.execute(
            "UPDATE records SET ciphertext = (SELECT ciphertext FROM records WHERE collection_id = ?1 AND seq = ?2)
             WHERE collection_id = ?3 AND seq = ?4",
            [ssn.0, ssn.1, third.0, third.1],
        )
        .unwrap();
    }
    let vault = fx.open().await;
    let back = detokenize_strings(&vault, "card", &tokens).await;
    assert_eq!(back, vec![Err(ItemError::Unreadable), Ok("5500000000000004".into()), Err(ItemError::Unreadable)]);
    assert_eq!(back[0].as_ref().unwrap_err().code(), ItemErrorCode::Unreadable);
    assert_eq!(detokenize_strings(&vault, "ssn", &other).await, vec![Ok("078-05-1120".into())]);
}

#[tokio::test]
async fn a_store_from_a_newer_version_or_another_program_is_refused() {
    let fx = Fixture::new();
    let vault = fx.create().await;
    let tokens = tokenize_ok(&vault, "card", &["4111111111111111"]).await;
    drop(vault);
    raw_db(&fx).pragma_update(None, "user_version", 99).unwrap();
    assert!(matches!(fx.try_open().await, Err(VaultError::Store(StoreError::TooNew { .. }))));
    let current = i64::try_from(piivault::store::sqlite::schema_version()).unwrap();
    raw_db(&fx).pragma_update(None, "user_version", current).unwrap();
    assert_eq!(detokenize_strings(&fx.open().await, "card", &tokens).await, vec![Ok("4111111111111111".into())]);

    // Not SQLite at all.
    let garbage = Fixture::new();
    std::fs::write(garbage.db_path(), b"this is not a database, just some bytes that are long enough to matter....")
        .unwrap();
    assert!(matches!(garbage.try_open().await, Err(VaultError::Store(StoreError::NotAVault))));
    // SQLite, but another application's.
    let foreign = Fixture::new();
    common::tamper::open(&foreign.db_path()).execute_batch("CREATE TABLE t (x); PRAGMA user_version = 1;").unwrap();
    assert!(matches!(foreign.try_open().await, Err(VaultError::Store(StoreError::NotAVault))));
    // Missing, and `create` over an existing store.
    let missing = Fixture::new();
    assert!(matches!(missing.try_open().await, Err(VaultError::Store(StoreError::Missing))));
    assert!(matches!(Vault::create(&fx.config, &fx.root()).await, Err(VaultError::Store(StoreError::AlreadyExists))));
}

#[tokio::test]
async fn a_different_root_key_cannot_open_the_keyring() {
    let fx = Fixture::new();
    drop(fx.create().await);
    let other = piivault::crypto::root::create(
        &piivault::crypto::root::Unlock::RawKey(piivault::crypto::root::RawKey::parse(&[0x22; 32]).unwrap()),
        piivault::crypto::root::MIN_KDF,
    )
    .unwrap()
    .0;
    let err = Vault::open(&fx.config, &other).await.err().unwrap();
    assert!(matches!(err, VaultError::Keyring { .. }), "{err}");
    assert!(err.to_string().contains("does not open with this root key"), "{err}");
}

#[tokio::test]
async fn a_collection_added_to_the_config_later_gets_its_own_key() {
    let fx = Fixture::new();
    drop(fx.create().await);
    let mut config = fx.config.clone();
    let extra = piivault::Config::parse("[collections.iban]\n", &fx.dir).unwrap();
    config.collections.extend(extra.collections);
    let vault = Vault::open(&config, &fx.root()).await.unwrap();
    assert_eq!(vault.collection_names(), ["card", "email", "iban", "name", "phone", "ssn"]);
    let tokens = tokenize_ok(&vault, "iban", &["GB82 WEST 1234 5698 7654 32"]).await;
    assert_eq!(detokenize_strings(&vault, "iban", &tokens).await, vec![Ok("GB82 WEST 1234 5698 7654 32".into())]);
}

#[tokio::test]
async fn a_full_disk_fails_the_write_and_keeps_earlier_data_readable() {
    let fs = Tmpfs::mount("4m");
    let fx = Fixture::in_dir(fs.dir.path(), "[limits]\nmax_value_bytes = 65536\n");
    let vault = fx.create().await;
    let kept = tokenize_ok(&vault, "name", &["kept before the disk filled"]).await;
    // Room to give back once the disk is full: reading is audited, and an
    // audit record needs a little space (without it, reads fail closed);
    // closing checkpoints the WAL into the database, which needs as much
    // again as the WAL holds.
    let ballast = fs.dir.path().join("ballast");
    std::fs::write(&ballast, vec![0u8; 2 << 20]).unwrap();
    let big = "z".repeat(60_000);
    let mut full = None;
    for _ in 0..128 {
        match vault.tokenize(&who(), "name", vec![PiiValue::new(big.clone())]).await {
            Ok(results) => assert!(results[0].is_ok()),
            Err(e) => {
                full = Some(e);
                break;
            }
        }
    }
    let full = full.expect("a 4 MiB filesystem must fill up");
    assert!(matches!(full, VaultError::Store(StoreError::Full)), "{full}");
    assert_eq!(full.to_string(), "store unavailable: the database disk is full");
    std::fs::remove_file(&ballast).unwrap();
    assert_eq!(detokenize_strings(&vault, "name", &kept).await, vec![Ok("kept before the disk filled".into())]);
    // With space back, writes work again without a restart.
    let after = tokenize_ok(&vault, "name", &["written once space returned"]).await;
    assert_eq!(detokenize_strings(&vault, "name", &after).await, vec![Ok("written once space returned".into())]);
    drop(vault);
    // The store still opens and holds what was acknowledged.
    let vault = fx.open().await;
    assert_eq!(detokenize_strings(&vault, "name", &kept).await, vec![Ok("kept before the disk filled".into())]);
}

#[tokio::test]
async fn a_read_only_data_directory_refuses_to_open_and_loses_nothing() {
    let fs = Tmpfs::mount("4m");
    let fx = Fixture::in_dir(fs.dir.path(), "");
    let vault = fx.create().await;
    let tokens = tokenize_ok(&vault, "card", &["4111111111111111"]).await;
    drop(vault);
    fs.remount("ro");
    let err = fx.try_open().await.err().unwrap();
    assert!(
        matches!(err, VaultError::Store(StoreError::ReadOnly | StoreError::CannotOpen(_))),
        "unexpected error: {err}"
    );
    fs.remount("rw");
    assert_eq!(detokenize_strings(&fx.open().await, "card", &tokens).await, vec![Ok("4111111111111111".into())]);
}
