"""The PostgreSQL store's schema, as the migrations that build it: ``MIGRATIONS[n]`` takes the schema
from version n to n + 1, in one transaction (``PostgresStore._migrate`` runs them under a lock)."""

from __future__ import annotations

from store import COIN, DONE, DUPLICATE, FAILED, INVALID, MALFORMED, STATUSES

ENDED = (DONE, INVALID, FAILED)  # the statuses whose moves a batch's row counts (schema 2)
BATCH_COLUMNS = ("submitted", "duplicates", "malformed", "coins", *ENDED)
BULK_COUNTED = "coin_retriever.bulk_counted"  # set in a transaction whose coin moves are counted by batch

MIGRATIONS = [
    f"""
CREATE TABLE coins (
    id TEXT PRIMARY KEY,
    task_run BIGINT NOT NULL,
    status TEXT NOT NULL,
    exchanges TEXT[],
    error TEXT,
    claim BIGINT NOT NULL DEFAULT 0,
    lease_until DOUBLE PRECISION,
    not_before DOUBLE PRECISION,
    first_pass JSONB,
    fetched_at DOUBLE PRECISION,
    tickers INTEGER,
    total INTEGER,
    complete BOOLEAN,
    refreshing BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX coins_queued ON coins (task_run) WHERE status = 'queued';
CREATE INDEX coins_leased ON coins (lease_until) WHERE status = 'running';
CREATE INDEX coins_listed ON coins (task_run) INCLUDE (id) WHERE status = 'done' OR refreshing;
CREATE INDEX coins_by_age ON coins (fetched_at) WHERE status = 'done' AND NOT refreshing;
CREATE INDEX coins_by_exchange ON coins USING gin (exchanges);
CREATE SEQUENCE claims;
CREATE TABLE batches (
    id TEXT PRIMARY KEY,
    created DOUBLE PRECISION NOT NULL,
    closed BOOLEAN NOT NULL DEFAULT FALSE,
    position BIGSERIAL
);
CREATE TABLE batch_entries (
    batch_id TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    coin_id TEXT NOT NULL,
    task_run BIGINT NOT NULL,
    kind TEXT NOT NULL,
    PRIMARY KEY (batch_id, position)
);
CREATE INDEX batch_entries_by_coin ON batch_entries (coin_id);
CREATE TABLE state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    scope TEXT NOT NULL,
    next_task_run BIGINT NOT NULL,
    generation BIGINT NOT NULL,
    version BIGINT NOT NULL,
    relisted_floor BIGINT NOT NULL
);
INSERT INTO state VALUES (1, substr(md5(random()::text), 1, 8), 1, 1, 1, 0);
CREATE TABLE relisted (seq BIGSERIAL PRIMARY KEY, coin_id TEXT NOT NULL);
CREATE TABLE status_counts (status TEXT PRIMARY KEY, n BIGINT NOT NULL);
INSERT INTO status_counts SELECT unnest(ARRAY{list(STATUSES)}), 0;
CREATE TABLE credits (month TEXT PRIMARY KEY, used BIGINT NOT NULL);
CREATE TABLE pacing (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    next_slot DOUBLE PRECISION NOT NULL,
    paused_until DOUBLE PRECISION NOT NULL,
    pauses BIGINT NOT NULL
);
INSERT INTO pacing VALUES (1, 0, 0, 0);
"""
    + "".join(
        f"""
CREATE FUNCTION count_statuses_{op}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM status_counts ORDER BY status FOR UPDATE;
    UPDATE status_counts s SET n = s.n + d.k FROM (
        SELECT status, sum(k) AS k FROM ({rows}) x GROUP BY status
    ) d WHERE s.status = d.status AND d.k <> 0;
    RETURN NULL;
END $$;
CREATE TRIGGER count_statuses_{op} AFTER {event} ON coins REFERENCING {tables}
    FOR EACH STATEMENT EXECUTE FUNCTION count_statuses_{op}();
"""
        for op, event, tables, rows in (
            ("insert", "INSERT", "NEW TABLE AS new_rows", "SELECT status, 1 AS k FROM new_rows"),
            ("update", "UPDATE", "OLD TABLE AS old_rows NEW TABLE AS new_rows",
             "SELECT status, 1 AS k FROM new_rows UNION ALL SELECT status, -1 FROM old_rows"),
            ("delete", "DELETE", "OLD TABLE AS old_rows", "SELECT status, -1 AS k FROM old_rows"),
        )
    ),
    # 2: each batch's counts kept in its row, rather than counted on every read. Only the moves into
    # and out of an ending status (done, invalid, failed) are counted, a row trigger each: a claim or
    # a release moves nothing, so the busiest statements do not touch the batch. Running coins are
    # few and counted when read; queued ones are what remains. Coins are inserted before their
    # entries (submit counts its own) and deleted only when no batch has them. A statement that
    # moves many coins counts them itself, in one step a batch (``_move_in_bulk``): one row updated
    # thousands of times in one transaction is a chain of versions walked on every update.
    f"""
ALTER TABLE batches {", ".join(f"ADD COLUMN {column} BIGINT NOT NULL DEFAULT 0" for column in BATCH_COLUMNS)};
UPDATE batches b SET {", ".join(f"{column} = d.{column}" for column in BATCH_COLUMNS)} FROM (
    SELECT e.batch_id, count(*) AS submitted,
        count(*) FILTER (WHERE e.kind = '{DUPLICATE}') AS duplicates,
        count(*) FILTER (WHERE e.kind = '{MALFORMED}' OR (e.kind = '{COIN}' AND c.status IS NULL)) AS malformed,
        count(*) FILTER (WHERE e.kind = '{COIN}') AS coins,
        {", ".join(f"count(*) FILTER (WHERE c.status = '{status}') AS {status}" for status in ENDED)}
    FROM batch_entries e LEFT JOIN coins c ON c.id = e.coin_id AND e.kind = '{COIN}' GROUP BY e.batch_id
) d WHERE b.id = d.batch_id;
CREATE INDEX batch_entries_queued_last ON batch_entries (batch_id, task_run) WHERE kind = '{COIN}';
CREATE FUNCTION count_batches() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('{BULK_COUNTED}', true) = 'on' THEN
        RETURN NULL;
    END IF;
    UPDATE batches b SET {", ".join(f"{s} = {s} + (NEW.status = '{s}')::int - (OLD.status = '{s}')::int"
                                    for s in ENDED)}
        FROM batch_entries e WHERE e.coin_id = NEW.id AND e.kind = '{COIN}' AND b.id = e.batch_id;
    RETURN NULL;
END $$;
CREATE TRIGGER count_batches AFTER UPDATE OF status ON coins FOR EACH ROW
    WHEN (OLD.status <> NEW.status AND (OLD.status IN {ENDED} OR NEW.status IN {ENDED}))
    EXECUTE FUNCTION count_batches();
""",
    # 3: each record that lands takes the next number of one sequence (under the state row, so in
    # commit order): the listing's changes since a number are an index range, and replace the
    # log of re-listed coins. A POST of 50,000 IDs writes as many coins and entries, so what each
    # row costs was cut: entries lose the per-row foreign-key check (delete_batch deletes a
    # batch's entries) and the key on their position (the next one is the batch's kept count; one
    # index on (batch, taskRun) of every kind serves a batch's reads and its last queued coin);
    # IDs compare byte by byte (no order of IDs is ever shown, and a locale's is slower); the
    # exchange index holds listed coins only (the only ones it is asked about, and a new coin's
    # NULL is an entry too); a submission counts the statuses of the coins it inserts, rather
    # than a trigger reading them all back from a transition table.
    """
ALTER TABLE coins ADD COLUMN listed_seq BIGINT;
CREATE SEQUENCE listing_changes;
CREATE INDEX coins_listing_changes ON coins (listed_seq) WHERE listed_seq IS NOT NULL;
DROP TABLE relisted;
ALTER TABLE state DROP COLUMN relisted_floor;
ALTER TABLE batch_entries DROP CONSTRAINT batch_entries_batch_id_fkey, DROP CONSTRAINT batch_entries_pkey,
    ALTER COLUMN batch_id TYPE TEXT COLLATE "C", ALTER COLUMN coin_id TYPE TEXT COLLATE "C";
ALTER TABLE coins ALTER COLUMN id TYPE TEXT COLLATE "C";
ALTER TABLE batches ALTER COLUMN id TYPE TEXT COLLATE "C";
DROP INDEX batch_entries_queued_last;
CREATE INDEX batch_entries_by_batch ON batch_entries (batch_id, task_run);
DROP INDEX coins_by_exchange;
CREATE INDEX coins_by_exchange ON coins USING gin (exchanges) WHERE status = 'done' OR refreshing;
DROP TRIGGER count_statuses_insert ON coins;
DROP FUNCTION count_statuses_insert();
""",
    # A done record's source (NULL: its own pages, as before sweeps); a sweep under way, which any
    # process on the database may take over when the one sweeping stops renewing its lease.
    """
ALTER TABLE coins ADD COLUMN source TEXT;
CREATE TABLE sweep (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    started DOUBLE PRECISION NOT NULL,
    exchanges JSONB NOT NULL
);
CREATE TABLE sweep_exchanges (exchange_id TEXT COLLATE "C" PRIMARY KEY, state JSONB NOT NULL, seq BIGSERIAL);
CREATE TABLE sweep_history (id INTEGER PRIMARY KEY CHECK (id = 1), last_calls INTEGER);
""",
    # One sweep shared by every process: its leader, and each exchange's reader, under leases; an
    # exchange has its row from the sweep's start (its state NULL until it is begun).
    """
ALTER TABLE sweep ADD COLUMN leader TEXT, ADD COLUMN lease_until DOUBLE PRECISION;
ALTER TABLE sweep_exchanges ALTER COLUMN state DROP NOT NULL, ADD COLUMN reader TEXT,
    ADD COLUMN lease_until DOUBLE PRECISION;
""",
]
SCHEMA_VERSION = len(MIGRATIONS)
