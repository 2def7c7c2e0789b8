-- eldersafe schema v7: the change log numbered in commit order (issue 8: the live feed).
--
-- A position is given at insert, so positions commit out of order, and the feed used to
-- wait until every older transaction in the whole database had ended (xid below the
-- snapshot's xmin) before it showed a change: ingest's COPY, the engine's intake
-- batches and the notifiers all held it back. commit_seq numbers a transaction's
-- changes at its COMMIT instead, so a reader simply follows commit_seq and needs no
-- horizon (gateway.alerts.feed).
--
-- Why the numbers are safe to follow: the deferred trigger below runs inside COMMIT
-- (xact.c CommitTransaction: AfterTriggerFireDeferred comes first), takes a
-- transaction-level advisory lock and numbers all of the transaction's change rows from
-- a sequence. CommitTransaction then writes and flushes the commit record
-- (RecordTransactionCommit), makes the transaction visible (ProcArrayEndTransaction,
-- "must be done _before_ releasing locks we hold") and only then releases its locks
-- (ResourceOwnerRelease, RESOURCE_RELEASE_LOCKS). So the next transaction gets the lock,
-- and higher numbers, only once this one is visible or has aborted: a snapshot that sees
-- number k sees every number below k that ever commits. The numbers of a commit that
-- fails after numbering are never seen (gaps are harmless; nobody counts on them).
--
-- What it costs: the commit tails of change-writing transactions, from the numbering to
-- the release, are serialised. Those transactions already NOTIFY (0006), and
-- PreCommit_Notify (async.c) holds a cluster-wide lock from just after this trigger to
-- the same release, so the added wait is the numbering UPDATE itself.
-- Transactions that write no change never take the lock.

ALTER TABLE alert_changes ADD COLUMN commit_seq bigint;
CREATE SEQUENCE alert_changes_commit_seq AS bigint OWNED BY alert_changes.commit_seq;

-- The log as it stands, in the feed's old order (every row is committed: the ALTER
-- TABLE above waited for every transaction that wrote to the table).
UPDATE alert_changes c SET commit_seq = o.n
FROM (SELECT position, row_number() OVER (ORDER BY xid, position) AS n FROM alert_changes) o
WHERE c.position = o.position;
SELECT setval('alert_changes_commit_seq', coalesce(max(commit_seq), 0) + 1, false)
FROM alert_changes;
CREATE UNIQUE INDEX alert_changes_commit_order ON alert_changes (commit_seq);

CREATE FUNCTION alert_changes_number() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    pending bigint;
    first bigint;
BEGIN
    -- Once per transaction: the first row's call numbers every row of it; the others
    -- find their own row numbered (one primary-key look-up each).
    IF (SELECT commit_seq FROM alert_changes WHERE position = NEW.position) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    PERFORM pg_advisory_xact_lock(1717921124);  -- 0x66656564, "feed"
    SELECT count(*) INTO pending FROM alert_changes
    WHERE xid = pg_current_xact_id() AND commit_seq IS NULL;
    IF pending = 0 THEN
        RETURN NULL;  -- the row was deleted again in this transaction
    END IF;
    -- Under the lock nobody else draws from the sequence: take a block of numbers.
    first := nextval('alert_changes_commit_seq');
    IF pending > 1 THEN
        PERFORM setval('alert_changes_commit_seq', first + pending - 1);
    END IF;
    UPDATE alert_changes c SET commit_seq = first + o.i - 1
    FROM (SELECT position, row_number() OVER (ORDER BY position) AS i FROM alert_changes
          WHERE xid = pg_current_xact_id() AND commit_seq IS NULL) o
    WHERE c.position = o.position;
    RETURN NULL;
END $$;

-- Named to fire before any later-named deferred trigger on the same row.
CREATE CONSTRAINT TRIGGER alert_changes_commit_order AFTER INSERT ON alert_changes
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION alert_changes_number();
