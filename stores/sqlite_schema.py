"""The SQLite store's schema, as the migrations that build it: ``MIGRATIONS[n]`` takes a file from
schema version n to n + 1, in one transaction; a later release appends a step, and a user's file is
brought up to date when the service starts (``SqliteStore._migrate``)."""

MIGRATIONS = [
    """
CREATE TABLE coins (
    id TEXT PRIMARY KEY,
    task_run INTEGER NOT NULL,
    status TEXT NOT NULL,
    exchanges TEXT,
    error TEXT
);
CREATE INDEX coins_by_status ON coins (status, task_run);
CREATE TABLE batches (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    closed INTEGER NOT NULL DEFAULT 0,
    position INTEGER NOT NULL
);
CREATE TABLE batch_entries (
    batch_id TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    coin_id TEXT NOT NULL,
    task_run INTEGER NOT NULL,
    kind TEXT NOT NULL,
    PRIMARY KEY (batch_id, position)
);
CREATE INDEX batch_entries_by_coin ON batch_entries (coin_id);
CREATE TABLE counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO counters (name, value) VALUES ('next_task_run', 1), ('next_batch_position', 1);
""",
    # 2: the token of the claim a running coin is under, so that a cancelled claim cannot land.
    """
ALTER TABLE coins ADD COLUMN claim INTEGER NOT NULL DEFAULT 0;
""",
    # 3: page drift (a coin waits, with its first pass), a done coin's facts, and the credit count.
    """
ALTER TABLE coins ADD COLUMN not_before REAL;
ALTER TABLE coins ADD COLUMN first_pass TEXT;
ALTER TABLE coins ADD COLUMN fetched_at REAL;
ALTER TABLE coins ADD COLUMN tickers INTEGER;
ALTER TABLE coins ADD COLUMN total INTEGER;
ALTER TABLE coins ADD COLUMN complete INTEGER;
CREATE TABLE credits (month TEXT PRIMARY KEY, used INTEGER NOT NULL);
""",
    # 4: a done coin fetched again stays listed with its previous exchanges while it is queued.
    """
ALTER TABLE coins ADD COLUMN refreshing INTEGER NOT NULL DEFAULT 0;
""",
    # 5: a submission's entries in one row, as the three columns the store keeps them in (BatchEntries),
    # rather than a row (and three B-tree insertions) for each: a POST of 50,000 IDs writes one row.
    # The kinds are KIND_CODES, one byte an entry; a file's older entries become one part each.
    """
CREATE TABLE batch_parts (
    batch_id TEXT NOT NULL,
    first INTEGER NOT NULL,
    coin_ids TEXT NOT NULL,
    task_runs TEXT NOT NULL,
    kinds BLOB NOT NULL,
    PRIMARY KEY (batch_id, first)
) WITHOUT ROWID;
INSERT INTO batch_parts
    SELECT batch_id, position, json_array(coin_id), json_array(task_run),
           CASE kind WHEN 'coin' THEN x'00' WHEN 'duplicate' THEN x'01' ELSE x'02' END
    FROM batch_entries;
DROP TABLE batch_entries;
""",
    # A done record's source (NULL: its own pages, as before sweeps); a sweep under way, for a restart.
    """
ALTER TABLE coins ADD COLUMN source TEXT;
CREATE TABLE sweep (id INTEGER PRIMARY KEY CHECK (id = 1), started REAL NOT NULL, exchanges TEXT NOT NULL);
CREATE TABLE sweep_exchanges (exchange_id TEXT PRIMARY KEY, state TEXT NOT NULL);
CREATE TABLE sweep_history (id INTEGER PRIMARY KEY CHECK (id = 1), last_calls INTEGER);
""",
]
SCHEMA_VERSION = len(MIGRATIONS)
