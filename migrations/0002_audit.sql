-- piivault schema, version 2: the audit trail.

-- Keys that belong to the vault rather than to a collection (the audit
-- chain key), wrapped by the root key with AAD purpose ‖ "" ‖ version.
CREATE TABLE vault_keys (
    purpose     TEXT    NOT NULL,
    version     INTEGER NOT NULL CHECK (version > 0),
    state       TEXT    NOT NULL CHECK (state IN ('primary', 'active', 'retired')),
    wrapped     BLOB    NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (purpose, version)
) STRICT, WITHOUT ROWID;

-- One row per audited request. `record` is the canonical encoding the MAC
-- chain covers; the other columns repeat its fields for queries, and
-- verification checks that they agree with it.
CREATE TABLE audit (
    seq         INTEGER PRIMARY KEY CHECK (seq > 0),
    at          INTEGER NOT NULL,          -- unix microseconds, UTC
    caller      TEXT    NOT NULL,
    action      TEXT    NOT NULL,
    collection  TEXT    NOT NULL,
    outcome     TEXT    NOT NULL,
    record      BLOB    NOT NULL,
    mac         BLOB    NOT NULL CHECK (length(mac) = 32)
) STRICT;

CREATE INDEX audit_by_caller ON audit (caller, at);
CREATE INDEX audit_by_time ON audit (at);

-- Which tokens each record involves, for "who read token T".
CREATE TABLE audit_tokens (
    token  TEXT    NOT NULL,
    seq    INTEGER NOT NULL REFERENCES audit (seq),
    PRIMARY KEY (token, seq)
) STRICT, WITHOUT ROWID;

-- Append-only: the schema itself refuses to change or remove a record.
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER audit_tokens_no_update BEFORE UPDATE ON audit_tokens
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER audit_tokens_no_delete BEFORE DELETE ON audit_tokens
BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
