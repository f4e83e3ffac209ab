//! The Rust client (`clients/rust`, `piivault-client`) against the real
//! `piivault dev` binary on a free loopback port.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::server::DevServer;
use piivault_client::{Client, Config, Error, ItemErrorCode};

fn config(server: &DevServer, caller: &str) -> Config {
    let client = server.dir.join("clients").join(caller);
    Config::from_files(
        server.addr.to_string(),
        &server.dir.join("pki/ca.pem"),
        &client.join("cert.pem"),
        &client.join("key.pem"),
    )
    .unwrap()
}

async fn connect(server: &DevServer, caller: &str) -> Client {
    Client::connect(config(server, caller)).await.unwrap()
}

/// Tokenizes `values`, every item expected to succeed.
async fn tokens_of(writer: &Client, collection: &str, values: &[String]) -> Vec<String> {
    writer.tokenize(collection, values).await.unwrap().into_iter().map(Result::unwrap).collect()
}

/// Reads `tokens` back, every item expected to succeed.
async fn values_of(reader: &Client, collection: &str, tokens: &[String]) -> Vec<String> {
    let results = reader.detokenize(collection, tokens).await.unwrap();
    results.into_iter().map(|r| r.unwrap().value.expose().to_owned()).collect()
}

#[tokio::test]
async fn every_sample_collection_round_trips() {
    let server = DevServer::start();
    let writer = connect(&server, "writer").await;
    let reader = connect(&server, "reader").await;
    let support = connect(&server, "support").await;
    for (collection, values) in [
        ("card", ["4111111111111111", "5500 0055 5555 5559"]),
        ("ssn", ["078-05-1120", "219099999"]),
        ("email", ["ada@example.org", "grace@example.com"]),
        ("phone", ["+44 20 7946 0958", "+1 555 010 9999"]),
        ("name", ["Ada Lovelace", "Grace Hopper"]),
    ] {
        let tokens: Vec<String> =
            writer.tokenize(collection, &values).await.unwrap().into_iter().map(Result::unwrap).collect();
        assert_eq!(tokens.len(), 2);
        let back = reader.detokenize(collection, &tokens).await.unwrap();
        let back: Vec<(String, bool)> =
            back.into_iter().map(|r| r.unwrap()).map(|r| (r.value.expose().to_owned(), r.masked)).collect();
        let expected: Vec<(String, bool)> = values
            .iter()
            .map(|v| {
                // ssn drops nothing, email is lowercased (normalize), the rest as given.
                (if collection == "email" { v.to_lowercase() } else { (*v).to_owned() }, false)
            })
            .collect();
        assert_eq!(back, expected, "{collection}");
        let masked = support.detokenize(collection, &tokens[..1]).await.unwrap().remove(0).unwrap();
        assert!(masked.masked);
        assert_ne!(masked.value.expose(), values[0]);
    }
}

#[tokio::test]
async fn a_reader_cannot_tokenize_and_unknown_tokens_fail_alone() {
    let server = DevServer::start();
    let reader = connect(&server, "reader").await;
    let denied = reader.tokenize("card", &["4111111111111111"]).await.unwrap_err();
    assert!(
        matches!(&denied, Error::PermissionDenied(m) if m == "permission denied for this collection"),
        "{denied:?}"
    );
    assert!(!format!("{denied} {denied:?}").contains("4111111111111111"));

    let writer = connect(&server, "writer").await;
    let token = writer.tokenize("name", &["Alan Turing"]).await.unwrap().remove(0).unwrap();
    let results = reader.detokenize("name", &["name_AAAAAAAAAAAAAAAAAAAAAA", &token, "not a token"]).await.unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(results[0].as_ref().unwrap_err().code, ItemErrorCode::NotFound);
    assert_eq!(results[1].as_ref().unwrap().value.expose(), "Alan Turing");
    assert_eq!(results[2].as_ref().unwrap_err().code, ItemErrorCode::NotFound);
    let invalid = writer.tokenize("card", &["not a card"]).await.unwrap().remove(0).unwrap_err();
    assert_eq!(invalid.code, ItemErrorCode::InvalidValue);
    assert!(!invalid.to_string().contains("not a card"));
    let deleted = writer.delete("name", &[&token, &token]).await.unwrap();
    assert_eq!(deleted[0], Ok(()));
    assert_eq!(deleted[1].as_ref().unwrap_err().code, ItemErrorCode::NotFound);
    let empty = writer.tokenize::<&str>("name", &[]).await.unwrap();
    assert!(empty.is_empty());
}

#[tokio::test]
async fn large_inputs_are_split_and_a_lower_server_limit_is_learned() {
    let server = DevServer::start();
    let writer = connect(&server, "writer").await;
    let reader = connect(&server, "reader").await;
    let values: Vec<String> = (0..2345).map(|i| format!("Person {i}")).collect();
    let tokens = tokens_of(&writer, "name", &values).await;
    assert_eq!(tokens.len(), 2345);
    assert_eq!(values_of(&reader, "name", &tokens).await, values);
    // Three requests of at most 1000 (and their audit records).
    let db = common::tamper::open(&server.db_path());
    let items: Vec<i64> = db
        .prepare("SELECT count(*) FROM audit_records x JOIN audit a ON a.seq = x.audit_seq WHERE a.action = 'tokenize' GROUP BY a.seq ORDER BY a.seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(items, [1000, 1000, 345]);

    // A server whose limit is 100: the first refusal names it, the client
    // lowers its batch and goes on; nothing is lost or duplicated.
    let (_, tmp) = server.stop();
    let config_path = tmp.path().join("vault/config.toml");
    let text = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(&config_path, text.replace("max_items_per_call = 1000", "max_items_per_call = 100")).unwrap();
    let dir = tmp.path().join("vault");
    let server = DevServer::start_in(tmp, dir);
    let writer = connect(&server, "writer").await;
    let values: Vec<String> = (0..250).map(|i| format!("Later {i}")).collect();
    let tokens = tokens_of(&writer, "name", &values).await;
    assert_eq!(writer.max_batch(), 100);
    let reader = connect(&server, "reader").await;
    assert_eq!(values_of(&reader, "name", &tokens).await, values);
    assert_eq!(server.record_count(), 2345 + 250);
}

#[tokio::test]
async fn a_wrong_ca_is_refused_and_the_environment_configures() {
    let server = DevServer::start();
    let other = tempfile::tempdir().unwrap();
    let ca = piivault::pki::Ca::init(other.path(), "piivault.local", &["localhost".to_owned()]).unwrap();
    let client = server.dir.join("clients/writer");
    let wrong = Config::new(
        server.addr.to_string(),
        ca.cert_pem().as_bytes().to_vec(),
        std::fs::read(client.join("cert.pem")).unwrap(),
        std::fs::read(client.join("key.pem")).unwrap(),
    );
    let refused = Client::connect(wrong).await.unwrap_err();
    assert!(
        matches!(&refused, Error::Connect { reason, .. } if reason.contains("invalid peer certificate")),
        "{refused}"
    );

    // The PIIVAULT_* variables, as the command line reads them.
    let vars = std::collections::HashMap::from([
        ("PIIVAULT_ADDR", server.addr.to_string()),
        ("PIIVAULT_CACERT", server.dir.join("pki/ca.pem").display().to_string()),
        ("PIIVAULT_CLIENT_CERT", client.join("cert.pem").display().to_string()),
        ("PIIVAULT_CLIENT_KEY", client.join("key.pem").display().to_string()),
    ]);
    let from_env = Client::connect(Config::from_vars(|name| vars.get(name).cloned()).unwrap()).await.unwrap();
    assert!(from_env.tokenize("name", &["From Env"]).await.unwrap()[0].is_ok());
    let missing = Config::from_vars(|name| vars.get(name).filter(|_| name != "PIIVAULT_CLIENT_KEY").cloned());
    assert_eq!(missing.unwrap_err().to_string(), "client configuration: PIIVAULT_CLIENT_KEY is not set");
}

/// While the vault is down, tokenize fails at once with UNAVAILABLE (a
/// retry could store a value twice); detokenize keeps retrying with backoff
/// and succeeds once the vault is back on the same address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_idempotent_calls_are_retried_while_the_vault_is_down() {
    let server = DevServer::start();
    let addr = server.addr;
    let mut settings = config(&server, "writer");
    settings.retries = 8;
    settings.backoff = std::time::Duration::from_millis(250);
    let writer = Client::connect(settings).await.unwrap();
    let mut reader_settings = config(&server, "reader");
    reader_settings.retries = 8;
    reader_settings.backoff = std::time::Duration::from_millis(250);
    let reader = Client::connect(reader_settings).await.unwrap();
    let tokens = tokens_of(&writer, "name", &["Katherine Johnson".to_owned()]).await;

    let (_, tmp) = server.stop();
    let started = std::time::Instant::now();
    let down = writer.tokenize("name", &["While Down"]).await.unwrap_err();
    assert!(matches!(down, Error::Unavailable(_)), "{down:?}");
    let tokenize_failed_after = started.elapsed();
    let restart = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let dir = tmp.path().join("vault");
        DevServer::start_at(tmp, dir, &addr.to_string())
    });
    let back = values_of(&reader, "name", &tokens).await;
    assert_eq!(back, ["Katherine Johnson"]);
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
    assert!(tokenize_failed_after < std::time::Duration::from_secs(1), "{tokenize_failed_after:?}");
    drop(restart.join().unwrap());
}
