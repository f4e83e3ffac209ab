//! The store: ciphertext, wrapped keys, collection metadata and the audit
//! trail, behind one interface.
//!
//! This is the one narrow interface between the vault and its database;
//! nothing above it sees SQL, a connection, a dialect or a pragma. The
//! interface is a set of traits by concern ([`RecordStore`], [`KeyStore`],
//! [`CollectionStore`], [`AuditStore`]) gathered by [`Store`], with
//! backend-neutral data types and typed errors ([`StoreError`]). Every
//! backend passes the same conformance suite (`tests/store_conformance.rs`).
//!
//! Backends:
//! - [`sqlite`]: the embedded default, one file, one process, one writer
//!   thread with group commit.
//! - [`postgres`]: one database that several stateless nodes share, each
//!   with its own writer connection, group commit and audit chain.
//!
//! Every write method is one transaction that includes its audit record:
//! the change and its record commit together or not at all, and a write is
//! answered only once durable. What a backend cannot promise it reports in
//! [`Capabilities`].
//!
//! The store never sees a value or a key in clear: only tokens, ciphertext
//! and wrapped keys.

mod chain;
mod job;
pub mod postgres;
pub mod sqlite;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use crate::audit::{AuditKey, AuditRecord, AuditSink, Head};
use crate::config::{StoreBackend, StoreSettings};
use crate::crypto::keyring::KeyPurpose;
use crate::token::{CHECK_BYTES, Sealed};

/// Whether [`open`] may create a new store or must find an existing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// `init`: the store must not exist yet.
    Create,
    /// Every other command: the store must exist.
    Existing,
}

/// Opens (or, with [`OpenMode::Create`], creates) the store that `backend`
/// names, tuned by `settings`; committed audit records also go to `sink`.
pub fn open(
    backend: &StoreBackend,
    settings: &StoreSettings,
    mode: OpenMode,
    sink: Option<Arc<AuditSink>>,
) -> Result<Arc<dyn Store>, StoreError> {
    match backend {
        StoreBackend::Sqlite { path } => Ok(Arc::new(sqlite::SqliteStore::open(
            path,
            mode,
            sqlite::Options {
                read_connections: settings.read_connections,
                max_group_commit: settings.max_group_commit,
                audit_index_block: settings.audit_index_block,
                sink,
            },
        )?)),
        StoreBackend::Postgres(pg) => Ok(Arc::new(postgres::PostgresStore::open(
            pg,
            mode,
            postgres::Options {
                read_connections: settings.read_connections,
                max_group_commit: settings.max_group_commit,
                audit_index_block: settings.audit_index_block,
                sink,
            },
        )?)),
    }
}

/// Checks that the file at `path` is a whole backup made by
/// [`Store::backup`]: a store of this vault's kind, undamaged.
pub fn check_backup(path: &Path) -> Result<(), StoreError> {
    sqlite::check_backup(path)
}

/// What a backend can and cannot promise. Callers ask, never match on the
/// backend's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// The backend's name, for operators (`sqlite`).
    pub backend: &'static str,
    /// An erased ciphertext or destroyed key leaves no copy in the backend's
    /// files once the erasing transaction is durable and a short checkpoint
    /// delay has passed (SQLite: `secure_delete` and a truncated WAL).
    pub erases_without_residue: bool,
    /// [`Store::backup`] can copy the whole store, online, into one file.
    pub file_backup: bool,
    /// Other processes (nodes) change the store too: keys rotated through
    /// them must be picked up here.
    pub shared: bool,
}

/// The whole store: every concern, plus what the backend can promise and
/// its online backup.
#[async_trait]
pub trait Store: RecordStore + KeyStore + CollectionStore + AuditStore {
    /// What this backend can and cannot promise.
    fn capabilities(&self) -> Capabilities;

    /// Copies the whole store into a new private file (0600) that the
    /// backend names and the caller removes once it has used it: a
    /// consistent snapshot while writes go on. Without
    /// [`Capabilities::file_backup`], [`StoreError::Unsupported`].
    async fn backup(&self) -> Result<(PathBuf, BackupTaken), StoreError>;

    /// Takes, or keeps, the lease of background job `job` (a purge, a
    /// rotation check, a collection's re-encryption or index rebuild) for
    /// this process: `true` while this process holds it, `false` while
    /// another one does. A lease ends with [`Store::release_lease`] or with
    /// the process (a node that dies, or loses its database session, loses
    /// its leases, and the next node to ask takes them). A store that one
    /// process owns always answers `true`. The jobs are safe to overlap
    /// (each batch is conditional on the rows it changes): the lease makes
    /// one node do the work, it is not what keeps the data right.
    async fn hold_lease(&self, job: &str) -> Result<bool, StoreError>;

    /// Gives up the lease of `job` if this process holds it.
    async fn release_lease(&self, job: &str) -> Result<(), StoreError>;

    /// Adds `used`, this process's use of per-caller quotas since its last
    /// call, and answers the use by every other process (node) in minutes
    /// from `since_minute` on, summed per caller, kind and minute. A store
    /// that one process owns shares nothing and answers nothing.
    async fn share_quota_use(&self, used: Vec<QuotaUse>, since_minute: i64) -> Result<Vec<QuotaUse>, StoreError>;

    /// Woken when another process may have changed the keys (a
    /// notification from the database, or a reconnection after which one
    /// may have been missed); `None` for a store that one process owns.
    fn key_changes(&self) -> Option<Arc<tokio::sync::Notify>>;

    /// The other processes writing to this store now, by audit chain (the
    /// nodes whose chain a live session other than this process's holds).
    /// Empty for a store that one process owns.
    async fn other_writers(&self) -> Result<Vec<String>, StoreError>;
}

/// Values of one per-caller quota used in one minute (unix time / 60), by
/// one node or, as [`Store::share_quota_use`] answers, by all the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaUse {
    /// The caller's name.
    pub caller: String,
    /// What is counted (the limiter's kind number).
    pub kind: i16,
    /// Unix time in minutes.
    pub minute: i64,
    /// Values used.
    pub used: u64,
}

/// Records: tokens and their sealed values, and the background work over them.
#[async_trait]
pub trait RecordStore: Send + Sync {
    /// Inserts records at the sequence numbers they were given
    /// ([`CollectionStore::reserve_sequences`]); a record whose sequence
    /// number or token text already exists in the collection (live or
    /// deleted) is reported as a collision and not written. A record with
    /// a blind index whose value already has a live token answers that token
    /// instead (checked here, in the writer, so two concurrent requests for
    /// one value get one token); an expired one is erased and replaced.
    /// `audit`, with the tokens handed out (as `render` writes them), is
    /// appended in the same transaction.
    async fn insert_records(
        &self,
        collection: CollectionId,
        records: Vec<NewRecord>,
        mut audit: AuditRecord,
        render: RenderToken,
    ) -> Result<Vec<InsertOutcome>, StoreError>;

    /// Looks up live records, answering in the order asked.
    async fn get_records(
        &self,
        collection: CollectionId,
        lookups: Vec<TokenLookup>,
    ) -> Result<Vec<Option<StoredRecord>>, StoreError>;

    /// The record `lookup` names, live, expired or deleted (a token ever
    /// issued), for audit queries.
    async fn locate_record(
        &self,
        collection: CollectionId,
        lookup: TokenLookup,
    ) -> Result<Option<RecordRef>, StoreError>;

    /// Deletes live records: the ciphertext is cleared (and overwritten on
    /// disk by `secure_delete`, then the WAL is truncated), the token row
    /// stays so the token is never issued again, and its blind-index entries
    /// go. Answers, in order, whether each token was live (an expired token
    /// is not). `audit`, with the tokens deleted, is appended in the same
    /// transaction.
    async fn delete_records(
        &self,
        collection: CollectionId,
        lookups: Vec<TokenLookup>,
        mut audit: AuditRecord,
    ) -> Result<Vec<bool>, StoreError>;

    /// Erases up to `limit` records of `collection` that expired by `now`,
    /// like a delete; `audit` (with the tokens purged, as `render` writes
    /// them) is appended in the same transaction if any was. Returns how
    /// many.
    async fn purge_expired(
        &self,
        collection: CollectionId,
        now: i64,
        limit: usize,
        mut audit: AuditRecord,
        render: RenderToken,
    ) -> Result<usize, StoreError>;

    /// Tokens of `collection` that count against its shaped token space,
    /// per length in letters and digits: those issued before tokens located
    /// their records (live, expired or deleted: none is issued again), plus
    /// every number reserved from the sequence of shape n > 0 (used or a
    /// gap), counted at length n.
    async fn issued_by_length(&self, collection: CollectionId) -> Result<Vec<(usize, u64)>, StoreError>;

    /// Live records of `collection` that still need `work`, after sequence
    /// number `after_seq`, in order, at most `limit`.
    async fn records_needing(
        &self,
        collection: CollectionId,
        work: Pending,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, StoreError>;

    /// Replaces ciphertexts with re-encrypted ones, each only if the record
    /// is still live under the version it was read under (a concurrent
    /// delete or re-encryption wins). Returns how many were replaced.
    async fn replace_ciphertexts(
        &self,
        collection: CollectionId,
        records: Vec<Reencrypted>,
        audit: AuditRecord,
    ) -> Result<usize, StoreError>;

    /// Moves each `(record seq, digest)` to index version `version`: its entries
    /// under other versions go, the new one is added (unless another token
    /// of the same value holds it, or the record is gone meanwhile). Returns
    /// how many were indexed.
    async fn index_records(
        &self,
        collection: CollectionId,
        version: u32,
        entries: Vec<(u64, [u8; 32])>,
        audit: AuditRecord,
    ) -> Result<usize, StoreError>;

    /// Number of live records per collection id.
    async fn record_counts(&self) -> Result<Vec<(CollectionId, u64)>, StoreError>;
}

/// Wrapped key versions and their lifecycle.
#[async_trait]
pub trait KeyStore: Send + Sync {
    /// The key versions of `collection` for `purpose`, oldest first.
    async fn list_keys(&self, collection: CollectionId, purpose: KeyPurpose) -> Result<Vec<KeyInfo>, StoreError>;

    /// Makes `version` (wrapped as `wrapped`) the primary data key of
    /// `collection`; the previous primary becomes active (or keeps a
    /// `compromised` mark). One transaction with its audit record. A version
    /// that already exists (a concurrent rotation) is refused.
    async fn add_primary_key(
        &self,
        collection: CollectionId,
        purpose: KeyPurpose,
        version: u32,
        wrapped: Vec<u8>,
        compromised: Option<u32>,
        audit: AuditRecord,
    ) -> Result<(), StoreError>;

    /// Marks every `active` version of `collection` `retiring`: a
    /// re-encryption is emptying them.
    async fn mark_retiring(&self, collection: CollectionId) -> Result<(), StoreError>;

    /// Destroys the wrapped key of `version`: refused (with the number of
    /// records) while any live record is under it, and for the primary.
    /// Returns `Ok(Err(records))` when refused.
    async fn retire_key(
        &self,
        collection: CollectionId,
        version: u32,
        audit: AuditRecord,
    ) -> Result<Result<(), RetireRefused>, StoreError>;

    /// Every live (not retired) key as `(collection id or None for vault
    /// keys, collection name, purpose, version, wrapped)`.
    async fn wrapped_keys(&self) -> Result<Vec<WrappedKey>, StoreError>;

    /// Replaces every given wrapped key in one transaction (root-key
    /// rotation): all of them or none.
    async fn rewrap_keys(&self, keys: Vec<WrappedKey>, audit: AuditRecord) -> Result<(), StoreError>;

    /// Every stored key with its collection.
    async fn load_keys(&self) -> Result<Vec<StoredKey>, StoreError>;

    /// The wrapped vault-level key for `purpose` (version 1), creating it
    /// with `wrapped` if there is none.
    async fn vault_key(&self, purpose: KeyPurpose, wrapped: Vec<u8>) -> Result<Vec<u8>, StoreError>;

    /// Adds version 1 of a `purpose` key to `collection`, as primary, unless
    /// it has a key of that purpose already (like creating a collection,
    /// this is setup, not an audited operation).
    async fn add_first_key(
        &self,
        collection: CollectionId,
        purpose: KeyPurpose,
        wrapped: Vec<u8>,
    ) -> Result<(), StoreError>;

    /// Key versions per collection name, purpose and state, with the live
    /// records of data keys: one small query over `keys` (for metrics).
    async fn key_summary(&self) -> Result<Vec<KeySummary>, StoreError>;

    /// Retires (destroys) every non-primary index-key version of
    /// `collection` that no index entry uses any more; returns them.
    async fn retire_unused_index_keys(
        &self,
        collection: CollectionId,
        audit: AuditRecord,
    ) -> Result<Vec<u32>, StoreError>;
}

/// Collections and what is recorded about each.
#[async_trait]
pub trait CollectionStore: Send + Sync {
    /// The id of collection `name`, if it exists.
    async fn collection_id(&self, name: &str) -> Result<Option<CollectionId>, StoreError>;

    /// Creates collection `name` with its first key (version 1, primary) in
    /// one transaction. If another process created it meanwhile, nothing is
    /// written and its existing id is returned.
    async fn create_collection(
        &self,
        name: &str,
        purpose: KeyPurpose,
        wrapped_v1: Vec<u8>,
    ) -> Result<CollectionId, StoreError>;

    /// The token kind recorded for `collection`, recording `configured` if
    /// there is none yet (a write only then).
    async fn token_kind(&self, collection: CollectionId, configured: String) -> Result<String, StoreError>;

    /// The first index-key version of `collection` whose digests are over
    /// canonical values (`None`: undecided, a store made before schema
    /// version 5).
    async fn canonical_index_from(&self, collection: CollectionId) -> Result<Option<u32>, StoreError>;

    /// Records [`CollectionStore::canonical_index_from`] (once: a decided version is
    /// kept). Returns the version in force.
    async fn set_canonical_index_from(&self, collection: CollectionId, version: u32) -> Result<u32, StoreError>;

    /// Reserves `n` new numbers of `collection`'s sequence for `shape` (0:
    /// the collection's own; durably: none is ever handed out twice) and
    /// returns the first; the block is `first..first + n`, numbered from 1.
    /// Numbers reserved and never used are gaps.
    async fn reserve_sequences(&self, collection: CollectionId, shape: u32, n: u64) -> Result<u64, StoreError>;
}

/// The hash-chained audit trail. Records that go with a data change are
/// written by that change's own method, in its transaction.
#[async_trait]
pub trait AuditStore: Send + Sync {
    /// Appends one audit record on its own (a denial, a failure: a record
    /// that lists no token; one that does is indexed under its records
    /// through [`AuditStore::append_read_audit`], or `audit verify` finds
    /// it unindexed), answering once it is durable.
    async fn append_audit(&self, record: AuditRecord) -> Result<u64, StoreError>;

    /// Appends the record of a read of `collection`'s records at `seqs` (the
    /// record lists their tokens), indexing it under each, answering once
    /// it is durable.
    async fn append_read_audit(
        &self,
        collection: CollectionId,
        seqs: Vec<u64>,
        record: AuditRecord,
    ) -> Result<u64, StoreError>;

    /// Gives the writer the audit key and the current head of the trail.
    /// Until then, every write that must be audited fails.
    async fn install_audit_key(&self, key: AuditKey) -> Result<Head, StoreError>;

    /// The last committed audit record's number and MAC.
    async fn audit_head(&self) -> Result<Head, StoreError>;

    /// Audit rows matching `filter`, oldest first, at most `limit`.
    async fn query_audit(&self, filter: AuditFilter, limit: usize) -> Result<Vec<AuditRow>, StoreError>;

    /// Every audit chain in the store, this store's own first: one per node
    /// that ever wrote to a shared store, and the one chain of a store
    /// that only one process writes.
    async fn audit_chains(&self) -> Result<Vec<String>, StoreError>;

    /// Checks chain `chain`'s part of the searchable token index (built
    /// behind the write path) against the entries it was built from: the
    /// first audit record of the first part that disagrees, if any.
    /// `None`: this store's own chain (a store that one process writes
    /// has no other).
    async fn check_token_index(&self, chain: Option<String>) -> Result<Option<u64>, StoreError>;
}

/// Errors of the store, typed: callers match on the variant, never on a
/// message. Messages name the condition, never data.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// `init` found an existing store.
    #[error("the database file already exists")]
    AlreadyExists,
    /// No store where the configuration points.
    #[error("the database file does not exist (run `piivault init` first)")]
    Missing,
    /// What is there is not a piivault store.
    #[error("the database file is not a piivault store")]
    NotAVault,
    /// Written by a newer piivault.
    #[error("the database was written by a newer piivault (schema newer than version {supported})")]
    TooNew {
        /// The newest schema version this build reads.
        supported: usize,
    },
    /// The disk or filesystem is full.
    #[error("the database disk is full")]
    Full,
    /// The store is read-only.
    #[error("the database is read-only")]
    ReadOnly,
    /// Another process holds a lock too long.
    #[error("the database is locked by another process")]
    Busy,
    /// The backend reports corruption, or a stored row does not decode.
    #[error("the database file is corrupt")]
    Corrupt,
    /// The store could not be opened (permissions, missing directory).
    #[error("the database file cannot be opened: {0}")]
    CannotOpen(String),
    /// A concurrent change conflicts with this one (a key version that
    /// another rotation took, a keyring that changed under a re-wrap):
    /// nothing was written; the caller may retry.
    #[error("a concurrent change conflicts with this one; nothing was written")]
    Conflict,
    /// The backend cannot do this at all (see [`Capabilities`]).
    #[error("this store backend cannot {0}")]
    Unsupported(&'static str),
    /// Another backend failure, with the backend's own message (never
    /// data). For the log; nobody matches on the text.
    #[error("database error: {0}")]
    Backend(String),
    /// The store has stopped.
    #[error("the store is shut down")]
    Closed,
    /// The audit trail cannot be written (no key installed, or the insert
    /// failed): the request fails with it.
    #[error("the audit trail cannot be written")]
    AuditUnavailable,
    /// The database server cannot be reached, or the connection to it was
    /// lost (the outcome of a write in flight is then unknown to the
    /// caller, who may retry).
    #[error("the database server cannot be reached")]
    Unreachable,
    /// Another running node writes the audit chain this node is named for.
    #[error("another running node writes this node's audit chain; give every node its own [store] node")]
    ChainHeld,
}

impl StoreError {
    /// Whether the condition is in the storage environment (disk, locks,
    /// shutdown) rather than in the request or the store's identity: the
    /// service is unavailable.
    pub fn is_unavailable(&self) -> bool {
        !matches!(
            self,
            Self::AlreadyExists
                | Self::Missing
                | Self::NotAVault
                | Self::TooNew { .. }
                | Self::Conflict
                | Self::Unsupported(_)
        )
    }
}

/// A collection's row id in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CollectionId(pub i64);

/// The lifecycle state of a stored key version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Encrypts new records; decrypts.
    Primary,
    /// Decrypts only.
    Active,
    /// Decrypts only; re-encryption is moving its records away.
    Retiring,
    /// Suspected leaked: never encrypts again; its records are being moved.
    Compromised,
    /// Destroyed; kept as a row so the version is never reused.
    Retired,
}

impl KeyState {
    /// The name stored in the database and shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Active => "active",
            Self::Retiring => "retiring",
            Self::Compromised => "compromised",
            Self::Retired => "retired",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "primary" => Some(Self::Primary),
            "active" => Some(Self::Active),
            "retiring" => Some(Self::Retiring),
            "compromised" => Some(Self::Compromised),
            "retired" => Some(Self::Retired),
            _ => None,
        }
    }
}

/// A wrapped key as stored. No `Debug`: even wrapped key material stays out
/// of log lines.
pub struct StoredKey {
    /// Owning collection.
    pub collection: CollectionId,
    /// The collection's name (bound into the wrap AAD).
    pub collection_name: String,
    /// What the key is for.
    pub purpose: KeyPurpose,
    /// Version, from 1.
    pub version: u32,
    /// Lifecycle state.
    pub state: KeyState,
    /// The key, wrapped by the root key.
    pub wrapped: Vec<u8>,
}

/// One key version as operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// Data (encrypts records) or index (blind index).
    pub purpose: KeyPurpose,
    /// Version, from 1.
    pub version: u32,
    /// Lifecycle state.
    pub state: KeyState,
    /// Creation time, unix microseconds.
    pub created_at: i64,
    /// Data keys: live records sealed under this version. Index keys:
    /// index entries under it.
    pub records: u64,
    /// Records ever sealed under this version (never goes backwards; 0 for
    /// index keys).
    pub encryptions: u64,
}

/// Key versions of one collection, purpose and state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySummary {
    /// The collection's name.
    pub collection: String,
    /// Data or index.
    pub purpose: KeyPurpose,
    /// The state.
    pub state: KeyState,
    /// Versions in this state.
    pub versions: u64,
    /// Live records sealed under them (data keys; 0 for index keys).
    pub live: u64,
}

/// A record whose ciphertext re-encryption replaces.
pub struct Reencrypted {
    /// The record's sequence number.
    pub seq: u64,
    /// The version the record was under when it was read.
    pub from_version: u32,
    /// The new version.
    pub to_version: u32,
    /// The new ciphertext.
    pub ciphertext: Vec<u8>,
}

/// How a presented token is looked for: a default token first by what it
/// opens to under the collection's token key (a sequence number, and the
/// random half compared in constant time); a shaped token first at the
/// places its FF1 decryption names (the stored token compared whole, in
/// constant time, with its canonical form); then by its text, as written
/// and in canonical form (its letters and digits), which is how tokens
/// issued before this scheme are found, and through the canonical forms of
/// tokens issued before canonical storage (`legacy_tokens`). The first
/// live record found wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLookup {
    /// What a default token opens to.
    pub sealed: Option<Sealed>,
    /// The record places a shaped token decrypts to (at most two: a phone
    /// token presented without its `+` may be either).
    pub placed: Vec<u64>,
    /// The token as the caller wrote it.
    pub exact: String,
    /// Its canonical form, for shaped formats.
    pub canonical: Option<String>,
}

impl TokenLookup {
    /// The stored tokens this lookup may name, in the order they are tried
    /// (the legacy mapping is tried after these).
    fn candidates(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.exact.as_str()).chain(self.canonical.as_deref().filter(|c| *c != self.exact))
    }

    /// The text a shaped record found at one of [`TokenLookup::placed`]
    /// must hold: the canonical form.
    pub fn shaped_text(&self) -> &str {
        self.canonical.as_deref().unwrap_or(&self.exact)
    }
}

/// How a record's token is kept with it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TokenForm {
    /// A sealed default token: its random half (its sequence number is the
    /// record's own). The token is rebuilt under the token key.
    Sealed([u8; CHECK_BYTES]),
    /// A shaped token placed by FF1: its canonical text, kept with the
    /// record (which its decryption locates) and compared whole.
    Shaped(String),
    /// A token issued before tokens located their records (default or
    /// shaped), found by its text.
    Text(String),
}

impl TokenForm {
    /// The token text a record's ciphertext is bound to and its audit
    /// records list: the text kept, or, for a sealed token (which has one
    /// writing), the token as `presented`.
    pub fn into_text(self, presented: &str) -> String {
        match self {
            Self::Text(text) | Self::Shaped(text) => text,
            Self::Sealed(_) => presented.to_owned(),
        }
    }
}

/// Where a record is, and how its token is kept.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordRef {
    /// The record's sequence number in its collection: its place in the
    /// store, in the order records were added.
    pub seq: u64,
    /// Its token.
    pub token: TokenForm,
}

/// Writes a record's token (the vault's, under the collection's token key),
/// for the audit records a store method writes itself.
pub type RenderToken = Box<dyn Fn(&RecordRef) -> String + Send>;

/// A record to insert.
pub struct NewRecord {
    /// Where it goes and its token.
    pub at: RecordRef,
    /// Data-key version used.
    pub key_version: u32,
    /// The sealed value.
    pub ciphertext: Vec<u8>,
    /// When it stops answering (unix microseconds), if it expires.
    pub expires_at: Option<i64>,
    /// Deterministic collections: the value's blind index.
    pub index: Option<IndexEntry>,
}

/// A value's blind index: its digest under the primary index key, and its
/// digests under every live index version to look for first.
#[derive(Clone)]
pub struct IndexEntry {
    /// The primary index-key version.
    pub version: u32,
    /// The digest under it.
    pub digest: [u8; 32],
    /// `(version, digest)` under every live index version, primary first.
    pub lookups: Vec<(u32, [u8; 32])>,
}

/// Background work a record may still need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// Its ciphertext is not under the primary data-key version.
    Reencryption {
        /// The primary data-key version.
        primary: u32,
    },
    /// It has no blind-index entry under this index-key version.
    Indexing {
        /// The primary index-key version.
        version: u32,
    },
}

/// What happened to one inserted record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    /// Stored.
    Inserted,
    /// The place or the token text is taken (live or deleted) in the
    /// collection; nothing was written. The caller takes the next number.
    Collision,
    /// Deterministic collections: the value already has this live record;
    /// nothing was written.
    Existing(RecordRef),
}

/// Which audit records a query wants. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Records involving one record's token.
    pub record: RecordMatch,
    /// Records of this caller.
    pub caller: Option<String>,
    /// Records of this action.
    pub action: Option<String>,
    /// Records on this collection.
    pub collection: Option<String>,
    /// Records with this outcome (`OK`, `PERMISSION_DENIED`, ...).
    pub outcome: Option<String>,
    /// Records at or after this time (unix microseconds).
    pub since: Option<i64>,
    /// Records before this time (unix microseconds).
    pub until: Option<i64>,
    /// Only records with a sequence number above this.
    pub after_seq: u64,
    /// The chain to read ([`AuditStore::audit_chains`]); `None`: this
    /// store's own (the node's, on a store that several nodes share).
    pub chain: Option<String>,
}

/// Which records' tokens an audit query is about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RecordMatch {
    /// Any (no filter).
    #[default]
    Any,
    /// The token of this record (as [`RecordStore::locate_record`] finds it).
    Of(CollectionId, u64),
    /// A token the vault never issued: no audit record involves it.
    Unissued,
}

/// What a backup copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupTaken {
    /// Database pages.
    pub pages: u64,
    /// The copy's size in bytes.
    pub bytes: u64,
    /// Live records (with a value) in the copy.
    pub records: u64,
}

/// An audit row as stored: the chained encoding and the query columns.
#[derive(Debug, Clone)]
pub struct AuditRow {
    /// Sequence number.
    pub seq: u64,
    /// Canonical encoding.
    pub record: Vec<u8>,
    /// Chain MAC.
    pub mac: Vec<u8>,
    /// Column: time.
    pub at: i64,
    /// Column: caller.
    pub caller: String,
    /// Column: action.
    pub action: String,
    /// Column: collection.
    pub collection: String,
    /// Column: outcome.
    pub outcome: String,
    /// The records the token index lists for this record, with their
    /// collection's id.
    pub indexed: Vec<(CollectionId, RecordRef)>,
}

/// A wrapped key, for re-wrapping under a new root key. No `Debug`.
pub struct WrappedKey {
    /// The collection, or `None` for a vault-level key (the audit key).
    pub collection: Option<CollectionId>,
    /// The collection's name (empty for vault keys), bound into the AAD.
    pub collection_name: String,
    /// What it is for.
    pub purpose: KeyPurpose,
    /// Its version.
    pub version: u32,
    /// The wrapped bytes.
    pub wrapped: Vec<u8>,
}

/// Why a key version cannot be retired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RetireRefused {
    /// Records are still sealed under it.
    #[error("{0} records are still sealed under this version; run reencrypt first")]
    InUse(u64),
    /// It is the primary.
    #[error("the primary version cannot be retired; rotate first")]
    Primary,
    /// It was retired before.
    #[error("this version is already retired")]
    AlreadyRetired,
    /// There is no such version.
    #[error("no such key version")]
    NoSuchVersion,
}

/// A live record as read back.
pub struct StoredRecord {
    /// Where it is, and its token (the one its ciphertext is bound to).
    pub at: RecordRef,
    /// The sealed value.
    pub ciphertext: Vec<u8>,
}

/// A record row as a backend reads it, live or not.
#[derive(Clone)]
pub(crate) struct RecordRow {
    pub(crate) at: RecordRef,
    pub(crate) ciphertext: Option<Vec<u8>>,
    pub(crate) key_version: Option<u32>,
    pub(crate) expires_at: Option<i64>,
}

impl RecordRow {
    /// Whether it holds a value that has not expired by `now` (any time if
    /// `None`).
    pub(crate) fn is_live(&self, now: Option<i64>) -> bool {
        self.ciphertext.is_some() && now.is_none_or(|now| self.expires_at.is_none_or(|at| at > now))
    }
}

impl TokenForm {
    /// The token form of a row's `token_check`, `token` and `shaped`
    /// columns, of which exactly one is set (`None`: the row is damaged).
    pub(crate) fn from_columns(check: Option<Vec<u8>>, text: Option<String>, shaped: Option<String>) -> Option<Self> {
        match (check, text, shaped) {
            (Some(check), None, None) => check.try_into().ok().map(Self::Sealed),
            (None, Some(text), None) => Some(Self::Text(text)),
            (None, None, Some(text)) => Some(Self::Shaped(text)),
            _ => None,
        }
    }

    /// The `token_check`, `token` and `shaped` columns of this form
    /// ([`TokenForm::from_columns`] read back), exactly one set.
    pub(crate) fn columns(&self) -> (Option<&[u8]>, Option<&str>, Option<&str>) {
        match self {
            Self::Sealed(check) => (Some(check.as_slice()), None, None),
            Self::Text(text) => (None, Some(text.as_str()), None),
            Self::Shaped(text) => (None, None, Some(text.as_str())),
        }
    }
}

/// Where a backend reads record rows from, for [`first_row`]: point reads
/// in one collection.
pub(crate) trait RowSource {
    /// The row at `seq`, if any.
    fn row_at(&mut self, seq: u64) -> Result<Option<RecordRow>, StoreError>;
    /// The row of the token stored as `text` (issued before tokens located
    /// their records).
    fn row_of_text(&mut self, text: &str) -> Result<Option<RecordRow>, StoreError>;
    /// The token issued before canonical storage that `canonical` stands
    /// for, if there is exactly one.
    fn legacy_token(&mut self, canonical: &str) -> Result<Option<String>, StoreError>;
}

/// The first row `lookup` names that `wanted` accepts, tried in the order
/// [`TokenLookup`] gives: the record a sealed token opens to (if its random
/// half matches, compared in constant time), the records a shaped token
/// decrypts to (if the token they keep is the presented one, compared in
/// constant time), the token's text as written and in canonical form, then
/// the token issued before canonical storage that its canonical form
/// stands for. The same in every backend.
pub(crate) fn first_row(
    rows: &mut impl RowSource,
    lookup: &TokenLookup,
    wanted: impl Fn(&RecordRow) -> bool,
) -> Result<Option<RecordRow>, StoreError> {
    use subtle::ConstantTimeEq as _;
    if let Some(sealed) = lookup.sealed
        && let Some(row) = rows.row_at(sealed.seq)?
        && matches!(&row.at.token, TokenForm::Sealed(check) if bool::from(check.ct_eq(&sealed.check)))
        && wanted(&row)
    {
        return Ok(Some(row));
    }
    let presented = lookup.shaped_text().as_bytes();
    for &seq in &lookup.placed {
        if let Some(row) = rows.row_at(seq)?
            && matches!(&row.at.token, TokenForm::Shaped(text) if bool::from(text.as_bytes().ct_eq(presented)))
            && wanted(&row)
        {
            return Ok(Some(row));
        }
    }
    for text in lookup.candidates() {
        if let Some(row) = rows.row_of_text(text)?
            && wanted(&row)
        {
            return Ok(Some(row));
        }
    }
    if let Some(canonical) = &lookup.canonical
        && let Some(token) = rows.legacy_token(canonical)?
        && let Some(row) = rows.row_of_text(&token)?
        && wanted(&row)
    {
        return Ok(Some(row));
    }
    Ok(None)
}

/// Now, in microseconds since the Unix epoch.
pub(crate) fn now_micros() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}
