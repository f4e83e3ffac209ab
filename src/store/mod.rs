//! The store: ciphertext, wrapped keys and collection metadata on disk.
//!
//! This is the one narrow interface between the vault and its database;
//! nothing above it sees SQL, connections or pragmas. The embedded backend is
//! SQLite in WAL mode with `synchronous=FULL`:
//!
//! - **one writer** thread owns the write connection. Requests queue up on a
//!   channel; the writer takes everything waiting (up to
//!   `max_group_commit`), runs each request inside its own savepoint of one
//!   transaction, commits once, and only then answers them all. One fsync
//!   covers many requests, and a request is acknowledged only once durable.
//!   A request that fails rolls back to its savepoint and fails alone.
//! - **readers**: a small pool of threads, each with a read-only connection,
//!   serve lookups concurrently with the writer (WAL snapshots).
//!
//! The store never sees a value or a key in clear: only tokens, ciphertext
//! and wrapped keys.

mod schema;

use std::path::Path;
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use std::sync::Arc;

use crate::audit::{AuditKey, AuditRecord, AuditSink, Head, MAC_LEN};
use crossbeam_channel::{Receiver, Sender};
use rusqlite::{Connection, ErrorCode, OptionalExtension as _, params};
use tokio::sync::oneshot;

pub use schema::{APPLICATION_ID, OpenMode, create_private_file, schema_version};

/// Checks that the file at `path` is a whole piivault store: its
/// application id, and SQLite's `integrity_check`.
pub fn check_backup(path: &Path) -> Result<(), StoreError> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let id: i64 = conn.query_row("PRAGMA application_id", [], |row| row.get(0))?;
    if id != APPLICATION_ID {
        return Err(StoreError::NotAVault);
    }
    let check: String = conn.query_row("PRAGMA integrity_check", [], |row| row.get(0))?;
    if check == "ok" { Ok(()) } else { Err(StoreError::Corrupt) }
}

/// Errors of the store. Messages name the condition, never data.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// `init` found an existing database.
    #[error("the database file already exists")]
    AlreadyExists,
    /// No database at the configured path.
    #[error("the database file does not exist (run `piivault init` first)")]
    Missing,
    /// The file is not SQLite, or an SQLite database of something else.
    #[error("the database file is not a piivault store")]
    NotAVault,
    /// Written by a newer piivault.
    #[error("the database was written by a newer piivault (schema newer than version {})", schema_version())]
    TooNew,
    /// The disk or filesystem is full.
    #[error("the database disk is full")]
    Full,
    /// The database or its directory is read-only.
    #[error("the database is read-only")]
    ReadOnly,
    /// Another process holds the lock too long.
    #[error("the database is locked by another process")]
    Busy,
    /// SQLite reports corruption.
    #[error("the database file is corrupt")]
    Corrupt,
    /// The database could not be opened (permissions, missing directory).
    #[error("the database file cannot be opened: {0}")]
    CannotOpen(String),
    /// Another SQLite failure, with SQLite's own message (never data).
    #[error("database error: {0}")]
    Sqlite(String),
    /// The store's threads have stopped.
    #[error("the store is shut down")]
    Closed,
    /// The audit trail cannot be written (no key installed, or the insert
    /// failed): the request fails with it.
    #[error("the audit trail cannot be written")]
    AuditUnavailable,
}

impl StoreError {
    fn from_io(error: &std::io::Error) -> Self {
        match error.kind() {
            std::io::ErrorKind::PermissionDenied => Self::CannotOpen("permission denied".into()),
            std::io::ErrorKind::ReadOnlyFilesystem => Self::ReadOnly,
            std::io::ErrorKind::StorageFull => Self::Full,
            _ => Self::CannotOpen(error.to_string()),
        }
    }

    /// Whether the condition is in the storage environment (disk, locks,
    /// shutdown) rather than in the request: the service is unavailable.
    pub fn is_unavailable(&self) -> bool {
        !matches!(self, Self::AlreadyExists | Self::Missing | Self::NotAVault | Self::TooNew)
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        match error.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => Self::Full,
            Some(ErrorCode::ReadOnly) => Self::ReadOnly,
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Self::Busy,
            Some(ErrorCode::DatabaseCorrupt) => Self::Corrupt,
            Some(ErrorCode::NotADatabase) => Self::NotAVault,
            Some(ErrorCode::CannotOpen | ErrorCode::PermissionDenied) => Self::CannotOpen(error.to_string()),
            _ => Self::Sqlite(error.to_string()),
        }
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
    /// What the key is for (`data`, ...).
    pub purpose: String,
    /// Version, from 1.
    pub version: u32,
    /// Lifecycle state.
    pub state: KeyState,
    /// The key, wrapped by the root key.
    pub wrapped: Vec<u8>,
}

/// The purpose of keys that encrypt records.
pub const DATA_PURPOSE: &str = "data";
/// The purpose of keys that compute a deterministic collection's blind index.
pub const INDEX_PURPOSE: &str = "index";

/// One key version as operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// `data` (encrypts records) or `index` (blind index).
    pub purpose: String,
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
    /// `data` or `index`.
    pub purpose: String,
    /// The state (`primary`, `active`, `retiring`, `compromised`, `retired`).
    pub state: String,
    /// Versions in this state.
    pub versions: u64,
    /// Live records sealed under them (data keys; 0 for index keys).
    pub live: u64,
}

/// A record whose ciphertext re-encryption replaces.
pub struct Reencrypted {
    /// The token.
    pub token: String,
    /// The version the record was under when it was read.
    pub from_version: u32,
    /// The new version.
    pub to_version: u32,
    /// The new ciphertext.
    pub ciphertext: Vec<u8>,
}

/// How a presented token is looked for: as written, and, for a shaped
/// token, under its canonical form (its letters and digits), which is how
/// shaped tokens are stored, and through the canonical forms of tokens
/// issued before that (`legacy_tokens`). The first live record found wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLookup {
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
}

/// A record to insert.
pub struct NewRecord {
    /// The token (primary key within the collection).
    pub token: String,
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
    /// The token already exists (live or deleted) in the collection; nothing
    /// was written. The caller draws a new token.
    Collision,
    /// Deterministic collections: the value already has this live token;
    /// nothing was written.
    Existing(String),
}

/// Which audit records a query wants. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Records involving this token.
    pub token: Option<String>,
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
    /// The tokens the index (`audit_tokens`) lists for this record.
    pub indexed_tokens: Vec<String>,
}

/// A wrapped key, for re-wrapping under a new root key. No `Debug`.
pub struct WrappedKey {
    /// The collection, or `None` for a vault-level key (the audit key).
    pub collection: Option<CollectionId>,
    /// The collection's name (empty for vault keys), bound into the AAD.
    pub collection_name: String,
    /// What it is for.
    pub purpose: String,
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
    /// The token as stored (the one its ciphertext is bound to).
    pub token: String,
    /// The sealed value.
    pub ciphertext: Vec<u8>,
}

type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

/// The audit chain as the writer sees it: the key, the head as committed,
/// and the head including records written in the open transaction.
struct AuditCursor {
    key: Option<AuditKey>,
    committed: Head,
    tentative: Head,
    /// Records written in the open transaction, for the sink after commit.
    pending: Vec<(u64, AuditRecord, [u8; MAC_LEN])>,
    sink: Option<Arc<AuditSink>>,
}

/// What a write job works with: the connection, inside the group-commit
/// transaction, and the audit chain.
pub(crate) struct WriteTx<'a> {
    conn: &'a Connection,
    audit: &'a mut AuditCursor,
    /// Set by jobs that erase ciphertext: the WAL is checkpointed and
    /// truncated soon after, so no old page image keeps it.
    erased: &'a mut bool,
}

impl WriteTx<'_> {
    /// Appends `record` to the audit trail in this transaction: it commits
    /// with the data change or not at all. Without an audit key, fails.
    fn append_audit(&mut self, record: &AuditRecord) -> Result<u64, StoreError> {
        let key = self.audit.key.as_ref().ok_or(StoreError::AuditUnavailable)?;
        let seq = self.audit.tentative.seq + 1;
        let encoded = record.encode(seq);
        let mac = key.chain(&self.audit.tentative.mac, &encoded);
        let seq_sql = i64::try_from(seq).map_err(|_| StoreError::AuditUnavailable)?;
        let audit_failed = |e: rusqlite::Error| {
            let error = StoreError::from(e);
            if error.is_unavailable() && !matches!(error, StoreError::Full | StoreError::ReadOnly | StoreError::Busy) {
                tracing::error!(error = %error, "audit insert failed");
                StoreError::AuditUnavailable
            } else {
                error
            }
        };
        self.conn
            .prepare_cached(
                "INSERT INTO audit (seq, at, caller, action, collection, outcome, record, mac)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    seq_sql,
                    record.at_micros,
                    record.caller,
                    record.action,
                    record.collection,
                    record.outcome,
                    encoded,
                    mac.as_slice()
                ])
            })
            .map_err(audit_failed)?;
        let mut stmt = self
            .conn
            .prepare_cached("INSERT OR IGNORE INTO audit_tokens (token, seq) VALUES (?1, ?2)")
            .map_err(audit_failed)?;
        for token in &record.tokens {
            stmt.execute(params![token, seq_sql]).map_err(audit_failed)?;
        }
        self.audit.tentative = Head { seq, mac };
        if self.audit.sink.is_some() {
            self.audit.pending.push((seq, record.clone(), mac));
        }
        Ok(seq)
    }
}

/// A request for the writer: `apply` runs inside the batch transaction,
/// `finish` answers once the batch committed (or failed).
trait WriteJob: Send {
    fn apply(&mut self, tx: &mut WriteTx<'_>) -> Result<(), StoreError>;
    fn finish(self: Box<Self>, outcome: Result<(), StoreError>);
}

struct Job<T, F> {
    work: Option<F>,
    output: Option<T>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> WriteJob for Job<T, F>
where
    T: Send,
    F: FnOnce(&mut WriteTx<'_>) -> Result<T, StoreError> + Send,
{
    fn apply(&mut self, tx: &mut WriteTx<'_>) -> Result<(), StoreError> {
        let work = self.work.take().ok_or(StoreError::Closed)?;
        self.output = Some(work(tx)?);
        Ok(())
    }

    fn finish(self: Box<Self>, outcome: Result<(), StoreError>) {
        let Self { output, reply, .. } = *self;
        let result = outcome.and_then(|()| output.ok_or(StoreError::Closed));
        // The requester may have gone away (deadline, cancellation): its
        // data is committed all the same, and nobody is left to tell.
        let _ = reply.send(result);
    }
}

/// Tuning for [`Store::open`].
#[derive(Clone)]
pub struct StoreOptions {
    /// Read connections (threads) in the pool.
    pub read_connections: usize,
    /// Most write requests per transaction.
    pub max_group_commit: usize,
    /// Where committed audit records are also written.
    pub sink: Option<Arc<AuditSink>>,
}

/// Handle to the store's writer and reader threads.
pub struct Store {
    writer: Option<Sender<Box<dyn WriteJob>>>,
    readers: Option<Sender<ReadJob>>,
    writer_thread: Option<JoinHandle<()>>,
    reader_threads: Vec<JoinHandle<()>>,
}

/// Now, in microseconds since the Unix epoch.
pub(crate) fn now_micros() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

impl Store {
    /// Opens (or, with [`OpenMode::Create`], creates) the store at `path` and
    /// starts its threads.
    pub fn open(path: &Path, mode: OpenMode, options: StoreOptions) -> Result<Self, StoreError> {
        let writer_conn = schema::open_writer(path, mode)?;
        let mut readers = Vec::with_capacity(options.read_connections);
        for _ in 0..options.read_connections.max(1) {
            readers.push(schema::open_reader(path)?);
        }

        let (write_tx, write_rx) = crossbeam_channel::unbounded::<Box<dyn WriteJob>>();
        let (read_tx, read_rx) = crossbeam_channel::unbounded::<ReadJob>();
        let mut store =
            Self { writer: Some(write_tx), readers: Some(read_tx), writer_thread: None, reader_threads: Vec::new() };
        let max_batch = options.max_group_commit.max(1);
        let sink = options.sink;
        store.writer_thread =
            Some(spawn("piivault-writer", move || writer_loop(&writer_conn, &write_rx, max_batch, sink))?);
        for (i, conn) in readers.into_iter().enumerate() {
            let rx = read_rx.clone();
            store.reader_threads.push(spawn(&format!("piivault-reader-{i}"), move || reader_loop(&conn, &rx))?);
        }
        Ok(store)
    }

    /// Runs `work` on the writer inside the next group-commit transaction and
    /// answers once that transaction is durable.
    async fn write<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut WriteTx<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Box::new(Job { work: Some(work), output: None, reply });
        self.writer.as_ref().ok_or(StoreError::Closed)?.send(job).map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `work` on a reader connection inside one read transaction.
    async fn read<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: ReadJob = Box::new(move |conn| {
            let result = conn.unchecked_transaction().map_err(StoreError::from).and_then(|tx| {
                let out = work(&tx)?;
                tx.commit()?;
                Ok(out)
            });
            let _ = reply.send(result);
        });
        self.readers.as_ref().ok_or(StoreError::Closed)?.send(job).map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// The key versions of `collection` for `purpose`, oldest first.
    pub async fn list_keys(&self, collection: CollectionId, purpose: &'static str) -> Result<Vec<KeyInfo>, StoreError> {
        self.read(move |conn| {
            // Index keys count their entries; data keys keep a counter.
            let mut stmt = conn.prepare_cached(
                "SELECT k.version, k.state, k.created_at, k.encryptions,
                        CASE k.purpose WHEN 'index' THEN
                            (SELECT count(*) FROM blind_index b WHERE b.collection_id = k.collection_id AND b.version = k.version)
                        ELSE k.live END
                 FROM keys k WHERE k.collection_id = ?1 AND k.purpose = ?2 ORDER BY k.version",
            )?;
            let rows = stmt.query_map(params![collection.0, purpose], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get(2)?,
                    row.get::<_, i64>(3)?,
                    row.get::<_, i64>(4)?,
                ))
            })?;
            rows.map(|row| {
                let (version, state, created_at, encryptions, records) = row?;
                Ok(KeyInfo {
                    purpose: purpose.to_owned(),
                    version: u32::try_from(version).map_err(|_| StoreError::Corrupt)?,
                    state: KeyState::parse(&state).ok_or(StoreError::Corrupt)?,
                    created_at,
                    records: u64::try_from(records).unwrap_or(0),
                    encryptions: u64::try_from(encryptions).unwrap_or(0),
                })
            })
            .collect()
        })
        .await
    }

    /// Makes `version` (wrapped as `wrapped`) the primary data key of
    /// `collection`; the previous primary becomes active (or keeps a
    /// `compromised` mark). One transaction with its audit record. A version
    /// that already exists (a concurrent rotation) is refused.
    pub async fn add_primary_key(
        &self,
        collection: CollectionId,
        purpose: &'static str,
        version: u32,
        wrapped: Vec<u8>,
        compromised: Option<u32>,
        audit: AuditRecord,
    ) -> Result<(), StoreError> {
        self.write(move |tx| {
            // An old index key only serves lookups until the rebuild has
            // moved its entries: it is retiring from the start.
            let demoted = if purpose == INDEX_PURPOSE { "retiring" } else { "active" };
            tx.conn
                .prepare_cached(
                    "UPDATE keys SET state = ?3
                     WHERE collection_id = ?1 AND purpose = ?2 AND state = 'primary'",
                )?
                .execute(params![collection.0, purpose, demoted])?;
            if let Some(bad) = compromised {
                tx.conn
                    .prepare_cached(
                        "UPDATE keys SET state = 'compromised'
                         WHERE collection_id = ?1 AND purpose = 'data' AND version = ?2 AND state != 'retired'",
                    )?
                    .execute(params![collection.0, bad])?;
            }
            tx.conn
                .prepare_cached(
                    "INSERT INTO keys (collection_id, purpose, version, state, wrapped, created_at)
                     VALUES (?1, ?2, ?3, 'primary', ?4, ?5)",
                )?
                .execute(params![collection.0, purpose, version, wrapped, now_micros()])?;
            tx.append_audit(&audit)?;
            Ok(())
        })
        .await
    }

    /// Marks every `active` version of `collection` `retiring`: a
    /// re-encryption is emptying them.
    pub async fn mark_retiring(&self, collection: CollectionId) -> Result<(), StoreError> {
        self.write(move |tx| {
            tx.conn
                .prepare_cached("UPDATE keys SET state = 'retiring' WHERE collection_id = ?1 AND purpose = 'data' AND state = 'active'")?
                .execute([collection.0])?;
            Ok(())
        })
        .await
    }

    /// Live records of `collection` that still need `work`, after
    /// `after_token` in token order: `(token, ciphertext)`, at most `limit`.
    pub async fn records_needing(
        &self,
        collection: CollectionId,
        work: Pending,
        after_token: String,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.read(move |conn| {
            let (mut stmt, version) = match work {
                Pending::Reencryption { primary } => (
                    conn.prepare_cached(
                        "SELECT token, ciphertext FROM records
                         WHERE collection_id = ?1 AND key_version != ?2 AND ciphertext IS NOT NULL AND token > ?3
                         ORDER BY token LIMIT ?4",
                    )?,
                    primary,
                ),
                Pending::Indexing { version } => (
                    conn.prepare_cached(
                        "SELECT r.token, r.ciphertext FROM records r
                         WHERE r.collection_id = ?1 AND r.ciphertext IS NOT NULL AND r.token > ?3
                           AND NOT EXISTS (SELECT 1 FROM blind_index b
                                           WHERE b.collection_id = r.collection_id AND b.token = r.token AND b.version = ?2)
                         ORDER BY r.token LIMIT ?4",
                    )?,
                    version,
                ),
            };
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = stmt
                .query_map(params![collection.0, version, after_token, limit], |row| Ok((row.get(0)?, row.get(1)?)))?;
            rows.map(|r| r.map_err(StoreError::from)).collect()
        })
        .await
    }

    /// Replaces ciphertexts with re-encrypted ones, each only if the record
    /// is still live under the version it was read under (a concurrent
    /// delete or re-encryption wins). Returns how many were replaced.
    pub async fn replace_ciphertexts(
        &self,
        collection: CollectionId,
        records: Vec<Reencrypted>,
        audit: AuditRecord,
    ) -> Result<usize, StoreError> {
        self.write(move |tx| {
            let mut stmt = tx.conn.prepare_cached(
                "UPDATE records SET key_version = ?1, ciphertext = ?2
                 WHERE collection_id = ?3 AND token = ?4 AND key_version = ?5 AND ciphertext IS NOT NULL",
            )?;
            let mut replaced = 0;
            let mut sealed: std::collections::BTreeMap<u32, i64> = std::collections::BTreeMap::new();
            let mut removed: std::collections::BTreeMap<u32, i64> = std::collections::BTreeMap::new();
            for r in &records {
                if stmt.execute(params![r.to_version, r.ciphertext, collection.0, r.token, r.from_version])? == 1 {
                    replaced += 1;
                    *sealed.entry(r.to_version).or_default() += 1;
                    *removed.entry(r.from_version).or_default() += 1;
                }
            }
            drop(stmt);
            count(tx.conn, COUNT_SEALED, collection, &sealed)?;
            count(tx.conn, COUNT_REMOVED, collection, &removed)?;
            tx.append_audit(&audit)?;
            // The ciphertexts under the old version (perhaps compromised)
            // must not outlive this in the WAL.
            *tx.erased |= replaced > 0;
            Ok(replaced)
        })
        .await
    }

    /// Destroys the wrapped key of `version`: refused (with the number of
    /// records) while any live record is under it, and for the primary.
    /// Returns `Ok(Err(records))` when refused.
    pub async fn retire_key(
        &self,
        collection: CollectionId,
        version: u32,
        audit: AuditRecord,
    ) -> Result<Result<(), RetireRefused>, StoreError> {
        self.write(move |tx| {
            let state: Option<String> = tx
                .conn
                .prepare_cached(
                    "SELECT state FROM keys WHERE collection_id = ?1 AND purpose = 'data' AND version = ?2",
                )?
                .query_row(params![collection.0, version], |row| row.get(0))
                .optional()?;
            let refusal = match state.as_deref() {
                None => Some(RetireRefused::NoSuchVersion),
                Some("primary") => Some(RetireRefused::Primary),
                Some("retired") => Some(RetireRefused::AlreadyRetired),
                Some(_) => {
                    let records: i64 = tx
                        .conn
                        .prepare_cached(
                            "SELECT live FROM keys WHERE collection_id = ?1 AND purpose = 'data' AND version = ?2",
                        )?
                        .query_row(params![collection.0, version], |row| row.get(0))?;
                    (records > 0).then(|| RetireRefused::InUse(u64::try_from(records).unwrap_or(0)))
                }
            };
            if let Some(refusal) = refusal {
                let mut audit = audit;
                "FAILED_PRECONDITION".clone_into(&mut audit.outcome);
                audit.error_code = refusal.to_string();
                tx.append_audit(&audit)?;
                return Ok(Err(refusal));
            }
            tx.conn
                .prepare_cached(
                    "UPDATE keys SET state = 'retired', wrapped = X'', retired_at = ?3
                     WHERE collection_id = ?1 AND purpose = 'data' AND version = ?2",
                )?
                .execute(params![collection.0, version, now_micros()])?;
            tx.append_audit(&audit)?;
            // The destroyed wrapped key must not outlive this in the WAL.
            *tx.erased = true;
            Ok(Ok(()))
        })
        .await
    }

    /// Every live (not retired) key as `(collection id or None for vault
    /// keys, collection name, purpose, version, wrapped)`.
    pub async fn wrapped_keys(&self) -> Result<Vec<WrappedKey>, StoreError> {
        self.read(|conn| {
            let mut out = Vec::new();
            let mut stmt = conn.prepare_cached(
                "SELECT k.collection_id, c.name, k.purpose, k.version, k.wrapped
                 FROM keys k JOIN collections c ON c.id = k.collection_id WHERE k.state != 'retired'",
            )?;
            let rows = stmt.query_map([], |row| {
                Ok(WrappedKey {
                    collection: Some(CollectionId(row.get(0)?)),
                    collection_name: row.get(1)?,
                    purpose: row.get(2)?,
                    version: row.get(3)?,
                    wrapped: row.get(4)?,
                })
            })?;
            for row in rows {
                out.push(row?);
            }
            let mut stmt =
                conn.prepare_cached("SELECT purpose, version, wrapped FROM vault_keys WHERE state != 'retired'")?;
            let rows = stmt.query_map([], |row| {
                Ok(WrappedKey {
                    collection: None,
                    collection_name: String::new(),
                    purpose: row.get(0)?,
                    version: row.get(1)?,
                    wrapped: row.get(2)?,
                })
            })?;
            for row in rows {
                out.push(row?);
            }
            Ok(out)
        })
        .await
    }

    /// Replaces every given wrapped key in one transaction (root-key
    /// rotation): all of them or none.
    pub async fn rewrap_keys(&self, keys: Vec<WrappedKey>, audit: AuditRecord) -> Result<(), StoreError> {
        self.write(move |tx| {
            for key in &keys {
                let changed = match key.collection {
                    Some(id) => tx
                        .conn
                        .prepare_cached(
                            "UPDATE keys SET wrapped = ?1 WHERE collection_id = ?2 AND purpose = ?3 AND version = ?4",
                        )?
                        .execute(params![key.wrapped, id.0, key.purpose, key.version])?,
                    None => tx
                        .conn
                        .prepare_cached("UPDATE vault_keys SET wrapped = ?1 WHERE purpose = ?2 AND version = ?3")?
                        .execute(params![key.wrapped, key.purpose, key.version])?,
                };
                if changed != 1 {
                    // A key vanished or appeared meanwhile: roll back all.
                    return Err(StoreError::Sqlite("the keyring changed during root-key rotation".into()));
                }
            }
            tx.append_audit(&audit)?;
            // Keys wrapped under the old root must not outlive it in the WAL.
            *tx.erased = true;
            Ok(())
        })
        .await
    }

    /// Every stored key with its collection.
    pub async fn load_keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT k.collection_id, c.name, k.purpose, k.version, k.state, k.wrapped
                 FROM keys k JOIN collections c ON c.id = k.collection_id
                 ORDER BY k.collection_id, k.purpose, k.version",
            )?;
            let rows = stmt.query_map([], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, i64>(3)?,
                    row.get::<_, String>(4)?,
                    row.get::<_, Vec<u8>>(5)?,
                ))
            })?;
            let mut keys = Vec::new();
            for row in rows {
                let (id, name, purpose, version, state, wrapped) = row?;
                keys.push(StoredKey {
                    collection: CollectionId(id),
                    collection_name: name,
                    purpose,
                    version: u32::try_from(version).map_err(|_| StoreError::Corrupt)?,
                    state: KeyState::parse(&state).ok_or(StoreError::Corrupt)?,
                    wrapped,
                });
            }
            Ok(keys)
        })
        .await
    }

    /// The id of collection `name`, if it exists.
    pub async fn collection_id(&self, name: &str) -> Result<Option<CollectionId>, StoreError> {
        let name = name.to_owned();
        self.read(move |conn| {
            Ok(conn
                .prepare_cached("SELECT id FROM collections WHERE name = ?1")?
                .query_row([&name], |row| row.get(0))
                .optional()?
                .map(CollectionId))
        })
        .await
    }

    /// Creates collection `name` with its first key (version 1, primary) in
    /// one transaction. If another process created it meanwhile, nothing is
    /// written and its existing id is returned.
    pub async fn create_collection(
        &self,
        name: &str,
        purpose: &'static str,
        wrapped_v1: Vec<u8>,
    ) -> Result<CollectionId, StoreError> {
        let name = name.to_owned();
        self.write(move |tx| {
            let conn = tx.conn;
            let existing: Option<i64> = conn
                .prepare_cached("SELECT id FROM collections WHERE name = ?1")?
                .query_row([&name], |row| row.get(0))
                .optional()?;
            if let Some(id) = existing {
                return Ok(CollectionId(id));
            }
            let now = now_micros();
            conn.prepare_cached("INSERT INTO collections (name, created_at) VALUES (?1, ?2)")?
                .execute(params![name, now])?;
            let id = conn.last_insert_rowid();
            conn.prepare_cached(
                "INSERT INTO keys (collection_id, purpose, version, state, wrapped, created_at)
                 VALUES (?1, ?2, 1, ?3, ?4, ?5)",
            )?
            .execute(params![id, purpose, KeyState::Primary.as_str(), wrapped_v1, now])?;
            Ok(CollectionId(id))
        })
        .await
    }

    /// Inserts records; a token that already exists in the collection (live
    /// or deleted) is reported as a collision and not written. A record with
    /// a blind index whose value already has a live token answers that token
    /// instead (checked here, in the writer, so two concurrent requests for
    /// one value get one token); an expired one is erased and replaced.
    /// `audit`, with the tokens handed out, is appended in the same
    /// transaction.
    pub async fn insert_records(
        &self,
        collection: CollectionId,
        records: Vec<NewRecord>,
        mut audit: AuditRecord,
    ) -> Result<Vec<InsertOutcome>, StoreError> {
        self.write(move |tx| {
            let now = now_micros();
            let mut outcomes = Vec::with_capacity(records.len());
            let mut per_version: std::collections::BTreeMap<u32, i64> = std::collections::BTreeMap::new();
            for r in &records {
                if let Some(index) = &r.index
                    && let Some(token) = indexed_token(tx, collection, index, now)?
                {
                    outcomes.push(InsertOutcome::Existing(token));
                    continue;
                }
                // A token issued before canonical storage may hold this
                // canonical form in another writing.
                let legacy = tx
                    .conn
                    .prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM legacy_tokens WHERE collection_id = ?1 AND canonical = ?2)",
                    )?
                    .query_row(params![collection.0, r.token], |row| row.get::<_, bool>(0))?;
                if legacy {
                    outcomes.push(InsertOutcome::Collision);
                    continue;
                }
                let changed = tx
                    .conn
                    .prepare_cached(
                        "INSERT INTO records (collection_id, token, key_version, ciphertext, created_at, expires_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                         ON CONFLICT (collection_id, token) DO NOTHING",
                    )?
                    .execute(params![collection.0, r.token, r.key_version, r.ciphertext, now, r.expires_at])?;
                if changed != 1 {
                    outcomes.push(InsertOutcome::Collision);
                    continue;
                }
                if let Some(index) = &r.index {
                    tx.conn
                        .prepare_cached(
                            "INSERT INTO blind_index (collection_id, version, digest, token) VALUES (?1, ?2, ?3, ?4)",
                        )?
                        .execute(params![collection.0, index.version, index.digest.as_slice(), r.token])?;
                }
                *per_version.entry(r.key_version).or_default() += 1;
                outcomes.push(InsertOutcome::Inserted);
            }
            count(tx.conn, COUNT_SEALED, collection, &per_version)?;
            audit.tokens = records
                .iter()
                .zip(&outcomes)
                .filter_map(|(r, o)| match o {
                    InsertOutcome::Inserted => Some(r.token.clone()),
                    InsertOutcome::Existing(token) => Some(token.clone()),
                    InsertOutcome::Collision => None,
                })
                .collect();
            tx.append_audit(&audit)?;
            Ok(outcomes)
        })
        .await
    }

    /// Appends one audit record on its own (a read, a denial, a failure),
    /// answering once it is durable.
    pub async fn append_audit(&self, record: AuditRecord) -> Result<u64, StoreError> {
        self.write(move |tx| tx.append_audit(&record)).await
    }

    /// Gives the writer the audit key and the current head of the trail.
    /// Until then, every write that must be audited fails.
    pub async fn install_audit_key(&self, key: AuditKey) -> Result<Head, StoreError> {
        self.write(move |tx| {
            let head = last_head(tx.conn)?;
            tx.audit.key = Some(key);
            tx.audit.committed = head;
            tx.audit.tentative = head;
            Ok(head)
        })
        .await
    }

    /// The last committed audit record's number and MAC.
    pub async fn audit_head(&self) -> Result<Head, StoreError> {
        self.read(last_head).await
    }

    /// Audit rows matching `filter`, oldest first, at most `limit`.
    pub async fn query_audit(&self, filter: AuditFilter, limit: usize) -> Result<Vec<AuditRow>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT a.seq, a.record, a.mac, a.at, a.caller, a.action, a.collection, a.outcome,
                        (SELECT group_concat(token, ',') FROM audit_tokens t WHERE t.seq = a.seq)
                 FROM audit a
                 WHERE a.seq > ?1
                   AND (?2 IS NULL OR a.seq IN (SELECT seq FROM audit_tokens WHERE token = ?2))
                   AND (?3 IS NULL OR a.caller = ?3)
                   AND (?4 IS NULL OR a.action = ?4)
                   AND (?5 IS NULL OR a.collection = ?5)
                   AND (?6 IS NULL OR a.outcome = ?6)
                   AND (?7 IS NULL OR a.at >= ?7)
                   AND (?8 IS NULL OR a.at < ?8)
                 ORDER BY a.seq LIMIT ?9",
            )?;
            let after = i64::try_from(filter.after_seq).unwrap_or(i64::MAX);
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = stmt.query_map(
                params![
                    after,
                    filter.token,
                    filter.caller,
                    filter.action,
                    filter.collection,
                    filter.outcome,
                    filter.since,
                    filter.until,
                    limit
                ],
                audit_row,
            )?;
            rows.map(|r| r.map_err(StoreError::from)).collect()
        })
        .await
    }

    /// The wrapped vault-level key for `purpose` (version 1), creating it
    /// with `wrapped` if there is none.
    pub async fn vault_key(&self, purpose: &'static str, wrapped: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        self.write(move |tx| {
            tx.conn
                .prepare_cached(
                    "INSERT INTO vault_keys (purpose, version, state, wrapped, created_at)
                     VALUES (?1, 1, 'primary', ?2, ?3) ON CONFLICT (purpose, version) DO NOTHING",
                )?
                .execute(params![purpose, wrapped, now_micros()])?;
            Ok(tx
                .conn
                .prepare_cached("SELECT wrapped FROM vault_keys WHERE purpose = ?1 AND version = 1")?
                .query_row([purpose], |row| row.get(0))?)
        })
        .await
    }

    /// Looks up live records, answering in the order asked.
    pub async fn get_records(
        &self,
        collection: CollectionId,
        lookups: Vec<TokenLookup>,
    ) -> Result<Vec<Option<StoredRecord>>, StoreError> {
        self.read(move |conn| {
            let now = now_micros();
            let mut stmt = conn.prepare_cached(
                "SELECT ciphertext FROM records
                 WHERE collection_id = ?1 AND token = ?2 AND ciphertext IS NOT NULL
                   AND (expires_at IS NULL OR expires_at > ?3)",
            )?;
            let mut find = |token: &str| -> Result<Option<StoredRecord>, StoreError> {
                let found =
                    stmt.query_row(params![collection.0, token, now], |row| row.get::<_, Vec<u8>>(0)).optional()?;
                Ok(found.map(|ciphertext| StoredRecord { token: token.to_owned(), ciphertext }))
            };
            lookups
                .iter()
                .map(|lookup| {
                    for token in lookup.candidates() {
                        if let Some(found) = find(token)? {
                            return Ok(Some(found));
                        }
                    }
                    match legacy_token(conn, collection, lookup)? {
                        Some(token) => find(&token),
                        None => Ok(None),
                    }
                })
                .collect()
        })
        .await
    }

    /// Deletes live records: the ciphertext is cleared (and overwritten on
    /// disk by `secure_delete`, then the WAL is truncated), the token row
    /// stays so the token is never issued again, and its blind-index entries
    /// go. Answers, in order, whether each token was live (an expired token
    /// is not). `audit`, with the tokens deleted, is appended in the same
    /// transaction.
    pub async fn delete_records(
        &self,
        collection: CollectionId,
        lookups: Vec<TokenLookup>,
        mut audit: AuditRecord,
    ) -> Result<Vec<bool>, StoreError> {
        self.write(move |tx| {
            let now = now_micros();
            let mut deleted = Vec::with_capacity(lookups.len());
            for lookup in &lookups {
                let mut erased = None;
                for token in lookup.candidates() {
                    if erase(tx, collection, token, Some(now))? {
                        erased = Some(token.to_owned());
                        break;
                    }
                }
                if erased.is_none()
                    && let Some(token) = legacy_token(tx.conn, collection, lookup)?
                    && erase(tx, collection, &token, Some(now))?
                {
                    erased = Some(token);
                }
                deleted.push(erased.is_some());
                audit.tokens.extend(erased);
            }
            tx.append_audit(&audit)?;
            Ok(deleted)
        })
        .await
    }

    /// Erases up to `limit` records of `collection` that expired by `now`,
    /// like a delete; `audit` (with the tokens purged) is appended in the
    /// same transaction if any was. Returns how many.
    pub async fn purge_expired(
        &self,
        collection: CollectionId,
        now: i64,
        limit: usize,
        mut audit: AuditRecord,
    ) -> Result<usize, StoreError> {
        self.write(move |tx| {
            let expired: Vec<String> = {
                let mut stmt = tx.conn.prepare_cached(
                    "SELECT token FROM records
                     WHERE collection_id = ?1 AND ciphertext IS NOT NULL AND expires_at IS NOT NULL AND expires_at <= ?2
                     LIMIT ?3",
                )?;
                let limit = i64::try_from(limit).unwrap_or(i64::MAX);
                let rows = stmt.query_map(params![collection.0, now, limit], |row| row.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            let mut purged = Vec::with_capacity(expired.len());
            for token in expired {
                if erase(tx, collection, &token, None)? {
                    purged.push(token);
                }
            }
            let n = purged.len();
            if n > 0 {
                audit.items = u32::try_from(n).unwrap_or(u32::MAX);
                audit.tokens = purged;
                tx.append_audit(&audit)?;
            }
            Ok(n)
        })
        .await
    }

    /// Tokens ever issued in `collection` (live, expired or deleted: none is
    /// issued again), per length in letters and digits.
    pub async fn issued_by_length(&self, collection: CollectionId) -> Result<Vec<(usize, u64)>, StoreError> {
        self.read(move |conn| {
            // Canonical tokens are counted by length in SQL; tokens stored
            // with separators (before schema version 5) one by one.
            let mut stmt = conn.prepare_cached(
                "SELECT length(token), CASE WHEN token GLOB '*[^0-9A-Za-z]*' THEN token END, count(*)
                 FROM records WHERE collection_id = ?1 GROUP BY 1, 2",
            )?;
            let rows = stmt.query_map([collection.0], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, Option<String>>(1)?, row.get::<_, i64>(2)?))
            })?;
            let mut counts: std::collections::BTreeMap<usize, u64> = std::collections::BTreeMap::new();
            for row in rows {
                let (length, legacy, n) = row?;
                let length = match legacy {
                    Some(token) => crate::format::slots_of(&token),
                    None => usize::try_from(length).unwrap_or(0),
                };
                *counts.entry(length).or_default() += u64::try_from(n).unwrap_or(0);
            }
            Ok(counts.into_iter().collect())
        })
        .await
    }

    /// The first index-key version of `collection` whose digests are over
    /// canonical values (`None`: undecided, a store made before schema
    /// version 5).
    pub async fn canonical_index_from(&self, collection: CollectionId) -> Result<Option<u32>, StoreError> {
        self.read(move |conn| {
            Ok(conn
                .prepare_cached("SELECT canonical_index_from FROM collections WHERE id = ?1")?
                .query_row([collection.0], |row| row.get(0))?)
        })
        .await
    }

    /// Records [`Store::canonical_index_from`] (once: a decided version is
    /// kept). Returns the version in force.
    pub async fn set_canonical_index_from(&self, collection: CollectionId, version: u32) -> Result<u32, StoreError> {
        self.write(move |tx| {
            tx.conn
                .prepare_cached(
                    "UPDATE collections SET canonical_index_from = ?2 WHERE id = ?1 AND canonical_index_from IS NULL",
                )?
                .execute(params![collection.0, version])?;
            tx.conn
                .prepare_cached("SELECT canonical_index_from FROM collections WHERE id = ?1")?
                .query_row([collection.0], |row| row.get(0))
                .map_err(StoreError::from)
        })
        .await
    }

    /// Moves each `(token, digest)` to index version `version`: its entries
    /// under other versions go, the new one is added (unless another token
    /// of the same value holds it, or the record is gone meanwhile). Returns
    /// how many were indexed.
    pub async fn index_records(
        &self,
        collection: CollectionId,
        version: u32,
        entries: Vec<(String, [u8; 32])>,
        audit: AuditRecord,
    ) -> Result<usize, StoreError> {
        self.write(move |tx| {
            let mut indexed = 0;
            for (token, digest) in &entries {
                let live: bool = tx
                    .conn
                    .prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM records
                         WHERE collection_id = ?1 AND token = ?2 AND ciphertext IS NOT NULL)",
                    )?
                    .query_row(params![collection.0, token], |row| row.get(0))?;
                if !live {
                    continue;
                }
                tx.conn
                    .prepare_cached(
                        "DELETE FROM blind_index WHERE collection_id = ?1 AND token = ?2 AND version != ?3",
                    )?
                    .execute(params![collection.0, token, version])?;
                indexed += tx
                    .conn
                    .prepare_cached(
                        "INSERT INTO blind_index (collection_id, version, digest, token) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT DO NOTHING",
                    )?
                    .execute(params![collection.0, version, digest.as_slice(), token])?;
            }
            tx.append_audit(&audit)?;
            Ok(indexed)
        })
        .await
    }

    /// Retires (destroys) every non-primary index-key version of
    /// `collection` that no index entry uses any more; returns them.
    pub async fn retire_unused_index_keys(
        &self,
        collection: CollectionId,
        audit: AuditRecord,
    ) -> Result<Vec<u32>, StoreError> {
        self.write(move |tx| {
            let unused: Vec<u32> = {
                let mut stmt = tx.conn.prepare_cached(
                    "SELECT k.version FROM keys k
                     WHERE k.collection_id = ?1 AND k.purpose = 'index' AND k.state NOT IN ('primary', 'retired')
                       AND NOT EXISTS (SELECT 1 FROM blind_index b WHERE b.collection_id = k.collection_id AND b.version = k.version)",
                )?;
                let rows = stmt.query_map([collection.0], |row| row.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            if unused.is_empty() {
                return Ok(unused);
            }
            for version in &unused {
                tx.conn
                    .prepare_cached(
                        "UPDATE keys SET state = 'retired', wrapped = X'', retired_at = ?3
                         WHERE collection_id = ?1 AND purpose = 'index' AND version = ?2",
                    )?
                    .execute(params![collection.0, version, now_micros()])?;
            }
            let mut audit = audit;
            audit.error_code = format!(
                "index key versions {} retired",
                unused.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
            );
            tx.append_audit(&audit)?;
            *tx.erased |= !unused.is_empty();
            Ok(unused)
        })
        .await
    }

    /// The token kind recorded for `collection`, recording `configured` if
    /// there is none yet (a write only then).
    pub async fn token_kind(&self, collection: CollectionId, configured: String) -> Result<String, StoreError> {
        let read = move |conn: &Connection| -> Result<Option<String>, StoreError> {
            Ok(conn
                .prepare_cached("SELECT token_kind FROM collections WHERE id = ?1")?
                .query_row([collection.0], |row| row.get(0))?)
        };
        if let Some(stored) = self.read(read).await? {
            return Ok(stored);
        }
        self.write(move |tx| {
            tx.conn
                .prepare_cached("UPDATE collections SET token_kind = ?2 WHERE id = ?1 AND token_kind IS NULL")?
                .execute(params![collection.0, configured])?;
            read(tx.conn)?.ok_or(StoreError::Corrupt)
        })
        .await
    }

    /// Copies the whole store into a new file at `dest` (0600, refused if it
    /// exists) with SQLite's online backup API, in one step inside one read
    /// transaction: a consistent snapshot while writes go on. Returns the
    /// pages copied.
    pub async fn backup(&self, dest: std::path::PathBuf) -> Result<BackupTaken, StoreError> {
        self.read(move |conn| {
            schema::create_private_file(&dest)?;
            let mut out = Connection::open(&dest)?;
            let backup = rusqlite::backup::Backup::new(conn, &mut out)?;
            match backup.step(-1)? {
                rusqlite::backup::StepResult::Done => {}
                _ => return Err(StoreError::Busy),
            }
            let pages = u64::try_from(backup.progress().pagecount).unwrap_or(0);
            drop(backup);
            out.pragma_update(None, "journal_mode", "DELETE")?;
            let records: i64 =
                out.query_row("SELECT count(*) FROM records WHERE ciphertext IS NOT NULL", [], |row| row.get(0))?;
            drop(out);
            let bytes = std::fs::metadata(&dest).map_err(|e| StoreError::Sqlite(e.to_string()))?.len();
            Ok(BackupTaken { pages, bytes, records: u64::try_from(records).unwrap_or(0) })
        })
        .await
    }

    /// Whether any audit record involves `token`.
    pub async fn token_audited(&self, token: String) -> Result<bool, StoreError> {
        self.read(move |conn| {
            Ok(conn
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM audit_tokens WHERE token = ?1)")?
                .query_row([token], |row| row.get(0))?)
        })
        .await
    }

    /// Adds version 1 of a `purpose` key to `collection`, as primary, unless
    /// it has a key of that purpose already (like creating a collection,
    /// this is setup, not an audited operation).
    pub async fn add_first_key(
        &self,
        collection: CollectionId,
        purpose: &'static str,
        wrapped: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.write(move |tx| {
            tx.conn
                .prepare_cached(
                    "INSERT INTO keys (collection_id, purpose, version, state, wrapped, created_at)
                     SELECT ?1, ?2, 1, 'primary', ?3, ?4
                     WHERE NOT EXISTS (SELECT 1 FROM keys WHERE collection_id = ?1 AND purpose = ?2)",
                )?
                .execute(params![collection.0, purpose, wrapped, now_micros()])?;
            Ok(())
        })
        .await
    }

    /// Key versions per collection name, purpose and state, with the live
    /// records of data keys: one small query over `keys` (for metrics).
    pub async fn key_summary(&self) -> Result<Vec<KeySummary>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT c.name, k.purpose, k.state, count(*), sum(CASE k.purpose WHEN 'data' THEN k.live ELSE 0 END)
                 FROM keys k JOIN collections c ON c.id = k.collection_id
                 GROUP BY c.name, k.purpose, k.state ORDER BY c.name, k.purpose, k.state",
            )?;
            let rows = stmt.query_map([], |row| {
                Ok(KeySummary {
                    collection: row.get(0)?,
                    purpose: row.get(1)?,
                    state: row.get(2)?,
                    versions: u64::try_from(row.get::<_, i64>(3)?).unwrap_or(0),
                    live: u64::try_from(row.get::<_, i64>(4)?).unwrap_or(0),
                })
            })?;
            rows.collect::<Result<_, _>>().map_err(StoreError::from)
        })
        .await
    }

    /// Number of live records per collection id.
    pub async fn record_counts(&self) -> Result<Vec<(CollectionId, u64)>, StoreError> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT collection_id, count(*) FROM records WHERE ciphertext IS NOT NULL GROUP BY collection_id",
            )?;
            let rows = stmt.query_map([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?)))?;
            rows.map(|row| {
                let (id, n) = row?;
                Ok((CollectionId(id), u64::try_from(n).unwrap_or(0)))
            })
            .collect()
        })
        .await
    }

    /// Stops accepting work, lets queued requests finish, and waits for the
    /// threads to close their connections. Readers close first, so that the
    /// writer's connection is the last one and its close checkpoints the WAL
    /// into the database file.
    pub fn shutdown(&mut self) {
        self.readers = None;
        for thread in std::mem::take(&mut self.reader_threads) {
            join(thread);
        }
        self.writer = None;
        if let Some(thread) = self.writer_thread.take() {
            join(thread);
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The token issued before canonical storage that `lookup`'s canonical
/// form stands for, if there is exactly one.
fn legacy_token(
    conn: &Connection,
    collection: CollectionId,
    lookup: &TokenLookup,
) -> Result<Option<String>, StoreError> {
    let Some(canonical) = &lookup.canonical else { return Ok(None) };
    Ok(conn
        .prepare_cached("SELECT token FROM legacy_tokens WHERE collection_id = ?1 AND canonical = ?2")?
        .query_row(params![collection.0, canonical], |row| row.get::<_, Option<String>>(0))
        .optional()?
        .flatten())
}

/// The live token a blind index points to, looked up under every live index
/// version. An entry whose record is gone is dropped; one whose record has
/// expired erases it, so the value gets a new token.
fn indexed_token(
    tx: &mut WriteTx<'_>,
    collection: CollectionId,
    index: &IndexEntry,
    now: i64,
) -> Result<Option<String>, StoreError> {
    for (version, digest) in &index.lookups {
        let token: Option<String> = tx
            .conn
            .prepare_cached("SELECT token FROM blind_index WHERE collection_id = ?1 AND version = ?2 AND digest = ?3")?
            .query_row(params![collection.0, version, digest.as_slice()], |row| row.get(0))
            .optional()?;
        let Some(token) = token else { continue };
        let expires_at: Option<Option<i64>> = tx
            .conn
            .prepare_cached(
                "SELECT expires_at FROM records WHERE collection_id = ?1 AND token = ?2 AND ciphertext IS NOT NULL",
            )?
            .query_row(params![collection.0, token], |row| row.get(0))
            .optional()?;
        match expires_at {
            Some(None) => return Ok(Some(token)),
            Some(Some(at)) if at > now => return Ok(Some(token)),
            Some(Some(_)) => {
                erase(tx, collection, &token, None)?;
            }
            None => {
                tx.conn
                    .prepare_cached("DELETE FROM blind_index WHERE collection_id = ?1 AND token = ?2")?
                    .execute(params![collection.0, token])?;
            }
        }
    }
    Ok(None)
}

/// Erases the record behind `token` if it is live (and, with `unexpired_at`,
/// not expired at that time): the ciphertext is cleared, the token row kept,
/// its index entries removed, its key version's live count lowered. Returns
/// whether it erased.
fn erase(
    tx: &mut WriteTx<'_>,
    collection: CollectionId,
    token: &str,
    unexpired_at: Option<i64>,
) -> Result<bool, StoreError> {
    let version: Option<u32> = tx
        .conn
        .prepare_cached(
            "SELECT key_version FROM records
             WHERE collection_id = ?1 AND token = ?2 AND ciphertext IS NOT NULL
               AND (?3 IS NULL OR expires_at IS NULL OR expires_at > ?3)",
        )?
        .query_row(params![collection.0, token, unexpired_at], |row| row.get(0))
        .optional()?;
    let Some(version) = version else { return Ok(false) };
    tx.conn
        .prepare_cached(
            "UPDATE records SET ciphertext = NULL, key_version = NULL, deleted_at = ?3
             WHERE collection_id = ?1 AND token = ?2",
        )?
        .execute(params![collection.0, token, now_micros()])?;
    tx.conn
        .prepare_cached("DELETE FROM blind_index WHERE collection_id = ?1 AND token = ?2")?
        .execute(params![collection.0, token])?;
    count(tx.conn, COUNT_REMOVED, collection, &std::iter::once((version, 1)).collect())?;
    *tx.erased = true;
    Ok(true)
}

/// Records newly sealed under versions of `collection`: adds to each
/// version's encryption counter and live-record count.
const COUNT_SEALED: &str = "UPDATE keys SET encryptions = encryptions + ?1, live = live + ?1
     WHERE collection_id = ?2 AND purpose = 'data' AND version = ?3";

/// Records that left versions of `collection` (deleted, or re-encrypted
/// onto another version): subtracts from each version's live count.
const COUNT_REMOVED: &str =
    "UPDATE keys SET live = live - ?1 WHERE collection_id = ?2 AND purpose = 'data' AND version = ?3";

/// Applies one of the counter updates above to each version's count.
fn count(
    conn: &Connection,
    sql: &str,
    collection: CollectionId,
    per_version: &std::collections::BTreeMap<u32, i64>,
) -> Result<(), StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    for (version, n) in per_version {
        stmt.execute(params![n, collection.0, version])?;
    }
    Ok(())
}

/// The last audit record's number and MAC (the genesis head when empty).
fn last_head(conn: &Connection) -> Result<Head, StoreError> {
    let last = conn
        .prepare_cached("SELECT seq, mac FROM audit ORDER BY seq DESC LIMIT 1")?
        .query_row([], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?)))
        .optional()?;
    let Some((seq, mac)) = last else { return Ok(Head::GENESIS) };
    let mac: [u8; MAC_LEN] = mac.try_into().map_err(|_| StoreError::Corrupt)?;
    Ok(Head { seq: u64::try_from(seq).map_err(|_| StoreError::Corrupt)?, mac })
}

/// An `audit` row selected as `seq, record, mac, at, caller, action,
/// collection, outcome, comma-joined indexed tokens` (tokens never contain
/// a comma).
fn audit_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRow> {
    let indexed: Option<String> = row.get(8)?;
    Ok(AuditRow {
        seq: u64::try_from(row.get::<_, i64>(0)?).unwrap_or(0),
        record: row.get(1)?,
        mac: row.get(2)?,
        at: row.get(3)?,
        caller: row.get(4)?,
        action: row.get(5)?,
        collection: row.get(6)?,
        outcome: row.get(7)?,
        indexed_tokens: indexed.map(|t| t.split(',').map(str::to_owned).collect()).unwrap_or_default(),
    })
}

fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, StoreError> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(body)
        .map_err(|e| StoreError::Sqlite(format!("cannot start store thread: {e}")))
}

fn join(thread: JoinHandle<()>) {
    if thread.join().is_err() {
        tracing::error!("a store thread panicked");
    }
}

fn reader_loop(conn: &Connection, jobs: &Receiver<ReadJob>) {
    while let Ok(job) = jobs.recv() {
        job(conn);
    }
}

fn writer_loop(conn: &Connection, jobs: &Receiver<Box<dyn WriteJob>>, max_batch: usize, sink: Option<Arc<AuditSink>>) {
    let mut audit =
        AuditCursor { key: None, committed: Head::GENESIS, tentative: Head::GENESIS, pending: Vec::new(), sink };
    // Since when erased ciphertext may still sit in the WAL.
    let mut erased_since: Option<std::time::Instant> = None;
    loop {
        let first = match erased_since {
            None => match jobs.recv() {
                Ok(job) => job,
                Err(_) => break,
            },
            Some(since) => match jobs.recv_timeout(std::time::Duration::from_millis(50)) {
                Ok(job) if since.elapsed() < ERASE_CHECKPOINT_DELAY => job,
                Ok(job) => {
                    if truncate_wal(conn) {
                        erased_since = None;
                    }
                    job
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if truncate_wal(conn) {
                        erased_since = None;
                    }
                    continue;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            },
        };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if commit_batch(conn, &mut audit, batch) && erased_since.is_none() {
            erased_since = Some(std::time::Instant::now());
        }
    }
}

/// One group commit: every job in its own savepoint, one durable COMMIT,
/// then every answer. A job's own failure rolls back only that job. If the
/// transaction as a whole fails (COMMIT refused, or SQLite rolled everything
/// back, as it may on a full disk), every job fails and nothing is written.
fn commit_batch(conn: &Connection, audit: &mut AuditCursor, batch: Vec<Box<dyn WriteJob>>) -> bool {
    #[allow(clippy::cast_precision_loss)] // batch sizes are small
    crate::metrics::metrics().commit_batch.observe(batch.len() as f64);
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        let error = StoreError::from(e);
        tracing::error!(error = %error, "store: cannot begin a write transaction");
        for job in batch {
            job.finish(Err(error.clone()));
        }
        return false;
    }
    let mut erased = false;
    let mut outcomes: Vec<(Box<dyn WriteJob>, Result<(), StoreError>)> = Vec::with_capacity(batch.len());
    let mut aborted: Option<StoreError> = None;
    for mut job in batch {
        if aborted.is_some() {
            outcomes.push((job, Err(StoreError::Closed)));
            continue;
        }
        let before = audit.tentative;
        let pending_before = audit.pending.len();
        let result = conn
            .execute_batch("SAVEPOINT job")
            .map_err(StoreError::from)
            .and_then(|()| job.apply(&mut WriteTx { conn, audit: &mut *audit, erased: &mut erased }));
        if result.is_err() {
            audit.tentative = before;
            audit.pending.truncate(pending_before);
        }
        match result {
            Ok(()) => {
                if let Err(e) = conn.execute_batch("RELEASE job") {
                    aborted = Some(e.into());
                }
                outcomes.push((job, Ok(())));
            }
            Err(error) => {
                if conn.is_autocommit() {
                    // SQLite rolled back the whole transaction.
                    aborted = Some(error.clone());
                } else if let Err(e) = conn.execute_batch("ROLLBACK TO job; RELEASE job") {
                    aborted = Some(e.into());
                }
                outcomes.push((job, Err(error)));
            }
        }
    }
    let committed = match aborted {
        Some(error) => Err(error),
        None => conn.execute_batch("COMMIT").map_err(StoreError::from),
    };
    if committed.is_ok() {
        audit.committed = audit.tentative;
        if let Some(sink) = &audit.sink
            && !audit.pending.is_empty()
        {
            sink.emit(&audit.pending);
        }
    } else {
        audit.tentative = audit.committed;
    }
    audit.pending.clear();
    if let Err(error) = &committed {
        tracing::error!(error = %error, jobs = outcomes.len(), "store: write transaction failed; nothing written");
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
    }
    for (job, own) in outcomes {
        let outcome = match (&committed, own) {
            (Ok(()), own) => own,
            (Err(_), Err(own)) if !matches!(own, StoreError::Closed) => Err(own),
            (Err(error), _) => Err(error.clone()),
        };
        job.finish(outcome);
    }
    erased && committed.is_ok()
}

/// How long erased ciphertext may linger in the WAL under steady write
/// traffic before a checkpoint is forced.
const ERASE_CHECKPOINT_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// Copies the WAL into the database and truncates it to zero bytes, so that
/// page images written before an erasure are gone from disk. `false` if a
/// reader kept it from completing (it is retried).
fn truncate_wal(conn: &Connection) -> bool {
    match conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| row.get::<_, i64>(0)) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => {
            tracing::warn!(error = %e, "store: WAL checkpoint after an erasure failed; retrying");
            false
        }
    }
}
