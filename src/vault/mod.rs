//! The vault core: validate, tokenize and encrypt, store.
//!
//! By concern: [`data`] (the data path), [`keys`] (key management and the
//! root key), [`trail`] (the audit trail), [`upkeep`] (background work, backup).
//!
//! Transport-free: no tonic, no SQL. Every call answers item by item, in the
//! order asked, so one bad item never fails the rest. Values exist in clear
//! only inside [`PiiValue`]s and the zeroizing buffers of the crypto module;
//! nothing here logs or formats one.

mod data;
mod keys;
mod trail;
pub mod unseal;
mod upkeep;
pub use upkeep::KEY_REFRESH_INTERVAL;

use std::collections::HashMap;
use std::sync::Arc;

use crate::audit::{AuditKey, AuditRecord, AuditSink, Event, Outcome};
use crate::config::{CollectionName, Config, Limits, SinkSetting};
use crate::crypto::keyring::{self, DataKey, KeyPurpose, Keyring};
use crate::crypto::root::RootKey;
use crate::error::{ItemError, VaultError};
use crate::format::{Format, Mask, Normalize};
use crate::store::{CollectionId, KeyInfo, KeyState, OpenMode, RecordRef, RenderToken, Store, TokenForm, TokenLookup};
use crate::token::{RandomTokens, Sealed, Token, TokenGenerator, TokenKey};
use crate::value::PiiValue;

/// How many numbers are tried for one value before giving up. Tokens are
/// unique by construction; a shaped token may still be its own value, or
/// a token issued before tokens located their records: then the value
/// takes the next number.
const MAX_TOKEN_ATTEMPTS: usize = 8;

/// Sequence numbers reserved at once (one durable write per block; the
/// rest of a block is a gap after a restart).
const SEQ_BLOCK: u64 = 16_384;

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
    pub fn record(&self, event: Event, collection: &str, items: usize, outcome: Outcome) -> AuditRecord {
        AuditRecord {
            at_micros: crate::store::now_micros(),
            caller: self.caller.clone(),
            action: event.as_str().to_owned(),
            collection: collection.to_owned(),
            items: u32::try_from(items).unwrap_or(u32::MAX),
            tokens: Vec::new(),
            outcome: outcome.as_str().to_owned(),
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
    /// The collection's token key, once loaded (it is never rotated).
    token_key: Option<Arc<TokenKey>>,
    /// Sequence numbers reserved in the store and not yet used, per shape.
    seqs: tokio::sync::Mutex<HashMap<u32, std::ops::Range<u64>>>,
}

/// Tokens a shaped collection has issued, per value length (letters and
/// digits), counted against that length's token space (a random or email
/// token space cannot fill up): the numbers its shape's sequence has used
/// (reserved, at start), and any token issued before tokens located their
/// records.
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
            reason: match purpose {
                KeyPurpose::Index => "it has no primary index key",
                KeyPurpose::Token => "it has no token key",
                KeyPurpose::Data | KeyPurpose::Audit => "it has no primary data key",
            },
        }
    }

    /// `Err` when the collection has issued a tenth of the token space of
    /// the length of any of `values` (letters and digits); warns once per
    /// length past a hundredth, naming `caller` (whose request crossed it),
    /// long before values are refused.
    fn check_space<'v>(&self, caller: &str, values: impl Iterator<Item = &'v PiiValue>) -> Result<(), VaultError> {
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
                tracing::error!(alert = true, collection = %self.name, caller, length, issued, space, "token space a tenth full: new values of this length refused");
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
                    caller,
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
        let (sealed, placed) = match &self.token_key {
            Some(key) if self.format.preserves_shape() => {
                let shape = self.format.shape_of(exact);
                let placed = self.format.shaped_numbers(key, exact);
                (None, placed.into_iter().map(|n| crate::format::record_seq(shape, n)).collect())
            }
            Some(key) => (key.open(token), Vec::new()),
            None => (None, Vec::new()),
        };
        TokenLookup { sealed, placed, exact: exact.to_owned(), canonical }
    }

    /// The token text of the record at `at` (the one its ciphertext is bound
    /// to): kept with it, or sealed again under the token key.
    fn token_text(&self, at: &RecordRef) -> String {
        render_token(self.token_key.as_deref(), &self.format, at)
    }

    /// [`Collection::token_text`] for the store's own audit records.
    fn renderer(&self) -> RenderToken {
        let key = self.token_key.clone();
        let format = self.format.clone();
        Box::new(move |at| render_token(key.as_deref(), &format, at))
    }

    /// Record places for new records, one per shape in `shapes`, in order:
    /// from the numbers reserved per shape (a new block is reserved in the
    /// store when one runs out). A shaped number counts against its
    /// length's space once taken, used or not.
    async fn take_places(&self, store: &dyn Store, shapes: &[u32]) -> Result<Vec<u64>, VaultError> {
        let mut blocks = self.seqs.lock().await;
        let mut wanted: std::collections::BTreeMap<u32, u64> = std::collections::BTreeMap::new();
        for &shape in shapes {
            *wanted.entry(shape).or_default() += 1;
        }
        for (&shape, &n) in &wanted {
            let block = blocks.entry(shape).or_insert(0..0);
            if block.end - block.start < n {
                let size = n.max(self.seq_block(shape));
                let first = store.reserve_sequences(self.id, shape, size).await?;
                let end = first.saturating_add(size);
                if shape > 0 && end > crate::format::MAX_SHAPE_NUMBER + 1 {
                    let space = self.format.token_space_at(usize::try_from(shape).unwrap_or(usize::MAX));
                    return Err(VaultError::TokenSpaceFull { issued: first.saturating_sub(1), space });
                }
                *block = first..end;
            }
        }
        Ok(shapes
            .iter()
            .map(|&shape| {
                let block = blocks.entry(shape).or_insert(0..0);
                let n = block.start;
                block.start += 1;
                if shape > 0 {
                    self.occupancy.add(usize::try_from(shape).unwrap_or(usize::MAX), 1);
                }
                crate::format::record_seq(shape, n)
            })
            .collect())
    }

    /// How many numbers of `shape` to reserve at once: [`SEQ_BLOCK`], or for
    /// a shape whose space is small, a ten-thousandth of it (at least 16),
    /// so that the numbers a restart leaves unused barely count.
    fn seq_block(&self, shape: u32) -> u64 {
        if shape == 0 {
            return SEQ_BLOCK;
        }
        let space = self.format.token_space_at(usize::try_from(shape).unwrap_or(usize::MAX));
        u64::try_from(space / 10_000).unwrap_or(u64::MAX).clamp(16, SEQ_BLOCK)
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

/// The token of the record at `at`: its text, or its sealed token under
/// `key` (a collection of the default format).
fn render_token(key: Option<&TokenKey>, format: &Format, at: &RecordRef) -> String {
    match (&at.token, key, format) {
        (TokenForm::Text(text) | TokenForm::Shaped(text), ..) => text.clone(),
        (TokenForm::Sealed(check), Some(key), Format::Random { prefix }) => {
            key.seal(prefix, Sealed { seq: at.seq, check: *check }).into_string()
        }
        // A sealed record in a shaped collection, or no token key: the
        // store and the configuration disagree (a format change is refused
        // at start, so this is damage). Nothing matches this text.
        (TokenForm::Sealed(_), ..) => String::new(),
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
    /// The background jobs running on this node, by lease name.
    jobs: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Whether `stored` belongs in the keyring: not retired, and of a
/// configured collection. A collection in the store but no longer
/// configured is not served; its token key still is loaded, so that `audit
/// verify` can match the tokens its audit records list.
fn is_loaded(collections: &HashMap<String, Collection>, stored: &crate::store::StoredKey) -> bool {
    let configured = collections.values().any(|c| c.id == stored.collection);
    (configured || stored.purpose == KeyPurpose::Token) && stored.state != KeyState::Retired
}

/// Unwraps `stored` with `root` into `keyring` (as its primary if it is).
fn load_key(keyring: &Keyring, root: &RootKey, stored: &crate::store::StoredKey) -> Result<(), VaultError> {
    let key = keyring::unwrap(root, stored.purpose, &stored.collection_name, stored.version, &stored.wrapped).map_err(
        |_| VaultError::Keyring {
            collection: stored.collection_name.clone(),
            reason: "a wrapped key does not open with this root key",
        },
    )?;
    keyring.insert(stored.collection.0, stored.purpose, stored.version, key, stored.state == KeyState::Primary);
    Ok(())
}

/// A store error of a write that depends on the keyring: a conflict is a
/// key change that another operation (or node) made meanwhile.
fn key_change(error: crate::store::StoreError) -> VaultError {
    match error {
        crate::store::StoreError::Conflict => VaultError::KeyConflict,
        other => VaultError::Store(other),
    }
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
        let stored = store.vault_key(KeyPurpose::Audit, wrapped).await?;
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
            if is_loaded(&collections, &stored) {
                load_key(&keyring, root, &stored)?;
            }
        }

        for collection in collections.values_mut() {
            if keyring.with_primary(collection.id.0, KeyPurpose::Data, |_, _| ()).is_none() {
                return Err(collection.no_primary(KeyPurpose::Data));
            }
            collection.token_key = keyring
                .with_primary(collection.id.0, KeyPurpose::Token, |_, key| TokenKey::new(key.expose_secret()))
                .transpose()?
                .map(Arc::new);
            if collection.token_key.is_none() {
                return Err(collection.no_primary(KeyPurpose::Token));
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
                jobs: std::sync::Mutex::default(),
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

    /// Whether `name` is a configured deterministic collection (one value,
    /// one token).
    pub fn is_deterministic(&self, name: &str) -> bool {
        self.inner.collections.get(name).is_some_and(|c| c.deterministic)
    }

    /// Names of the collections this vault serves, sorted.
    pub fn collection_names(&self) -> Vec<String> {
        let mut names: Vec<_> = self.inner.collections.keys().cloned().collect();
        names.sort();
        names
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
        let id = store.create_collection(name.as_str(), KeyPurpose::Data, wrapped).await?;
        tracing::info!(collection = %name, "created collection with data key version 1");
        id
    };
    let configured = settings.format.token_kind();
    let stored = store.token_kind(id, configured.clone()).await?;
    if stored != configured {
        return Err(VaultError::FormatChanged { collection: name.to_string(), stored, configured });
    }
    let index_keys = store.list_keys(id, KeyPurpose::Index).await?;
    let canonical_index_from = match store.canonical_index_from(id).await? {
        Some(version) => version,
        None => decide_canonical_index(store, root, name, settings, id, &index_keys).await?,
    };
    let reindex_before_serving = settings.deterministic
        && store
            .list_keys(id, KeyPurpose::Index)
            .await?
            .iter()
            .any(|k| k.version < canonical_index_from && k.state != KeyState::Retired);
    if settings.deterministic && index_keys.is_empty() {
        let key = DataKey::generate()?;
        let wrapped = keyring::wrap(root, KeyPurpose::Index, name.as_str(), 1, &key)?;
        store.add_first_key(id, KeyPurpose::Index, wrapped).await?;
        tracing::info!(collection = %name, "created blind-index key version 1");
    }
    if store.list_keys(id, KeyPurpose::Token).await?.is_empty() {
        let key = DataKey::generate()?;
        let wrapped = keyring::wrap(root, KeyPurpose::Token, name.as_str(), 1, &key)?;
        store.add_first_key(id, KeyPurpose::Token, wrapped).await?;
        tracing::info!(collection = %name, "created token key");
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
        token_key: None,
        seqs: tokio::sync::Mutex::new(HashMap::new()),
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
        let mut audit = Requester::named("(upgrade)").record(Event::RotateIndexKey, name.as_str(), 0, Outcome::Ok);
        audit.error_code = format!("new primary index key version {version}: canonical values");
        store.add_primary_key(id, KeyPurpose::Index, version, wrapped, None, audit).await?;
        tracing::info!(collection = %name, version, "index key rotated to index canonical values; the index is rebuilt before serving");
    }
    Ok(store.set_canonical_index_from(id, version).await?)
}

pub use data::{Tokenized, prepare_value};
