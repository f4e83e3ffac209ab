//! The vault core: validate, tokenize and encrypt, store.
//!
//! Transport-free: no tonic, no SQL. Every call answers item by item, in the
//! order asked, so one bad item never fails the rest. Values exist in clear
//! only inside [`PiiValue`]s and the zeroizing buffers of the crypto module;
//! nothing here logs or formats one.

use std::collections::HashMap;
use std::sync::Arc;

use crate::audit::{self, AuditKey, AuditRecord, AuditSink, Head, VerifyError};
use crate::config::{CollectionName, Config, Limits, SinkSetting};
use crate::crypto::keyring::{self, DataKey, KeyPurpose, Keyring};
use crate::crypto::root::{self as crypto_root, KdfParams, RootKey, Unlock};
use crate::crypto::{CryptoError, envelope};
use crate::error::{ItemError, VaultError};
use crate::format::{Format, Mask, Normalize};
use crate::store::{
    AuditFilter, AuditRow, CollectionId, DATA_PURPOSE, INDEX_PURPOSE, IndexEntry, InsertOutcome, KeyInfo, KeyState,
    NewRecord, OpenMode, Pending, Reencrypted, Store, TokenLookup,
};
use crate::token::{RandomTokens, Token, TokenGenerator};
use crate::value::PiiValue;

/// How many tokens are drawn for one value before giving up. With 128-bit
/// tokens a single collision is already beyond belief; the bound exists for
/// small format-preserving token spaces.
const MAX_TOKEN_ATTEMPTS: usize = 8;

/// Share of its token space a collection may issue before new values are
/// refused (a tenth), and before the server warns (a hundredth).
const SPACE_REFUSE_DIVISOR: u128 = 10;
const SPACE_WARN_DIVISOR: u128 = 100;

/// Records per transaction when the blind index is rebuilt.
const INDEX_BATCH: usize = 500;

/// The outcome of one item.
pub type ItemResult<T> = Result<T, ItemError>;

/// The suffix of a sealed root file written by a root-key rotation that has
/// not been put in place yet (`root.sealed.new`).
pub const PENDING_SEALED_SUFFIX: &str = "new";

/// `root.sealed` → `root.sealed.new`.
pub fn pending_sealed_path(sealed: &std::path::Path) -> std::path::PathBuf {
    let mut name = sealed.file_name().map(std::ffi::OsStr::to_os_string).unwrap_or_default();
    name.push(".");
    name.push(PENDING_SEALED_SUFFIX);
    sealed.with_file_name(name)
}

/// How far a re-encryption got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReencryptProgress {
    /// Records moved onto the primary version so far.
    pub moved: u64,
    /// Records that could not be decrypted (left in place, alerted).
    pub unreadable: u64,
    /// At the end: live records still not under the primary.
    pub remaining: u64,
}

/// Who is asking and from where: what the audit trail records about the
/// requester. Never holds a value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requester {
    /// The authenticated caller's name (empty when unauthenticated).
    pub caller: String,
    /// The peer address, if any.
    pub peer: String,
    /// The request id, if any.
    pub request_id: String,
}

impl Requester {
    /// A requester known only by name (tools and tests in process).
    pub fn named(caller: impl Into<String>) -> Self {
        Self { caller: caller.into(), ..Self::default() }
    }

    /// The audit record of an outcome of this requester's call.
    pub fn record(&self, action: &str, collection: &str, items: usize, outcome: &str) -> AuditRecord {
        AuditRecord {
            at_micros: crate::store::now_micros(),
            caller: self.caller.clone(),
            action: action.to_owned(),
            collection: collection.to_owned(),
            items: u32::try_from(items).unwrap_or(u32::MAX),
            tokens: Vec::new(),
            outcome: outcome.to_owned(),
            error_code: String::new(),
            request_id: self.request_id.clone(),
            peer: self.peer.clone(),
        }
    }
}

struct Collection {
    id: CollectionId,
    name: CollectionName,
    format: Format,
    deterministic: bool,
    normalize: Normalize,
    ttl: Option<std::time::Duration>,
    mask: Mask,
    max_value_len: usize,
    rotate_after: Option<std::time::Duration>,
    max_encryptions: Option<u64>,
    /// Deterministic collections: index-key versions from this one on hold
    /// digests of the canonical value; older ones, of the value as written
    /// (before schema version 5).
    canonical_index_from: u32,
    /// Index versions from before canonical indexing are still in use:
    /// the index is rebuilt before the vault serves, since until then a
    /// value written another way than its first writing would not find its
    /// token.
    reindex_before_serving: bool,
    /// Tokens issued so far, per length.
    occupancy: Occupancy,
}

/// Tokens a shaped collection has issued, per value length (letters and
/// digits), counted against that length's token space (a random or email
/// token space cannot fill up).
struct Occupancy {
    issued: Vec<std::sync::atomic::AtomicU64>,
    /// Whether the 1% warning has been logged, per length.
    warned: Vec<std::sync::atomic::AtomicBool>,
}

impl Occupancy {
    fn new(counts: &[(usize, u64)]) -> Self {
        let len = crate::format::MAX_PRESERVED_LEN + 1;
        let issued: Vec<_> = (0..len).map(|_| std::sync::atomic::AtomicU64::new(0)).collect();
        for &(slots, n) in counts {
            if let Some(slot) = issued.get(slots) {
                slot.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Self { issued, warned: (0..len).map(|_| std::sync::atomic::AtomicBool::new(false)).collect() }
    }

    fn issued(&self, slots: usize) -> u64 {
        self.issued.get(slots).map_or(0, |n| n.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn add(&self, slots: usize, n: u64) {
        if let Some(slot) = self.issued.get(slots) {
            slot.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl Collection {
    /// The error for a collection without a primary `purpose` key.
    fn no_primary(&self, purpose: KeyPurpose) -> VaultError {
        VaultError::Keyring {
            collection: self.name.to_string(),
            reason: if purpose == KeyPurpose::Index {
                "it has no primary index key"
            } else {
                "it has no primary data key"
            },
        }
    }

    /// `Err` when the collection has issued a tenth of the token space of
    /// the length of any of `values` (letters and digits); warns once per
    /// length past a hundredth.
    fn check_space<'v>(&self, values: impl Iterator<Item = &'v PiiValue>) -> Result<(), VaultError> {
        if !self.format.is_canonicalized() {
            return Ok(());
        }
        let mut new: std::collections::BTreeMap<usize, u64> = std::collections::BTreeMap::new();
        for value in values {
            *new.entry(crate::format::slots_of(value.expose_secret())).or_default() += 1;
        }
        for (length, n) in new {
            let space = self.format.token_space_at(length);
            let issued = self.occupancy.issued(length);
            let after = u128::from(issued) + u128::from(n);
            if after > space / SPACE_REFUSE_DIVISOR {
                tracing::error!(alert = true, collection = %self.name, length, issued, space, "token space a tenth full: new values of this length refused");
                return Err(VaultError::TokenSpaceFull { issued, space });
            }
            if after > space / SPACE_WARN_DIVISOR
                && !self
                    .occupancy
                    .warned
                    .get(length)
                    .is_some_and(|w| w.swap(true, std::sync::atomic::Ordering::Relaxed))
            {
                tracing::warn!(
                    alert = true,
                    collection = %self.name,
                    length,
                    issued,
                    space,
                    "the collection holds more than 1% of the token space of this length; new values are refused at 10%"
                );
            }
        }
        Ok(())
    }

    /// How a presented token is looked for (see [`TokenLookup`]).
    fn lookup(&self, token: &Token) -> TokenLookup {
        let exact = token.as_str();
        let canonical = self.format.is_canonicalized().then(|| self.format.canonical(exact).into_owned());
        TokenLookup { exact: exact.to_owned(), canonical }
    }

    /// What the blind index digests under index-key `version`: the
    /// canonical value from [`Collection::canonical_index_from`] on, the
    /// value as written before.
    fn index_form<'v>(&self, version: u32, value: &'v str) -> std::borrow::Cow<'v, str> {
        if version >= self.canonical_index_from {
            self.format.canonical(value)
        } else {
            std::borrow::Cow::Borrowed(value)
        }
    }
}

struct Inner {
    limits: Limits,
    collections: HashMap<String, Collection>,
    keyring: Keyring,
    store: Arc<dyn Store>,
    tokens: Box<dyn TokenGenerator>,
    audit_key: AuditKey,
    sink: Option<Arc<AuditSink>>,
    /// Key operations (rotate, retire) run one at a time.
    key_ops: tokio::sync::Mutex<()>,
    /// The unsealed root key, for wrapping new key versions; replaced by a
    /// root-key rotation.
    root: std::sync::RwLock<RootKey>,
    /// Where the sealed root key lives.
    sealed_root: std::path::PathBuf,
    /// The PKCS#11 token, when one is configured: for root-key rotations
    /// into it. Requests never need it (the root key is unsealed).
    hsm: std::sync::OnceLock<Arc<crate::crypto::pkcs11::Hsm>>,
    /// Held by the one audit verification that may run at a time.
    verifying: tokio::sync::Mutex<()>,
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
        let sink = match &config.audit.sink {
            SinkSetting::None => None,
            SinkSetting::Stdout => Some(Arc::new(AuditSink::stdout())),
            SinkSetting::File(path) => {
                Some(Arc::new(AuditSink::file(path).map_err(|e| VaultError::Sink(e.to_string()))?))
            }
        };
        let store = crate::store::open(&config.store_backend, &config.store, mode, sink.clone())?;

        // The audit chain key: created with the vault, wrapped like every
        // other key. Without it nothing that must be audited can be written.
        // Unwrapping it is also the proof that `root` is this vault's root
        // key, before anything new is wrapped under it.
        let candidate = DataKey::generate()?;
        let wrapped = keyring::wrap(root, KeyPurpose::Audit, "", 1, &candidate)?;
        let stored = store.vault_key(KeyPurpose::Audit.as_str(), wrapped).await?;
        let audit_key = keyring::unwrap(root, KeyPurpose::Audit, "", 1, &stored).map_err(|_| VaultError::Keyring {
            collection: "(audit)".to_owned(),
            reason: "the audit key does not open with this root key",
        })?;
        let audit_bytes = zeroize::Zeroizing::new(*audit_key.expose_secret());
        let head = store.install_audit_key(AuditKey::from_bytes(*audit_bytes)).await?;
        tracing::info!(seq = head.seq, mac = %hex::encode(head.mac), "audit trail head");
        // Only now, with the root key proven by the audit key, is anything
        // created under it.
        let mut collections = HashMap::new();
        for (name, settings) in &config.collections {
            collections.insert(name.as_str().to_owned(), open_collection(store.as_ref(), root, name, settings).await?);
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
            keyring.insert(stored.collection.0, purpose, stored.version, key, stored.state == KeyState::Primary);
        }

        for collection in collections.values() {
            if keyring.with_primary(collection.id.0, KeyPurpose::Data, |_, _| ()).is_none() {
                return Err(collection.no_primary(KeyPurpose::Data));
            }
        }

        let vault = Self {
            inner: Arc::new(Inner {
                limits: config.limits,
                collections,
                keyring,
                store,
                tokens,
                audit_key: AuditKey::from_bytes(*audit_bytes),
                sink,
                key_ops: tokio::sync::Mutex::new(()),
                root: std::sync::RwLock::new(root.duplicate()),
                sealed_root: config.sealed_root.clone(),
                hsm: std::sync::OnceLock::new(),
                verifying: tokio::sync::Mutex::new(()),
            }),
        };
        let upgrading: Vec<String> =
            vault.inner.collections.values().filter(|c| c.reindex_before_serving).map(|c| c.name.to_string()).collect();
        for name in upgrading {
            let indexed = vault.rebuild_index(&Requester::named("(upgrade)"), &name).await?;
            tracing::info!(collection = %name, indexed, "deterministic index on canonical values");
        }
        Ok(vault)
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

    /// Swaps each value for a token of the collection's format: a new one,
    /// or, in a deterministic collection, the one its (normalized) value
    /// already has. Answers item by item, in order; an answer is given only
    /// once its record is durable.
    pub async fn tokenize(
        &self,
        who: &Requester,
        collection: &str,
        values: Vec<PiiValue>,
    ) -> Result<Vec<ItemResult<Token>>, VaultError> {
        let coll = self.collection(collection)?;
        self.check_count(values.len())?;
        let (values, mut results): (Vec<PiiValue>, Vec<Option<ItemResult<Token>>>) = values
            .into_iter()
            .map(|v| {
                let (value, problem) = prepare_value(&coll.normalize, coll.max_value_len, &coll.format, v);
                (value, problem.map(Err))
            })
            .unzip();
        // Only values that will be tokenized count against the space.
        coll.check_space(values.iter().zip(&results).filter(|(_, r)| r.is_none()).map(|(v, _)| v))?;
        let mut pending: Vec<usize> = (0..values.len()).filter(|&i| results[i].is_none()).collect();
        let audit = who.record("tokenize", collection, values.len(), "OK");
        if pending.is_empty() {
            // Nothing to store, but the request is still on the record.
            self.inner.store.append_audit(audit.clone()).await?;
        }
        let expires_at = coll
            .ttl
            .map(|ttl| crate::store::now_micros().saturating_add(i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX)));
        let indexes: Vec<Option<IndexEntry>> = if coll.deterministic {
            values.iter().map(|v| self.index_entry(coll, v).map(Some)).collect::<Result<_, _>>()?
        } else {
            values.iter().map(|_| None).collect()
        };

        for _ in 0..MAX_TOKEN_ATTEMPTS {
            if pending.is_empty() {
                break;
            }
            let mut records = Vec::with_capacity(pending.len());
            let mut tokens = Vec::with_capacity(pending.len());
            let mut drawn = Vec::with_capacity(pending.len());
            for &i in &pending {
                let value = values[i].expose_secret();
                let Some(token) = coll.format.generate(value, self.inner.tokens.as_ref())? else {
                    results[i] = Some(Err(ItemError::TokenSpaceExhausted));
                    continue;
                };
                // Stored (and bound to its ciphertext) in canonical form;
                // answered as drawn, in the caller's writing.
                let stored = coll.format.canonical(token.as_str()).into_owned();
                let (key_version, ciphertext) = self
                    .inner
                    .keyring
                    .with_primary(coll.id.0, KeyPurpose::Data, |version, key| {
                        envelope::seal(key, version, coll.name.as_str(), &stored, value.as_bytes())
                            .map(|ct| (version, ct))
                    })
                    .ok_or_else(|| coll.no_primary(KeyPurpose::Data))??;
                records.push(NewRecord {
                    token: stored,
                    key_version,
                    ciphertext,
                    expires_at,
                    index: indexes[i].clone(),
                });
                tokens.push(token);
                drawn.push(i);
            }
            if records.is_empty() {
                break;
            }
            let outcomes = self.inner.store.insert_records(coll.id, records, audit.clone()).await?;
            let mut retry = Vec::new();
            for ((i, token), outcome) in drawn.into_iter().zip(tokens).zip(outcomes) {
                match outcome {
                    InsertOutcome::Inserted => {
                        coll.occupancy.add(crate::format::slots_of(token.as_str()), 1);
                        results[i] = Some(Ok(token));
                    }
                    InsertOutcome::Existing(existing) => {
                        // The value's token, in the writing of this request.
                        let rendered = coll.format.render(&existing, values[i].expose_secret());
                        results[i] =
                            Some(rendered.and_then(|t| coll.format.parse_token(&t)).ok_or(ItemError::Unreadable));
                    }
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

    /// The version of `coll`'s primary `purpose` key.
    fn primary_version(&self, coll: &Collection, purpose: KeyPurpose) -> Result<u32, VaultError> {
        self.inner
            .keyring
            .with_primary(coll.id.0, purpose, |version, _| version)
            .ok_or_else(|| coll.no_primary(purpose))
    }

    /// The blind index of a normalized value: its digest under every live
    /// index-key version, primary first.
    fn index_entry(&self, coll: &Collection, value: &PiiValue) -> Result<IndexEntry, VaultError> {
        let lookups = self
            .inner
            .keyring
            .map_versions(coll.id.0, KeyPurpose::Index, |version, key| {
                let form = coll.index_form(version, value.expose_secret());
                keyring::blind_index(key, coll.name.as_str(), form.as_bytes()).map(|d| (version, d))
            })
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let &(version, digest) = lookups.first().ok_or_else(|| coll.no_primary(KeyPurpose::Index))?;
        Ok(IndexEntry { version, digest, lookups })
    }

    /// Swaps each token back for its value. Unknown, deleted, malformed and
    /// other collections' tokens all answer [`ItemError::NotFound`]. No value
    /// is returned before the audit record of this read is durable.
    pub async fn detokenize(
        &self,
        who: &Requester,
        collection: &str,
        tokens: Vec<String>,
    ) -> Result<Vec<ItemResult<PiiValue>>, VaultError> {
        self.reveal(who, collection, tokens, false).await
    }

    /// [`Vault::detokenize`], with each value masked by [`mask`].
    pub async fn detokenize_masked(
        &self,
        who: &Requester,
        collection: &str,
        tokens: Vec<String>,
    ) -> Result<Vec<ItemResult<PiiValue>>, VaultError> {
        self.reveal(who, collection, tokens, true).await
    }

    async fn reveal(
        &self,
        who: &Requester,
        collection: &str,
        tokens: Vec<String>,
        masked: bool,
    ) -> Result<Vec<ItemResult<PiiValue>>, VaultError> {
        let coll = self.collection(collection)?;
        self.check_count(tokens.len())?;
        let (parsed, lookups) = parse_tokens(coll, &tokens);
        let found = self.inner.store.get_records(coll.id, lookups).await?;
        let mut found = found.into_iter();
        let mut revealed = Vec::new();
        let results: Vec<ItemResult<PiiValue>> = parsed
            .into_iter()
            .map(|token| {
                token.ok_or(ItemError::NotFound)?;
                let record = found.next().flatten().ok_or(ItemError::NotFound)?;
                let value = self.open_record(coll, &record.token, &record.ciphertext)?;
                revealed.push(record.token);
                Ok(if masked { coll.mask.apply(&value) } else { value })
            })
            .collect();
        let action = if masked { "detokenize_masked" } else { "detokenize" };
        let mut audit = who.record(action, collection, tokens.len(), "OK");
        audit.tokens = revealed;
        // Fail closed: if this record cannot be written, no value leaves.
        self.inner.store.append_audit(audit).await?;
        Ok(results)
    }

    /// Appends the record of a request that has no data change of its own
    /// (an audit query, a refusal). Fails closed: a caller about to answer
    /// must not answer if this fails.
    pub async fn record(&self, record: AuditRecord) -> Result<(), VaultError> {
        self.inner.store.append_audit(record).await?;
        Ok(())
    }

    /// Records a request that failed or was refused before or inside the
    /// vault (`outcome` is the gRPC code name). Best effort: the caller
    /// already has its error; a record that cannot be written is logged.
    pub async fn audit_failure(
        &self,
        who: &Requester,
        action: &str,
        collection: &str,
        items: usize,
        outcome: &str,
        detail: &str,
    ) {
        let shown = if self.has_collection(collection) { collection } else { "" };
        let mut record = who.record(action, shown, items, outcome);
        record.error_code = detail.to_owned();
        if let Err(e) = self.record(record).await {
            tracing::error!(error = %e, action, outcome, "could not write the audit record of a failed request");
        }
    }

    /// Audit records matching `filter`, oldest first, at most `limit`, with
    /// their chain MACs. Reading does not verify: see [`Vault::verify_audit`].
    pub async fn query_audit(
        &self,
        filter: AuditFilter,
        limit: usize,
    ) -> Result<Vec<(u64, AuditRecord, Vec<u8>)>, VaultError> {
        let rows = self.inner.store.query_audit(filter, limit).await?;
        rows.into_iter()
            .map(|row| match AuditRecord::decode(&row.record) {
                Ok((_, record)) => Ok((row.seq, record, row.mac)),
                Err(_) => Err(VaultError::Audit(VerifyError { seq: row.seq, reason: "malformed record" })),
            })
            .collect()
    }

    fn open_record(&self, coll: &Collection, token: &str, ciphertext: &[u8]) -> ItemResult<PiiValue> {
        let opened = envelope::key_version(ciphertext).and_then(|version| {
            self.inner
                .keyring
                .with_version(coll.id.0, KeyPurpose::Data, version, |key| {
                    envelope::open(key, coll.name.as_str(), token, ciphertext)
                })
                .unwrap_or(Err(CryptoError::Decrypt))
        });
        let unreadable = || {
            tracing::error!(
                alert = true,
                collection = %coll.name,
                token,
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

    /// Deletes the records behind tokens: `Ok(())` for each live token
    /// deleted, [`ItemError::NotFound`] otherwise. A deleted token is never
    /// issued again.
    pub async fn delete(
        &self,
        who: &Requester,
        collection: &str,
        tokens: Vec<String>,
    ) -> Result<Vec<ItemResult<()>>, VaultError> {
        let coll = self.collection(collection)?;
        self.check_count(tokens.len())?;
        let (parsed, lookups) = parse_tokens(coll, &tokens);
        let audit = who.record("delete", collection, tokens.len(), "OK");
        let deleted = self.inner.store.delete_records(coll.id, lookups, audit).await?;
        let mut deleted = deleted.into_iter();
        Ok(parsed
            .into_iter()
            .map(|token| match token {
                Some(_) if deleted.next() == Some(true) => Ok(()),
                _ => Err(ItemError::NotFound),
            })
            .collect())
    }

    /// Checks the whole audit trail against its chain; returns the head or
    /// the first bad record.
    pub async fn verify_audit(&self) -> Result<Result<Head, VerifyError>, VaultError> {
        // One at a time: a second caller is told to come back, not queued.
        let Ok(_one_at_a_time) = self.inner.verifying.try_lock() else {
            return Err(VaultError::VerifyBusy);
        };
        let mut chain = audit::Chain::new();
        let mut filter = AuditFilter::default();
        loop {
            let page = self.inner.store.query_audit(filter.clone(), VERIFY_PAGE).await?;
            let Some(last) = page.last() else { break };
            filter.after_seq = last.seq;
            for row in &page {
                // The chain first: at one record, a broken chain is the
                // finding; columns that disagree with an intact record next.
                if let Err(e) = chain.push(&self.inner.audit_key, row.seq, &row.record, &row.mac) {
                    return Ok(Err(e));
                }
                if !columns_match(row) {
                    return Ok(Err(VerifyError { seq: row.seq, reason: "query columns do not match the record" }));
                }
            }
        }
        Ok(Ok(chain.head()))
    }

    /// The data-key versions of `collection`, oldest first, with state,
    /// live records and encryptions, then its blind-index key versions (if
    /// deterministic). Audited.
    pub async fn list_keys(&self, who: &Requester, collection: &str) -> Result<Vec<KeyInfo>, VaultError> {
        let coll = self.collection(collection)?;
        let mut keys = self.inner.store.list_keys(coll.id, DATA_PURPOSE).await?;
        keys.extend(self.inner.store.list_keys(coll.id, INDEX_PURPOSE).await?);
        self.record(who.record("list_keys", collection, 0, "OK")).await?;
        Ok(keys)
    }

    /// A new random primary data key for `collection`; older versions keep
    /// decrypting. Returns the new version.
    pub async fn rotate_data_key(&self, who: &Requester, collection: &str) -> Result<u32, VaultError> {
        self.rotate(who, collection, KeyPurpose::Data, None).await
    }

    /// A new primary blind-index key for deterministic `collection`: new
    /// values are indexed under it at once, lookups keep trying the older
    /// versions, and the index is rebuilt under it in the background (then
    /// the older versions are destroyed). Returns the new version.
    pub async fn rotate_index_key(&self, who: &Requester, collection: &str) -> Result<u32, VaultError> {
        let coll = self.collection(collection)?;
        if !coll.deterministic {
            return Err(VaultError::NotDeterministic);
        }
        let version = self.rotate(who, collection, KeyPurpose::Index, None).await?;
        let (vault, who, collection) = (self.clone(), who.clone(), collection.to_owned());
        tokio::spawn(async move {
            if let Err(e) = vault.rebuild_index(&who, &collection).await {
                tracing::error!(error = %e, collection, "blind-index rebuild stopped; it resumes at the next start");
            }
        });
        Ok(version)
    }

    /// Indexes every live record of deterministic `collection` under the
    /// primary index key (moving it off older versions), `INDEX_BATCH` per
    /// transaction while traffic goes on, then destroys the index-key
    /// versions nothing uses any more. Resumable: the state is the index
    /// itself. Returns how many records were (re)indexed.
    pub async fn rebuild_index(&self, who: &Requester, collection: &str) -> Result<u64, VaultError> {
        let coll = self.collection(collection)?;
        if !coll.deterministic {
            return Err(VaultError::NotDeterministic);
        }
        let mut done = 0u64;
        let mut after = String::new();
        loop {
            let primary = self.primary_version(coll, KeyPurpose::Index)?;
            let page = self
                .inner
                .store
                .records_needing(coll.id, Pending::Indexing { version: primary }, after.clone(), INDEX_BATCH)
                .await?;
            let Some((last, _)) = page.last() else { break };
            after.clone_from(last);
            let mut entries = Vec::with_capacity(page.len());
            for (token, ciphertext) in &page {
                // An unreadable record was alerted by open_record; it keeps
                // its old entry (if any) and is retried next time.
                let Ok(value) = self.open_record(coll, token, ciphertext) else { continue };
                let value = coll.normalize.apply(value);
                let digest = self
                    .inner
                    .keyring
                    .with_version(coll.id.0, KeyPurpose::Index, primary, |key| {
                        let form = coll.index_form(primary, value.expose_secret());
                        keyring::blind_index(key, coll.name.as_str(), form.as_bytes())
                    })
                    .ok_or_else(|| coll.no_primary(KeyPurpose::Index))??;
                entries.push((token.clone(), digest));
            }
            let audit = who.record("reindex", collection, entries.len(), "OK");
            done += self.inner.store.index_records(coll.id, primary, entries, audit).await? as u64;
        }
        let retired = self
            .inner
            .store
            .retire_unused_index_keys(coll.id, who.record("retire_index_keys", collection, 0, "OK"))
            .await?;
        for version in &retired {
            self.inner.keyring.remove(coll.id.0, KeyPurpose::Index, *version);
        }
        tracing::info!(collection, indexed = done, retired = ?retired, "blind index rebuilt");
        Ok(done)
    }

    /// Starts what a previous run left unfinished: a blind-index rebuild of
    /// each deterministic collection that has records not indexed under its
    /// primary index key (after an index-key rotation, a crash, or a
    /// collection made deterministic).
    pub async fn resume_background_work(&self) -> Result<(), VaultError> {
        for name in self.collection_names() {
            let coll = self.collection(&name)?;
            if !coll.deterministic {
                continue;
            }
            let primary = self.primary_version(coll, KeyPurpose::Index)?;
            let unindexed = self
                .inner
                .store
                .records_needing(coll.id, Pending::Indexing { version: primary }, String::new(), 1)
                .await?;
            let retiring = self
                .inner
                .store
                .list_keys(coll.id, INDEX_PURPOSE)
                .await?
                .iter()
                .any(|k| !matches!(k.state, KeyState::Primary | KeyState::Retired));
            if unindexed.is_empty() && !retiring {
                continue;
            }
            tracing::info!(collection = %name, "resuming the blind-index rebuild");
            let vault = self.clone();
            tokio::spawn(async move {
                if let Err(e) = vault.rebuild_index(&Requester::named("(startup)"), &name).await {
                    tracing::error!(error = %e, collection = %name, "blind-index rebuild stopped");
                }
            });
        }
        Ok(())
    }

    /// Erases the records of every collection with a `ttl` that have
    /// expired, `batch` per transaction, each batch audited. Returns how
    /// many.
    pub async fn purge_expired(&self, batch: usize) -> Result<u64, VaultError> {
        let who = Requester::named("(expiry)");
        let now = crate::store::now_micros();
        let mut purged = 0u64;
        for name in self.collection_names() {
            let coll = self.collection(&name)?;
            if coll.ttl.is_none() {
                continue;
            }
            loop {
                let audit = who.record("purge", &name, 0, "OK");
                let n = self.inner.store.purge_expired(coll.id, now, batch.max(1), audit).await?;
                purged += n as u64;
                if n < batch.max(1) {
                    break;
                }
            }
        }
        if purged > 0 {
            tracing::info!(purged, "expired records purged");
        }
        Ok(purged)
    }

    /// Rotates the data key of every collection whose primary has reached
    /// its configured age (`rotate_after`) or count (`max_encryptions`).
    /// Returns the collections rotated, with their new versions.
    pub async fn rotate_due(&self) -> Result<Vec<(String, u32)>, VaultError> {
        let now = crate::store::now_micros();
        let mut rotated = Vec::new();
        for name in self.collection_names() {
            let coll = self.collection(&name)?;
            if coll.rotate_after.is_none() && coll.max_encryptions.is_none() {
                continue;
            }
            let keys = self.inner.store.list_keys(coll.id, DATA_PURPOSE).await?;
            let Some(primary) = keys.iter().find(|k| k.state == KeyState::Primary) else { continue };
            let age = std::time::Duration::from_micros(u64::try_from(now - primary.created_at).unwrap_or(0));
            let reason = match (coll.rotate_after, coll.max_encryptions) {
                (Some(limit), _) if age >= limit => "age",
                (_, Some(limit)) if primary.encryptions >= limit => "encryptions",
                _ => continue,
            };
            let version = self.rotate_data_key(&Requester::named("(automatic rotation)"), &name).await?;
            tracing::info!(collection = %name, version, reason, "automatic data-key rotation");
            rotated.push((name, version));
        }
        Ok(rotated)
    }

    /// Responds to a suspected leak of `version`: marks it compromised (it
    /// never encrypts again), makes a new primary, and starts re-encrypting
    /// the collection in the background. Returns the new version.
    pub async fn rotate_compromised(&self, who: &Requester, collection: &str, version: u32) -> Result<u32, VaultError> {
        let new = self.rotate(who, collection, KeyPurpose::Data, Some(version)).await?;
        tracing::warn!(
            alert = true,
            collection,
            compromised = version,
            new_primary = new,
            "key version marked compromised"
        );
        let (vault, who, collection) = (self.clone(), who.clone(), collection.to_owned());
        tokio::spawn(async move {
            if let Err(e) = vault.reencrypt(&who, &collection, 500, &mut |_| {}).await {
                tracing::error!(error = %e, collection, "re-encryption after a compromise stopped; run `piivault keys reencrypt`");
            }
        });
        Ok(new)
    }

    async fn rotate(
        &self,
        who: &Requester,
        collection: &str,
        purpose: KeyPurpose,
        compromised: Option<u32>,
    ) -> Result<u32, VaultError> {
        let coll = self.collection(collection)?;
        let _one_at_a_time = self.inner.key_ops.lock().await;
        let keys = self.inner.store.list_keys(coll.id, purpose.as_str()).await?;
        if let Some(bad) = compromised
            && !keys.iter().any(|k| k.version == bad && k.state != KeyState::Retired)
        {
            return Err(VaultError::NoSuchKeyVersion(bad));
        }
        let version =
            keys.iter().map(|k| k.version).max().unwrap_or(0).checked_add(1).ok_or(VaultError::KeyConflict)?;
        let key = DataKey::generate()?;
        let wrapped = {
            let root = self.inner.root.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            keyring::wrap(&root, purpose, collection, version, &key)?
        };
        let (action, what) = if purpose == KeyPurpose::Index {
            ("rotate_index_key", "index key")
        } else {
            ("rotate_data_key", "data key")
        };
        let mut audit = who.record(action, collection, 0, "OK");
        audit.error_code = match compromised {
            Some(bad) => format!("new primary version {version}; version {bad} compromised"),
            None => format!("new primary {what} version {version}"),
        };
        self.inner
            .store
            .add_primary_key(coll.id, purpose.as_str(), version, wrapped, compromised, audit)
            .await
            .map_err(|e| match e {
                crate::store::StoreError::Conflict => VaultError::KeyConflict,
                other => VaultError::Store(other),
            })?;
        self.inner.keyring.insert(coll.id.0, purpose, version, key, true);
        tracing::info!(collection, version, "{what} rotated");
        Ok(version)
    }

    /// Moves every live record of `collection` that is not under the primary
    /// version onto it, `batch` records per transaction, while traffic goes
    /// on. Resumable and idempotent: the state is the records themselves.
    /// `progress` is told after each batch.
    pub async fn reencrypt(
        &self,
        who: &Requester,
        collection: &str,
        batch: usize,
        progress: &mut (dyn FnMut(&ReencryptProgress) + Send),
    ) -> Result<ReencryptProgress, VaultError> {
        let coll = self.collection(collection)?;
        self.record(who.record("reencrypt", collection, 0, "STARTED")).await?;
        self.inner.store.mark_retiring(coll.id).await?;
        let mut done = ReencryptProgress::default();
        let mut after = String::new();
        loop {
            let primary = self.primary_version(coll, KeyPurpose::Data)?;
            let page = self
                .inner
                .store
                .records_needing(coll.id, Pending::Reencryption { primary }, after.clone(), batch.max(1))
                .await?;
            let Some((last, _)) = page.last() else { break };
            after.clone_from(last);
            let mut moved = Vec::with_capacity(page.len());
            for (text, ciphertext) in &page {
                let reopened = (|| {
                    let from = envelope::key_version(ciphertext).ok()?;
                    let value = self.open_record(coll, text, ciphertext).ok()?;
                    let sealed = self
                        .inner
                        .keyring
                        .with_primary(coll.id.0, KeyPurpose::Data, |version, key| {
                            envelope::seal(key, version, collection, text, value.expose_secret().as_bytes())
                                .map(|ct| (version, ct))
                        })?
                        .ok()?;
                    Some(Reencrypted {
                        token: text.clone(),
                        from_version: from,
                        to_version: sealed.0,
                        ciphertext: sealed.1,
                    })
                })();
                match reopened {
                    Some(record) => moved.push(record),
                    None => done.unreadable += 1,
                }
            }
            let audit = who.record("reencrypt", collection, moved.len(), "OK");
            done.moved += self.inner.store.replace_ciphertexts(coll.id, moved, audit).await? as u64;
            progress(&done);
        }
        done.remaining = self
            .inner
            .store
            .list_keys(coll.id, DATA_PURPOSE)
            .await?
            .iter()
            .filter(|k| k.state != KeyState::Primary)
            .map(|k| k.records)
            .sum();
        tracing::info!(
            collection,
            moved = done.moved,
            unreadable = done.unreadable,
            remaining = done.remaining,
            "re-encryption finished"
        );
        Ok(done)
    }

    /// Replaces the root key: a new random root sealed under `unlock`
    /// (written beside the old sealed file first), every live wrapped key
    /// re-wrapped under it in one transaction, then the new sealed file
    /// renamed over the old one. No record is re-encrypted. Afterwards the
    /// old passphrase or raw key no longer opens the vault. An interruption
    /// at any point leaves a vault that opens with the old secret (before
    /// the transaction) or the new one (after it); see
    /// [`PENDING_SEALED_SUFFIX`].
    pub async fn rotate_root(&self, who: &Requester, unlock: &Unlock, params: KdfParams) -> Result<usize, VaultError> {
        let _one_at_a_time = self.inner.key_ops.lock().await;
        let pending = pending_sealed_path(&self.inner.sealed_root);
        // A pending file while the vault runs is a rotation whose final
        // rename failed: it may be the only file that opens the store.
        // Never overwrite it; a restart completes or discards it.
        if pending.exists() {
            return Err(VaultError::RotationPending(pending.display().to_string()));
        }
        let (new_root, sealed) = crypto_root::create(unlock, params)?;
        crate::datadir::write_private_file(&pending, &sealed).map_err(|e| VaultError::SealedRoot(e.to_string()))?;
        let stored = self.inner.store.wrapped_keys().await?;
        let mut rewrapped = Vec::new();
        {
            let old_root = self.inner.root.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            for mut key in stored {
                let purpose = KeyPurpose::parse(&key.purpose).ok_or(VaultError::Keyring {
                    collection: key.collection_name.clone(),
                    reason: "a stored key has an unknown purpose",
                })?;
                let clear = keyring::unwrap(&old_root, purpose, &key.collection_name, key.version, &key.wrapped)
                    .map_err(|_| VaultError::Keyring {
                        collection: key.collection_name.clone(),
                        reason: "a wrapped key does not open with the current root key",
                    })?;
                key.wrapped = keyring::wrap(&new_root, purpose, &key.collection_name, key.version, &clear)?;
                rewrapped.push(key);
            }
        }
        let count = rewrapped.len();
        let mut audit = who.record("rotate_root_key", "", count, "OK");
        // The provider that seals the new root key.
        unlock.provider().as_str().clone_into(&mut audit.error_code);
        if let Err(e) = self.inner.store.rewrap_keys(rewrapped, audit).await {
            let _ = std::fs::remove_file(&pending);
            return Err(e.into());
        }
        // Committed: the database now needs the new root, in memory at once
        // (so nothing is ever wrapped under the old one again), and on disk
        // by an atomic rename. If the rename fails, the pending file holds
        // the new root and the next open completes the rotation.
        *self.inner.root.write().unwrap_or_else(std::sync::PoisonError::into_inner) = new_root;
        std::fs::rename(&pending, &self.inner.sealed_root).map_err(|e| VaultError::SealedRoot(e.to_string()))?;
        if let Some(dir) = self.inner.sealed_root.parent() {
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
        tracing::warn!(
            keys = count,
            provider = unlock.provider().as_str(),
            "root key rotated; the previous secret no longer opens this vault"
        );
        Ok(count)
    }

    /// Whether `unlock` opens the sealed root file on disk to the root key
    /// this vault runs with: the proof an online root rotation asks for.
    /// A wrong secret is `Ok(false)`; a token that cannot be used is an
    /// error.
    pub fn opens_current_root(&self, unlock: &Unlock) -> Result<bool, VaultError> {
        let file = std::fs::read(&self.inner.sealed_root).map_err(|e| VaultError::SealedRoot(e.to_string()))?;
        match crypto_root::unseal(&file, unlock) {
            Ok(opened) => {
                let current = self.inner.root.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                Ok(bool::from(subtle::ConstantTimeEq::ct_eq(
                    opened.expose_secret().as_slice(),
                    current.expose_secret().as_slice(),
                )))
            }
            Err(crate::crypto::CryptoError::Hsm(
                e @ (crate::crypto::pkcs11::HsmError::PinIncorrect | crate::crypto::pkcs11::HsmError::PinLocked),
            )) => {
                tracing::warn!(error = %e, "root rotation refused: the current PIN was not accepted");
                Ok(false)
            }
            Err(e @ crate::crypto::CryptoError::Hsm(_)) => Err(e.into()),
            Err(_) => Ok(false),
        }
    }

    /// Keeps `hsm` for root-key rotations into the PKCS#11 token (the first
    /// call wins).
    pub fn attach_hsm(&self, hsm: Arc<crate::crypto::pkcs11::Hsm>) {
        let _ = self.inner.hsm.set(hsm);
    }

    /// The PKCS#11 token attached with [`Vault::attach_hsm`].
    pub fn hsm(&self) -> Option<Arc<crate::crypto::pkcs11::Hsm>> {
        self.inner.hsm.get().cloned()
    }

    /// Puts an unseal by `provider` on the audit trail (action `unseal`,
    /// the provider as its code). Fails closed: a vault that cannot record
    /// its unseal does not serve.
    pub async fn record_unseal(&self, provider: crypto_root::Provider) -> Result<(), VaultError> {
        let mut record = Requester::named("(startup)").record("unseal", "", 0, "OK");
        provider.as_str().clone_into(&mut record.error_code);
        self.record(record).await?;
        tracing::info!(provider = provider.as_str(), "root key unsealed");
        Ok(())
    }

    /// Destroys `version` of `collection`'s data key: refused while any
    /// record is sealed under it, and for the primary.
    pub async fn retire_key_version(&self, who: &Requester, collection: &str, version: u32) -> Result<(), VaultError> {
        let coll = self.collection(collection)?;
        let _one_at_a_time = self.inner.key_ops.lock().await;
        let mut audit = who.record("retire_key_version", collection, 0, "OK");
        audit.error_code = format!("version {version}");
        self.inner.store.retire_key(coll.id, version, audit).await?.map_err(VaultError::RetireRefused)?;
        self.inner.keyring.remove(coll.id.0, KeyPurpose::Data, version);
        tracing::info!(collection, version, "data key version retired and destroyed");
        Ok(())
    }

    /// Reopens a file audit sink (SIGHUP, after log rotation).
    pub fn reopen_audit_sink(&self) {
        if let Some(sink) = &self.inner.sink {
            sink.reopen();
        }
    }

    /// The last committed audit record's number and MAC.
    pub async fn audit_head(&self) -> Result<Head, VaultError> {
        Ok(self.inner.store.audit_head().await?)
    }

    /// The stored MAC of audit record `seq` (hex), if it exists.
    pub async fn audit_mac(&self, seq: u64) -> Result<Option<String>, VaultError> {
        let after = AuditFilter { after_seq: seq.saturating_sub(1), ..AuditFilter::default() };
        let rows = self.inner.store.query_audit(after, 1).await?;
        Ok(rows.into_iter().find(|r| r.seq == seq).map(|r| hex::encode(r.mac)))
    }

    /// Audit records with `seq > after`, in order, at most `limit`, decoded.
    /// A row that does not decode is returned as an error naming it.
    pub async fn audit_records(&self, after: u64, limit: usize) -> Result<Vec<(u64, AuditRecord)>, VaultError> {
        let after = AuditFilter { after_seq: after, ..AuditFilter::default() };
        Ok(self.query_audit(after, limit).await?.into_iter().map(|(seq, record, _)| (seq, record)).collect())
    }

    /// Writes a consistent copy of the whole store, taken while traffic goes
    /// on, to a new private file the store names; returns its path (the
    /// caller streams it out, then removes it). Audited before it starts:
    /// no record, no backup.
    pub async fn backup(&self, who: &Requester) -> Result<std::path::PathBuf, VaultError> {
        if !self.inner.store.capabilities().file_backup {
            return Err(crate::store::StoreError::Unsupported("copy itself into a backup file").into());
        }
        self.record(who.record("backup", "", 0, "STARTED")).await?;
        let (dest, taken) = self.inner.store.backup().await?;
        // What left: its size and how many values it holds (fail closed:
        // no record, no copy).
        let mut done = who.record("backup", "", usize::try_from(taken.records).unwrap_or(usize::MAX), "OK");
        done.error_code = format!("bytes={}", taken.bytes);
        if let Err(e) = self.record(done).await {
            let _ = std::fs::remove_file(&dest);
            return Err(e);
        }
        tracing::info!(pages = taken.pages, bytes = taken.bytes, records = taken.records, "store backup taken");
        Ok(dest)
    }

    /// The form in which `token` is on the audit trail, if this vault ever
    /// issued it (in any collection; every issued token is on the trail):
    /// as written, or, for a shaped token written with separators, its
    /// canonical form (the one stored and audited).
    pub async fn issued_form(&self, token: &str) -> Result<Option<String>, VaultError> {
        if token.is_empty() || token.len() > crate::token::MAX_TOKEN_LEN {
            return Ok(None);
        }
        let canonical = crate::format::alnum_only(token);
        for form in [token.to_owned(), canonical].into_iter().filter(|f| !f.is_empty()) {
            if self.inner.store.token_audited(form.clone()).await? {
                return Ok(Some(form));
            }
        }
        Ok(None)
    }

    /// Key versions per collection, purpose and state, with live records
    /// (for metrics; not audited: it reveals counts, never a value).
    pub async fn key_summary(&self) -> Result<Vec<crate::store::KeySummary>, VaultError> {
        Ok(self.inner.store.key_summary().await?)
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

/// Finds (or creates, with data key version 1) collection `name` in the
/// store, gives a deterministic collection its first index key if it has
/// none, and counts the tokens it has issued.
async fn open_collection(
    store: &dyn Store,
    root: &RootKey,
    name: &CollectionName,
    settings: &crate::config::CollectionConfig,
) -> Result<Collection, VaultError> {
    let id = if let Some(id) = store.collection_id(name.as_str()).await? {
        id
    } else {
        let key = DataKey::generate()?;
        let wrapped = keyring::wrap(root, KeyPurpose::Data, name.as_str(), 1, &key)?;
        let id = store.create_collection(name.as_str(), KeyPurpose::Data.as_str(), wrapped).await?;
        tracing::info!(collection = %name, "created collection with data key version 1");
        id
    };
    let configured = settings.format.token_kind();
    let stored = store.token_kind(id, configured.clone()).await?;
    if stored != configured {
        return Err(VaultError::FormatChanged { collection: name.to_string(), stored, configured });
    }
    let index_keys = store.list_keys(id, INDEX_PURPOSE).await?;
    let canonical_index_from = match store.canonical_index_from(id).await? {
        Some(version) => version,
        None => decide_canonical_index(store, root, name, settings, id, &index_keys).await?,
    };
    let reindex_before_serving = settings.deterministic
        && store
            .list_keys(id, INDEX_PURPOSE)
            .await?
            .iter()
            .any(|k| k.version < canonical_index_from && k.state != KeyState::Retired);
    if settings.deterministic && index_keys.is_empty() {
        let key = DataKey::generate()?;
        let wrapped = keyring::wrap(root, KeyPurpose::Index, name.as_str(), 1, &key)?;
        store.add_first_key(id, INDEX_PURPOSE, wrapped).await?;
        tracing::info!(collection = %name, "created blind-index key version 1");
    }
    let issued = if settings.format.is_canonicalized() { store.issued_by_length(id).await? } else { Vec::new() };
    Ok(Collection {
        id,
        name: name.clone(),
        format: settings.format.clone(),
        deterministic: settings.deterministic,
        normalize: settings.normalize,
        ttl: settings.ttl,
        mask: settings.mask,
        max_value_len: settings.max_value_len,
        rotate_after: settings.rotate_after,
        max_encryptions: settings.max_encryptions,
        canonical_index_from,
        reindex_before_serving,
        occupancy: Occupancy::new(&issued),
    })
}

/// For a collection from before schema version 5: the first index-key
/// version that digests canonical values. A collection that never had an
/// index key starts canonical at version 1. A deterministic collection
/// with a shaped format gets a new primary index key now, audited like a
/// rotation, and its records are re-indexed under the canonical form before
/// the vault serves (again at each start while an older version is in
/// use); a collection whose index is unused now starts canonical at its
/// next version. Formats without separators
/// (random, email) were canonical already.
async fn decide_canonical_index(
    store: &dyn Store,
    root: &RootKey,
    name: &CollectionName,
    settings: &crate::config::CollectionConfig,
    id: CollectionId,
    index_keys: &[KeyInfo],
) -> Result<u32, VaultError> {
    let newest = index_keys.iter().map(|k| k.version).max().unwrap_or(0);
    if newest == 0 || !settings.format.is_canonicalized() {
        return Ok(store.set_canonical_index_from(id, 1).await?);
    }
    let version = newest.checked_add(1).ok_or(VaultError::KeyConflict)?;
    if settings.deterministic {
        let key = DataKey::generate()?;
        let wrapped = keyring::wrap(root, KeyPurpose::Index, name.as_str(), version, &key)?;
        let mut audit = Requester::named("(upgrade)").record("rotate_index_key", name.as_str(), 0, "OK");
        audit.error_code = format!("new primary index key version {version}: canonical values");
        store.add_primary_key(id, INDEX_PURPOSE, version, wrapped, None, audit).await?;
        tracing::info!(collection = %name, version, "index key rotated to index canonical values; the index is rebuilt before serving");
    }
    Ok(store.set_canonical_index_from(id, version).await?)
}

/// Verifies stored audit rows: the chain over the encoded records, and the
/// query columns against the records they repeat. The first bad sequence
/// number wins.
/// Records per page of a verification: what it holds in memory at most
/// (a record lists at most `max_items_per_call` tokens).
const VERIFY_PAGE: usize = 256;

/// Whether the query columns and the token index of `row` say what its
/// (MAC-protected) record says.
fn columns_match(row: &AuditRow) -> bool {
    AuditRecord::decode(&row.record).is_ok_and(|(_, r)| {
        let mut recorded: Vec<&String> = r.tokens.iter().collect();
        recorded.sort();
        recorded.dedup();
        let mut indexed: Vec<&String> = row.indexed_tokens.iter().collect();
        indexed.sort();
        r.at_micros == row.at
            && r.caller == row.caller
            && r.action == row.action
            && r.collection == row.collection
            && r.outcome == row.outcome
            && recorded == indexed
    })
}

/// What tokenizing does to a value before anything is stored: normalizes
/// it, then checks that it is not empty, at most `max_len` bytes, and of
/// `format`. The normalized value, and what is wrong with it if anything.
pub fn prepare_value(
    normalize: &Normalize,
    max_len: usize,
    format: &Format,
    value: PiiValue,
) -> (PiiValue, Option<ItemError>) {
    let value = normalize.apply(value);
    let problem = match value.len() {
        0 => Some(ItemError::EmptyValue),
        _ if value.expose_secret().trim().is_empty() => Some(ItemError::BlankValue),
        n if n > max_len => Some(ItemError::ValueTooLong { max: max_len }),
        _ => format.check_value(value.expose_secret()).err().map(Into::into),
    };
    (value, problem)
}

/// Parses each token for `coll`; returns, per input, the parsed token (or
/// `None` when it is not one `coll`'s format can have issued) and the list
/// of token strings worth looking up, in the same order as the `Some`s.
fn parse_tokens(coll: &Collection, tokens: &[String]) -> (Vec<Option<Token>>, Vec<TokenLookup>) {
    let parsed: Vec<Option<Token>> = tokens.iter().map(|t| coll.format.parse_token(t)).collect();
    let lookups = parsed.iter().flatten().map(|t| coll.lookup(t)).collect();
    (parsed, lookups)
}
