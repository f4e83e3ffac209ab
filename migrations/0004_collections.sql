-- piivault schema, version 4: collection formats, deterministic tokens and
-- expiry.

-- What a collection's tokens look like, as far as parsing them goes
-- (`random:<prefix>`, `digits`, `alphanumeric`, `card:<luhn rule>`,
-- `email`). A configuration that changes it is refused at start: the tokens
-- already issued would stop answering. NULL: the collection predates
-- formats; the first start records the configured kind.
ALTER TABLE collections ADD COLUMN token_kind TEXT;

-- When a record stops answering (unix microseconds); NULL: never. An
-- expired record answers like an unknown token at once and is erased by
-- the background purge, which finds it through this partial index.
ALTER TABLE records ADD COLUMN expires_at INTEGER;
CREATE INDEX records_expiry ON records (collection_id, expires_at)
    WHERE ciphertext IS NOT NULL AND expires_at IS NOT NULL;

-- The blind index of deterministic collections: HMAC-SHA256 of the
-- normalized value under the collection's index key `version` (purpose
-- 'index' in `keys`) → the token issued for it. A value appears here only
-- as that keyed digest. Rows go with the record they point to (delete,
-- purge); an index-key rotation moves every row to the new version.
CREATE TABLE blind_index (
    collection_id  INTEGER NOT NULL REFERENCES collections(id),
    version        INTEGER NOT NULL CHECK (version > 0),
    digest         BLOB    NOT NULL CHECK (length(digest) = 32),
    token          TEXT    NOT NULL,
    PRIMARY KEY (collection_id, version, digest)
) STRICT, WITHOUT ROWID;

CREATE INDEX blind_index_by_token ON blind_index (collection_id, token);
