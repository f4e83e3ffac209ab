//! The vault core: validate, tokenize and encrypt, store.
//!
//! Transport-free: no tonic, no SQL. Every call answers item by item, in the
//! order asked, so one bad item never fails the rest. Values exist in clear
//! only inside [`PiiValue`]s and the zeroizing buffers of the crypto module;
//! nothing here logs or formats one.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{CollectionName, Config, Limits};
use crate::crypto::keyring::{self, DataKey, KeyPurpose, Keyring};
use crate::crypto::root::RootKey;
use crate::crypto::{CryptoError, envelope};
use crate::error::{ItemError, VaultError};
use crate::store::{CollectionId, InsertOutcome, KeyState, NewRecord, OpenMode, Store, StoreOptions};
use crate::token::{RandomTokens, Token, TokenGenerator, TokenPrefix};
use crate::value::PiiValue;

/// How many tokens are drawn for one value before giving up. With 128-bit
/// tokens a single collision is already beyond belief; the bound exists for
/// small format-preserving token spaces.
const MAX_TOKEN_ATTEMPTS: usize = 8;

/// The outcome of one item.
pub type ItemResult<T> = Result<T, ItemError>;

struct Collection {
    id: CollectionId,
    name: CollectionName,
    prefix: TokenPrefix,
}

struct Inner {
    limits: Limits,
    collections: HashMap<String, Collection>,
    keyring: Keyring,
    store: Store,
    tokens: Box<dyn TokenGenerator>,
}

/// The vault. Cheap to clone; all clones share one store and keyring.
#[derive(Clone)]
pub struct Vault {
    inner: Arc<Inner>,
}

impl Vault {
    /// Opens the existing store named by `config`, creating any collection
    /// declared in the config but not yet in the store (with a fresh data
    /// key), and unwraps every data key with `root`.
    pub async fn open(config: &Config, root: &RootKey) -> Result<Self, VaultError> {
        Self::open_with(config, root, OpenMode::Existing, Box::new(RandomTokens)).await
    }

    /// Creates a new store for `config` (refusing an existing file) and opens
    /// it.
    pub async fn create(config: &Config, root: &RootKey) -> Result<Self, VaultError> {
        Self::open_with(config, root, OpenMode::Create, Box::new(RandomTokens)).await
    }

    /// [`Vault::open`] with an explicit mode and token generator.
    pub async fn open_with(
        config: &Config,
        root: &RootKey,
        mode: OpenMode,
        tokens: Box<dyn TokenGenerator>,
    ) -> Result<Self, VaultError> {
        let store = Store::open(
            &config.database,
            mode,
            StoreOptions {
                read_connections: config.store.read_connections,
                max_group_commit: config.store.max_group_commit,
            },
        )?;

        let mut collections = HashMap::new();
        for (name, settings) in &config.collections {
            let id = if let Some(id) = store.collection_id(name.as_str()).await? {
                id
            } else {
                let key = DataKey::generate()?;
                let wrapped = keyring::wrap(root, KeyPurpose::Data, name.as_str(), 1, &key)?;
                let id = store.create_collection(name.as_str(), KeyPurpose::Data.as_str(), wrapped).await?;
                tracing::info!(collection = %name, "created collection with data key version 1");
                id
            };
            collections.insert(
                name.as_str().to_owned(),
                Collection { id, name: name.clone(), prefix: settings.prefix.clone() },
            );
        }

        let keyring = Keyring::new();
        for stored in store.load_keys().await? {
            let Some(collection) = collections.values().find(|c| c.id == stored.collection) else {
                continue; // in the store but no longer configured: not served
            };
            if stored.state == KeyState::Retired {
                continue;
            }
            let Some(purpose) = KeyPurpose::parse(&stored.purpose) else {
                return Err(VaultError::Keyring {
                    collection: collection.name.to_string(),
                    reason: "a stored key has an unknown purpose",
                });
            };
            let key = keyring::unwrap(root, purpose, &stored.collection_name, stored.version, &stored.wrapped)
                .map_err(|_| VaultError::Keyring {
                    collection: collection.name.to_string(),
                    reason: "a wrapped key does not open with this root key",
                })?;
            keyring.insert(stored.collection.0, stored.version, key, stored.state == KeyState::Primary);
        }
        for collection in collections.values() {
            if keyring.with_primary(collection.id.0, |_, _| ()).is_none() {
                return Err(VaultError::Keyring {
                    collection: collection.name.to_string(),
                    reason: "it has no primary data key",
                });
            }
        }

        Ok(Self { inner: Arc::new(Inner { limits: config.limits, collections, keyring, store, tokens }) })
    }

    fn collection(&self, name: &str) -> Result<&Collection, VaultError> {
        self.inner.collections.get(name).ok_or(VaultError::UnknownCollection)
    }

    fn check_count(&self, n: usize) -> Result<(), VaultError> {
        let max = self.inner.limits.max_items_per_call;
        match n {
            0 => Err(VaultError::EmptyRequest),
            n if n > max => Err(VaultError::TooManyItems { got: n, max }),
            _ => Ok(()),
        }
    }

    /// Whether `name` is a collection this vault serves.
    pub fn has_collection(&self, name: &str) -> bool {
        self.inner.collections.contains_key(name)
    }

    /// Names of the collections this vault serves, sorted.
    pub fn collection_names(&self) -> Vec<String> {
        let mut names: Vec<_> = self.inner.collections.keys().cloned().collect();
        names.sort();
        names
    }

    /// Swaps each value for a new random token. Answers item by item, in
    /// order; an answer is given only once its record is durable.
    pub async fn tokenize(
        &self,
        collection: &str,
        values: Vec<PiiValue>,
    ) -> Result<Vec<ItemResult<Token>>, VaultError> {
        let coll = self.collection(collection)?;
        self.check_count(values.len())?;
        let max = self.inner.limits.max_value_bytes;
        let mut results: Vec<Option<ItemResult<Token>>> = values
            .iter()
            .map(|v| match v.len() {
                0 => Some(Err(ItemError::EmptyValue)),
                n if n > max => Some(Err(ItemError::ValueTooLong { max })),
                _ => None,
            })
            .collect();
        let mut pending: Vec<usize> = (0..values.len()).filter(|&i| results[i].is_none()).collect();

        for _ in 0..MAX_TOKEN_ATTEMPTS {
            if pending.is_empty() {
                break;
            }
            let mut records = Vec::with_capacity(pending.len());
            let mut tokens = Vec::with_capacity(pending.len());
            for &i in &pending {
                let token = self.inner.tokens.generate(&coll.prefix)?;
                let (key_version, ciphertext) = self
                    .inner
                    .keyring
                    .with_primary(coll.id.0, |version, key| {
                        envelope::seal(
                            key,
                            version,
                            coll.name.as_str(),
                            token.as_str(),
                            values[i].expose_secret().as_bytes(),
                        )
                        .map(|ct| (version, ct))
                    })
                    .ok_or(VaultError::Keyring {
                        collection: coll.name.to_string(),
                        reason: "it has no primary data key",
                    })??;
                records.push(NewRecord { token: token.as_str().to_owned(), key_version, ciphertext });
                tokens.push(token);
            }
            let outcomes = self.inner.store.insert_records(coll.id, records).await?;
            let mut retry = Vec::new();
            for ((i, token), outcome) in pending.into_iter().zip(tokens).zip(outcomes) {
                match outcome {
                    InsertOutcome::Inserted => results[i] = Some(Ok(token)),
                    InsertOutcome::Collision => retry.push(i),
                }
            }
            if !retry.is_empty() {
                tracing::debug!(collection = %coll.name, collisions = retry.len(), "token collisions; drawing again");
            }
            pending = retry;
        }
        if !pending.is_empty() {
            tracing::warn!(collection = %coll.name, items = pending.len(), "no free token after {MAX_TOKEN_ATTEMPTS} draws");
        }
        Ok(results.into_iter().map(|r| r.unwrap_or(Err(ItemError::TokenSpaceExhausted))).collect())
    }

    /// Swaps each token back for its value. Unknown, deleted, malformed and
    /// other collections' tokens all answer [`ItemError::NotFound`].
    pub async fn detokenize(
        &self,
        collection: &str,
        tokens: Vec<String>,
    ) -> Result<Vec<ItemResult<PiiValue>>, VaultError> {
        let coll = self.collection(collection)?;
        self.check_count(tokens.len())?;
        let (parsed, lookups) = parse_tokens(coll, &tokens);
        let found = self.inner.store.get_records(coll.id, lookups).await?;
        let mut found = found.into_iter();
        Ok(parsed
            .into_iter()
            .map(|token| {
                let token = token.ok_or(ItemError::NotFound)?;
                let record = found.next().flatten().ok_or(ItemError::NotFound)?;
                self.open_record(coll, &token, &record.ciphertext)
            })
            .collect())
    }

    fn open_record(&self, coll: &Collection, token: &Token, ciphertext: &[u8]) -> ItemResult<PiiValue> {
        let opened = envelope::key_version(ciphertext).and_then(|version| {
            self.inner
                .keyring
                .with_version(coll.id.0, version, |key| {
                    envelope::open(key, coll.name.as_str(), token.as_str(), ciphertext)
                })
                .unwrap_or(Err(CryptoError::Decrypt))
        });
        let unreadable = || {
            tracing::error!(
                alert = true,
                collection = %coll.name,
                token = %token,
                "stored record failed to decrypt: corruption, tampering, or a missing key version"
            );
            ItemError::Unreadable
        };
        let mut plain = opened.map_err(|_| unreadable())?;
        match String::from_utf8(std::mem::take(&mut *plain)) {
            Ok(value) => Ok(PiiValue::new(value)),
            Err(not_utf8) => {
                zeroize::Zeroize::zeroize(&mut not_utf8.into_bytes());
                Err(unreadable())
            }
        }
    }

    /// [`Vault::detokenize`], with each value masked by [`mask`].
    pub async fn detokenize_masked(
        &self,
        collection: &str,
        tokens: Vec<String>,
    ) -> Result<Vec<ItemResult<PiiValue>>, VaultError> {
        let values = self.detokenize(collection, tokens).await?;
        Ok(values.into_iter().map(|r| r.map(|v| mask(&v))).collect())
    }

    /// Deletes the records behind tokens: `Ok(())` for each live token
    /// deleted, [`ItemError::NotFound`] otherwise. A deleted token is never
    /// issued again.
    pub async fn delete(&self, collection: &str, tokens: Vec<String>) -> Result<Vec<ItemResult<()>>, VaultError> {
        let coll = self.collection(collection)?;
        self.check_count(tokens.len())?;
        let (parsed, lookups) = parse_tokens(coll, &tokens);
        let deleted = self.inner.store.delete_records(coll.id, lookups).await?;
        let mut deleted = deleted.into_iter();
        Ok(parsed
            .into_iter()
            .map(|token| match token {
                Some(_) if deleted.next() == Some(true) => Ok(()),
                _ => Err(ItemError::NotFound),
            })
            .collect())
    }

    /// Live records per collection name.
    pub async fn record_counts(&self) -> Result<Vec<(String, u64)>, VaultError> {
        let counts = self.inner.store.record_counts().await?;
        let mut out: Vec<(String, u64)> = self
            .inner
            .collections
            .values()
            .map(|c| (c.name.to_string(), counts.iter().find(|(id, _)| *id == c.id).map_or(0, |(_, n)| *n)))
            .collect();
        out.sort();
        Ok(out)
    }
}

/// How many trailing letters and digits a masked value keeps.
const MASK_KEEP_LAST: usize = 4;
/// A value with fewer letters and digits than this is masked entirely.
const MASK_MIN_ALNUM: usize = 8;

/// The default mask: every letter and digit becomes `*` except the last
/// four; separators stay where they are (`4111 1111 1111 1111` →
/// `**** **** **** 1111`, `078-05-1120` → `***-**-1120`). A value with
/// fewer than eight letters and digits is masked entirely.
pub fn mask(value: &PiiValue) -> PiiValue {
    let text = value.expose_secret();
    let alnum = text.chars().filter(|c| c.is_alphanumeric()).count();
    let keep_from = if alnum >= MASK_MIN_ALNUM { alnum - MASK_KEEP_LAST } else { alnum };
    let mut seen = 0;
    let masked: String = text
        .chars()
        .map(|c| {
            if c.is_alphanumeric() {
                seen += 1;
                if seen > keep_from { c } else { '*' }
            } else {
                c
            }
        })
        .collect();
    PiiValue::new(masked)
}

/// Parses each token for `coll`; returns, per input, the parsed token (or
/// `None` when malformed or of another collection's prefix) and the list of
/// token strings worth looking up, in the same order as the `Some`s.
fn parse_tokens(coll: &Collection, tokens: &[String]) -> (Vec<Option<Token>>, Vec<String>) {
    let parsed: Vec<Option<Token>> =
        tokens.iter().map(|t| t.parse::<Token>().ok().filter(|t| t.prefix() == coll.prefix.as_str())).collect();
    let lookups = parsed.iter().flatten().map(|t| t.as_str().to_owned()).collect();
    (parsed, lookups)
}
