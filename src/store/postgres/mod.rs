//! The shared backend: one PostgreSQL database that several stateless
//! piivault nodes use at once.
//!
//! Each node has the same shape as the embedded backend:
//! - **one writer** thread owns the node's write connection and runs
//!   one transaction per batch of write requests (group commit: one
//!   commit round trip and one WAL flush for many requests), answering
//!   only once the commit returned. The writes that append (tokenizes
//!   without a blind index, reads' audit records) go in together with one
//!   statement; every other request runs in its own savepoint (see
//!   `append` and `writer`). The node's audit chain is sequential, so its
//!   writes serialize on it anyway; the batch is what makes that cheap.
//! - **readers**: a few threads, each with its own connection.
//!
//! Across nodes:
//! - every node writes its **own audit chain** (`[store] node` names it),
//!   held by a session advisory lock on the writer connection, so two
//!   processes never write one chain; a node that reconnects takes the
//!   lock again and rereads its head before it writes;
//! - deterministic tokens stay one per value: the blind index's primary
//!   key decides, and a node that loses the race answers the winner's
//!   record;
//! - sequence numbers come from `sequences` in blocks (one `UPDATE …
//!   RETURNING` per block), so nodes do not coordinate per request.
//!
//! The driver is `postgres`, the blocking face of `tokio-postgres` (same
//! project, same protocol code), on dedicated threads: the store's work is
//! closures over one transaction, as in the SQLite backend, and a
//! connection per thread keeps a batch on one session.
//!
//! PostgreSQL keeps old row versions until vacuum and writes them to its
//! WAL: erasure leaves residue (see SECURITY.md), and there is no online
//! file backup (`pg_dump` and base backups are the database's own).

mod append;
mod audit;
mod collections;
mod copy;
mod keys;
mod records;
mod schema;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use crossbeam_channel::Sender;
use tokio::sync::oneshot;
use zeroize::Zeroizing;

use crate::audit::AuditSink;
use crate::config::{PostgresSettings, SecretSource};
use crate::store::{BackupTaken, Capabilities, OpenMode, Store, StoreError, now_micros};

pub use copy::{Copied, copy_from_sqlite};
pub use schema::schema_version;
use writer::{Job, ReadJob, Work, WriteTx};

impl From<postgres::Error> for StoreError {
    fn from(error: postgres::Error) -> Self {
        use postgres::error::SqlState;
        if error.is_closed() {
            return Self::Unreachable;
        }
        let Some(code) = error.code() else {
            // No SQLSTATE: the connection failed, a column did not convert
            // (a damaged row), or a statement answered an unexpected number
            // of rows.
            let io = std::error::Error::source(&error).is_some_and(<dyn std::error::Error>::is::<std::io::Error>);
            return if io {
                Self::Unreachable
            } else if error.to_string().starts_with("error deserializing column") {
                Self::Corrupt
            } else {
                Self::Backend(error.to_string())
            };
        };
        match *code {
            SqlState::UNIQUE_VIOLATION => Self::Conflict,
            SqlState::DISK_FULL | SqlState::OUT_OF_MEMORY | SqlState::PROGRAM_LIMIT_EXCEEDED => Self::Full,
            SqlState::READ_ONLY_SQL_TRANSACTION => Self::ReadOnly,
            SqlState::LOCK_NOT_AVAILABLE
            | SqlState::T_R_DEADLOCK_DETECTED
            | SqlState::T_R_SERIALIZATION_FAILURE
            | SqlState::QUERY_CANCELED
            | SqlState::TOO_MANY_CONNECTIONS => Self::Busy,
            SqlState::DATA_CORRUPTED | SqlState::INDEX_CORRUPTED => Self::Corrupt,
            SqlState::ADMIN_SHUTDOWN
            | SqlState::CRASH_SHUTDOWN
            | SqlState::CANNOT_CONNECT_NOW
            | SqlState::CONNECTION_FAILURE
            | SqlState::CONNECTION_EXCEPTION => Self::Unreachable,
            SqlState::INVALID_PASSWORD | SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
                Self::CannotOpen("the database refused this node's credentials".into())
            }
            SqlState::INVALID_CATALOG_NAME => Self::Missing,
            // The database's own message names the condition (a constraint,
            // a type); it never carries a parameter's value.
            _ => Self::Backend(format!("{}: {}", code.code(), error.as_db_error().map_or("", |e| e.message()))),
        }
    }
}

/// How this node reaches the database: the parsed URL with the password
/// set, and TLS if a CA is configured.
#[derive(Clone)]
struct Connector {
    config: postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl Connector {
    fn new(settings: &PostgresSettings) -> Result<Self, StoreError> {
        let mut config: postgres::Config =
            settings.url.parse().map_err(|_| StoreError::CannotOpen("store.url is not a PostgreSQL URL".into()))?;
        if let Some(source) = &settings.password {
            let password = read_password(source)?;
            config.password(password.as_bytes());
        }
        config
            .application_name(&format!("piivault {}", settings.node))
            .connect_timeout(Duration::from_secs(5))
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .tcp_user_timeout(Duration::from_secs(30))
            // A write waits for another node's uncommitted blind-index
            // entry at most this long; a transaction left open by a stuck
            // node is ended by the server.
            .options("-c lock_timeout=10s -c idle_in_transaction_session_timeout=60s");
        let tls = match &settings.ca_file {
            None => None,
            Some(ca) => {
                config.ssl_mode(postgres::config::SslMode::Require);
                Some(tls_to(ca)?)
            }
        };
        Ok(Self { config, tls })
    }

    /// The writer's and the readers': their statements are planned once per
    /// connection. Each finds or changes its rows by key, so the generic
    /// plan is the plan, and planning it again at every execution
    /// (PostgreSQL's custom plans, which it keeps choosing for array
    /// parameters) was a third of the server's CPU per single-value
    /// tokenize, and a quarter per single-token detokenize. The reads whose
    /// best plan depends on the values asked (the audit query with its
    /// optional filters, the paging of pending work) are planned for them
    /// ([`Db::planned_for_values`]).
    fn generic_plans(&self) -> Self {
        let mut writer = self.clone();
        let options = format!("{} -c plan_cache_mode=force_generic_plan", self.config.get_options().unwrap_or(""));
        writer.config.options(&options);
        writer
    }

    fn connect(&self) -> Result<postgres::Client, StoreError> {
        let connected = match &self.tls {
            Some(tls) => self.config.connect(tls.clone()),
            None => self.config.connect(postgres::NoTls),
        };
        connected.map_err(|e| {
            let error = StoreError::from(e);
            tracing::warn!(error = %error, "store: cannot connect to the database");
            error
        })
    }
}

/// TLS to the database server: its certificate must chain to `ca` and
/// name the host of the URL.
fn tls_to(ca: &Path) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    use rustls::pki_types::pem::PemObject as _;
    let pem = std::fs::read(ca).map_err(|e| StoreError::CannotOpen(format!("store.ca_file: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|_| StoreError::CannotOpen("store.ca_file is not PEM certificates".into()))?;
        roots.add(cert).map_err(|_| StoreError::CannotOpen("store.ca_file holds an unusable certificate".into()))?;
    }
    if roots.is_empty() {
        return Err(StoreError::CannotOpen("store.ca_file holds no certificate".into()));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::CannotOpen(format!("TLS to the database: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// The database password from its file (owner-only) or variable.
fn read_password(source: &SecretSource) -> Result<Zeroizing<String>, StoreError> {
    use std::io::Read as _;
    use std::os::unix::fs::PermissionsExt as _;
    match source {
        SecretSource::File(path) => {
            let unreadable = |e: std::io::Error| {
                StoreError::CannotOpen(format!("cannot read the database password file {}: {e}", path.display()))
            };
            let mut file = std::fs::File::open(path).map_err(unreadable)?;
            let mode = file.metadata().map_err(unreadable)?.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(StoreError::CannotOpen(format!(
                    "the database password file {} may be read by group or others (mode {:o}); chmod 600 it",
                    path.display(),
                    mode & 0o777
                )));
            }
            let mut text = Zeroizing::new(String::new());
            file.read_to_string(&mut text).map_err(unreadable)?;
            let trimmed = Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_owned());
            Ok(trimmed)
        }
        SecretSource::Env(var) => crate::secret_env::env_secret(var)
            .ok_or_else(|| StoreError::CannotOpen(format!("the database password variable ${var} is not set"))),
    }
}

/// How long quota use is kept for windows longer than the reading node's
/// (35 days): a quota window longer than this counts other nodes' use of
/// the last 35 days only.
const QUOTA_USE_KEPT_MINUTES: i64 = 35 * 24 * 60;

/// Tuning for [`PostgresStore::open`].
#[derive(Clone)]
pub struct Options {
    /// Read connections (threads).
    pub read_connections: usize,
    /// Most write requests per transaction.
    pub max_group_commit: usize,
    /// Audit token-index entries sorted into one block of the searchable
    /// index (built off the write path, on a connection of its own).
    pub audit_index_block: usize,
    /// Where committed audit records are also written.
    pub sink: Option<Arc<AuditSink>>,
}

/// Handle to this node's writer and reader threads.
pub struct PostgresStore {
    writer: Option<Sender<Work>>,
    readers: Option<Sender<ReadJob>>,
    threads: Vec<JoinHandle<()>>,
    chain: String,
    /// Woken by the listener thread when the keys may have changed.
    key_changes: Arc<tokio::sync::Notify>,
    /// Tells the listener thread to stop.
    stopping: Arc<AtomicBool>,
}

impl PostgresStore {
    /// Connects, migrates the schema (or, with [`OpenMode::Create`], creates
    /// it in an empty database) and starts the threads. The node's audit
    /// chain is taken before the first record it appends: a process that
    /// only reads (an offline `audit verify` beside the running node) never
    /// takes it, and a second process with a running node's name fails its
    /// first audited write with [`StoreError::ChainHeld`].
    pub fn open(settings: &PostgresSettings, mode: OpenMode, options: Options) -> Result<Self, StoreError> {
        let connector = Connector::new(settings)?;
        let chain = settings.node.clone();
        // The blocking client runs a runtime of its own, which cannot start
        // on a thread of the caller's: the first connection is made on a
        // thread of its own too.
        let writer_connector = connector.generic_plans();
        let conn = {
            let connector = writer_connector.clone();
            std::thread::spawn(move || -> Result<postgres::Client, StoreError> {
                let mut conn = connector.connect()?;
                schema::migrate(&mut conn, mode)?;
                Ok(conn)
            })
            .join()
            .map_err(|_| StoreError::Backend("the store's opening thread panicked".into()))??
        };
        let (write_tx, write_rx) = crossbeam_channel::unbounded::<Work>();
        let (read_tx, read_rx) = crossbeam_channel::unbounded::<ReadJob>();
        let mut store = Self {
            writer: Some(write_tx),
            readers: Some(read_tx),
            threads: Vec::new(),
            chain: chain.clone(),
            key_changes: Arc::new(tokio::sync::Notify::new()),
            stopping: Arc::default(),
        };
        let max_batch = options.max_group_commit.max(1);
        let sink = options.sink;
        let writes = Arc::new(writer::ChainWrites::default());
        let (writer_chain, writer_writes) = (chain.clone(), writes.clone());
        store.threads.push(spawn("piivault-pg-writer", move || {
            writer::writer_loop(conn, &writer_connector, writer_chain, &write_rx, max_batch, sink, writer_writes);
        })?);
        let (indexer_connector, stopping, block) =
            (connector.clone(), store.stopping.clone(), options.audit_index_block);
        store.threads.push(spawn("piivault-pg-indexer", move || {
            audit::indexer_loop(&indexer_connector, &chain, block, &writes, &stopping);
        })?);
        let (listener_connector, changed, stopping) =
            (connector.clone(), store.key_changes.clone(), store.stopping.clone());
        store.threads.push(spawn("piivault-pg-listener", move || {
            writer::listener_loop(&listener_connector, &changed, &stopping);
        })?);
        for i in 0..options.read_connections.max(1) {
            let rx = read_rx.clone();
            let connector = connector.generic_plans();
            store.threads.push(spawn(&format!("piivault-pg-reader-{i}"), move || {
                writer::reader_loop(&connector, &rx);
            })?);
        }
        Ok(store)
    }

    /// Runs `work` on the writer inside the next group-commit transaction and
    /// answers once that transaction committed.
    async fn write<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut WriteTx<'_, '_>) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Box::new(Job::new(work, reply));
        self.send(Work::Job(job), answer).await
    }

    /// Hands a write that appends to the writer (see [`append`]) and answers
    /// once its transaction committed.
    async fn append<T>(
        &self,
        (append, answer): (append::Append, oneshot::Receiver<Result<T, StoreError>>),
    ) -> Result<T, StoreError> {
        self.send(Work::Append(Box::new(append)), answer).await
    }

    async fn send<T>(&self, work: Work, answer: oneshot::Receiver<Result<T, StoreError>>) -> Result<T, StoreError> {
        self.writer.as_ref().ok_or(StoreError::Closed)?.send(work).map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `work` on a reader connection, each statement in autocommit (the
    /// reads' statements need no common snapshot: a record found is read
    /// whole by one statement, and audit rows never change); again, on a new
    /// connection, if the one it ran on was found lost.
    async fn read<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&mut Db<'_, '_>) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let mut reply = Some(reply);
        let mut work = work;
        let job: ReadJob = Box::new(move |client, may_retry| {
            let result =
                client.and_then(|(client, statements)| work(&mut Db { session: Session::Auto(client), statements }));
            if may_retry && matches!(result, Err(StoreError::Unreachable)) {
                return false;
            }
            if let Some(reply) = reply.take() {
                let _ = reply.send(result);
            }
            true
        });
        self.readers.as_ref().ok_or(StoreError::Closed)?.send(job).map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.readers = None;
        self.writer = None;
        self.stopping.store(true, Ordering::Relaxed);
        for thread in std::mem::take(&mut self.threads) {
            if thread.join().is_err() {
                tracing::error!("a store thread panicked");
            }
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities { backend: "postgres", erases_without_residue: false, file_backup: false, shared: true }
    }

    async fn backup(&self) -> Result<(PathBuf, BackupTaken), StoreError> {
        tracing::debug!(chain = %self.chain, "store: a file backup was asked of the postgres backend");
        Err(StoreError::Unsupported("copy a PostgreSQL database into a file (use pg_dump or a base backup)"))
    }

    /// A session advisory lock on the writer connection: it ends with the
    /// session, so a node that dies or loses the database gives its jobs
    /// up at once.
    async fn hold_lease(&self, job: &str) -> Result<bool, StoreError> {
        let job = job.to_owned();
        self.write(move |w| w.leases.hold(&mut w.tx, job)).await
    }

    async fn release_lease(&self, job: &str) -> Result<(), StoreError> {
        let job = job.to_owned();
        self.write(move |w| w.leases.release(&mut w.tx, &job)).await
    }

    /// One write job: this node's use added (a row per caller, kind and
    /// minute), the old minutes dropped, the others' summed.
    async fn share_quota_use(
        &self,
        used: Vec<crate::store::QuotaUse>,
        since_minute: i64,
    ) -> Result<Vec<crate::store::QuotaUse>, StoreError> {
        let node = self.chain.clone();
        self.write(move |w| {
            let (mut callers, mut kinds, mut minutes, mut counts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for u in used {
                callers.push(u.caller);
                kinds.push(u.kind);
                minutes.push(u.minute);
                counts.push(sql_i64(u.used)?);
            }
            if !callers.is_empty() {
                w.tx.execute(
                    "INSERT INTO quota_use (caller, kind, minute, node, used)
                     SELECT u.caller, u.kind, u.minute, $5, u.used
                     FROM unnest($1::text[], $2::smallint[], $3::bigint[], $4::bigint[]) AS u(caller, kind, minute, used)
                     ON CONFLICT (caller, kind, minute, node) DO UPDATE SET used = quota_use.used + EXCLUDED.used",
                    &[&callers, &kinds, &minutes, &counts, &node],
                )?;
            }
            // What no node's window can still need (each node reads from
            // its own longest window on).
            let forget = since_minute.min(now_micros() / 60_000_000 - QUOTA_USE_KEPT_MINUTES);
            w.tx.execute("DELETE FROM quota_use WHERE minute < $1", &[&forget])?;
            let rows = w.tx.query(
                "SELECT caller, kind, minute, sum(used)::bigint FROM quota_use
                 WHERE node <> $1 AND minute >= $2 GROUP BY caller, kind, minute",
                &[&node, &since_minute],
            )?;
            rows.iter()
                .map(|row| {
                    Ok(crate::store::QuotaUse {
                        caller: row.try_get(0)?,
                        kind: row.try_get(1)?,
                        minute: row.try_get(2)?,
                        used: stored_u64(row.try_get(3)?)?,
                    })
                })
                .collect()
        })
        .await
    }

    fn key_changes(&self) -> Option<Arc<tokio::sync::Notify>> {
        Some(self.key_changes.clone())
    }

    /// Asked on the writer connection, so that this process's own chain
    /// (held by that session) does not count.
    async fn other_writers(&self) -> Result<Vec<String>, StoreError> {
        self.write(|w| writer::held_chains(&mut w.tx)).await
    }
}

fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, StoreError> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(body)
        .map_err(|e| StoreError::Backend(format!("cannot start store thread: {e}")))
}

/// Statements prepared on one connection, by their text: each is parsed
/// and planned once per connection, then runs in one round trip.
#[derive(Default)]
pub(super) struct Statements(std::collections::HashMap<&'static str, postgres::Statement>);

/// Where SQL runs: a write batch's transaction (or a job's savepoint of
/// it), or a reader's connection in autocommit (each statement its own
/// snapshot: a lookup is one round trip, with no BEGIN and COMMIT around
/// it).
pub(super) enum Session<'a, 't> {
    Tx(&'a mut postgres::Transaction<'t>),
    Auto(&'a mut postgres::Client),
}

/// A session and its connection's prepared statements: what the store's
/// work runs its SQL through.
pub(super) struct Db<'a, 't> {
    pub(super) session: Session<'a, 't>,
    pub(super) statements: &'a mut Statements,
}

type Params<'p> = [&'p (dyn postgres::types::ToSql + Sync)];

impl Db<'_, '_> {
    fn statement(&mut self, sql: &'static str) -> Result<postgres::Statement, postgres::Error> {
        if let Some(statement) = self.statements.0.get(sql) {
            return Ok(statement.clone());
        }
        let statement = match &mut self.session {
            Session::Tx(tx) => tx.prepare(sql)?,
            Session::Auto(client) => client.prepare(sql)?,
        };
        self.statements.0.insert(sql, statement.clone());
        Ok(statement)
    }

    fn execute(&mut self, sql: &'static str, params: &Params<'_>) -> Result<u64, postgres::Error> {
        let statement = self.statement(sql)?;
        match &mut self.session {
            Session::Tx(tx) => tx.execute(&statement, params),
            Session::Auto(client) => client.execute(&statement, params),
        }
    }

    fn query(&mut self, sql: &'static str, params: &Params<'_>) -> Result<Vec<postgres::Row>, postgres::Error> {
        let statement = self.statement(sql)?;
        match &mut self.session {
            Session::Tx(tx) => tx.query(&statement, params),
            Session::Auto(client) => client.query(&statement, params),
        }
    }

    fn query_opt(&mut self, sql: &'static str, params: &Params<'_>) -> Result<Option<postgres::Row>, postgres::Error> {
        let statement = self.statement(sql)?;
        match &mut self.session {
            Session::Tx(tx) => tx.query_opt(&statement, params),
            Session::Auto(client) => client.query_opt(&statement, params),
        }
    }

    /// Runs `work` with this session planning each statement for the
    /// values it is given (the session's default is the generic plan, see
    /// [`Connector::generic_plans`]), then back to its default.
    fn planned_for_values<T>(
        &mut self,
        work: impl FnOnce(&mut Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.batch_execute("SET plan_cache_mode = auto")?;
        let result = work(self);
        let reset = self.batch_execute("RESET plan_cache_mode");
        let value = result?;
        reset?;
        Ok(value)
    }

    fn batch_execute(&mut self, sql: &str) -> Result<(), postgres::Error> {
        match &mut self.session {
            Session::Tx(tx) => tx.batch_execute(sql),
            Session::Auto(client) => client.batch_execute(sql),
        }
    }

    fn query_one(&mut self, sql: &'static str, params: &Params<'_>) -> Result<postgres::Row, postgres::Error> {
        let statement = self.statement(sql)?;
        match &mut self.session {
            Session::Tx(tx) => tx.query_one(&statement, params),
            Session::Auto(client) => client.query_one(&statement, params),
        }
    }
}

/// A sequence number or count as PostgreSQL stores it (`BIGINT`).
fn sql_i64(n: u64) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::Unsupported("store a number above 2^63"))
}

/// A stored `BIGINT` that must be non-negative.
fn stored_u64(n: i64) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Corrupt)
}

/// A stored `BIGINT` version number.
fn stored_u32(n: i64) -> Result<u32, StoreError> {
    u32::try_from(n).map_err(|_| StoreError::Corrupt)
}
