//! The record envelope: how one value is encrypted at rest.
//!
//! Format version 1 (all integers big-endian):
//!
//! ```text
//! offset  size  field
//! 0       1     format version = 0x01
//! 1       4     data-key version
//! 5       12    nonce (random)
//! 17      n+16  AES-256-GCM(value) ‖ tag
//!
//! record key = HKDF-SHA256(ikm = data key, salt = none,
//!                          info = len‖"piivault/v1/record-key" ‖ len‖collection ‖ len‖token)
//! AAD        = header (bytes 0..5) ‖ len‖collection ‖ len‖token
//! ```
//!
//! A ciphertext copied to another token or collection, a flipped bit, a
//! truncation or an unknown version all fail as one [`CryptoError::Decrypt`].

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::keyring::DataKey;
use super::{CryptoError, KEY_LEN, NONCE_LEN, TAG_LEN, aead_open, aead_seal, bind};

/// HKDF info label for per-record keys.
pub const RECORD_KEY_LABEL: &[u8] = b"piivault/v1/record-key";
/// Current record format version.
pub const RECORD_FORMAT_V1: u8 = 1;
/// Bytes before the nonce: format version and key version.
pub const HEADER_LEN: usize = 5;
/// Bytes a sealed record adds to its value.
pub const OVERHEAD: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;

fn record_key(key: &DataKey, collection: &str, token: &str) -> Result<Zeroizing<[u8; KEY_LEN]>, CryptoError> {
    let mut info = Vec::with_capacity(RECORD_KEY_LABEL.len() + collection.len() + token.len() + 6);
    bind(&mut info, &[RECORD_KEY_LABEL, collection.as_bytes(), token.as_bytes()]).ok_or(CryptoError::Encrypt)?;
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    Hkdf::<Sha256>::new(None, key.expose_secret())
        .expand(&info, out.as_mut_slice())
        // A 32-byte output is far below HKDF-SHA256's 8160-byte limit.
        .map_err(|_| CryptoError::Encrypt)?;
    Ok(out)
}

fn record_aad(header: &[u8], collection: &str, token: &str) -> Result<Vec<u8>, CryptoError> {
    let mut aad = Vec::with_capacity(header.len() + collection.len() + token.len() + 4);
    aad.extend_from_slice(header);
    bind(&mut aad, &[collection.as_bytes(), token.as_bytes()]).ok_or(CryptoError::Encrypt)?;
    Ok(aad)
}

/// Encrypts `value` for the record (`collection`, `token`) under `key`,
/// version `key_version`, with a random nonce.
pub fn seal(
    key: &DataKey,
    key_version: u32,
    collection: &str,
    token: &str,
    value: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    seal_with_nonce(key, key_version, collection, token, value, &super::random_nonce()?)
}

fn seal_with_nonce(
    key: &DataKey,
    key_version: u32,
    collection: &str,
    token: &str,
    value: &[u8],
    nonce: &[u8; NONCE_LEN],
) -> Result<Vec<u8>, CryptoError> {
    let mut out = Vec::with_capacity(OVERHEAD + value.len());
    out.push(RECORD_FORMAT_V1);
    out.extend_from_slice(&key_version.to_be_bytes());
    let aad = record_aad(&out, collection, token)?;
    let record_key = record_key(key, collection, token)?;
    let sealed = aead_seal(&record_key, nonce, &aad, value)?;
    out.extend_from_slice(nonce);
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// The data-key version a sealed record names, so the caller can fetch that
/// key. A record too short or of an unknown format is [`CryptoError::Decrypt`].
pub fn key_version(sealed: &[u8]) -> Result<u32, CryptoError> {
    if sealed.len() < OVERHEAD || sealed[0] != RECORD_FORMAT_V1 {
        return Err(CryptoError::Decrypt);
    }
    Ok(u32::from_be_bytes([sealed[1], sealed[2], sealed[3], sealed[4]]))
}

/// Decrypts a record sealed for (`collection`, `token`). The plaintext is
/// zeroized when dropped.
pub fn open(key: &DataKey, collection: &str, token: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    key_version(sealed)?;
    let (header, rest) = sealed.split_at(HEADER_LEN);
    let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
    let nonce: &[u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::Decrypt)?;
    let aad = record_aad(header, collection, token).map_err(|_| CryptoError::Decrypt)?;
    let record_key = record_key(key, collection, token).map_err(|_| CryptoError::Decrypt)?;
    aead_open(&record_key, nonce, &aad, ciphertext)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    const KEY: [u8; 32] = [0x42; 32];

    /// The vector in `tests/vectors/record_v1.toml` is exactly what this
    /// code produces for a fixed nonce: a format change breaks this test.
    #[test]
    fn known_answer_vector_is_reproduced() {
        let file: HashMap<String, Vec<HashMap<String, String>>> =
            toml::from_str(include_str!("../../tests/vectors/record_v1.toml")).unwrap();
        let vector = &file["ok"][0];
        assert!(!file["fail"].is_empty());
        let key = DataKey::from_bytes(hex::decode(&vector["data_key"]).unwrap().try_into().unwrap());
        let nonce: [u8; NONCE_LEN] = hex::decode(&vector["nonce"]).unwrap().try_into().unwrap();
        let version: u32 = vector["key_version"].parse().unwrap();
        let sealed =
            seal_with_nonce(&key, version, &vector["collection"], &vector["token"], vector["value"].as_bytes(), &nonce)
                .unwrap();
        assert_eq!(hex::encode(sealed), vector["sealed"]);
    }

    proptest! {
        #[test]
        fn round_trip(value in proptest::collection::vec(any::<u8>(), 0..4096), version in 1u32..) {
            let key = DataKey::from_bytes(KEY);
            let sealed = seal(&key, version, "card", "card_abc", &value).unwrap();
            prop_assert_eq!(sealed.len(), value.len() + OVERHEAD);
            prop_assert_eq!(key_version(&sealed).unwrap(), version);
            let opened = open(&key, "card", "card_abc", &sealed).unwrap();
            prop_assert_eq!(opened.as_slice(), value.as_slice());
        }

        #[test]
        fn any_single_flipped_byte_fails(value in "\\PC{0,64}", index in any::<prop::sample::Index>(), mask in 1u8..) {
            let key = DataKey::from_bytes(KEY);
            let mut sealed = seal(&key, 1, "card", "tok", value.as_bytes()).unwrap();
            let i = index.index(sealed.len());
            sealed[i] ^= mask;
            prop_assert!(matches!(open(&key, "card", "tok", &sealed), Err(CryptoError::Decrypt)));
        }

        #[test]
        fn moved_to_another_token_or_collection_fails(value in "\\PC{0,64}", other in "[a-z0-9_]{1,20}") {
            let key = DataKey::from_bytes(KEY);
            let sealed = seal(&key, 1, "card", "tok", value.as_bytes()).unwrap();
            if other != "tok" {
                prop_assert!(matches!(open(&key, "card", &other, &sealed), Err(CryptoError::Decrypt)));
            }
            if other != "card" {
                prop_assert!(matches!(open(&key, &other, "tok", &sealed), Err(CryptoError::Decrypt)));
            }
        }

        #[test]
        fn truncation_fails(value in "\\PC{0,64}", cut in any::<prop::sample::Index>()) {
            let key = DataKey::from_bytes(KEY);
            let sealed = seal(&key, 1, "c", "t", value.as_bytes()).unwrap();
            let keep = cut.index(sealed.len());
            prop_assert!(matches!(open(&key, "c", "t", &sealed[..keep]), Err(CryptoError::Decrypt)));
        }
    }

    #[test]
    fn wrong_key_and_ambiguous_binding_fail() {
        let sealed = seal(&DataKey::from_bytes(KEY), 1, "ab", "c", b"v").unwrap();
        assert!(open(&DataKey::from_bytes([0x43; 32]), "ab", "c", &sealed).is_err());
        // Length prefixes keep ("ab","c") and ("a","bc") apart.
        assert!(open(&DataKey::from_bytes(KEY), "a", "bc", &sealed).is_err());
    }
}
