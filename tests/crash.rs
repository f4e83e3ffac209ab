//! SIGKILL in the middle of key operations and traffic: the vault must come
//! back with exactly one primary per collection, every acknowledged value
//! readable, and the interrupted operation finishing when run again.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use common::server::{BIN, DevServer};
use piivault::grpc::proto::{self, DetokenizeRequest, TokenizeRequest, detokenize_result, tokenize_result};

fn keys(server: &DevServer, args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .arg("keys")
        .args(args)
        .args(["--data-dir", server.dir.to_str().unwrap(), "--as", "admin", "--addr", &server.addr.to_string()])
        .output()
        .unwrap()
}

async fn check_invariants(server: &DevServer, acknowledged: &[(String, String)]) {
    // Exactly one primary per collection and key purpose.
    let mut admin = proto::admin_client::AdminClient::new(server.channel("admin").await);
    let listed = admin.list_keys(proto::ListKeysRequest { collection: String::new() }).await.unwrap().into_inner();
    for c in &listed.collections {
        for purpose in ["data", "index"] {
            let primaries = c.versions.iter().filter(|v| v.purpose == purpose && v.state == "primary").count();
            let expected = usize::from(purpose == "data" || ["ssn", "email"].contains(&c.collection.as_str()));
            assert_eq!(primaries, expected, "collection {} has {primaries} primary {purpose} keys", c.collection);
        }
    }
    // Every acknowledged value comes back.
    assert_acknowledged_readable(server, "card", acknowledged).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_rotation_reencryption_and_traffic() {
    let mut server = DevServer::start();
    let mut writer = server.client("writer").await;
    let mut acknowledged = Vec::new();
    let seed: Vec<String> = (0..600).map(|i| format!("4000 0000 0000 {i:04}")).collect();
    for chunk in seed.chunks(300) {
        let response = writer
            .tokenize(TokenizeRequest { collection: "card".into(), values: chunk.to_vec() })
            .await
            .unwrap()
            .into_inner();
        for (value, result) in chunk.iter().zip(response.results) {
            let Some(tokenize_result::Outcome::Token(token)) = result.outcome else { panic!("seed failed") };
            acknowledged.push((token, value.clone()));
        }
    }
    let mut kills_mid_reencryption = 0;
    for round in 0..10u64 {
        // Rotate and re-encrypt in small batches in the background, with
        // writes going on, and kill the server at a different moment each
        // round (0 to 180 ms in).
        let (dir, addr) = (server.dir.clone(), server.addr.to_string());
        let operations = std::thread::spawn(move || {
            let run = |args: &[&str]| {
                std::process::Command::new(BIN)
                    .arg("keys")
                    .args(args)
                    .args(["--data-dir", dir.to_str().unwrap(), "--as", "admin", "--addr", &addr])
                    .output()
                    .unwrap()
            };
            let rotated = run(&["rotate", "--collection", "card"]);
            let reencrypted = run(&["reencrypt", "--collection", "card", "--batch", "8"]);
            (rotated.status.success(), reencrypted.status.success())
        });
        let mut writer = server.client("writer").await;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(round * 20);
        let mut i = 0;
        loop {
            let value = format!("5500 0000 {round:04} {i:04}");
            if let Ok(response) =
                writer.tokenize(TokenizeRequest { collection: "card".into(), values: vec![value.clone()] }).await
                && let Some(tokenize_result::Outcome::Token(token)) = response.into_inner().results.remove(0).outcome
            {
                acknowledged.push((token, value));
            }
            i += 1;
            if tokio::time::Instant::now() >= deadline {
                break;
            }
        }
        let data_dir = server.dir.clone();
        let tmp = server.kill();
        let (rotated, reencrypted) = operations.join().unwrap();
        if rotated && !reencrypted {
            kills_mid_reencryption += 1;
        }
        drop(writer);
        server = DevServer::start_in(tmp, data_dir);
        check_invariants(&server, &acknowledged).await;
        // Running the interrupted operation again finishes it.
        let out = keys(&server, &["reencrypt", "--collection", "card", "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let last: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
        assert_eq!((last["done"].as_bool(), last["remaining"].as_u64()), (Some(true), Some(0)), "round {round}");
        check_invariants(&server, &acknowledged).await;
    }
    assert!(kills_mid_reencryption >= 1, "no round killed the server during a re-encryption; widen the window");
    // The audit trail survived every kill intact.
    assert_audit_verifies(server);
}

/// Every acknowledged `(token, value)` of `collection` detokenizes to its
/// value.
async fn assert_acknowledged_readable(server: &DevServer, collection: &str, acknowledged: &[(String, String)]) {
    let mut reader = server.client("reader").await;
    for chunk in acknowledged.chunks(500) {
        let tokens = chunk.iter().map(|(t, _)| t.clone()).collect();
        let request = DetokenizeRequest { collection: collection.into(), tokens };
        let back = reader.detokenize(request).await.unwrap().into_inner();
        for ((_, value), result) in chunk.iter().zip(back.results) {
            match result.outcome.unwrap() {
                detokenize_result::Outcome::Value(v) => assert!(v == *value, "a value came back wrong"),
                detokenize_result::Outcome::Error(e) => panic!("an acknowledged token is lost: {e:?}"),
            }
        }
    }
}

/// Twenty SIGKILLs at different moments of concurrent tokenize load: after
/// each, the database passes `integrity_check`, the server restarts, and
/// every token a client saw acknowledged reads back; at the end the audit
/// chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_concurrent_load_twenty_times() {
    let mut server = DevServer::start();
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    let mut checked = 0;
    for round in 0..20u64 {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut callers = Vec::new();
        for caller in 0..8u64 {
            let (stop, acknowledged) = (stop.clone(), acknowledged.clone());
            let mut writer = server.client("writer").await;
            callers.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let values: Vec<String> = (0..10).map(|i| format!("r{round} c{caller} n{n} i{i}")).collect();
                    n += 1;
                    let request = TokenizeRequest { collection: "name".into(), values: values.clone() };
                    // A request the kill cuts off was never acknowledged.
                    let Ok(response) = writer.tokenize(request).await else { break };
                    let mut seen = acknowledged.lock().unwrap();
                    for (value, result) in values.into_iter().zip(response.into_inner().results) {
                        if let Some(tokenize_result::Outcome::Token(token)) = result.outcome {
                            seen.push((token, value));
                        }
                    }
                }
            }));
        }
        // A different moment each round: 20 to 290 ms into the load.
        tokio::time::sleep(Duration::from_millis(20 + round * 37 % 271)).await;
        let data_dir = server.dir.clone();
        let tmp = server.kill();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for caller in callers {
            caller.await.unwrap();
        }
        {
            let db = common::tamper::open(&data_dir.join("vault.db"));
            let check: String = db.query_row("PRAGMA integrity_check", [], |row| row.get(0)).unwrap();
            assert_eq!(check, "ok", "round {round}");
        }
        server = DevServer::start_in(tmp, data_dir);
        // What this round acknowledged reads back now; everything, at the end.
        let seen = acknowledged.lock().unwrap().clone();
        assert_acknowledged_readable(&server, "name", &seen[checked..]).await;
        checked = seen.len();
    }
    let all = acknowledged.lock().unwrap().clone();
    assert!(all.len() >= 20 * 8, "the load never got going: {} acknowledged", all.len());
    assert_acknowledged_readable(&server, "name", &all).await;
    assert_audit_verifies(server);
}

/// `piivault audit verify` on the server's data directory says ok.
fn assert_audit_verifies(server: DevServer) {
    let out = std::process::Command::new(BIN)
        .args(["audit", "verify", "--data-dir", server.dir.to_str().unwrap()])
        .output()
        .unwrap();
    drop(server);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok: "), "{}", String::from_utf8_lossy(&out.stdout));
}
