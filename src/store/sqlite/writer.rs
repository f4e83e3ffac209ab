//! The group commit: one writer thread, every request in its own savepoint
//! of one transaction, one durable COMMIT, then every answer.

use std::sync::Arc;

use crossbeam_channel::Receiver;
use rusqlite::Connection;

use crate::audit::{AuditKey, AuditSink};
use crate::store::StoreError;
use crate::store::chain::ChainTail;

/// A read request: runs on a reader connection.
pub(super) type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

/// The audit chain as the writer sees it: the key, the head as committed,
/// and the head including records written in the open transaction.
pub(super) struct AuditCursor {
    pub(super) key: Option<AuditKey>,
    /// The chain's heads and the records of the open transaction.
    pub(super) tail: ChainTail,
    /// Token-index entries written since the last block of the searchable
    /// index (approximate: a heuristic for when to build the next).
    pub(super) unindexed: usize,
}

/// What a write job works with: the connection, inside the group-commit
/// transaction, and the audit chain.
pub(super) struct WriteTx<'a> {
    pub(super) conn: &'a Connection,
    pub(super) audit: &'a mut AuditCursor,
    /// Set by jobs that erase ciphertext: the WAL is checkpointed and
    /// truncated soon after, so no old page image keeps it.
    pub(super) erased: &'a mut bool,
}

/// A request for the writer: see [`crate::store::job`].
pub(super) type WriteJob = dyn for<'a> crate::store::job::WriteJob<WriteTx<'a>>;
pub(super) use crate::store::job::Job;

pub(super) fn reader_loop(conn: &Connection, jobs: &Receiver<ReadJob>) {
    while let Ok(job) = jobs.recv() {
        job(conn);
    }
}

pub(super) fn writer_loop(
    conn: &Connection,
    jobs: &Receiver<Box<WriteJob>>,
    max_batch: usize,
    block: usize,
    sink: Option<Arc<AuditSink>>,
) {
    let mut audit = AuditCursor {
        key: None,
        tail: ChainTail::new(sink),
        unindexed: super::audit::unindexed_entries(conn).unwrap_or(block),
    };
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
        if audit.unindexed >= block {
            audit.unindexed = super::audit::build_index_blocks(conn, block);
        }
    }
}

/// One group commit: every job in its own savepoint, one durable COMMIT,
/// then every answer. A job's own failure rolls back only that job. If the
/// transaction as a whole fails (COMMIT refused, or SQLite rolled everything
/// back, as it may on a full disk), every job fails and nothing is written.
fn commit_batch(conn: &Connection, audit: &mut AuditCursor, batch: Vec<Box<WriteJob>>) -> bool {
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
    let mut outcomes: Vec<(Box<WriteJob>, Result<(), StoreError>)> = Vec::with_capacity(batch.len());
    let mut aborted: Option<StoreError> = None;
    for mut job in batch {
        if aborted.is_some() {
            outcomes.push((job, Err(StoreError::Closed)));
            continue;
        }
        let before = audit.tail.mark();
        let result = conn
            .execute_batch("SAVEPOINT job")
            .map_err(StoreError::from)
            .and_then(|()| job.apply(&mut WriteTx { conn, audit: &mut *audit, erased: &mut erased }));
        if result.is_err() {
            audit.tail.undo(before);
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
    audit.tail.ended(committed.is_ok());
    if let Err(error) = &committed {
        tracing::error!(error = %error, jobs = outcomes.len(), "store: write transaction failed; nothing written");
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
    }
    for (job, own) in outcomes {
        job.finish(crate::store::job::outcome(&committed, own));
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
