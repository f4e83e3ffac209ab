//! The keyring: per-collection, versioned data and blind-index keys, stored
//! wrapped by the root key and cached unwrapped in memory.
//!
//! Wrapped key layout, format version 1:
//!
//! ```text
//! 0x01 ‖ nonce (12) ‖ AES-256-GCM(key) (32) ‖ tag (16)
//! AAD = "piivault/v1/wrap" ‖ len‖purpose ‖ len‖collection ‖ len‖version (u32 BE)
//! ```
//!
//! The AAD binds a wrapped key to its purpose, collection and version: a
//! wrapped key copied to another row does not unwrap. Unwrapped keys never
//! leave this module's types except by reference inside a closure.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use super::root::RootKey;
use super::{CryptoError, KEY_LEN, NONCE_LEN, SecretKey, TAG_LEN, aead_open, aead_seal, bind};

/// Domain-separation label at the start of every key-wrap AAD.
const WRAP_AAD_LABEL: &[u8] = b"piivault/v1/wrap";
const WRAP_FORMAT_V1: u8 = 1;
const WRAPPED_LEN: usize = 1 + NONCE_LEN + KEY_LEN + TAG_LEN;

/// What a stored key is for. Part of the wrap AAD, so a key of one purpose
/// can never be unwrapped as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyPurpose {
    /// Encrypts records of a collection.
    Data,
    /// Keys the audit trail's HMAC chain (global: bound to collection "").
    Audit,
    /// Keys the blind index of a deterministic collection (HMAC).
    Index,
    /// Keys the permutation that makes a record's sequence number its
    /// token (AES-256 over one block). Never rotated by routine rotation:
    /// it guards guessability, not values.
    Token,
}

impl KeyPurpose {
    /// The stable name stored in the database and bound into the AAD.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Data => "data",
            Self::Audit => "audit",
            Self::Index => "index",
            Self::Token => "token",
        }
    }

    /// Parses a stored purpose name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "data" => Some(Self::Data),
            "audit" => Some(Self::Audit),
            "index" => Some(Self::Index),
            "token" => Some(Self::Token),
            _ => None,
        }
    }
}

/// A data key: encrypts the records of one collection under one version.
/// Zeroized on drop; no `Debug`, no `Clone`.
pub struct DataKey(SecretKey);

impl DataKey {
    /// A fresh random data key.
    pub fn generate() -> Result<Self, CryptoError> {
        SecretKey::generate().map(Self)
    }

    /// A data key from raw bytes (known-answer tests, and unwrapping).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(SecretKey::from_bytes(bytes))
    }

    pub(crate) fn expose_secret(&self) -> &[u8; KEY_LEN] {
        self.0.expose_secret()
    }
}

fn wrap_aad(purpose: KeyPurpose, collection: &str, version: u32) -> Result<Vec<u8>, CryptoError> {
    let mut aad = Vec::with_capacity(64);
    aad.push(WRAP_FORMAT_V1);
    bind(&mut aad, &[WRAP_AAD_LABEL, purpose.as_str().as_bytes(), collection.as_bytes(), &version.to_be_bytes()])
        .ok_or(CryptoError::Encrypt)?;
    Ok(aad)
}

/// Wraps `key` under the root key for (`purpose`, `collection`, `version`).
pub fn wrap(
    root: &RootKey,
    purpose: KeyPurpose,
    collection: &str,
    version: u32,
    key: &DataKey,
) -> Result<Vec<u8>, CryptoError> {
    let aad = wrap_aad(purpose, collection, version)?;
    let nonce = super::random_nonce()?;
    let sealed = aead_seal(root.expose_secret(), &nonce, &aad, key.expose_secret())?;
    let mut out = Vec::with_capacity(WRAPPED_LEN);
    out.push(WRAP_FORMAT_V1);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Unwraps a key stored for (`purpose`, `collection`, `version`). Any
/// mismatch or alteration is [`CryptoError::Decrypt`].
pub fn unwrap(
    root: &RootKey,
    purpose: KeyPurpose,
    collection: &str,
    version: u32,
    wrapped: &[u8],
) -> Result<DataKey, CryptoError> {
    if wrapped.len() != WRAPPED_LEN || wrapped[0] != WRAP_FORMAT_V1 {
        return Err(CryptoError::Decrypt);
    }
    let nonce: &[u8; NONCE_LEN] = wrapped[1..=NONCE_LEN].try_into().map_err(|_| CryptoError::Decrypt)?;
    let aad = wrap_aad(purpose, collection, version).map_err(|_| CryptoError::Decrypt)?;
    let plain = aead_open(root.expose_secret(), nonce, &aad, &wrapped[1 + NONCE_LEN..])?;
    let bytes: [u8; KEY_LEN] = plain.as_slice().try_into().map_err(|_| CryptoError::Decrypt)?;
    Ok(DataKey::from_bytes(bytes))
}

/// The unwrapped data keys of one collection.
struct CollectionKeys {
    primary: u32,
    versions: BTreeMap<u32, DataKey>,
}

/// In-memory cache of unwrapped keys, by collection id and purpose. Cheap to
/// read from many tasks at once; keys are only reachable inside a closure.
#[derive(Default)]
pub struct Keyring {
    collections: RwLock<HashMap<(i64, KeyPurpose), CollectionKeys>>,
}

impl Keyring {
    /// An empty keyring.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an unwrapped key version; `primary` makes it the version new
    /// records are encrypted with.
    pub fn insert(&self, collection: i64, purpose: KeyPurpose, version: u32, key: DataKey, primary: bool) {
        let mut map = self.collections.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = map
            .entry((collection, purpose))
            .or_insert_with(|| CollectionKeys { primary: version, versions: BTreeMap::new() });
        entry.versions.insert(version, key);
        if primary {
            entry.primary = version;
        }
    }

    /// Forgets a destroyed version (its key is zeroized as it drops).
    pub fn remove(&self, collection: i64, purpose: KeyPurpose, version: u32) {
        let mut map = self.collections.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(keys) = map.get_mut(&(collection, purpose)) {
            keys.versions.remove(&version);
        }
    }

    /// Runs `f` with the primary `purpose` key of `collection` and its
    /// version, or returns `None` when the collection has no such key.
    pub fn with_primary<T>(
        &self,
        collection: i64,
        purpose: KeyPurpose,
        f: impl FnOnce(u32, &DataKey) -> T,
    ) -> Option<T> {
        let map = self.collections.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let keys = map.get(&(collection, purpose))?;
        let key = keys.versions.get(&keys.primary)?;
        Some(f(keys.primary, key))
    }

    /// Runs `f` with version `version` of `collection`'s key, or returns
    /// `None` when there is no such version.
    pub fn with_version<T>(
        &self,
        collection: i64,
        purpose: KeyPurpose,
        version: u32,
        f: impl FnOnce(&DataKey) -> T,
    ) -> Option<T> {
        let map = self.collections.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(&(collection, purpose))?.versions.get(&version).map(f)
    }

    /// `f(version, key)` for every version of `collection`'s `purpose` keys,
    /// the primary first, then newest to oldest.
    pub fn map_versions<T>(
        &self,
        collection: i64,
        purpose: KeyPurpose,
        mut f: impl FnMut(u32, &DataKey) -> T,
    ) -> Vec<T> {
        let map = self.collections.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(keys) = map.get(&(collection, purpose)) else { return Vec::new() };
        let primary = keys.versions.get(&keys.primary).map(|key| f(keys.primary, key));
        primary
            .into_iter()
            .chain(keys.versions.iter().rev().filter(|(v, _)| **v != keys.primary).map(|(v, key)| f(*v, key)))
            .collect()
    }
}

/// Domain-separation label of blind-index digests.
const INDEX_LABEL: &[u8] = b"piivault/v1/index";

/// The blind index of a (normalized) value in `collection`:
/// HMAC-SHA256(index key, len‖label ‖ len‖collection ‖ value). The value
/// comes last and unprefixed, so values of any length are unambiguous.
pub fn blind_index(key: &DataKey, collection: &str, value: &[u8]) -> Result<[u8; 32], CryptoError> {
    use hmac::{Hmac, Mac as _};
    let mut prefix = Vec::with_capacity(64);
    bind(&mut prefix, &[INDEX_LABEL, collection.as_bytes()]).ok_or(CryptoError::Encrypt)?;
    let mut mac = <Hmac<sha2::Sha256>>::new_from_slice(key.expose_secret()).map_err(|_| CryptoError::Encrypt)?;
    mac.update(&prefix);
    mac.update(value);
    Ok(mac.finalize().into_bytes().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::root::{self, RawKey, Unlock};

    fn root_key(byte: u8) -> RootKey {
        let unlock = Unlock::RawKey(RawKey::parse(&[byte; 32]).unwrap());
        root::create(&unlock, root::MIN_KDF).unwrap().0
    }

    #[test]
    fn wrap_binds_purpose_collection_and_version() {
        let root = root_key(1);
        let key = DataKey::from_bytes([9; 32]);
        let wrapped = wrap(&root, KeyPurpose::Data, "card", 1, &key).unwrap();
        assert_eq!(wrapped.len(), WRAPPED_LEN);
        let back = unwrap(&root, KeyPurpose::Data, "card", 1, &wrapped).unwrap();
        assert_eq!(back.expose_secret(), &[9; 32]);
        assert!(matches!(unwrap(&root, KeyPurpose::Data, "ssn", 1, &wrapped), Err(CryptoError::Decrypt)));
        assert!(matches!(unwrap(&root, KeyPurpose::Data, "card", 2, &wrapped), Err(CryptoError::Decrypt)));
        assert!(matches!(unwrap(&root_key(2), KeyPurpose::Data, "card", 1, &wrapped), Err(CryptoError::Decrypt)));
        for i in 0..wrapped.len() {
            let mut bad = wrapped.clone();
            bad[i] ^= 0x01;
            assert!(unwrap(&root, KeyPurpose::Data, "card", 1, &bad).is_err(), "flip at {i} accepted");
        }
        assert!(unwrap(&root, KeyPurpose::Data, "card", 1, &wrapped[..WRAPPED_LEN - 1]).is_err());
    }

    /// Cross-checked with Python's `hmac` over the same bytes.
    #[test]
    fn blind_index_known_answer() {
        let key = DataKey::from_bytes([7; 32]);
        let digest = blind_index(&key, "email", b"jane@example.org").unwrap();
        assert_eq!(hex::encode(digest), "8f45d75d1b90dc930650519389abeb9d8d034cd02c4a50875322be07f55e51de");
        assert_ne!(blind_index(&key, "email2", b"jane@example.org").unwrap(), digest);
        assert_ne!(blind_index(&DataKey::from_bytes([8; 32]), "email", b"jane@example.org").unwrap(), digest);
    }

    #[test]
    fn keyring_primary_and_versions() {
        let ring = Keyring::new();
        let data = KeyPurpose::Data;
        assert!(ring.with_primary(1, data, |v, _| v).is_none());
        ring.insert(1, data, 1, DataKey::from_bytes([1; 32]), true);
        ring.insert(1, data, 2, DataKey::from_bytes([2; 32]), true);
        ring.insert(1, data, 3, DataKey::from_bytes([3; 32]), false);
        ring.insert(1, KeyPurpose::Index, 1, DataKey::from_bytes([9; 32]), true);
        assert_eq!(ring.with_primary(1, data, |v, k| (v, k.expose_secret()[0])), Some((2, 2)));
        assert_eq!(ring.with_version(1, data, 1, |k| k.expose_secret()[0]), Some(1));
        assert!(ring.with_version(1, data, 4, |_| ()).is_none());
        assert_eq!(ring.map_versions(1, data, |v, _| v), vec![2, 3, 1]);
        assert_eq!(ring.with_primary(1, KeyPurpose::Index, |v, k| (v, k.expose_secret()[0])), Some((1, 9)));
        assert!(ring.map_versions(2, data, |v, _| v).is_empty());
    }
}
