-- Which records an audit record involves, as the embedded backend keeps
-- it: written in the order audit records are written, and sorted for
-- "who saw token T" in blocks behind the write path.
--
-- Before, each record an audit record involved was a row of its own with
-- two index entries, one of them at a random place in an index on the
-- record: per token read, that was most of what the writer's session cost
-- the database (measured: 7.7 us per entry with both indexes, 0.9 without).
-- Now an audit record's records are one row per collection, their numbers
-- in an array (a read of 100 tokens is one row and one index entry).
-- The searchable form is built from those rows by the chain's node, a
-- block of `store.audit_index_block` entries at a time, off the write
-- path: each block's entries sorted by record and cut into chunks of about
-- 128, a row each, so that a block costs the database a few hundred rows,
-- not a row and an index entry per token. A query probes one chunk per
-- block, and also scans the rows after its chain's last block, so nothing
-- recorded is missing from an answer.
CREATE TABLE audit_entries (
    chain          TEXT     NOT NULL,
    audit_seq      BIGINT   NOT NULL,
    collection_id  BIGINT   NOT NULL,
    record_seqs    BIGINT[] NOT NULL,
    PRIMARY KEY (chain, audit_seq, collection_id)
);
INSERT INTO audit_entries (chain, audit_seq, collection_id, record_seqs)
SELECT chain, audit_seq, collection_id, array_agg(record_seq ORDER BY record_seq)
FROM audit_records
GROUP BY chain, audit_seq, collection_id;
DROP TABLE audit_records;

-- A block: the entries of chain `chain` after its previous block's
-- `last_audit_seq`, up to and with this one's. Numbered in the order built,
-- so that each block's entries go in at the end of `audit_index`.
CREATE TABLE audit_index_blocks (
    block           BIGSERIAL PRIMARY KEY,
    chain           TEXT   NOT NULL REFERENCES audit_chains(chain),
    last_audit_seq  BIGINT NOT NULL,
    entries         BIGINT NOT NULL CHECK (entries > 0),
    UNIQUE (chain, last_audit_seq)
);
-- A chunk of a block: entries of one collection, sorted by record and
-- then audit record, `record_seqs[i]` read (or written) by `audit_seqs[i]`;
-- every entry of a record in the block is in one chunk, whose last
-- record is `last_record_seq` (the first chunk at or after a record is
-- the one that can hold it).
CREATE TABLE audit_index (
    block            BIGINT   NOT NULL,
    collection_id    BIGINT   NOT NULL,
    last_record_seq  BIGINT   NOT NULL,
    record_seqs      BIGINT[] NOT NULL,
    audit_seqs       BIGINT[] NOT NULL,
    PRIMARY KEY (block, collection_id, last_record_seq)
);

-- No statistics of the arrays' elements: no plan uses them, and
-- gathering them (ANALYZE sorts every sampled array) took autovacuum a
-- sixteenth of the machine under a read load of 100,000 tokens a second.
ALTER TABLE audit_entries ALTER COLUMN record_seqs SET STATISTICS 0;
ALTER TABLE audit_index ALTER COLUMN record_seqs SET STATISTICS 0;
ALTER TABLE audit_index ALTER COLUMN audit_seqs SET STATISTICS 0;

CREATE TRIGGER audit_entries_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_entries
    FOR EACH STATEMENT EXECUTE FUNCTION piivault_append_only();
CREATE TRIGGER audit_index_blocks_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_index_blocks
    FOR EACH STATEMENT EXECUTE FUNCTION piivault_append_only();
CREATE TRIGGER audit_index_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_index
    FOR EACH STATEMENT EXECUTE FUNCTION piivault_append_only();
