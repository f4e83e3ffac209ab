//! The audit trail: a record for every request, written with the data
//! change, chained, append-only, verified offline, and failing closed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::{Fixture, all_files, contains};
use piivault::audit::AuditRecord;
use piivault::store::StoreError;
use piivault::vault::Requester;
use piivault::{PiiValue, Vault, VaultError};

fn alice() -> Requester {
    Requester { caller: "alice".into(), peer: "127.0.0.1:4000".into(), request_id: "req-42".into() }
}

async fn records(vault: &Vault) -> Vec<(u64, AuditRecord)> {
    vault.audit_records(0, 10_000).await.unwrap()
}

fn expect(action: &str, collection: &str, items: u32, tokens: &[String]) -> AuditRecord {
    AuditRecord {
        at_micros: 0,
        caller: "alice".into(),
        action: action.into(),
        collection: collection.into(),
        items,
        tokens: tokens.to_vec(),
        outcome: "OK".into(),
        error_code: String::new(),
        request_id: "req-42".into(),
        peer: "127.0.0.1:4000".into(),
    }
}

/// Each operation leaves exactly its record, checked field by field.
#[tokio::test]
async fn every_operation_leaves_exactly_its_record() {
    let fx = Fixture::new();
    let vault = fx.create().await;
    let secret_values = ["4929 3815 7744 2291 AUDIT", "audit.secret@example.org"];
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros();
    let tokens: Vec<String> = vault
        .tokenize(&alice(), "card", vec![PiiValue::from(secret_values[0]), PiiValue::from("")])
        .await
        .unwrap()
        .into_iter()
        .filter_map(Result::ok)
        .map(piivault::Token::into_string)
        .collect();
    assert_eq!(tokens.len(), 1);
    let unknown = "card_AAAAAAAAAAAAAAAAAAAAAA".to_owned();
    vault.detokenize(&alice(), "card", vec![tokens[0].clone(), unknown.clone()]).await.unwrap();
    vault.detokenize_masked(&alice(), "card", vec![tokens[0].clone()]).await.unwrap();
    vault.delete(&alice(), "card", vec![tokens[0].clone(), unknown]).await.unwrap();
    vault.tokenize(&alice(), "email", vec![PiiValue::from(secret_values[1])]).await.unwrap();
    vault
        .audit_failure(
            &alice(),
            piivault::audit::Event::Tokenize,
            "no_such_collection",
            3,
            piivault::audit::Outcome::PermissionDenied,
            "permission denied",
        )
        .await;

    let got = records(&vault).await;
    let email_token = got[4].1.tokens.clone();
    let mut denied = expect("tokenize", "", 3, &[]);
    denied.outcome = "PERMISSION_DENIED".into();
    denied.error_code = "permission denied".into();
    let wanted = [
        expect("tokenize", "card", 2, &tokens),
        expect("detokenize", "card", 2, &tokens),
        expect("detokenize_masked", "card", 1, &tokens),
        expect("delete", "card", 2, &tokens),
        expect("tokenize", "email", 1, &email_token),
        denied,
    ];
    assert_eq!(got.len(), wanted.len());
    let after = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros();
    for (i, ((seq, record), wanted)) in got.iter().zip(wanted).enumerate() {
        assert_eq!(*seq, i as u64 + 1);
        let at = u128::try_from(record.at_micros).unwrap();
        assert!(before <= at && at <= after, "record {seq} time");
        assert_eq!(AuditRecord { at_micros: 0, ..record.clone() }, wanted, "record {seq}");
    }
    assert_eq!(email_token.len(), 1);
    assert!(email_token[0].starts_with("email_"));

    // The chain verifies, and no value is anywhere in the data directory.
    let head = vault.verify_audit().await.unwrap().unwrap();
    assert_eq!(head.seq, 6);
    drop(vault);
    for (path, bytes) in all_files(&fx.dir) {
        for value in secret_values {
            assert!(!contains(&bytes, value.as_bytes()), "{} holds a value", path.display());
        }
    }
}

/// The database as someone with write access to the file sees it: no
/// foreign-key enforcement unless they ask for it.
fn raw(fx: &Fixture) -> common::tamper::Connection {
    let db = common::tamper::open(&fx.db_path());
    db.pragma_update(None, "foreign_keys", false).unwrap();
    db
}

async fn trail_of_five(fx: &Fixture) {
    let vault = fx.create().await;
    for i in 0..5 {
        vault.tokenize(&alice(), "ssn", vec![PiiValue::new(format!("000-00-000{i}"))]).await.unwrap();
    }
}

/// What verification says: the head, or the first bad record and why.
type Verdict = Result<u64, (u64, &'static str)>;

async fn verify(fx: &Fixture) -> Verdict {
    let vault = fx.open().await;
    vault.verify_audit().await.unwrap().map(|h| h.seq).map_err(|e| (e.seq, e.reason))
}

#[tokio::test]
async fn the_schema_refuses_to_change_or_remove_a_record() {
    let fx = Fixture::new();
    trail_of_five(&fx).await;
    let db = raw(&fx);
    for sql in [
        "UPDATE audit SET caller = 'mallory' WHERE seq = 2",
        "DELETE FROM audit WHERE seq = 5",
        "DELETE FROM audit_records",
    ] {
        let err = db.execute(sql, []).unwrap_err().to_string();
        assert!(err.contains("audit records are append-only"), "{sql}: {err}");
    }
    drop(db);
    assert_eq!(verify(&fx).await, Ok(5));
}

/// The searchable token index is built from the trail's entries behind the
/// write path, in blocks; a block changed below the triggers is found by
/// verification, at the first record it covers.
#[tokio::test]
async fn a_tampered_block_of_the_token_index_is_detected() {
    let fx = Fixture::with_config("[store]\naudit_index_block = 1\n");
    trail_of_five(&fx).await;
    assert_eq!(verify(&fx).await, Ok(5));
    let db = raw(&fx);
    let blocks: Vec<(i64, i64)> = db
        .prepare("SELECT block, last_audit_seq FROM audit_index_blocks ORDER BY block")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(blocks, [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)], "one block per record of one entry");
    db.execute_batch("DROP TRIGGER audit_index_no_delete; DELETE FROM audit_index WHERE block = 2;").unwrap();
    drop(db);
    assert_eq!(verify(&fx).await, Err((2, "the token index disagrees with the trail")));
}

/// An attacker with write access to the file drops the triggers first; the
/// chain still names the first bad record.
#[tokio::test]
async fn tampering_below_the_triggers_is_detected() {
    type Tamper = fn(&common::tamper::Connection);
    let cases: [(&str, Tamper, Verdict); 7] = [
        (
            "hide a token from the index",
            |db| {
                db.execute("DELETE FROM audit_records WHERE audit_seq = 2", []).unwrap();
            },
            Err((2, "query columns do not match the record")),
        ),
        (
            "point a record's index entry at another token's record",
            |db| {
                db.execute(
                    "UPDATE audit_records SET record_seq = (SELECT record_seq FROM audit_records WHERE audit_seq = 2) WHERE audit_seq = 3",
                    [],
                )
                .unwrap();
            },
            Err((3, "query columns do not match the record")),
        ),
        (
            "edit a field",
            |db| {
                db.execute("UPDATE audit SET caller = 'mallory' WHERE seq = 3", []).unwrap();
            },
            Err((3, "query columns do not match the record")),
        ),
        (
            "edit the record itself",
            |db| {
                let mut record: Vec<u8> =
                    db.query_row("SELECT record FROM audit WHERE seq = 2", [], |r| r.get(0)).unwrap();
                let last = record.len() - 1;
                record[last] ^= 1;
                db.execute("UPDATE audit SET record = ?1 WHERE seq = 2", [record]).unwrap();
            },
            Err((2, "MAC mismatch (edited, inserted or reordered)")),
        ),
        (
            "delete a row",
            |db| {
                db.execute("DELETE FROM audit WHERE seq = 4", []).unwrap();
            },
            Err((4, "missing (deleted)")),
        ),
        (
            "swap two rows",
            |db| {
                db.execute_batch(
                "UPDATE audit SET seq = 100 WHERE seq = 2; UPDATE audit SET seq = 2 WHERE seq = 3; UPDATE audit SET seq = 3 WHERE seq = 100;",
            )
            .unwrap();
            },
            Err((2, "sequence number does not match the record")),
        ),
        (
            "insert a forged row",
            |db| {
                let forged = AuditRecord {
                    caller: "mallory".into(),
                    action: "tokenize".into(),
                    outcome: "OK".into(),
                    ..AuditRecord::default()
                };
                db.execute(
                "INSERT INTO audit (seq, at, caller, action, collection, outcome, record, mac) VALUES (6, 0, 'mallory', 'tokenize', '', 'OK', ?1, ?2)",
                common::tamper::params![forged.encode(6), vec![7u8; 32]],
            )
            .unwrap();
            },
            Err((6, "MAC mismatch (edited, inserted or reordered)")),
        ),
    ];
    for (name, tamper, expected) in cases {
        let fx = Fixture::new();
        trail_of_five(&fx).await;
        let db = raw(&fx);
        db.execute_batch(
            "DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete; DROP TRIGGER audit_records_no_update; DROP TRIGGER audit_records_no_delete;",
        )
        .unwrap();
        tamper(&db);
        drop(db);
        assert_eq!(verify(&fx).await, expected, "{name}");
    }
}

/// If the audit record cannot be written, nothing is stored and no value
/// leaves: the request fails as unavailable.
#[tokio::test]
async fn no_audit_record_no_access() {
    let fx = Fixture::new();
    let vault = fx.create().await;
    let token = vault.tokenize(&alice(), "card", vec![PiiValue::from("4111111111111111")]).await.unwrap();
    let token = token.into_iter().next().unwrap().unwrap().into_string();
    drop(vault);
    // A fault the vault cannot prevent: the audit insert is made to fail.
    raw(&fx)
        .execute_batch(
            "CREATE TRIGGER injected BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'injected fault'); END;",
        )
        .unwrap();
    let vault = fx.open().await;
    let records_before = piivault_records(&fx);
    let tokenized = vault.tokenize(&alice(), "card", vec![PiiValue::from("5500000000000004")]).await;
    assert!(matches!(tokenized, Err(VaultError::Store(StoreError::AuditUnavailable))), "{tokenized:?}");
    let read = vault.detokenize(&alice(), "card", vec![token.clone()]).await;
    assert!(matches!(read, Err(VaultError::Store(StoreError::AuditUnavailable))));
    let deleted = vault.delete(&alice(), "card", vec![token.clone()]).await;
    assert!(matches!(deleted, Err(VaultError::Store(StoreError::AuditUnavailable))));
    assert_eq!(piivault_records(&fx), records_before, "nothing was stored or deleted");
    drop(vault);
    raw(&fx).execute_batch("DROP TRIGGER injected;").unwrap();
    let vault = fx.open().await;
    let back = vault.detokenize(&alice(), "card", vec![token]).await.unwrap();
    assert_eq!(back[0].as_ref().unwrap().expose_secret(), "4111111111111111");
    assert_eq!(vault.verify_audit().await.unwrap().unwrap().seq, 2);
}

fn piivault_records(fx: &Fixture) -> (i64, i64) {
    let db = raw(fx);
    let live: i64 =
        db.query_row("SELECT count(*) FROM records WHERE ciphertext IS NOT NULL", [], |r| r.get(0)).unwrap();
    let audit: i64 = db.query_row("SELECT count(*) FROM audit", [], |r| r.get(0)).unwrap();
    (live, audit)
}

/// `piivault audit verify` and `audit head` on a real data directory, and a
/// truncated tail caught with `--expect-head`.
#[test]
fn audit_verify_and_head_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let bin = env!("CARGO_BIN_EXE_piivault");
    let pass = [("PIIVAULT_PASSPHRASE", "audit test passphrase")];
    let run = |args: &[&str]| {
        std::process::Command::new(bin).args(args).envs(pass).env_remove("PIIVAULT_LOG").output().unwrap()
    };
    assert!(run(&["init", "--data-dir", dir]).status.success());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let config = piivault::Config::load(&tmp.path().join("config.toml")).unwrap();
        let sealed = std::fs::read(&config.sealed_root).unwrap();
        let unlock = piivault::crypto::root::Unlock::Passphrase(
            piivault::crypto::root::Passphrase::new(pass[0].1.to_owned()).unwrap(),
        );
        let root = piivault::crypto::root::unseal(&sealed, &unlock).unwrap();
        let vault = Vault::open(&config, &root).await.unwrap();
        for v in ["a", "b", "c"] {
            vault.tokenize(&alice(), "name", vec![PiiValue::from(v)]).await.unwrap();
        }
    });
    let head = run(&["audit", "head", "--data-dir", dir]);
    assert!(head.status.success(), "{}", String::from_utf8_lossy(&head.stderr));
    let head = String::from_utf8(head.stdout).unwrap().trim().to_owned();
    assert!(head.starts_with("3:") && head.len() == 2 + 64, "{head}");
    let ok = run(&["audit", "verify", "--data-dir", dir, "--expect-head", &head]);
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), format!("ok: 3 records, head {head}"));

    // Truncate the tail below the triggers: the chain alone still verifies,
    // the anchored head does not.
    let db = common::tamper::open(&tmp.path().join("vault.db"));
    db.execute_batch("DROP TRIGGER audit_no_delete; DROP TRIGGER audit_records_no_delete; DELETE FROM audit_records WHERE audit_seq = 3; DELETE FROM audit WHERE seq = 3;").unwrap();
    drop(db);
    assert!(run(&["audit", "verify", "--data-dir", dir]).status.success());
    let truncated = run(&["audit", "verify", "--data-dir", dir, "--expect-head", &head]);
    assert_eq!(truncated.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&truncated.stderr).trim(),
        "piivault: audit trail truncated: it ends at record 2 but record 3 was anchored"
    );
    let bad = run(&["audit", "verify", "--data-dir", dir, "--expect-head", "nonsense"]);
    assert_eq!(bad.status.code(), Some(64));
}
