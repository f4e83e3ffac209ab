-- A data key version's counters (records sealed under it, and records
-- still under it), kept per audit chain: each node adds to its own row.
--
-- Before, every group commit that sealed a record updated the version's
-- row in `keys`, and held that row's lock until its COMMIT had reached
-- the disk. Two nodes sealing under one version took turns: each waited
-- for the other's commit (measured with two nodes: the most frequent wait
-- after the WAL flush itself), so the group commits of all nodes of one
-- collection ran one at a time, however many nodes there were.
--
-- Now a group commit takes a share lock on the version's row in `keys`
-- (several nodes hold it at once) and adds to its chain's row here. Taking
-- a version out of use (retire, compromised, re-encryption's emptying)
-- changes that row in `keys`, and so still waits for every transaction
-- sealing under it, and they for it: a record is never sealed under a
-- version that was retired meanwhile.
--
-- A version's counts are its row's in `keys` (those from before this
-- migration, or copied from an embedded vault) plus the sum of its rows
-- here. A chain's `live` can be below zero: a node erases records that
-- another node sealed.
CREATE TABLE key_counts (
    collection_id  BIGINT NOT NULL,
    purpose        TEXT   NOT NULL CHECK (purpose = 'data'),
    version        BIGINT NOT NULL,
    chain          TEXT   NOT NULL,
    encryptions    BIGINT NOT NULL CHECK (encryptions >= 0),
    live           BIGINT NOT NULL,
    PRIMARY KEY (collection_id, purpose, version, chain),
    FOREIGN KEY (collection_id, purpose, version) REFERENCES keys (collection_id, purpose, version)
);
