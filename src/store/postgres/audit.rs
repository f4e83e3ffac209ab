//! The audit trail in PostgreSQL: this node's chain in `audit` (the
//! chained encoding plus query columns), `audit_entries` (which records
//! each audit record involves, in the order written: one row per audit
//! record and collection) and `audit_index` (the same, sorted by record in
//! blocks built behind the write path by the chain's node, for "who saw
//! token T").

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::append::{Part, write_parts};
use super::records::record_ref;
use super::writer::{ChainWrites, WriteTx, lock_key};
use super::{Connector, Db, PostgresStore, Session, Statements, sql_i64, stored_u64};
use crate::audit::{AuditKey, AuditRecord, Head, MAC_LEN};
use crate::store::{AuditFilter, AuditRow, AuditStore, CollectionId, RecordMatch, StoreError};

impl WriteTx<'_, '_> {
    /// Appends `record` to this node's chain in this transaction: it
    /// commits with the data change or not at all. Without an audit key,
    /// fails.
    pub(super) fn append_audit(&mut self, record: &AuditRecord) -> Result<u64, StoreError> {
        self.append_audit_of(record, CollectionId(0), &[])
    }

    /// [`WriteTx::append_audit`] of a record whose tokens are those of
    /// `collection`'s records at `seqs`: indexed under each.
    pub(super) fn append_audit_of(
        &mut self,
        record: &AuditRecord,
        collection: CollectionId,
        seqs: &[u64],
    ) -> Result<u64, StoreError> {
        // The statement of the joined writes, with this record alone: one
        // round trip, and no entry without its record.
        let part = Part { collection, records: &[], audit: record, read: seqs };
        let written = write_parts(self, &[part])?;
        // With no record to insert, nothing keeps it out: it went in.
        written.audit_seqs.first().copied().ok_or(StoreError::AuditUnavailable)
    }

    /// The next record of this node's chain, `record` as its encoding and
    /// MAC, not yet written: see [`WriteTx::appended`]. Without an audit
    /// key, fails.
    pub(super) fn next_audit<'r>(&mut self, record: &'r AuditRecord) -> Result<NextAudit<'r>, StoreError> {
        if self.audit.key.is_none() {
            return Err(StoreError::AuditUnavailable);
        }
        self.audit.hold(&mut self.tx)?;
        let key = self.audit.key.as_ref().ok_or(StoreError::AuditUnavailable)?;
        let (seq, encoded, mac) = self.audit.tail.next(key, record);
        let seq_sql = i64::try_from(seq).map_err(|_| StoreError::AuditUnavailable)?;
        Ok(NextAudit { record, seq, seq_sql, encoded, mac, mac_sql: mac.to_vec() })
    }

    /// `next` went in with this transaction: it is the chain's head now.
    pub(super) fn appended(&mut self, next: &NextAudit<'_>) -> u64 {
        self.audit.tail.appended(next.seq, next.record, next.mac);
        next.seq
    }
}

/// The places an audit record is indexed under, each once (a request may
/// name a token twice): the index is written without a conflict check,
/// which cost as much as the entry itself.
pub(super) fn index_entries(seqs: impl IntoIterator<Item = u64>) -> Result<Vec<i64>, StoreError> {
    let mut entries = seqs.into_iter().map(sql_i64).collect::<Result<Vec<i64>, _>>()?;
    entries.sort_unstable();
    entries.dedup();
    Ok(entries)
}

/// An audit record numbered, with its MAC, as the next of this node's chain.
pub(super) struct NextAudit<'r> {
    record: &'r AuditRecord,
    pub(super) seq: u64,
    pub(super) seq_sql: i64,
    pub(super) encoded: Vec<u8>,
    mac: [u8; MAC_LEN],
    /// `mac` as the driver takes a bytea (it takes no arrays).
    pub(super) mac_sql: Vec<u8>,
}

impl<'r> NextAudit<'r> {
    /// The record this is the encoding of.
    pub(super) fn record(&self) -> &'r AuditRecord {
        self.record
    }
}

/// What a failed audit insert answers: the database's reason where it is
/// one the caller can act on (full, read-only, busy, away), else that the
/// audit trail is unavailable.
pub(super) fn audit_failed(e: postgres::Error) -> StoreError {
    let error = StoreError::from(e);
    if error.is_unavailable()
        && !matches!(error, StoreError::Full | StoreError::ReadOnly | StoreError::Busy | StoreError::Unreachable)
    {
        tracing::error!(error = %error, "audit insert failed");
        StoreError::AuditUnavailable
    } else {
        error
    }
}

#[async_trait]
impl AuditStore for PostgresStore {
    async fn append_audit(&self, record: AuditRecord) -> Result<u64, StoreError> {
        self.write(move |tx| tx.append_audit(&record)).await
    }

    async fn append_read_audit(
        &self,
        collection: CollectionId,
        seqs: Vec<u64>,
        record: AuditRecord,
    ) -> Result<u64, StoreError> {
        self.append(super::append::Append::read(collection, seqs, record)).await
    }

    async fn install_audit_key(&self, key: AuditKey) -> Result<Head, StoreError> {
        self.write(move |tx| {
            let head = last_head(&mut tx.tx, &tx.audit.chain)?;
            tx.audit.key = Some(key);
            tx.audit.tail.restart_at(head);
            Ok(head)
        })
        .await
    }

    async fn audit_chains(&self) -> Result<Vec<String>, StoreError> {
        let own = self.chain.clone();
        self.read(move |tx| {
            let mut chains = vec![own.clone()];
            for row in tx.query("SELECT chain FROM audit_chains WHERE chain <> $1 ORDER BY chain", &[&own])? {
                chains.push(row.try_get(0)?);
            }
            Ok(chains)
        })
        .await
    }

    async fn audit_head(&self) -> Result<Head, StoreError> {
        let chain = self.chain.clone();
        self.read(move |tx| last_head(tx, &chain)).await
    }

    async fn check_token_index(&self, chain: Option<String>) -> Result<Option<u64>, StoreError> {
        let chain = chain.unwrap_or_else(|| self.chain.clone());
        self.read(move |tx| first_bad_block(tx, &chain)).await
    }

    async fn query_audit(&self, filter: AuditFilter, limit: usize) -> Result<Vec<AuditRow>, StoreError> {
        let chain = filter.chain.clone().unwrap_or_else(|| self.chain.clone());
        self.read(move |tx| {
            let after = i64::try_from(filter.after_seq).unwrap_or(i64::MAX);
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let (collection, record_seq) = match filter.record {
                RecordMatch::Any => (None, None),
                RecordMatch::Of(collection, seq) => (Some(collection.0), Some(sql_i64(seq)?)),
                RecordMatch::Unissued => return Ok(Vec::new()),
            };
            // Its filters are optional: planned for the ones given.
            let rows = tx.planned_for_values(|tx| {
                Ok(tx.query(
                    "SELECT a.seq, a.record, a.mac, a.at, a.caller, a.action, a.collection, a.outcome
                 FROM audit a
                 WHERE a.chain = $1 AND a.seq > $2
                   AND ($3::bigint IS NULL OR a.seq IN (
                        -- In each block, the one chunk that can hold the record.
                        SELECT u.audit_seq FROM audit_index_blocks b
                        CROSS JOIN LATERAL (
                            SELECT c.record_seqs, c.audit_seqs FROM audit_index c
                            WHERE c.block = b.block AND c.collection_id = $3 AND c.last_record_seq >= $4
                            ORDER BY c.last_record_seq LIMIT 1) c
                        CROSS JOIN LATERAL unnest(c.record_seqs, c.audit_seqs) AS u (record_seq, audit_seq)
                        WHERE b.chain = $1 AND u.record_seq = $4
                        UNION ALL
                        SELECT x.audit_seq FROM audit_entries x
                        WHERE x.chain = $1 AND x.collection_id = $3 AND $4 = ANY (x.record_seqs)
                          AND x.audit_seq > (SELECT coalesce(max(last_audit_seq), 0) FROM audit_index_blocks
                                             WHERE chain = $1)))
                   AND ($5::text IS NULL OR a.caller = $5)
                   AND ($6::text IS NULL OR a.action = $6)
                   AND ($7::text IS NULL OR a.collection = $7)
                   AND ($8::text IS NULL OR a.outcome = $8)
                   AND ($9::bigint IS NULL OR a.at >= $9)
                   AND ($10::bigint IS NULL OR a.at < $10)
                 ORDER BY a.seq LIMIT $11",
                    &[
                        &chain,
                        &after,
                        &collection,
                        &record_seq,
                        &filter.caller,
                        &filter.action,
                        &filter.collection,
                        &filter.outcome,
                        &filter.since,
                        &filter.until,
                        &limit,
                    ],
                )?)
            })?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                out.push(AuditRow {
                    seq: stored_u64(row.try_get(0)?)?,
                    record: row.try_get(1)?,
                    mac: row.try_get(2)?,
                    at: row.try_get(3)?,
                    caller: row.try_get(4)?,
                    action: row.try_get(5)?,
                    collection: row.try_get(6)?,
                    outcome: row.try_get(7)?,
                    indexed: Vec::new(),
                });
            }
            for row in &mut out {
                let seq = sql_i64(row.seq)?;
                for r in tx.query(
                    "SELECT x.collection_id, r.seq, r.token_check, r.token, r.shaped
                     FROM audit_entries x CROSS JOIN LATERAL unnest(x.record_seqs) AS s (record_seq)
                     JOIN records r ON r.collection_id = x.collection_id AND r.seq = s.record_seq
                     WHERE x.chain = $1 AND x.audit_seq = $2 ORDER BY x.collection_id, s.record_seq",
                    &[&chain, &seq],
                )? {
                    row.indexed.push((CollectionId(r.try_get(0)?), record_ref(&r, 1)?));
                }
            }
            Ok(out)
        })
        .await
    }
}

/// The last committed record of chain `chain` (the genesis head when it
/// has none).
pub(super) fn last_head(conn: &mut Db<'_, '_>, chain: &str) -> Result<Head, StoreError> {
    let Some(row) =
        conn.query_opt("SELECT seq, mac FROM audit WHERE chain = $1 ORDER BY seq DESC LIMIT 1", &[&chain])?
    else {
        return Ok(Head::GENESIS);
    };
    let mac: [u8; MAC_LEN] = row.try_get::<_, Vec<u8>>(1)?.try_into().map_err(|_| StoreError::Corrupt)?;
    Ok(Head { seq: stored_u64(row.try_get(0)?)?, mac })
}

/// The first audit record of the first block of chain `chain`'s part of
/// the searchable index that does not hold exactly the entries of its
/// range of `audit_entries`, or whose chunks a query could miss an entry
/// in (an entry outside its chunk's bounds, chunks that overlap).
fn first_bad_block(db: &mut Db<'_, '_>, chain: &str) -> Result<Option<u64>, StoreError> {
    let blocks = db.query(
        "SELECT block, last_audit_seq, entries FROM audit_index_blocks WHERE chain = $1 ORDER BY last_audit_seq",
        &[&chain],
    )?;
    let mut previous: i64 = 0;
    for block in blocks {
        let (number, last, entries): (i64, i64, i64) = (block.try_get(0)?, block.try_get(1)?, block.try_get(2)?);
        let row = db.query_one(
            "SELECT (SELECT coalesce(sum(cardinality(record_seqs)), 0)::bigint FROM audit_index WHERE block = $1),
                    (SELECT coalesce(sum(cardinality(record_seqs)), 0)::bigint FROM audit_entries
                     WHERE chain = $2 AND audit_seq > $3 AND audit_seq <= $4),
                    EXISTS (SELECT x.collection_id, r.record_seq, x.audit_seq
                            FROM audit_entries x CROSS JOIN LATERAL unnest(x.record_seqs) AS r (record_seq)
                            WHERE x.chain = $2 AND x.audit_seq > $3 AND x.audit_seq <= $4
                            EXCEPT
                            SELECT c.collection_id, u.record_seq, u.audit_seq
                            FROM audit_index c CROSS JOIN LATERAL unnest(c.record_seqs, c.audit_seqs) AS u (record_seq, audit_seq)
                            WHERE c.block = $1),
                    EXISTS (SELECT 1 FROM (
                                SELECT c.last_record_seq,
                                       lag(c.last_record_seq) OVER (PARTITION BY c.collection_id ORDER BY c.last_record_seq) AS before,
                                       (SELECT min(r) FROM unnest(c.record_seqs) AS r) AS low,
                                       (SELECT max(r) FROM unnest(c.record_seqs) AS r) AS high,
                                       cardinality(c.record_seqs) = cardinality(c.audit_seqs) AS paired
                                FROM audit_index c WHERE c.block = $1) c
                            WHERE NOT c.paired OR c.high IS DISTINCT FROM c.last_record_seq OR c.low <= c.before)",
            &[&number, &chain, &previous, &last],
        )?;
        let (indexed, written, missing, misplaced): (i64, i64, bool, bool) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?, row.try_get(3)?);
        if indexed != entries || written != entries || missing || misplaced || last <= previous {
            return Ok(Some(stored_u64(previous)? + 1));
        }
        previous = last;
    }
    Ok(None)
}

/// How often the indexer looks whether `block` more entries were written.
const INDEX_TICK: Duration = Duration::from_millis(250);

/// How often it looks at the database whatever this node wrote (entries
/// an earlier process of this chain left waiting), and how long it waits
/// after a failure.
const INDEX_RECHECK: Duration = Duration::from_secs(30);

/// Builds this node's blocks of the searchable index, on a connection of
/// its own (off the writer's path), once this process has taken its chain
/// (see [`ChainWrites`]): then, whenever `block` more entries were
/// written, and every [`INDEX_RECHECK`]. A failure is logged and retried
/// later: queries scan what is not in a block.
pub(super) fn indexer_loop(
    connector: &Connector,
    chain: &str,
    block: usize,
    writes: &ChainWrites,
    stopping: &AtomicBool,
) {
    let block = block.max(1);
    let due_after = u64::try_from(block).unwrap_or(u64::MAX);
    let mut client: Option<(postgres::Client, Statements)> = None;
    // The count of entries written, and the time, when it last looked.
    let mut looked: Option<(u64, Instant)> = None;
    while !stopping.load(Ordering::Relaxed) {
        let now_written = writes.entries.load(Ordering::Relaxed);
        let due = writes.taken.load(Ordering::Relaxed)
            && looked.is_none_or(|(seen, at)| {
                now_written.saturating_sub(seen) >= due_after || at.elapsed() >= INDEX_RECHECK
            });
        if due {
            if client.as_ref().is_none_or(|(c, _)| c.is_closed()) {
                client = connector.connect().ok().map(|c| (c, Statements::default()));
            }
            let built = match client.as_mut() {
                Some((conn, statements)) => build_index_blocks(conn, statements, chain, block),
                None => Err(StoreError::Unreachable),
            };
            let seen = match built {
                Ok(()) => now_written,
                Err(error) => {
                    tracing::warn!(error = %error, "store: could not build a block of the audit token index; retrying later");
                    client = None;
                    // Not again before the next recheck.
                    u64::MAX
                }
            };
            looked = Some((seen, Instant::now()));
        }
        std::thread::sleep(INDEX_TICK);
    }
}

/// Builds blocks of chain `chain` while `block` entries are waiting, each
/// in its own transaction.
fn build_index_blocks(
    conn: &mut postgres::Client,
    statements: &mut Statements,
    chain: &str,
    block: usize,
) -> Result<(), StoreError> {
    while build_index_block(conn, statements, chain, block)? {}
    Ok(())
}

/// Entries per chunk of a block (each chunk ends with a record's last
/// entry, so a record read more often makes its chunk longer).
const CHUNK: usize = 128;

/// One block of chain `chain`, if `block` entries are waiting: whole audit
/// records, sorted by record and cut into chunks (see `audit_index`).
/// Builders of one chain take turns (a lock of the transaction's), so that
/// two never build over one range.
fn build_index_block(
    conn: &mut postgres::Client,
    statements: &mut Statements,
    chain: &str,
    block: usize,
) -> Result<bool, StoreError> {
    use postgres::binary_copy::BinaryCopyInWriter;
    use postgres::types::Type;

    let block = i64::try_from(block).unwrap_or(i64::MAX);
    let mut tx = conn.transaction()?;
    let mut db = Db { session: Session::Tx(&mut tx), statements };
    db.query_one("SELECT pg_advisory_xact_lock($1)", &[&lock_key(b"audit index", chain)])?;
    let upto: i64 = db
        .query_one("SELECT coalesce(max(last_audit_seq), 0) FROM audit_index_blocks WHERE chain = $1", &[&chain])?
        .try_get(0)?;
    // The block ends with the audit record that holds its block-th entry.
    let end = db.query_opt(
        "SELECT audit_seq FROM (
             SELECT audit_seq, sum(cardinality(record_seqs))
                               OVER (ORDER BY audit_seq, collection_id ROWS UNBOUNDED PRECEDING) AS entries
             FROM audit_entries WHERE chain = $1 AND audit_seq > $2) waiting
         WHERE entries >= $3 LIMIT 1",
        &[&chain, &upto, &block],
    )?;
    let Some(end) = end else { return Ok(false) };
    let end: i64 = end.try_get(0)?;
    // (collection, record, audit record), sorted.
    let mut entries: Vec<(i64, i64, i64)> = Vec::new();
    for row in db.query(
        "SELECT collection_id, audit_seq, record_seqs FROM audit_entries
         WHERE chain = $1 AND audit_seq > $2 AND audit_seq <= $3",
        &[&chain, &upto, &end],
    )? {
        let (collection, audit_seq): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        entries.extend(row.try_get::<_, Vec<i64>>(2)?.into_iter().map(|record| (collection, record, audit_seq)));
    }
    entries.sort_unstable();
    let number: i64 =
        db.query_one("SELECT nextval(pg_get_serial_sequence('audit_index_blocks', 'block'))", &[])?.try_get(0)?;
    let count = sql_i64(u64::try_from(entries.len()).unwrap_or(u64::MAX))?;
    let types = [Type::INT8, Type::INT8, Type::INT8, Type::INT8_ARRAY, Type::INT8_ARRAY];
    let sink = tx.copy_in(
        "COPY audit_index (block, collection_id, last_record_seq, record_seqs, audit_seqs) FROM STDIN BINARY",
    )?;
    let mut writer = BinaryCopyInWriter::new(sink, &types);
    for chunk in chunks(&entries) {
        let Some(&(collection, last, _)) = chunk.last() else { continue };
        let records: Vec<i64> = chunk.iter().map(|e| e.1).collect();
        let audits: Vec<i64> = chunk.iter().map(|e| e.2).collect();
        writer.write(&[&number, &collection, &last, &records, &audits])?;
    }
    writer.finish()?;
    tx.execute(
        "INSERT INTO audit_index_blocks (block, chain, last_audit_seq, entries) VALUES ($1, $2, $3, $4)",
        &[&number, &chain, &end, &count],
    )?;
    tx.commit()?;
    Ok(true)
}

/// `sorted` entries cut into chunks of one collection each, of at least
/// [`CHUNK`] entries where there are that many, never between two entries
/// of one record.
fn chunks(sorted: &[(i64, i64, i64)]) -> impl Iterator<Item = &[(i64, i64, i64)]> {
    let mut rest = sorted;
    std::iter::from_fn(move || {
        let first = rest.first()?;
        // A cut between `pair[0]` and `pair[1]`, at `i + 1`.
        let cut = rest.windows(2).enumerate().position(|(i, pair)| match pair {
            [before, next] => next.0 != first.0 || (i + 1 >= CHUNK && (next.0, next.1) != (before.0, before.1)),
            _ => false,
        });
        let (chunk, after) = rest.split_at(cut.map_or(rest.len(), |i| i + 1));
        rest = after;
        Some(chunk)
    })
}

#[cfg(test)]
mod tests {
    use super::{CHUNK, chunks};

    #[test]
    fn chunks_hold_whole_records_of_one_collection() {
        // Collection 1: 200 records read once, then record 500 read 300
        // times; collection 2: 3 entries.
        let mut entries: Vec<(i64, i64, i64)> = (0..200).map(|r| (1, r, 1)).collect();
        entries.extend((0..300).map(|a| (1, 500, a)));
        entries.extend((0..3).map(|r| (2, r, 9)));
        let cut: Vec<&[(i64, i64, i64)]> = chunks(&entries).collect();
        let lengths: Vec<usize> = cut.iter().map(|c| c.len()).collect();
        // 128 records; the other 72 and all of record 500; collection 2.
        assert_eq!(lengths, [CHUNK, 72 + 300, 3]);
        assert_eq!(cut.concat(), entries);
        for chunk in &cut {
            assert!(chunk.iter().all(|e| e.0 == chunk[0].0));
        }
        assert_eq!(chunks(&[]).count(), 0);
    }
}
