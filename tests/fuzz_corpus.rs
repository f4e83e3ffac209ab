//! Replays every fuzz target's committed corpus (seeds and regression
//! inputs under `fuzz/corpus/<target>/`) on the stable toolchain, through
//! the same entry points the fuzzer calls (`piivault::fuzz`).
//!
//! `cargo test --test fuzz_corpus -- --ignored` rewrites the seeds.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};

use piivault::audit::{Event, Outcome};
use piivault::fuzz::TARGETS;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

#[test]
fn every_committed_fuzz_input_replays_cleanly() {
    for (target, run) in TARGETS {
        let mut inputs: Vec<PathBuf> = std::fs::read_dir(corpus_dir(target))
            .unwrap_or_else(|e| panic!("fuzz/corpus/{target}: {e}"))
            .map(|entry| entry.unwrap().path())
            .filter(|path| {
                let name = path.file_name().unwrap().to_string_lossy();
                name.starts_with("seed-") || name.starts_with("regression-")
            })
            .collect();
        inputs.sort();
        assert!(inputs.len() >= 3, "{target} has {} committed inputs", inputs.len());
        for input in inputs {
            let data = std::fs::read(&input).unwrap();
            let replayed = std::panic::catch_unwind(|| run(&data));
            assert!(replayed.is_ok(), "{} fails {target}", input.display());
        }
    }
}

#[test]
fn audit_decoding_refuses_a_non_canonical_encoding() {
    // What the audit target's round-trip property rests on: a valid
    // encoding decodes, the same bytes with a trailing byte do not.
    let record = piivault::vault::Requester::named("auditor").record(Event::Tokenize, "card", 1, Outcome::Ok);
    let mut encoded = record.encode(7);
    assert_eq!(piivault::audit::AuditRecord::decode(&encoded).unwrap(), (7, record));
    encoded.push(0);
    assert!(piivault::audit::AuditRecord::decode(&encoded).is_err());
}

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = corpus_dir(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
}

fn request(kind: u8, message: &impl prost::Message) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend(message.encode_to_vec());
    out
}

/// Writes the seed corpus from the library itself, so the seeds are real
/// tokens, records, files and messages.
#[test]
#[ignore = "rewrites fuzz/corpus/*/seed-*; run by hand"]
fn write_seed_corpus() {
    use piivault::config::{Config, RootKeySource};
    use piivault::crypto::keyring::DataKey;
    use piivault::crypto::root::{self, KdfParams, MIN_KDF, Passphrase, RawKey, Unlock};
    use piivault::grpc::proto;

    for (i, token) in [
        "name_EBwnwh7iPqFy-c9arIUceg",
        "4000007261836483",
        "078051120",
        "k3j5h2g8f9d0s1a2@example.org",
        "q8w7e6r5t4y3u2i1.invalid",
        "+1 (555) 010-9999",
        "  Ada@Example.ORG ",
        "",
        "5500 0055 5555 5559",
    ]
    .iter()
    .enumerate()
    {
        write("token_parse", &i.to_string(), token.as_bytes());
    }

    let key = DataKey::from_bytes(piivault::fuzz::RECORD_KEY);
    for (i, value) in ["4111111111111111", "", "x"].iter().enumerate() {
        let sealed = piivault::crypto::envelope::seal(&key, 3, "card", "tok_fuzz", value.as_bytes()).unwrap();
        write("record_open", &i.to_string(), &sealed);
    }
    write("record_open", "short", &[1, 0, 0, 0, 1]);

    let raw = Unlock::RawKey(RawKey::parse(&[9; 32]).unwrap());
    write("sealed_root", "raw", &root::create(&raw, MIN_KDF).unwrap().1);
    let passphrase = Unlock::Passphrase(Passphrase::new("fuzz".into()).unwrap());
    write("sealed_root", "passphrase", &root::create(&passphrase, MIN_KDF).unwrap().1);
    let strong = KdfParams { m_kib: MIN_KDF.m_kib, t: 4, p: 2 };
    write("sealed_root", "passphrase-t4p2", &root::create(&passphrase, strong).unwrap().1);

    write("config_parse", "sample", Config::sample(&RootKeySource::Passphrase, None, None).as_bytes());
    write(
        "config_parse",
        "raw",
        b"[root_key]\nprovider = \"raw\"\nkey_env = \"K\"\n[collections.a]\nformat = \"digits\"\nmin_len = 9\n",
    );
    write(
        "config_parse",
        "card",
        b"[collections.c]\nformat = \"card\"\nkeep_last = 4\nluhn = \"valid\"\nttl = \"30d\"\nmask = \"last:4\"\n",
    );

    write("policy_parse", "empty", piivault::policy::EMPTY_POLICY.as_bytes());
    write(
        "policy_parse",
        "grants",
        b"[defaults]\nrequests_per_second = 100\nburst = 200\ndetokenize_max_values = 1000\n\
          detokenize_window = \"1h\"\n[callers.writer]\ntokenize = [\"*\"]\ndelete = [\"card\"]\n\
          [callers.\"team/reader\"]\ndetokenize = [\"ssn\"]\nrequests_per_second = 5\n[callers.ops]\nadmin = true\naudit = true\n",
    );
    write("policy_parse", "masked", b"[callers.support]\ndetokenize_masked = [\"card\", \"email\"]\n");

    let who =
        piivault::vault::Requester { caller: "writer".into(), peer: "127.0.0.1:5000".into(), request_id: "r1".into() };
    let mut record = who.record(Event::Tokenize, "card", 2, Outcome::Ok);
    record.tokens = vec!["4000007261836483".into(), "4000001234567899".into()];
    write("audit_decode", "tokenize", &record.encode(42));
    write("audit_decode", "failure", &who.record(Event::Detokenize, "", 0, Outcome::PermissionDenied).encode(1));
    write("audit_decode", "empty", &piivault::audit::AuditRecord::default().encode(0));

    let values = vec!["4111111111111111".to_owned(), "5500-0055-5555-5559".to_owned()];
    write("grpc_request", "tokenize", &request(0, &proto::TokenizeRequest { collection: "card".into(), values }));
    let tokens = vec!["4000007261836483".to_owned(), "name_EBwnwh7iPqFy-c9arIUceg".to_owned()];
    write(
        "grpc_request",
        "detokenize",
        &request(1, &proto::DetokenizeRequest { collection: "name".into(), tokens: tokens.clone() }),
    );
    write("grpc_request", "delete", &request(2, &proto::DeleteRequest { collection: "card".into(), tokens }));
    let query = proto::AuditQueryRequest { caller: "writer".into(), limit: 10, ..Default::default() };
    write("grpc_request", "audit-query", &request(3, &query));
}
