-- Per-caller quota use (values detokenized, tokenized, deleted,
-- deterministic hits), per node and minute: each node adds its own every
-- second and reads the others', so that a caller's quota holds across
-- nodes. Counts only: no value, no token.
CREATE TABLE quota_use (
    caller  TEXT     NOT NULL,
    kind    SMALLINT NOT NULL,
    minute  BIGINT   NOT NULL,
    node    TEXT     NOT NULL,
    used    BIGINT   NOT NULL CHECK (used >= 0),
    PRIMARY KEY (caller, kind, minute, node)
);
CREATE INDEX quota_use_by_minute ON quota_use (minute);
