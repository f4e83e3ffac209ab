//! `piivault store copy`: a SQLite vault's whole store into an empty
//! PostgreSQL database, as one snapshot of the file (a read transaction:
//! the vault may serve meanwhile) and one PostgreSQL transaction (a copy
//! that fails leaves the database empty). Every row keeps its numbers, so
//! every token, key version and audit record is the same afterwards; the
//! SQLite trail becomes the chain of the node the settings name.

use std::path::Path;

use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{ToSql, Type};

use super::{Connector, schema};
use crate::config::PostgresSettings;
use crate::store::sqlite::{Cell, Snapshot};
use crate::store::{OpenMode, StoreError, now_micros};

/// What a copy moved: rows per table, in copy order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    /// `(table, rows)`.
    pub tables: Vec<(&'static str, u64)>,
}

impl Copied {
    /// Rows copied into `table`.
    pub fn rows(&self, table: &str) -> u64 {
        self.tables.iter().find(|(t, _)| *t == table).map_or(0, |(_, n)| *n)
    }
}

/// The tables of both schemas, parents first, with their common columns,
/// and whether PostgreSQL keys their rows by audit chain too.
const TABLES: [(&str, &str, bool); 9] = [
    ("collections", "id, name, created_at, token_kind, canonical_index_from", false),
    ("vault_keys", "purpose, version, state, wrapped, created_at", false),
    ("keys", "collection_id, purpose, version, state, wrapped, created_at, encryptions, live, retired_at", false),
    ("sequences", "collection_id, shape, next", false),
    (
        "records",
        "collection_id, seq, token_check, token, shaped, key_version, ciphertext, created_at, deleted_at, expires_at",
        false,
    ),
    ("legacy_tokens", "collection_id, canonical, token", false),
    ("blind_index", "collection_id, version, digest, seq", false),
    ("audit", "seq, at, caller, action, collection, outcome, record, mac", true),
    // Into a temporary table of that name, then one row per audit record
    // and collection of `audit_entries` (see `ENTRIES`).
    ("audit_records", "audit_seq, collection_id, record_seq", false),
];

/// The copied audit index entries, as the PostgreSQL schema keeps them.
/// The searchable blocks are built from them by the node that opens the
/// copy (its indexer), as they would be for entries it wrote.
const ENTRIES: &str = "INSERT INTO audit_entries (chain, audit_seq, collection_id, record_seqs)
     SELECT $1, audit_seq, collection_id, array_agg(DISTINCT record_seq ORDER BY record_seq)
     FROM pg_temp.audit_records GROUP BY audit_seq, collection_id";

/// Copies the SQLite store at `source` into the empty database of
/// `settings` (made a piivault store first).
pub fn copy_from_sqlite(source: &Path, settings: &PostgresSettings) -> Result<Copied, StoreError> {
    let (source, settings) = (source.to_owned(), settings.clone());
    // The blocking client runs a runtime of its own: not on a caller's.
    std::thread::spawn(move || copy(&source, &settings))
        .join()
        .map_err(|_| StoreError::Backend("the copying thread panicked".into()))?
}

fn copy(source: &Path, settings: &PostgresSettings) -> Result<Copied, StoreError> {
    // One snapshot for every table, whatever the serving vault writes after.
    let snapshot = Snapshot::open(source)?;
    let mut conn = Connector::new(settings)?.connect()?;
    schema::migrate(&mut conn, OpenMode::Create)?;
    let mut tx = conn.transaction()?;
    tx.execute("INSERT INTO audit_chains (chain, created_at) VALUES ($1, $2)", &[&settings.node, &now_micros()])?;
    tx.batch_execute(
        "CREATE TEMPORARY TABLE audit_records (audit_seq BIGINT, collection_id BIGINT, record_seq BIGINT) ON COMMIT DROP",
    )?;
    let mut copied = Copied { tables: Vec::with_capacity(TABLES.len()) };
    for (table, columns, chained) in TABLES {
        let target = if chained { format!("{columns}, chain") } else { columns.to_owned() };
        let types: Vec<Type> =
            tx.prepare(&format!("SELECT {target} FROM {table}"))?.columns().iter().map(|c| c.type_().clone()).collect();
        let sink = tx.copy_in(&format!("COPY {table} ({target}) FROM STDIN BINARY"))?;
        let mut writer = BinaryCopyInWriter::new(sink, &types);
        let n = snapshot.rows(table, columns, |cells| {
            let mut values: Vec<Box<dyn ToSql + Sync>> = Vec::with_capacity(types.len());
            for (cell, ty) in cells.iter().zip(&types) {
                values.push(sql_value(*cell, ty)?);
            }
            if chained {
                values.push(Box::new(settings.node.clone()));
            }
            if values.len() != types.len() {
                return Err(StoreError::Corrupt);
            }
            let refs: Vec<&(dyn ToSql + Sync)> = values.iter().map(AsRef::as_ref).collect();
            writer.write(&refs)?;
            Ok(())
        })?;
        writer.finish()?;
        copied.tables.push((table, n));
    }
    tx.execute(ENTRIES, &[&settings.node])?;
    // New collections are numbered after the copied ones.
    tx.execute(
        "SELECT setval(pg_get_serial_sequence('collections', 'id'), COALESCE(max(id), 1), count(*) > 0) FROM collections",
        &[],
    )?;
    tx.commit()?;
    snapshot.end()?;
    Ok(copied)
}

/// A stored value as the PostgreSQL column of type `ty` takes it; anything
/// else is a row this schema does not hold.
fn sql_value(value: Cell<'_>, ty: &Type) -> Result<Box<dyn ToSql + Sync>, StoreError> {
    Ok(match value {
        Cell::Null if *ty == Type::INT8 => Box::new(None::<i64>),
        Cell::Null if *ty == Type::TEXT => Box::new(None::<String>),
        Cell::Null if *ty == Type::BYTEA => Box::new(None::<Vec<u8>>),
        Cell::Integer(n) if *ty == Type::INT8 => Box::new(n),
        Cell::Text(text) if *ty == Type::TEXT => Box::new(text.to_owned()),
        Cell::Blob(bytes) if *ty == Type::BYTEA => Box::new(bytes.to_vec()),
        _ => return Err(StoreError::Corrupt),
    })
}
