//! The node's group commit: one writer connection that holds the node's
//! audit chain, one transaction per batch (the writes that append joined
//! into one statement, every other request in its own savepoint), one
//! commit, then every answer; and the reader connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crossbeam_channel::Receiver;
use sha2::Digest as _;

use super::append::Append;
use super::{Connector, Db, Session, Statements};
use crate::audit::{AuditKey, AuditSink, Head};
use crate::store::chain::{ChainTail, Mark};
use crate::store::{StoreError, now_micros};

/// A read request: runs on a reader connection, or is told why there is
/// none. With `may_retry`, a read that found the connection lost answers
/// nothing and returns `false`, to be run again on a new connection (reads
/// change nothing); otherwise it answers and returns `true`.
pub(super) type ReadJob =
    Box<dyn FnMut(Result<(&mut postgres::Client, &mut Statements), StoreError>, bool) -> bool + Send>;

/// This node's audit chain as the writer sees it: its name, the key, the
/// head as committed, and the head including records written in the open
/// transaction.
pub(super) struct AuditCursor {
    pub(super) chain: String,
    pub(super) key: Option<AuditKey>,
    /// The chain's heads and the records of the open transaction.
    pub(super) tail: ChainTail,
    /// Whether this connection's session holds the chain (taken before the
    /// first record it appends: a node that only reads, such as an offline
    /// `audit verify` beside the running node, never takes it).
    pub(super) held: bool,
    /// The head read when the chain was taken in the open batch: the
    /// database's, whatever this node thought before.
    pub(super) taken_at: Option<Head>,
    /// What the indexer goes by.
    pub(super) writes: Arc<ChainWrites>,
}

/// What the writer tells the indexer (see `audit::indexer_loop`).
#[derive(Default)]
pub(super) struct ChainWrites {
    /// Audit index entries this process wrote (some may have been rolled
    /// back): the indexer builds blocks when enough have come.
    pub(super) entries: AtomicU64,
    /// Whether this process took its chain: a process that never writes
    /// to it (an offline `audit verify` beside the running node) builds
    /// nothing.
    pub(super) taken: AtomicBool,
}

impl AuditCursor {
    /// Takes the chain for this session if it does not hold it yet, and
    /// rereads its head (another process may have written it meanwhile).
    pub(super) fn hold(&mut self, tx: &mut Db<'_, '_>) -> Result<(), StoreError> {
        if self.held {
            return Ok(());
        }
        take_chain(tx, &self.chain)?;
        let head = super::audit::last_head(tx, &self.chain)?;
        self.tail.restart_at(head);
        self.taken_at = Some(head);
        self.held = true;
        self.writes.taken.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// `n` index entries were written in the open transaction.
    pub(super) fn entries_written(&self, n: usize) {
        self.writes.entries.fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// Where a job began on the audit chain: see [`AuditCursor::job_failed`].
#[derive(Clone, Copy)]
pub(super) struct JobStart {
    mark: Mark,
    held: bool,
}

impl AuditCursor {
    /// The batch's transaction ended: committed or rolled back.
    fn ended(&mut self, committed: bool) {
        self.tail.ended(committed);
        if !committed {
            // A chain registered in this batch is not registered now.
            self.held &= self.taken_at.is_none();
        }
        self.taken_at = None;
    }

    pub(super) fn before_job(&self) -> JobStart {
        JobStart { mark: self.tail.mark(), held: self.held }
    }

    /// Forgets the records of a job whose savepoint was rolled back.
    pub(super) fn job_failed(&mut self, before: JobStart) {
        self.tail.undo(before.mark);
        // The chain was taken by this job and its head reread: that head
        // stands. Its row in `audit_chains` may have gone with the job: it
        // is registered again before the next record.
        if let Some(head) = self.taken_at
            && self.held
            && !before.held
        {
            self.tail.restart_at(head);
            self.held = false;
        }
    }
}

/// The background-job leases this connection's session holds (session
/// advisory locks: a rollback keeps them, the end of the session ends
/// them).
#[derive(Default)]
pub(super) struct Leases(std::collections::HashSet<String>);

impl Leases {
    /// Takes the lease of `job` unless this session holds it already:
    /// whether it holds it now.
    pub(super) fn hold(&mut self, tx: &mut Db<'_, '_>, job: String) -> Result<bool, StoreError> {
        if self.0.contains(&job) {
            return Ok(true);
        }
        let taken: bool = tx.query_one("SELECT pg_try_advisory_lock($1)", &[&lock_key(b"job", &job)])?.try_get(0)?;
        if taken {
            self.0.insert(job);
        }
        Ok(taken)
    }

    /// Gives the lease of `job` up, if this session holds it.
    pub(super) fn release(&mut self, tx: &mut Db<'_, '_>, job: &str) -> Result<(), StoreError> {
        if self.0.remove(job) {
            tx.query_one("SELECT pg_advisory_unlock($1)", &[&lock_key(b"job", job)])?;
        }
        Ok(())
    }
}

/// What a write job works with: the transaction (a savepoint of the
/// batch's), the audit chain and the session's leases.
pub(super) struct WriteTx<'a, 't> {
    pub(super) tx: Db<'a, 't>,
    pub(super) audit: &'a mut AuditCursor,
    pub(super) leases: &'a mut Leases,
    /// Records this job sealed, for the batch to count once before it
    /// commits (see [`count_batch`]).
    pub(super) sealed: SealedCounts,
}

/// Records sealed, by collection and key version.
pub(super) type SealedCounts = std::collections::BTreeMap<i64, std::collections::BTreeMap<u32, i64>>;

/// A request for the writer: see [`crate::store::job`].
pub(super) type WriteJob = dyn for<'a, 't> crate::store::job::WriteJob<WriteTx<'a, 't>>;
pub(super) use crate::store::job::Job;

/// What the writer is sent: a job, or a write that appends, which a group
/// commit joins with others (see [`super::append`]).
pub(super) enum Work {
    Job(Box<WriteJob>),
    Append(Box<Append>),
}

impl Work {
    /// The work as a job of its own.
    fn into_job(self) -> Box<WriteJob> {
        match self {
            Self::Job(job) => job,
            Self::Append(append) => append,
        }
    }
}

/// The advisory-lock key of `name` of a `kind` (an audit chain, a
/// background job): the first 8 bytes of a hash, so that names of any
/// length and other applications' keys do not collide.
pub(super) fn lock_key(kind: &[u8], name: &str) -> i64 {
    let digest = sha2::Sha256::new()
        .chain_update(b"piivault ")
        .chain_update(kind)
        .chain_update(b"\0")
        .chain_update(name.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

/// Registers audit chain `chain` and takes it for this connection's
/// session: refused while another session holds it.
fn take_chain(conn: &mut Db<'_, '_>, chain: &str) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO audit_chains (chain, created_at) VALUES ($1, $2) ON CONFLICT (chain) DO NOTHING",
        &[&chain, &now_micros()],
    )?;
    let taken: bool =
        conn.query_one("SELECT pg_try_advisory_lock($1)", &[&lock_key(b"audit chain", chain)])?.try_get(0)?;
    if taken { Ok(()) } else { Err(StoreError::ChainHeld) }
}

/// The audit chains that a session other than this one holds: the nodes
/// running now. An advisory lock's 64-bit key shows in `pg_locks` as its
/// high and low halves (`classid`, `objid`).
pub(super) fn held_chains(conn: &mut Db<'_, '_>) -> Result<Vec<String>, StoreError> {
    let mut held = Vec::new();
    for row in conn.query("SELECT chain FROM audit_chains ORDER BY chain", &[])? {
        let chain: String = row.try_get(0)?;
        let key = lock_key(b"audit chain", &chain).to_be_bytes();
        let high = i64::from(u32::from_be_bytes([key[0], key[1], key[2], key[3]]));
        let low = i64::from(u32::from_be_bytes([key[4], key[5], key[6], key[7]]));
        let taken: bool = conn
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_locks
                  WHERE locktype = 'advisory' AND granted AND objsubid = 1 AND pid <> pg_backend_pid()
                    AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                    AND classid::bigint = $1 AND objid::bigint = $2)",
                &[&high, &low],
            )?
            .try_get(0)?;
        if taken {
            held.push(chain);
        }
    }
    Ok(held)
}

/// How long the listener waits for a notification before it looks at
/// whether the store is stopping.
const LISTEN_TICK: std::time::Duration = std::time::Duration::from_millis(250);

/// The notification channel of key changes (see `0003_key_notify.sql`).
pub(super) const KEY_CHANNEL: &str = "piivault_keys";

/// Listens for key changes on a connection of its own and wakes `changed`
/// for each, and after each (re)connection (a change may have come while
/// it was away), until `stopping`.
pub(super) fn listener_loop(connector: &Connector, changed: &tokio::sync::Notify, stopping: &AtomicBool) {
    use postgres::fallible_iterator::FallibleIterator as _;
    let mut client: Option<postgres::Client> = None;
    while !stopping.load(Ordering::Relaxed) {
        if client.as_ref().is_none_or(postgres::Client::is_closed) {
            client = connector
                .connect()
                .and_then(|mut c| {
                    c.batch_execute(&format!("LISTEN {KEY_CHANNEL}"))?;
                    Ok(c)
                })
                .ok();
            if client.is_none() {
                std::thread::sleep(LISTEN_TICK * 4);
                continue;
            }
            changed.notify_one();
        }
        let Some(conn) = client.as_mut() else { continue };
        let heard = {
            let mut notifications = conn.notifications();
            let heard = notifications.timeout_iter(LISTEN_TICK).next();
            // One wake for however many came together.
            if matches!(heard, Ok(Some(_))) {
                while let Ok(Some(_)) = notifications.iter().next() {}
            }
            heard
        };
        match heard {
            Ok(Some(_)) => changed.notify_one(),
            Ok(None) => {}
            Err(_) => client = None,
        }
    }
}

/// Serves reads on a connection of its own, made when the first read comes
/// and again after it was lost. A connection idle since the server went
/// away (a restart, a failover) is found lost only by the read that uses
/// it: that read runs again on a new connection, so a caller never sees
/// the old server's end.
pub(super) fn reader_loop(connector: &Connector, jobs: &Receiver<ReadJob>) {
    // A reader never writes: its session refuses to.
    let connect = || {
        connector
            .connect()
            .and_then(|mut c| {
                c.batch_execute("SET default_transaction_read_only = on")?;
                Ok(c)
            })
            .ok()
            .map(|c| (c, Statements::default()))
    };
    let mut client: Option<(postgres::Client, Statements)> = None;
    while let Ok(mut job) = jobs.recv() {
        let mut fresh = false;
        if client.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            client = connect();
            fresh = true;
        }
        let answered = match client.as_mut() {
            Some((conn, statements)) => job(Ok((conn, statements)), !fresh),
            None => job(Err(StoreError::Unreachable), false),
        };
        if !answered {
            client = connect();
            match client.as_mut() {
                Some((conn, statements)) => job(Ok((conn, statements)), false),
                None => job(Err(StoreError::Unreachable), false),
            };
        }
    }
}

pub(super) fn writer_loop(
    conn: postgres::Client,
    connector: &Connector,
    chain: String,
    jobs: &Receiver<Work>,
    max_batch: usize,
    sink: Option<Arc<AuditSink>>,
    writes: Arc<ChainWrites>,
) {
    let mut audit = AuditCursor { chain, key: None, tail: ChainTail::new(sink), held: false, taken_at: None, writes };
    let mut client = Some(conn);
    let mut statements = Statements::default();
    let mut leases = Leases::default();
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if client.as_ref().is_none_or(postgres::Client::is_closed) {
            client = None;
            // The new session holds nothing: the chain is taken again, and
            // its head reread, before the next record.
            audit.held = false;
            leases = Leases::default();
            match connector.connect() {
                Ok(conn) => {
                    tracing::info!(chain = %audit.chain, "store: the writer reconnected to the database");
                    client = Some(conn);
                    statements = Statements::default();
                }
                Err(error) => {
                    for work in batch {
                        work.into_job().finish(Err(error.clone()));
                    }
                    continue;
                }
            }
        }
        if let Some(conn) = client.as_mut()
            && !commit_batch(conn, &mut statements, &mut audit, &mut leases, batch)
        {
            // The commit's outcome is unknown: the head is reread from the
            // database by the next connection.
            client = None;
        }
    }
}

/// One group commit. Two or more writes that append go in first, with one
/// statement (see [`super::append`]); every other job runs in its own
/// savepoint (a batch of one runs in the transaction itself); one commit,
/// then every answer. If the joined statement is refused, the transaction
/// is rolled back and the batch runs again job by job. Returns `false` when
/// the connection can no longer be trusted (lost, or a commit whose outcome
/// is unknown).
fn commit_batch(
    conn: &mut postgres::Client,
    statements: &mut Statements,
    audit: &mut AuditCursor,
    leases: &mut Leases,
    batch: Vec<Work>,
) -> bool {
    #[allow(clippy::cast_precision_loss)] // batch sizes are small
    crate::metrics::metrics().commit_batch.observe(batch.len() as f64);
    let joinable = batch.iter().filter(|work| matches!(work, Work::Append(_))).count();
    let mut split = Batch { joined: Vec::with_capacity(joinable), jobs: Vec::with_capacity(batch.len() - joinable) };
    for work in batch {
        match work {
            Work::Append(append) if joinable >= 2 => split.joined.push(*append),
            work => split.jobs.push(work.into_job()),
        }
    }
    match commit_jobs(conn, statements, audit, leases, split) {
        Ok(trusted) => trusted,
        Err(refused) => {
            let jobs = Batch { joined: Vec::new(), jobs: refused.into_jobs().collect() };
            commit_jobs(conn, statements, audit, leases, jobs).unwrap_or(false)
        }
    }
}

/// A group commit's requests: the writes joined into one statement (two
/// or more, or none) and the jobs that run one by one.
struct Batch {
    joined: Vec<Append>,
    jobs: Vec<Box<WriteJob>>,
}

impl Batch {
    /// Every request as a job of its own.
    fn into_jobs(self) -> impl Iterator<Item = Box<WriteJob>> {
        self.joined.into_iter().map(|append| Box::new(append) as Box<WriteJob>).chain(self.jobs)
    }
}

/// One group commit of `batch`: its joined writes first, in one statement,
/// then each of its jobs in its own savepoint (one round trip per job: the
/// one that ends the previous job's also begins the next, and the commit
/// ends the last). A job's own failure rolls back only that job. If the
/// transaction as a whole fails, every request fails and nothing is
/// written. If the joined statement did not write every one of its writes,
/// the transaction is rolled back and the batch handed back, none of it
/// run.
fn commit_jobs(
    conn: &mut postgres::Client,
    statements: &mut Statements,
    audit: &mut AuditCursor,
    leases: &mut Leases,
    batch: Batch,
) -> Result<bool, Batch> {
    let mut tx = match conn.transaction() {
        Ok(tx) => tx,
        Err(e) => {
            let error = StoreError::from(e);
            tracing::error!(error = %error, "store: cannot begin a write transaction");
            for job in batch.into_jobs() {
                job.finish(Err(error.clone()));
            }
            return Ok(!matches!(error, StoreError::Unreachable));
        }
    };
    let Batch { mut joined, jobs: batch } = batch;
    let mut sealed = SealedCounts::new();
    if !joined.is_empty() {
        let mut write = WriteTx {
            tx: Db { session: Session::Tx(&mut tx), statements: &mut *statements },
            audit: &mut *audit,
            leases: &mut *leases,
            sealed: SealedCounts::new(),
        };
        if let Err(error) = super::append::write_joined(&mut write, &mut joined) {
            tracing::debug!(error = %error, writes = joined.len(), "store: joined writes refused; each runs alone");
            crate::metrics::metrics().joined_writes_refused.inc();
            let _ = tx.rollback();
            audit.ended(false);
            return Err(Batch { joined, jobs: batch });
        }
        sealed = write.sealed;
    }
    let alone = joined.is_empty() && batch.len() == 1;
    let mut outcomes: Vec<(Box<WriteJob>, Result<(), StoreError>)> = Vec::with_capacity(batch.len());
    let mut aborted: Option<StoreError> = None;
    // Whether the job before this one succeeded: its savepoint is ended,
    // and this job's begun, in one round trip.
    let mut previous: Option<bool> = None;
    for mut job in batch {
        if aborted.is_some() {
            outcomes.push((job, Err(StoreError::Closed)));
            continue;
        }
        if !alone && let Err(e) = tx.batch_execute(next_savepoint(previous)) {
            let error = StoreError::from(e);
            aborted = Some(error.clone());
            outcomes.push((job, Err(error)));
            continue;
        }
        let before = audit.before_job();
        let mut write = WriteTx {
            tx: Db { session: Session::Tx(&mut tx), statements: &mut *statements },
            audit: &mut *audit,
            leases: &mut *leases,
            sealed: SealedCounts::new(),
        };
        let result = job.apply(&mut write);
        if result.is_ok() {
            add_counts(&mut sealed, write.sealed);
        } else {
            audit.job_failed(before);
        }
        previous = Some(result.is_ok());
        if alone && let Err(error) = &result {
            aborted = Some(error.clone());
        }
        outcomes.push((job, result));
    }
    // The last job's savepoint ends with the commit; a failed last job is
    // rolled back first.
    if aborted.is_none()
        && !alone
        && previous == Some(false)
        && let Err(e) = tx.batch_execute("ROLLBACK TO SAVEPOINT job")
    {
        aborted = Some(e.into());
    }
    if aborted.is_none()
        && let Err(error) =
            count_batch(&mut Db { session: Session::Tx(&mut tx), statements: &mut *statements }, &audit.chain, &sealed)
    {
        aborted = Some(error);
    }
    let committed = match aborted {
        Some(error) => {
            let _ = tx.rollback();
            Err(error)
        }
        None => tx.commit().map_err(StoreError::from),
    };
    let trusted = !matches!(committed, Err(StoreError::Unreachable)) && !conn.is_closed();
    audit.ended(committed.is_ok());
    if let Err(error) = &committed
        && !alone
    {
        tracing::error!(error = %error, jobs = outcomes.len() + joined.len(), "store: write transaction failed; nothing written");
    }
    for append in joined {
        crate::store::job::WriteJob::finish(Box::new(append), crate::store::job::outcome(&committed, Ok(())));
    }
    for (job, own) in outcomes {
        job.finish(crate::store::job::outcome(&committed, own));
    }
    Ok(trusted)
}

/// Adds what the batch's jobs sealed to their key versions' counters, one
/// statement per version, by collection and version on every node, just
/// before the commit. Each adds to this chain's own counter row and takes
/// a share lock on the version's row in `keys`: nodes sealing under one
/// version do not wait for each other, and a change of the version's
/// state waits for them (from here to their commit only). A version that a
/// job found in use but another node took out of use since (see
/// `COUNT_SEALED`) fails the batch with a conflict: nothing is written.
fn count_batch(tx: &mut Db<'_, '_>, chain: &str, sealed: &SealedCounts) -> Result<(), StoreError> {
    for (&collection, per_version) in sealed {
        super::records::count_sealed(tx, chain, crate::store::CollectionId(collection), per_version)?;
    }
    Ok(())
}

/// Adds a job's sealed counts to its batch's.
fn add_counts(batch: &mut SealedCounts, job: SealedCounts) {
    for (collection, per_version) in job {
        let counts = batch.entry(collection).or_default();
        for (version, n) in per_version {
            *counts.entry(version).or_default() += n;
        }
    }
}

/// What begins a job's savepoint in a group commit, ending the previous
/// job's (released if it succeeded, rolled back if it failed) in the same
/// round trip.
fn next_savepoint(previous: Option<bool>) -> &'static str {
    match previous {
        None => "SAVEPOINT job",
        Some(true) => "RELEASE SAVEPOINT job; SAVEPOINT job",
        Some(false) => "ROLLBACK TO SAVEPOINT job; RELEASE SAVEPOINT job; SAVEPOINT job",
    }
}
