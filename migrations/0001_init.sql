-- piivault schema, version 1.
--
-- This database holds ciphertext, wrapped keys and metadata only: never a
-- value or a key in clear. Every column that could carry secret material
-- holds AES-256-GCM output.

-- Marks the file as a piivault store ('PIVV'); a database with another
-- application_id is refused at open.
PRAGMA application_id = 1346983510;

CREATE TABLE collections (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL             -- unix microseconds, UTC
) STRICT;

-- Keys wrapped by the root key (AES-256-GCM, AAD = purpose ‖ collection ‖
-- version). `state` is one of 'primary', 'active', 'retired'.
CREATE TABLE keys (
    collection_id  INTEGER NOT NULL REFERENCES collections(id),
    purpose        TEXT    NOT NULL,
    version        INTEGER NOT NULL CHECK (version > 0),
    state          TEXT    NOT NULL CHECK (state IN ('primary', 'active', 'retired')),
    wrapped        BLOB    NOT NULL,
    created_at     INTEGER NOT NULL,
    PRIMARY KEY (collection_id, purpose, version)
) STRICT, WITHOUT ROWID;

-- At most one primary data key per collection and purpose.
CREATE UNIQUE INDEX keys_one_primary
    ON keys (collection_id, purpose) WHERE state = 'primary';

-- One row per token ever issued. A deleted token keeps its row with the
-- ciphertext cleared (secure_delete overwrites the freed bytes) so that the
-- same token is never issued again.
CREATE TABLE records (
    collection_id  INTEGER NOT NULL REFERENCES collections(id),
    token          TEXT    NOT NULL,
    key_version    INTEGER,
    ciphertext     BLOB,
    created_at     INTEGER NOT NULL,
    deleted_at     INTEGER,
    PRIMARY KEY (collection_id, token),
    CHECK ((ciphertext IS NULL) = (deleted_at IS NOT NULL)),
    CHECK ((ciphertext IS NULL) = (key_version IS NULL))
) STRICT, WITHOUT ROWID;
