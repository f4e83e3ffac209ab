-- piivault schema, version 6: records that append.
--
-- A record is kept by its sequence number in its collection, so a new
-- record goes at the end of the table instead of at a random place (the
-- token used to be the key). Every token issued from this version on
-- locates its record: a default token is its record's sequence number and
-- 64 random bits, sealed under the collection's token key (purpose
-- 'token'), and the record keeps the random half (`token_check`); a shaped
-- token is FF1 of the record's number in its shape under the same key, and
-- the record keeps the token's canonical text (`shaped`, compared whole,
-- never searched). Every token issued before keeps its text (`token`) and
-- is found by it through `records_by_token`, which new tokens never touch.
--
-- Sequence numbers are handed out per collection and shape (`sequences`):
-- shape 0 is the collection's own (default and email tokens), shape n > 0
-- numbers the shaped tokens of n letters and digits, whose records sit at
-- `n << 48 | number`. The records that exist get shape-0 numbers in the
-- order they were made; shape 0 continues after them.

CREATE TABLE sequences (
    collection_id  INTEGER NOT NULL REFERENCES collections(id),
    shape          INTEGER NOT NULL CHECK (shape >= 0),
    next           INTEGER NOT NULL CHECK (next > 0),
    PRIMARY KEY (collection_id, shape)
) STRICT, WITHOUT ROWID;

CREATE TABLE records_v6 (
    collection_id  INTEGER NOT NULL REFERENCES collections(id),
    seq            INTEGER NOT NULL CHECK (seq > 0),
    token_check    BLOB CHECK (length(token_check) = 8),
    token          TEXT,
    shaped         TEXT,
    key_version    INTEGER,
    ciphertext     BLOB,
    created_at     INTEGER NOT NULL,
    deleted_at     INTEGER,
    expires_at     INTEGER,
    PRIMARY KEY (collection_id, seq),
    CHECK ((token_check IS NOT NULL) + (token IS NOT NULL) + (shaped IS NOT NULL) = 1),
    CHECK ((ciphertext IS NULL) = (deleted_at IS NOT NULL)),
    CHECK ((ciphertext IS NULL) = (key_version IS NULL))
) STRICT, WITHOUT ROWID;

INSERT INTO records_v6 (collection_id, seq, token, key_version, ciphertext, created_at, deleted_at, expires_at)
    SELECT collection_id, row_number() OVER (PARTITION BY collection_id ORDER BY created_at, token),
           token, key_version, ciphertext, created_at, deleted_at, expires_at
    FROM records;

INSERT INTO sequences (collection_id, shape, next)
    SELECT c.id, 0, 1 + (SELECT count(*) FROM records_v6 r WHERE r.collection_id = c.id) FROM collections c;

-- The blind index points at the record's sequence number.
CREATE TABLE blind_index_v6 (
    collection_id  INTEGER NOT NULL REFERENCES collections(id),
    version        INTEGER NOT NULL CHECK (version > 0),
    digest         BLOB    NOT NULL CHECK (length(digest) = 32),
    seq            INTEGER NOT NULL,
    PRIMARY KEY (collection_id, version, digest)
) STRICT, WITHOUT ROWID;

INSERT INTO blind_index_v6 (collection_id, version, digest, seq)
    SELECT b.collection_id, b.version, b.digest, r.seq
    FROM blind_index b JOIN records_v6 r ON r.collection_id = b.collection_id AND r.token = b.token;

-- Which audit records involve which records, in the order they were
-- written (keyed by the audit record first), so every request appends here.
-- `audit verify` checks these rows against the records' own token lists.
CREATE TABLE audit_records (
    audit_seq      INTEGER NOT NULL REFERENCES audit (seq),
    collection_id  INTEGER NOT NULL REFERENCES collections(id),
    record_seq     INTEGER NOT NULL,
    PRIMARY KEY (audit_seq, collection_id, record_seq)
) STRICT, WITHOUT ROWID;

INSERT OR IGNORE INTO audit_records (audit_seq, collection_id, record_seq)
    SELECT t.seq, r.collection_id, r.seq
    FROM audit_tokens t
    JOIN audit a ON a.seq = t.seq
    JOIN collections c ON c.name = a.collection
    JOIN records_v6 r ON r.collection_id = c.id AND r.token = t.token;

-- The searchable form of the same ("who saw token T"), built behind the
-- write path: every so many entries, the rows of `audit_records` written
-- since the last block are sorted by record and appended as one block, so
-- no request pays a random insert per token. A query probes each block,
-- then scans the rows after the last one. Rebuildable from `audit_records`.
CREATE TABLE audit_index (
    block          INTEGER NOT NULL,
    collection_id  INTEGER NOT NULL,
    record_seq     INTEGER NOT NULL,
    audit_seq      INTEGER NOT NULL,
    PRIMARY KEY (block, collection_id, record_seq, audit_seq)
) STRICT, WITHOUT ROWID;

-- Each block holds the entries of the audit records after the previous
-- block's `last_audit_seq`, up to its own.
CREATE TABLE audit_index_blocks (
    block           INTEGER PRIMARY KEY CHECK (block > 0),
    last_audit_seq  INTEGER NOT NULL,
    entries         INTEGER NOT NULL
) STRICT;

DROP TABLE audit_tokens;
DROP TABLE blind_index;
DROP TABLE records;
ALTER TABLE records_v6 RENAME TO records;
ALTER TABLE blind_index_v6 RENAME TO blind_index;

CREATE UNIQUE INDEX records_by_token ON records (collection_id, token) WHERE token IS NOT NULL;
CREATE INDEX records_expiry ON records (collection_id, expires_at)
    WHERE ciphertext IS NOT NULL AND expires_at IS NOT NULL;
CREATE INDEX blind_index_by_seq ON blind_index (collection_id, seq);

CREATE TRIGGER audit_records_no_update BEFORE UPDATE ON audit_records
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER audit_records_no_delete BEFORE DELETE ON audit_records
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER audit_index_no_update BEFORE UPDATE ON audit_index
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER audit_index_no_delete BEFORE DELETE ON audit_index
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER audit_index_blocks_no_update BEFORE UPDATE ON audit_index_blocks
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER audit_index_blocks_no_delete BEFORE DELETE ON audit_index_blocks
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
