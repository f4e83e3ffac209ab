-- piivault schema, version 3: the key lifecycle.
--
-- States: 'primary' (encrypts new records), 'active' (decrypts only),
-- 'retiring' (being emptied by re-encryption), 'compromised' (never
-- encrypts again; being emptied), 'retired' (destroyed: the wrapped key is
-- gone, the row stays so the version is never reused). `encryptions`
-- counts records sealed under the version; it only ever grows. `live`
-- counts the live records under it, kept in the same transactions as the
-- records (insert, delete, re-encryption), so that listing and retiring
-- never scan the records.

CREATE TABLE keys_v3 (
    collection_id  INTEGER NOT NULL REFERENCES collections(id),
    purpose        TEXT    NOT NULL,
    version        INTEGER NOT NULL CHECK (version > 0),
    state          TEXT    NOT NULL CHECK (state IN ('primary', 'active', 'retiring', 'compromised', 'retired')),
    wrapped        BLOB    NOT NULL,
    created_at     INTEGER NOT NULL,
    encryptions    INTEGER NOT NULL DEFAULT 0 CHECK (encryptions >= 0),
    live           INTEGER NOT NULL DEFAULT 0 CHECK (live >= 0),
    retired_at     INTEGER,
    CHECK ((state = 'retired') = (length(wrapped) = 0)),
    PRIMARY KEY (collection_id, purpose, version)
) STRICT, WITHOUT ROWID;

INSERT INTO keys_v3 (collection_id, purpose, version, state, wrapped, created_at)
    SELECT collection_id, purpose, version, state, wrapped, created_at FROM keys;
UPDATE keys_v3 SET
    encryptions = (
        SELECT count(*) FROM records r
        WHERE r.collection_id = keys_v3.collection_id AND r.key_version = keys_v3.version
    ),
    live = (
        SELECT count(*) FROM records r
        WHERE r.collection_id = keys_v3.collection_id AND r.key_version = keys_v3.version
          AND r.ciphertext IS NOT NULL
    )
WHERE purpose = 'data';

DROP TABLE keys;
ALTER TABLE keys_v3 RENAME TO keys;
CREATE UNIQUE INDEX keys_one_primary ON keys (collection_id, purpose) WHERE state = 'primary';
