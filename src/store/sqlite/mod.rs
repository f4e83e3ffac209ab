//! The embedded backend: one SQLite file in WAL mode with
//! `synchronous=FULL`, `secure_delete` on.
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
//! By concern: [`records`], [`keys`], [`collections`], [`audit`] implement
//! the interface's traits; [`writer`] is the group commit; [`schema`] opens
//! and migrates the file; [`backup`] copies it online; [`snapshot`] reads it
//! whole for a copy into another backend.

mod audit;
mod backup;
mod collections;
mod keys;
mod records;
mod schema;
mod snapshot;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use async_trait::async_trait;
use crossbeam_channel::Sender;
use rusqlite::{Connection, ErrorCode};
use tokio::sync::oneshot;

use crate::audit::AuditSink;
use crate::crypto::keyring::KeyPurpose;
use crate::store::{BackupTaken, Capabilities, KeyState, OpenMode, Store, StoreError};

pub use backup::check_backup;
pub use schema::{APPLICATION_ID, schema_version};
pub use snapshot::{Cell, Snapshot};
use writer::{Job, ReadJob, WriteJob, WriteTx};

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        // A stored value that does not decode (an unknown key purpose or
        // state, a wrong type) is damage, not a request error.
        if matches!(error, rusqlite::Error::FromSqlConversionFailure(..) | rusqlite::Error::InvalidColumnType(..)) {
            return Self::Corrupt;
        }
        match error.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => Self::Full,
            Some(ErrorCode::ReadOnly) => Self::ReadOnly,
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Self::Busy,
            Some(ErrorCode::DatabaseCorrupt) => Self::Corrupt,
            Some(ErrorCode::NotADatabase) => Self::NotAVault,
            Some(ErrorCode::CannotOpen | ErrorCode::PermissionDenied) => Self::CannotOpen(error.to_string()),
            // A unique key another transaction took first.
            Some(ErrorCode::ConstraintViolation)
                if matches!(
                    error.sqlite_error().map(|e| e.extended_code),
                    Some(rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY | rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
                ) =>
            {
                Self::Conflict
            }
            _ => Self::Backend(error.to_string()),
        }
    }
}

/// Key purposes are stored by their stable names.
impl rusqlite::types::ToSql for KeyPurpose {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

impl rusqlite::types::FromSql for KeyPurpose {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        Self::parse(value.as_str()?).ok_or(rusqlite::types::FromSqlError::InvalidType)
    }
}

/// Key states are stored by their names.
impl rusqlite::types::ToSql for KeyState {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

impl rusqlite::types::FromSql for KeyState {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        Self::parse(value.as_str()?).ok_or(rusqlite::types::FromSqlError::InvalidType)
    }
}

/// Maps a filesystem error met while opening or creating the store.
fn io_error(error: &std::io::Error) -> StoreError {
    match error.kind() {
        std::io::ErrorKind::AlreadyExists => StoreError::AlreadyExists,
        std::io::ErrorKind::PermissionDenied => StoreError::CannotOpen("permission denied".into()),
        std::io::ErrorKind::ReadOnlyFilesystem => StoreError::ReadOnly,
        std::io::ErrorKind::StorageFull => StoreError::Full,
        _ => StoreError::CannotOpen(error.to_string()),
    }
}

/// Tuning for [`SqliteStore::open`].
#[derive(Clone)]
pub struct Options {
    /// Read connections (threads) in the pool.
    pub read_connections: usize,
    /// Most write requests per transaction.
    pub max_group_commit: usize,
    /// Audit token-index entries sorted into one block of the searchable
    /// index at a time.
    pub audit_index_block: usize,
    /// Where committed audit records are also written.
    pub sink: Option<Arc<AuditSink>>,
}

/// Handle to the store's writer and reader threads.
pub struct SqliteStore {
    path: PathBuf,
    writer: Option<Sender<Box<WriteJob>>>,
    readers: Option<Sender<ReadJob>>,
    writer_thread: Option<JoinHandle<()>>,
    reader_threads: Vec<JoinHandle<()>>,
}

impl SqliteStore {
    /// Opens (or, with [`OpenMode::Create`], creates) the store at `path` and
    /// starts its threads.
    pub fn open(path: &Path, mode: OpenMode, options: Options) -> Result<Self, StoreError> {
        let writer_conn = schema::open_writer(path, mode)?;
        // The token index's backlog (a trail just migrated, or entries left
        // by a crash) is sorted into blocks now, before anything is served,
        // rather than by the first write.
        let block = options.audit_index_block.max(1);
        let started = std::time::Instant::now();
        let waiting = audit::build_index_blocks(&writer_conn, block);
        if started.elapsed() > std::time::Duration::from_secs(1) {
            tracing::info!(
                seconds = started.elapsed().as_secs(),
                waiting,
                "store: audit token index caught up with the trail"
            );
        }
        let mut readers = Vec::with_capacity(options.read_connections);
        for _ in 0..options.read_connections.max(1) {
            readers.push(schema::open_reader(path)?);
        }

        let (write_tx, write_rx) = crossbeam_channel::unbounded::<Box<WriteJob>>();
        let (read_tx, read_rx) = crossbeam_channel::unbounded::<ReadJob>();
        let mut store = Self {
            path: path.to_owned(),
            writer: Some(write_tx),
            readers: Some(read_tx),
            writer_thread: None,
            reader_threads: Vec::new(),
        };
        let max_batch = options.max_group_commit.max(1);
        let sink = options.sink;
        store.writer_thread = Some(spawn("piivault-writer", move || {
            writer::writer_loop(&writer_conn, &write_rx, max_batch, block, sink);
        })?);
        for (i, conn) in readers.into_iter().enumerate() {
            let rx = read_rx.clone();
            store.reader_threads.push(spawn(&format!("piivault-reader-{i}"), move || writer::reader_loop(&conn, &rx))?);
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
        let job = Box::new(Job::new(work, reply));
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

    /// Stops accepting work, lets queued requests finish, and waits for the
    /// threads to close their connections. Readers close first, so that the
    /// writer's connection is the last one and its close checkpoints the WAL
    /// into the database file.
    fn shutdown(&mut self) {
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

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities { backend: "sqlite", erases_without_residue: true, file_backup: true, shared: false }
    }

    async fn backup(&self) -> Result<(PathBuf, BackupTaken), StoreError> {
        let dest = backup::destination(&self.path)?;
        let to = dest.clone();
        match self.read(move |conn| backup::copy(conn, &to)).await {
            Ok(taken) => Ok((dest, taken)),
            Err(e) => {
                let _ = std::fs::remove_file(&dest);
                Err(e)
            }
        }
    }

    /// One process owns the file (the data directory's lock): every job is
    /// this process's.
    async fn hold_lease(&self, _job: &str) -> Result<bool, StoreError> {
        Ok(true)
    }

    async fn release_lease(&self, _job: &str) -> Result<(), StoreError> {
        Ok(())
    }

    async fn other_writers(&self) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }

    fn key_changes(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }

    async fn share_quota_use(
        &self,
        _used: Vec<crate::store::QuotaUse>,
        _since_minute: i64,
    ) -> Result<Vec<crate::store::QuotaUse>, StoreError> {
        Ok(Vec::new())
    }
}

fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, StoreError> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(body)
        .map_err(|e| StoreError::Backend(format!("cannot start store thread: {e}")))
}

fn join(thread: JoinHandle<()>) {
    if thread.join().is_err() {
        tracing::error!("a store thread panicked");
    }
}
