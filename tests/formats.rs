//! Real-world values through the served dev vault (the real binary, mTLS,
//! the Rust client): every card length and grouping issuers print, one
//! token per SSN however it is written, tokens that cannot pass for real
//! values, blank values refused, phone country codes kept, a vault made by
//! the previous release still answering, and the dev vault found by the
//! CLI without `--addr`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::path::Path;
use std::process::Command;

use common::server::{BIN, DevServer};
use piivault::format::luhn_valid;
use piivault_client::{Client, Config, ItemErrorCode};

async fn connect(dir: &Path, addr: &str, caller: &str) -> Client {
    let client = dir.join("clients").join(caller);
    let config =
        Config::from_files(addr, &dir.join("pki/ca.pem"), &client.join("cert.pem"), &client.join("key.pem")).unwrap();
    Client::connect(config).await.unwrap()
}

async fn tokens_of(writer: &Client, collection: &str, values: &[&str]) -> Vec<String> {
    writer.tokenize(collection, values).await.unwrap().into_iter().map(Result::unwrap).collect()
}

async fn values_of(reader: &Client, collection: &str, tokens: &[String]) -> Vec<String> {
    reader
        .detokenize(collection, tokens)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap().value.expose().to_owned())
        .collect()
}

fn digits(text: &str) -> String {
    text.chars().filter(char::is_ascii_digit).collect()
}

/// Position by position: separators equal, digits stay digits.
fn same_shape(value: &str, token: &str) -> bool {
    value.len() == token.len()
        && value.bytes().zip(token.bytes()).all(|(v, t)| if v.is_ascii_digit() { t.is_ascii_digit() } else { v == t })
}

/// Public test card numbers, one of each network and length, in the
/// groupings issuers print.
const TEST_CARDS: [&str; 12] = [
    "4222222222222",           // Visa, 13 digits
    "4111 1111 1111 1111",     // Visa, 16, 4-4-4-4
    "5555555555554444",        // Mastercard
    "2223-0031-2200-3222",     // Mastercard 2-series, dashes
    "378282246310005",         // American Express, 15
    "3782 822463 10005",       // American Express, 4-6-5
    "36227206271667",          // Diners Club, 14
    "3056 930902 5904",        // Diners Club, 4-6-4
    "6011111111111117",        // Discover
    "3566002020360505",        // JCB
    "6205500000000000004",     // UnionPay, 19
    "6205 5000 0000 0000 004", // UnionPay, 4-4-4-4-3
];

#[tokio::test]
async fn every_card_length_and_grouping_through_the_served_vault() {
    let server = DevServer::start();
    let addr = server.addr.to_string();
    let writer = connect(&server.dir, &addr, "writer").await;
    let reader = connect(&server.dir, &addr, "reader").await;
    let tokens = tokens_of(&writer, "card", &TEST_CARDS).await;
    for (value, token) in TEST_CARDS.iter().zip(&tokens) {
        assert!(luhn_valid(value), "{value} is a valid test number");
        assert!(same_shape(value, token), "{value} -> {token}");
        assert!(!luhn_valid(token), "a card token never passes the Luhn check: {token}");
        assert_eq!(digits(token)[digits(token).len() - 4..], digits(value)[digits(value).len() - 4..]);
        assert_ne!(digits(token), digits(value));
    }
    assert_eq!(values_of(&reader, "card", &tokens).await, TEST_CARDS);
    // A token answers in any writing of its digits.
    let rewritten: Vec<String> = tokens.iter().map(|t| digits(t)).collect();
    assert_eq!(values_of(&reader, "card", &rewritten).await, TEST_CARDS);
    // Twelve digits is the shortest card number, nineteen the longest.
    let refused = writer.tokenize("card", &["42222222222", "62055000000000000041"]).await.unwrap();
    for item in refused {
        let error = item.unwrap_err();
        assert_eq!(error.code, ItemErrorCode::InvalidValue);
        assert!(error.message.contains("a card number is 12 to 19 digits"), "{}", error.message);
    }
    // Nothing but spaces is refused where no normalization trims it.
    let blank = writer.tokenize("card", &["   "]).await.unwrap();
    assert_eq!(blank[0].as_ref().unwrap_err().message, "the value is blank (whitespace only)");
    let output = server.output();
    for value in TEST_CARDS {
        assert!(!output.contains(value), "the server printed a value");
    }
}

#[tokio::test]
async fn one_token_per_ssn_however_it_is_written_even_concurrently() {
    let server = DevServer::start();
    let addr = server.addr.to_string();
    let writings = ["078-05-1120", "078051120", "078 05 1120"];
    // Eight writers at once, each writing the same SSN its own way.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (dir, addr) = (server.dir.clone(), addr.clone());
        tasks.push(tokio::spawn(async move {
            let writer = connect(&dir, &addr, "writer").await;
            let value = writings[i % writings.len()];
            (value, tokens_of(&writer, "ssn", &[value, "219-09-9999"]).await)
        }));
    }
    let mut seen = Vec::new();
    for task in tasks {
        seen.push(task.await.unwrap());
    }
    let first = digits(&seen[0].1[0]);
    let other = digits(&seen[0].1[1]);
    assert_ne!(first, other);
    for (value, tokens) in &seen {
        assert_eq!(digits(&tokens[0]), first, "one token for one SSN");
        assert!(same_shape(value, &tokens[0]), "{value} -> {}", tokens[0]);
        assert_eq!(digits(&tokens[1]), other);
        // Area 900-999 is never issued, and groups 00-49 are not ITINs.
        assert!(first.starts_with('9') && first.as_bytes()[3] <= b'4', "{first}");
    }
    let reader = connect(&server.dir, &addr, "reader").await;
    let all: Vec<String> = seen.iter().map(|(_, t)| t[0].clone()).collect();
    let back = values_of(&reader, "ssn", &all).await;
    assert!(back.iter().all(|v| digits(v) == "078051120"), "{back:?}");
    // One record for the SSN and one for the other.
    assert_eq!(server.record_count(), 2);
    // A real SSN is never mistaken for a token: it answers like an unknown one.
    let unknown = reader.detokenize("ssn", &["078-05-1120"]).await.unwrap();
    assert_eq!(unknown[0].as_ref().unwrap_err().code, ItemErrorCode::NotFound);
}

#[tokio::test]
async fn blank_values_are_refused_names_trimmed_phones_keep_the_country_code() {
    let server = DevServer::start();
    let addr = server.addr.to_string();
    let writer = connect(&server.dir, &addr, "writer").await;
    let reader = connect(&server.dir, &addr, "reader").await;
    let results = writer.tokenize("name", &["   ", "\t\n", "  Zoë Example "]).await.unwrap();
    for blank in &results[..2] {
        let error = blank.as_ref().unwrap_err();
        assert_eq!((error.code, error.message.as_str()), (ItemErrorCode::InvalidValue, "the value is empty"));
    }
    let token = results[2].as_ref().unwrap().clone();
    assert!(token.starts_with("name_"));
    assert_eq!(values_of(&reader, "name", &[token]).await, ["Zoë Example"]);

    let phones = ["+44 20 7946 0958", "+1 (202) 555-0143", "+353 1 234 5678"];
    let tokens = tokens_of(&writer, "phone", &phones).await;
    for ((value, token), kept) in phones.iter().zip(&tokens).zip(["+44 ", "+1 (", "+353 "]) {
        assert!(token.starts_with(kept) && same_shape(value, token), "{value} -> {token}");
        assert_ne!(token, value);
    }
    assert_eq!(values_of(&reader, "phone", &tokens).await, phones);
}

/// Copies a directory tree, files 0600 and directories 0700 as a vault's are.
fn copy_private(from: &Path, to: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(to).unwrap();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700)).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_private(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }
}

#[derive(serde::Deserialize)]
struct Fixture {
    tokens: Vec<(String, String, String)>,
    /// `(collection, token)` deleted before the fixture was saved.
    #[serde(default)]
    deleted: Vec<(String, String)>,
}

/// Serves a copy of `tests/fixtures/<name>` (a dev vault made by an older
/// release) with fresh caller certificates under the same CA, so the
/// fixture never expires; returns the server, its data directory and the
/// fixture's list of tokens.
fn serve_fixture(name: &str) -> (DevServer, std::path::PathBuf, Fixture) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let fixture: Fixture =
        serde_json::from_str(&std::fs::read_to_string(root.join(format!("{name}.json"))).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vault");
    copy_private(&root.join(name), &dir);
    let ca = piivault::pki::Ca::load(&dir).unwrap();
    for caller in ["writer", "reader", "auditor", "admin"] {
        let out = dir.join("clients").join(caller);
        if out.exists() {
            std::fs::remove_dir_all(&out).unwrap();
            ca.issue(&caller.parse().unwrap(), "piivault.local", 1, &out).unwrap();
        }
    }
    (DevServer::start_in(tmp, dir.clone()), dir, fixture)
}

/// Runs the CLI on `dir` and returns its standard output; fails the test
/// if it fails.
fn cli(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).args(["--data-dir", dir.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `tests/fixtures/v4-dev-vault` is a dev vault made by the release before
/// canonical tokens (schema version 4), with the tokens it issued listed in
/// `v4-dev-vault.json`. Opened by this build it migrates, every token still
/// answers (in its own writing and in its digits alone), deterministic
/// values written another way get the token they already had, and the
/// audit chain still verifies.
#[tokio::test]
async fn a_vault_made_by_the_previous_release_keeps_answering() {
    let (server, dir, fixture) = serve_fixture("v4-dev-vault");
    let addr = server.addr.to_string();
    let reader = connect(&dir, &addr, "reader").await;
    let writer = connect(&dir, &addr, "writer").await;
    for (collection, value, token) in &fixture.tokens {
        assert_eq!(
            values_of(&reader, collection, std::slice::from_ref(token)).await,
            std::slice::from_ref(value),
            "{token}"
        );
        if collection != "email" && collection != "name" {
            assert_eq!(values_of(&reader, collection, &[digits(token)]).await, std::slice::from_ref(value), "{token}");
        }
    }
    // The old ssn collection (format digits, deterministic) was re-indexed
    // under the canonical value in the background: "078 05 1120" then gets
    // the digits of one of the two tokens the old release gave that SSN.
    let old: Vec<String> = fixture
        .tokens
        .iter()
        .filter(|(c, v, _)| c == "ssn" && digits(v) == "078051120")
        .map(|(_, _, t)| digits(t))
        .collect();
    let again = digits(&tokens_of(&writer, "ssn", &["078 05 1120"]).await[0]);
    assert!(old.contains(&again), "{again} is not one of {old:?}");
    // New tokens never take the canonical form of an old one.
    let new = tokens_of(&writer, "card", &["4111111111111111"; 20]).await;
    for token in &new {
        assert!(fixture.tokens.iter().all(|(_, _, t)| digits(t) != *token));
    }
    drop((reader, writer));
    let (status, tmp) = server.stop();
    assert!(status.success());
    let verify = Command::new(BIN).args(["audit", "verify", "--data-dir", dir.to_str().unwrap()]).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
    drop(tmp);
}

/// `tests/fixtures/v5-dev-vault` is a dev vault made by the release before
/// sealed tokens (schema version 5: records keyed by their random token),
/// listed in `v5-dev-vault.json`: its name data key rotated once (records
/// under both versions), its ssn index key rotated once, one name token
/// deleted. Opened by this build it migrates; every token it issued
/// answers, the deleted one does not; a deterministic value gets its old
/// token; new tokens are sealed and answer beside the old ones;
/// re-encryption moves the old records (their ciphertexts bound to their
/// token text) onto the new key, so the old key can be destroyed; the audit
/// chain, old and new records, verifies, and "who saw this token" answers
/// for an old token.
#[tokio::test]
async fn a_vault_made_before_sealed_tokens_keeps_answering_and_appends() {
    let (server, dir, fixture) = serve_fixture("v5-dev-vault");
    let addr = server.addr.to_string();
    let reader = connect(&dir, &addr, "reader").await;
    let writer = connect(&dir, &addr, "writer").await;
    for (collection, value, token) in &fixture.tokens {
        assert_eq!(
            values_of(&reader, collection, std::slice::from_ref(token)).await,
            std::slice::from_ref(value),
            "{token}"
        );
    }
    for (collection, token) in &fixture.deleted {
        let answer = reader.detokenize(collection, std::slice::from_ref(token)).await.unwrap();
        assert_eq!(answer[0].as_ref().err().map(|e| e.code), Some(ItemErrorCode::NotFound), "{token}");
    }
    // The deterministic collection still gives an old value its old token.
    let old_ssn = fixture.tokens.iter().find(|(c, v, _)| c == "ssn" && v == "078-05-1120").unwrap();
    assert_eq!(digits(&tokens_of(&writer, "ssn", &["078 05 1120"]).await[0]), digits(&old_ssn.2));
    // New tokens are sealed and answer in one request with the old ones.
    let new = tokens_of(&writer, "name", &["Barbara Liskov", "Ken Thompson"]).await;
    let old_names: Vec<&(String, String, String)> = fixture.tokens.iter().filter(|(c, ..)| c == "name").collect();
    let mut mixed = vec![old_names[0].2.clone(), new[0].clone(), old_names[1].2.clone(), new[1].clone()];
    assert_eq!(
        values_of(&reader, "name", &mixed).await,
        [old_names[0].1.as_str(), "Barbara Liskov", old_names[1].1.as_str(), "Ken Thompson"]
    );
    // Re-encryption moves the old records; then version 1 can be destroyed.
    let moved = cli(&dir, &["keys", "reencrypt", "--as", "admin", "--collection", "name"]);
    assert!(moved.contains("re-encryption done: 2 moved, 0 unreadable, 0 still under older versions"), "{moved}");
    cli(&dir, &["keys", "retire", "--as", "admin", "--collection", "name", "--key-version", "1"]);
    mixed.push(old_names[2].2.clone());
    let expected: Vec<String> = ["Barbara Liskov", "Ken Thompson"].iter().map(|v| (*v).to_owned()).collect();
    let back = values_of(&reader, "name", &mixed).await;
    assert_eq!((&back[1], &back[3]), (&expected[0], &expected[1]));
    assert_eq!((&back[0], &back[2], &back[4]), (&old_names[0].1, &old_names[1].1, &old_names[2].1));
    drop((reader, writer));
    let (status, tmp) = server.stop();
    assert!(status.success());
    cli(&dir, &["audit", "verify"]);
    // Who saw an old token: its tokenize and a read by the old release,
    // and the three reads here.
    let seen = cli(&dir, &["audit", "query", "--token", &old_names[0].2, "--json"]);
    let actions: Vec<String> = seen
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(actions, ["tokenize", "detokenize", "detokenize", "detokenize", "detokenize"], "{seen}");
    drop(tmp);
}

/// `piivault dev --listen` records its address; the CLI given only
/// `--data-dir` and `--as` finds it. Two dev vaults run side by side.
#[test]
fn the_cli_finds_a_dev_vault_without_addr_and_two_dev_vaults_coexist() {
    let first = DevServer::start();
    let second = DevServer::start();
    assert_ne!(first.addr, second.addr);
    for server in [&first, &second] {
        let recorded = std::fs::read_to_string(server.dir.join("dev-address")).unwrap();
        assert_eq!(recorded.trim(), server.addr.to_string());
        let dir = server.dir.to_str().unwrap();
        let run = |args: &[&str]| {
            let out = Command::new(BIN).args(args).args(["--data-dir", dir]).output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8(out.stdout).unwrap().trim().to_owned()
        };
        let token = run(&["tokenize", "--as", "writer", "--collection", "card", "378282246310005"]);
        assert_eq!(token.len(), 15);
        assert_eq!(run(&["detokenize", "--as", "reader", "--collection", "card", &token]), "378282246310005");
    }
    // Without --metrics-listen a dev vault serves metrics on a free port.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v");
    let mut child = Command::new(BIN)
        .args(["dev", "--data-dir", dir.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let metrics = lines.by_ref().map_while(Result::ok).find(|l| l.starts_with("piivault: metrics on ")).unwrap();
    assert!(metrics.starts_with("piivault: metrics on http://127.0.0.1:") && !metrics.contains(":9464/"), "{metrics}");
    let listening = lines.map_while(Result::ok).find(|l| l.starts_with("piivault: listening on ")).unwrap();
    assert!(listening.starts_with("piivault: listening on 127.0.0.1:"));
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    child.wait().unwrap();
    // A stopped dev vault leaves no address behind.
    assert!(!dir.join("dev-address").exists());
}
