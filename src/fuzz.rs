//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz) and for the
//! corpus replay test (`tests/fuzz_corpus.rs`), so that both run exactly the
//! same code. Each takes arbitrary bytes, calls into the library the way
//! the server does with untrusted input, and panics only on a broken
//! property (which is a bug the fuzzer reports).

// Every entry point panics exactly when a property breaks: that is its job.
#![allow(clippy::missing_panics_doc)]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::LazyLock;

use prost::Message as _;

use crate::audit::AuditRecord;
use crate::config::{CollectionConfig, Config, RootKeySource};
use crate::crypto::keyring::DataKey;
use crate::grpc::proto;
use crate::policy::Policy;
use crate::token::TokenKey;
use crate::value::PiiValue;

/// A fuzz target's entry point.
pub type Target = fn(&[u8]);

/// Every target: its name (the folder under `fuzz/corpus/`) and entry point.
pub const TARGETS: &[(&str, Target)] = &[
    ("token_parse", token_parse),
    ("record_open", record_open),
    ("sealed_root", sealed_root),
    ("config_parse", config_parse),
    ("policy_parse", policy_parse),
    ("audit_decode", audit_decode),
    ("grpc_request", grpc_request),
];

/// The sample configuration's collections: one of each format, with
/// normalization, masks and deterministic settings.
static SAMPLE: LazyLock<Vec<(String, CollectionConfig)>> = LazyLock::new(|| {
    Config::parse(&Config::sample(&RootKeySource::Passphrase, None, None), Path::new("/fuzz"))
        .map(|c| c.collections.into_iter().map(|(name, config)| (name.to_string(), config)).collect())
        .unwrap_or_default()
});

/// The fixed data key records are opened with.
pub const RECORD_KEY: [u8; 32] = [7; 32];

/// The fixed token key shaped tokens are made and read under.
static TOKEN_KEY: LazyLock<Option<TokenKey>> = LazyLock::new(|| TokenKey::new(&[5; 32]).ok());

/// Token parsing and value checks for every sample collection: a token that
/// parses is the text it came from, and reading its place never panics; a
/// value that passes the checks is masked, and its shaped token (if its
/// shape has one) reads back to the number it was made from.
pub fn token_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Some(key) = TOKEN_KEY.as_ref() else { return };
    for (_, collection) in SAMPLE.iter() {
        let shaped = collection.format.preserves_shape();
        if let Some(token) = collection.format.parse_token(text) {
            assert_eq!(token.as_str(), text, "a parsed token is the text it was parsed from");
            if shaped {
                drop(collection.format.shaped_numbers(key, text));
            }
        }
        let (value, problem) = crate::vault::prepare_value(
            &collection.normalize,
            collection.max_value_len,
            &collection.format,
            PiiValue::new(text.to_owned()),
        );
        if problem.is_none() {
            drop(collection.mask.apply(&value));
            if shaped && let Some(token) = collection.format.shaped_token(key, value.expose_secret(), 1) {
                assert!(collection.format.parse_token(token.as_str()).is_some(), "a shaped token parses");
                assert!(
                    collection.format.shaped_numbers(key, token.as_str()).contains(&1),
                    "a shaped token reads back to its number"
                );
            }
        }
    }
}

/// Opening a stored record ciphertext: never a panic; bytes not sealed
/// under the key for this record never open.
pub fn record_open(data: &[u8]) {
    let key = DataKey::from_bytes(RECORD_KEY);
    let _ = crate::crypto::envelope::key_version(data);
    let _ = crate::crypto::envelope::open(&key, "card", "tok_fuzz", data);
}

/// A sealed root file: the layout and KDF-string checks, and opening it
/// with a raw key (no Argon2, which would make each input take a second).
pub fn sealed_root(data: &[u8]) {
    if let Ok(parsed) = crate::crypto::root::parse_sealed(data)
        && let Some(kdf) = parsed.kdf
    {
        assert!(kdf.check().is_ok(), "parsed KDF parameters are within bounds");
    }
    if let Ok(raw) = crate::crypto::root::RawKey::parse(&[9; 32]) {
        let _ = crate::crypto::root::unseal(data, &crate::crypto::root::Unlock::RawKey(raw));
    }
}

/// `config.toml`: parsed and checked; an error is one line.
pub fn config_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(e) = Config::parse(text, Path::new("/fuzz")) {
        assert!(!e.to_string().contains('\n'), "config errors are one line");
    }
}

/// `policy.toml`, against the sample collections.
pub fn policy_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let collections: BTreeSet<_> = SAMPLE.iter().filter_map(|(name, _)| name.parse().ok()).collect();
    if let Ok(policy) = Policy::parse(text, "policy.toml", &collections) {
        for caller in policy.callers() {
            let _ = policy.limits(caller);
        }
    }
}

/// An audit record's canonical encoding: what decodes encodes back to the
/// same bytes (the encoding is canonical, so the chain MAC is over exactly
/// one form).
pub fn audit_decode(data: &[u8]) {
    if let Ok((seq, record)) = AuditRecord::decode(data) {
        assert_eq!(record.encode_in(seq, data[0]), data, "decode then encode gives the same bytes");
    }
}

/// A gRPC request message, chosen by the first byte, decoded as the server
/// decodes it, then checked as the server checks it: values as tokenize
/// does, tokens as detokenize and delete parse them, for the collection it
/// names (or every sample collection).
pub fn grpc_request(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else { return };
    let collections = |name: &str| -> Vec<&CollectionConfig> {
        let named: Vec<_> = SAMPLE.iter().filter(|(n, _)| n == name).map(|(_, c)| c).collect();
        if named.is_empty() { SAMPLE.iter().map(|(_, c)| c).collect() } else { named }
    };
    let check_tokens = |collection: &str, tokens: &[String]| {
        for config in collections(collection) {
            for token in tokens {
                let _ = config.format.parse_token(token);
            }
        }
    };
    match kind % 13 {
        0 => {
            if let Ok(request) = proto::TokenizeRequest::decode(body) {
                for config in collections(&request.collection) {
                    for value in &request.values {
                        let _ = crate::vault::prepare_value(
                            &config.normalize,
                            config.max_value_len,
                            &config.format,
                            PiiValue::new(value.clone()),
                        );
                    }
                }
            }
        }
        1 => {
            if let Ok(request) = proto::DetokenizeRequest::decode(body) {
                check_tokens(&request.collection, &request.tokens);
            }
        }
        2 => {
            if let Ok(request) = proto::DeleteRequest::decode(body) {
                check_tokens(&request.collection, &request.tokens);
            }
        }
        3 => drop(proto::AuditQueryRequest::decode(body)),
        4 => drop(proto::AuditVerifyRequest::decode(body)),
        5 => drop(proto::ListKeysRequest::decode(body)),
        6 => drop(proto::RotateDataKeyRequest::decode(body)),
        7 => drop(proto::RotateIndexKeyRequest::decode(body)),
        8 => drop(proto::ReencryptRequest::decode(body)),
        9 => drop(proto::RetireKeyVersionRequest::decode(body)),
        10 => drop(proto::ReloadPolicyRequest::decode(body)),
        11 => drop(proto::RotateRootKeyRequest::decode(body)),
        _ => drop(proto::BackupRequest::decode(body)),
    }
}
