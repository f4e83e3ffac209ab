//! Collection behaviour in process against a real store: deterministic
//! tokens (also under concurrency), blind-index rotation and rebuild,
//! expiry and purge, erasure from the raw files, and the token-space limit.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{Fixture, all_files, contains, detokenize_strings as reveal, tokenize_ok, values, who};
use piivault::grpc::{Failure, status_of};
use piivault::store::AuditFilter;
use piivault::{ItemError, Vault, VaultError};

/// Index keys of `collection` as `(version, state, entries)`.
async fn index_keys(vault: &Vault, collection: &str) -> Vec<(u32, String, u64)> {
    vault
        .list_keys(&who(), collection)
        .await
        .unwrap()
        .into_iter()
        .filter(|k| k.purpose == piivault::crypto::keyring::KeyPurpose::Index)
        .map(|k| (k.version, k.state.as_str().to_owned(), k.records))
        .collect()
}

const DETERMINISTIC: &str = "[collections.tin]\nformat = \"digits\"\ndeterministic = true\nmin_len = 9\n\
     [collections.mail]\nformat = \"email\"\ndeterministic = true\nnormalize = [\"trim\", \"lowercase\"]\n";

#[tokio::test]
async fn deterministic_tokens_one_per_value_even_under_concurrency() {
    let fx = Fixture::with_config(DETERMINISTIC);
    let vault = fx.create().await;
    let values: Vec<String> = (0..40).map(|i| format!("{:03}-{:02}-{:04}", 100 + i, i, 1000 + i)).collect();
    // Sixteen concurrent requests, each with every value (in different
    // orders, and some values twice in one batch).
    let mut tasks = Vec::new();
    for task in 0..16usize {
        let vault = vault.clone();
        let mut mine = values.clone();
        mine.rotate_left(task * 3 % values.len());
        mine.push(mine[0].clone());
        tasks.push(tokio::spawn(async move {
            let refs: Vec<&str> = mine.iter().map(String::as_str).collect();
            let tokens = tokenize_ok(&vault, "tin", &refs).await;
            mine.into_iter().zip(tokens).collect::<Vec<_>>()
        }));
    }
    let mut seen: HashMap<String, String> = HashMap::new();
    for task in tasks {
        for (value, token) in task.await.unwrap() {
            assert_ne!(value, token);
            let first = seen.entry(value).or_insert_with(|| token.clone());
            assert_eq!(*first, token, "one value got two tokens");
        }
    }
    assert_eq!(seen.len(), values.len());
    let distinct: HashSet<&String> = seen.values().collect();
    assert_eq!(distinct.len(), values.len(), "two values share a token");
    // One record per value, however many requests asked.
    let counts = vault.record_counts().await.unwrap();
    assert!(counts.contains(&("tin".to_owned(), 40)), "{counts:?}");
    let (v, t): (Vec<String>, Vec<String>) = seen.into_iter().unzip();
    assert_eq!(reveal(&vault, "tin", &t).await, v.into_iter().map(Ok).collect::<Vec<_>>());

    // Normalization decides what "the same value" is, and what is stored.
    let mail =
        tokenize_ok(&vault, "mail", &["Jane.Doe@Example.ORG ", "jane.doe@example.org", "john@example.org"]).await;
    assert_eq!(mail[0], mail[1]);
    assert_ne!(mail[0], mail[2]);
    assert!(mail[0].ends_with("@example.org"));
    assert_eq!(reveal(&vault, "mail", &mail[..1]).await, vec![Ok("jane.doe@example.org".to_owned())]);

    // A deleted value's token is gone for good: the value gets a new one.
    assert_eq!(vault.delete(&who(), "mail", mail[..1].to_vec()).await.unwrap(), vec![Ok(())]);
    let again = tokenize_ok(&vault, "mail", &["jane.doe@example.org"]).await;
    assert_ne!(again[0], mail[0]);
    assert_eq!(reveal(&vault, "mail", &mail[..1]).await, vec![Err(ItemError::NotFound)]);
    assert_eq!(tokenize_ok(&vault, "mail", &["JANE.DOE@example.org"]).await, again);
}

#[tokio::test]
async fn the_index_key_rotates_online_and_the_index_is_rebuilt() {
    let fx = Fixture::with_config(DETERMINISTIC);
    let vault = fx.create().await;
    let values: Vec<String> = (0..1200).map(|i| format!("{:09}", 500_000_000 + i * 7)).collect();
    let refs: Vec<&str> = values.iter().map(String::as_str).collect();
    let mut tokens = tokenize_ok(&vault, "tin", &refs[..600]).await;
    tokens.extend(tokenize_ok(&vault, "tin", &refs[600..]).await);
    assert_eq!(index_keys(&vault, "tin").await, vec![(1, "primary".to_owned(), 1200)]);

    let version = vault.rotate_index_key(&who(), "tin").await.unwrap();
    assert_eq!(version, 2);
    // While the background rebuild runs, every value still finds its token,
    // and a new value is indexed under the new key.
    let mut rounds = 0;
    loop {
        let sample: Vec<&str> = refs.iter().copied().skip(rounds * 97 % 1100).take(100).collect();
        let start = rounds * 97 % 1100;
        assert_eq!(tokenize_ok(&vault, "tin", &sample).await, tokens[start..start + 100].to_vec());
        rounds += 1;
        let keys = index_keys(&vault, "tin").await;
        if keys.iter().any(|(v, state, _)| *v == 1 && state == "retired") {
            break;
        }
        assert!(rounds < 2000, "the rebuild did not finish: {keys:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let fresh = tokenize_ok(&vault, "tin", &["999999999"]).await;
    assert_eq!(index_keys(&vault, "tin").await, vec![(1, "retired".to_owned(), 0), (2, "primary".to_owned(), 1201)]);
    assert_eq!(tokenize_ok(&vault, "tin", &refs[..50]).await, tokens[..50].to_vec());
    assert_eq!(tokenize_ok(&vault, "tin", &["999999999"]).await, fresh);
    // The rotation and the rebuild are on the record.
    let actions: Vec<String> = vault
        .query_audit(AuditFilter { collection: Some("tin".into()), ..AuditFilter::default() }, usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, r, _)| r.action)
        .filter(|a| a != "tokenize" && a != "list_keys")
        .collect();
    assert_eq!(actions.first().map(String::as_str), Some("rotate_index_key"));
    assert!(actions.iter().filter(|a| *a == "reindex").count() >= 3, "{actions:?}");
    assert_eq!(actions.last().map(String::as_str), Some("retire_index_keys"));

    // Only deterministic collections have an index key.
    assert!(matches!(vault.rotate_index_key(&who(), "name").await, Err(VaultError::NotDeterministic)));
}

#[tokio::test]
async fn a_collection_made_deterministic_indexes_its_existing_records() {
    let fx = Fixture::with_config("[collections.tin]\nformat = \"digits\"\n");
    let vault = fx.create().await;
    let before = tokenize_ok(&vault, "tin", &["123-45-6789", "987-65-4321"]).await;
    drop(vault);

    let mut fx = fx;
    let text = common::config_text("[collections.tin]\nformat = \"digits\"\ndeterministic = true\n");
    fx.config = piivault::Config::parse(&text, &fx.dir).unwrap();
    let vault = fx.open().await;
    assert_eq!(index_keys(&vault, "tin").await, vec![(1, "primary".to_owned(), 0)]);
    vault.resume_background_work().await.unwrap();
    for _ in 0..500 {
        if index_keys(&vault, "tin").await[0].2 == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(index_keys(&vault, "tin").await, vec![(1, "primary".to_owned(), 2)]);
    assert_eq!(
        tokenize_ok(&vault, "tin", &["987-65-4321", "123-45-6789"]).await,
        vec![before[1].clone(), before[0].clone()]
    );
}

#[tokio::test]
async fn expired_tokens_answer_like_unknown_ones_and_are_purged() {
    let fx = Fixture::with_config(
        "[collections.otp]\nformat = \"digits\"\nttl = \"1s\"\n\
         [collections.sess]\nformat = \"alphanumeric\"\ndeterministic = true\nttl = \"3s\"\n",
    );
    let vault = fx.create().await;
    let otp = tokenize_ok(&vault, "otp", &["481516", "234223"]).await;
    let sess = tokenize_ok(&vault, "sess", &["AB12-cd34-EF56"]).await;
    let keep = tokenize_ok(&vault, "name", &["no ttl here"]).await;
    assert_eq!(reveal(&vault, "otp", &otp).await, vec![Ok("481516".to_owned()), Ok("234223".to_owned())]);
    assert_eq!(tokenize_ok(&vault, "sess", &["AB12-cd34-EF56"]).await, sess);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Expired: exactly the answer of a token never issued, for every call.
    let never = "000000".to_owned();
    assert_eq!(
        reveal(&vault, "otp", &[otp[0].clone(), never.clone()]).await,
        vec![Err(ItemError::NotFound), Err(ItemError::NotFound)]
    );
    let masked = vault.detokenize_masked(&who(), "otp", otp.clone()).await.unwrap();
    assert!(masked.iter().all(|r| matches!(r, Err(ItemError::NotFound))));
    assert_eq!(vault.delete(&who(), "otp", vec![otp[1].clone()]).await.unwrap(), vec![Err(ItemError::NotFound)]);
    // A deterministic value keeps its token until it expires, then gets a
    // new one.
    assert_eq!(tokenize_ok(&vault, "sess", &["AB12-cd34-EF56"]).await, sess);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let renewed = tokenize_ok(&vault, "sess", &["AB12-cd34-EF56"]).await;
    assert_ne!(renewed, sess);
    assert_eq!(reveal(&vault, "sess", &renewed).await, vec![Ok("AB12-cd34-EF56".to_owned())]);
    assert_eq!(reveal(&vault, "name", &keep).await, vec![Ok("no ttl here".to_owned())]);

    // The purge erases both expired otp records (one batch of one, then
    // another), and nothing else; the expired sess record was already
    // erased when its value was tokenized again.
    let counts = vault.record_counts().await.unwrap();
    assert!(counts.contains(&("otp".to_owned(), 2)), "{counts:?}");
    assert_eq!(vault.purge_expired(1).await.unwrap(), 2);
    assert_eq!(vault.purge_expired(1).await.unwrap(), 0);
    let counts = vault.record_counts().await.unwrap();
    assert!(counts.contains(&("otp".to_owned(), 0)) && counts.contains(&("sess".to_owned(), 1)), "{counts:?}");
    let purges: Vec<Vec<String>> = vault
        .query_audit(AuditFilter { action: Some("purge".into()), ..AuditFilter::default() }, usize::MAX)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, r, _)| {
            assert_eq!((r.caller.as_str(), r.collection.as_str(), r.items), ("(expiry)", "otp", 1));
            r.tokens
        })
        .collect();
    let mut purged_tokens: Vec<String> = purges.into_iter().flatten().collect();
    purged_tokens.sort();
    let mut expected = otp.clone();
    expected.sort();
    assert_eq!(purged_tokens, expected);
    // Purged tokens are never issued again: their rows stay as tombstones.
    let raw = common::tamper::open(&fx.db_path());
    let tombstones: i64 = raw
        .query_row(
            "SELECT count(*) FROM records r JOIN collections c ON c.id = r.collection_id
             WHERE c.name = 'otp' AND r.ciphertext IS NULL AND r.deleted_at IS NOT NULL",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(tombstones, 2);
}

#[tokio::test]
async fn erased_ciphertext_is_gone_from_the_database_and_the_wal() {
    let fx = Fixture::with_config(DETERMINISTIC);
    let vault = fx.create().await;
    let secret = "erasure-subject@example.org";
    let token = tokenize_ok(&vault, "mail", &[secret]).await.remove(0);
    let kept = tokenize_ok(&vault, "mail", &["someone-else@example.org"]).await;
    let raw = common::tamper::open(&fx.db_path());
    let (ciphertext, digest): (Vec<u8>, Vec<u8>) = raw
        .query_row(
            "SELECT r.ciphertext, b.digest FROM records r JOIN blind_index b
             ON b.collection_id = r.collection_id AND b.seq = r.seq WHERE r.shaped = ?1",
            [&token],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap();
    drop(raw);
    let files =
        || all_files(&fx.dir).into_iter().filter(|(p, _)| p.to_string_lossy().contains("vault.db")).collect::<Vec<_>>();
    assert!(files().iter().any(|(_, bytes)| contains(bytes, &ciphertext)), "the ciphertext was never on disk");

    assert_eq!(vault.delete(&who(), "mail", vec![token.clone()]).await.unwrap(), vec![Ok(())]);
    // The writer truncates the WAL soon after an erasure, with the vault
    // still serving.
    let mut gone = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if files().iter().all(|(_, bytes)| !contains(bytes, &ciphertext)) {
            gone = true;
            break;
        }
    }
    let names: Vec<String> = files().iter().map(|(p, b)| format!("{} ({} bytes)", p.display(), b.len())).collect();
    assert!(gone, "the erased ciphertext is still in {names:?}");
    for (path, bytes) in files() {
        assert!(!contains(&bytes, &digest), "the blind-index digest is still in {}", path.display());
        assert!(!contains(&bytes, secret.as_bytes()), "the value is in {}", path.display());
    }
    assert_eq!(reveal(&vault, "mail", &[token]).await, vec![Err(ItemError::NotFound)]);
    assert_eq!(reveal(&vault, "mail", &kept).await, vec![Ok("someone-else@example.org".to_owned())]);
}

/// Log lines written while the returned guard lives (on this thread).
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// Marks the first `used` numbers of the sequence of 6-digit tokens of
/// collection `name` as handed out (as if that many had been issued or
/// reserved: none of them is issued again), directly in the file.
fn set_used(fx: &Fixture, name: &str, used: i64) {
    let raw = common::tamper::open(&fx.db_path());
    let changed = raw
        .execute(
            "UPDATE sequences SET next = ?1 + 1
             WHERE shape = 6 AND next <= ?1 AND collection_id = (SELECT id FROM collections WHERE name = ?2)",
            common::tamper::params![used, name],
        )
        .unwrap();
    assert_eq!(changed, 1, "the shape has a sequence below {used}");
}

// Current-thread runtime: the vault logs on the test's thread, where the
// capturing subscriber is installed.
#[tokio::test(flavor = "current_thread")]
async fn a_crowded_collection_warns_at_one_percent_and_refuses_at_ten() {
    // The smallest token space a configuration may have: 10^6.
    let fx = Fixture::with_config("[collections.pin]\nformat = \"digits\"\nmin_len = 6\n");
    let vault = fx.create().await;
    let first = tokenize_ok(&vault, "pin", &["123456"]).await;
    drop(vault);

    let logs = Captured::default();
    let writer = logs.clone();
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish(),
    );
    // 10,000 numbers used: the next value crosses 1%, with one warning.
    set_used(&fx, "pin", 10_000);
    let vault = fx.open().await;
    tokenize_ok(&vault, "pin", &["222222"]).await;
    tokenize_ok(&vault, "pin", &["333333"]).await;
    let warnings: Vec<String> = logs.text().lines().filter(|l| l.contains("WARN")).map(String::from).collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains(
            "the collection holds more than 1% of the token space of this length; new values are refused at 10%"
        ) && warnings[0].contains("collection=pin caller=\"test\" length=6 issued=10000 space=1000000"),
        "{warnings:?}"
    );
    drop(vault);

    // 99,999 used: one more fits, two do not.
    set_used(&fx, "pin", 99_999);
    let vault = fx.open().await;
    let refused = vault.tokenize(&who(), "pin", values(&["111111", "444444"])).await.unwrap_err();
    assert!(matches!(refused, VaultError::TokenSpaceFull { issued: 99_999, space: 1_000_000 }), "{refused:?}");
    let status = status_of(&Failure::Vault(refused));
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(
        status.message(),
        "the collection has issued 99999 of its 1000000 possible tokens; new values are refused"
    );
    let last = tokenize_ok(&vault, "pin", &["111111"]).await;
    assert!(matches!(
        vault.tokenize(&who(), "pin", values(&["444444"])).await,
        Err(VaultError::TokenSpaceFull { issued: 100_000, .. })
    ));
    // The space is counted per length: 7-digit values have their own.
    let longer = tokenize_ok(&vault, "pin", &["1234567"]).await;
    assert_eq!(longer[0].len(), 7);
    // What is stored keeps answering.
    assert_eq!(
        reveal(&vault, "pin", &[first[0].clone(), last[0].clone()]).await,
        vec![Ok("123456".to_owned()), Ok("111111".to_owned())]
    );
}
