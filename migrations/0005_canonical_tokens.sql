-- piivault schema, version 5: shaped tokens by their canonical form.
--
-- From this version a shaped token (digits, alphanumeric, card, ssn) is
-- stored as its letters and digits alone, and answers in any writing:
-- `9674 4677 4499 0004` and `9674467744990004` are one token. Tokens
-- issued before kept their separators in `records.token` (and in their
-- ciphertexts' associated data, so they cannot be rewritten); this table
-- maps each such token's canonical form to it, so that it answers in any
-- writing too, and so that no new token is ever issued with the same
-- canonical form. `token` is NULL where two old tokens share a canonical
-- form: then only their exact writings answer, and the form stays taken.
-- Filled from the records by the migration itself (src/store/schema.rs).
CREATE TABLE legacy_tokens (
    collection_id  INTEGER NOT NULL REFERENCES collections(id),
    canonical      TEXT    NOT NULL,
    token          TEXT,
    PRIMARY KEY (collection_id, canonical)
) STRICT, WITHOUT ROWID;

-- Deterministic collections index the canonical value (digits only for
-- national ids, phones and cards) from this index-key version on; older
-- versions hold digests of the value as written. NULL: not yet decided
-- (a store made before version 5), set at the next start.
ALTER TABLE collections ADD COLUMN canonical_index_from INTEGER;
